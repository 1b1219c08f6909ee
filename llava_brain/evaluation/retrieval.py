"""Retrieval and embedding metrics for predicted embeddings against their paired targets.

Rows are paired: `pred[i]` is the prediction for `target[i]`. Retrieval uses the cosine similarity
matrix S = norm(pred) @ norm(target).T (N, N); "brain_to_image" asks whether row i's best target is
target i, "image_to_brain" whether column j's best prediction is pred j. Ties in argmax go to the
first index (numpy). Everything is computed in float64; torch tensors are accepted.

MindEye's protocol (Scotti et al. 2023): top-1 both ways within a pool of 300 test items drawn without
replacement, 30 draws, the same pool for both directions; reported as the mean and the standard
deviation (numpy's, ddof=0) over the draws. With N <= 300 every draw is the whole set: the mean is the
full top-1 and the sd 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MINDEYE_SUBSET = 300  # MindEye / MindEye2 report top-1 among 300 random test images, 30 draws
MINDEYE_REPEATS = 30
MINDEYE_SEED = 0  # the draws' generator seed (np.random.default_rng); training and eval_retrieval.py both use it


def _as_float64(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        arr = arr.reshape(arr.shape[0], -1)
    if arr.shape[0] == 0:
        raise ValueError(f"{name} has no rows")
    return arr


def _pair(pred: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    p, t = _as_float64(pred, "pred"), _as_float64(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred {p.shape} and target {t.shape} must have the same shape (rows are paired)")
    return p, t


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)  # a zero row stays zero (similarity 0 to everything)


def _top1_from_similarity(sim: np.ndarray) -> tuple[float, float]:
    idx = np.arange(sim.shape[0])
    brain_to_image = float(np.mean(np.argmax(sim, axis=1) == idx))
    image_to_brain = float(np.mean(np.argmax(sim, axis=0) == idx))
    return brain_to_image, image_to_brain


def top1_retrieval(pred: Any, target: Any) -> dict[str, float]:
    """Top-1 retrieval accuracy both ways among all N paired rows; chance = 1/N."""
    p, t = _pair(pred, target)
    b2i, i2b = _top1_from_similarity(_unit_rows(p) @ _unit_rows(t).T)
    return {"brain_to_image": b2i, "image_to_brain": i2b, "chance": 1.0 / p.shape[0]}


def mindeye_retrieval(
    pred: Any, target: Any, *, subset: int = MINDEYE_SUBSET, repeats: int = MINDEYE_REPEATS, seed: int = MINDEYE_SEED
) -> dict[str, float]:
    """MindEye's protocol: top-1 among `subset` random test items (all if N <= subset) over `repeats` draws.

    Returns the mean over the draws ("brain_to_image", "image_to_brain"), their standard deviation
    ("brain_to_image_sd", "image_to_brain_sd"; ddof=0) and chance = 1 / pool size.
    """
    if subset < 1 or repeats < 1:
        raise ValueError(f"subset and repeats must be positive, got subset={subset}, repeats={repeats}")
    p, t = _pair(pred, target)
    n = p.shape[0]
    sim = _unit_rows(p) @ _unit_rows(t).T
    if n <= subset:  # every draw would be the full set
        b2i, i2b = _top1_from_similarity(sim)
        return {"brain_to_image": b2i, "image_to_brain": i2b, "brain_to_image_sd": 0.0, "image_to_brain_sd": 0.0,
                "chance": 1.0 / n}  # fmt: skip
    rng = np.random.default_rng(seed)
    scores = np.empty((repeats, 2))
    for r in range(repeats):
        pick = rng.choice(n, size=subset, replace=False)
        scores[r] = _top1_from_similarity(sim[np.ix_(pick, pick)])
    (b2i, i2b), (b2i_sd, i2b_sd) = scores.mean(axis=0), scores.std(axis=0)
    return {"brain_to_image": float(b2i), "image_to_brain": float(i2b), "brain_to_image_sd": float(b2i_sd),
            "image_to_brain_sd": float(i2b_sd), "chance": 1.0 / subset}  # fmt: skip


def embedding_metrics(pred: Any, target: Any) -> dict[str, float]:
    """Mean squared error over all entries and mean cosine similarity of paired rows."""
    p, t = _pair(pred, target)
    cosine = np.sum(_unit_rows(p) * _unit_rows(t), axis=1)
    return {"mse": float(np.mean((p - t) ** 2)), "cosine": float(np.mean(cosine))}


def retrieval_report(pred: Any, target: Any, *, prefix: str = "", seed: int = MINDEYE_SEED) -> dict[str, float]:
    """top1_*, mindeye300_* (mean, _sd, _chance), mse, cosine and chance (of the full top-1), keys prefixed.

    The one computation behind every retrieval number: pretrain_vit3d.py's per-epoch metrics,
    ridge_baseline.py and eval_retrieval.py call it on the same kind of inputs.
    """
    p, t = _pair(pred, target)
    top1 = top1_retrieval(p, t)
    mindeye = mindeye_retrieval(p, t, seed=seed)
    name = f"mindeye{MINDEYE_SUBSET}"
    report = {
        "top1_brain_to_image": top1["brain_to_image"],
        "top1_image_to_brain": top1["image_to_brain"],
        f"{name}_brain_to_image": mindeye["brain_to_image"],
        f"{name}_brain_to_image_sd": mindeye["brain_to_image_sd"],
        f"{name}_image_to_brain": mindeye["image_to_brain"],
        f"{name}_image_to_brain_sd": mindeye["image_to_brain_sd"],
        f"{name}_chance": mindeye["chance"],
        **embedding_metrics(p, t),
        "chance": top1["chance"],
    }
    return {f"{prefix}{key}": value for key, value in report.items()}
