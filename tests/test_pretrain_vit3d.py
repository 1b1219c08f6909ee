"""pretrain_vit3d.py: learning, resume after a kill (same weights, metrics and RNG state), SIGTERM, 2 processes,
and the rerun rule (skip, refuse with the reason, --overwrite, unfinished runs).

Kills happen at an exact point of the data stream (`vit3d_data.run_killed_at`), never after a sleep.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from llava_brain.layout import DatasetRoot

from conftest import load_script
from vit3d_data import TINY, linked_root, replace_npy, run_killed_at, run_script, shared_strong_root

pretrain = load_script("pretrain_vit3d.py")


@pytest.fixture(scope="module")
def strong_root(tmp_path_factory) -> Path:
    return shared_strong_root(tmp_path_factory)


@pytest.fixture
def one_thread(monkeypatch):
    """pretrain's limit_threads() takes OMP_NUM_THREADS: 1 thread gives the same float arithmetic everywhere."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_training_beats_chance_and_is_reported_beside_ridge(strong_root, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    argv = ["--dataset-root", str(strong_root), "--out", str(out), "--num-layers", "2", "--hidden-size", "64",
            "--num-heads", "4", "--head-hidden", "128", "--patch-size", "4", "--epochs", "10", "--lr", "3e-3",
            "--weight-decay", "0", "--warmup-steps", "20", "--batch-size", "32", "--num-workers", "0",
            "--device", "cpu", "--precision", "fp32"]  # fmt: skip
    assert pretrain.main(argv) == 0
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
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["subjects"] == [1, 2] and run["settings"]["precision"] == "fp32"
    assert set(run["inputs"]) >= {"subj01/betas_tr", "subj02/betas_te", "clip_embeds", "vae_latents"}

    ridge = load_script("tools/evaluate/ridge_baseline.py")
    assert ridge.main(["--dataset-root", str(strong_root), "--out", str(tmp_path / "ridge")]) == 0
    predict = load_script("tools/evaluate/fmri2embeds.py")
    evaluate = load_script("tools/evaluate/eval_retrieval.py")
    for name, encoder, model in (("ridge", "ridge", tmp_path / "ridge" / "ridge_nsdgeneral"), ("vit3d", "vit3d", out)):
        assert predict.main(["--encoder", encoder, "--model", str(model), "--dataset-root", str(strong_root),
                             "--out", str(tmp_path / "pred" / name), "--device", "cpu", "--quiet"]) == 0  # fmt: skip
        assert evaluate.main(["--predictions", str(tmp_path / "pred" / name), "--dataset-root", str(strong_root)]) == 0
    table = load_script("tools/evaluate/retrieval_table.py")
    capsys.readouterr()
    assert table.main(["--run", f"ridge={tmp_path / 'pred' / 'ridge'}", "--run", f"vit3d={tmp_path / 'pred' / 'vit3d'}",
                       "--json", str(tmp_path / "table.json")]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "| subject | chance | ridge avg | ridge single | vit3d avg | vit3d single |"
    subj01 = next(line for line in lines if line.startswith("| subj01 |")).split(" | ")
    assert float(subj01[4]) == pytest.approx(last["subj01/avg/top1_brain_to_image"], abs=5e-4)
    assert float(subj01[1]) == pytest.approx(1 / 50, abs=5e-4)
    assert lines[-2].startswith("| mean |") and lines[-1].startswith("| shuffled (mean) |")
    saved = json.loads((tmp_path / "table.json").read_text())["runs"]
    assert set(saved) == {"ridge", "vit3d"} and set(saved["vit3d"]["subjects"]) == {"subj01", "subj02"}


def _resume_argv(root, batch_size: int, grad_accum: int) -> list[str]:
    return ["pretrain_vit3d.py", "--dataset-root", str(root), *TINY, "--subject", "1", "--no-vae", "--epochs", "2",
            "--batch-size", str(batch_size), "--grad-accum", str(grad_accum), "--warmup-steps", "3",
            "--save-every", "4", "--num-workers", "0", "--device", "cpu", "--precision", "fp32"]  # fmt: skip


_STRAIGHT: dict[tuple[int, int], object] = {}  # uninterrupted runs, one per (batch size, accumulation)


def _straight_run(root, tmp_path_factory, batch_size: int, grad_accum: int):
    key = (batch_size, grad_accum)
    if key not in _STRAIGHT:
        out = tmp_path_factory.mktemp(f"straight_{batch_size}_{grad_accum}")
        proc = run_script(*_resume_argv(root, batch_size, grad_accum), "--out", str(out))
        assert proc.wait(timeout=300) == 0, proc.stdout.read()
        _STRAIGHT[key] = out
    return _STRAIGHT[key]


# subj01 has 750 training trials: 96 samples per optimizer step either way, 7 steps per epoch, checkpoints at
# steps 4, 7 (epoch end), 8, 12 and 14. kill_at: the sample fetch (1-based) at which SIGKILL arrives; the run
# is then at the checkpoint of `checkpoint_step`, and resumes mid-epoch.
@pytest.mark.parametrize(
    "batch_size, grad_accum, kill_at, checkpoint_step",
    [
        (96, 1, 6 * 96 + 50, 4),  # in step 7 (epoch 1): resumes at position 4 of epoch 1
        (96, 1, 12 * 96 + 10, 12),  # in step 13 (epoch 2): resumes at position 5 of epoch 2
        (48, 2, 13 * 48 + 5, 4),  # in the second micro-batch of step 7: accumulation cut in the middle
    ],
)
def test_resume_after_kill_reproduces_the_uninterrupted_run(strong_root, tmp_path, tmp_path_factory, batch_size,
                                                              grad_accum, kill_at, checkpoint_step):  # fmt: skip
    straight = _straight_run(strong_root, tmp_path_factory, batch_size, grad_accum)
    argv = [*_resume_argv(strong_root, batch_size, grad_accum), "--out", str(tmp_path)]
    killed = run_killed_at(kill_at, "KILL", *argv)
    assert killed.wait(timeout=300) == -signal.SIGKILL, killed.stdout.read()
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["step"] == checkpoint_step
    assert not (tmp_path / "final").exists() and not (tmp_path / "run.json").exists()
    resumed = run_script(*argv, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()

    a, b = load_file(straight / "final" / "model.safetensors"), load_file(tmp_path / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (straight, tmp_path))
    for key in ("epoch", "step", "train_loss", "lr", "avg/top1_brain_to_image", "single/top1_brain_to_image"):
        assert [m[key] for m in ma] == [m[key] for m in mb], key
    rng_a, rng_b = ((d / "checkpoint" / "rng_rank0.json").read_text() for d in (straight, tmp_path))
    assert rng_a == rng_b
    assert not list(tmp_path.glob(".*.partial")) and not list(tmp_path.glob(".*.old"))


def test_sigterm_saves_a_checkpoint_and_exits_143(strong_root, tmp_path):
    # SIGTERM arrives while step 3's batch is read: step 3 finishes, then the checkpoint, then exit 128 + 15.
    proc = run_killed_at(2 * 16 + 5, "TERM", "pretrain_vit3d.py", "--dataset-root", str(strong_root), "--out",
                         str(tmp_path), *TINY, "--subject", "1", "--no-vae", "--epochs", "1", "--batch-size", "16",
                         "--save-every", "0", "--num-workers", "0", "--device", "cpu")  # fmt: skip
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM, proc.stdout.read()
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["position"], state["loss_count"]) == (3, 0, 3, 3)
    assert not (tmp_path / "final").exists()


def test_two_processes(strong_root, tmp_path):
    proc = run_script("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
                      "1", "--mixed_precision", "no", "--dynamo_backend", "no", "pretrain_vit3d.py",
                      "--dataset-root", str(strong_root), "--out", str(tmp_path), *TINY, "--subject", "1",
                      "--epochs", "1", "--batch-size", "32", "--save-every", "5", "--num-workers", "0",
                      "--device", "cpu", env_extra={"ACCELERATE_USE_CPU": "true"})  # fmt: skip
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    train = len(json.loads(DatasetRoot(strong_root).fmri2image(1).read_text())["train"])
    assert len(metrics) == 1 and metrics[0]["step"] == train // 64  # 2 processes x 32 per optimizer step
    assert (tmp_path / "checkpoint" / "rng_rank1.json").is_file()
    assert (tmp_path / "final" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "run.json").read_text())["settings"]["world_size"] == 2


def _quick(root, out, *extra: str) -> list[str]:
    return ["--dataset-root", str(root), "--out", str(out), *TINY, "--subject", "1", "--no-vae", "--epochs", "1",
            "--batch-size", "96", "--warmup-steps", "2", "--num-workers", "0", "--device", "cpu", *extra]  # fmt: skip


def test_rerun_skips_a_finished_run_and_overwrite_retrains(strong_root, tmp_path, capsys):
    out = tmp_path / "run"
    argv = _quick(strong_root, out)
    assert pretrain.main(argv) == 0
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["settings"]["epochs"] == 1 and run_json["settings"]["subjects"] == [1]
    assert not list(out.glob(".*.partial"))
    weights = (out / "final" / "model.safetensors").read_bytes()
    stamp = (out / "final" / "model.safetensors").stat().st_mtime_ns

    assert pretrain.main(argv) == 0  # same settings and inputs: nothing to do
    assert (out / "final" / "model.safetensors").stat().st_mtime_ns == stamp

    capsys.readouterr()
    assert pretrain.main([*argv, "--lr", "1e-4"]) == 2  # other settings: refused, nothing touched
    line = capsys.readouterr().err.strip()
    assert str(out / "run.json") in line and "setting lr" in line and "--overwrite" in line
    assert (out / "final" / "model.safetensors").stat().st_mtime_ns == stamp

    assert pretrain.main([*argv, "--lr", "1e-4", "--overwrite"]) == 0
    assert json.loads((out / "run.json").read_text())["settings"]["lr"] == 1e-4
    assert (out / "final" / "model.safetensors").read_bytes() != weights
    assert [m["epoch"] for m in json.loads((out / "metrics.json").read_text())] == [1]


def test_rerun_after_regenerated_clip_targets_refuses_then_overwrite_retrains(strong_root, tmp_path, capsys):
    root = linked_root(strong_root, tmp_path / "root", subjects=(1,))
    out = tmp_path / "run"
    assert pretrain.main(_quick(root, out)) == 0
    clip_path = DatasetRoot(root).clip_embeds
    clip = np.load(clip_path)
    replace_npy(clip_path, clip[:, ::-1].copy())  # "regenerated": same shape, other values
    capsys.readouterr()
    assert pretrain.main(_quick(root, out)) == 2
    line = capsys.readouterr().err.strip()
    assert "input clip_embeds changed" in line and "--overwrite" in line
    assert pretrain.main(_quick(root, out, "--overwrite")) == 0
    assert pretrain.main(_quick(root, out)) == 0  # current again


def test_rerun_after_adding_a_subject_under_all_refuses(strong_root, tmp_path, capsys):
    root = linked_root(strong_root, tmp_path / "root", subjects=(1,))
    argv = ["--dataset-root", str(root), *TINY, "--subject", "all", "--no-vae", "--epochs", "1", "--batch-size",
            "96", "--warmup-steps", "2", "--num-workers", "0", "--device", "cpu"]  # fmt: skip
    assert pretrain.main(argv) == 0
    out = DatasetRoot(root).run_dir("vit3d")  # the default --out
    assert json.loads((out / "run.json").read_text())["settings"]["subjects"] == [1]
    linked_root(strong_root, tmp_path / "more", subjects=(2,))
    shutil.move(DatasetRoot(tmp_path / "more").fmri_dir(2), DatasetRoot(root).fmri_dir(2))
    capsys.readouterr()
    assert pretrain.main(argv) == 2
    line = capsys.readouterr().err.strip()
    assert str(out / "run.json") in line and "setting subjects [1] -> [1, 2]" in line


def test_unfinished_run_needs_resume_or_overwrite(strong_root, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*_quick(strong_root, out), "--epochs", "2"]
    assert pretrain.main(argv) == 0
    # As if killed after the last epoch's checkpoint, before the final model and run.json were written.
    shutil.rmtree(out / "final")
    (out / "run.json").unlink()
    capsys.readouterr()
    assert pretrain.main(argv) == 2
    line = capsys.readouterr().err.strip()
    assert str(out / "checkpoint" / "trainer_state.json") in line and "--resume" in line
    assert pretrain.main([*argv, "--resume", "--lr", "1e-4"]) == 2  # the checkpoint's run had other settings
    assert "setting lr" in capsys.readouterr().err
    assert pretrain.main([*argv, "--resume"]) == 0  # nothing left to train: writes the final model
    assert (out / "final" / "model.safetensors").is_file() and (out / "run.json").is_file()
    with pytest.raises(SystemExit) as exc:
        pretrain.main([*argv, "--resume", "--overwrite"])
    assert exc.value.code == 2


def test_resume_refuses_a_checkpoint_made_from_other_inputs(strong_root, tmp_path, capsys):
    root = linked_root(strong_root, tmp_path / "root", subjects=(1,))
    out = tmp_path / "run"
    assert pretrain.main(_quick(root, out)) == 0
    shutil.rmtree(out / "final")  # unfinished, as after a kill before the final model
    (out / "run.json").unlink()
    clip_path = DatasetRoot(root).clip_embeds
    replace_npy(clip_path, np.load(clip_path)[:, ::-1].copy())
    capsys.readouterr()
    assert pretrain.main(_quick(root, out, "--resume")) == 2
    line = capsys.readouterr().err.strip()
    assert str(out / "checkpoint" / "trainer_state.json") in line and "input clip_embeds changed" in line
