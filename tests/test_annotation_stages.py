"""The three per-image model stages end to end on a small prepared root with tiny random models:
generate_captions.py (BLIP-2), object_detection.py (DETR), generate_clip_embeds.py (CLIP + VAE).

Here: output schema and values (against direct forward passes of the same models, bit for bit where the
stage's arithmetic is the same: one torch thread everywhere), and the one-line errors of bad input, all before
a model loads. Kill and resume, two processes, reruns: test_annotation_reruns.py. Shared:
annotation_common.py, annotation_fixtures.py.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from llava_brain import image_stage
from llava_brain.annotations import load_captions, load_instances
from llava_brain.io import manifest_of
from llava_brain.layout import DatasetRoot

from annotation_common import (
    BATCH,
    CAPTIONS,
    CLIP_SIZE,
    DETECTION,
    EMBEDS,
    MAX_NEW_TOKENS,
    NUM_CAPTIONS,
    SUBJECTS,
    THRESHOLD,
    VAE_SIZE,
    batches,
    error_line,
    load_batch,
    one_torch_thread,
    run_stage,
    stage_ids,
)

pytest_plugins = ["annotation_fixtures"]  # tiny models, the prepared root and reference runs, once a session


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The direct forward passes below run with one thread, as the stages did."""
    with one_torch_thread():
        yield


# 1. Schema, counts and values --------------------------------------------------------------------


def test_captions_schema_and_counts(reference, selection, models):
    captions = load_captions(DatasetRoot(reference(CAPTIONS)).captions)
    assert list(captions.images) == selection
    for nsd_id, texts in captions.images.items():
        assert len(texts) == NUM_CAPTIONS, nsd_id
        assert all(isinstance(t, str) and t == t.strip() for t in texts), nsd_id
    settings = captions.info["settings"]
    assert settings["num_captions"] == NUM_CAPTIONS and settings["batch_size"] == BATCH and settings["seed"] == 0
    assert settings["subject"] == list(SUBJECTS) and settings["num_images"] == len(selection)
    assert settings["precision"] == "fp32" and set(captions.info) == {"source", "settings"}
    manifest = json.loads(manifest_of(DatasetRoot(reference(CAPTIONS)).captions).read_text())
    assert manifest["settings"] == settings and {"argv", "finished_at", "git_sha", "versions"} <= set(manifest)
    files = image_stage.model_files(str(models / "blip2"))  # config, weights, processor: all fingerprinted
    assert "config.json" in {f.name for f in files} and len(manifest["inputs"]["model"]) == len(files)
    assert not (DatasetRoot(reference(CAPTIONS)).nsd / CAPTIONS.parts).exists()


def test_captions_equal_seeded_generation_of_the_padded_batch(reference, models, selection):
    """The short last batch: padded to BATCH, sampled after seeding with batch_seed(seed, batch index)."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    root = reference(CAPTIONS)
    stored = load_captions(DatasetRoot(root).captions).images
    model = Blip2ForConditionalGeneration.from_pretrained(models / "blip2").eval()
    processor = Blip2Processor.from_pretrained(models / "blip2")
    for index in (0, len(batches(selection)) - 1):
        ids = batches(selection)[index]
        inputs = processor(images=load_batch(root, ids), return_tensors="pt")
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.manual_seed(image_stage.batch_seed(0, index))
            generated = model.generate(**inputs, do_sample=True, num_return_sequences=NUM_CAPTIONS,
                                       max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, top_p=0.9)  # fmt: skip
        texts = [t.strip() for t in processor.tokenizer.batch_decode(generated, skip_special_tokens=True)]
        expected = {i: texts[k * NUM_CAPTIONS : (k + 1) * NUM_CAPTIONS] for k, i in enumerate(ids)}
        assert {i: stored[i] for i in ids} == expected, f"batch {index}"


def test_instances_schema_and_values(reference, models, selection):
    from transformers import DetrConfig

    instances = load_instances(DatasetRoot(reference(DETECTION)).instances)
    id2label = {int(k): v for k, v in DetrConfig.from_pretrained(models / "detr").id2label.items() if v != "N/A"}
    assert instances.categories == id2label
    assert list(instances.images) == selection
    objects = [o for objs in instances.images.values() for o in objs]
    assert objects, "the threshold should keep some objects"
    for o in objects:
        x1, y1, x2, y2 = o["box"]
        assert 0 <= x1 <= x2 <= 425 and 0 <= y1 <= y2 <= 425, o
        assert id2label[o["category_id"]] == o["category"] and o["iscrowd"] == 0
        assert THRESHOLD <= o["score"] <= 1
    for objs in instances.images.values():
        assert [o["score"] for o in objs] == sorted((o["score"] for o in objs), reverse=True)
    assert "box_format" in instances.info and instances.info["settings"]["threshold"] == THRESHOLD


def test_instances_equal_post_processed_forward(reference, models, selection):
    from transformers import DetrForObjectDetection, DetrImageProcessor

    root = reference(DETECTION)
    stored = load_instances(DatasetRoot(root).instances).images
    model = DetrForObjectDetection.from_pretrained(models / "detr").eval()
    processor = DetrImageProcessor.from_pretrained(models / "detr")
    for index in (1, len(batches(selection)) - 1):
        ids = batches(selection)[index]
        images = load_batch(root, ids)
        with torch.inference_mode():
            outputs = model(**processor(images=images, return_tensors="pt"))
        results = processor.post_process_object_detection(
            outputs, threshold=THRESHOLD, target_sizes=[(im.height, im.width) for im in images]
        )
        for nsd_id, result in zip(ids, results, strict=False):
            expected = []
            for score, label, box in zip(result["scores"], result["labels"], result["boxes"], strict=True):
                if model.config.id2label[int(label)] == "N/A":
                    continue
                box = np.clip(box.numpy(), 0, 425)
                if box[2] > box[0] and box[3] > box[1]:
                    expected.append((int(label), box, float(score)))
            expected.sort(key=lambda e: -e[2])
            got = stored[nsd_id]
            assert [o["category_id"] for o in got] == [e[0] for e in expected], nsd_id
            np.testing.assert_allclose([o["box"] for o in got], [e[1] for e in expected], atol=0.006)
            np.testing.assert_allclose([o["score"] for o in got], [e[2] for e in expected], atol=6e-5)


def test_embeddings_schema(reference, models, selection):
    from transformers import CLIPVisionConfig

    nsd = DatasetRoot(reference(EMBEDS)).nsd
    config = CLIPVisionConfig.from_pretrained(models / "clip")
    n, tokens = len(selection), (CLIP_SIZE // config.patch_size) ** 2 + 1
    clip = np.load(nsd / "vision_embeds" / "clip_image_embeds.npy")
    toks = np.load(nsd / "vision_embeds" / "clip_tokens.npy")
    vae = np.load(nsd / "vae_embeds" / "vae_latents.npy")
    assert clip.shape == (n, config.projection_dim) and clip.dtype == np.float32
    assert toks.shape == (n, tokens, config.hidden_size) and toks.dtype == np.float16
    factor = 4  # tiny.build_vae: 3 blocks, two downsamplings
    assert vae.shape == (n, 4, VAE_SIZE // factor, VAE_SIZE // factor) and vae.dtype == np.float32
    for array in (clip, toks, vae):
        assert np.isfinite(array).all()
        assert len(np.unique(array.reshape(n, -1), axis=0)) == n  # no two rows alike: every row is its image's
    index = json.loads((nsd / "vision_embeds" / "index.json").read_text())
    vae_index = json.loads((nsd / "vae_embeds" / "index.json").read_text())
    assert index["nsd_ids"] == vae_index["nsd_ids"] == selection
    assert index["arrays"] == {
        "clip_image_embeds.npy": {"shape": list(clip.shape), "dtype": "float32"},
        "clip_tokens.npy": {"shape": list(toks.shape), "dtype": "float16"},
    }
    assert vae_index["arrays"] == {"vae_latents.npy": {"shape": list(vae.shape), "dtype": "float32"}}
    assert index["settings"]["tokens"] is True and index["settings"]["vae_size"] == VAE_SIZE
    assert (nsd / "vision_embeds" / "run.json").is_file() and (nsd / "vae_embeds" / "run.json").is_file()
    assert not (nsd / EMBEDS.parts).exists()
    assert not [p.name for p in nsd.rglob("*.tmp*")]


def test_embeddings_equal_direct_forward(reference, models, selection):
    from diffusers import AutoencoderKL
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    root = reference(EMBEDS)
    nsd = DatasetRoot(root).nsd
    clip_rows = np.load(nsd / "vision_embeds" / "clip_image_embeds.npy")
    token_rows = np.load(nsd / "vision_embeds" / "clip_tokens.npy")
    vae_rows = np.load(nsd / "vae_embeds" / "vae_latents.npy")
    row = {nsd_id: r for r, nsd_id in enumerate(selection)}
    clip = CLIPVisionModelWithProjection.from_pretrained(models / "clip").eval()
    processor = CLIPImageProcessor.from_pretrained(models / "clip")
    vae = AutoencoderKL.from_pretrained(models / "vae").eval()
    assert json.loads((nsd / "vae_embeds" / "index.json").read_text())["scaling_factor"] == vae.config.scaling_factor
    for index in (2, len(batches(selection)) - 1):
        ids = batches(selection)[index]
        rows = [row[i] for i in ids]
        images = load_batch(root, ids)
        with torch.inference_mode():
            out = clip(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"],
                       output_hidden_states=True)  # fmt: skip
            resized = [np.asarray(im.resize((VAE_SIZE, VAE_SIZE), Image.Resampling.BICUBIC)) for im in images]
            x = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            latents = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
            single = clip(pixel_values=processor(images=images[:1], return_tensors="pt")["pixel_values"])
        n = len(ids)
        np.testing.assert_allclose(clip_rows[rows], out.image_embeds[:n].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(token_rows[rows], out.hidden_states[-2][:n].numpy().astype(np.float16))
        np.testing.assert_allclose(vae_rows[rows], latents[:n].numpy(), rtol=1e-5, atol=1e-6)
        # An image alone (batch of 1) gives the same embedding up to float rounding.
        np.testing.assert_allclose(clip_rows[rows[0]], single.image_embeds[0].numpy(), rtol=1e-4, atol=1e-5)


def test_vae_of_a_pipeline_folder(root, models, reference, tmp_path):
    """--vae-model may be a Stable unCLIP pipeline folder (model_index.json): its vae/ is loaded and fingerprinted."""
    pipeline = tmp_path / "unclip"
    shutil.copytree(models / "vae", pipeline / "vae")
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "StableUnCLIPImg2ImgPipeline"}))
    assert run_stage(EMBEDS, root, models, **{"vae-model": str(pipeline)}) == 0
    layout, expected = DatasetRoot(root), DatasetRoot(reference(EMBEDS))
    assert layout.vae_latents.read_bytes() == expected.vae_latents.read_bytes()
    inputs = json.loads(manifest_of(layout.vae_embeds_dir).read_text())["inputs"]
    assert len(inputs["vae_model"]) == len(image_stage.model_files(str(pipeline), "vae")) > 0


# 2. Errors ---------------------------------------------------------------------------------------


@stage_ids
def test_subject_not_prepared_is_one_line_before_any_model_loads(stage, root, models, capsys):
    assert run_stage(stage, root, models, "--subject", "9") == 2
    line = error_line(capsys)
    assert str(DatasetRoot(root).fmris_dir) in line and "has no subj09" in line
    assert not (DatasetRoot(root).nsd / stage.parts).exists()


@pytest.mark.parametrize("folder", ["vision_embeds", "vae_embeds"])
def test_output_folder_that_is_a_file_is_one_line_before_any_model_loads(folder, root, models, capsys):
    """An output location that cannot be written (here: a regular file where the folder goes) stops the
    stage before the models load; tests run as root, so a read-only folder would not stop them."""
    blocker = DatasetRoot(root).nsd / folder
    blocker.write_text("not a folder")
    assert run_stage(EMBEDS, root, models) == 2
    line = error_line(capsys)
    assert str(blocker) in line and "is a file, not a folder" in line
    assert not (DatasetRoot(root).nsd / EMBEDS.parts).exists() and blocker.read_text() == "not a folder"


@stage_ids
def test_missing_png_is_one_line_naming_it(stage, root, models, selection, capsys):
    png = DatasetRoot(root).image(selection[7])
    png.unlink()
    assert run_stage(stage, root, models) == 2
    line = error_line(capsys)
    assert str(png) in line and "missing" in line
    assert not any(p.exists() for p in stage.output_files(root))


@stage_ids
def test_unreadable_png_is_one_line_naming_it(stage, root, models, selection, capsys):
    png = DatasetRoot(root).image(selection[-2])  # in the last batch: earlier batches are stored first
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    workers = "1" if stage is DETECTION else "0"  # the error also crosses a DataLoader worker's boundary
    assert run_stage(stage, root, models, "--num-workers", workers) == 2
    line = error_line(capsys)
    assert str(png) in line and "unreadable PNG" in line
    assert not any(p.exists() for p in stage.output_files(root))


@pytest.mark.parametrize(
    ("stage", "flag", "folder"),
    [
        (CAPTIONS, "model", "detr"),
        (DETECTION, "model", "clip"),
        (EMBEDS, "clip-model", "blip2"),
        (EMBEDS, "vae-model", "clip"),
    ],
    ids=["captions-detr", "detection-clip", "clip-blip2", "vae-clip"],
)
def test_model_folder_of_the_wrong_class(stage, flag, folder, root, models, capsys):
    assert run_stage(stage, root, models, **{flag: str(models / folder)}) == 2
    line = error_line(capsys)
    assert str(models / folder / "config.json") in line and "expected" in line
    assert not any(p.exists() for p in stage.output_files(root))


@pytest.mark.parametrize(
    ("stage", "flag"),
    [(CAPTIONS, "model"), (DETECTION, "model"), (EMBEDS, "clip-model"), (EMBEDS, "vae-model")],
    ids=["captions", "detection", "clip", "vae"],
)
def test_hub_id_that_cannot_be_loaded_offline(stage, flag, root, models, capsys, monkeypatch):
    # A hub id passes the folder check; offline and uncached, from_pretrained fails: one line, exit 2.
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: in this process its constant must be set too
    # (else each lookup waits for network timeouts, ~45 s).
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert run_stage(stage, root, models, **{flag: "nobody-here/no-such-model"}) == 2
    line = error_line(capsys)
    assert line.startswith("error: nobody-here/no-such-model: could not be loaded as") and "local folder" in line
    assert not any(p.exists() for p in stage.output_files(root))
