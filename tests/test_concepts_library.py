"""llava_brain/evaluation/concepts.py and montage.py against independent computations: Grad-CAM by hand through the
ViT3D's blocks, the way back from tokens to voxels, the zeroing check on a score whose relevant voxels are known, and
the agreement measures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from llava_brain.evaluation import concepts
from llava_brain.evaluation.montage import montage
from llava_brain.model.vit3d import ViT3D, ViT3DConfig, active_patch_indices

GRID = (10, 11, 9)


def _model(patch: int = 4, seed: int = 0) -> ViT3D:
    torch.manual_seed(seed)
    mask = np.zeros(GRID, dtype=bool)
    mask[2:9, 1:8, 2:8] = True
    config = ViT3DConfig(grid=GRID, patch_size=patch, hidden_size=16, num_layers=3, num_heads=2, clip_dim=8,
                         vae_shape=None, head_hidden=12, active_patches=active_patch_indices(mask, patch))  # fmt: skip
    return ViT3D(config).eval()


def test_gradcam_equals_a_hand_computation_through_the_blocks():
    model = _model()
    volumes = torch.randn(3, *GRID)
    target = F.normalize(torch.randn(8), dim=0)
    result = concepts.gradcam_tokens(model, volumes, target, layers=[-2])
    # By hand: run the blocks up to the penultimate hidden state, take it as a leaf, finish the forward pass.
    x = model.embed(volumes)
    for block in model.blocks[:-1]:
        x = block(x)
    a = x.detach().requires_grad_(True)
    clip = model.clip_head(model.norm(model.blocks[-1](a))[:, 0])
    score = F.cosine_similarity(clip, target[None].expand_as(clip), dim=-1)
    (grad,) = torch.autograd.grad(score.sum(), a)
    alpha = grad[:, 1:].mean(dim=1, keepdim=True)
    expected = torch.relu((alpha * a[:, 1:].detach()).sum(-1))
    assert result.cam.shape == (3, model.num_tokens - 1)
    torch.testing.assert_close(result.cam, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.score, score.detach())
    assert (result.cam > 0).any() and (result.cam == 0).any()  # the ReLU bites, and not everywhere


def test_several_layers_average_and_a_missing_layer_is_refused():
    model, volumes, target = _model(), torch.randn(2, *GRID), F.normalize(torch.randn(8), dim=0)
    one, two = (concepts.gradcam_tokens(model, volumes, target, layers=[k]).cam for k in (1, 2))
    both = concepts.gradcam_tokens(model, volumes, target, layers=[1, 2]).cam
    torch.testing.assert_close(both, (one + two) / 2)
    with pytest.raises(ValueError, match="does not exist"):
        concepts.gradcam_tokens(model, volumes, target, layers=[7])


def test_a_token_goes_back_onto_its_own_patch():
    model = _model(patch=4)
    config, patches = model.config, model.config.token_patches()
    k = len(patches) // 2
    values = torch.zeros(1, len(patches))
    values[0, k] = 1.0
    volume = concepts.to_model_grid(config, values)[0]
    assert volume.shape == GRID
    px, py, pz = np.unravel_index(patches[k], config.patch_grid)
    peak = np.unravel_index(int(volume.argmax()), GRID)
    p = config.patch_size
    assert all(c * p <= v < (c + 1) * p for v, c in zip(peak, (px, py, pz), strict=True))
    # Trilinear from patch centres: the value falls off with the distance to the patch, 0 two patches away.
    far = volume.clone()
    near = tuple(slice(max(0, (c - 1) * p), (c + 2) * p) for c in (px, py, pz))
    far[near] = 0
    assert float(far.abs().max()) == 0.0
    with pytest.raises(ValueError, match="token values"):
        concepts.to_model_grid(config, torch.zeros(1, len(patches) + 1))


def test_the_subject_grid_map_is_zero_outside_the_brain():
    rng = np.random.default_rng(0)
    brain = rng.random((12, 13, 11)) > 0.4
    maps = concepts.to_subject_grid(torch.rand(2, *GRID) + 0.1, brain)
    assert maps.shape == (2, *brain.shape) and maps.dtype == np.float32
    assert (maps[:, ~brain] == 0).all() and (maps[:, brain] > 0).all()


def test_ensemble_scales_each_models_map_to_one_then_averages():
    a = np.zeros((1, 2, 2, 2), np.float32)
    a[0, 0, 0, 0], a[0, 1, 1, 1] = 4.0, 2.0
    b = np.zeros_like(a)
    b[0, 1, 1, 1] = 0.5
    mean = concepts.ensemble_maps([a, b])
    assert mean[0, 0, 0, 0] == pytest.approx(0.5) and mean[0, 1, 1, 1] == pytest.approx(0.75)


def test_zeroing_the_voxels_a_score_reads_beats_zeroing_random_ones():
    rng = np.random.default_rng(1)
    region = np.zeros((8, 8, 8), dtype=bool)
    region[1:7, 1:7, 1:7] = True
    relevant = np.zeros_like(region)
    relevant[1:3, 1:7, 1:7] = True  # 72 of the region's 216 voxels

    def score(volumes, i):  # the "model" reads the relevant voxels only
        return volumes[:, relevant].mean(axis=1)

    volumes = 1.0 + 0.1 * rng.standard_normal((12, 8, 8, 8)).astype(np.float32)
    maps = relevant[None] + 0.01 * rng.random((12, 8, 8, 8)).astype(np.float32)
    result = concepts.ablation_drops(score, volumes, maps, region, fraction=0.25, repeats=3, seed=0)
    assert result["zeroed_voxels"] == 54 and result["samples"] == 12
    # Independent expectation: zeroing 54 relevant voxels of ~1 removes ~54/72 of the mean; random ones, 1/3 of that.
    assert result["drop_located"] == pytest.approx(54 / 72, abs=0.03)
    assert result["drop_random"] == pytest.approx(54 / 216 * 54 / 72 * (72 / 54), abs=0.08)
    assert result["located_beats_random"] == 1.0 and result["wilcoxon_p"] < 0.001
    with pytest.raises(ValueError, match="fraction"):
        concepts.ablation_drops(score, volumes, maps, region, fraction=1.5)


def test_truth_agreement_ranks_the_own_feature_first():
    rng = np.random.default_rng(2)
    region = np.ones((6, 6, 6), dtype=bool)
    truth = {name: rng.random((6, 6, 6)).astype(np.float32) for name in ("a", "b", "c")}
    located = truth["b"] + 0.3 * rng.random((6, 6, 6)).astype(np.float32)
    score = concepts.truth_agreement(located, truth, "b", region, top_fraction=0.2, permutations=50)
    assert score["rank"] == 1
    assert score["own"]["spearman"] == pytest.approx(spearmanr(located.ravel(), truth["b"].ravel())[0])
    count = round(0.2 * 216)
    top = lambda v: set(np.argsort(-v.ravel(), kind="stable")[:count])  # noqa: E731
    assert score["own"]["top_overlap"] == pytest.approx(len(top(located) & top(truth["b"])) / count)
    assert score["own"]["spearman"] > score["others_max"]["spearman"] + 0.3
    assert abs(score["random"]["spearman"]) < 0.05


def test_mentions_matches_whole_words_only():
    assert concepts.mentions(["A red circle."], "red") and concepts.mentions(["A Red circle."], "red")
    assert not concepts.mentions(["A bored cat."], "red")
    assert concepts.mentions(["a fire hydrant on a street"], "fire hydrant")


def test_top_voxels_and_roi_shares():
    volume = np.zeros((4, 4, 4), np.float32)
    volume[1, 2, 3], volume[0, 0, 1] = 3.0, -1.0  # a signed map ranks and shares by magnitude
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -3.0
    top = concepts.top_voxels(volume, affine, 5)
    assert [t["voxel"] for t in top] == [[1, 2, 3], [0, 0, 1]]  # only voxels with a value, strongest first
    assert top[1]["value"] == -1.0
    assert top[0]["mm"] == [-1.0, 1.0, 3.0]
    roi = np.zeros((4, 4, 4), dtype=bool)
    roi[1] = True
    assert concepts.roi_shares(volume, {"early": roi}) == {"early": 0.75, "other": 0.25}


def test_montage_draws_the_map_over_the_brain_only():
    brain = np.zeros((10, 12, 8), dtype=bool)
    brain[2:8, 2:10, 1:7] = True
    overlay = np.zeros(brain.shape, np.float32)
    overlay[4, 5, 3] = 1.0
    image = montage(np.random.default_rng(0).random(brain.shape), overlay, brain, slices=6, scale=2)
    pixels = np.asarray(image)
    assert image.mode == "RGB" and pixels.shape == (12 * 2, 6 * 10 * 2, 3)  # 6 slices in one row, y up, x across
    hot = (pixels[..., 0] > 200) & (pixels[..., 2] < 100)
    assert hot.sum() == 4  # one voxel, 2 x 2 pixels, on one slice
    overlay[4, 5, 3] = -1.0  # a signed map's negative values are drawn cold
    pixels = np.asarray(montage(np.random.default_rng(0).random(brain.shape), overlay, brain, slices=6, scale=2))
    cold = (pixels[..., 2] > 200) & (pixels[..., 0] < 100)
    assert cold.sum() == 4 and ((pixels[..., 0] > 200) & (pixels[..., 2] < 100)).sum() == 0
    with pytest.raises(ValueError, match="shapes differ"):
        montage(np.zeros((2, 2, 2)), overlay, brain)


def test_the_encoding_pattern_is_pearsons_r_accumulated_over_batches():
    rng = np.random.default_rng(0)
    volumes, scores = rng.standard_normal((40, 3, 4, 2)), rng.standard_normal(40)
    volumes[..., 0, 0] += 2.0 * scores[:, None]  # a few voxels that follow the score
    volumes[:, 1, 1, 1] -= 2.0 * scores  # and one that falls with it: the pattern keeps the sign
    volumes[:, 2, 3, 1] = 5.0  # a voxel that does not vary
    pattern = concepts.EncodingPattern()
    for start, stop in ((0, 7), (7, 8), (8, 40)):  # uneven batches
        pattern.add(volumes[start:stop], scores[start:stop])
    flat = volumes.reshape(40, -1)
    expected = np.array([np.corrcoef(flat[:, v], scores)[0, 1] if flat[:, v].std() > 0 else 0.0
                         for v in range(flat.shape[1])]).reshape(3, 4, 2)  # fmt: skip
    np.testing.assert_allclose(pattern.result(), expected, atol=1e-5)
    assert pattern.result()[2, 3, 1] == 0 and pattern.result().dtype == np.float32
    assert pattern.result()[1, 1, 1] < -0.8 and (pattern.result()[:, 0, 0] > 0.8).all()
    with pytest.raises(ValueError, match="at least 3 samples"):
        small = concepts.EncodingPattern()
        small.add(volumes[:2], scores[:2])
        small.result()


def test_a_contrast_is_the_concept_minus_the_vocabulary_and_needs_another_concept():
    vocab = F.normalize(torch.randn(4, 8), dim=-1)
    direction = concepts.contrast_targets(vocab[1:2], vocab)
    torch.testing.assert_close(direction, vocab[1:2] - vocab.mean(dim=0, keepdim=True))
    with pytest.raises(ValueError, match="other than the one located"):
        concepts.contrast_targets(vocab[1:2], vocab[1:2])


def test_the_pattern_of_a_feature_detector_finds_that_features_true_map():
    """On mini-NSD's response model with its own noise: a score that detects one feature (correlation ~0.6 with it,
    as a decoder of moderate quality would) gives a signed pattern that matches that feature's signed true map
    best, and the pattern of a score that detects nothing matches no true map."""
    from llava_brain.simulate import MiniNsdConfig, brain
    from llava_brain.simulate.truth import FEATURES, SEMANTIC_FEATURES, subject_truth

    truth = subject_truth(MiniNsdConfig(subjects=(1,), seed=4), 1)
    rng = np.random.default_rng(1)
    n = 600
    semantic = (rng.random((n, len(SEMANTIC_FEATURES))) < 0.3).astype(np.float32)
    thumbs = rng.random((n, brain.RF_GRID, brain.RF_GRID, 3)).astype(np.float32)
    signal = brain.image_responses(truth.model, thumbs, semantic)
    betas = brain.trial_betas(rng, truth.model, signal, np.zeros_like(truth.model.baseline))
    maps = {f: truth.map(f, signed=True) for f in FEATURES}
    region = truth.anatomy.nsdgeneral > 0
    volumes = np.zeros((n, *truth.anatomy.grid), np.float32)
    volumes[:, truth.anatomy.brain] = betas
    for feature in ("blue", "circle"):
        detector = semantic[:, SEMANTIC_FEATURES.index(feature)] + 0.6 * rng.standard_normal(n)
        pattern = concepts.EncodingPattern()
        pattern.add(volumes, detector)
        score = concepts.truth_agreement(pattern.result(), maps, feature, region, permutations=20)
        assert score["rank"] == 1, (feature, score["own"], score["others_max"])
        # measured rho 0.49 vs the best other feature's 0.13 (blue), 0.44 vs 0.29 (circle); |r| against the unsigned
        # truth gave 0.24 vs 0.17 and 0.17 vs 0.09
        assert score["own"]["spearman"] > score["others_max"]["spearman"] + 0.1
        assert score["own"]["spearman"] > score["random"]["spearman_p95"] + 0.1
        assert score["own"]["top_overlap"] > 2 * score["top_fraction"]
    blind = concepts.EncodingPattern()
    blind.add(volumes, rng.standard_normal(n))
    score = concepts.truth_agreement(blind.result(), maps, "blue", region, permutations=20)
    assert abs(score["own"]["spearman"]) < 0.1
