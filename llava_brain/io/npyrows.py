"""`.npy` files larger than memory, written and read by blocks of rows."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from llava_brain.errors import BadInputError


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
