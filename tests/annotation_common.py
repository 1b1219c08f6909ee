"""What the tests of the three per-image model stages share: the stages, their test settings, and helpers.
The fixtures (tiny models, a prepared root, one reference run per stage) are in annotation_fixtures.py.

Every in-process run uses one torch thread (`one_torch_thread`), every subprocess OMP_NUM_THREADS=1 (also what
`accelerate launch` gives each of its processes): CPU kernels may sum in another order with another thread
count, and the tests compare outputs bit for bit.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from llava_brain.annotations import load_captions, load_instances
from llava_brain.io import manifest_of
from llava_brain.layout import DatasetRoot

from conftest import load_script

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
        """What must be identical between runs: everything except provenance (the run.json files)."""
        layout = DatasetRoot(root)
        if self.name == "generate_captions":
            captions = load_captions(layout.captions)
            return {"images": captions.images, "info": captions.info}
        if self.name == "object_detection":
            instances = load_instances(layout.instances)
            return {"images": instances.images, "categories": instances.categories, "info": instances.info}
        files = [layout.clip_embeds, layout.clip_tokens, layout.clip_index, layout.vae_latents, layout.vae_index]
        return {f.relative_to(layout.nsd).as_posix(): f.read_bytes() for f in files}

    def output_files(self, root: Path) -> list[Path]:
        layout = DatasetRoot(root)
        return {
            "generate_captions": [layout.captions],
            "object_detection": [layout.instances],
            "generate_clip_embeds": [layout.clip_index, layout.clip_embeds, layout.vae_latents],
        }[self.name]

    def manifests(self, root: Path) -> list[Path]:
        """The provenance files io.StageRun writes last (their presence marks the outputs complete)."""
        layout = DatasetRoot(root)
        return {
            "generate_captions": [manifest_of(layout.captions)],
            "object_detection": [manifest_of(layout.instances)],
            "generate_clip_embeds": [manifest_of(layout.vision_embeds_dir), manifest_of(layout.vae_embeds_dir)],
        }[self.name]


CAPTIONS = Stage("generate_captions", ".nsd_captions.json.parts")
DETECTION = Stage("object_detection", ".nsd_instances.json.parts")
EMBEDS = Stage("generate_clip_embeds", ".vision_embeds.parts")
STAGES = (CAPTIONS, DETECTION, EMBEDS)
stage_ids = pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)

_SCRIPTS: dict[str, object] = {}


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """One torch thread in this process, also for the stages: their runtime.limit_threads() reads OMP_NUM_THREADS."""
    before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def run_stage(stage: Stage, root: Path, models: Path, *extra: str, **overrides: str) -> int:
    """stage.main in this process (one torch thread); returns its exit code."""
    if stage.name not in _SCRIPTS:
        _SCRIPTS[stage.name] = load_script(stage.script)
    with one_torch_thread():
        return _SCRIPTS[stage.name].main(["--dataset-root", str(root), *stage.args(models, **overrides), *COMMON,
                                          *extra])  # fmt: skip


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


def batches(ids: list[int]) -> list[list[int]]:
    return [ids[i : i + BATCH] for i in range(0, len(ids), BATCH)]


def load_batch(root: Path, ids: list[int]) -> list[Image.Image]:
    """The PNGs of a batch, padded to BATCH with copies of the last one (as the stage does)."""
    images = [Image.open(DatasetRoot(root).image(i)).convert("RGB") for i in ids]
    return images + [images[-1]] * (BATCH - len(images))
