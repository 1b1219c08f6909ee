"""BetaSession's fast HDF5 path: NSD's one-chunk-per-voxel layout read straight from the chunk bytes.

Expected arrays come from plain h5py reads, so the chunk path and the reference cannot share a bug.
Layouts the fast path cannot take (contiguous, filtered, other chunk shapes) must fall back to h5py
slabs and give the same array.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from llava_brain.nsd.betas import BetaSession

GRID_TZYX = (9, 11, 5, 6)  # trials, Z, Y, X: Z not a multiple of the slab reader's 8 planes


def _betas(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-32768, 32767, GRID_TZYX, dtype=np.int16, endpoint=True)


def _h5py_read(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["betas"][()].transpose(0, 3, 2, 1)


def _check_reader(path: Path, fast: bool) -> np.ndarray:
    """BetaSession.read() equals h5py's read (as T, X, Y, Z); `fast` says whether the chunk path applies."""
    expected = _h5py_read(path)
    with BetaSession(path) as f:
        assert (f._read_hdf5_chunks() is not None) == fast
        got = f.read()
        assert f.grid == expected.shape[1:] and f.num_trials == expected.shape[0]
    assert got.dtype == np.int16 and got.dtype.isnative
    np.testing.assert_array_equal(got, expected)
    return got


def _chunk_offsets(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        dset = f["betas"]
        _, _, y, x = dset.shape
        found = []
        dset.id.chunk_iter(lambda info: found.append(((info.chunk_offset[1] * y + info.chunk_offset[2]) * x
                                                      + info.chunk_offset[3], info.byte_offset)))  # fmt: skip
    return np.array([offset for _, offset in sorted(found)])


def test_chunk_reader_nsd_layout(tmp_path):
    """NSD's layout (one uncompressed chunk per voxel holding all trials) is read by the fast path exactly."""
    path = tmp_path / "nsd.hdf5"
    data = _betas()
    with h5py.File(path, "w") as f:
        f.create_dataset("betas", data=data, chunks=(GRID_TZYX[0], 1, 1, 1))
    got = _check_reader(path, fast=True)
    np.testing.assert_array_equal(got, data.transpose(0, 3, 2, 1))


@pytest.mark.parametrize("how", ["direct_chunks", "voxel_writes"])
def test_chunk_reader_shuffled_chunk_allocation(tmp_path, how):
    """Chunks allocated in random voxel order (file offsets not monotonic in voxel order) read exactly."""
    path = tmp_path / "shuffled.hdf5"
    data = _betas(1)
    t, z, y, x = data.shape
    order = np.random.default_rng(2).permutation(z * y * x)
    with h5py.File(path, "w") as f:
        dset = f.create_dataset("betas", shape=data.shape, dtype=np.int16, chunks=(t, 1, 1, 1))
        for voxel in order:
            k, j, i = np.unravel_index(voxel, (z, y, x))
            if how == "direct_chunks":
                dset.id.write_direct_chunk((0, k, j, i), np.ascontiguousarray(data[:, k, j, i]).tobytes())
            else:
                dset[:, k, j, i] = data[:, k, j, i]
    offsets = _chunk_offsets(path)
    assert len(offsets) == z * y * x and np.any(np.diff(offsets) < 0)  # really out of order
    _check_reader(path, fast=True)


@pytest.mark.parametrize("fillvalue", [None, -7])
def test_chunk_reader_unwritten_chunks_hold_the_fill_value(tmp_path, fillvalue):
    """Chunks never written (some in runs, some isolated) read as the dataset's fill value (default 0)."""
    path = tmp_path / "sparse.hdf5"
    data = _betas(3)
    t, z, y, x = data.shape
    rng = np.random.default_rng(4)
    written = np.flatnonzero(rng.random(z * y * x) < 0.6)
    written = np.setdiff1d(written, np.arange(40, 60))  # a long gap of unallocated chunks too
    kw = {} if fillvalue is None else {"fillvalue": fillvalue}
    with h5py.File(path, "w") as f:
        dset = f.create_dataset("betas", shape=data.shape, dtype=np.int16, chunks=(t, 1, 1, 1), **kw)
        for voxel in np.concatenate([written[: len(written) // 2], rng.permutation(written[len(written) // 2 :])]):
            k, j, i = np.unravel_index(voxel, (z, y, x))
            dset[:, k, j, i] = data[:, k, j, i]
    assert len(_chunk_offsets(path)) == len(written) < z * y * x
    got = _check_reader(path, fast=True)
    unwritten = np.ones(z * y * x, bool)
    unwritten[written] = False
    missing = unwritten.reshape(z, y, x).transpose(2, 1, 0)  # (X, Y, Z)
    assert np.all(got[:, missing] == (fillvalue or 0))


@pytest.mark.parametrize(
    "layout",
    [
        dict(chunks=None),  # contiguous
        dict(chunks=(GRID_TZYX[0], 1, 1, 1), compression="gzip"),
        dict(chunks=(GRID_TZYX[0], 1, 1, 1), shuffle=True),
        dict(chunks=(3, 2, 2, 2)),  # chunks that do not hold whole voxels
    ],
    ids=["contiguous", "gzip", "shuffle-filter", "other-chunks"],
)
def test_chunk_reader_falls_back_to_slabs(tmp_path, layout):
    """Layouts the chunk path cannot read byte-for-byte (unchunked, filtered, other chunk shapes) fall back
    to h5py slab reads and still give the same array."""
    path = tmp_path / "other.hdf5"
    data = _betas(5)
    with h5py.File(path, "w") as f:
        f.create_dataset("betas", data=data, **layout)
    got = _check_reader(path, fast=False)
    np.testing.assert_array_equal(got, data.transpose(0, 3, 2, 1))
