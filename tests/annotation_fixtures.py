"""Fixtures of the per-image model stage tests: tiny models, a prepared root, one reference run per stage.

A pytest plugin (`pytest_plugins = ["annotation_fixtures"]` in test_annotation_stages.py and
test_annotation_reruns.py), so that these session-scoped fixtures are built once for both modules.
The root: the SMALL mini-NSD tree's subjects 1 and 5 (make_subjmri.py) and the PNGs they saw (make_images.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_brain import tiny
from llava_brain.layout import DatasetRoot
from llava_brain.simulate.scenes import SHAPES

from annotation_common import BATCH, CLIP_SIZE, DETR_SIZE, SUBJECTS, VAE_SIZE, Stage, copy_root, run_stage
from conftest import load_script


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Path:
    """Tiny random BLIP-2, DETR, CLIP vision and VAE, each a save_pretrained folder."""
    out = tmp_path_factory.mktemp("tiny_models")
    bpe = tiny.train_byte_bpe([*tiny.INSTRUCTION_SENTENCES], vocab_size=400)
    blip2, processor = tiny.build_blip2(tokenizer=tiny.build_opt_tokenizer(bpe))
    blip2.save_pretrained(out / "blip2")
    processor.save_pretrained(out / "blip2")
    detr, processor = tiny.build_detr(categories=list(SHAPES), image_size=DETR_SIZE)
    detr.save_pretrained(out / "detr")
    processor.save_pretrained(out / "detr")
    clip, processor = tiny.build_clip_vision(image_size=CLIP_SIZE)
    clip.save_pretrained(out / "clip")
    processor.save_pretrained(out / "clip")
    tiny.build_vae(image_size=VAE_SIZE).save_pretrained(out / "vae")
    return out


@pytest.fixture(scope="session")
def prepared(small_tree, tmp_path_factory) -> Path:
    """A prepared root: subjects 1 and 5 (make_subjmri.py) and the PNGs they saw (make_images.py)."""
    root = tmp_path_factory.mktemp("prepared") / "root"
    common = ["--nsd-root", str(small_tree.root), "--dataset-root", str(root), "--subject", *map(str, SUBJECTS)]
    assert load_script("prepare_datasets/make_subjmri.py").main([*common, "--quiet"]) == 0
    assert load_script("prepare_datasets/make_images.py").main([*common, "--quiet"]) == 0
    return root


@pytest.fixture(scope="session")
def selection(prepared) -> list[int]:
    """The union of train and val of every prepared subject's nsd_fmri2image.json, sorted."""
    layout = DatasetRoot(prepared)
    ids = set()
    for subject in SUBJECTS:
        mapping = json.loads(layout.fmri2image(subject).read_text())
        ids.update(mapping["train"] + mapping["val"])
    ids = sorted(ids)
    assert len(ids) > 3 * BATCH and len(ids) % BATCH, "need several batches and a short last one"
    return ids


@pytest.fixture(scope="session")
def reference(prepared, models, tmp_path_factory):
    """Root of one uninterrupted in-process run of a stage (computed once per stage and session); do not write
    into it."""
    done: dict[str, Path] = {}

    def get(stage: Stage) -> Path:
        if stage.name not in done:
            root = copy_root(prepared, tmp_path_factory.mktemp(f"ref_{stage.name}") / "root")
            assert run_stage(stage, root, models) == 0
            done[stage.name] = root
        return done[stage.name]

    return get


@pytest.fixture
def root(prepared, tmp_path) -> Path:
    """A fresh copy of the prepared root for a test that writes."""
    return copy_root(prepared, tmp_path / "root")
