"""Scoring a folder of reconstructions against their stimuli: pairing by file name, streaming, both controls.

`score_reconstructions(recons, stimuli, ...)` takes two equally long sequences whose items are float images
(3, H, W) in [0, 1] (`ImageFiles` reads PNGs lazily, one item at a time), so only one batch of images is in
memory at once; what is kept for the whole set is each network's features ((N, D) float32 per side: for
AlexNet's features.4 at 224² D = 139,968, ~0.55 GB per 1,000 images and side) and per-pair pixel scores.

Per batch: both images through the protocol's round trip; PixCorr/SSIM at 425² (the protocol's resampling; a
425² stimulus is used as it is) of (recon j, stimulus j) and
of the shuffled pair (recon j, stimulus perm[j]); each network's features of both images. After the pass,
per network, one correlation matrix r[i, j] = corr(stimulus i, recon j) gives the metric and, from r[perm, :],
its shuffled control (`image_metrics`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from llava_brain.errors import BadInputError
from llava_brain.evaluation.feature_nets import FeatureNet
from llava_brain.evaluation.image_metrics import (
    PIXEL_METRICS,
    Protocol,
    correlation_matrix,
    feature_metric,
    pixcorr_per_image,
    resize,
    round_trip,
    shuffled_rows,
    ssim_per_image,
)


def pair_folders(recons: str | Path, stimuli: str | Path) -> list[tuple[str, Path, Path]]:
    """[(name, recon PNG, stimulus PNG)] sorted by file name; every PNG of either folder must have its pair."""
    recons, stimuli = Path(recons), Path(stimuli)
    for folder, what in ((recons, "reconstructions"), (stimuli, "stimuli")):
        if not folder.is_dir():
            raise BadInputError(folder, f"missing; expected a folder of PNG {what}")
    rec = {p.name: p for p in recons.glob("*.png") if p.is_file()}
    stim = {p.name: p for p in stimuli.glob("*.png") if p.is_file()}
    for name in sorted(set(rec) - set(stim)):
        raise BadInputError(stimuli / name, f"missing; expected the stimulus of reconstruction {rec[name]}")
    for name in sorted(set(stim) - set(rec)):
        raise BadInputError(recons / name, f"missing; expected the reconstruction of stimulus {stim[name]}")
    if len(rec) < 2:
        raise BadInputError(
            recons, f"expected at least 2 PNG reconstructions (paired with {stimuli}), found {len(rec)}"
        )
    return [(name, rec[name], stim[name]) for name in sorted(rec)]


def load_image(path: str | Path) -> torch.Tensor:
    """An image file as float32 (3, H, W) in [0, 1] (RGB; grey and alpha images converted as PIL does)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise BadInputError(path, f"expected a readable PNG image ({type(err).__name__}: {err})") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


class ImageFiles(Sequence):
    """Image files read lazily: `files[i]` loads file i (`load_image`)."""

    def __init__(self, paths: Iterable[str | Path]):
        self.paths = [Path(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        return load_image(self.paths[i])


def _batches(n: int, batch_size: int) -> list[range]:
    return [range(start, min(n, start + batch_size)) for start in range(0, n, batch_size)]


def score_reconstructions(
    recons: Sequence, stimuli: Sequence, *, metrics: Sequence[str], protocol: Protocol,
    nets: dict[str, FeatureNet], perm: np.ndarray, batch_size: int = 16, ties: str = "half",
    progress: Callable[[Iterable], Iterable] = iter,
) -> tuple[dict[str, float], dict[str, float]]:  # fmt: skip
    """({metric: value}, {metric: shuffled value}) of `metrics` computable here (pixel metrics, and those of
    the networks in `nets`). recons[j] pairs with stimuli[j]; the shuffled control pairs it with
    stimuli[perm[j]] (perm: a derangement). `progress` wraps the batch loop (e.g. tqdm)."""
    n = len(recons)
    if len(stimuli) != n or n < 2 or sorted(np.asarray(perm).tolist()) != list(range(n)):
        raise ValueError(f"need >= 2 paired images and a permutation of them, got {n}, {len(stimuli)}, {len(perm)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pixel = [m for m in PIXEL_METRICS if m in metrics]
    per_pair = {(m, shuffled): np.zeros(n) for m in pixel for shuffled in (False, True)}
    feats: dict[tuple[str, str], np.ndarray] = {}  # (metric, "recon"|"stimulus") -> (N, D)
    pixel_functions = {"pixcorr": pixcorr_per_image, "ssim": ssim_per_image}
    for rows in progress(_batches(n, batch_size)):
        rec = [round_trip(recons[i], protocol) for i in rows]
        stim = [round_trip(stimuli[i], protocol) for i in rows]
        if pixel:
            size, how = protocol.pixel_size, protocol.pixel_resampling
            rec_px = torch.stack([resize(x, size, how) for x in rec])
            stim_px = torch.stack([resize(x, size, how) for x in stim])
            shuf_px = torch.stack([resize(round_trip(stimuli[int(perm[i])], protocol), size, how) for i in rows])
            for m in pixel:
                per_pair[(m, False)][rows.start : rows.stop] = pixel_functions[m](rec_px, stim_px)
                per_pair[(m, True)][rows.start : rows.stop] = pixel_functions[m](rec_px, shuf_px)
        for name, net in nets.items():
            size = protocol.input_size(name, net.own_size)
            for side, images in (("recon", rec), ("stimulus", stim)):
                for metric, block in net.features(images, size, protocol.network_resampling).items():
                    if (metric, side) not in feats:
                        feats[(metric, side)] = np.zeros((n, block.shape[1]), dtype=np.float32)
                    feats[(metric, side)][rows.start : rows.stop] = block
    values = {m: float(np.mean(per_pair[(m, False)])) for m in pixel}
    shuffled = {m: float(np.mean(per_pair[(m, True)])) for m in pixel}
    for metric in metrics:
        if (metric, "recon") not in feats:
            continue
        r = correlation_matrix(feats[(metric, "stimulus")], feats[(metric, "recon")])
        values[metric] = feature_metric(metric, r, ties)
        shuffled[metric] = feature_metric(metric, shuffled_rows(r, perm), ties)
    return values, shuffled


__all__ = ["ImageFiles", "load_image", "pair_folders", "score_reconstructions"]
