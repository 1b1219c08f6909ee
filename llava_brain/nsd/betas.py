"""Single-trial betas of one NSD session, from HDF5 or NIfTI, one session in memory at a time.

On disk (NSD_FORMATS.md §1.3):
- `betas_sessionNN.hdf5`: dataset `/betas`, int16, h5py shape **(trials, Z, Y, X)** (MATLAB wrote
  X×Y×Z×trials column-major), uncompressed, one chunk per voxel holding all its trials.
- `betas_sessionNN.nii.gz`: int16, nibabel shape **(X, Y, Z, trials)**.
Values are round(percent signal change × 300); voxels outside the brain mask are 0.

This reader returns both formats in one orientation, the NIfTI/ROI grid: (trials, X, Y, Z), and
flattens masks in C order over (X, Y, Z), so HDF5 and NIfTI inputs give identical arrays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llava_brain.errors import BadInputError, require_file
from llava_brain.nsd.constants import BETA_SCALE

HDF5_DATASET = "betas"


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
        """All trials as int16 (trials, X, Y, Z). A transposed view of the on-disk array (no copy)."""
        if self.format == "hdf5":
            zyx = self._h5[HDF5_DATASET][()]  # (T, Z, Y, X): whole-session read; never stream by trial blocks
            return zyx.transpose(0, 3, 2, 1)
        xyzt = np.asanyarray(self._nifti.dataobj.get_unscaled())  # int16, ignore any scl_slope
        return np.moveaxis(xyzt, -1, 0)

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
