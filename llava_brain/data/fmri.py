"""Whole-brain fMRI volumes of several subjects, on one common grid, with their CLIP / VAE targets (ViT3D).

Reads the prepared arrays of the dataset root (`whole/nsd_betas_{tr,te}.npy`, memory-mapped), one subject
after another, and mixes all selected subjects in one dataset (each sample carries its subject). Every
volume is resized once, in blocks, to the common grid (subj01's grid when subject 1 is selected, else the
first selected subject's); when the resized training set fits in `cache_bytes` it is kept in memory as
float16 (mini-NSD: a few hundred MB), else samples are read from the memory maps and resized on the fly,
a batch at a time on the training device (`to_grid`).

Training samples are MixUp-ed between repeats of the same image of the same subject (lambda ~ U(0, 1));
the targets are unchanged since the image is the same. The partner and lambda of sample i in epoch e come
from a generator seeded with (seed, epoch, i), so the data are a pure function of (seed, epoch, order)
whatever the number of workers or processes, and a resumed run sees exactly the same batches.

Test sets, per subject and image: `avg` = the mean of all the image's test trials (repeat-averaged) and
`single` = its first presentation (repeat 0).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from llava_brain.errors import BadInputError, require_file
from llava_brain.io import read_json
from llava_brain.layout import DatasetRoot
from llava_brain.model.vit3d import resize_to_grid, union_mask_on_grid

log = logging.getLogger(__name__)
CLIP_FILE, VAE_FILE, INDEX_FILE = "clip_image_embeds.npy", "vae_latents.npy", "index.json"
RESIZE_BLOCK = 64  # volumes resized per interpolate call at load time
SPLIT_KEYS = {"tr": ("train", "train_repeat"), "te": ("val", "val_repeat")}


def available_subjects(layout: DatasetRoot) -> list[int]:
    """Subjects with a prepared `whole/` folder under `<root>/nsd/fmris/`, ascending."""
    folder = layout.nsd / "fmris"
    names = [p.name for p in folder.glob("subj[0-9][0-9]")] if folder.is_dir() else []
    return sorted(int(n[4:]) for n in names if (folder / n / "whole").is_dir())


def resolve_subjects(layout: DatasetRoot, requested: Sequence[str | int]) -> list[int]:
    """'all' -> every prepared subject; else the numbers given (order kept, duplicates dropped)."""
    if [str(r).lower() for r in requested] == ["all"]:
        found = available_subjects(layout)
        if not found:
            raise BadInputError(layout.nsd / "fmris", "no prepared subject (subjXX/whole/) under this dataset root")
        return found
    try:
        subjects = list(dict.fromkeys(int(r) for r in requested))
    except ValueError:
        raise BadInputError(layout.root, f"--subject takes subject numbers or 'all'; got {list(requested)}") from None
    return subjects


def subject_grid(layout: DatasetRoot, subject: int) -> tuple[int, int, int]:
    meta = read_json(layout.whole_meta(subject), "the whole-brain metadata (with 'grid') of make_subjmri.py")
    grid = meta.get("grid") if isinstance(meta, dict) else None
    if not (isinstance(grid, list) and len(grid) == 3):
        raise BadInputError(layout.whole_meta(subject), f"expected a 3-element 'grid'; found {grid!r}")
    return tuple(int(n) for n in grid)


def common_grid(layout: DatasetRoot, subjects: Sequence[int]) -> tuple[int, int, int]:
    """The paper's choice: subj01's grid; the first selected subject's when subject 1 is not selected."""
    return subject_grid(layout, 1 if 1 in subjects else subjects[0])


def region_mask(layout: DatasetRoot, subject: int, region: str) -> np.ndarray:
    path = require_file(layout.whole_masks(subject), "the whole-brain masks (masks.npz) of make_subjmri.py")
    with np.load(path) as masks:
        if region not in masks.files:
            raise BadInputError(path, f"has no mask {region!r}; it has {sorted(masks.files)}")
        return np.asarray(masks[region], dtype=bool)


def union_region_mask(layout: DatasetRoot, subjects: Sequence[int], region: str, grid: Sequence[int]) -> np.ndarray:
    """OR over the subjects of their `region` mask, each resized to `grid` (bool, *grid)."""
    return union_mask_on_grid((region_mask(layout, s, region) for s in subjects), grid)


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


def read_split(layout: DatasetRoot, subject: int, split: str, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """nsdIds and repeat numbers of a split's samples (from nsd_fmri2image.json)."""
    path = layout.fmri2image(subject)
    info = read_json(path, "the image of every sample (nsd_fmri2image.json) of make_subjmri.py")
    ids_key, rep_key = SPLIT_KEYS[split]
    try:
        ids, reps = np.asarray(info[ids_key], dtype=np.int64), np.asarray(info[rep_key], dtype=np.int64)
    except (KeyError, TypeError, ValueError):
        raise BadInputError(path, f"expected integer lists {ids_key!r} and {rep_key!r}") from None
    if len(ids) != samples or len(reps) != samples:
        raise BadInputError(path, f"{ids_key!r} has {len(ids)} entries but the betas have {samples} samples")
    return ids, reps


def resize_blocks(betas: np.ndarray, grid: Sequence[int], rows: np.ndarray | None = None) -> np.ndarray:
    """Rows of a (samples, X, Y, Z) array resized to `grid` in blocks of RESIZE_BLOCK; float16 result."""
    rows = np.arange(len(betas)) if rows is None else np.asarray(rows)
    out = np.empty((len(rows), *grid), dtype=np.float16)
    for start in range(0, len(rows), RESIZE_BLOCK):
        block = torch.from_numpy(np.asarray(betas[np.sort(rows[start : start + RESIZE_BLOCK])], dtype=np.float32))
        order = np.argsort(np.argsort(rows[start : start + RESIZE_BLOCK]))  # back to the requested order
        out[start : start + len(block)] = resize_to_grid(block[torch.from_numpy(order)], grid).numpy()
    return out


class Targets:
    """CLIP embeddings (in memory) and VAE latents (memory-mapped) of the images, looked up by nsdId."""

    def __init__(self, layout: DatasetRoot, *, vae: bool):
        self.clip, self.clip_row = self._open(layout.vision_embeds_dir, CLIP_FILE, "CLIP image embeddings", 2)
        self.clip = np.ascontiguousarray(self.clip, dtype=np.float32)
        self.vae, self.vae_row = (None, None)
        if vae:
            self.vae, self.vae_row = self._open(layout.vae_embeds_dir, VAE_FILE, "VAE latents", 4)

    @staticmethod
    def _open(folder, name, what, ndim):
        path = require_file(folder / name, f"{what} of generate_clip_embeds.py")
        index_path = folder / INDEX_FILE
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
        for table, folder in ((self.clip_row, "vision_embeds"), (self.vae_row, "vae_embeds")):
            if table is None:
                continue
            missing = sorted({int(i) for i in nsd_ids} - table.keys())
            if missing:
                raise BadInputError(where, f"images without a target in {folder}/: nsdIds {missing[:5]} ...")

    def clip_of(self, nsd_ids) -> np.ndarray:
        return self.clip[[self.clip_row[int(i)] for i in nsd_ids]]

    def vae_of(self, nsd_id: int) -> np.ndarray:
        return np.array(self.vae[self.vae_row[int(nsd_id)]], dtype=np.float32)


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
    collate function groups by shape and `to_grid` resizes each group on the device.
    """

    def __init__(self, layout: DatasetRoot, subjects: Sequence[int], grid: Sequence[int], targets: Targets,
                 *, mixup: bool = True, seed: int = 0, cache_bytes: float = 16e9):  # fmt: skip
        self.grid, self.targets, self.mixup, self.seed, self.epoch = tuple(grid), targets, mixup, seed, 0
        self.sources, subj, ids, rows = [], [], [], []
        for s in subjects:
            betas = open_betas(layout, s, "tr")
            nsd, _ = read_split(layout, s, "tr", len(betas))
            targets.check(nsd, layout.fmri2image(s))
            self.sources.append(betas)
            subj.append(np.full(len(betas), s)), ids.append(nsd), rows.append(np.arange(len(betas)))
        self.subjects, self.nsd_ids, self.rows = np.concatenate(subj), np.concatenate(ids), np.concatenate(rows)
        self.source_of = np.concatenate([np.full(len(b), k) for k, b in enumerate(self.sources)])
        self.partners = mixup_partners(self.subjects, self.nsd_ids)
        need = len(self.nsd_ids) * math.prod(self.grid) * 2
        self.cache = None
        if need <= cache_bytes:
            log.info("resizing %d training volumes to %s in memory (%.2f GB float16)", len(self), self.grid, need / 1e9)
            self.cache = torch.from_numpy(np.concatenate([resize_blocks(b, self.grid) for b in self.sources]))
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

    def _volume(self, index: int) -> torch.Tensor:
        if self.cache is not None:
            return self.cache[index].float()
        source = self.sources[self.source_of[index]]
        return torch.from_numpy(np.asarray(source[self.rows[index]], dtype=np.float32))

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
        betas = open_betas(layout, s, "te")
        nsd, reps = read_split(layout, s, "te", len(betas))
        targets.check(nsd, layout.fmri2image(s))
        images = np.unique(nsd)
        avg = np.empty((len(images), *grid), dtype=np.float16)
        for k, image in enumerate(images):
            trials = np.flatnonzero(nsd == image)
            avg[k] = resize_blocks(betas, grid, trials).astype(np.float32).mean(axis=0)
        first = []
        for image in images:
            trials = np.flatnonzero(nsd == image)
            zero = trials[reps[trials] == 0]
            first.append(int(zero[0] if len(zero) else trials[0]))
        single = resize_blocks(betas, grid, np.asarray(first))
        clip = targets.clip_of(images)
        sets.append(TestSet(s, "avg", images, torch.from_numpy(avg), clip))
        sets.append(TestSet(s, "single", images, torch.from_numpy(single), clip))
    return sets
