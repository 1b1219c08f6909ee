"""Shared fixtures: small mini-NSD trees and a loader for scripts (scripts are not a package)."""

from __future__ import annotations

import functools
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


try:
    import xdist.scheduler
except ImportError:  # pytest-xdist is a dev requirement; without it the suite runs in one process
    xdist = None

if xdist is not None:

    def pytest_xdist_make_scheduler(config, log):
        """`make test` runs the suite in 2 processes (pytest-xdist). Each test module goes to one process, so its
        module fixtures are built once; the modules that share mini_chain's session-wide chain (minutes to build,
        once per process) go to the same one, so it is built once. (xdist's own --dist loadgroup did not group
        here, with pytest 9.2 and xdist 3.8: even a module's xdist_group mark left its tests on both processes.)"""
        root = config.rootpath

        class ModuleScheduling(xdist.scheduler.LoadScopeScheduling):
            def _split_scope(self, nodeid: str) -> str:
                path = nodeid.split("::", 1)[0]
                return "mini_chain" if _imports_mini_chain(root / path) else path

        return ModuleScheduling(config, log)


@functools.cache
def _imports_mini_chain(path: Path) -> bool:
    return path.suffix == ".py" and "from mini_chain import" in path.read_text()
