"""ROI and other 3-D volumes of `nsddata/ppdata/subjXX/func1pt8mm/` (NIfTI, X × Y × Z).

ROI values (docs/nsd_formats.md §1.8): -1 = not a cortical voxel (of that hemisphere), 0 = cortical
but unlabeled, 1..N = label index of the atlas (names in the atlas's `.mgz.ctab`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llava_brain.errors import BadInputError, require_file
from llava_brain.layout import NsdTree
from llava_brain.nsd.constants import ROI_LABELS


@dataclass(frozen=True)
class Volume:
    path: Path
    data: np.ndarray  # (X, Y, Z)
    affine: np.ndarray  # (4, 4) voxel -> scanner mm

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.data.shape)


def read_volume(path: str | Path, what: str = "a 3-D NIfTI volume", expect_grid=None) -> Volume:
    import nibabel as nib

    path = require_file(path, what)
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises several types for corrupt files
        raise BadInputError(path, f"expected {what}; nibabel could not read it ({err})") from None
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise BadInputError(path, f"expected {what} (X x Y x Z); found shape {data.shape}")
    if expect_grid is not None and tuple(expect_grid) != data.shape:
        raise BadInputError(path, f"grid (X, Y, Z) must be {tuple(expect_grid)} like the betas; found {data.shape}")
    return Volume(path, data, np.asarray(img.affine, dtype=np.float64))


def read_roi(path: str | Path, expect_grid=None) -> Volume:
    """An ROI volume with integer labels >= -1, as int16 (X, Y, Z)."""
    vol = read_volume(path, "an NSD ROI volume (X x Y x Z, values -1/0/labels)", expect_grid)
    data = vol.data
    if not np.all(np.isfinite(data)) or not np.array_equal(np.round(data), data):
        raise BadInputError(path, "ROI values must be integers (-1 non-cortical, 0 unlabeled, 1..N labels)")
    if data.min() < -1:
        raise BadInputError(path, f"ROI values must be >= -1 (-1 non-cortical, 0 unlabeled); found {data.min()}")
    return Volume(vol.path, data.astype(np.int16), vol.affine)


def read_ctab(path: str | Path) -> dict[int, str]:
    """FreeSurfer colour table: lines 'index name r g b a' -> {index: name} (index 0 'Unknown' dropped)."""
    path = require_file(path, "a FreeSurfer .ctab label table")
    labels = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) < 2 or not parts[0].lstrip("-").isdigit():
            raise BadInputError(path, f"line {lineno}: expected 'index name ...'; found {line!r}")
        if int(parts[0]) > 0:
            labels[int(parts[0])] = parts[1]
    return labels


def atlas_label_names(tree: NsdTree, atlas: str) -> dict[int, str]:
    """Label names of an atlas: its `.ctab` when the tree has one, else NSD's known tables."""
    ctab = tree.roi_ctab(atlas)
    if ctab.is_file():
        return read_ctab(ctab)
    if atlas in ROI_LABELS:
        return dict(ROI_LABELS[atlas])
    raise BadInputError(ctab, f"missing; needed for the label names of atlas '{atlas}'")


def available_atlases(tree: NsdTree, subject: int) -> list[str]:
    """Whole-brain atlases present in a subject's roi/ folder (hemisphere files lh./rh. excluded)."""
    folder = tree.roi_dir(subject)
    names = [p.name[: -len(".nii.gz")] for p in folder.glob("*.nii.gz")] if folder.is_dir() else []
    return sorted(n for n in names if not n.startswith(("lh.", "rh.")))


def area_masks(tree: NsdTree, subject: int, atlases: list[str], expect_grid=None) -> dict[str, np.ndarray]:
    """Boolean (X, Y, Z) masks by area name.

    A single-label atlas is one area named after the atlas (`nsdgeneral`); every label of a
    multi-label atlas is its own area named by its label (`streams` -> `early`, `ventral`, ...).
    """
    masks: dict[str, np.ndarray] = {}
    for atlas in atlases:
        roi = read_roi(tree.roi(subject, atlas), expect_grid)
        names = atlas_label_names(tree, atlas)
        if len(names) == 1:
            masks[atlas] = roi.data > 0
            continue
        for label, name in names.items():
            if name in masks:
                raise BadInputError(roi.path, f"area name '{name}' of atlas '{atlas}' is already used by another atlas")
            masks[name] = roi.data == label
    return masks
