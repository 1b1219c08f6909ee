"""llava_brain.evaluation.retrieval: top-1 retrieval both ways, MindEye's subset protocol (mean and sd over its
draws, against a direct computation), embedding metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llava_brain.evaluation import embedding_metrics, mindeye_retrieval, retrieval_report, top1_retrieval


def test_perfect_predictions_retrieve_everything():
    target = np.random.default_rng(0).normal(size=(50, 8))
    result = top1_retrieval(target * 3.0, target)  # cosine ignores scale
    assert result == {"brain_to_image": 1.0, "image_to_brain": 1.0, "chance": 1 / 50}


def test_unrelated_predictions_are_near_chance():
    rng = np.random.default_rng(1)
    target = rng.normal(size=(400, 16))
    pred = target[rng.permutation(400)]
    result = top1_retrieval(pred, target)
    assert result["chance"] == 1 / 400
    assert result["brain_to_image"] < 0.02 and result["image_to_brain"] < 0.02


def test_hand_made_3x3_example():
    # Unit vectors, so S = pred @ target.T is exactly:
    #   [[1, 0, 0],    row 0 -> 0 (hit)
    #    [1, 0, 0],    row 1 -> 0 (miss)
    #    [0, 0, 1]]    row 2 -> 2 (hit)
    # Columns: col 0 -> row 0 (tie with row 1, first index wins: hit), col 1 -> all 0, first index 0 (miss),
    # col 2 -> row 2 (hit).
    target = np.eye(3)
    pred = np.array([[1.0, 0, 0], [2.0, 0, 0], [0, 0, 5.0]])
    result = top1_retrieval(pred, target)
    assert result["brain_to_image"] == pytest.approx(2 / 3)
    assert result["image_to_brain"] == pytest.approx(2 / 3)
    assert result["chance"] == pytest.approx(1 / 3)


def test_mindeye_subset_equals_full_top1_when_small():
    rng = np.random.default_rng(2)
    target = rng.normal(size=(120, 8))
    pred = target + rng.normal(scale=1.5, size=target.shape)
    full = {**top1_retrieval(pred, target), "brain_to_image_sd": 0.0, "image_to_brain_sd": 0.0}
    assert mindeye_retrieval(pred, target, subset=300, repeats=5) == full
    assert mindeye_retrieval(pred, target, subset=120) == full


def test_mindeye_mean_and_sd_match_a_direct_computation():
    # MindEye's loop written out with torch: 30 pools of 300 drawn without replacement from the seeded
    # generator, the same pool both ways, top-1 by argmax of cosine similarity; mean and numpy's std.
    rng = np.random.default_rng(7)
    target = rng.normal(size=(500, 8))
    pred = target + rng.normal(scale=1.2, size=target.shape)
    draws = np.random.default_rng(11)
    fwd, bwd = [], []
    for _ in range(30):
        pick = draws.choice(500, size=300, replace=False)
        p = torch.nn.functional.normalize(torch.from_numpy(pred[pick]), dim=1)
        t = torch.nn.functional.normalize(torch.from_numpy(target[pick]), dim=1)
        labels = torch.arange(300)
        fwd.append((p @ t.T).argmax(dim=1).eq(labels).double().mean().item())
        bwd.append((t @ p.T).argmax(dim=1).eq(labels).double().mean().item())
    result = mindeye_retrieval(pred, target, seed=11)
    assert result["brain_to_image"] == pytest.approx(np.mean(fwd), abs=1e-12)
    assert result["image_to_brain"] == pytest.approx(np.mean(bwd), abs=1e-12)
    assert result["brain_to_image_sd"] == pytest.approx(np.std(fwd), abs=1e-12)
    assert result["image_to_brain_sd"] == pytest.approx(np.std(bwd), abs=1e-12)
    assert result["brain_to_image_sd"] > 0 and result["chance"] == 1 / 300


def test_mindeye_subset_is_easier_and_deterministic():
    rng = np.random.default_rng(3)
    target = rng.normal(size=(600, 8))
    pred = target + rng.normal(scale=1.0, size=target.shape)
    sub = mindeye_retrieval(pred, target, subset=300, repeats=10, seed=4)
    assert sub == mindeye_retrieval(pred, target, subset=300, repeats=10, seed=4)
    assert sub["chance"] == 1 / 300
    assert sub["brain_to_image"] >= top1_retrieval(pred, target)["brain_to_image"]


def test_torch_input_and_embedding_metrics():
    target = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    pred = torch.tensor([[1.0, 1.0], [0.0, 1.0]], requires_grad=True)
    metrics = embedding_metrics(pred, target)
    assert metrics["mse"] == pytest.approx((0 + 1 + 0 + 1) / 4)
    assert metrics["cosine"] == pytest.approx((np.sqrt(0.5) + 1.0) / 2)
    assert top1_retrieval(pred, target.numpy())["brain_to_image"] == 1.0


def test_report_keys_and_shape_check():
    x = np.random.default_rng(5).normal(size=(10, 4))
    report = retrieval_report(x, x, prefix="te_")
    expected = {"top1_brain_to_image", "top1_image_to_brain", "mindeye300_brain_to_image",
                "mindeye300_brain_to_image_sd", "mindeye300_image_to_brain", "mindeye300_image_to_brain_sd",
                "mindeye300_chance", "mse", "cosine", "chance"}  # fmt: skip
    assert set(report) == {f"te_{k}" for k in expected}
    assert report["te_top1_brain_to_image"] == 1.0 and report["te_mse"] == 0.0
    with pytest.raises(ValueError, match="same shape"):
        top1_retrieval(x, x[:5])
