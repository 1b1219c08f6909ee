"""tools/evaluate/fmri2embeds.py: prediction folders of a ViT3D and of the ridge model, their reruns and refusals.

Expected predictions are computed here independently: the ViT3D on the test volumes of the training code's
own `load_test_sets`, the ridge model by numpy from the saved weights and the raw betas. Refusals (a model
of other subjects, a pixels ridge, a missing model) are one line, exit 2, and leave nothing behind.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from llava_brain.data.fmri import Targets, load_test_sets
from llava_brain.evaluation.encoders import prepared_volumes
from llava_brain.evaluation.predictions import Predictions, prediction_samples
from llava_brain.layout import DatasetRoot
from llava_brain.model.vit3d import ViT3D
from llava_brain.subjects import sample_index

from conftest import load_script
from stage_checks import error_line, hidden_leftovers, run_killed_at
from vit3d_data import TINY, linked_root, shared_strong_root

fmri2embeds = load_script("tools/evaluate/fmri2embeds.py")


@pytest.fixture(scope="module")
def strong_root(tmp_path_factory) -> Path:
    return shared_strong_root(tmp_path_factory)


@pytest.fixture(scope="module")
def vit3d(strong_root, tmp_path_factory) -> Path:
    """A ViT3D (CLIP + VAE heads) trained one epoch on subjects 1 and 2: weights are all these tests need."""
    out = tmp_path_factory.mktemp("vit3d") / "run"
    argv = ["--dataset-root", str(strong_root), "--out", str(out), *TINY, "--epochs", "1", "--batch-size", "96",
            "--warmup-steps", "2", "--num-workers", "0", "--device", "cpu", "--precision", "fp32"]  # fmt: skip
    assert load_script("pretrain_vit3d.py").main(argv) == 0
    return out


@pytest.fixture(scope="module")
def ridge(strong_root, tmp_path_factory) -> Path:
    """ridge_baseline.py's clip models of subjects 1 and 2 (under --out, returned)."""
    out = tmp_path_factory.mktemp("ridge")
    argv = ["--dataset-root", str(strong_root), "--out", str(out), "--alpha", "1e3"]
    assert load_script("tools/evaluate/ridge_baseline.py").main(argv) == 0
    return out


def _vit3d_argv(root, model, out, *more) -> list[str]:
    return ["--encoder", "vit3d", "--model", str(model), "--dataset-root", str(root), "--out", str(out),
            "--device", "cpu", "--quiet", *more]  # fmt: skip


def test_prepared_volumes_equal_the_training_runs_test_sets(strong_root):
    layout = DatasetRoot(strong_root)
    grid = (10, 13, 11)  # another grid than the subjects' own: the resize path is exercised
    (avg, single) = load_test_sets(layout, [2], grid, Targets(layout, vae=False))
    betas = np.load(layout.whole_betas(2, "te"), mmap_mode="r")
    index = sample_index(layout, 2, "te")
    for kind, expected in (("avg", avg), ("single", single)):
        samples = prediction_samples(index, kind)
        assert [s.nsd_id for s in samples] == expected.nsd_ids.tolist()
        got = prepared_volumes(betas, grid, samples, layout.whole_betas(2, "te"))
        np.testing.assert_array_equal(got, expected.volumes.numpy())


def test_vit3d_predictions_are_the_model_on_the_test_volumes(strong_root, vit3d, tmp_path, capsys):
    out = tmp_path / "pred"
    assert fmri2embeds.main(_vit3d_argv(strong_root, vit3d, out)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["subj01_avg", "subj01_single", "subj02_avg", "subj02_single"]
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"subj01 avg: 50 samples -> {out / 'subj01_avg'}"
    layout = DatasetRoot(strong_root)
    model = ViT3D.from_pretrained(vit3d / "final").eval()
    for ts in load_test_sets(layout, [1, 2], tuple(model.config.grid), Targets(layout, vae=False)):
        folder = out / f"subj{ts.subject:02d}_{ts.kind}"
        assert sorted(p.name for p in folder.iterdir()) == ["clip.npy", "index.json", "run.json", "vae.npy"]
        pred = Predictions.load(folder)
        samples = prediction_samples(sample_index(layout, ts.subject, "te"), ts.kind)
        assert pred.samples == [s.reference for s in samples] and pred.nsd_ids.tolist() == ts.nsd_ids.tolist()
        with torch.no_grad():
            expected = model(ts.volumes.float())
        np.testing.assert_allclose(pred.clip, expected.clip.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(pred.vae, expected.vae.numpy(), rtol=1e-5, atol=1e-6)
        assert pred.clip.dtype == np.float32 and pred.vae.shape == (50, 2, 4, 4)
        index = json.loads((folder / "index.json").read_text())
        assert index["encoder"]["type"] == "vit3d" and index["encoder"]["trained_subjects"] == [1, 2]
        if ts.kind == "single":
            assert all(s["repeats"] == [0] for s in index["samples"])
        run = json.loads((folder / "run.json").read_text())
        assert run["settings"]["subject"] == ts.subject and run["settings"]["precision"] == "fp32"
    assert hidden_leftovers(out) == []


def test_rerun_skips_current_folders_refuses_other_settings_and_overwrite_redoes(strong_root, vit3d, tmp_path,
                                                                                 capsys):  # fmt: skip
    out = tmp_path / "pred"
    argv = _vit3d_argv(strong_root, vit3d, out, "--subject", "1", "--kinds", "avg")
    assert fmri2embeds.main(argv) == 0
    stamp = (out / "subj01_avg" / "clip.npy").stat().st_mtime_ns
    capsys.readouterr()
    assert fmri2embeds.main(argv) == 0
    assert "(current: kept)" in capsys.readouterr().out
    assert (out / "subj01_avg" / "clip.npy").stat().st_mtime_ns == stamp
    assert fmri2embeds.main([*argv, "--precision", "bf16"]) == 2
    line = error_line(capsys)
    assert str(out / "subj01_avg" / "run.json") in line and "setting precision" in line and "--overwrite" in line
    (out / "subj01_avg" / "vae.npy").unlink()  # incomplete: redone without --overwrite
    assert fmri2embeds.main(argv) == 0
    assert (out / "subj01_avg" / "vae.npy").is_file()
    assert fmri2embeds.main([*argv, "--precision", "bf16", "--overwrite"]) == 0
    assert json.loads((out / "subj01_avg" / "run.json").read_text())["settings"]["precision"] == "bf16"
    assert sorted(p.name for p in out.iterdir()) == ["subj01_avg"]


def test_default_location_and_run_name(strong_root, vit3d, tmp_path):
    root = linked_root(strong_root, tmp_path / "root", subjects=(1,))
    argv = ["--encoder", "vit3d", "--model", str(vit3d), "--dataset-root", str(root), "--subject", "1", "--quiet",
            "--device", "cpu"]  # fmt: skip
    assert fmri2embeds.main(argv) == 0
    assert (DatasetRoot(root).predictions("vit3d", 1, "single") / "clip.npy").is_file()


def test_a_model_of_other_subjects_is_refused(strong_root, vit3d, tmp_path, capsys):
    model = tmp_path / "subj01_only"
    shutil.copytree(vit3d, model, ignore=shutil.ignore_patterns("checkpoint"))
    run = json.loads((model / "run.json").read_text())
    run["settings"]["subjects"] = [1]
    (model / "run.json").write_text(json.dumps(run))
    out = tmp_path / "pred"
    assert fmri2embeds.main(_vit3d_argv(strong_root, model, out, "--subject", "1", "2")) == 2
    line = error_line(capsys)
    assert str(model / "run.json") in line and "trained on subj01, not on subj02" in line
    assert not out.exists()


def test_a_missing_or_unfinished_model_is_refused(strong_root, vit3d, tmp_path, capsys):
    assert fmri2embeds.main(_vit3d_argv(strong_root, tmp_path / "nothing", tmp_path / "pred")) == 2
    assert str(tmp_path / "nothing" / "final" / "config.json") in error_line(capsys)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(vit3d / "final", unfinished / "final")  # no run.json: training never finished
    assert fmri2embeds.main(_vit3d_argv(strong_root, unfinished, tmp_path / "pred")) == 2
    assert str(unfinished / "run.json") in error_line(capsys)
    assert not (tmp_path / "pred").exists()


def test_ridge_predictions_are_the_saved_map_of_the_betas(strong_root, ridge, tmp_path, capsys):
    out = tmp_path / "pred"
    prefix = ridge / "ridge_nsdgeneral"
    argv = ["--encoder", "ridge", "--model", str(prefix), "--dataset-root", str(strong_root), "--out", str(out)]
    assert fmri2embeds.main(argv) == 0
    layout = DatasetRoot(strong_root)
    for subject in (1, 2):
        saved = load_file(str(ridge / f"ridge_nsdgeneral_subj{subject:02d}" / "model.safetensors"))
        betas = np.load(layout.area_betas(subject, "nsdgeneral", "te")).astype(np.float64)
        mapping = json.loads(layout.fmri2image(subject).read_text())
        ids, repeats = np.asarray(mapping["val"]), np.asarray(mapping["val_repeat"])
        images = np.unique(ids)
        averaged = np.stack([betas[ids == n].mean(axis=0) for n in images])
        first = np.stack([betas[(ids == n) & (repeats == 0)][0] for n in images])
        for kind, x in (("avg", averaged), ("single", first)):
            expected = x @ saved["weights"].astype(np.float64) * saved["y_std"] + saved["y_mean"]
            pred = Predictions.load(out / f"subj{subject:02d}_{kind}")
            assert pred.nsd_ids.tolist() == images.tolist() and pred.vae is None
            np.testing.assert_allclose(pred.clip, expected, rtol=1e-5, atol=1e-5)
            assert pred.encoder["type"] == "ridge" and pred.encoder["area"] == "nsdgeneral"
    assert "subj02 single: 50 samples" in capsys.readouterr().out.strip().splitlines()[-1]


def test_ridge_subject_folder_default_run_and_its_subject(strong_root, ridge, tmp_path, capsys):
    root = linked_root(strong_root, tmp_path / "root")
    folder = ridge / "ridge_nsdgeneral_subj02"
    argv = ["--encoder", "ridge", "--model", str(folder), "--dataset-root", str(root), "--kinds", "single"]
    assert fmri2embeds.main(argv) == 0
    predictions = DatasetRoot(root).predictions("ridge_nsdgeneral")
    assert sorted(p.name for p in predictions.iterdir()) == ["subj02_single"]
    assert fmri2embeds.main([*argv, "--subject", "1"]) == 2
    assert "trained on subj02, not on subj01" in error_line(capsys)


def test_a_pixels_ridge_is_refused(strong_root, tmp_path, capsys):
    # A ridge folder of target pixels (as ridge_baseline.py --target pixels writes it): weights of 192 dims.
    folder = tmp_path / "ridge_nsdgeneral_pixels_subj01"
    folder.mkdir()
    voxels = np.load(DatasetRoot(strong_root).area_betas(1, "nsdgeneral", "te"), mmap_mode="r").shape[1]
    save_file({"weights": np.zeros((voxels, 192), np.float32), "y_mean": np.zeros(192, np.float32),
               "y_std": np.ones(192, np.float32)}, str(folder / "model.safetensors"))  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps({"subject": 1, "area": "nsdgeneral", "target": "pixels",
                                                     "num_voxels": voxels, "target_dim": 192}))  # fmt: skip
    out = tmp_path / "pred"
    argv = ["--encoder", "ridge", "--model", str(folder), "--dataset-root", str(strong_root), "--out", str(out)]
    assert fmri2embeds.main(argv) == 2
    line = error_line(capsys)
    assert str(folder / "metrics.json") in line and "'pixels'" in line and "--target clip" in line
    assert not out.exists()


def test_a_ridge_folder_without_its_model_file_is_refused(strong_root, ridge, tmp_path, capsys):
    folder = tmp_path / "ridge_nsdgeneral_subj01"
    shutil.copytree(ridge / "ridge_nsdgeneral_subj01", folder)
    (folder / "model.safetensors").unlink()  # as ridge_baseline.py wrote it before models were saved
    argv = ["--encoder", "ridge", "--model", str(folder), "--dataset-root", str(strong_root), "--out",
            str(tmp_path / "pred")]  # fmt: skip
    assert fmri2embeds.main(argv) == 2
    line = error_line(capsys)
    assert str(folder / "model.safetensors") in line and "ridge_baseline.py" in line


def test_a_kill_while_writing_leaves_no_folder_and_a_rerun_finishes(strong_root, ridge, tmp_path):
    out = tmp_path / "pred"
    argv = ["--encoder", "ridge", "--model", str(ridge / "ridge_nsdgeneral"), "--dataset-root", str(strong_root),
            "--out", str(out), "--subject", "1"]  # fmt: skip
    # Killed right after the first folder's files were written into its staging folder, before the swap.
    killed = run_killed_at("tools/evaluate/fmri2embeds.py", argv, "llava_brain.evaluation.predictions",
                           "write_predictions", after=True)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == []
    assert fmri2embeds.main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["subj01_avg", "subj01_single"]


def test_a_root_of_another_grid_is_refused(strong_root, vit3d, tmp_path, capsys):
    root = linked_root(strong_root, tmp_path / "root")
    meta_path = DatasetRoot(root).whole_meta(1)
    meta = json.loads(meta_path.read_text())
    meta["grid"] = [n + 1 for n in meta["grid"]]
    meta_path.unlink()  # a symlink into the shared root: replace, never write through
    meta_path.write_text(json.dumps(meta))
    out = tmp_path / "pred"
    assert fmri2embeds.main(_vit3d_argv(root, vit3d, out)) == 2
    line = error_line(capsys)
    assert str(meta_path) in line and "differs from the model's" in line
    assert not out.exists()
