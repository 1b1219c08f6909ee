"""Retrieval and embedding metrics for predicted embeddings against their paired targets.

Rows are paired: `pred[i]` is the prediction for `target[i]`. Retrieval uses the cosine similarity
matrix S = norm(pred) @ norm(target).T (N, N); "brain_to_image" asks whether row i's best target is
target i, "image_to_brain" whether column j's best prediction is pred j. Ties in argmax go to the
first index (numpy). Everything is computed in float64; torch tensors are accepted.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MINDEYE_SUBSET = 300  # MindEye / MindEye2 report top-1 among 300 random test images, 30 draws
MINDEYE_REPEATS = 30


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
    pred: Any, target: Any, *, subset: int = MINDEYE_SUBSET, repeats: int = MINDEYE_REPEATS, seed: int = 0
) -> dict[str, float]:
    """MindEye's protocol: top-1 among `subset` random test items (all if N < subset), mean over `repeats` draws."""
    if subset < 1 or repeats < 1:
        raise ValueError(f"subset and repeats must be positive, got subset={subset}, repeats={repeats}")
    p, t = _pair(pred, target)
    n = p.shape[0]
    sim = _unit_rows(p) @ _unit_rows(t).T
    if n <= subset:  # every draw would be the full set
        b2i, i2b = _top1_from_similarity(sim)
        return {"brain_to_image": b2i, "image_to_brain": i2b, "chance": 1.0 / n}
    rng = np.random.default_rng(seed)
    scores = np.empty((repeats, 2))
    for r in range(repeats):
        pick = rng.choice(n, size=subset, replace=False)
        scores[r] = _top1_from_similarity(sim[np.ix_(pick, pick)])
    b2i, i2b = scores.mean(axis=0)
    return {"brain_to_image": float(b2i), "image_to_brain": float(i2b), "chance": 1.0 / subset}


def embedding_metrics(pred: Any, target: Any) -> dict[str, float]:
    """Mean squared error over all entries and mean cosine similarity of paired rows."""
    p, t = _pair(pred, target)
    cosine = np.sum(_unit_rows(p) * _unit_rows(t), axis=1)
    return {"mse": float(np.mean((p - t) ** 2)), "cosine": float(np.mean(cosine))}


def retrieval_report(pred: Any, target: Any, *, prefix: str = "") -> dict[str, float]:
    """top1_*, mindeye300_*, mse, cosine and chance (of the full top-1) in one flat dict, keys prefixed."""
    p, t = _pair(pred, target)
    top1 = top1_retrieval(p, t)
    mindeye = mindeye_retrieval(p, t)
    report = {
        "top1_brain_to_image": top1["brain_to_image"],
        "top1_image_to_brain": top1["image_to_brain"],
        f"mindeye{MINDEYE_SUBSET}_brain_to_image": mindeye["brain_to_image"],
        f"mindeye{MINDEYE_SUBSET}_image_to_brain": mindeye["image_to_brain"],
        f"mindeye{MINDEYE_SUBSET}_chance": mindeye["chance"],
        **embedding_metrics(p, t),
        "chance": top1["chance"],
    }
    return {f"{prefix}{key}": value for key, value in report.items()}
