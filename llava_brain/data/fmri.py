"""Whole-brain fMRI volumes of several subjects, on one common grid, with their CLIP / VAE targets (ViT3D).

Reads the prepared arrays of the dataset root (`whole/nsd_betas_{tr,te}.npy`, memory-mapped), one subject
after another, and mixes all selected subjects in one dataset (each sample carries its subject). Every
volume is resized once, in blocks, to the common grid (subj01's grid when subject 1 is selected, else the
first selected subject's); when the resized training set fits in `cache_bytes` it is kept in memory as
float16 (mini-NSD: a few hundred MB), else samples are read from the memory maps and resized on the fly,
a batch at a time on the training device (`FmriTrainSet.device_batch`). The two paths give the same
batches up to the float16 rounding of the cache (equal where a subject's grid is the common grid).

Training samples are MixUp-ed between repeats of the same image of the same subject (lambda ~ U(0, 1));
the targets are unchanged since the image is the same. The partner and lambda of sample i in epoch e come
from a generator seeded with (seed, epoch, i), and the epoch's order is a permutation seeded by (seed,
epoch) shared out between processes (`epoch_batches`), so the data are a pure function of (seed, epoch)
whatever the number of workers, and a resumed run sees exactly the same batches.

Non-finite values (NaN, inf) in the betas or the targets are refused with one line naming the file,
where the data pass anyway: each block as it is loaded and resized for the cache and the test sets, each
batch as it arrives in the main process for the on-the-fly path (also when DataLoader workers read it),
the CLIP table once in memory, each batch of VAE latents. No second pass over the data.

Test sets, per subject and image: `avg` = the mean of all the image's test trials (repeat-averaged) and
`single` = its first presentation (repeat 0). The splits are named in `llava_brain.subjects` ("te" is
NSD's shared-1000 test set).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from llava_brain.errors import BadInputError, require_file
from llava_brain.geometry import resize_to_grid, union_mask_on_grid
from llava_brain.io import read_json, require_finite
from llava_brain.layout import DatasetRoot, subject_name
from llava_brain.subjects import SPLITS, SampleIndex, sample_index

log = logging.getLogger(__name__)
RESIZE_BLOCK = 64  # volumes resized per interpolate call at load time


def input_files(layout: DatasetRoot, subjects: Sequence[int], *, vae: bool) -> dict[str, Path]:
    """Every file the ViT3D data read, by name (what `io.StageRun` fingerprints)."""
    files: dict[str, Path] = {}
    for s in subjects:
        name = subject_name(s)
        for split in SPLITS:
            files[f"{name}/betas_{split}"] = layout.whole_betas(s, split)
        files[f"{name}/meta"] = layout.whole_meta(s)
        files[f"{name}/masks"] = layout.whole_masks(s)
        files[f"{name}/fmri2image"] = layout.fmri2image(s)
    files["clip_embeds"], files["clip_index"] = layout.clip_embeds, layout.clip_index
    if vae:
        files["vae_latents"], files["vae_index"] = layout.vae_latents, layout.vae_index
    return files


def subject_grid(layout: DatasetRoot, subject: int) -> tuple[int, int, int]:
    meta = read_json(layout.whole_meta(subject), "the whole-brain metadata (with 'grid') of make_subjmri.py")
    grid = meta.get("grid") if isinstance(meta, dict) else None
    if not (isinstance(grid, list) and len(grid) == 3):
        raise BadInputError(layout.whole_meta(subject), f"expected a 3-element 'grid'; found {grid!r}")
    return tuple(int(n) for n in grid)


def common_grid(layout: DatasetRoot, subjects: Sequence[int]) -> tuple[int, int, int]:
    """The paper's choice: subj01's grid; the first selected subject's when subject 1 is not selected."""
    return subject_grid(layout, 1 if 1 in subjects else subjects[0])


def area_mask(layout: DatasetRoot, subject: int, area: str) -> np.ndarray:
    path = require_file(layout.whole_masks(subject), "the whole-brain masks (masks.npz) of make_subjmri.py")
    with np.load(path) as masks:
        if area not in masks.files:
            raise BadInputError(path, f"has no mask {area!r}; it has {sorted(masks.files)}")
        return np.asarray(masks[area], dtype=bool)


def union_area_mask(layout: DatasetRoot, subjects: Sequence[int], area: str, grid: Sequence[int]) -> np.ndarray:
    """OR over the subjects of their `area` mask, each resized to `grid` (bool, *grid)."""
    return union_mask_on_grid((area_mask(layout, s, area) for s in subjects), grid)


def open_betas(layout: DatasetRoot, subject: int, split: str) -> np.ndarray:
    path = require_file(
        layout.whole_betas(subject, split), "the whole-brain betas (samples, X, Y, Z) of make_subjmri.py"
    )
    try:
        betas = np.load(path, mmap_mode="r")
    except ValueError as err:
        raise BadInputError(path, f"expected a .npy array ({err})") from None
    if betas.ndim != 4:
        raise BadInputError(path, f"expected (samples, X, Y, Z); found shape {betas.shape}")
    return betas


def resized_bytes(layout: DatasetRoot, subjects: Sequence[int], grid: Sequence[int]) -> int:
    """Memory the float16 cache of the subjects' training volumes on `grid` needs (reads only .npy headers)."""
    return sum(len(open_betas(layout, s, "tr")) for s in subjects) * math.prod(grid) * 2


def read_split(layout: DatasetRoot, subject: int, split: str, samples: int) -> SampleIndex:
    """The images and repeats of a split's samples (nsd_fmri2image.json), checked against the betas' length."""
    index = sample_index(layout, subject, split)
    if len(index) != samples:
        raise BadInputError(layout.fmri2image(subject),
                            f"lists {len(index)} {split} samples but the betas have {samples}")  # fmt: skip
    return index


def resize_blocks(betas: np.ndarray, grid: Sequence[int], rows: np.ndarray | None = None, *,
                  path: Path) -> np.ndarray:  # fmt: skip
    """Rows of a (samples, X, Y, Z) array resized to `grid` in blocks of RESIZE_BLOCK; float16 result.

    Each block is checked for NaN / inf as it is loaded (before resizing, which could skip a voxel);
    a bad one is refused naming `path` and the sample.
    """
    rows = np.arange(len(betas)) if rows is None else np.asarray(rows)
    out = np.empty((len(rows), *grid), dtype=np.float16)
    for start in range(0, len(rows), RESIZE_BLOCK):
        wanted = rows[start : start + RESIZE_BLOCK]
        sorted_rows = np.sort(wanted)
        block = torch.from_numpy(require_finite(np.asarray(betas[sorted_rows], dtype=np.float32), path, "the betas",
                                                rows=sorted_rows))  # fmt: skip
        order = np.argsort(np.argsort(wanted))  # back to the requested order
        out[start : start + len(block)] = resize_to_grid(block[torch.from_numpy(order)], grid).numpy()
    return out


class Targets:
    """CLIP embeddings (in memory) and VAE latents (memory-mapped) of the images, looked up by nsdId."""

    def __init__(self, layout: DatasetRoot, *, vae: bool):
        self.clip_path, self.vae_path = layout.clip_embeds, layout.vae_latents
        clip, self.clip_row = self._open(layout.clip_embeds, layout.clip_index, "CLIP image embeddings", 2)
        # One cheap pass over (images, D), in memory anyway.
        self.clip = require_finite(np.ascontiguousarray(clip, dtype=np.float32), self.clip_path, "the CLIP embeddings")
        self.vae, self.vae_row = (None, None)
        if vae:
            self.vae, self.vae_row = self._open(layout.vae_latents, layout.vae_index, "VAE latents", 4)

    @staticmethod
    def _open(path: Path, index_path: Path, what: str, ndim: int):
        require_file(path, f"{what} of generate_clip_embeds.py")
        index = read_json(index_path, f"the index (nsd_ids) of the {what}")
        try:
            array = np.load(path, mmap_mode="r")
        except ValueError as err:
            raise BadInputError(path, f"expected a .npy array ({err})") from None
        ids = index.get("nsd_ids") if isinstance(index, dict) else None
        if not isinstance(ids, list) or array.ndim != ndim or len(ids) != len(array):
            raise BadInputError(path, f"expected {ndim} axes and one row per nsd_id of {index_path}")
        return array, {int(i): r for r, i in enumerate(ids)}

    @property
    def clip_dim(self) -> int:
        return int(self.clip.shape[1])

    @property
    def vae_shape(self) -> list[int] | None:
        return None if self.vae is None else [int(n) for n in self.vae.shape[1:]]

    def check(self, nsd_ids, where) -> None:
        """Every nsdId must have a CLIP (and VAE) target."""
        for table, path in ((self.clip_row, self.clip_path), (self.vae_row, self.vae_path)):
            if table is None:
                continue
            missing = sorted({int(i) for i in nsd_ids} - table.keys())
            if missing:
                raise BadInputError(where, f"images without a target in {path}: nsdIds {missing[:5]} ...")

    def clip_of(self, nsd_ids) -> np.ndarray:
        return self.clip[[self.clip_row[int(i)] for i in nsd_ids]]

    def vae_of(self, nsd_id: int) -> np.ndarray:
        return np.array(self.vae[self.vae_row[int(nsd_id)]], dtype=np.float32)


def epoch_batches(n: int, *, seed: int, epoch: int, batch_size: int, world: int, rank: int) -> list[list[int]]:
    """This process's micro-batches of one epoch: a permutation seeded by (seed, epoch), cut into global
    batches of batch_size * world (last partial batch dropped), rank r taking every world-th sample."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    step = batch_size * world
    return [order[s + rank : s + step : world].tolist() for s in range(0, n - step + 1, step)]


def mixup_partners(subjects: np.ndarray, nsd_ids: np.ndarray) -> list[np.ndarray]:
    """For each sample, the indices of the *other* samples with the same subject and image (maybe empty)."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, key in enumerate(zip(subjects.tolist(), nsd_ids.tolist(), strict=True)):
        groups[key].append(i)
    partners = [np.empty(0, dtype=np.int64)] * len(nsd_ids)
    for members in groups.values():
        arr = np.asarray(members, dtype=np.int64)
        for i in members:
            partners[i] = arr[arr != i]
    return partners


class FmriTrainSet(Dataset):
    """Training trials of all selected subjects; item = dict(volume, clip, [vae], subject, nsd_id, index).

    `volume` is float32 on the common grid when cached, else on the subject's own grid (float32): the
    collate function groups by shape and `device_batch` resizes each group on the device.
    """

    def __init__(self, layout: DatasetRoot, subjects: Sequence[int], grid: Sequence[int], targets: Targets,
                 *, mixup: bool = True, seed: int = 0, cache_bytes: float = 16e9):  # fmt: skip
        self.grid, self.targets, self.mixup, self.seed, self.epoch = tuple(grid), targets, mixup, seed, 0
        self.sources, self.paths, subj, ids, rows = [], [], [], [], []
        for s in subjects:
            betas = open_betas(layout, s, "tr")
            nsd = read_split(layout, s, "tr", len(betas)).nsd_ids
            targets.check(nsd, layout.fmri2image(s))
            self.sources.append(betas), self.paths.append(layout.whole_betas(s, "tr"))
            subj.append(np.full(len(betas), s)), ids.append(nsd), rows.append(np.arange(len(betas)))
        self.subjects, self.nsd_ids, self.rows = np.concatenate(subj), np.concatenate(ids), np.concatenate(rows)
        self.source_of = np.concatenate([np.full(len(b), k) for k, b in enumerate(self.sources)])
        self.partners = mixup_partners(self.subjects, self.nsd_ids)
        need = len(self.nsd_ids) * math.prod(self.grid) * 2  # as resized_bytes: float16 on the common grid
        self.cache = None
        if need <= cache_bytes:
            log.info("resizing %d training volumes to %s in memory (%.2f GB float16)", len(self), self.grid, need / 1e9)
            blocks = [resize_blocks(b, self.grid, path=p) for b, p in zip(self.sources, self.paths, strict=True)]
            self.cache = torch.from_numpy(np.concatenate(blocks))
        else:
            log.info("training set needs %.1f GB resized; reading and resizing on the fly", need / 1e9)

    def __len__(self) -> int:
        return len(self.nsd_ids)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def mix_of(self, index: int) -> tuple[int, float]:
        """(partner, lambda) of a sample this epoch: volume = lam * own + (1 - lam) * partner's."""
        partners = self.partners[index]
        if not self.mixup or len(partners) == 0:
            return index, 1.0
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return int(partners[rng.integers(len(partners))]), float(rng.random())

    def _raw(self, index: int) -> np.ndarray:
        return np.asarray(self.sources[self.source_of[index]][self.rows[index]], dtype=np.float32)

    def _volume(self, index: int) -> torch.Tensor:
        return self.cache[index].float() if self.cache is not None else torch.from_numpy(self._raw(index))

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        partner, lam = self.mix_of(index)
        volume = self._volume(index)
        if partner != index:
            volume = lam * volume + (1.0 - lam) * self._volume(partner)
        nsd_id = int(self.nsd_ids[index])
        item = {
            "volume": volume,
            "clip": torch.from_numpy(self.targets.clip_of([nsd_id])[0]),
            "subject": int(self.subjects[index]),
            "nsd_id": nsd_id,
            "index": index,
        }
        if self.targets.vae is not None:
            item["vae"] = torch.from_numpy(self.targets.vae_of(nsd_id))
        return item

    def device_batch(self, batch: dict, device: torch.device | str) -> dict[str, torch.Tensor | None]:
        """A collated batch on `device`: volumes (batch, *grid) float32, clip, vae (or None).

        Runs in the main process, so that a non-finite value read on the fly (never cached, so never
        checked at load) or a non-finite VAE latent is refused with one line naming its file, also when
        DataLoader workers did the reading.
        """
        if self.cache is None:
            for pos, stacked in batch["volumes"].values():
                if not torch.isfinite(stacked).all():
                    bad = torch.nonzero(~torch.isfinite(stacked.reshape(len(stacked), -1)).all(dim=1))[0, 0]
                    self._refuse_non_finite(int(batch["index"][pos[bad]]))
        volumes = to_grid(batch["volumes"], self.grid, device)
        vae = batch.get("vae")
        if vae is not None:
            rows = [self.targets.vae_row[int(n)] for n in batch["nsd_id"]]
            vae = torch.from_numpy(require_finite(vae.numpy(), self.targets.vae_path, "the VAE latents", rows=rows))
            vae = vae.to(device)
        return {"volumes": volumes, "clip": batch["clip"].to(device), "vae": vae}

    def _refuse_non_finite(self, index: int) -> None:
        """Raise naming whichever of the sample and its MixUp partner holds the NaN / inf (read again only now)."""
        partner, _ = self.mix_of(index)
        for i in (index, partner):
            require_finite(self._raw(i)[None], self.paths[self.source_of[i]], "the betas", rows=[int(self.rows[i])])


def averaged_volumes(betas: np.ndarray, grid: Sequence[int], row_groups: Sequence[Sequence[int]], *,
                     path: Path) -> np.ndarray:  # fmt: skip
    """(groups, *grid) float16: each group's rows of (samples, X, Y, Z) `betas` resized to `grid` (float16,
    trilinear, per volume) and averaged in float32, as `load_test_sets` prepares its repeat-averaged volumes.

    The one preparation of an fMRI input outside training: prediction files (evaluation/encoders.py) and
    Brain-LLaVA's data and processor (data/sft_dataset.py) call it, so all see the same volume."""
    rows = np.concatenate([np.asarray(g, dtype=np.int64) for g in row_groups])
    resized = resize_blocks(betas, grid, rows, path=path)  # float16, NaN / inf refused naming `path`
    out = np.empty((len(row_groups), *grid), dtype=np.float16)
    start = 0
    for k, group in enumerate(row_groups):
        out[k] = resized[start : start + len(group)].astype(np.float32).mean(axis=0)
        start += len(group)
    return out


def collate(items: list[dict]) -> dict:
    """Stack an item list; volumes of different grids are kept as groups {shape: (positions, stacked)}."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for pos, item in enumerate(items):
        groups[tuple(item["volume"].shape)].append(pos)
    batch = {
        "volumes": {
            shape: (torch.tensor(pos), torch.stack([items[p]["volume"] for p in pos])) for shape, pos in groups.items()
        },
        "clip": torch.stack([it["clip"] for it in items]),
        "subject": torch.tensor([it["subject"] for it in items]),
        "nsd_id": torch.tensor([it["nsd_id"] for it in items]),
        "index": torch.tensor([it["index"] for it in items]),
    }
    if "vae" in items[0]:
        batch["vae"] = torch.stack([it["vae"] for it in items])
    return batch


def to_grid(volumes: dict, grid: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """The collated volume groups, moved to `device` and resized (one interpolate per group) -> (batch, *grid)."""
    size = sum(len(pos) for pos, _ in volumes.values())
    out = torch.empty((size, *grid), dtype=torch.float32, device=device)
    for pos, stacked in volumes.values():
        out[pos.to(device)] = resize_to_grid(stacked.to(device, torch.float32), grid)
    return out


@dataclass
class TestSet:
    """One subject's test volumes on the common grid: `avg` (repeat-averaged) or `single` (repeat 0)."""

    subject: int
    kind: str
    nsd_ids: np.ndarray  # (images,)
    volumes: torch.Tensor  # (images, *grid) float16
    clip: np.ndarray  # (images, D) targets


def load_test_sets(
    layout: DatasetRoot, subjects: Sequence[int], grid: Sequence[int], targets: Targets
) -> list[TestSet]:
    """Per subject: the repeat-averaged and the single-trial (first presentation) test set, images sorted."""
    sets = []
    for s in subjects:
        betas, path = open_betas(layout, s, "te"), layout.whole_betas(s, "te")
        index = read_split(layout, s, "te", len(betas))
        nsd, reps = index.nsd_ids, index.repeats
        targets.check(nsd, layout.fmri2image(s))
        images = np.unique(nsd)
        avg = np.empty((len(images), *grid), dtype=np.float16)
        for k, image in enumerate(images):
            trials = np.flatnonzero(nsd == image)
            avg[k] = resize_blocks(betas, grid, trials, path=path).astype(np.float32).mean(axis=0)
        first = []
        for image in images:
            trials = np.flatnonzero(nsd == image)
            zero = trials[reps[trials] == 0]
            first.append(int(zero[0] if len(zero) else trials[0]))
        single = resize_blocks(betas, grid, np.asarray(first), path=path)
        clip = targets.clip_of(images)
        sets.append(TestSet(s, "avg", images, torch.from_numpy(avg), clip))
        sets.append(TestSet(s, "single", images, torch.from_numpy(single), clip))
    return sets
