"""Checks shared by the stage tests: kill a stage at a named point, compare output trees, read its error line.

`run_killed_at` runs a stage script in a child process that SIGKILLs itself at a point the test
names. Waiting for a file and then sending a signal races the child on a loaded machine (it may
finish first); here the child replaces one function of a module with a wrapper that kills the
process on its N-th call, before or after running it, so the kill lands at the same point on
every machine:

    proc = run_killed_at("prepare_datasets/make_mini_nsd.py", [...], "llava_brain.io.files", "swap_in")
    assert proc.returncode == -signal.SIGKILL
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_CHILD = """
import importlib, os, runpy, signal, sys
module_name, function, call, after, script, *argv = sys.argv[1:]
module = importlib.import_module(module_name)
original = getattr(module, function)
calls = [0]

def wrapper(*args, **kwargs):
    calls[0] += 1
    if calls[0] != int(call):
        return original(*args, **kwargs)
    if after == "after":
        original(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)

setattr(module, function, wrapper)
sys.argv = [script, *argv]
runpy.run_path(script, run_name="__main__")
"""


def run_killed_at(
    script: str, argv: Sequence[str], module: str, function: str, *, call: int = 1, after: bool = False
) -> subprocess.CompletedProcess:
    """Run `script argv` from the repository root; SIGKILL it at the `call`-th call of `module.function`
    (before that call runs, or right after it returns when `after`). Returns the finished process."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-c", _CHILD, module, function, str(call), "after" if after else "before", script, *argv]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def hidden_leftovers(folder: Path) -> list[str]:
    """Names starting with '.' anywhere under `folder` (staging folders, temp files), relative, sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))


def tree_bytes(root: Path, ignore: tuple[str, ...] = ("run.json",)) -> dict[str, bytes]:
    """Every file under `root` by relative path, except those named in `ignore` (run.json records argv,
    time and host)."""
    files = sorted(p for p in Path(root).rglob("*") if p.is_file() and p.name not in ignore)
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def assert_same_files(a: Path, b: Path) -> None:
    left, right = tree_bytes(a), tree_bytes(b)
    assert sorted(left) == sorted(right)
    different = [name for name in left if left[name] != right[name]]
    assert not different, f"files differ between {a} and {b}: {different}"


def error_line(capsys) -> str:
    """The one line a stage printed on stderr (it must be exactly one)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def assert_one_line_naming(err: Exception, path: Path) -> str:
    """`err`'s message is one line and names `path`; returns the message."""
    message = str(err)
    assert "\n" not in message
    assert str(path) in message
    return message
