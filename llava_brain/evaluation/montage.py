"""A map over a brain volume as one PNG: axial slices side by side, the map in a red-to-yellow scale over grey.

Volumes are (X, Y, Z) in NSD's NIfTI order (x left -> right, y posterior -> anterior, z inferior -> superior).
Each axial slice (fixed z) is drawn with anterior up and the subject's left on the image's left, the
neurological convention; slices run from inferior (top-left) to superior. The background is the subject's
mean volume scaled to its 1st-99th percentile inside the brain; the map is drawn where its magnitude exceeds
`threshold` x its largest magnitude, with an opacity that grows with it. A signed map (an encoding pattern)
draws its negative values in a blue-to-cyan scale.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image


def _hot(t: np.ndarray) -> np.ndarray:
    """(…,) values in [0, 1] -> (…, 3) float RGB in [0, 1]: dark red -> red -> yellow (no white: it would read as
    the grey background's brightest voxels)."""
    return np.stack([np.clip(0.4 + 1.2 * t, 0, 1), np.clip(2 * t - 0.8, 0, 1), np.zeros_like(t)], axis=-1)


def _cold(t: np.ndarray) -> np.ndarray:
    """The negative half of a signed map: `_hot` with red and blue swapped (dark blue -> blue -> cyan)."""
    return _hot(t)[..., ::-1]


def montage(background: np.ndarray, overlay: np.ndarray, brain: np.ndarray, *, slices: int = 12,
            scale: int | None = None, threshold: float = 0.2) -> Image.Image:  # fmt: skip
    """An RGB image of up to `slices` evenly spaced axial slices through the brain.

    background, overlay: float (X, Y, Z); brain: bool (X, Y, Z) (nothing is drawn outside it).
    scale: pixels per voxel (default: slices about 160 pixels wide).
    """
    if background.shape != overlay.shape or overlay.shape != brain.shape:
        raise ValueError(f"shapes differ: background {background.shape}, map {overlay.shape}, brain {brain.shape}")
    zs = np.flatnonzero(brain.any(axis=(0, 1)))
    if len(zs) == 0:
        raise ValueError("the brain mask is empty")
    chosen = np.unique(np.linspace(zs[0], zs[-1], min(slices, len(zs))).round().astype(int))
    inside = background[brain]
    lo, hi = np.percentile(inside, [1, 99]) if inside.size else (0.0, 1.0)
    grey = np.clip((background - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    peak = float(np.abs(overlay).max())
    level = np.clip(np.abs(overlay) / peak, 0, 1) if peak > 0 else np.zeros_like(overlay)
    alpha = np.where(brain & (level > threshold), 0.35 + 0.65 * level, 0.0)[..., None]
    colour = np.where((overlay < 0)[..., None], _cold(level), _hot(level))
    rgb = (1 - alpha) * np.where(brain, grey, 0.0)[..., None] + alpha * colour
    scale = scale or max(1, round(160 / brain.shape[0]))
    tiles = [np.flipud(rgb[:, :, z].transpose(1, 0, 2)) for z in chosen]  # rows = y (anterior up), cols = x
    cols = min(len(tiles), 6)
    rows = math.ceil(len(tiles) / cols)
    h, w = tiles[0].shape[:2]
    sheet = np.zeros((rows * h, cols * w, 3))
    for k, tile in enumerate(tiles):
        r, c = divmod(k, cols)
        sheet[r * h : (r + 1) * h, c * w : (c + 1) * w] = tile
    image = Image.fromarray((sheet * 255).round().astype(np.uint8))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)
