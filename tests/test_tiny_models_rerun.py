"""tools/make_tiny_models.py at its boundaries: SIGKILL then rerun, changed inputs, bad bricks, unwritable outputs.

A kill happens at a point the test controls: the subprocess runs the script with one function replaced by
one that SIGKILLs its own process, so the kill lands exactly there, however fast or loaded the machine is.
The rerun must leave no hidden staging folder or temp file and write the same files as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch

from llava_brain.layout import NsdTree
from llava_brain.nsd.stimuli import HDF5_DATASET

from conftest import REPO, load_script

SCRIPT = REPO / "tools" / "make_tiny_models.py"
# Every stage runs, for seconds only.
FLAGS = ("--vae-steps", "2", "--clip-steps", "2", "--llm-steps", "2", "--unet-steps", "2", "--quiet")
# Run the script with one function replaced by a self-SIGKILL: "blip2" = after the LLM folder is written,
# "vae" = after the CLIP folders, "swap" = with every file (run.json too) in the staging folder, unswapped.
DRIVER = """
import os, runpy, signal, sys
import llava_brain.io.files as files
from llava_brain import tiny

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

module, name = {"blip2": (tiny, "build_blip2"), "vae": (tiny, "build_vae"), "swap": (files, "swap_in")}[sys.argv[1]]
setattr(module, name, die)
sys.argv = [sys.argv[2], *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def script():
    return load_script("tools/make_tiny_models.py")


@pytest.fixture
def tree(small_tree, tmp_path) -> NsdTree:
    """A copy of the SMALL tree made of symlinks, so one file can be replaced without touching the original."""
    root = tmp_path / "nsd"
    shutil.copytree(small_tree.root, root, copy_function=os.symlink)
    return NsdTree(root)


@pytest.fixture(scope="module")
def reference(script, small_tree, tmp_path_factory) -> Path:
    """An uninterrupted build with FLAGS."""
    out = tmp_path_factory.mktemp("reference") / "models"
    assert script.main(["--out", str(out), "--nsd-root", str(small_tree.root), *FLAGS]) == 0
    return out


def _args(tree: NsdTree, out: Path, *extra: str) -> list[str]:
    return ["--out", str(out), "--nsd-root", str(tree.root), *FLAGS, *extra]


def _killed_at(point: str, args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-c", DRIVER, point, str(SCRIPT), *args], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]


def _files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}  # hidden too


def assert_same_output(folder: Path, reference: Path) -> None:
    """Every file byte for byte (weights, configs, tokenizers, tiny_models.json); run.json's settings and input
    fingerprints (its timestamps, timings and arguments differ between runs)."""
    ours, theirs = _files(folder), _files(reference)
    assert sorted(ours) == sorted(theirs)
    for name, path in ours.items():
        if name == "run.json":
            a, b = json.loads(path.read_text()), json.loads(theirs[name].read_text())
            assert (a["settings"], a["inputs"]) == (b["settings"], b["inputs"])
        else:
            assert path.read_bytes() == theirs[name].read_bytes(), name


@pytest.mark.parametrize(("point", "staged"), [("blip2", {"llm"}), ("swap", {"unclip", "run.json"})])
def test_sigkill_then_rerun_reproduces_the_uninterrupted_output(script, tree, reference, tmp_path, point, staged):
    out = tmp_path / "out" / "models"
    _killed_at(point, _args(tree, out))
    staging = out.parent / ".models.partial"
    assert not out.exists() and staged <= {p.name for p in staging.iterdir()}, "killed mid-build, as planned"
    assert script.main(_args(tree, out)) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["models"], "no .partial/.old/.tmp left behind"
    assert_same_output(out, reference)


def test_sigkill_during_overwrite_keeps_the_old_output_and_a_rerun_skips(script, tree, reference, tmp_path):
    out = tmp_path / "out" / "models"
    shutil.copytree(reference, out)
    _killed_at("vae", _args(tree, out, "--overwrite"))
    assert (out.parent / ".models.partial" / "clip_text").is_dir()
    assert_same_output(out, reference)  # the complete output stays in place until the new one is swapped in
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert script.main(_args(tree, out)) == 0  # same settings and inputs: nothing to do
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["models"], "the killed run's staging folder is gone"


def test_changed_input_is_refused_with_the_reason(script, tree, reference, tmp_path, capsys):
    out = tmp_path / "models"
    shutil.copytree(reference, out)
    captions = tree.coco_annotations("captions", "train2017")
    data = json.loads(captions.read_text())
    data["annotations"][0]["caption"] = "A caption rewritten after the models were built."
    captions.unlink()  # a symlink to the shared tree: replace it, never write through it
    captions.write_text(json.dumps(data))
    assert script.main(_args(tree, out)) == 2
    err = capsys.readouterr().err
    assert "input captions changed" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1


def test_brick_with_too_few_images_exits_2_naming_it(script, tree, tmp_path, capsys, monkeypatch):
    with h5py.File(tree.stimuli, "r") as h5:
        images = h5[HDF5_DATASET][: len(h5[HDF5_DATASET]) // 2]
    tree.stimuli.unlink()
    with h5py.File(tree.stimuli, "w") as h5:
        h5.create_dataset(HDF5_DATASET, data=images)
    # limit_threads() runs first: OMP_NUM_THREADS wins over whatever torch was set to.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert script.main(_args(tree, tmp_path / "models")) == 2
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tree.stimuli) in err and f"imgBrick has {len(images)} images" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nsd"], "nothing written"


def test_unwritable_out_exits_2_before_any_work(script, small_tree, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert script.main(["--out", str(blocker / "models"), "--nsd-root", str(small_tree.root), *FLAGS]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot be written" in err and str(blocker) in err
    assert script.main(["--out", str(blocker), "--nsd-root", str(small_tree.root), *FLAGS]) == 2
    assert "must be a folder" in capsys.readouterr().err
