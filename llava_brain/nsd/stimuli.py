"""`nsd_stimuli.hdf5`: dataset `imgBrick`, uint8 (images, 425, 425, 3) RGB, row = 0-based nsdId."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llava_brain.errors import BadInputError, require_file

HDF5_DATASET = "imgBrick"


class NsdStimuli:
    """Random access to stimulus images without loading the 40 GB brick. Context manager."""

    def __init__(self, path: str | Path):
        import h5py

        self.path = require_file(path, "NSD stimuli nsd_stimuli.hdf5 with dataset 'imgBrick'")
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as err:
            raise BadInputError(self.path, f"expected an HDF5 file; h5py could not open it ({err})") from None
        if HDF5_DATASET not in self._h5:
            found = sorted(self._h5.keys())
            self.close()
            expected = f"expected dataset '/{HDF5_DATASET}' (images x H x W x 3 uint8)"
            raise BadInputError(self.path, f"{expected}; found {found}")
        self._dset = self._h5[HDF5_DATASET]
        shape, dtype = self._dset.shape, self._dset.dtype
        if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
            self.close()
            raise BadInputError(self.path, f"'{HDF5_DATASET}' must be uint8 (images, H, W, 3); found {dtype} {shape}")
        self.image_size = (int(shape[1]), int(shape[2]))

    def __len__(self) -> int:
        return int(self._dset.shape[0])

    def require_images(self, last_nsd_id: int, listed_in: str | Path) -> None:
        """The brick must hold nsdId `last_nsd_id` (the largest a design file lists): one line, not an IndexError."""
        if last_nsd_id >= len(self):
            raise BadInputError(self.path, f"imgBrick has {len(self)} images but {listed_in} lists nsdId {last_nsd_id}")

    def __getitem__(self, nsd_id: int) -> np.ndarray:
        """(H, W, 3) uint8 RGB of one image."""
        nsd_id = int(nsd_id)
        if not 0 <= nsd_id < len(self):
            raise IndexError(f"nsdId {nsd_id} out of range 0..{len(self) - 1} in {self.path}")
        return self._dset[nsd_id]

    def read(self, nsd_ids) -> np.ndarray:
        """(n, H, W, 3) uint8 for a list of nsdIds, in the order given (reads in sorted order)."""
        nsd_ids = np.asarray(nsd_ids, dtype=np.int64)
        unique, inverse = np.unique(nsd_ids, return_inverse=True)
        if unique.size and (unique[0] < 0 or unique[-1] >= len(self)):
            raise IndexError(f"nsdIds must be in 0..{len(self) - 1} for {self.path}")
        out = np.empty((unique.size, *self.image_size, 3), np.uint8)
        for row, nsd_id in enumerate(unique):  # one chunk per image; h5py's fancy indexing is ~30x slower
            out[row] = self._dset[nsd_id]
        return out[inverse]

    def close(self) -> None:
        if getattr(self, "_h5", None) is not None:
            self._h5.close()
            self._h5 = None

    def __enter__(self) -> NsdStimuli:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
