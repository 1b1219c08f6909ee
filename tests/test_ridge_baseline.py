"""tools/evaluate/ridge_baseline.py on a hand-made dataset root whose betas are a noisy linear map of the targets.

Besides the fit: the saved model (its normalisation and its predictions, checked with numpy), the rerun
rule (current subjects kept, changed settings refused, a folder without its model refit, a run stopped
between subjects finished by a plain rerun) and bad input (missing, truncated or non-finite arrays, an
output location that cannot be written), each one line and exit 2.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

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
    np.save(layout.clip_embeds, clip[::-1].copy())
    layout.clip_index.write_text(json.dumps({"nsd_ids": list(range(num_images))[::-1]}))
    return layout


def _argv(layout: DatasetRoot, *more: str) -> list[str]:
    return ["--dataset-root", str(layout.root), "--alpha", "100", *more]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def _cut_in_half(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_ridge_retrieves_far_above_chance(ridge, clip_root, capsys):
    assert ridge.main(["--dataset-root", str(clip_root.root), "--subject", "all", "--alpha", "1", "100", "1e4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("subj01 nsdgeneral -> clip: top-1 brain->image averaged")
    out = clip_root.run_dir("ridge")
    assert sorted(p.name for p in out.iterdir()) == ["ridge_nsdgeneral", "ridge_nsdgeneral_subj01",
                                                     "ridge_nsdgeneral_subj02"]  # fmt: skip
    results = {}
    for subject, solver in ((1, "dual"), (2, "primal")):
        folder = clip_root.ridge_run("nsdgeneral", "clip", subject)
        assert sorted(p.name for p in folder.iterdir()) == ["metrics.json", "model.safetensors", "run.json"]
        assert json.loads((folder / "run.json").read_text())["settings"]["subject"] == subject  # resolved, not "all"
        result = results[subject] = json.loads((folder / "metrics.json").read_text())
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
    summary_folder = clip_root.ridge_run("nsdgeneral")
    assert sorted(p.name for p in summary_folder.iterdir()) == ["run.json", "summary.json"]
    summary = json.loads((summary_folder / "summary.json").read_text())
    assert summary["subjects"] == [1, 2]
    top1 = [results[s]["metrics"]["avg/top1_brain_to_image"] for s in (1, 2)]
    assert summary["metrics"]["subj02/avg/top1_brain_to_image"] == top1[1]
    assert summary["metrics"]["avg/top1_brain_to_image"] == pytest.approx(np.mean(top1))


def test_rerun_keeps_current_results_and_refuses_changed_ones(ridge, clip_root, capsys):
    argv = _argv(clip_root, "--subject", "1", "--out", str(clip_root.root / "elsewhere"))
    metrics = clip_root.ridge_run("nsdgeneral", "clip", 1, clip_root.root / "elsewhere") / "metrics.json"
    assert ridge.main(argv) == 0
    before = metrics.read_bytes()
    capsys.readouterr()
    assert ridge.main(argv) == 0  # current: kept, reported again
    assert "(current: kept)" in capsys.readouterr().out and metrics.read_bytes() == before
    assert ridge.main([*argv, "--alpha", "10"]) == 2
    err = _one_line_error(capsys)
    assert "run.json" in err and "setting alphas [100.0] -> [10.0]" in err and "--overwrite" in err
    np.save(clip_root.clip_embeds, np.load(clip_root.clip_embeds) * 2)  # regenerated targets
    assert ridge.main(argv) == 2
    assert "input clip_embeds changed" in _one_line_error(capsys)
    assert ridge.main([*argv, "--alpha", "10", "--overwrite"]) == 0
    assert json.loads(metrics.read_text())["alpha"] == 10.0


def test_subject_added_later_keeps_the_finished_one(ridge, clip_root, capsys):
    assert ridge.main(_argv(clip_root, "--subject", "1")) == 0
    first = clip_root.ridge_run("nsdgeneral", "clip", 1)
    stamps = [(first / name).read_bytes() for name in ("metrics.json", "run.json")]
    assert ridge.main(_argv(clip_root, "--subject", "all")) == 0
    assert [(first / name).read_bytes() for name in ("metrics.json", "run.json")] == stamps
    assert (clip_root.ridge_run("nsdgeneral", "clip", 2) / "run.json").is_file()
    summary = json.loads((clip_root.ridge_run("nsdgeneral") / "summary.json").read_text())
    assert summary["subjects"] == [1, 2]


def test_run_stopped_between_subjects_is_finished_by_a_plain_rerun(ridge, clip_root, capsys):
    # subj02's test betas are cut short: the run stops after subj01, as a kill between subjects would.
    broken = clip_root.area_betas(2, "nsdgeneral", "te")
    intact = broken.read_bytes()
    _cut_in_half(broken)
    assert ridge.main(_argv(clip_root, "--subject", "all")) == 2
    err = _one_line_error(capsys)
    assert str(broken) in err and "truncated" in err
    out = clip_root.run_dir("ridge")
    assert sorted(p.name for p in out.iterdir()) == ["ridge_nsdgeneral_subj01"]  # no summary, no half folder
    finished = (clip_root.ridge_run("nsdgeneral", "clip", 1) / "metrics.json").read_bytes()
    broken.write_bytes(intact)
    assert ridge.main(_argv(clip_root, "--subject", "all")) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "(current: kept)" in lines[0] and "(current: kept)" not in lines[1]
    assert (clip_root.ridge_run("nsdgeneral", "clip", 1) / "metrics.json").read_bytes() == finished
    assert sorted(p.name for p in out.iterdir()) == ["ridge_nsdgeneral", "ridge_nsdgeneral_subj01",
                                                     "ridge_nsdgeneral_subj02"]  # fmt: skip


@pytest.mark.parametrize("where", ["betas", "clip"])
def test_non_finite_input_is_refused_and_keeps_the_earlier_result(ridge, clip_root, where, capsys):
    argv = _argv(clip_root, "--subject", "1")
    assert ridge.main(argv) == 0
    metrics = clip_root.ridge_run("nsdgeneral", "clip", 1) / "metrics.json"
    before = metrics.read_bytes()
    path = clip_root.area_betas(1, "nsdgeneral", "tr") if where == "betas" else clip_root.clip_embeds
    array = np.load(path)
    array[3, 1] = np.nan if where == "betas" else np.inf
    np.save(path, array)
    capsys.readouterr()
    assert ridge.main([*argv, "--overwrite"]) == 2
    err = _one_line_error(capsys)
    assert str(path) in err and "non-finite" in err
    assert metrics.read_bytes() == before


@pytest.mark.parametrize("which", ["betas", "clip"])
def test_truncated_npy_exits_2_naming_it(ridge, clip_root, which, capsys):
    path = clip_root.area_betas(1, "nsdgeneral", "tr") if which == "betas" else clip_root.clip_embeds
    _cut_in_half(path)  # betas are read whole, the embeddings memory-mapped: both ways fail cleanly
    assert ridge.main(_argv(clip_root, "--subject", "1")) == 2
    err = _one_line_error(capsys)
    assert str(path) in err and "truncated" in err


def test_unwritable_output_exits_2_before_any_work(ridge, clip_root, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert ridge.main(_argv(clip_root, "--subject", "1", "--out", str(blocker / "ridge"))) == 2
    err = _one_line_error(capsys)
    assert str(blocker / "ridge") in err and "cannot be written" in err


def test_missing_area_or_subject_exits_2_naming_it(ridge, clip_root, capsys):
    missing = clip_root.area_betas(2, "nsdgeneral", "tr")
    missing.unlink()
    assert ridge.main(_argv(clip_root, "--subject", "all")) == 2  # 'all' = prepared subjects, each needs the area
    assert str(missing) in _one_line_error(capsys)
    assert not clip_root.runs_dir.exists()  # checked before subj01 was fitted
    assert ridge.main(_argv(clip_root, "--subject", "3")) == 2
    err = _one_line_error(capsys)
    assert str(clip_root.fmris_dir) in err and "subj03" in err


def test_missing_file_exits_2_naming_it(ridge, clip_root, capsys):
    missing = clip_root.area_betas(2, "nsdgeneral", "te")
    missing.unlink()
    assert ridge.main(["--dataset-root", str(clip_root.root), "--subject", "2"]) == 2
    assert str(missing) in _one_line_error(capsys)
    clip_root.clip_index.unlink()
    assert ridge.main(["--dataset-root", str(clip_root.root), "--subject", "1"]) == 2
    assert str(clip_root.clip_index) in _one_line_error(capsys)


def test_pixel_target_reads_thumbnails(ridge, tmp_path, capsys):
    num_images = NUM_TEST_IMAGES + NUM_TRAIN_IMAGES
    images = np.random.default_rng(2).integers(0, 256, size=(num_images, 8, 8, 3), dtype=np.uint8)
    pixels = images.astype(np.float64).reshape(num_images, -1, 3) / 255.0
    layout = _write_root(tmp_path / "root", (pixels - pixels.mean(1, keepdims=True)).reshape(num_images, -1))
    layout.images_dir.mkdir(parents=True)
    for nsd_id, image in enumerate(images):  # 16 px PNGs: the 8x8 box average recovers `images` exactly
        Image.fromarray(image.repeat(2, 0).repeat(2, 1)).save(layout.image(nsd_id))
    argv = ["--dataset-root", str(layout.root), "--subject", "1", "--target", "pixels"]
    assert ridge.main(argv) == 0
    result = json.loads((layout.ridge_run("nsdgeneral", "pixels", 1) / "metrics.json").read_text())
    assert result["target_dim"] == 192 and result["metrics"]["avg/top1_brain_to_image"] >= 0.8
    assert (layout.ridge_run("nsdgeneral", "pixels") / "summary.json").is_file()
    stat = layout.image(5).stat()  # a rewritten stimulus (same size, new mtime) is a changed input
    os.utime(layout.image(5), ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    capsys.readouterr()
    assert ridge.main(argv) == 2
    assert "input stimulus_pngs changed" in _one_line_error(capsys)


def test_saved_model_predicts_what_was_scored(ridge, clip_root):
    assert ridge.main(_argv(clip_root, "--subject", "1")) == 0
    folder = clip_root.ridge_run("nsdgeneral", "clip", 1)
    saved = load_file(str(folder / "model.safetensors"))
    result = json.loads((folder / "metrics.json").read_text())
    assert saved["weights"].shape == (VOXELS[1], DIM) and saved["weights"].dtype == np.float32
    assert (folder / "model.safetensors").stat().st_mode == (folder / "metrics.json").stat().st_mode  # not 0600
    assert (result["area"], result["target"], result["num_voxels"], result["model_file"]) == (
        "nsdgeneral", "clip", VOXELS[1], "model.safetensors")  # fmt: skip
    # The normalisation is the training targets' own: mean and std of the train samples' CLIP rows.
    mapping = json.loads(clip_root.fmri2image(1).read_text())
    clip = np.load(clip_root.clip_embeds)[::-1]  # stored in reverse nsdId order
    train_targets = clip[mapping["train"]].astype(np.float64)
    np.testing.assert_allclose(saved["y_mean"], train_targets.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(saved["y_std"], train_targets.std(0), rtol=1e-6)
    # Top-1 of the saved model's averaged-test predictions, by hand, equals the reported one.
    betas = np.load(clip_root.area_betas(1, "nsdgeneral", "te")).astype(np.float64)
    val = np.asarray(mapping["val"])
    images = np.unique(val)
    x = np.stack([betas[val == n].mean(0) for n in images])
    pred = (x @ saved["weights"].astype(np.float64) * saved["y_std"] + saved["y_mean"]).astype(np.float32)
    target = clip[images].astype(np.float64)
    p = pred / np.linalg.norm(pred, axis=1, keepdims=True)
    t = target / np.linalg.norm(target, axis=1, keepdims=True)
    hits = np.argmax(p @ t.T, axis=1) == np.arange(len(images))
    assert result["metrics"]["avg/top1_brain_to_image"] == hits.mean()


def test_folder_without_a_model_file_is_refit(ridge, clip_root, capsys):
    argv = _argv(clip_root, "--subject", "1")
    assert ridge.main(argv) == 0
    folder = clip_root.ridge_run("nsdgeneral", "clip", 1)
    (folder / "model.safetensors").unlink()  # as written before the model was saved: not a complete result
    capsys.readouterr()
    assert ridge.main(argv) == 0
    assert "(current: kept)" not in capsys.readouterr().out
    assert (folder / "model.safetensors").is_file()
    assert ridge.main(argv) == 0
    assert "(current: kept)" in capsys.readouterr().out
