"""How hard is a dataset to decode? A quick ridge-regression retrieval check on raw NSD files.

Reads one subject's `nsdgeneral` voxels through the NSD readers (so it works on real NSD and on
mini-NSD alike), z-scores them with training statistics, fits ridge regression from single
training trials to a pixel embedding of the image (an 8×8 RGB thumbnail minus its mean colour, standardised), and
retrieves each test image among all test images from its repeat-averaged betas (top-1, by
Pearson correlation). Used by the tests to hold mini-NSD in its difficulty band and by
`tools/describe_nsd.py --ridge-check` to report the figures in `docs/mini_nsd.md`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llava_brain.layout import NsdTree
from llava_brain.nsd import BetaSession, ExpDesign, NsdStimuli, read_roi
from llava_brain.simulate.scenes import thumbnails


@dataclass(frozen=True)
class RetrievalCheck:
    subject: int
    num_voxels: int
    num_train_trials: int
    num_test_images: int
    top1_averaged: float  # repeat-averaged test betas
    top1_single: float  # first presentation only
    chance: float
    median_voxel_snr: float  # empirical ncsnr of nsdgeneral voxels, from test repeats


def _top1(pred: np.ndarray, target: np.ndarray) -> float:
    """Share of rows of `pred` whose most correlated row of `target` is the matching one."""
    p = (pred - pred.mean(1, keepdims=True)) / (pred.std(1, keepdims=True) + 1e-8)
    t = (target - target.mean(1, keepdims=True)) / (target.std(1, keepdims=True) + 1e-8)
    return float(np.mean(np.argmax(p @ t.T, axis=1) == np.arange(len(p))))


def empirical_ncsnr(betas: np.ndarray, image_ids: np.ndarray) -> np.ndarray:
    """NSD's noise-ceiling SNR per voxel from repeated images: sqrt(max(var_total - var_noise, 0)) / sd_noise."""
    ids, counts = np.unique(image_ids, return_counts=True)
    ids = ids[counts >= 2]
    groups = [betas[image_ids == i] for i in ids]
    noise_var = np.mean([g.var(0, ddof=1) for g in groups], axis=0)
    # The variance of n-repeat means is signal_var + noise_var / n.
    mean_var = np.var(np.stack([g.mean(0) for g in groups]), axis=0)
    signal_var = np.maximum(mean_var - noise_var / np.mean([len(g) for g in groups]), 0.0)
    return np.sqrt(signal_var / noise_var)


def ridge_retrieval_check(tree: NsdTree, subject: int, alpha: float = 300.0, thumb: int = 8) -> RetrievalCheck:
    design = ExpDesign.load(tree.expdesign)
    mask = read_roi(tree.roi(subject, "nsdgeneral")).data > 0
    sessions = tree.sessions(subject, "hdf5")
    betas = []
    for session in sessions:  # one session in memory at a time; keep only the masked voxels
        with BetaSession(tree.betas(subject, session, "hdf5"), expect_grid=mask.shape) as f:
            betas.append(f.read_voxels(mask))
    x = np.concatenate(betas)
    nsd_ids = design.trial_images(subject, len(x))
    test = design.is_shared(nsd_ids)
    mean, std = x[~test].mean(0), x[~test].std(0) + 1e-6
    x = (x - mean) / std

    with NsdStimuli(tree.stimuli) as stim:
        unique_ids = np.unique(nsd_ids)
        embed = thumbnails(stim.read(unique_ids), thumb).reshape(len(unique_ids), -1, 3)
    # Colour contrast: remove each image's mean colour. Visual cortex (real, and simulated) codes
    # local contrast far more than the overall light level, which is mostly background.
    embed = (embed - embed.mean(axis=1, keepdims=True)).reshape(len(unique_ids), -1)
    embed = (embed - embed.mean(0)) / (embed.std(0) + 1e-6)
    row_of = {int(n): i for i, n in enumerate(unique_ids)}
    y = embed[[row_of[int(n)] for n in nsd_ids]]

    xtr, ytr = x[~test], y[~test]
    weights = np.linalg.solve(xtr.T @ xtr + alpha * np.eye(xtr.shape[1]), xtr.T @ ytr)
    test_ids = np.unique(nsd_ids[test])
    averaged = np.stack([x[test & (nsd_ids == i)].mean(0) for i in test_ids])
    first = np.stack([x[test & (nsd_ids == i)][0] for i in test_ids])
    target = embed[[row_of[int(i)] for i in test_ids]]
    snr = empirical_ncsnr(x[test], nsd_ids[test])
    return RetrievalCheck(
        subject=subject,
        num_voxels=int(mask.sum()),
        num_train_trials=int((~test).sum()),
        num_test_images=len(test_ids),
        top1_averaged=_top1(averaged @ weights, target),
        top1_single=_top1(first @ weights, target),
        chance=1.0 / len(test_ids),
        median_voxel_snr=float(np.median(snr)),
    )
