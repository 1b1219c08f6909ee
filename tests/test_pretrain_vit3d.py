"""pretrain_vit3d.py and llava_brain.data.fmri: learning, resume after a kill, 2 processes, bad input, MixUp.

The tests build their own prepared root (a 2-subject mini-NSD with a strong signal, prepared by make_subjmri)
and use CLIP targets built from 4x4 thumbnails of the images (a tiny random CLIP carries too little image
information to test retrieval).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file

from llava_brain.data.fmri import FmriTrainSet, Targets, mixup_partners
from llava_brain.layout import DatasetRoot, NsdTree
from llava_brain.simulate import MiniNsdConfig, write_mini_nsd

from conftest import REPO, load_script

pretrain = load_script("pretrain_vit3d.py")
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-heads", "4", "--head-hidden", "64", "--patch-size", "6"]


def write_targets(root: Path, ids: list[int], clip: np.ndarray) -> None:
    """vision_embeds/ (standardised `clip`) and vae_embeds/ (random (2, 4, 4) latents) for the nsdIds `ids`."""
    clip = (clip - clip.mean(0)) / (clip.std(0) + 1e-6)
    layout = DatasetRoot(root)
    for folder, name, array in (
        (layout.vision_embeds_dir, "clip_image_embeds.npy", clip.astype(np.float32)),
        (layout.vae_embeds_dir, "vae_latents.npy", np.random.default_rng(0).normal(size=(len(ids), 2, 4, 4))),
    ):
        folder.mkdir(parents=True)
        np.save(folder / name, array.astype(np.float32))
        (folder / "index.json").write_text(json.dumps({"nsd_ids": ids}))


def run_script(*args: str, env_extra: dict | None = None, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def strong_root(tmp_path_factory) -> Path:
    """A 2-subject mini-NSD with a strong signal (SNR 3-4), prepared by make_subjmri, with 4x4-thumbnail targets
    read from the stimuli file (nsdId = row of nsd_stimuli.hdf5)."""
    base = tmp_path_factory.mktemp("strong")
    config = MiniNsdConfig(subjects=(1, 2), num_shared=50, images_per_subject=300, trials_per_session=100,
                           grid_scale=0.25, snr_range=(3.0, 4.0), nifti_subjects=())  # fmt: skip
    write_mini_nsd(base / "nsd", config, progress=False)
    tree = NsdTree(base / "nsd")
    root = base / "root"
    code = load_script("prepare_datasets/make_subjmri.py").main(
        ["--nsd-root", str(tree.root), "--dataset-root", str(root), "--quiet", "--areas", "nsdgeneral"]
    )
    assert code == 0
    with h5py.File(tree.stimuli, "r") as f:
        images = torch.from_numpy(f["imgBrick"][:]).permute(0, 3, 1, 2).float() / 255
    pixels = F.adaptive_avg_pool2d(images, 4).permute(0, 2, 3, 1).reshape(len(images), 16, 3).numpy()
    write_targets(root, list(range(len(images))), (pixels - pixels.mean(1, keepdims=True)).reshape(len(images), -1))
    return root


@pytest.fixture(scope="module")
def root(strong_root) -> Path:
    """The prepared root the resume, signal, 2-process and MixUp tests read (never write)."""
    return strong_root


def test_training_beats_chance_and_is_reported_beside_ridge(strong_root, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--dataset-root", str(strong_root), "--out", str(out), "--num-layers", "2", "--hidden-size", "64",
            "--num-heads", "4", "--head-hidden", "128", "--patch-size", "4", "--epochs", "10", "--lr", "3e-3",
            "--weight-decay", "0", "--warmup-steps", "20", "--batch-size", "32", "--num-workers", "0",
            "--device", "cpu"]  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float arithmetic on every machine: the run is reproducible
    try:
        assert pretrain.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["epoch"] for m in metrics] == list(range(1, 11))
    last = metrics[-1]
    assert last["avg/chance"] == pytest.approx(1 / 50)
    assert last["avg/top1_brain_to_image"] >= 5 * last["avg/chance"], last
    assert last["single/top1_brain_to_image"] >= 3 * last["single/chance"], last
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["active_patches"] and len(config["active_patches"]) < 6 * 7 * 5
    assert config["position_init_std"] == 1.0
    assert (out / "run.json").is_file() and (out / "final" / "model.safetensors").is_file()

    ridge = load_script("tools/evaluate/ridge_baseline.py")
    assert ridge.main(["--dataset-root", str(strong_root), "--out", str(tmp_path / "ridge")]) == 0
    table = load_script("tools/evaluate/retrieval_table.py")
    capsys.readouterr()
    assert table.main(["--run", f"ridge={tmp_path / 'ridge' / 'ridge_nsdgeneral'}", "--run", f"vit3d={out}",
                       "--json", str(tmp_path / "table.json")]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "| subject | chance | ridge avg | ridge single | vit3d avg | vit3d single |"
    subj01 = next(line for line in lines if line.startswith("| subj01 |")).split(" | ")
    assert float(subj01[4]) == pytest.approx(last["subj01/avg/top1_brain_to_image"], abs=5e-4)
    assert float(subj01[1]) == pytest.approx(1 / 50, abs=5e-4)
    assert lines[-1].startswith("| mean |")
    saved = json.loads((tmp_path / "table.json").read_text())
    assert set(saved) == {"ridge", "vit3d"} and set(saved["vit3d"]) == {"subj01", "subj02"}


@pytest.mark.parametrize("batch_size, grad_accum", [(96, 1), (48, 2)])
def test_resume_after_kill_gives_the_same_weights(root, tmp_path, batch_size, grad_accum):
    # 96 samples per optimizer step either way; with accumulation a checkpoint lands between full steps only.
    common = ["pretrain_vit3d.py", "--dataset-root", str(root), *TINY, "--subject", "1", "--no-vae", "--epochs", "2",
              "--batch-size", str(batch_size), "--grad-accum", str(grad_accum), "--warmup-steps", "3",
              "--save-every", "4", "--num-workers", "0", "--device", "cpu"]  # fmt: skip
    straight = run_script(*common, "--out", str(tmp_path / "a"))
    assert straight.wait(timeout=120) == 0, straight.stdout.read()

    killed = run_script(*common, "--out", str(tmp_path / "b"), "--step-delay", "0.3")
    state = tmp_path / "b" / "checkpoint" / "trainer_state.json"
    deadline = time.time() + 120
    while not state.is_file() and time.time() < deadline and killed.poll() is None:
        time.sleep(0.05)
    assert killed.poll() is None, killed.stdout.read()
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    saved = json.loads(state.read_text())
    assert 0 < saved["step"] < 2 * (1200 // 96)
    resumed = run_script(*common, "--out", str(tmp_path / "b"), "--resume")
    assert resumed.wait(timeout=120) == 0, resumed.stdout.read()

    a, b = (
        load_file(tmp_path / "a" / "final" / "model.safetensors"),
        load_file(tmp_path / "b" / "final" / "model.safetensors"),
    )
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in "ab")
    assert [m["avg/top1_brain_to_image"] for m in ma] == [m["avg/top1_brain_to_image"] for m in mb]


def test_sigterm_saves_a_checkpoint(root, tmp_path):
    proc = run_script("pretrain_vit3d.py", "--dataset-root", str(root), "--out", str(tmp_path), *TINY,
                      "--subject", "1", "--no-vae", "--epochs", "1", "--batch-size", "16", "--save-every", "0",
                      "--num-workers", "0", "--device", "cpu", "--step-delay", "0.2")  # fmt: skip
    state = tmp_path / "checkpoint" / "trainer_state.json"
    deadline = time.time() + 60
    while "ViT3D:" not in (line := proc.stdout.readline()) and time.time() < deadline and line:
        pass
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert json.loads(state.read_text())["step"] >= 1


def test_two_processes(root, tmp_path):
    proc = run_script("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
                      "1", "--mixed_precision", "no", "--dynamo_backend", "no", "pretrain_vit3d.py",
                      "--dataset-root", str(root), "--out", str(tmp_path), *TINY, "--subject", "1", "--epochs", "1",
                      "--batch-size", "32", "--save-every", "5", "--num-workers", "0", "--device", "cpu",
                      env_extra={"ACCELERATE_USE_CPU": "true"})  # fmt: skip
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    train = len(json.loads(DatasetRoot(root).fmri2image(1).read_text())["train"])
    assert len(metrics) == 1 and metrics[0]["step"] == train // 64  # 2 processes x 32 per optimizer step
    assert (tmp_path / "checkpoint" / "rng_rank1.json").is_file()
    assert (tmp_path / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("missing", ["betas", "clip", "vae"])
def test_bad_input_exits_2_naming_the_file(strong_root, tmp_path, missing, capsys):
    root = tmp_path / "root"
    shutil.copytree(strong_root, root)
    layout = DatasetRoot(root)
    expected = {
        "betas": layout.whole_betas(1, "tr"),
        "clip": layout.vision_embeds_dir / "clip_image_embeds.npy",
        "vae": layout.vae_embeds_dir / "vae_latents.npy",
    }[missing]
    expected.unlink()
    code = pretrain.main(["--dataset-root", str(root), "--out", str(tmp_path / "o"), *TINY, "--device", "cpu"])
    assert code == 2
    assert str(expected) in capsys.readouterr().err


def test_mixup_pairs_only_repeats_of_the_same_image_and_subject():
    subjects = np.array([1, 1, 1, 1, 2, 2, 2, 1])
    images = np.array([5, 6, 5, 5, 5, 5, 7, 6])
    partners = mixup_partners(subjects, images)
    assert [sorted(p.tolist()) for p in partners] == [[2, 3], [7], [0, 3], [0, 2], [5], [4], [], [1]]


def test_mixup_in_the_dataset(root):
    layout = DatasetRoot(root)
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


def test_rerun_skips_a_finished_run_and_overwrite_retrains(root, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--dataset-root", str(root), "--out", str(out), *TINY, "--subject", "1", "--no-vae", "--epochs", "1",
            "--batch-size", "96", "--warmup-steps", "2", "--num-workers", "0", "--device", "cpu"]  # fmt: skip
    assert pretrain.main(argv) == 0
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["settings"]["epochs"] == 1 and not (out / "final.partial").exists()
    weights = (out / "final" / "model.safetensors").read_bytes()
    stamp = (out / "final" / "model.safetensors").stat().st_mtime_ns

    assert pretrain.main(argv) == 0  # same settings: nothing to do
    assert (out / "final" / "model.safetensors").stat().st_mtime_ns == stamp

    capsys.readouterr()
    assert pretrain.main([*argv, "--lr", "1e-4"]) == 2  # other settings: refused, nothing touched
    line = capsys.readouterr().err.strip()
    assert str(out / "run.json") in line and "--overwrite" in line
    assert (out / "final" / "model.safetensors").stat().st_mtime_ns == stamp

    assert pretrain.main([*argv, "--lr", "1e-4", "--overwrite"]) == 0
    assert json.loads((out / "run.json").read_text())["settings"]["lr"] == 1e-4
    assert (out / "final" / "model.safetensors").read_bytes() != weights
    assert [m["epoch"] for m in json.loads((out / "metrics.json").read_text())] == [1]


def test_unfinished_run_needs_resume_or_overwrite(root, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--dataset-root", str(root), "--out", str(out), *TINY, "--subject", "1", "--no-vae", "--epochs", "2",
            "--batch-size", "96", "--warmup-steps", "2", "--num-workers", "0", "--device", "cpu"]  # fmt: skip
    assert pretrain.main(argv) == 0
    # As if killed after the last epoch's checkpoint, before the final model and run.json were written.
    shutil.rmtree(out / "final")
    (out / "run.json").unlink()
    capsys.readouterr()
    assert pretrain.main(argv) == 2
    line = capsys.readouterr().err.strip()
    assert str(out / "checkpoint" / "trainer_state.json") in line and "--resume" in line
    assert pretrain.main([*argv, "--resume"]) == 0  # nothing left to train: writes the final model
    assert (out / "final" / "model.safetensors").is_file() and (out / "run.json").is_file()
    with pytest.raises(SystemExit) as exc:
        pretrain.main([*argv, "--resume", "--overwrite"])
    assert exc.value.code == 2
