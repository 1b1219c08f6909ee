"""Shared test data of the ViT3D tests: a prepared 2-subject root with a strong signal, cheap linked copies of it,
and a runner that kills pretrain_vit3d.py at an exact point of its data stream (no sleeps, no races).

The root is a 2-subject mini-NSD (SNR 3-4) prepared by make_subjmri, with CLIP targets built from 4x4 thumbnails
of the images (a tiny random CLIP carries too little image information to test retrieval) and random VAE latents.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llava_brain.layout import DatasetRoot, NsdTree
from llava_brain.simulate import MiniNsdConfig, write_mini_nsd

from conftest import REPO, load_script

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-heads", "4", "--head-hidden", "64", "--patch-size", "6"]
_BUILT: dict[str, Path] = {}  # one strong root per pytest session, whichever test module asks first

# Runs a script with FmriTrainSet.__getitem__ counted: at call number AT it sends itself signal SIGNAL (KILL,
# TERM), i.e. in the middle of a chosen micro-batch; the data order is fixed, so the point is exact.
KILL_AT = """
import os, runpy, signal, sys
import llava_brain.data.fmri as fmri
at, signum, calls = int(sys.argv[1]), getattr(signal, "SIG" + sys.argv[2]), [0]
getitem = fmri.FmriTrainSet.__getitem__
def counted(self, index):
    calls[0] += 1
    if calls[0] == at:
        os.kill(os.getpid(), signum)
    return getitem(self, index)
fmri.FmriTrainSet.__getitem__ = counted
sys.argv = sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def write_targets(root: Path, ids: list[int], clip: np.ndarray) -> None:
    """vision_embeds/ (standardised `clip`) and vae_embeds/ (random (2, 4, 4) latents) for the nsdIds `ids`."""
    clip = (clip - clip.mean(0)) / (clip.std(0) + 1e-6)
    layout = DatasetRoot(root)
    vae = np.random.default_rng(0).normal(size=(len(ids), 2, 4, 4))
    for path, index, array in ((layout.clip_embeds, layout.clip_index, clip),
                               (layout.vae_latents, layout.vae_index, vae)):  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, array.astype(np.float32))
        index.write_text(json.dumps({"nsd_ids": ids}))


def _build(base: Path) -> Path:
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


def shared_strong_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The prepared 2-subject root, built once per session (never written by the tests: they write into
    `linked_root` copies); each test module wraps it in its own `strong_root` fixture."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _BUILT:
        _BUILT[key] = _build(tmp_path_factory.mktemp("strong"))
    return _BUILT[key]


def linked_root(source: Path, dest: Path, subjects: tuple[int, ...] = (1, 2)) -> Path:
    """A dataset root whose files are symlinks to `source`'s (only `subjects`' fMRI folders): cheap to make,
    and a test may delete or `replace` any file of it without touching `source`."""
    src, out = DatasetRoot(source), DatasetRoot(dest)
    folders = [src.fmri_dir(s) for s in subjects] + [src.vision_embeds_dir, src.vae_embeds_dir]
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                target = dest / path.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(path)
    return out.root


def replace_npy(path: Path, array: np.ndarray) -> None:
    """Write a new file where a symlink of `linked_root` was (np.save would write through the link)."""
    path.unlink()
    np.save(path, array)


def run_script(*args: str, env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def run_killed_at(call: int, signame: str, *args: str) -> subprocess.Popen:
    """`args` (a script and its flags) run with the `KILL_AT` hook: signal `signame` at sample fetch `call`."""
    return run_script("-c", KILL_AT, str(call), signame, *args)
