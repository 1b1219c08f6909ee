"""The three per-image model stages end to end on a small prepared root with tiny random models:
generate_captions.py (BLIP-2), object_detection.py (DETR), generate_clip_embeds.py (CLIP + VAE).

What is checked: output schema and values (against direct forward passes of the same models), kill
and resume, two processes under `accelerate launch`, one-line errors, rerun/--overwrite.

Every run here uses one torch thread per process (in-process: torch.set_num_threads(1); subprocesses:
OMP_NUM_THREADS=1, which is also what `accelerate launch` gives each of its processes): CPU kernels
may sum in another order with another thread count, and the comparisons below are bit for bit
(a default single process on 2 cores, 2 threads, differs from the 2-process run in the last float bits).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llava_brain import image_stage, tiny
from llava_brain.annotations import load_captions, load_instances
from llava_brain.layout import DatasetRoot
from llava_brain.simulate.scenes import SHAPES

from conftest import REPO, load_script

SUBJECTS = (1, 5)
BATCH = 5  # the SMALL tree's 68 images -> 14 batches, the last one short (3 images, padded to 5)
NUM_CAPTIONS = 3
MAX_NEW_TOKENS = 5
THRESHOLD = 0.16  # the random tiny DETR scores its objects ~0.15-0.17: some are kept, some dropped
CLIP_SIZE, VAE_SIZE, DETR_SIZE = 32, 32, 64
COMMON = ["--batch-size", str(BATCH), "--num-workers", "0", "--device", "cpu", "--quiet"]


# Stages ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    name: str  # script stem under prepare_datasets/
    parts: str  # work folder, relative to <root>/nsd/

    @property
    def script(self) -> str:
        return f"prepare_datasets/{self.name}.py"

    def args(self, models: Path, **overrides: str) -> list[str]:
        """The stage's model arguments (overrides replace defaults: flag without its leading dashes -> value)."""
        model_args = {
            "generate_captions": {"model": models / "blip2", "num-captions": NUM_CAPTIONS,
                                  "max-new-tokens": MAX_NEW_TOKENS},
            "object_detection": {"model": models / "detr", "threshold": THRESHOLD},
            "generate_clip_embeds": {"clip-model": models / "clip", "vae-model": models / "vae",
                                     "vae-size": VAE_SIZE},
        }[self.name]  # fmt: skip
        model_args.update(overrides)
        out = [f for k, v in model_args.items() for f in (f"--{k}", str(v))]
        return out + (["--tokens"] if self.name == "generate_clip_embeds" else [])

    def outputs(self, root: Path) -> dict:
        """What must be identical between runs: everything except provenance (info.run, run.json)."""
        nsd = DatasetRoot(root).nsd
        if self.name == "generate_captions":
            captions = load_captions(nsd / "nsd_captions.json")
            return {"images": captions.images, "settings": captions.info["settings"]}
        if self.name == "object_detection":
            instances = load_instances(nsd / "nsd_instances.json")
            return {"images": instances.images, "categories": instances.categories,
                    "settings": instances.info["settings"]}  # fmt: skip
        files = [f"vision_embeds/{n}" for n in ("clip_image_embeds.npy", "clip_tokens.npy", "index.json")]
        files += ["vae_embeds/vae_latents.npy", "vae_embeds/index.json"]
        return {f: (nsd / f).read_bytes() for f in files}

    def output_files(self, root: Path) -> list[Path]:
        nsd = DatasetRoot(root).nsd
        return {
            "generate_captions": [nsd / "nsd_captions.json"],
            "object_detection": [nsd / "nsd_instances.json"],
            "generate_clip_embeds": [nsd / "vision_embeds" / "index.json",
                                     nsd / "vision_embeds" / "clip_image_embeds.npy",
                                     nsd / "vae_embeds" / "vae_latents.npy"],
        }[self.name]  # fmt: skip


CAPTIONS = Stage("generate_captions", ".nsd_captions.json.parts")
DETECTION = Stage("object_detection", ".nsd_instances.json.parts")
EMBEDS = Stage("generate_clip_embeds", ".vision_embeds.parts")
STAGES = (CAPTIONS, DETECTION, EMBEDS)
stage_ids = pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)

_SCRIPTS: dict[str, object] = {}


def run_stage(stage: Stage, root: Path, models: Path, *extra: str, **overrides: str) -> int:
    """stage.main in this process (one torch thread); returns its exit code."""
    if stage.name not in _SCRIPTS:
        _SCRIPTS[stage.name] = load_script(stage.script)
    return _SCRIPTS[stage.name].main(["--dataset-root", str(root), *stage.args(models, **overrides), *COMMON, *extra])


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def copy_root(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest, symlinks=True)
    return dest


def error_line(capsys) -> str:
    """The one line a bad input leaves on stderr ("error: <path>: ..."); with --quiet nothing else is there."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one error line on stderr; got {lines}"
    return lines[0]


# Fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
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


@pytest.fixture(scope="module")
def prepared(small_tree, tmp_path_factory) -> Path:
    """A prepared root: subjects 1 and 5 (make_subjmri.py) and the PNGs they saw (make_images.py)."""
    root = tmp_path_factory.mktemp("prepared") / "root"
    common = ["--nsd-root", str(small_tree.root), "--dataset-root", str(root), "--subject", *map(str, SUBJECTS)]
    assert load_script("prepare_datasets/make_subjmri.py").main([*common, "--quiet"]) == 0
    assert load_script("prepare_datasets/make_images.py").main([*common, "--quiet"]) == 0
    return root


@pytest.fixture(scope="module")
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


@pytest.fixture(scope="module")
def reference(prepared, models, tmp_path_factory):
    """Root of one uninterrupted in-process run of a stage (computed once per stage); do not write into it."""
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


def batches(ids: list[int]) -> list[list[int]]:
    return [ids[i : i + BATCH] for i in range(0, len(ids), BATCH)]


def load_batch(root: Path, ids: list[int]) -> list[Image.Image]:
    """The PNGs of a batch, padded to BATCH with copies of the last one (as the stage does)."""
    images = [Image.open(DatasetRoot(root).image(i)).convert("RGB") for i in ids]
    return images + [images[-1]] * (BATCH - len(images))


# 1. Schema, counts and values --------------------------------------------------------------------


def test_captions_schema_and_counts(reference, selection):
    captions = load_captions(DatasetRoot(reference(CAPTIONS)).captions)
    assert list(captions.images) == selection
    for nsd_id, texts in captions.images.items():
        assert len(texts) == NUM_CAPTIONS, nsd_id
        assert all(isinstance(t, str) and t == t.strip() for t in texts), nsd_id
    settings = captions.info["settings"]
    assert settings["num_captions"] == NUM_CAPTIONS and settings["batch_size"] == BATCH and settings["seed"] == 0
    assert {"argv", "finished_at"} <= set(captions.info["run"])
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


# 2. Kill and resume ------------------------------------------------------------------------------


def wait_for_parts(proc: subprocess.Popen, parts: Path, pattern: str, min_lines: int, timeout: float = 120) -> None:
    """Poll until the part files matching `pattern` hold `min_lines` lines (then return), or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = sum(p.read_bytes().count(b"\n") for p in parts.glob(pattern)) if parts.is_dir() else 0
        if lines >= min_lines:
            return
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"the stage exited ({proc.returncode}) before it could be killed:\n{out[-3000:]}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"no {min_lines} lines in {parts}/{pattern} after {timeout} s")


def count_calls(monkeypatch, cls, name: str) -> list[int]:
    """Count calls of cls.name (a method storing one batch); returns a one-element counter."""
    calls = [0]
    original = getattr(cls, name)

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, counted)
    return calls


def test_embeddings_sigkill_and_resume(root, models, reference, selection, monkeypatch):
    """A real SIGKILL after the first stored batch; the rerun stores only what is missing."""
    parts = DatasetRoot(root).nsd / EMBEDS.parts
    cmd = [sys.executable, EMBEDS.script, "--dataset-root", str(root), *EMBEDS.args(models), *COMMON]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    try:
        wait_for_parts(proc, parts, "part-*.ids.jsonl", BATCH)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (DatasetRoot(root).vision_embeds_dir / "index.json").exists()
    stored = sum(1 for _ in (parts / "part-000.ids.jsonl").open())
    assert BATCH <= stored < len(selection)

    calls = count_calls(monkeypatch, image_stage.ArrayParts, "add")
    assert run_stage(EMBEDS, root, models) == 0
    assert calls[0] <= len(batches(selection)) - stored // BATCH  # stored batches are not recomputed
    assert EMBEDS.outputs(root) == EMBEDS.outputs(reference(EMBEDS))
    assert not parts.exists()


class Crash(Exception):
    pass


def crash_after(monkeypatch, cls, name: str, k: int) -> None:
    """Make cls.name (storing one batch) raise on its call k + 1: k batches are stored, then the run dies."""
    calls = [0]
    original = getattr(cls, name)

    def crashing(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] > k:
            raise Crash(f"simulated crash after {k} batches")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, crashing)


@pytest.mark.parametrize("stage", [CAPTIONS, DETECTION], ids=lambda s: s.name)
def test_crash_and_resume(stage, root, models, reference, selection, monkeypatch):
    parts = DatasetRoot(root).nsd / stage.parts
    with monkeypatch.context() as patch:
        crash_after(patch, image_stage.RecordParts, "add", 3)
        with pytest.raises(Crash):
            run_stage(stage, root, models)
    assert sum(1 for _ in (parts / "part-000.jsonl").open()) == 3 * BATCH
    assert not stage.output_files(root)[0].exists()
    calls = count_calls(monkeypatch, image_stage.RecordParts, "add")
    assert run_stage(stage, root, models) == 0
    assert calls[0] == len(batches(selection)) - 3
    assert stage.outputs(root) == stage.outputs(reference(stage))
    assert not parts.exists()


def test_resume_with_other_settings_does_not_mix_results(root, models, monkeypatch):
    """A run killed with --num-captions 2 and rerun with 3: every image must get 3 captions (not the
    2 of the killed run's stored batches), or the rerun must refuse the stale work folder."""
    with monkeypatch.context() as patch:
        crash_after(patch, image_stage.RecordParts, "add", 2)
        with pytest.raises(Crash):
            run_stage(CAPTIONS, root, models, **{"num-captions": "2"})
    code = run_stage(CAPTIONS, root, models)
    if code == 0:
        counts = {len(c) for c in load_captions(DatasetRoot(root).captions).images.values()}
        assert counts == {NUM_CAPTIONS}, f"captions per image: {sorted(counts)} (stale parts of the killed run merged)"
    else:
        assert code == 2


def test_embeddings_resume_with_other_vae_size_does_not_reuse_rows(root, prepared, models, monkeypatch, tmp_path):
    """Rows of a killed --vae-size 32 run (4 x 8 x 8 floats) must not be cut and reread as --vae-size 16
    rows (4 x 4 x 4): the rerun must equal a clean --vae-size 16 run, or refuse the stale work folder."""
    with monkeypatch.context() as patch:
        crash_after(patch, image_stage.ArrayParts, "add", 2)
        with pytest.raises(Crash):
            run_stage(EMBEDS, root, models)
    code = run_stage(EMBEDS, root, models, **{"vae-size": "16"})
    if code == 0:
        clean = copy_root(prepared, tmp_path / "clean")
        assert run_stage(EMBEDS, clean, models, **{"vae-size": "16"}) == 0
        got, expected = EMBEDS.outputs(root), EMBEDS.outputs(clean)
        assert got["vae_embeds/vae_latents.npy"] == expected["vae_embeds/vae_latents.npy"], (
            "the first batches' latents are rows of the killed --vae-size 32 run, truncated and reread"
        )
        assert got == expected
    else:
        assert code == 2


# 3. Two processes --------------------------------------------------------------------------------


def launch_two(stage: Stage, root: Path, models: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           stage.script, "--dataset-root", str(root), *stage.args(models), *COMMON]  # fmt: skip
    env = {**subprocess_env(), "ACCELERATE_USE_CPU": "true"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@stage_ids
def test_two_processes_give_the_same_outputs(stage, root, models, reference):
    done = launch_two(stage, root, models)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stderr
    assert stage.outputs(root) == stage.outputs(reference(stage))
    assert not (DatasetRoot(root).nsd / stage.parts).exists()


# 4. Errors ---------------------------------------------------------------------------------------


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
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert run_stage(stage, root, models, **{flag: "nobody-here/no-such-model"}) == 2
    line = error_line(capsys)
    assert line.startswith("error: nobody-here/no-such-model: could not be loaded as") and "local folder" in line
    assert not any(p.exists() for p in stage.output_files(root))


@pytest.mark.parametrize(
    ("stage", "override", "output"),
    [
        (CAPTIONS, {"num-captions": "2"}, "nsd_captions.json"),
        (DETECTION, {"threshold": "0.5"}, "nsd_instances.json"),
        (EMBEDS, {"vae-size": "16"}, "vision_embeds/index.json"),
    ],
    ids=["captions-num-captions", "detection-threshold", "embeds-vae-size"],
)
def test_rerun_with_other_settings_needs_overwrite(stage, override, output, reference, models, tmp_path, capsys):
    root = copy_root(reference(stage), tmp_path / "root")
    before = stage.outputs(root)
    assert run_stage(stage, root, models, **override) == 2
    line = error_line(capsys)
    assert str(DatasetRoot(root).nsd / output) in line and "--overwrite" in line
    assert stage.outputs(root) == before
    # Other images (subject 1 only) are other settings too.
    assert run_stage(stage, root, models, "--subject", "1") == 2
    assert "--overwrite" in error_line(capsys)


# 5. Rerun and --overwrite ------------------------------------------------------------------------


def write_stale_parts(stage: Stage, root: Path, ids: list[int], reference_root: Path) -> None:
    """A work folder left by a killed run: records/rows for `ids` in rank 0's part files, all wrong."""
    parts = DatasetRoot(root).nsd / stage.parts
    parts.mkdir()
    if stage is EMBEDS:
        nsd = DatasetRoot(reference_root).nsd
        arrays = {"clip": np.load(nsd / "vision_embeds" / "clip_image_embeds.npy"),
                  "tokens": np.load(nsd / "vision_embeds" / "clip_tokens.npy"),
                  "vae": np.load(nsd / "vae_embeds" / "vae_latents.npy")}  # fmt: skip
        for kind, array in arrays.items():
            (parts / f"part-000.{kind}.bin").write_bytes(np.zeros_like(array[: len(ids)]).tobytes())
        (parts / "part-000.ids.jsonl").write_text("".join(f"{i}\n" for i in ids))
    else:
        stale = {"captions": ["stale"] * NUM_CAPTIONS, "objects": []}
        (parts / "part-000.jsonl").write_text("".join(json.dumps({"nsd_id": i, **stale}) + "\n" for i in ids))


@stage_ids
def test_rerun_does_nothing_and_overwrite_recomputes(stage, reference, models, selection, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    root = copy_root(reference(stage), tmp_path / "root")
    files = stage.output_files(root)
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    assert run_stage(stage, root, models) == 0
    assert "nothing to do" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes
    # A work folder left by a killed run must not leak into the recomputed output.
    write_stale_parts(stage, root, batches(selection)[0], reference(stage))
    time.sleep(0.01)
    assert run_stage(stage, root, models, "--overwrite") == 0
    assert all(p.stat().st_mtime_ns > mtimes[p] for p in files)
    assert stage.outputs(root) == stage.outputs(reference(stage))
    assert not (DatasetRoot(root).nsd / stage.parts).exists()


# 6. Other settings ---------------------------------------------------------------------------------


def test_bf16_with_tokens(root, models, reference):
    """--dtype bf16 --tokens (a GPU setting, also valid on CPU) stores the tokens as float16 like fp32 does."""
    code = run_stage(EMBEDS, root, models, "--dtype", "bf16", "--no-vae")
    assert code == 0
    nsd, ref = DatasetRoot(root).nsd, DatasetRoot(reference(EMBEDS)).nsd
    for name in ("clip_image_embeds.npy", "clip_tokens.npy"):
        got, expected = np.load(nsd / "vision_embeds" / name), np.load(ref / "vision_embeds" / name)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), rtol=0.05, atol=0.05)
