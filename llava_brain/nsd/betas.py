"""Single-trial betas of one NSD session, from HDF5 or NIfTI, one session in memory at a time.

On disk (docs/nsd_formats.md §1.3):
- `betas_sessionNN.hdf5`: dataset `/betas`, int16, h5py shape **(trials, Z, Y, X)** (MATLAB wrote
  X×Y×Z×trials column-major), uncompressed, one chunk per voxel holding all its trials.
- `betas_sessionNN.nii.gz`: int16, nibabel shape **(X, Y, Z, trials)**.
Values are round(percent signal change × 300); voxels outside the brain mask are 0.

This reader returns both formats in one orientation, the NIfTI/ROI grid: (trials, X, Y, Z), and
flattens masks in C order over (X, Y, Z), so HDF5 and NIfTI inputs give identical arrays.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from llava_brain.errors import BadInputError, require_file
from llava_brain.nsd.constants import BETA_SCALE

HDF5_DATASET = "betas"
MAX_GAP_BYTES = 1 << 20  # read through gaps up to 1 MB between chunks rather than issue another call


def betas_format(path: str | Path) -> str:
    name = Path(path).name
    if name.endswith(".hdf5") or name.endswith(".h5"):
        return "hdf5"
    if name.endswith(".nii.gz") or name.endswith(".nii"):
        return "nifti"
    raise BadInputError(path, "expected a betas file ending in .hdf5 or .nii.gz")


def to_percent_signal_change(raw: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """int16 NSD betas -> float32 percent signal change (divide by 300)."""
    out = np.empty(raw.shape, dtype=np.float32) if out is None else out
    np.multiply(raw, np.float32(1.0 / BETA_SCALE), out=out, casting="unsafe")
    return out


class BetaSession:
    """One `betas_sessionNN` file. Opening checks dataset name, rank and dtype without reading data.

    Use as a context manager, or call `close()`.
    """

    def __init__(self, path: str | Path, expect_grid: tuple[int, int, int] | None = None):
        self.path = require_file(path, "an NSD single-trial betas file (betas_sessionNN.hdf5 or .nii.gz)")
        self.format = betas_format(self.path)
        self._h5 = None
        self._nifti = None
        if self.format == "hdf5":
            self._open_hdf5()
        else:
            self._open_nifti()
        if expect_grid is not None and tuple(expect_grid) != self.grid:
            self.close()
            raise BadInputError(
                self.path, f"betas grid (X, Y, Z) must be {tuple(expect_grid)} like the ROI volumes; found {self.grid}"
            )

    def _open_hdf5(self) -> None:
        import h5py

        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as err:
            raise BadInputError(self.path, f"expected an HDF5 file; h5py could not open it ({err})") from None
        if HDF5_DATASET not in self._h5:
            found = sorted(self._h5.keys())
            self.close()
            expected = f"expected dataset '/{HDF5_DATASET}' (int16, trials x Z x Y x X)"
            raise BadInputError(self.path, f"{expected}; found {found}")
        dset = self._h5[HDF5_DATASET]
        self._check(dset.shape, dset.dtype, "trials x Z x Y x X")
        trials, z, y, x = dset.shape
        self.num_trials, self.grid = int(trials), (int(x), int(y), int(z))

    def _open_nifti(self) -> None:
        import nibabel as nib

        try:
            self._nifti = nib.load(self.path)
        except Exception as err:  # nibabel raises several types for corrupt files
            raise BadInputError(self.path, f"expected a NIfTI file; nibabel could not read it ({err})") from None
        self._check(self._nifti.shape, self._nifti.get_data_dtype(), "X x Y x Z x trials")
        x, y, z, trials = self._nifti.shape
        self.num_trials, self.grid = int(trials), (int(x), int(y), int(z))
        self.affine = self._nifti.affine

    def _check(self, shape: tuple, dtype: np.dtype, axes: str) -> None:
        if len(shape) != 4:
            self.close()
            raise BadInputError(self.path, f"betas must be 4-D ({axes}); found shape {tuple(shape)}")
        if np.dtype(dtype) != np.int16:
            self.close()
            raise BadInputError(self.path, f"betas must be int16 (percent signal change x 300); found {dtype}")

    def read(self) -> np.ndarray:
        """All trials as int16 (trials, X, Y, Z): a transposed view of the array as read (no copy).

        Its memory layout follows the file: voxel-major (Z, Y, X, trials) for NSD's HDF5 chunks,
        (X, Y, Z, trials) for NIfTI. Consumers that need trial-major data copy in blocks.
        """
        if self.format == "hdf5":
            voxel_major = self._read_hdf5_chunks()
            if voxel_major is not None:
                return voxel_major.transpose(3, 2, 1, 0)
            return self._read_hdf5_slabs().transpose(0, 3, 2, 1)
        try:
            xyzt = np.asanyarray(self._nifti.dataobj.get_unscaled())  # int16, ignore any scl_slope
        except (EOFError, OSError, ValueError, zlib.error) as err:
            raise BadInputError(
                self.path, f"truncated or corrupt NIfTI betas; could not read the data ({err})"
            ) from None
        return np.moveaxis(xyzt, -1, 0)

    def _read_hdf5_chunks(self) -> np.ndarray | None:
        """(Z, Y, X, T) int16 straight from the file's chunk bytes, or None if the layout does not allow it.

        NSD stores one uncompressed chunk per voxel holding all its trials (T contiguous int16).
        h5py pays ~10 µs of bookkeeping per chunk (~7 s for NSD's 700k chunks, docs/nsd_formats.md §6);
        instead, list every chunk's file offset once (HDF5's chunk iterator, ~1 µs per chunk) and
        read runs of consecutive chunks with plain file reads straight into the output buffer.
        """
        dset = self._h5[HDF5_DATASET]
        trials, z, y, x = dset.shape
        dcpl = dset.id.get_create_plist()
        chunk_bytes = trials * dset.dtype.itemsize
        if dset.chunks != (trials, 1, 1, 1) or dcpl.get_nfilters() or not hasattr(dset.id, "chunk_iter"):
            return None
        num_voxels = z * y * x
        offsets = np.full(num_voxels, -1, np.int64)  # file offset of each voxel's chunk, C order over (Z, Y, X)
        sizes_ok = True

        def visit(info) -> None:
            nonlocal sizes_ok
            _, cz, cy, cx = info.chunk_offset
            offsets[(cz * y + cy) * x + cx] = info.byte_offset
            sizes_ok &= info.size == chunk_bytes

        dset.id.chunk_iter(visit)
        if not sizes_ok:
            return None
        fill = dset.fillvalue if dset.fillvalue is not None else 0
        out = np.empty((z, y, x, trials), dtype=dset.dtype)
        flat = out.reshape(num_voxels, trials)
        allocated = offsets >= 0
        if not allocated.all():
            flat[~allocated] = fill  # chunks never written hold the fill value
        self._gather_chunks(flat, offsets, chunk_bytes)
        return out.astype(out.dtype.newbyteorder("="), copy=False)

    def _gather_chunks(self, flat: np.ndarray, offsets: np.ndarray, chunk_bytes: int) -> None:
        """Fill rows `flat[v]` from `chunk_bytes` at file offset `offsets[v]` (rows with offset -1 are skipped).

        Chunks are visited in file order and read with `preadv`: one system call covers up to
        IOV_MAX destinations, reading runs of file-adjacent chunks straight into their rows and
        small gaps between them (HDF5's B-tree nodes, ~1 per 22 NSD chunks) into a scratch buffer.
        So the file is read nearly sequentially at page-cache/disk speed.
        """
        voxels = np.flatnonzero(offsets >= 0)
        voxels = voxels[np.argsort(offsets[voxels], kind="stable")]
        starts = offsets[voxels]
        # A run: consecutive voxels whose chunks are back to back in the file -> one destination.
        new_run = np.ones(len(voxels), bool)
        new_run[1:] = (np.diff(voxels) != 1) | (np.diff(starts) != chunk_bytes)
        run_first = np.flatnonzero(new_run)
        run_length = np.diff(np.append(run_first, len(voxels)))
        scratch = bytearray(MAX_GAP_BYTES)
        max_iov = min(os.sysconf("SC_IOV_MAX"), 1024) - 1
        rows = memoryview(flat.reshape(-1).view(np.uint8))
        row_bytes = flat.shape[1] * flat.itemsize
        fd = os.open(self.path, os.O_RDONLY)
        try:
            i = 0
            while i < len(run_first):
                # One preadv: runs separated by gaps small enough to read through.
                position = int(starts[run_first[i]])
                buffers, cursor, expected = [], position, 0
                while i < len(run_first) and len(buffers) < max_iov:
                    start = int(starts[run_first[i]])
                    gap = start - cursor
                    if gap > MAX_GAP_BYTES or (gap and len(buffers) + 1 >= max_iov):
                        break
                    if gap:
                        buffers.append(memoryview(scratch)[:gap])
                    first, length = int(voxels[run_first[i]]), int(run_length[i])
                    buffers.append(rows[first * row_bytes : (first + length) * row_bytes])
                    expected += gap + length * row_bytes
                    cursor = start + length * row_bytes
                    i += 1
                self._preadv_exact(fd, buffers, position, expected)
        finally:
            os.close(fd)

    def _preadv_exact(self, fd: int, buffers: list[memoryview], position: int, expected: int) -> None:
        done = os.preadv(fd, buffers, position)
        while done < expected:  # rare short read: finish buffer by buffer
            skip = done
            rest = []
            for buf in buffers:
                if skip >= len(buf):
                    skip -= len(buf)
                    continue
                rest.append(buf[skip:])
                skip = 0
            got = os.preadv(fd, rest, position + done)
            if not got:
                raise BadInputError(self.path, f"truncated HDF5 file: chunk data at byte {position + done} ends early")
            done += got

    def _read_hdf5_slabs(self, planes: int = 8) -> np.ndarray:
        """(T, Z, Y, X) int16 via h5py in slabs of all trials x a few Z planes (any chunk layout)."""
        dset = self._h5[HDF5_DATASET]
        out = np.empty(dset.shape, dtype=dset.dtype.newbyteorder("="))
        for z0 in range(0, dset.shape[1], planes):
            dset.read_direct(out, np.s_[:, z0 : z0 + planes], np.s_[:, z0 : z0 + planes])
        return out

    def read_voxels(self, mask: np.ndarray) -> np.ndarray:
        """(trials, voxels) float32 percent signal change of the voxels where `mask` (X, Y, Z) is True.

        Voxels are ordered C-order over (X, Y, Z), the same for both formats.
        """
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != self.grid:
            raise BadInputError(self.path, f"mask grid {mask.shape} does not match the betas grid {self.grid}")
        x, y, z = np.nonzero(mask)
        raw = self.read()[:, x, y, z]  # fancy indexing on the (T, X, Y, Z) view copies only the masked voxels
        return to_percent_signal_change(raw)

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __enter__(self) -> BetaSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
