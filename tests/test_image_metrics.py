"""llava_brain.evaluation.image_metrics / recon_scores: the metric math against hand-computed values, numpy, scipy
and skimage called directly, and the two protocols (they differ by exactly MindEye's 256² round trip)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.spatial.distance
import torch
import torchvision
from PIL import Image
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from llava_brain.evaluation import image_metrics as im
from llava_brain.evaluation.controls import derangement
from llava_brain.evaluation.feature_nets import FeatureNet
from llava_brain.evaluation.recon_scores import score_reconstructions


def published_two_way(real, recon):
    """Brain-Diffuser's / MindEye's formula, written out with np.corrcoef (ties count as failures)."""
    n = len(real)
    r = np.corrcoef(np.reshape(real, (n, -1)), np.reshape(recon, (n, -1)))[:n, n:]
    return float(np.mean(np.sum(r < np.diag(r), axis=0)) / (n - 1))


# Two-way identification -------------------------------------------------------------------------


def test_two_way_on_a_hand_made_matrix():
    # column j = recon j; own value on the diagonal
    r = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.6], [0.95, 0.4, 0.7]])
    # j=0: 0.2 < 0.9, 0.95 > 0.9 -> 1/2; j=1: 0.1 < 0.3, 0.4 > 0.3 -> 1/2; j=2: 0.5, 0.6 < 0.7 -> 2/2
    assert im.two_way_scores(r).tolist() == [0.5, 0.5, 1.0]
    assert np.mean(im.two_way_scores(r)) == pytest.approx(2 / 3)


def test_two_way_on_hand_made_features():
    one_hot = np.eye(4)[:3]  # corr(e_i, e_j) = -1/3 for i != j, 1 for i == j
    assert im.two_way_identification(one_hot, one_hot) == 1.0
    assert im.two_way_identification(one_hot, one_hot[::-1]) == pytest.approx(0.5)  # recon 1 right, 0 and 2 wrong
    # j=0 (= real 2): own r=-1/3, distractors r=-1/3 (tie) and 1 -> (0 + .5)/2; j=1: 1, 1 -> 1; j=2 as j=0
    assert im.two_way_scores(im.correlation_matrix(one_hot, one_hot[::-1])).tolist() == [0.25, 1.0, 0.25]


def test_two_way_with_n_2():
    real = np.array([[1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])
    assert im.two_way_identification(real, real) == 1.0
    assert im.two_way_identification(real, real[::-1]) == 0.0
    with pytest.raises(ValueError):
        im.two_way_scores(np.ones((1, 1)))


def test_two_way_ties_count_half_or_as_a_loss():
    r = np.array([[0.5, 0.2], [0.5, 0.2]])  # every distractor ties with the own value
    assert im.two_way_scores(r, ties="half").tolist() == [0.5, 0.5]
    assert im.two_way_scores(r, ties="loss").tolist() == [0.0, 0.0]
    a, b = [1.0, 0.0, 2.0, 5.0], [0.0, 3.0, 1.0, 1.0]
    real = np.array([a, a, b])  # two identical stimuli: recon 0 and 1 cannot tell them apart
    # j=0: real 1 ties (r = 1), real 2 is lower -> (1 + .5)/2 = .75; j=1 the same; j=2 -> 1
    assert im.two_way_identification(real, real, ties="half") == pytest.approx((0.75 + 0.75 + 1) / 3)
    assert im.two_way_identification(real, real, ties="loss") == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert im.two_way_identification(real, real, ties="loss") == pytest.approx(published_two_way(real, real))


def test_constant_features_score_chance_not_zero():
    real = np.random.default_rng(0).normal(size=(5, 8))
    assert im.two_way_identification(real, np.ones((5, 8))) == 0.5  # undefined correlations: ties


def test_two_way_matches_the_published_formula_on_random_features():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(30, 50)).astype(np.float32)
    recon = real + rng.normal(scale=2.0, size=real.shape).astype(np.float32)
    expected = published_two_way(real, recon)
    assert 0.6 < expected < 1.0
    assert im.two_way_identification(real, recon, ties="half") == pytest.approx(expected, abs=1e-12)
    assert im.two_way_identification(real, recon, ties="loss") == pytest.approx(expected, abs=1e-12)


def test_correlation_matrix_equals_numpy_in_blocks(monkeypatch):
    rng = np.random.default_rng(2)
    real, recon = rng.normal(3.0, 1.0, size=(6, 101)), rng.normal(size=(5, 101))
    monkeypatch.setattr(im, "_GRAM_ELEMENTS", 16)  # 2-3 columns per block
    np.testing.assert_allclose(im.correlation_matrix(real, recon), np.corrcoef(real, recon)[:6, 6:], atol=1e-12)


def test_correlation_distance_is_scipys():
    rng = np.random.default_rng(3)
    real, recon = rng.normal(size=(4, 20)), rng.normal(size=(4, 20))
    expected = np.mean([scipy.spatial.distance.correlation(a, b) for a, b in zip(real, recon, strict=True)])
    assert im.correlation_distance(real, recon) == pytest.approx(expected, abs=1e-12)
    assert im.feature_metric("effnet", im.correlation_matrix(real, recon)) == pytest.approx(expected, abs=1e-12)
    assert im.correlation_distance(real, 2 * real + 1) == pytest.approx(0.0, abs=1e-12)


def test_shuffled_pairing_is_chance_and_equals_permuted_features():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(80, 40))
    recon = real + rng.normal(scale=0.5, size=real.shape)
    perm = derangement(80, seed=0)
    r = im.correlation_matrix(real, recon)
    shuffled = im.feature_metric("clip", im.shuffled_rows(r, perm))
    assert im.feature_metric("clip", r) > 0.99
    assert abs(shuffled - 0.5) < 0.08
    assert shuffled == pytest.approx(published_two_way(real[perm], recon), abs=1e-12)  # recon j vs real perm[j]
    distance = np.mean([scipy.spatial.distance.correlation(real[perm[j]], recon[j]) for j in range(80)])
    assert im.feature_metric("swav", im.shuffled_rows(r, perm)) == pytest.approx(distance, abs=1e-12)


# PixCorr and SSIM --------------------------------------------------------------------------------


def test_pixcorr_known_values():
    img = np.random.default_rng(5).random((2, 3, 16, 16))
    assert im.pixcorr(img, img) == pytest.approx(1.0)
    assert im.pixcorr(img, 1.0 - img) == pytest.approx(-1.0)  # an image against its negative
    assert im.pixcorr(torch.from_numpy(img), 2 * img + 5) == pytest.approx(1.0)  # gain and offset do not matter
    # by hand: x = 1 2 3 4, y = 1 3 2 4: centred -1.5 -.5 .5 1.5 / -1.5 .5 -.5 1.5 -> 4 / 5 = 0.8
    assert im.pixcorr([[1, 2, 3, 4]], [[1, 3, 2, 4]]) == pytest.approx(0.8)
    assert im.pixcorr_per_image(np.ones((1, 4)), [[1, 2, 3, 4]]).tolist() == [0.0]  # a blank image: no information
    with pytest.raises(ValueError):
        im.pixcorr(img, img[:1])


def test_ssim_known_values_and_skimage():
    rng = np.random.default_rng(6)
    a, b = rng.random((3, 3, 40, 40)), rng.random((3, 3, 40, 40))
    assert im.ssim(a, a) == pytest.approx(1.0)
    # constant grey images: only the luminance term is left, (2 mu_a mu_b + C1) / (mu_a² + mu_b² + C1), C1 = .01²
    flat = np.full((1, 3, 30, 30), 0.5), np.full((1, 3, 30, 30), 0.25)
    assert im.ssim(*flat) == pytest.approx((2 * 0.5 * 0.25 + 1e-4) / (0.5**2 + 0.25**2 + 1e-4))
    direct = [structural_similarity(rgb2gray(x.transpose(1, 2, 0)), rgb2gray(y.transpose(1, 2, 0)),
                                    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
              for x, y in zip(a, b, strict=True)]  # fmt: skip
    np.testing.assert_allclose(im.ssim_per_image(a, b), direct, atol=1e-12)


def test_resize_is_torchvisions_bilinear_or_pils():
    img = torch.rand(3, 64, 64)
    expected = TF.resize(img, [24, 24], interpolation=InterpolationMode.BILINEAR, antialias=True)
    assert torch.equal(im.resize(img, 24), expected)
    assert im.resize(img, 64) is img
    pixels = (np.random.default_rng(7).random((40, 40, 3)) * 255).astype(np.uint8)
    as_float = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255  # what load_image gives for a PNG
    for how, size, pil in (("pil_bicubic", 425, Image.fromarray(pixels).resize((425, 425))),  # PIL's default
                           ("pil_bilinear", 24, Image.fromarray(pixels).resize((24, 24), Image.BILINEAR))):  # fmt: skip
        out = im.resize(as_float, size, how)
        np.testing.assert_array_equal((out * 255).round().byte().permute(1, 2, 0).numpy(), np.asarray(pil))


# Protocols -----------------------------------------------------------------------------------------


def test_protocol_tables():
    bd, me = im.PROTOCOLS["braindiffuser"], im.PROTOCOLS["mindeye"]
    assert (bd.round_trip, me.round_trip, bd.pixel_size, me.pixel_size) == (None, 256, 425, 425)
    assert (bd.pixel_resampling, bd.network_resampling) == ("pil_bicubic", "pil_bilinear")  # Brain-Diffuser's PIL
    assert (me.pixel_resampling, me.network_resampling) == ("bilinear", "bilinear")  # MindEye's tensor Resize
    assert dict(bd.input_sizes) == {"alexnet": 224, "inceptionv3": 224, "effnet": 224, "swav": 224}
    assert dict(me.input_sizes) == {"alexnet": 256, "inceptionv3": 342, "effnet": 255, "swav": 224}
    assert bd.input_size("clip", 32) == me.input_size("clip", 32) == 32  # CLIP: its own size


def _random_alexnet() -> FeatureNet:
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    model = torchvision.models.alexnet(weights=None).eval()
    nodes = {"alexnet2": "features.4", "alexnet5": "features.11"}
    module = create_feature_extractor(model, return_nodes=list(nodes.values()))
    return FeatureNet("alexnet", module, nodes, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 224, "random")


def _images(n, size, seed):
    """Smooth random images (bilinear upsampling of 6x6 noise), float (3, size, size) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return [TF.resize(torch.rand(3, 6, 6, generator=g), [size, size], antialias=True) for _ in range(n)]


def test_mindeye_protocol_is_its_tables_after_the_256_round_trip():
    stimuli = _images(4, 425, seed=0)
    recons = [TF.resize(s, [64, 64], antialias=True) + 0.05 * torch.rand(3, 64, 64) for s in stimuli]
    recons = [r.clamp(0, 1) for r in recons]
    nets = {"alexnet": _random_alexnet()}
    kw = dict(metrics=im.METRICS, nets=nets, perm=derangement(4, 0), batch_size=3)
    mindeye = score_reconstructions(recons, stimuli, protocol=im.PROTOCOLS["mindeye"], **kw)

    def trip(x):  # MindEye's stored images, resized here with torchvision directly
        return TF.resize(x, [256, 256], interpolation=InterpolationMode.BILINEAR, antialias=True)

    # the braindiffuser protocol given MindEye's tables (sizes, resampling): all that is left is the round trip
    me = im.PROTOCOLS["mindeye"]
    with_mindeye_tables = dataclasses.replace(
        im.PROTOCOLS["braindiffuser"], input_sizes=me.input_sizes, pixel_resampling=me.pixel_resampling,
        network_resampling=me.network_resampling,
    )  # fmt: skip
    tripped = score_reconstructions([trip(x) for x in recons], [trip(x) for x in stimuli],
                                    protocol=with_mindeye_tables, **kw)  # fmt: skip
    assert sorted(mindeye[0]) == ["alexnet2", "alexnet5", "pixcorr", "ssim"]
    for ours, theirs in zip(mindeye, tripped, strict=True):
        assert ours == pytest.approx(theirs, abs=1e-9)
    # ... and the round trip is not a no-op: the paper's protocol on the originals gives other numbers
    braindiffuser = score_reconstructions(recons, stimuli, protocol=im.PROTOCOLS["braindiffuser"], **kw)
    assert braindiffuser[0]["ssim"] != pytest.approx(mindeye[0]["ssim"], abs=1e-6)
