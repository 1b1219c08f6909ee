"""llava_brain.simulate.truth: mini-NSD's true encoding maps describe what its simulated responses depend on,
sit on the subject's grid inside its brain mask, and are rebuilt exactly from a written tree's seed."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy.stats import spearmanr

from llava_brain.layout import NsdTree
from llava_brain.simulate import MiniNsdConfig, brain, write_mini_nsd
from llava_brain.simulate.truth import FEATURES, LOW_LEVEL, SEMANTIC_FEATURES, subject_truth, tree_config

CONFIG = MiniNsdConfig(subjects=(1, 2), seed=3)


@pytest.fixture(scope="module")
def truth():
    return subject_truth(CONFIG, 1)


def _feature_sensitivity(truth, feature: int, rng) -> np.ndarray:
    """(V,) |Pearson r| over images between the simulated signal of each brain voxel and semantic feature
    `feature`, all other features and the thumbnails random: an independent read-out of the encoding."""
    n = 2000
    semantic = rng.random((n, len(SEMANTIC_FEATURES))).astype(np.float32)
    thumbs = rng.random((n, brain.RF_GRID, brain.RF_GRID, 3)).astype(np.float32)
    signal = brain.image_responses(truth.model, thumbs, semantic) * truth.model.ncsnr  # signal in noise units
    f = (semantic[:, feature] - semantic[:, feature].mean()) / semantic[:, feature].std()
    return np.abs(f @ signal / n)  # signal has unit variance per voxel before the ncsnr factor


def test_semantic_maps_predict_each_features_influence(truth):
    rng = np.random.default_rng(0)
    brain_mask = truth.anatomy.brain
    for name in ("red", "circle", "sky-blue"):
        k = SEMANTIC_FEATURES.index(name)
        measured = _feature_sensitivity(truth, k, rng)
        own = spearmanr(truth.map(name)[brain_mask], measured).statistic
        others = [spearmanr(truth.map(o)[brain_mask], measured).statistic
                  for o in SEMANTIC_FEATURES if o != name]  # fmt: skip
        assert own > 0.75, (name, own)  # measured 0.82-0.86 with this seed
        assert own > max(others) + 0.15, (name, own, max(others))  # the shared SNR factor: others ~0.6


def test_low_level_map_is_early_visual_cortex(truth):
    low = truth.map(LOW_LEVEL)
    early = truth.anatomy.streams == 1
    ventral = truth.anatomy.streams == 5
    assert low[early].mean() > 2 * low[ventral].mean() > 0
    # and the semantic maps the other way round
    assert truth.map("circle")[ventral].mean() > 2 * truth.map("circle")[early].mean()


def test_the_signed_map_keeps_the_direction_of_each_voxels_response(truth):
    """Signed: positive where the response rises with the feature, the unsigned map's magnitude, and the sign of an
    independent read-out (the signal's correlation with the feature over random images)."""
    rng = np.random.default_rng(5)
    brain_mask, k = truth.anatomy.brain, SEMANTIC_FEATURES.index("blue")
    signed, unsigned = truth.map("blue", signed=True), truth.map("blue")
    np.testing.assert_allclose(np.abs(signed), unsigned, rtol=1e-6)
    assert (signed < 0).any() and (signed > 0).any()
    n = 2000
    semantic = rng.random((n, len(SEMANTIC_FEATURES))).astype(np.float32)
    thumbs = rng.random((n, brain.RF_GRID, brain.RF_GRID, 3)).astype(np.float32)
    signal = brain.image_responses(truth.model, thumbs, semantic)
    f = (semantic[:, k] - semantic[:, k].mean()) / semantic[:, k].std()
    measured = f @ signal / n
    strong = np.abs(signed[brain_mask]) > np.percentile(np.abs(signed[brain_mask]), 75)
    assert (np.sign(measured[strong]) == np.sign(signed[brain_mask][strong])).mean() > 0.95
    np.testing.assert_array_equal(truth.map(LOW_LEVEL, signed=True), truth.map(LOW_LEVEL))


def test_maps_live_on_the_subjects_grid_and_brain(truth):
    for name in FEATURES:
        volume = truth.map(name)
        assert volume.shape == CONFIG.grid(1) and volume.dtype == np.float32
        assert np.all(volume[~truth.anatomy.brain] == 0) and np.all(volume >= 0)
    with pytest.raises(ValueError, match="unknown feature 'banana'"):
        truth.map("banana")
    with pytest.raises(ValueError, match="not in this mini-NSD tree"):
        subject_truth(CONFIG, 5)


def test_rebuilt_from_a_written_tree(tmp_path, truth):
    import json

    root = tmp_path / "mini"
    config = MiniNsdConfig(subjects=(1,), seed=3, sessions=1, images_per_subject=50, num_shared=10,
                           trials_per_session=50)  # fmt: skip
    write_mini_nsd(root, config, progress=False)
    args = {"subject": [1], "sessions": 1, "seed": 3, "num_shared": 10, "images_per_subject": 50,
            "trials_per_session": 50, "grid_scale": config.grid_scale, "nifti_subjects": [1],
            "snr": list(config.snr_range)}  # fmt: skip
    (root / "run.json").write_text(json.dumps({"arguments": args}))  # as make_mini_nsd.py writes it
    rebuilt = subject_truth(tree_config(root), 1)
    mask = nib.load(NsdTree(root).brainmask(1))
    np.testing.assert_array_equal(np.asarray(mask.dataobj) > 0, rebuilt.anatomy.brain)
    np.testing.assert_allclose(mask.affine, rebuilt.affine)
    # The scene features, rebuilt from the seed, say what the written tree's COCO captions say (captions describe
    # the original image, features the visible crop: a cropped-away object is in the captions only).
    from llava_brain.nsd import CocoAnnotations, StimInfo
    from llava_brain.simulate.truth import scene_features

    features = scene_features(tree_config(root))
    info, captions = StimInfo.load(NsdTree(root).stim_info), {}
    for split in ("train2017", "val2017"):
        for image_id, anns in CocoAnnotations.load(NsdTree(root).coco_annotations("captions", split),
                                                   "captions").by_image.items():  # fmt: skip
            captions[int(image_id)] = " ".join(a["caption"].lower() for a in anns)
    assert len(features) == len(info.coco_id)
    for name in ("red", "blue", "circle", "sandy"):
        said = np.array([f" {name} " in captions[int(c)].replace(".", " ") for c in info.coco_id])
        present = features[:, SEMANTIC_FEATURES.index(name)] > 0
        assert said[present].all() and (present == said).mean() > 0.9 and present.any(), name
    # the anatomy and model streams do not depend on the tree's other settings or subjects
    np.testing.assert_array_equal(rebuilt.map("red"), truth.map("red"))
    with pytest.raises(FileNotFoundError, match=r"run\.json: missing"):
        tree_config(tmp_path)


def _on_grid(anatomy, values: np.ndarray, grid) -> np.ndarray:
    """(V, C) per-brain-voxel values as (*grid, C): the subject's volume resized onto another grid (the
    normalised head coordinates scale with the grid, so this compares the same places of two heads)."""
    from scipy.ndimage import zoom

    volume = np.zeros((*anatomy.grid, values.shape[1]), np.float32)
    volume[anatomy.brain] = values
    return zoom(volume, [g / n for g, n in zip(grid, anatomy.grid, strict=True)] + [1], order=1)


def test_subjects_share_the_layout_of_their_semantic_read_outs(truth):
    """At the same place of two heads the semantic read-outs agree (their shared template, 80 % of the variance),
    while the low-level colour tuning, drawn per subject, does not."""
    other = subject_truth(CONFIG, 2)
    grid, inside = truth.anatomy.grid, truth.anatomy.brain
    both = inside & (_on_grid(other.anatomy, np.ones((other.model.baseline.size, 1)), grid)[..., 0] > 0.99)
    for name, mine, theirs in (("semantic", truth.model.semantic, other.model.semantic),
                               ("colour", truth.model.colour, other.model.colour)):  # fmt: skip
        a = _on_grid(truth.anatomy, mine, grid)[both]
        b = _on_grid(other.anatomy, theirs, grid)[both]
        r = np.mean([np.corrcoef(a[:, k], b[:, k])[0, 1] for k in range(a.shape[1])])
        if name == "semantic":
            assert r > 0.5, r
        else:
            assert abs(r) < 0.2, r
