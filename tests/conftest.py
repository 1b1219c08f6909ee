"""Shared fixtures: small mini-NSD trees and a loader for scripts (scripts are not a package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from llava_brain.layout import NsdTree
from llava_brain.simulate import MiniNsdConfig, write_mini_nsd

REPO = Path(__file__).resolve().parent.parent
# A mini-NSD small enough to generate in a second: 2 subjects, 40 images each (12 shared),
# 30 trials per session (a 4-session design), grids of ~16 voxels a side.
SMALL = dict(subjects=(1, 5), num_shared=12, images_per_subject=40, trials_per_session=30, grid_scale=0.2)


def load_script(relative: str):
    """Import a script (e.g. "prepare_datasets/make_subjmri.py") as a module, to call its main(argv)."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def small_tree(tmp_path_factory) -> NsdTree:
    """SMALL mini-NSD with 3 of its 4 sessions done (so some images are shown fewer than 3 times)."""
    out = tmp_path_factory.mktemp("small") / "nsd"
    write_mini_nsd(out, MiniNsdConfig(**SMALL, sessions=3), progress=False)
    return NsdTree(out)
