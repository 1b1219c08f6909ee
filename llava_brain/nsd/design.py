"""The NSD experimental design: `nsd_expdesign.mat` and `nsd_stim_info_merged.csv`.

Index conventions (docs/nsd_formats.md §1.4, §1.6) — the source of most NSD bugs:
- In `nsd_expdesign.mat` everything is **1-based** (MATLAB): `masterordering` holds indices into a
  subject's 10k list (1..10000), `subjectim` holds 73k image ids (1..73000), `sharedix` too.
- In the CSV, `nsdId` is **0-based** (it indexes `imgBrick` directly), while `subjectK_repN` are
  **1-based global trial numbers** with 0 meaning "not shown".
Everything this module returns is 0-based; -1 marks "none".
"""

from __future__ import annotations

import ast
import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llava_brain.errors import BadInputError, require_file
from llava_brain.layout import NsdTree
from llava_brain.nsd.constants import MAX_REPEATS, NUM_SUBJECTS


def _integral(path: Path, name: str, values: np.ndarray) -> np.ndarray:
    values = np.asarray(values)
    if values.size and not np.all(np.isfinite(values)):
        raise BadInputError(path, f"'{name}' must hold finite integers; found NaN or inf")
    as_int = values.astype(np.int64)
    if not np.array_equal(as_int, values):
        raise BadInputError(path, f"'{name}' must hold integers; found fractional values")
    return as_int


@dataclass(frozen=True)
class ExpDesign:
    """`nsd_expdesign.mat`, converted to 0-based numpy arrays.

    masterordering: (num_trials,) index into each subject's image list, per global trial.
    subjectim: (8, images_per_subject) 0-based nsdId of each subject's list entry (-1 = unused).
    shared: (num_shared,) 0-based nsdIds of the shared images, sorted.
    """

    path: Path
    masterordering: np.ndarray
    subjectim: np.ndarray
    shared: np.ndarray

    @classmethod
    def load(cls, path: str | Path) -> ExpDesign:
        from scipy.io import loadmat  # scipy is slow to import; only pay when reading the design

        path = require_file(path, "NSD design file nsd_expdesign.mat (MATLAB v5)")
        try:
            mat = loadmat(path)
        except Exception as err:  # scipy raises ValueError/TypeError/OSError for non-MAT content
            raise BadInputError(path, f"expected a MATLAB .mat file; scipy could not read it ({err})") from None
        missing = [k for k in ("masterordering", "subjectim", "sharedix") if k not in mat]
        if missing:
            raise BadInputError(path, f"expected variables masterordering, subjectim, sharedix; missing {missing}")
        order = _integral(path, "masterordering", mat["masterordering"])
        subjectim = _integral(path, "subjectim", mat["subjectim"])
        sharedix = _integral(path, "sharedix", mat["sharedix"])
        if order.ndim != 2 or order.shape[0] != 1:
            raise BadInputError(path, f"'masterordering' must be 1 x trials; found shape {order.shape}")
        if subjectim.ndim != 2 or subjectim.shape[0] != NUM_SUBJECTS:
            raise BadInputError(path, f"'subjectim' must be {NUM_SUBJECTS} x images; found shape {subjectim.shape}")
        if sharedix.ndim != 2 or sharedix.shape[0] != 1:
            raise BadInputError(path, f"'sharedix' must be 1 x shared images; found shape {sharedix.shape}")
        order, sharedix = order[0], sharedix[0]
        if order.min() < 1 or order.max() > subjectim.shape[1]:
            raise BadInputError(
                path,
                f"'masterordering' must be 1-based indices in 1..{subjectim.shape[1]}; "
                f"found range {order.min()}..{order.max()}",
            )
        if sharedix.min() < 1:
            raise BadInputError(path, f"'sharedix' must be 1-based 73k ids (>= 1); found {sharedix.min()}")
        # subjectim may hold 0 for subjects a design does not cover (mini-NSD); 0 - 1 = -1 = unused.
        return cls(path=path, masterordering=order - 1, subjectim=subjectim - 1, shared=np.sort(sharedix - 1))

    @property
    def num_trials(self) -> int:
        return int(self.masterordering.size)

    @property
    def images_per_subject(self) -> int:
        return int(self.subjectim.shape[1])

    def subject_images(self, subject: int) -> np.ndarray:
        """(images_per_subject,) 0-based nsdIds of one subject's image list."""
        if not 1 <= subject <= NUM_SUBJECTS:
            raise ValueError(f"subject must be in 1..{NUM_SUBJECTS}, got {subject}")
        images = self.subjectim[subject - 1]
        if np.any(images < 0):
            raise BadInputError(self.path, f"'subjectim' has no image list for subject {subject} (entries are 0)")
        return images

    def trial_images(self, subject: int, num_trials: int | None = None) -> np.ndarray:
        """(num_trials,) 0-based nsdId shown at each global trial of `subject` (chronological)."""
        num_trials = self.num_trials if num_trials is None else int(num_trials)
        if not 0 <= num_trials <= self.num_trials:
            raise BadInputError(
                self.path, f"the design has {self.num_trials} trials; {num_trials} were requested (too many sessions?)"
            )
        return self.subject_images(subject)[self.masterordering[:num_trials]]

    def is_shared(self, nsd_ids: np.ndarray) -> np.ndarray:
        """True where an image is one of the shared (test) images — the split rule of every NSD paper."""
        return np.isin(nsd_ids, self.shared)


def repeat_index(nsd_ids: np.ndarray) -> np.ndarray:
    """0-based presentation number of each trial's image among earlier trials (0 = first time seen)."""
    nsd_ids = np.asarray(nsd_ids)
    _, inverse = np.unique(nsd_ids, return_inverse=True)
    order = np.argsort(inverse, kind="stable")  # trials grouped by image, chronological inside a group
    sorted_groups = inverse[order]
    group_start = np.r_[0, np.flatnonzero(np.diff(sorted_groups)) + 1]
    counts = np.diff(np.r_[group_start, sorted_groups.size])
    rank_sorted = np.arange(sorted_groups.size) - np.repeat(group_start, counts)
    ranks = np.empty_like(rank_sorted)
    ranks[order] = rank_sorted
    return ranks


_REQUIRED_CSV_COLUMNS = ("nsdId", "cocoId", "cocoSplit", "cropBox", "shared1000")


@dataclass(frozen=True)
class StimInfo:
    """`nsd_stim_info_merged.csv`: one row per NSD image, row i describes nsdId i.

    coco_id: (N,) COCO image id; coco_split: (N,) 'train2017' | 'val2017';
    crop_box: (N, 4) fractions (top, bottom, left, right) cut from each side of the COCO image
    before the square crop was resized to 425 x 425; shared1000: (N,) bool;
    trials[subject]: (N, 3) 0-based global trial of each presentation, -1 = not shown.
    """

    path: Path
    coco_id: np.ndarray
    coco_split: np.ndarray
    crop_box: np.ndarray
    shared1000: np.ndarray
    trials: dict[int, np.ndarray]

    @classmethod
    def load(cls, path: str | Path) -> StimInfo:
        path = require_file(path, "NSD stimulus table nsd_stim_info_merged.csv")
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise BadInputError(path, "expected a CSV header with columns nsdId, cocoId, ...; file is empty")
            column = {name: i for i, name in enumerate(header)}
            missing = [c for c in _REQUIRED_CSV_COLUMNS if c not in column]
            if missing:
                raise BadInputError(path, f"expected columns {list(_REQUIRED_CSV_COLUMNS)}; missing {missing}")
            rows = [row for row in reader if row]
        try:
            nsd_id = np.array([int(r[column["nsdId"]]) for r in rows], dtype=np.int64)
            coco_id = np.array([int(r[column["cocoId"]]) for r in rows], dtype=np.int64)
            crop_box = np.array([_parse_crop_box(r[column["cropBox"]]) for r in rows], dtype=np.float64)
            shared = np.array([_parse_bool(r[column["shared1000"]]) for r in rows], dtype=bool)
            trials = {}
            for subject in range(1, NUM_SUBJECTS + 1):
                names = [f"subject{subject}_rep{rep}" for rep in range(MAX_REPEATS)]
                if all(n in column for n in names):
                    one_based = np.array([[int(float(r[column[n]])) for n in names] for r in rows], dtype=np.int64)
                    trials[subject] = one_based - 1  # 1-based trial numbers, 0 = not shown -> 0-based, -1
        except (ValueError, IndexError, SyntaxError) as err:
            raise BadInputError(path, f"a row does not parse as NSD stimulus info ({err})") from None
        if not np.array_equal(nsd_id, np.arange(len(rows))):
            raise BadInputError(path, "column nsdId must count 0, 1, 2, ... in row order (row i = image i)")
        coco_split = np.array([r[column["cocoSplit"]] for r in rows])
        return cls(path, coco_id, coco_split, crop_box, shared, trials)

    def __len__(self) -> int:
        return int(self.coco_id.size)

    def shown_subjects(self) -> list[int]:
        """Subjects with at least one shown trial (a `subjectK_rep0` > 0 on some row), ascending."""
        return sorted(s for s, trials in self.trials.items() if np.any(trials[:, 0] >= 0))

    def images_seen_by(self, subjects: list[int]) -> np.ndarray:
        """Sorted 0-based nsdIds of the images any of `subjects` saw.

        Image i counts as seen by subject s iff `trials[s][i, 0] >= 0` (a first presentation happened).
        A subject without a single shown trial is an error: it is a typo or the wrong CSV, not an empty set.
        """
        shown = self.shown_subjects()
        for subject in subjects:
            if subject not in shown:
                raise BadInputError(
                    self.path,
                    f"subject {subject} has no shown trial (subject{subject}_rep0 is 0 or absent); "
                    f"subjects with trials: {shown}",
                )
        seen = [np.flatnonzero(self.trials[s][:, 0] >= 0) for s in subjects]
        return np.unique(np.concatenate(seen)) if seen else np.zeros(0, np.int64)


def stim_info_subjects(nsd_root: str | Path) -> tuple[list[int], Path, str]:
    """Subjects with a shown trial in a raw tree's stimulus table: a `cli.add_subject` source
    (`source=lambda args: stim_info_subjects(args.nsd_root)`) for stages that select images by subject."""
    info = StimInfo.load(NsdTree(nsd_root).stim_info)
    return info.shown_subjects(), info.path, "subjects with a shown trial (subjectK_rep0 > 0)"


def _parse_crop_box(text: str) -> tuple[float, float, float, float]:
    values = ast.literal_eval(text.strip())  # "(0, 0, 0.1671875, 0.1671875)"; literal_eval evaluates no code
    if not isinstance(values, tuple | list) or len(values) != 4:
        raise ValueError(f"cropBox must have 4 values, got {text!r}")
    return tuple(float(v) for v in values)


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "1.0"):
        return True
    if lowered in ("false", "0", "0.0", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")
