"""The eight reconstruction metrics of Table 2 (MindEye / Brain-Diffuser), their protocols, and the resizing.

Low level, on pixels (pair i is recon i against stimulus i; images are float (3, H, W) in [0, 1]):

- `pixcorr`: Pearson r of all RGB pixel values of a pair (425² in both protocols), mean over pairs;
- `ssim`: skimage `structural_similarity` of the grey images (`rgb2gray`), Gaussian weights with
  sigma 1.5, `use_sample_covariance=False`, data range 1, mean over pairs.

High level, on network features (`feature_nets`), from the correlation matrix
r[i, j] = Pearson(features of stimulus i, features of recon j) (`correlation_matrix`):

- `two_way_identification`: AlexNet(2), AlexNet(5), InceptionV3, CLIP; for each recon j the share of the
  N−1 other stimuli i whose r[i, j] is below its own r[j, j]; mean over j; chance 0.5. Stored as a fraction
  (the paper prints percent). A tie (|r[i, j] − r[j, j]| <= TIE_TOLERANCE, or an undefined correlation of a
  constant feature vector) counts as half a success (`ties="half"`), so degenerate features score chance,
  not 0; `ties="loss"` is the published scripts' strict `<` (a tie counts as a failure);
- `correlation_distance`: EffNet-B, SwAV; mean over pairs of 1 − r[i, i] (scipy's `correlation`); lower
  is better.

The shuffled control pairs recon j with stimulus p[j] (`controls.derangement`): its correlation matrix is
r[p, :], so both controls come from the same matrix (`shuffled_rows`).

Protocols (`PROTOCOLS`): "braindiffuser" (the paper's) reproduces Brain-Diffuser's scripts: the reconstruction is
resized to 425² with PIL's default (bicubic, on 8-bit values, as `Image.resize((425, 425))`) for PixCorr/SSIM
against the 425² stimulus, and every network gets each original resized by PIL bilinear straight to 224²
(`T.functional.resize(img, (224, 224))` on a PIL image; Inception included, as eval_extract_features.py
does). "mindeye" reproduces MindEye's notebooks: both images first resized to 256² (its stored images), then
torchvision bilinear resizes on float tensors to 425² for PixCorr/SSIM and to 256 AlexNet, 342 Inception,
224 SwAV, 255 EffNet. CLIP always gets its model's own input size (`config.image_size`: 224 for ViT-L/14, as
in both). Each protocol is a `Protocol` (round trip, sizes, resampling), so mindeye on the originals equals
its own tables applied to images that were resized to 256² beforehand: the round trip is its only extra step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import torch

PIXEL_METRICS = ("pixcorr", "ssim")
IDENTIFICATION_METRICS = ("alexnet2", "alexnet5", "inceptionv3", "clip")
DISTANCE_METRICS = ("effnet", "swav")
METRICS = PIXEL_METRICS + IDENTIFICATION_METRICS + DISTANCE_METRICS  # the paper's column order
LOWER_IS_BETTER = frozenset(DISTANCE_METRICS)
PIXEL_SIZE = 425  # NSD's stimulus side; PixCorr/SSIM are computed at 425²
MINDEYE_ROUND_TRIP = 256
TIE_TOLERANCE = 1e-12  # correlations (float64) this close count as equal in two-way identification
_GRAM_ELEMENTS = 2**24  # float64 block size for correlation_matrix (128 MB)


RESAMPLING = ("bilinear", "pil_bilinear", "pil_bicubic")


@dataclass(frozen=True)
class Protocol:
    """How images are resized before scoring.

    round_trip: side both images are resized to first (None: the originals are used);
    input_sizes: {network: side} of the square network inputs (a network missing here uses its own size);
    pixel_resampling / network_resampling: `resize` methods for the 425² pixel images and the network inputs.
    """

    name: str
    round_trip: int | None
    input_sizes: Mapping[str, int] = field(default_factory=dict)
    pixel_resampling: str = "bilinear"
    network_resampling: str = "bilinear"
    pixel_size: int = PIXEL_SIZE

    def input_size(self, network: str, own: int) -> int:
        return int(self.input_sizes.get(network, own))


_BRAINDIFFUSER_SIZES = MappingProxyType({"alexnet": 224, "inceptionv3": 224, "effnet": 224, "swav": 224})
_MINDEYE_SIZES = MappingProxyType({"alexnet": 256, "inceptionv3": 342, "effnet": 255, "swav": 224})
PROTOCOLS = {
    "braindiffuser": Protocol("braindiffuser", None, _BRAINDIFFUSER_SIZES, "pil_bicubic", "pil_bilinear"),
    "mindeye": Protocol("mindeye", MINDEYE_ROUND_TRIP, _MINDEYE_SIZES, "bilinear", "bilinear"),
}
DEFAULT_PROTOCOL = "braindiffuser"


def resize(image: torch.Tensor, size: int, resampling: str = "bilinear") -> torch.Tensor:
    """Square resize of a float image (3, H, W) in [0, 1] to (3, size, size); an image already that size is
    returned unchanged.

    bilinear: torchvision's antialiased bilinear on the float values (MindEye's `transforms.Resize`; weights are
    non-negative, so values stay in [0, 1]; a batch (..., 3, H, W) works too). pil_bilinear / pil_bicubic:
    PIL's `Image.resize` on the 8-bit image (values rounded to k/255 first: exact for images read from PNGs),
    and the 8-bit result, as Brain-Diffuser's scripts compute it.
    """
    if tuple(image.shape[-2:]) == (size, size):
        return image
    if resampling == "bilinear":
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        return F.resize(image, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    if resampling not in RESAMPLING:
        raise ValueError(f"resampling must be one of {RESAMPLING}, got {resampling!r}")
    from PIL import Image

    pixels = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    method = Image.Resampling.BICUBIC if resampling == "pil_bicubic" else Image.Resampling.BILINEAR
    out = np.asarray(Image.fromarray(pixels).resize((size, size), method))
    return torch.from_numpy(out.copy()).permute(2, 0, 1).to(torch.float32) / 255.0


def round_trip(image: torch.Tensor, protocol: Protocol) -> torch.Tensor:
    """The protocol's first step: the image itself (braindiffuser) or resized to 256² (mindeye, bilinear)."""
    return image if protocol.round_trip is None else resize(image, protocol.round_trip)


# Pixel metrics -----------------------------------------------------------------------------------


def _as_float64(x) -> torch.Tensor:
    if not torch.is_tensor(x):
        x = torch.as_tensor(np.asarray(x))
    return x.detach().cpu().to(torch.float64)


def pixcorr_per_image(a, b) -> np.ndarray:
    """Pearson r of the flattened values of each pair (a[i], b[i]); a, b: (n, ...) arrays or tensors of one shape
    (any layout and value range). A constant image has no defined correlation; it scores 0 (no information),
    never NaN, so one blank reconstruction cannot void the mean."""
    a, b = _as_float64(a).flatten(1), _as_float64(b).flatten(1)
    if a.shape != b.shape:
        raise ValueError(f"pixcorr needs arrays of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    norms = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(norms > 0, (a * b).sum(1) / norms.clamp_min(1e-300), 0.0).numpy()


def pixcorr(a, b) -> float:
    """MindEye's PixCorr: mean over images of the Pearson correlation of their flattened pixels (see
    `pixcorr_per_image`)."""
    return float(np.mean(pixcorr_per_image(a, b)))


def ssim_per_image(a, b) -> np.ndarray:
    """SSIM of each pair of RGB images a[i], b[i] ((n, 3, H, W) in [0, 1]) as Brain-Diffuser and MindEye
    compute it: grey (skimage `rgb2gray`), Gaussian weights, sigma 1.5, population covariance, data range 1."""
    from skimage.color import rgb2gray
    from skimage.metrics import structural_similarity

    a, b = _as_float64(a), _as_float64(b)
    if a.shape != b.shape or a.ndim != 4 or a.shape[1] != 3:
        raise ValueError(f"ssim needs two (n, 3, H, W) arrays of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    scores = []
    for x, y in zip(a.permute(0, 2, 3, 1).numpy(), b.permute(0, 2, 3, 1).numpy(), strict=True):
        scores.append(
            structural_similarity(
                rgb2gray(x), rgb2gray(y), gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
            )
        )
    return np.asarray(scores, dtype=np.float64)


def ssim(a, b) -> float:
    """Mean SSIM over pairs (see `ssim_per_image`)."""
    return float(np.mean(ssim_per_image(a, b)))


# Feature metrics ---------------------------------------------------------------------------------


def correlation_matrix(real, recon) -> np.ndarray:
    """r[i, j] = Pearson correlation of real[i] and recon[j] (rows flattened), float64, (N_real, N_recon).

    Computed in float64 over blocks of feature columns (features of AlexNet's early layers have ~10^5 values
    per image), so the float32 inputs are never copied whole. A constant row gives NaN correlations.
    """
    real = np.asarray(real).reshape(len(real), -1)
    recon = np.asarray(recon).reshape(len(recon), -1)
    if real.shape[1] != recon.shape[1]:
        raise ValueError(f"features of different sizes: {real.shape} and {recon.shape}")
    mean_a, mean_b = real.mean(1, dtype=np.float64), recon.mean(1, dtype=np.float64)
    gram = np.zeros((len(real), len(recon)))
    norm_a, norm_b = np.zeros(len(real)), np.zeros(len(recon))
    step = max(1, _GRAM_ELEMENTS // max(len(real), len(recon)))
    for start in range(0, real.shape[1], step):
        a = real[:, start : start + step].astype(np.float64) - mean_a[:, None]
        b = recon[:, start : start + step].astype(np.float64) - mean_b[:, None]
        gram += a @ b.T
        norm_a += np.einsum("ij,ij->i", a, a)
        norm_b += np.einsum("ij,ij->i", b, b)
    with np.errstate(divide="ignore", invalid="ignore"):
        return gram / np.sqrt(np.outer(norm_a, norm_b))


def two_way_scores(r: np.ndarray, ties: str = "half") -> np.ndarray:
    """Per-reconstruction two-way identification from r[i, j] = corr(real i, recon j) (N, N), N >= 2.

    Score of recon j: (#{i != j: r[i, j] < r[j, j]} + w · #{i != j: tie}) / (N − 1), w = 0.5 for
    ties="half", 0 for ties="loss". A tie is |r[i, j] − r[j, j]| <= TIE_TOLERANCE or either value NaN.
    """
    if ties not in ("half", "loss"):
        raise ValueError(f"ties must be 'half' or 'loss', got {ties!r}")
    r = np.asarray(r, dtype=np.float64)
    n = len(r)
    if r.shape != (n, n) or n < 2:
        raise ValueError(f"two-way identification needs a square matrix of N >= 2, got {r.shape}")
    own = np.diag(r)[None, :]
    undefined = np.isnan(r) | np.isnan(own)
    tie = undefined | (np.abs(r - own) <= TIE_TOLERANCE)
    lower = (r < own) & ~tie
    off = ~np.eye(n, dtype=bool)
    weight = 0.5 if ties == "half" else 0.0
    return ((lower & off).sum(0) + weight * (tie & off).sum(0)) / (n - 1)


def two_way_identification(real, recon, ties: str = "half") -> float:
    """Mean two-way identification of recon[j] against real[j] among all N real rows (chance 0.5)."""
    return float(np.mean(two_way_scores(correlation_matrix(real, recon), ties)))


def correlation_distance(real, recon) -> float:
    """Mean over pairs of 1 − Pearson r(real[i], recon[i]) (scipy.spatial.distance.correlation); lower is better."""
    real = np.asarray(real).reshape(len(real), -1)
    recon = np.asarray(recon).reshape(len(recon), -1)
    if real.shape != recon.shape:
        raise ValueError(f"paired features must have one shape, got {real.shape} and {recon.shape}")
    return float(np.mean([1.0 - correlation_matrix(a[None], b[None])[0, 0] for a, b in zip(real, recon, strict=True)]))


def shuffled_rows(r: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """The correlation matrix of the shuffled pairing (recon j with real perm[j]): r[perm, :]."""
    return np.asarray(r)[np.asarray(perm)]


def feature_metric(metric: str, r: np.ndarray, ties: str = "half") -> float:
    """One network metric from its correlation matrix r[i, j] = corr(real i, recon j)."""
    if metric in IDENTIFICATION_METRICS:
        return float(np.mean(two_way_scores(r, ties)))
    if metric in DISTANCE_METRICS:
        return float(np.mean(1.0 - np.diag(r)))
    raise ValueError(f"not a feature metric: {metric!r}")


__all__ = [
    "DEFAULT_PROTOCOL",
    "DISTANCE_METRICS",
    "IDENTIFICATION_METRICS",
    "LOWER_IS_BETTER",
    "METRICS",
    "PIXEL_METRICS",
    "PIXEL_SIZE",
    "PROTOCOLS",
    "RESAMPLING",
    "TIE_TOLERANCE",
    "Protocol",
    "correlation_distance",
    "correlation_matrix",
    "feature_metric",
    "pixcorr",
    "pixcorr_per_image",
    "resize",
    "round_trip",
    "shuffled_rows",
    "ssim",
    "ssim_per_image",
    "two_way_identification",
    "two_way_scores",
]
