"""The three per-image model stages over time: kill and resume (a real SIGKILL and a crash), two processes
under `accelerate launch`, and the rerun rule (io.StageRun: `<output>.run.json` beside a file output,
`<folder>/run.json` in a folder output): a current output is skipped, one made with other settings or from a
changed model is refused with the reason, --overwrite recomputes. Shared: annotation_common.py,
annotation_fixtures.py.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llava_brain import image_stage
from llava_brain.annotations import load_captions, load_instances
from llava_brain.io import manifest_of
from llava_brain.layout import DatasetRoot

from annotation_common import (
    BATCH,
    CAPTIONS,
    COMMON,
    DETECTION,
    EMBEDS,
    NUM_CAPTIONS,
    Stage,
    batches,
    copy_root,
    error_line,
    run_stage,
    stage_ids,
    subprocess_env,
)
from conftest import REPO

pytest_plugins = ["annotation_fixtures"]  # tiny models, the prepared root and reference runs, once a session


# 1. Kill and resume ------------------------------------------------------------------------------


# Runs `script` as __main__ with the given arguments; the process SIGKILLs itself right after its
# `batches`-th batch is stored: a real kill at a point the test chooses, whatever the machine's speed.
KILL_AFTER_BATCHES = """
import os, runpy, signal, sys
from llava_brain.image_stage import ArrayParts
script, batches, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
original, stored = ArrayParts.add, []
def add(self, *a, **k):
    original(self, *a, **k)
    stored.append(1)
    if len(stored) == batches:
        os.kill(os.getpid(), signal.SIGKILL)
ArrayParts.add = add
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
"""


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
    """A real SIGKILL after the second stored batch; the rerun stores only what is missing."""
    parts = DatasetRoot(root).nsd / EMBEDS.parts
    cmd = [sys.executable, "-c", KILL_AFTER_BATCHES, EMBEDS.script, "2",
           "--dataset-root", str(root), *EMBEDS.args(models), *COMMON]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert not any(p.exists() for p in EMBEDS.manifests(root)) and not DatasetRoot(root).clip_index.exists()
    assert sum(1 for _ in (parts / "part-000.ids.jsonl").open()) == 2 * BATCH

    calls = count_calls(monkeypatch, image_stage.ArrayParts, "add")
    assert run_stage(EMBEDS, root, models) == 0
    assert calls[0] == len(batches(selection)) - 2  # stored batches are not recomputed
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


# 2. Two processes --------------------------------------------------------------------------------


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


# 3. Rerun with other settings or inputs ---------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "override", "reason"),
    [
        (CAPTIONS, {"num-captions": "2"}, "setting num_captions 3 -> 2"),
        (DETECTION, {"threshold": "0.5"}, "setting threshold 0.16 -> 0.5"),
        (EMBEDS, {"vae-size": "16"}, "setting vae_size 32 -> 16"),
    ],
    ids=["captions-num-captions", "detection-threshold", "embeds-vae-size"],
)
def test_rerun_with_other_settings_refuses_with_the_reason(stage, override, reason, reference, models, tmp_path,
                                                           capsys):  # fmt: skip
    root = copy_root(reference(stage), tmp_path / "root")
    before = stage.outputs(root)
    assert run_stage(stage, root, models, **override) == 2
    line = error_line(capsys)
    assert str(stage.manifests(root)[0]) in line and reason in line and "--overwrite" in line
    assert stage.outputs(root) == before
    # Other images (subject 1 only) are other settings too.
    assert run_stage(stage, root, models, "--subject", "1") == 2
    line = error_line(capsys)
    assert "setting subject [1, 5] -> [1]" in line and "--overwrite" in line


def test_rerun_after_the_model_changed_refuses_then_overwrite_recomputes(prepared, models, tmp_path, capsys):
    """The model's files are inputs: a changed detector (same folder, same settings) is not 'already done'."""
    root, detr = copy_root(prepared, tmp_path / "root"), tmp_path / "detr"
    shutil.copytree(models / "detr", detr)
    assert run_stage(DETECTION, root, models, "--subject", "1", model=detr) == 0
    config = json.loads((detr / "config.json").read_text())
    first = next(iter(config["id2label"]))  # rename one category: same shapes, other output
    (detr / "config.json").write_text(json.dumps({**config, "id2label": {**config["id2label"], first: "renamed"}}))
    assert run_stage(DETECTION, root, models, "--subject", "1", model=detr) == 2
    line = error_line(capsys)
    assert str(manifest_of(DatasetRoot(root).instances)) in line and "input model changed" in line
    assert run_stage(DETECTION, root, models, "--subject", "1", "--overwrite", model=detr) == 0
    assert "renamed" in load_instances(DatasetRoot(root).instances).categories.values()


# 4. Rerun and --overwrite ------------------------------------------------------------------------


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


def file_ids(paths: list[Path]) -> dict[Path, tuple[int, int]]:
    """(inode, mtime) per file: an atomic rewrite (temp file renamed over it) always gives a new inode."""
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


@stage_ids
def test_rerun_does_nothing_and_overwrite_recomputes(stage, reference, models, selection, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    root = copy_root(reference(stage), tmp_path / "root")
    files = stage.output_files(root) + stage.manifests(root)
    before = file_ids(files)
    assert run_stage(stage, root, models) == 0
    assert "nothing to do" in caplog.text
    assert file_ids(files) == before
    # A work folder left by a killed run must not leak into the recomputed output.
    write_stale_parts(stage, root, batches(selection)[0], reference(stage))
    assert run_stage(stage, root, models, "--overwrite") == 0
    after = file_ids(files)
    assert all(after[p][0] != before[p][0] for p in files)  # every output and manifest rewritten
    assert stage.outputs(root) == stage.outputs(reference(stage))
    assert not (DatasetRoot(root).nsd / stage.parts).exists()


# 5. Other settings ---------------------------------------------------------------------------------


def test_bf16_with_tokens(root, models, reference):
    """--precision bf16 --tokens (a GPU setting, also valid on CPU) stores the tokens as float16 like fp32 does."""
    code = run_stage(EMBEDS, root, models, "--precision", "bf16", "--no-vae")
    assert code == 0
    nsd, ref = DatasetRoot(root).nsd, DatasetRoot(reference(EMBEDS)).nsd
    for name in ("clip_image_embeds.npy", "clip_tokens.npy"):
        got, expected = np.load(nsd / "vision_embeds" / name), np.load(ref / "vision_embeds" / name)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), rtol=0.05, atol=0.05)
