"""pretrain_vit3d.py on bad input: one line naming the file and exit 2, never a traceback or a finished-looking
output. Missing files, NaN / inf in the betas (cached and on-the-fly paths) and targets, a loss that becomes
non-finite, an output location that cannot be written, a truncated checkpoint given to --resume, an unknown
subject."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from llava_brain.layout import DatasetRoot

from conftest import load_script
from vit3d_data import TINY, linked_root, replace_npy, shared_strong_root

pretrain = load_script("pretrain_vit3d.py")


@pytest.fixture(scope="module")
def strong_root(tmp_path_factory) -> Path:
    return shared_strong_root(tmp_path_factory)


def _argv(root, out, *extra: str) -> list[str]:
    return ["--dataset-root", str(root), "--out", str(out), *TINY, "--subject", "1", "--epochs", "1",
            "--batch-size", "96", "--warmup-steps", "2", "--num-workers", "0", "--device", "cpu", *extra]  # fmt: skip


def _nothing_final(out) -> bool:
    return not (out / "final").exists() and not (out / "run.json").exists()


@pytest.mark.parametrize("missing", ["betas", "clip", "vae", "masks"])
def test_missing_input_exits_2_naming_the_file(strong_root, tmp_path, missing, capsys):
    root = linked_root(strong_root, tmp_path / "root")
    layout = DatasetRoot(root)
    expected = {
        "betas": layout.whole_betas(1, "tr"),
        "clip": layout.clip_embeds,
        "vae": layout.vae_latents,
        "masks": layout.whole_masks(1),
    }[missing]
    expected.unlink()
    assert pretrain.main(_argv(root, tmp_path / "o")) == 2
    assert str(expected) in capsys.readouterr().err


def test_unknown_subject_exits_2_before_any_work(strong_root, tmp_path, capsys):
    assert pretrain.main([*_argv(strong_root, tmp_path / "o"), "--subject", "5"]) == 2
    line = capsys.readouterr().err.strip()
    assert "subj05" in line and len(line.splitlines()) == 1
    assert not (tmp_path / "o").exists()


# A NaN in the training betas is refused where the data pass anyway: while the cache is filled (block by
# block), or, when the volumes do not fit --cache-gb, batch by batch as they are read (also with a DataLoader
# worker doing the reading); a NaN in the test betas while the test sets are resized.
@pytest.mark.parametrize(
    "split, extra",
    [("tr", []), ("tr", ["--cache-gb", "0"]), ("tr", ["--cache-gb", "0", "--num-workers", "1"]), ("te", [])],
    ids=["cached", "on-the-fly", "on-the-fly-worker", "test-set"],
)
def test_nan_betas_are_refused_naming_the_file(strong_root, tmp_path, split, extra, capsys):
    root = linked_root(strong_root, tmp_path / "root")
    path = DatasetRoot(root).whole_betas(1, split)
    betas = np.load(path)
    betas[:, 3, 4, 5] = np.nan  # every sample: whichever the run reads first is refused
    replace_npy(path, betas)
    out = tmp_path / "o"
    assert pretrain.main(_argv(root, out, *extra)) == 2
    line = capsys.readouterr().err.strip()
    assert len(line.splitlines()) == 1 and line.startswith(f"error: {path}: has "), line
    assert "non-finite value(s) (NaN or inf) in the betas" in line
    assert _nothing_final(out)


@pytest.mark.parametrize("target", ["clip", "vae"])
def test_infinite_targets_are_refused_naming_the_file(strong_root, tmp_path, target, capsys):
    root = linked_root(strong_root, tmp_path / "root")
    layout = DatasetRoot(root)
    path = layout.clip_embeds if target == "clip" else layout.vae_latents
    values = np.load(path)
    values[::7] = np.inf
    replace_npy(path, values)
    assert pretrain.main(_argv(root, tmp_path / "o")) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"error: {path}: has ") and "non-finite value(s) (NaN or inf)" in line, line


def test_non_finite_loss_stops_before_anything_final(strong_root, tmp_path, capsys):
    # Finite targets so large (1e25) that their squared error overflows float32: the first loss is inf.
    root = linked_root(strong_root, tmp_path / "root")
    path = DatasetRoot(root).clip_embeds
    replace_npy(path, np.load(path) * np.float32(1e25))
    out = tmp_path / "o"
    assert pretrain.main(_argv(root, out, "--no-vae")) == 2
    line = capsys.readouterr().err.strip()
    assert len(line.splitlines()) == 1 and "loss became non-finite" in line and str(out) in line
    assert _nothing_final(out) and not (out / "checkpoint").exists()


def test_unwritable_out_exits_2_before_loading_data(strong_root, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")

    def no_data(*args, **kwargs):
        raise AssertionError("data were read before the output location was checked")

    monkeypatch.setattr(pretrain, "common_grid", no_data)
    assert pretrain.main(_argv(strong_root, blocker / "run")) == 2
    line = capsys.readouterr().err.strip()
    assert str(blocker / "run") in line and "cannot be written" in line


@pytest.fixture(scope="module")
def unfinished_run(strong_root, tmp_path_factory):
    """A run killed, as it were, after its last checkpoint: checkpoint/ complete, no final/ nor run.json."""
    out = tmp_path_factory.mktemp("unfinished") / "run"
    assert pretrain.main(_argv(strong_root, out, "--no-vae")) == 0
    shutil.rmtree(out / "final")
    (out / "run.json").unlink()
    return out


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"])
def test_resume_from_a_truncated_checkpoint_exits_2_naming_the_file(strong_root, unfinished_run, tmp_path, name,
                                                                    capsys):  # fmt: skip
    out = tmp_path / "run"
    shutil.copytree(unfinished_run, out)
    path = out / "checkpoint" / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert pretrain.main(_argv(strong_root, out, "--no-vae", "--resume")) == 2
    line = capsys.readouterr().err.strip()
    assert len(line.splitlines()) == 1 and line.startswith(f"error: {path}:"), line
    assert _nothing_final(out)


def test_resume_from_the_intact_checkpoint_finishes(strong_root, unfinished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(unfinished_run, out)
    assert pretrain.main(_argv(strong_root, out, "--no-vae", "--resume")) == 0
    assert json.loads((out / "run.json").read_text())["settings"]["subjects"] == [1]
