"""The files of a located concept map (tools/evaluate/locate_concepts.py): folder names, the NIfTI volume on the
subject's grid with its affine, the slice montage and the JSON summary, and the subject-grid volumes the maps
are computed from. The method itself is in `concepts.py`."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np

from llava_brain.io import write_bytes, write_json


def slug(concept: str) -> str:
    """A folder name for a concept: lower case, runs of other characters as '_'."""
    return re.sub(r"[^a-z0-9]+", "_", concept.lower()).strip("_") or "concept"


def write_map(folder: Path, name: str, volume: np.ndarray, info: dict, subject_data: dict, top: int) -> None:
    """<name>.nii.gz, <name>.png and <name>.json of one map on the subject's grid."""
    import nibabel as nib

    from llava_brain.evaluation.concepts import roi_shares, top_voxels
    from llava_brain.evaluation.montage import montage

    affine = subject_data["affine"]
    image = nib.Nifti1Image(volume.astype(np.float32), affine)
    image.header.set_xyzt_units("mm")
    write_bytes(folder / f"{name}.nii.gz", gzip.compress(image.to_bytes(), compresslevel=6, mtime=0))
    picture = montage(subject_data["mean"], volume, subject_data["brain"])
    picture.save(folder / f"{name}.png")
    write_json(folder / f"{name}.json", {**info, "top_voxels": top_voxels(volume, affine, top),
                                         "roi_share": roi_shares(volume, subject_data["rois"])})  # fmt: skip


def subject_volumes(betas, samples) -> np.ndarray:
    """(n, X, Y, Z) float32 on the subject's grid: each sample's rows averaged."""
    return np.stack([np.asarray(betas[list(s.rows)], dtype=np.float32).mean(axis=0) for s in samples])
