"""Atomic writes, run manifests and a kill-safe append-only JSONL store.

Every stage writes its outputs through these helpers so that a crash, a kill or Ctrl-C never
leaves a half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llava_brain.errors import BadInputError

RUN_MANIFEST = "run.json"
# Packages whose versions go into every run.json (the ones that change numbers when they drift).
_TRACKED_PACKAGES = (
    "llava_brain", "numpy", "scipy", "h5py", "nibabel", "pillow", "torch", "torchvision",
    "transformers", "tokenizers", "diffusers", "accelerate", "peft", "safetensors", "timm",
    "scikit-image", "pycocoevalcap", "openai",
)  # fmt: skip


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


class NpyRows:
    """A `.npy` file of known shape, written and read by blocks of rows at any position.

    For outputs larger than memory (NSD: ~40 GB of whole-brain volumes per subject): the file is
    created at full size (sparse) with a standard header, and rows go in with `pwrite`, so memory
    holds one block, not the array (a memory map would count every touched page in the RSS).
    The result is an ordinary `.npy` that `np.load(..., mmap_mode="r")` opens.
    """

    def __init__(self, path: str | Path, shape: tuple[int, ...], dtype, mode: str = "w"):
        self.path, self.shape, self.dtype = Path(path), tuple(int(n) for n in shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        if mode == "w":
            self.path.parent.mkdir(parents=True, exist_ok=True)
            header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
            with open(self.path, "wb") as f:
                np.lib.format.write_array_header_1_0(f, header)
                self.offset = f.tell()
                f.truncate(self.offset + self.shape[0] * self.row_bytes)
        elif mode == "r+":
            with open(self.path, "rb") as f:
                np.lib.format.read_magic(f)
                shape, _, dt = np.lib.format.read_array_header_1_0(f)
                self.offset = f.tell()
            if tuple(shape) != self.shape or np.dtype(dt) != self.dtype:
                expected = f"expected a {self.dtype} array of shape {self.shape}"
                raise BadInputError(self.path, f"{expected}; found {dt} {shape}")
        else:
            raise ValueError(f"mode must be 'w' or 'r+', got {mode!r}")
        self._fd = os.open(self.path, os.O_RDWR)

    def write(self, row: int, block: np.ndarray) -> None:
        """Store `block` (rows, ...) at `row`. Its bytes are written as they are (the caller picks the dtype)."""
        data = memoryview(np.ascontiguousarray(block)).cast("B")
        if len(data) % self.row_bytes or row * self.row_bytes + len(data) > self.shape[0] * self.row_bytes:
            raise ValueError(f"{self.path}: block of {len(data)} bytes does not fit at row {row} of {self.shape}")
        position, done = self.offset + row * self.row_bytes, 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], position + done)

    def read(self, row: int, rows: int, dtype=None) -> np.ndarray:
        """(rows, ...) starting at `row`, viewed as `dtype` (default: the file's) of the same byte size."""
        dtype = self.dtype if dtype is None else np.dtype(dtype)
        out = np.empty((rows, *self.shape[1:]), dtype)
        if out.nbytes != rows * self.row_bytes:
            raise ValueError(f"{dtype} rows are not {self.row_bytes} bytes wide")
        view, position, done = memoryview(out).cast("B"), self.offset + row * self.row_bytes, 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], position + done)
            if not got:
                raise BadInputError(self.path, f"ends before row {row + rows} of {self.shape[0]}")
            done += got
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> NpyRows:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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


def git_sha(repo_dir: str | Path | None = None) -> str:
    """Commit of the code that ran (with '-dirty' when the work tree has changes), or 'unknown'."""
    repo_dir = Path(repo_dir) if repo_dir else Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo_dir, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def package_versions(names: Iterable[str] = _TRACKED_PACKAGES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def run_manifest(args: Any, **extra: Any) -> dict[str, Any]:
    """What produced an output: arguments, command line, package versions, git commit, host."""
    arguments = vars(args) if hasattr(args, "__dict__") else dict(args)
    return {
        "arguments": {k: v for k, v in arguments.items() if not callable(v)},
        "argv": sys.argv,
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": package_versions(),
        "finished_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **extra,
    }


def write_run_json(out_dir: str | Path, args: Any, **extra: Any) -> Path:
    """Write `run.json` beside a stage's outputs (atomically)."""
    return write_json(Path(out_dir) / RUN_MANIFEST, run_manifest(args, **extra))


class JsonlStore:
    """Append-only JSON-lines file that survives a kill mid-write.

    Each record is written as one `json.dumps(...) + "\\n"` and flushed, so the only damage a
    kill can do is a torn *last* line (no trailing newline). Opening the store drops such a line
    (truncating the file back to the last complete record) instead of failing; a malformed line
    anywhere else is real corruption and raises BadInputError naming the file and line.
    Appends are thread-safe.
    """

    def __init__(self, path: str | Path, fsync: bool = False):
        self.path = Path(path)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._records: list[Any] = []
        self.dropped_torn_line = False
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        complete_end = data.rfind(b"\n") + 1  # bytes up to and including the last newline
        if complete_end < len(data):
            # A torn final record: cut it off so the next append starts on a clean line.
            with open(self.path, "r+b") as f:
                f.truncate(complete_end)
            self.dropped_torn_line = True
        for lineno, line in enumerate(data[:complete_end].splitlines(), start=1):
            if not line.strip():
                continue
            try:
                self._records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise BadInputError(self.path, f"line {lineno} is not valid JSON ({err.msg})") from None

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._records))

    @property
    def records(self) -> list[Any]:
        return list(self._records)

    def append(self, record: Any) -> None:
        line = (json.dumps(record, ensure_ascii=False, default=_json_default) + "\n").encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as f:
                f.write(line)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            self._records.append(json.loads(line))

    def compact(self, key=None) -> None:
        """Rewrite the file atomically, sorted by `key` (deterministic order after concurrent appends)."""
        with self._lock:
            records = sorted(self._records, key=key) if key else list(self._records)
            text = "".join(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n" for r in records)
            write_text(self.path, text)
            self._records = records
