"""Volume geometry shared by the data and the model: one common grid, and the padding that cuts it into patches.

Every subject's whole-brain volume (X, Y, Z in NSD's NIfTI order) is resized to one common grid
(`resize_to_grid`); masks are resized the same way and OR-ed over subjects (`union_mask_on_grid`).
The ViT3D then zero-pads each axis at its *end* to a multiple of the patch size (`pad_to_patches`,
`padded_patch_grid`) before cutting it into patches. `llava_brain.data` (which resizes volumes while
loading them) and `llava_brain.model` (which pads and patches them) both import this module; the
data never imports the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def resize_to_grid(volumes: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Trilinear resize of (batch, X, Y, Z) volumes to (batch, *grid) (align_corners=False, as in the paper).

    Float volumes keep their dtype (the interpolation runs in float32: float16 is not supported on every CPU).
    Bool masks are resized as float and thresholded at > 0, so that every output voxel touched by a mask voxel
    is in the mask (growing rather than shrinking a region). Trilinear sampling reads only the two nearest
    voxels per axis, which can skip a voxel when an axis shrinks by more than 2x; an adaptive max-pool is
    OR-ed in so that every mask voxel still lands on at least one output voxel. Equal grids return the input.
    """
    grid = tuple(int(n) for n in grid)
    if volumes.ndim != 4:
        raise ValueError(f"volumes must be (batch, X, Y, Z), got shape {tuple(volumes.shape)}")
    if tuple(volumes.shape[1:]) == grid:
        return volumes
    as_float = volumes[:, None].float()  # (batch, 1, X, Y, Z): interpolate wants a channel axis
    resized = F.interpolate(as_float, size=grid, mode="trilinear", align_corners=False)[:, 0]
    if volumes.dtype == torch.bool:
        pooled = F.adaptive_max_pool3d(as_float, grid)[:, 0]
        return (resized > 0) | (pooled > 0)
    return resized.to(volumes.dtype)


def union_mask_on_grid(masks: Iterable[np.ndarray | torch.Tensor], grid: Sequence[int]) -> np.ndarray:
    """OR of several subjects' bool (X, Y, Z) masks, each first resized to `grid`; returns bool (*grid)."""
    union = torch.zeros(tuple(grid), dtype=torch.bool)
    for mask in masks:
        union |= resize_to_grid(torch.as_tensor(np.asarray(mask, dtype=bool))[None], grid)[0]
    return union.numpy()


def padded_patch_grid(grid: Sequence[int], patch_size: int) -> tuple[int, int, int]:
    """Number of patches along X, Y, Z once each axis is zero-padded up to a multiple of `patch_size`."""
    if len(grid) != 3 or patch_size < 1:
        raise ValueError(f"need a 3-axis grid and a positive patch size, got grid={tuple(grid)}, patch={patch_size}")
    return tuple(math.ceil(int(n) / patch_size) for n in grid)


def pad_to_patches(volumes: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Zero-pad (batch, X, Y, Z) at the end of each axis to a multiple of `patch_size`.

    Padding at the end (not centred) keeps voxel (0, 0, 0) at patch corner (0, 0, 0), so the patch index of a
    voxel is simply `voxel // patch_size` and the model's active patches need no offsets.
    """
    nx, ny, nz = padded_patch_grid(volumes.shape[-3:], patch_size)
    x, y, z = volumes.shape[-3:]
    # F.pad lists (left, right) pairs starting from the last axis.
    return F.pad(volumes, (0, nz * patch_size - z, 0, ny * patch_size - y, 0, nx * patch_size - x))
