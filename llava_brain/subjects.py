"""Subjects and splits: which subjects a dataset holds, how `--subject` resolves, what the splits are called.

Splits. NSD has no validation split: every trial of one of the 1,000 images all subjects saw
("shared1000") is a **test** trial, every other trial is a training trial. The prepared dataset root
keeps the seed's two spellings of that one distinction, and this module is where they meet:

    file suffix   nsd_fmri2image.json key   meaning
    "tr"          "train" (+ "train_repeat", "train_trial")   training trials
    "te"          "val"   (+ "val_repeat",   "val_trial")     NSD's shared-1000 test trials

"val" is the name LLaVA-style code expects for its held-out split; here it is the test set.

Subjects. `--subject` takes NSD subject numbers or the word `all`. What `all` means and which
numbers are valid depends on where the subjects come from (a raw NSD tree, the stimulus CSV, a
prepared root): each script names that source once, and `resolve_subjects` turns the request into
a sorted list of subject numbers, or stops with one line naming the folder and what is there.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llava_brain.errors import BadInputError
from llava_brain.io import read_json
from llava_brain.layout import DatasetRoot, subject_name
from llava_brain.nsd.constants import NUM_SUBJECTS

SPLITS = ("tr", "te")
TRAIN, TEST = SPLITS
# file suffix -> key of nsd_fmri2image.json
SPLIT_KEYS = {"tr": "train", "te": "val"}
ALL = "all"


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be 'tr' (train) or 'te' (test, NSD's shared-1000), got {split!r}")
    return split


def split_key(split: str, field: str = "") -> str:
    """Key of `nsd_fmri2image.json` for a split: ("te") -> "val", ("te", "repeat") -> "val_repeat"."""
    key = SPLIT_KEYS[check_split(split)]
    return f"{key}_{field}" if field else key


# --subject ------------------------------------------------------------------------------------


def subject_arg(text: str) -> int | str:
    """argparse type of one `--subject` value: a subject number or 'all'.

    Only the syntax is checked here; whether the data hold the subject (NSD has 1..8) is decided by
    `resolve_subjects`, which names the folder and the subjects found in one line.
    """
    if text.lower() == ALL:
        return ALL
    try:
        subject = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a subject number (NSD: 1..{NUM_SUBJECTS}) or 'all', got {text!r}"
        ) from None
    if not 1 <= subject <= 99:
        raise argparse.ArgumentTypeError(f"a subject number is 1..99 (NSD: 1..{NUM_SUBJECTS}), got {subject}")
    return subject


def resolve_subjects(requested: Sequence[int | str], available: Iterable[int], where: Path, what: str) -> list[int]:
    """Sorted subject numbers of a `--subject` request; 'all' = every available subject.

    `available` are the subjects the data holds, `where` the file or folder that says so and `what`
    how a subject gets there (e.g. "prepared subjects (make_subjmri.py)"). A subject that is not
    available, or an empty 'all', is a BadInputError naming `where`.
    """
    available = sorted({int(s) for s in available})
    requested = list(requested)
    if any(r == ALL for r in requested):
        if len(requested) > 1:
            raise BadInputError(where, f"--subject all cannot be combined with subject numbers, got {requested}")
        if not available:
            raise BadInputError(where, f"holds no {what}")
        return available
    chosen = sorted({int(r) for r in requested})
    missing = [s for s in chosen if s not in available]
    if missing:
        found = ", ".join(subject_name(s) for s in available) or "none"
        raise BadInputError(where, f"has no {subject_name(missing[0])} among its {what} (found: {found})")
    return chosen


def prepared_subjects(layout: DatasetRoot) -> list[int]:
    """Subjects of a prepared root: those with `fmris/subjXX/nsd_fmri2image.json` (make_subjmri.py)."""
    folder = layout.fmris_dir
    if not folder.is_dir():
        return []
    found = [int(p.name[4:]) for p in folder.glob("subj[0-9][0-9]") if p.name[4:].isdigit()]
    return sorted(s for s in found if layout.fmri2image(s).is_file())


def resolve_prepared(layout: DatasetRoot, requested: Sequence[int | str]) -> list[int]:
    what = "prepared subjects (make_subjmri.py)"
    return resolve_subjects(requested, prepared_subjects(layout), layout.fmris_dir, what)


# nsd_fmri2image.json ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleIndex:
    """The image, repeat and trial of every sample of one subject's split, in sample (= array row) order."""

    subject: int
    split: str
    nsd_ids: np.ndarray  # (samples,) int64, 0-based nsdId
    repeats: np.ndarray  # (samples,) int64, 0 = first presentation of the image to this subject
    trials: np.ndarray | None  # (samples,) int64 global trial number, when recorded

    def __len__(self) -> int:
        return len(self.nsd_ids)


def read_fmri2image(layout: DatasetRoot, subject: int) -> dict:
    path = layout.fmri2image(subject)
    mapping = read_json(path, "nsd_fmri2image.json of a prepared subject (make_subjmri.py)")
    if not isinstance(mapping, dict) or any(not isinstance(mapping.get(SPLIT_KEYS[s]), list) for s in SPLITS):
        raise BadInputError(path, 'expected an object with "train" and "val" lists of nsdIds')
    return mapping


def sample_index(layout: DatasetRoot, subject: int, split: str, mapping: dict | None = None) -> SampleIndex:
    """The validated sample index of one split; `mapping` avoids re-reading the file for the second split."""
    path = layout.fmri2image(subject)
    mapping = read_fmri2image(layout, subject) if mapping is None else mapping
    ids = mapping[split_key(split)]
    repeats = mapping.get(split_key(split, "repeat"))
    trials = mapping.get(split_key(split, "trial"))
    for name, values in ((split_key(split, "repeat"), repeats), (split_key(split, "trial"), trials)):
        if values is not None and (not isinstance(values, list) or len(values) != len(ids)):
            raise BadInputError(path, f'"{name}" must be a list as long as "{split_key(split)}" ({len(ids)})')
    if repeats is None:
        raise BadInputError(path, f'missing "{split_key(split, "repeat")}" (rerun make_subjmri.py)')
    return SampleIndex(
        subject=subject,
        split=split,
        nsd_ids=np.asarray(ids, dtype=np.int64),
        repeats=np.asarray(repeats, dtype=np.int64),
        trials=None if trials is None else np.asarray(trials, dtype=np.int64),
    )


def images_of(layout: DatasetRoot, subjects: Sequence[int]) -> list[int]:
    """Sorted nsdIds of every image (train and test) some of `subjects` saw."""
    ids: set[int] = set()
    for subject in subjects:
        mapping = read_fmri2image(layout, subject)
        ids.update(int(i) for split in SPLITS for i in mapping[split_key(split)])
    return sorted(ids)


# Sample references ----------------------------------------------------------------------------
# One fMRI input as text: "subjXX/<split>/<row>[+<row>...]" (rows of the split's arrays; several rows
# joined by "+" = their average). SFT records (`image`), prediction files, generated texts and
# reconstruction files all name their samples this way; `Sample.key` is the file-name form.

_REFERENCE = re.compile(r"subj(\d{2})/(tr|te)/(\d+(?:\+\d+)*)")


@dataclass(frozen=True)
class Sample:
    """What one record's `image` stands for: rows of one subject's split, all showing one image;
    `per_image` = the average of all the image's repeats (possibly one), else a single sample."""

    subject: int
    split: str
    nsd_id: int
    rows: tuple[int, ...]
    per_image: bool = False

    @property
    def reference(self) -> str:
        return f"{subject_name(self.subject)}/{self.split}/{'+'.join(map(str, self.rows))}"

    @property
    def key(self) -> str:
        """Record id without the type: by row for a single sample, by nsdId for an image."""
        unit = f"nsd{self.nsd_id:06d}" if self.per_image else f"{self.rows[0]:06d}"
        return f"{subject_name(self.subject)}_{self.split}_{unit}"

    @property
    def fields(self) -> dict[str, Any]:
        """The record's provenance keys beside `image`."""
        where = {"samples": list(self.rows)} if self.per_image else {"sample": self.rows[0]}
        return {"nsd_id": self.nsd_id, "subject": self.subject, "split": self.split, **where}


def parse_sample_reference(reference: str) -> tuple[int, str, list[int]]:
    """`"subj01/tr/5"` -> (1, "tr", [5]); `"subj01/te/3+9"` -> (1, "te", [3, 9])."""
    match = _REFERENCE.fullmatch(reference)
    if not match:
        raise ValueError(f"not a sample reference 'subjXX/tr|te/row[+row...]': {reference!r}")
    return int(match[1]), match[2], [int(row) for row in match[3].split("+")]


def fmri_samples(nsd_ids: Sequence[int], subject: int, split: str, per_image: bool) -> list[Sample]:
    """The samples of one subject's split (`nsd_ids` = its list in nsd_fmri2image.json), in row order;
    per image: one per distinct image, holding all its rows, ordered by the image's first row."""
    if not per_image:
        return [Sample(subject, split, int(nsd_id), (row,)) for row, nsd_id in enumerate(nsd_ids)]
    rows: dict[int, list[int]] = {}
    for row, nsd_id in enumerate(nsd_ids):
        rows.setdefault(int(nsd_id), []).append(row)
    return [Sample(subject, split, nsd_id, tuple(r), per_image=True) for nsd_id, r in rows.items()]
