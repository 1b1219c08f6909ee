"""Raw NSD betas of one subject -> the prepared fMRI arrays of the dataset root (docs/prepare.md).

Per subject, under `<root>/nsd/fmris/subjXX/`:

    whole/nsd_betas_{tr,te}.npy     (samples, X, Y, Z) float16  z-scored whole-brain volumes
    whole/nsd_betas_{mean,std}.npy  (X, Y, Z) float32            train statistics, percent signal change
    whole/masks.npz                 bool (X, Y, Z): brain, union (of the areas), one per area
    whole/meta.json                 grid, affine, voxel size, sample counts, normalisation
    area/nsd_{area}_betas_{tr,te}.npy     (samples, voxels) float32, voxels in C order over (X, Y, Z)
    area/nsd_{area}_betas_{mean,std}.npy  (voxels,) float32
    nsd_fmri2image.json             image, repeat and trial of every sample, per split
    run.json                        settings and input fingerprints (io.StageRun), written last

Samples are single trials in chronological order; a trial is test ("te"/"val", NSD's shared-1000
test set; `llava_brain.subjects` names the splits) iff its image is one of the shared images
(`sharedix`), train otherwise. Values are beta/300 (percent signal change) z-scored per voxel
with the mean and standard deviation of the training trials; voxels with no variance (outside
the brain) are 0.

How it streams (docs/nsd_formats.md §6): one session is read whole (the fast chunk path of
`BetaSession`) while the next is read by a background thread, so at most two sessions of int16
betas are in memory (NSD: 2 x 1.05 GB). Pass 1 writes each session's trials, trial-major, as
int16 into the final arrays' bytes (float16 has the same width) and the areas as float32 beta/300,
and sums the training statistics exactly (integers in float64). Pass 2 rewrites the arrays in
place, block by block, z-scored. Everything is written inside `fmris/.subjXX.partial/`
(`io.staged_folder`), renamed to `subjXX/` only when complete, so a killed run leaves no
half-written subject.
"""

from __future__ import annotations

import concurrent.futures
import logging
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from llava_brain.errors import BadInputError
from llava_brain.io import NpyRows, StageRun, staged_folder, write_json
from llava_brain.layout import DatasetRoot, NsdTree, subject_name
from llava_brain.nsd.betas import BetaSession
from llava_brain.nsd.constants import BETA_SCALE
from llava_brain.nsd.design import ExpDesign, repeat_index
from llava_brain.nsd.roi import area_masks, read_volume
from llava_brain.subjects import SPLITS, TEST, TRAIN, split_key

log = logging.getLogger(__name__)
BLOCK_TRIALS = 32  # trials per copy/convert block: ~45 MB of int16 at NSD's grid


def parse_sessions(spec: str, available: list[int]) -> list[int]:
    """'all' -> 1..max(available); '1-37', '3', '1,4,7-9' -> those sessions (sorted, unique)."""
    spec = spec.strip().lower()
    if spec == "all":
        return list(range(1, max(available) + 1)) if available else []
    sessions: set[int] = set()
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise ValueError(f"sessions must look like 'all', '1-37' or '1,3,5-7'; got {spec!r}")
        first, last = int(match[1]), int(match[2] or match[1])
        if first < 1 or last < first:
            raise ValueError(f"session range {part.strip()!r} must be increasing and start at 1 or later")
        sessions.update(range(first, last + 1))
    return sorted(sessions)


@dataclass
class SubjectPlan:
    """What will be extracted for one subject, validated before any output is written."""

    subject: int
    betas_format: str
    sessions: list[int]
    paths: list[Path]
    trials_per_session: int
    grid: tuple[int, int, int]
    affine: np.ndarray
    brain: np.ndarray  # bool (X, Y, Z)
    areas: dict[str, np.ndarray]  # area name -> bool (X, Y, Z)
    nsd_ids: np.ndarray  # (trials,) 0-based nsdId of every selected trial, chronological
    trial: np.ndarray  # (trials,) 0-based global trial index
    repeat: np.ndarray  # (trials,) 0-based presentation number of the image for this subject
    test: np.ndarray  # (trials,) bool
    atlases: list[str] = field(default_factory=list)

    @property
    def num_trials(self) -> int:
        return len(self.nsd_ids)

    def settings(self) -> dict:
        """What determines the output, resolved (session numbers, atlas names), for `io.StageRun`."""
        return {
            "subject": self.subject,
            "sessions": self.sessions,
            "atlases": self.atlases,
            "betas_format": self.betas_format,
        }

    def stage_run(self, tree: NsdTree, layout: DatasetRoot) -> StageRun:
        """The rerun rule of this subject's folder: its settings and every file the extraction reads."""
        return StageRun(
            layout.fmri_dir(self.subject),
            settings=self.settings(),
            inputs={
                "betas": self.paths,  # NSD's 1 GB sessions: size + mtime; small ones by content
                "brainmask": tree.brainmask(self.subject),
                "rois": [tree.roi(self.subject, atlas) for atlas in self.atlases],
                "label_tables": [tree.roi_ctab(atlas) for atlas in self.atlases],  # absent ones count too
                "design": tree.expdesign,
            },
        )


def plan_subject(
    tree: NsdTree, subject: int, sessions_spec: str, atlases: list[str], betas_format: str = "hdf5"
) -> SubjectPlan:
    available = tree.sessions(subject, betas_format)
    if not available:
        suffix = "hdf5" if betas_format == "hdf5" else "nii.gz"
        raise BadInputError(tree.betas_dir(subject), f"no betas_sessionNN.{suffix} files for {subject_name(subject)}")
    sessions = parse_sessions(sessions_spec, available)
    paths = [tree.betas(subject, s, betas_format) for s in sessions]
    for session, path in zip(sessions, paths, strict=True):
        if not path.is_file():
            raise BadInputError(path, f"missing; session {session} of {subject_name(subject)} was selected "
                                      f"(--sessions {sessions_spec}; found sessions {available})")  # fmt: skip

    counts, grids = [], []
    for path in paths:  # headers only: trial counts and grids, before any data is read
        with BetaSession(path) as f:
            counts.append(f.num_trials)
            grids.append(f.grid)
    # The majority defines what is expected (NSD: 750 trials, the subject's grid): the odd one out is broken.
    grid = Counter(grids).most_common(1)[0][0]
    trials_per_session = Counter(counts).most_common(1)[0][0]
    for path, count, g in zip(paths, counts, grids, strict=True):
        if g != grid:
            raise BadInputError(path, f"betas grid (X, Y, Z) is {g}; the other sessions have {grid}")
        if count != trials_per_session:
            raise BadInputError(path, f"has {count} trials; the other sessions have {trials_per_session}")

    brain_volume = read_volume(tree.brainmask(subject), expect_grid=grid)
    masks = area_masks(tree, subject, atlases, expect_grid=grid)
    design = ExpDesign.load(tree.expdesign)
    last_trial = max(sessions) * trials_per_session
    all_ids = design.trial_images(subject, last_trial)  # raises naming the design file if too short
    trial = np.concatenate([(s - 1) * trials_per_session + np.arange(trials_per_session) for s in sessions])
    nsd_ids = all_ids[trial]
    test = design.is_shared(nsd_ids)
    if test.all():
        raise BadInputError(paths[0].parent, f"sessions {sessions} hold no training trials (every image is shared); "
                                             "select more sessions")  # fmt: skip
    return SubjectPlan(
        subject=subject,
        betas_format=betas_format,
        sessions=sessions,
        paths=paths,
        trials_per_session=trials_per_session,
        grid=grid,
        affine=brain_volume.affine,
        brain=brain_volume.data > 0,
        areas=masks,
        nsd_ids=nsd_ids,
        trial=trial,
        repeat=repeat_index(all_ids)[trial],  # counts presentations in unselected sessions too
        test=test,
        atlases=list(atlases),
    )


def _read_session(path: Path, grid) -> torch.Tensor:
    """(T, X, Y, Z) int16 of one session, as a tensor sharing the array's memory."""
    with BetaSession(path, expect_grid=grid) as f:
        data = f.read()
    with warnings.catch_warnings():  # NIfTI arrays may be read-only; they are never written to
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(data)


class _Outputs:
    """The arrays of one subject, open for row-block writes inside the staging folder."""

    def __init__(self, layout: DatasetRoot, staging: Path, plan: SubjectPlan):
        final = layout.fmri_dir(plan.subject)

        def staged(path: Path) -> Path:
            return staging / path.relative_to(final)

        self.staged = staged
        counts = {TRAIN: int((~plan.test).sum()), TEST: int(plan.test.sum())}
        self.whole = {
            split: NpyRows(staged(layout.whole_betas(plan.subject, split)), (n, *plan.grid), np.float16)
            for split, n in counts.items()
        }
        self.area_index = {name: np.nonzero(mask) for name, mask in plan.areas.items()}  # C order over X, Y, Z
        # The same voxels as columns of a flattened (trials, X*Y*Z) block.
        self.area_columns = {name: torch.from_numpy(np.flatnonzero(mask)) for name, mask in plan.areas.items()}
        self.area = {
            (name, split): NpyRows(staged(layout.area_betas(plan.subject, name, split)), (n, len(idx[0])), np.float32)
            for name, idx in self.area_index.items()
            for split, n in counts.items()
        }

    def close(self) -> None:
        for f in [*self.whole.values(), *self.area.values()]:
            f.close()


def extract_subject(
    layout: DatasetRoot, plan: SubjectPlan, run: StageRun, args=None, progress: bool = True, prefetch: int = 1
) -> dict:
    """Write one subject's prepared arrays (see the module docstring) and `run`'s provenance; returns a summary.

    Built in a staging folder that replaces `fmris/subjXX/` only when complete (also under --overwrite).
    """
    with staged_folder(layout.fmri_dir(plan.subject)) as staging:
        summary = _extract(layout, plan, staging, progress, prefetch)
        run.finish(args or {}, into=staging, summary=summary)  # last: marks the subject finished
    return summary


def _extract(layout: DatasetRoot, plan: SubjectPlan, staging: Path, progress: bool, prefetch: int) -> dict:
    out = _Outputs(layout, staging, plan)
    grid_voxels = int(np.prod(plan.grid))
    sum1 = torch.zeros(grid_voxels, dtype=torch.float64)  # sums of int16 betas (and squares) over training trials
    sum2 = torch.zeros(grid_voxels, dtype=torch.float64)
    block = torch.empty((BLOCK_TRIALS, *plan.grid), dtype=torch.int16)
    wide = torch.empty((BLOCK_TRIALS, grid_voxels), dtype=torch.float64)
    rows = {split: 0 for split in SPLITS}
    name = subject_name(plan.subject)
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, prefetch)) as pool:
            # Reads run ahead in a background thread; results are consumed strictly in session order.
            pending = [pool.submit(_read_session, p, plan.grid) for p in plan.paths[: prefetch + 1]]
            bar = tqdm(plan.sessions, f"{name} pass 1/2 (read, write)", unit="session", disable=not progress)
            for i, _session in enumerate(bar):
                source = pending.pop(0).result()  # (T, X, Y, Z) int16
                if i + prefetch + 1 < len(plan.paths):
                    pending.append(pool.submit(_read_session, plan.paths[i + prefetch + 1], plan.grid))
                test = plan.test[i * plan.trials_per_session : (i + 1) * plan.trials_per_session]
                for split, chosen in ((TRAIN, np.flatnonzero(~test)), (TEST, np.flatnonzero(test))):
                    for start in range(0, len(chosen), BLOCK_TRIALS):
                        index = torch.from_numpy(chosen[start : start + BLOCK_TRIALS])
                        n, row = len(index), rows[split] + start
                        b = block[:n]
                        torch.index_select(source, 0, index, out=b)  # trial-major copy of a block
                        out.whole[split].write(row, b.numpy())
                        flat = b.reshape(n, -1)
                        if split == TRAIN:
                            # Exact: integer sums stay far below 2**53 in float64. einsum runs as a
                            # batched matmul, ~6x faster than a dtype-casting sum of squares.
                            values = wide[:n]
                            values.copy_(flat)
                            sum1 += values.sum(0)
                            sum2 += torch.einsum("tv,tv->v", values, values)
                        for area, columns in out.area_columns.items():
                            values = torch.index_select(flat, 1, columns).to(torch.float32).div_(BETA_SCALE)
                            out.area[area, split].write(row, values.numpy())
                    rows[split] += len(chosen)
                del source
        mean, std = _statistics(sum1, sum2, rows[TRAIN], plan)
        _normalise(out, mean, std, plan, progress)
    finally:
        out.close()
    _write_metadata(layout, out, plan, mean, std, rows)
    return {"subject": plan.subject, "train": rows[TRAIN], "test": rows[TEST], "sessions": len(plan.sessions)}


def _statistics(sum1: torch.Tensor, sum2: torch.Tensor, n: int, plan: SubjectPlan) -> tuple[np.ndarray, np.ndarray]:
    """Per-voxel mean and standard deviation (ddof 0) of beta/300 over the training trials."""
    if n == 0:
        raise BadInputError(plan.paths[0].parent, "the selected sessions hold no training trials; select more sessions")
    mean = sum1.numpy() / n  # raw int16 units
    var = np.maximum(sum2.numpy() / n - mean * mean, 0.0)
    mean, std = mean / BETA_SCALE, np.sqrt(var) / BETA_SCALE
    return mean.reshape(plan.grid).astype(np.float32), std.reshape(plan.grid).astype(np.float32)


def _normalise(out: _Outputs, mean: np.ndarray, std: np.ndarray, plan: SubjectPlan, progress: bool) -> None:
    """Pass 2: rewrite every array in place as (beta/300 - mean) / std; 0 where std is 0."""
    inv = np.divide(1.0, std, out=np.zeros_like(std), where=std > 0)
    scale = torch.from_numpy(inv / np.float32(BETA_SCALE))  # int16 -> z directly: (raw/300 - mean) * inv
    shift = torch.from_numpy(mean * inv)
    total = sum(f.shape[0] for f in out.whole.values())
    bar = tqdm(total=total, desc=f"{subject_name(plan.subject)} pass 2/2 (z-score)", unit="trial",
               disable=not progress)  # fmt: skip
    for f in out.whole.values():
        for row in range(0, f.shape[0], BLOCK_TRIALS):
            n = min(BLOCK_TRIALS, f.shape[0] - row)
            raw = torch.from_numpy(f.read(row, n, np.int16))
            z = raw.to(torch.float32).mul_(scale).sub_(shift)
            f.write(row, z.to(torch.float16).numpy())
            bar.update(n)
    bar.close()
    for (area, _split), f in out.area.items():
        x, y, z = out.area_index[area]
        a_mean, a_inv = mean[x, y, z], inv[x, y, z]
        rows_per_block = max(1, (64 << 20) // max(1, f.row_bytes))
        for row in range(0, f.shape[0], rows_per_block):
            n = min(rows_per_block, f.shape[0] - row)
            f.write(row, (f.read(row, n) - a_mean) * a_inv)


def _write_metadata(layout, out: _Outputs, plan: SubjectPlan, mean, std, rows) -> None:
    subject = plan.subject
    np.save(out.staged(layout.whole_stats(subject, "mean")), mean)
    np.save(out.staged(layout.whole_stats(subject, "std")), std)
    union = np.zeros(plan.grid, bool)
    for mask in plan.areas.values():
        union |= mask
    np.savez_compressed(out.staged(layout.whole_masks(subject)), brain=plan.brain, union=union, **plan.areas)
    for area, (x, y, z) in out.area_index.items():
        np.save(out.staged(layout.area_stats(subject, area, "mean")), mean[x, y, z])
        np.save(out.staged(layout.area_stats(subject, area, "std")), std[x, y, z])
    voxel_mm = [round(float(v), 4) for v in np.linalg.norm(plan.affine[:3, :3], axis=0)]
    write_json(
        out.staged(layout.whole_meta(subject)),
        {
            "subject": subject,
            "grid": list(plan.grid),
            "axes": "samples, X, Y, Z (NSD NIfTI voxel order)",
            "affine": plan.affine.tolist(),
            "voxel_size_mm": voxel_mm,
            "dtype": "float16",
            "samples": {split_key(split): rows[split] for split in SPLITS},
            "normalisation": "(beta / 300 - train mean) / train std per voxel; 0 where std is 0",
            "areas": {name: int(mask.sum()) for name, mask in plan.areas.items()},
            "masks": layout.whole_masks(subject).name,
            "sessions": plan.sessions,
            "trials_per_session": plan.trials_per_session,
        },
    )
    mapping = {}
    for split in SPLITS:
        chosen = plan.test if split == TEST else ~plan.test
        mapping[split_key(split)] = plan.nsd_ids[chosen].tolist()
        mapping[split_key(split, "repeat")] = plan.repeat[chosen].tolist()
        mapping[split_key(split, "trial")] = plan.trial[chosen].tolist()
    write_json(out.staged(layout.fmri2image(subject)), mapping, indent=None)


def session_buffer_bytes(grid: tuple[int, int, int], trials_per_session: int, prefetch: int = 1) -> int:
    """Memory of the int16 session buffers: the session in hand plus `prefetch` sessions read ahead."""
    return (prefetch + 1) * trials_per_session * int(np.prod(grid)) * 2
