"""Atomic writes and reads: a crash, a kill or Ctrl-C never leaves a half-written file under its final name."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llava_brain.errors import BadInputError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed.

    The temporary name keeps the final suffix (e.g. `.npy`, `.nii.gz`) so that libraries which
    dispatch on the extension write the right format.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs should be as readable as any file the user writes
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, default=_json_default) + "\n")


def save_npy(path: str | Path, array: np.ndarray) -> Path:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(array))
    return Path(path)


def read_json(path: str | Path, what: str = "a JSON file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise BadInputError(path, f"missing; expected {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadInputError(path, f"expected {what}; not valid JSON ({err})") from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Delete the temporary files an `atomic_path(path)` killed by SIGKILL left beside `path`.

    Only call this where one writer owns `path` (a stage's own output or a locked store): a
    concurrent writer's temporary file has the same shape of name.
    """
    path = Path(path)
    suffix = "".join(path.suffixes)
    if not path.parent.is_dir():
        return []
    stale = sorted(path.parent.glob(f".{glob_escape(path.name)}.*.tmp{glob_escape(suffix)}"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


# Writable outputs ------------------------------------------------------------------------------


def require_writable(path: str | Path, what: str = "output") -> Path:
    """Check, before any work, that `path` (a file or folder, maybe not yet there) can be created.

    Walks up to the nearest existing folder and creates (then removes) a probe file there, which
    also catches read-only mounts and permissions that `os.access` misreports. A location that
    cannot be written is a BadInputError naming it (exit 2, one line).
    """
    path = Path(path)
    target = path if path.is_dir() else path.parent
    while not target.exists():
        if target.parent == target:
            break
        target = target.parent
    if target.exists() and not target.is_dir():
        raise BadInputError(path, f"cannot be written: {target} is a file, not a folder; choose another {what}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=target)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise BadInputError(path, f"cannot be written ({reason} in {target}); choose another {what}") from None
    return path


# Folders built under a temporary name and swapped in whole ----------------------------------------


def staging_path(final: str | Path) -> Path:
    final = Path(final)
    return final.parent / f".{final.name}.partial"


def _old_path(final: Path) -> Path:
    return final.parent / f".{final.name}.old"


def recover_staged(final: str | Path) -> None:
    """Clean up after a kill: drop a half-built staging folder; finish a swap cut between its renames."""
    final = Path(final)
    old = _old_path(final)
    if old.exists() and not final.exists():
        old.rename(final)  # killed between the two renames of a swap: the old folder is complete
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(staging_path(final), ignore_errors=True)


def swap_in(staging: str | Path, final: str | Path) -> Path:
    """Move a finished `staging` folder onto `final`, replacing what was there (never a half state)."""
    staging, final = Path(staging), Path(final)
    if final.exists():
        old = _old_path(final)
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(final)
    return final


@contextlib.contextmanager
def staged_folder(final: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `final`; on success it replaces `final`, on error it is removed.

    A kill leaves at most the hidden staging folder, which the next `staged_folder(final)` (or
    `recover_staged(final)`) removes.
    """
    final = Path(final)
    recover_staged(final)
    staging = staging_path(final)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    swap_in(staging, final)
