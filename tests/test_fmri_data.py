"""llava_brain.data.fmri: MixUp partners, the data order, and the on-the-fly path (what full NSD takes, its arrays
exceeding --cache-gb) giving the same batches as the in-memory cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from llava_brain.data.fmri import (
    FmriTrainSet,
    Targets,
    collate,
    common_grid,
    epoch_batches,
    input_files,
    mixup_partners,
    resized_bytes,
)
from llava_brain.layout import DatasetRoot

from vit3d_data import shared_strong_root


@pytest.fixture(scope="module")
def strong_root(tmp_path_factory) -> Path:
    return shared_strong_root(tmp_path_factory)


def test_mixup_pairs_only_repeats_of_the_same_image_and_subject():
    subjects = np.array([1, 1, 1, 1, 2, 2, 2, 1])
    images = np.array([5, 6, 5, 5, 5, 5, 7, 6])
    partners = mixup_partners(subjects, images)
    assert [sorted(p.tolist()) for p in partners] == [[2, 3], [7], [0, 3], [0, 2], [5], [4], [], [1]]


def test_epoch_batches_split_one_permutation_between_processes():
    one = epoch_batches(100, seed=3, epoch=2, batch_size=8, world=1, rank=0)
    two = [epoch_batches(100, seed=3, epoch=2, batch_size=4, world=2, rank=r) for r in (0, 1)]
    assert len(one) == 12 and all(len(b) == 8 for b in one)  # 100 // 8 full batches, the rest dropped
    for k, batch in enumerate(one):
        assert sorted(batch) == sorted(two[0][k] + two[1][k])  # the same global batch, shared out
    assert one != epoch_batches(100, seed=3, epoch=3, batch_size=8, world=1, rank=0)


def test_mixup_in_the_dataset(strong_root):
    layout = DatasetRoot(strong_root)
    targets = Targets(layout, vae=False)
    data = FmriTrainSet(layout, [1, 2], (27, 34, 27), targets, seed=3)
    data.set_epoch(1)
    seen_mixed = 0
    for i in range(0, len(data), 37):
        partner, lam = data.mix_of(i)
        assert data.subjects[partner] == data.subjects[i] and data.nsd_ids[partner] == data.nsd_ids[i]
        assert 0.0 <= lam <= 1.0
        if partner != i:
            seen_mixed += 1
            item = data[i]
            expected = lam * data.cache[i].float() + (1 - lam) * data.cache[partner].float()
            np.testing.assert_allclose(item["volume"].numpy(), expected.numpy(), rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(item["clip"].numpy(), targets.clip_of([data.nsd_ids[i]])[0])
        assert data.mix_of(i) == (partner, lam)  # deterministic per (seed, epoch, index)
    assert seen_mixed > 0


# The common grid (subj01's, which subj02 shares here) needs no resizing; the other grid resizes every volume.
@pytest.mark.parametrize("grid", [None, (23, 29, 24)], ids=["common-grid", "resized"])
def test_on_the_fly_path_yields_the_cached_batches(strong_root, grid):
    layout = DatasetRoot(strong_root)
    subjects = [1, 2]
    grid = grid or common_grid(layout, subjects)
    targets = Targets(layout, vae=True)
    need = resized_bytes(layout, subjects, grid)
    cached = FmriTrainSet(layout, subjects, grid, targets, seed=5, cache_bytes=need)
    on_the_fly = FmriTrainSet(layout, subjects, grid, targets, seed=5, cache_bytes=need - 1)
    assert cached.cache is not None and on_the_fly.cache is None
    resized = tuple(np.load(layout.whole_betas(1, "tr"), mmap_mode="r").shape[1:]) != tuple(grid)
    mixed = 0
    for epoch in (0, 1):
        cached.set_epoch(epoch), on_the_fly.set_epoch(epoch)
        for rows in epoch_batches(len(cached), seed=5, epoch=epoch, batch_size=64, world=1, rank=0)[:4]:
            a = collate([cached[i] for i in rows])
            b = collate([on_the_fly[i] for i in rows])
            for key in ("subject", "nsd_id", "index", "clip", "vae"):
                torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
            mixed += sum(cached.mix_of(i)[0] != i for i in rows)
            va, vb = cached.device_batch(a, "cpu")["volumes"], on_the_fly.device_batch(b, "cpu")["volumes"]
            assert va.shape == vb.shape == (64, *grid) and va.dtype == vb.dtype == torch.float32
            if not resized:  # both read the same float16 values and mix them alike: identical
                torch.testing.assert_close(va, vb, rtol=0, atol=0)
            else:  # the cache holds the resized volume rounded to float16 (and resizes before the linear MixUp)
                torch.testing.assert_close(va, vb, rtol=2e-3, atol=2e-3)
    assert mixed > 0


def test_input_files_name_every_file_read(strong_root):
    layout = DatasetRoot(strong_root)
    files = input_files(layout, [1, 2], vae=False)
    assert files["subj02/betas_te"] == layout.whole_betas(2, "te") and files["clip_index"] == layout.clip_index
    assert "vae_latents" not in files and all(path.is_file() for path in files.values())
    assert {"vae_latents", "vae_index"} <= set(input_files(layout, [1], vae=True))
