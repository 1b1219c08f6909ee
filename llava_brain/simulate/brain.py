"""A simulated subject: anatomy (grid, brain mask, ROI atlases) and a voxel-wise response model.

Anatomy: the brain is an ellipsoid (with a smooth, subject-specific wobble) in the subject's own
grid; cortex is its outer shell. Voxel order follows NSD's NIfTI (LPI: x runs left -> right,
y posterior -> anterior, z inferior -> superior), so visual cortex sits at low y.
ROIs use NSD's convention: -1 not cortical, 0 cortical but unlabeled, 1..N labels.

Response (percent signal change) of voxel v to image i on one trial:

    beta = baseline_v + ncsnr_v * noise_sd_v * r_v(i) + noise_sd_v * eps + session_offset_v

r_v(i) has unit variance over images and mixes a retinotopic low-level term (a Gaussian
receptive field on a 16×16 thumbnail with voxel-specific colour tuning; strong in `early`)
with a semantic term (a smooth random linear read-out of shapes, colours, count, size and
background; strong in `ventral`/`lateral`/`parietal`; its layout is mostly shared by all subjects,
`SHARED_SEMANTIC`). eps mixes independent and spatially
smooth noise. ncsnr_v is the noise-ceiling SNR (signal sd / noise sd), 0.1–0.3 in visual
cortex as for good NSD voxels, ~0 elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

STREAMS = ("early", "midventral", "midlateral", "midparietal", "ventral", "lateral", "parietal")  # labels 1..7
# Weight of the low-level (retinotopic) term per streams label; the rest is semantic.
LOW_LEVEL_WEIGHT = {1: 1.0, 2: 0.6, 3: 0.6, 4: 0.6, 5: 0.15, 6: 0.25, 7: 0.35}
RF_GRID = 16
# The semantic read-outs share a layout across subjects, as category-selective cortex does: a template field
# over the normalised head coordinates, sampled at each subject's voxels, holds this share of their variance.
SHARED_SEMANTIC = 0.8
TEMPLATE_GRID, TEMPLATE_EXTENT, TEMPLATE_SIGMA = 32, 1.1, 2.8  # 2.8 template voxels ~ 2.5 subject voxels
# Regions are cones around the occipital pole (angle from the posterior axis, radians).
EARLY_POLE_ANGLE, MID_POLE_ANGLE, VISUAL_POLE_ANGLE, NSDGENERAL_POLE_ANGLE = (
    0.6,
    0.9,
    1.3,
    1.25,
)  # receptive fields live on a 16 x 16 thumbnail of the 425-px stimulus


def smooth_field(rng: np.random.Generator, grid: tuple[int, ...], sigma: float, channels: int = 0) -> np.ndarray:
    """Gaussian-smoothed white noise with unit variance per voxel, (*grid) or (*grid, channels)."""
    shape = (*grid, channels) if channels else grid
    field = rng.standard_normal(shape).astype(np.float32)
    sig = (sigma,) * len(grid) + ((0,) if channels else ())
    field = gaussian_filter(field, sig, mode="wrap")
    return field / field.std(axis=tuple(range(len(grid))), keepdims=True)


@dataclass
class Anatomy:
    grid: tuple[int, int, int]  # (X, Y, Z)
    affine: np.ndarray  # (4, 4)
    brain: np.ndarray  # bool (X, Y, Z)
    cortex: np.ndarray  # bool
    streams: np.ndarray  # int16, -1 / 0 / 1..7
    nsdgeneral: np.ndarray  # int16, -1 / 0 / 1
    coords: np.ndarray  # (X, Y, Z, 3) float, normalised ellipsoid coordinates in [-1, 1]

    def hemisphere(self, labels: np.ndarray, hemi: str) -> np.ndarray:
        """NSD's lh./rh. version of an ROI volume: -1 outside that hemisphere's cortex."""
        x = self.coords[..., 0]
        inside = self.cortex & ((x < 0) if hemi == "lh" else (x >= 0))
        return np.where(inside, labels, -1).astype(np.int16)


def build_anatomy(rng: np.random.Generator, grid: tuple[int, int, int], voxel_mm: float) -> Anatomy:
    grid = tuple(int(n) for n in grid)
    axes = [(np.arange(n) - (n - 1) / 2) / (0.46 * n) for n in grid]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).astype(np.float32)
    wobble = 0.06 * smooth_field(rng, grid, sigma=max(grid) / 6)  # subject-specific head shape
    radius = np.linalg.norm(coords, axis=-1) + wobble
    brain = radius <= 1.0
    cortex = brain & (radius >= 0.74)
    x, y, z = coords[..., 0], coords[..., 1], coords[..., 2]

    # Visual streams in the posterior cortex (low y): the occipital pole is early visual cortex,
    # the rest split by direction into ventral (inferior), lateral and parietal (superior) parts.
    streams = np.where(cortex, 0, -1).astype(np.int16)
    pole_angle = np.arccos(np.clip(-y / (np.linalg.norm(coords, axis=-1) + 1e-6), -1.0, 1.0))
    angle = np.arctan2(z, np.abs(x) + 1e-6)  # -pi/2 inferior .. +pi/2 superior
    posterior = cortex & (pole_angle < VISUAL_POLE_ANGLE)
    sector = np.where(angle < -0.35, 0, np.where(angle > 0.45, 2, 1))  # ventral, lateral, parietal
    label = np.where(pole_angle < MID_POLE_ANGLE, 2 + sector, 5 + sector)
    label = np.where(pole_angle < EARLY_POLE_ANGLE, 1, label)
    streams[posterior] = label[posterior]
    nsdgeneral = np.where(cortex, 0, -1).astype(np.int16)
    nsdgeneral[cortex & (pole_angle < NSDGENERAL_POLE_ANGLE)] = 1

    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    affine[:3, 3] = -(np.asarray(grid) - 1) / 2 * voxel_mm  # origin at the grid centre
    return Anatomy(grid, affine, brain, cortex, streams, nsdgeneral, coords)


@dataclass
class ResponseModel:
    """Per-voxel parameters of the response model, for the brain voxels only (C order over X, Y, Z)."""

    baseline: np.ndarray  # (V,) % signal change
    noise_sd: np.ndarray  # (V,) %
    ncsnr: np.ndarray  # (V,)
    low_weight: np.ndarray  # (V,) share of the low-level term
    rf: np.ndarray  # (V, RF_GRID*RF_GRID) receptive fields, rows sum to 1
    colour: np.ndarray  # (V, 3) colour tuning
    semantic: np.ndarray  # (V, F) semantic read-out
    noise_basis: np.ndarray  # (K, V) smooth spatial noise components


def template_field(rng: np.random.Generator, channels: int, sigma: float = TEMPLATE_SIGMA) -> np.ndarray:
    """(TEMPLATE_GRID,) * 3 + (channels,) smooth unit-variance fields over the normalised head coordinates
    [-TEMPLATE_EXTENT, TEMPLATE_EXTENT]^3: a functional layout every subject shares."""
    return smooth_field(rng, (TEMPLATE_GRID,) * 3, sigma=sigma, channels=channels)


def sample_template(template: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """(V, channels) trilinear samples of a template field at (V, 3) normalised coordinates."""
    from scipy.ndimage import map_coordinates

    index = (coords + TEMPLATE_EXTENT) / (2 * TEMPLATE_EXTENT) * (TEMPLATE_GRID - 1)
    return np.stack([map_coordinates(template[..., c], index.T, order=1, mode="nearest")
                     for c in range(template.shape[-1])], axis=1).astype(np.float32)  # fmt: skip


def build_response_model(
    rng: np.random.Generator,
    anat: Anatomy,
    num_semantic: int,
    snr_range=(0.1, 0.3),
    num_noise_components=16,
    shared_semantic: np.ndarray | None = None,
) -> ResponseModel:
    grid, brain = anat.grid, anat.brain
    visual = ((anat.streams > 0) | (anat.nsdgeneral > 0))[brain]
    labels = anat.streams[brain]
    x, y, z = (anat.coords[..., i][brain] for i in range(3))

    # Retinotopy: left hemisphere sees the right visual field; superior/inferior cortex sees the
    # lower/upper field; eccentricity grows with the angle from the occipital pole, and early
    # visual cortex maps the whole stimulus. Receptive fields widen up the hierarchy.
    pole_angle = np.arccos(np.clip(-y / (np.sqrt(x**2 + y**2 + z**2) + 1e-6), -1.0, 1.0))
    early = labels == 1
    eccentricity = np.clip(pole_angle / np.where(early, EARLY_POLE_ANGLE, VISUAL_POLE_ANGLE), 0.0, 1.0)
    polar = np.arctan2(z, np.abs(x) + 1e-6)
    centre_x = 0.5 + np.sign(-x + 1e-9) * 0.5 * eccentricity * np.cos(polar)
    centre_y = 0.5 + 0.5 * eccentricity * np.sin(-polar)
    hierarchy = np.where(early, 1.0, np.where(np.isin(labels, (2, 3, 4)), 2.0, 3.5))
    width = (0.06 + 0.10 * eccentricity) * hierarchy
    cells = (np.arange(RF_GRID) + 0.5) / RF_GRID
    dx = cells[None, None, :] - centre_x[:, None, None]  # (V, 1, RF_GRID) over columns
    dy = cells[None, :, None] - centre_y[:, None, None]  # (V, RF_GRID, 1) over rows
    rf = np.exp(-(dx**2 + dy**2) / (2 * width[:, None, None] ** 2)).reshape(len(x), -1)
    rf /= rf.sum(axis=1, keepdims=True)

    opponent = smooth_field(rng, grid, sigma=3.0, channels=3)[brain]
    colour = 1.0 / 3.0 + 0.5 * opponent / np.linalg.norm(opponent, axis=1, keepdims=True)
    semantic = smooth_field(rng, grid, sigma=2.5, channels=num_semantic)[brain]
    if shared_semantic is not None:
        common = sample_template(shared_semantic, anat.coords[brain])
        common /= common.std(axis=0, keepdims=True)
        semantic = np.sqrt(SHARED_SEMANTIC) * common + np.sqrt(1 - SHARED_SEMANTIC) * semantic
    low_weight = np.array([LOW_LEVEL_WEIGHT.get(int(v), 0.5) for v in labels], dtype=np.float32)

    lo, hi = snr_range
    snr_map = (0.5 + 0.5 * np.tanh(smooth_field(rng, grid, sigma=2.0)))[brain]  # smooth, in (0, 1)
    ncsnr = np.where(visual, lo + (hi - lo) * snr_map, 0.02 * snr_map).astype(np.float32)
    noise_sd = (1.2 + 0.8 * np.abs(smooth_field(rng, grid, sigma=2.0)[brain])).astype(np.float32)
    baseline = np.where(visual, 0.6, 0.1) * (1 + 0.5 * smooth_field(rng, grid, sigma=2.0)[brain])
    basis = np.stack([smooth_field(rng, grid, sigma=2.5)[brain] for _ in range(num_noise_components)])
    basis /= np.sqrt(num_noise_components)  # unit total variance per voxel on average
    return ResponseModel(baseline.astype(np.float32), noise_sd, ncsnr, low_weight, rf.astype(np.float32),
                         colour.astype(np.float32), semantic, basis.astype(np.float32))  # fmt: skip


def _standardise(a: np.ndarray) -> np.ndarray:
    return (a - a.mean(0)) / (a.std(0) + 1e-6)


def image_responses(model: ResponseModel, thumbs: np.ndarray, semantic: np.ndarray) -> np.ndarray:
    """(images, V) unit-variance signal r_v(i) from (images, 16, 16, 3) thumbnails and (images, F) features."""
    pixels = thumbs.reshape(len(thumbs), RF_GRID * RF_GRID, 3)
    # Visual cortex responds to local contrast, not to the absolute light level: remove each
    # image's mean colour before the receptive fields pool it.
    pixels = pixels - pixels.mean(axis=1, keepdims=True)
    # low[n, v] = sum_p rf[v, p] * sum_c colour[v, c] * pixels[n, p, c], one colour channel at a time so
    # memory stays (images, V) instead of (images, V, cells).
    low = sum((pixels[:, :, c] @ model.rf.T) * model.colour[:, c] for c in range(pixels.shape[2]))
    low = _standardise(low)
    high = _standardise(_standardise(semantic) @ model.semantic.T)
    w = model.low_weight
    return _standardise(np.sqrt(w) * low + np.sqrt(1 - w) * high).astype(np.float32)


def trial_betas(
    rng: np.random.Generator,
    model: ResponseModel,
    signal: np.ndarray,
    session_offset: np.ndarray,
    smooth_share: float = 0.05,
) -> np.ndarray:
    """(trials, V) percent signal change for trials whose unit signal rows are `signal` (trials, V)."""
    n, v = signal.shape
    white = rng.standard_normal((n, v), dtype=np.float32)
    smooth = rng.standard_normal((n, model.noise_basis.shape[0]), dtype=np.float32) @ model.noise_basis
    noise = np.sqrt(1 - smooth_share) * white + np.sqrt(smooth_share) * smooth
    return model.baseline + session_offset + model.noise_sd * (model.ncsnr * signal + noise)
