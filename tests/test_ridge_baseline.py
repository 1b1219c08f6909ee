"""tools/evaluate/ridge_baseline.py on a hand-made dataset root whose betas are a noisy linear map of the targets."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from llava_brain.layout import DatasetRoot

from conftest import load_script

NUM_TRAIN_IMAGES, NUM_TEST_IMAGES, DIM = 100, 30, 16
VOXELS = {1: 300, 2: 40}  # subj01: voxels > samples (dual solve); subj02: primal


@pytest.fixture(scope="module")
def ridge():
    return load_script("tools/evaluate/ridge_baseline.py")


def _samples(rng, ids: np.ndarray, repeats: int) -> tuple[np.ndarray, np.ndarray]:
    """Every image shown `repeats` times in a shuffled order; repeat k = the k-th showing of that image."""
    order = rng.permutation(np.repeat(ids, repeats))
    seen: dict[int, int] = {}
    rep = []
    for n in order:
        rep.append(seen.get(int(n), 0))
        seen[int(n)] = rep[-1] + 1
    return order, np.asarray(rep)


def _write_root(root, targets: np.ndarray, seed: int = 0) -> DatasetRoot:
    """Two subjects with X = Y @ W + noise; Y = `targets` z-scored (row i <-> nsdId i)."""
    rng = np.random.default_rng(seed)
    layout = DatasetRoot(root)
    y = (targets - targets.mean(0)) / targets.std(0)
    test_ids = np.arange(NUM_TEST_IMAGES)  # the shared images
    for subject, voxels in VOXELS.items():
        train_ids = np.arange(NUM_TEST_IMAGES, NUM_TEST_IMAGES + NUM_TRAIN_IMAGES)
        train, train_rep = _samples(rng, train_ids, 2)
        val, val_rep = _samples(rng, test_ids, 3)
        weights = rng.normal(size=(y.shape[1], voxels)) / np.sqrt(y.shape[1])
        area = layout.area_betas(subject, "nsdgeneral", "tr").parent
        area.mkdir(parents=True)
        for split, ids in (("tr", train), ("te", val)):
            betas = y[ids] @ weights + rng.normal(scale=1.0, size=(len(ids), voxels))
            np.save(layout.area_betas(subject, "nsdgeneral", split), betas.astype(np.float32))
        mapping = {"train": train.tolist(), "train_repeat": train_rep.tolist(), "val": val.tolist(),
                   "val_repeat": val_rep.tolist()}  # fmt: skip
        layout.fmri2image(subject).write_text(json.dumps(mapping))
    return layout


@pytest.fixture()
def clip_root(tmp_path) -> DatasetRoot:
    num_images = NUM_TEST_IMAGES + NUM_TRAIN_IMAGES
    clip = np.random.default_rng(1).normal(size=(num_images, DIM)).astype(np.float32)
    layout = _write_root(tmp_path / "root", clip)
    layout.vision_embeds_dir.mkdir(parents=True)
    # Rows stored in reverse nsdId order, so the index must be honoured.
    np.save(layout.vision_embeds_dir / "clip_image_embeds.npy", clip[::-1].copy())
    (layout.vision_embeds_dir / "index.json").write_text(json.dumps({"nsd_ids": list(range(num_images))[::-1]}))
    return layout


def test_ridge_retrieves_far_above_chance(ridge, clip_root, capsys):
    assert ridge.main(["--dataset-root", str(clip_root.root), "--subject", "all", "--alpha", "1", "100", "1e4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("subj01 nsdgeneral -> clip: top-1 brain->image averaged")
    out = clip_root.root / "runs" / "ridge"
    assert sorted(p.name for p in out.iterdir()) == ["ridge_nsdgeneral_subj01", "ridge_nsdgeneral_subj02"]
    for subject, solver in ((1, "dual"), (2, "primal")):
        folder = out / f"ridge_nsdgeneral_subj{subject:02d}"
        assert sorted(p.name for p in folder.iterdir()) == ["metrics.json", "run.json"]
        result = json.loads((folder / "metrics.json").read_text())
        assert result["solver"] == solver and result["num_voxels"] == VOXELS[subject]
        assert result["alpha"] in (1.0, 100.0, 1e4) and set(result["holdout_mse"]) == {"1.0", "100.0", "10000.0"}
        assert result["num_train_samples"] == 2 * NUM_TRAIN_IMAGES and result["num_holdout_samples"] == 20
        assert result["num_test_images"] == NUM_TEST_IMAGES and result["num_test_single"] == NUM_TEST_IMAGES
        assert result["target_dim"] == DIM
        metrics = result["metrics"]
        for kind in ("avg", "single"):
            for key in ("top1_brain_to_image", "top1_image_to_brain", "mindeye300_brain_to_image",
                        "mindeye300_image_to_brain", "mse", "cosine", "chance"):  # fmt: skip
                assert isinstance(metrics[f"{kind}/{key}"], float)
            assert metrics[f"{kind}/chance"] == pytest.approx(1 / NUM_TEST_IMAGES)
        assert metrics["avg/top1_brain_to_image"] >= 0.8
        assert metrics["single/top1_brain_to_image"] >= 0.4
        assert metrics["avg/cosine"] > metrics["single/cosine"] > 0.5


def test_refuses_to_overwrite(ridge, clip_root, capsys):
    out = clip_root.root / "elsewhere"
    argv = ["--dataset-root", str(clip_root.root), "--subject", "1", "--alpha", "100", "--out", str(out)]
    assert ridge.main(argv) == 0
    assert ridge.main(argv) == 2
    assert "metrics.json: already exists" in capsys.readouterr().err
    assert ridge.main([*argv, "--overwrite"]) == 0


def test_missing_file_exits_2_naming_it(ridge, clip_root, capsys):
    missing = clip_root.area_betas(2, "nsdgeneral", "te")
    missing.unlink()
    assert ridge.main(["--dataset-root", str(clip_root.root), "--subject", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err
    (clip_root.vision_embeds_dir / "index.json").unlink()
    assert ridge.main(["--dataset-root", str(clip_root.root), "--subject", "1"]) == 2
    assert "index.json" in capsys.readouterr().err


def test_pixel_target_reads_thumbnails(ridge, tmp_path, capsys):
    num_images = NUM_TEST_IMAGES + NUM_TRAIN_IMAGES
    images = np.random.default_rng(2).integers(0, 256, size=(num_images, 8, 8, 3), dtype=np.uint8)
    pixels = images.astype(np.float64).reshape(num_images, -1, 3) / 255.0
    layout = _write_root(tmp_path / "root", (pixels - pixels.mean(1, keepdims=True)).reshape(num_images, -1))
    layout.images_dir.mkdir(parents=True)
    for nsd_id, image in enumerate(images):  # 16 px PNGs: the 8x8 box average recovers `images` exactly
        Image.fromarray(image.repeat(2, 0).repeat(2, 1)).save(layout.image(nsd_id))
    assert ridge.main(["--dataset-root", str(layout.root), "--subject", "1", "--target", "pixels"]) == 0
    result = json.loads((layout.root / "runs/ridge/ridge_nsdgeneral_pixels_subj01/metrics.json").read_text())
    assert result["target_dim"] == 192 and result["metrics"]["avg/top1_brain_to_image"] >= 0.8
