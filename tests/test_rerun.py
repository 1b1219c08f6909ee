"""The one rerun rule (io.StageRun), staged folders, the writable check and stale temp files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llava_brain.errors import BadInputError
from llava_brain.io import (
    StageRun,
    atomic_path,
    fingerprint,
    manifest_of,
    provenance,
    recover_staged,
    remove_stale_temps,
    require_writable,
    staged_folder,
    staging_path,
)
from llava_brain.io import files as io_files


def _inputs(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "a.json").write_text('{"x": 1}')
    np.save(tmp_path / "b.npy", np.arange(10))
    return {"a": tmp_path / "a.json", "b": [tmp_path / "b.npy"]}


def test_manifest_of_folder_and_file():
    assert manifest_of(Path("runs/vit3d")) == Path("runs/vit3d/run.json")
    assert manifest_of(Path("nsd/nsd_captions.json")) == Path("nsd/nsd_captions.json.run.json")
    assert manifest_of(Path("runs/vit3d.v2"), folder=True) == Path("runs/vit3d.v2/run.json")


def test_fingerprint_hashes_small_files_and_stats_large_ones(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    # sha256("abc"), computed independently
    assert fingerprint(path) == {
        "size": 3,
        "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
    }
    monkeypatch.setattr(provenance, "HASH_LIMIT_BYTES", 2)
    assert fingerprint(path) == {"size": 3, "mtime_ns": path.stat().st_mtime_ns}
    assert fingerprint(tmp_path / "absent") == {"missing": True}


def test_stage_run_runs_skips_and_refuses(tmp_path):
    inputs = _inputs(tmp_path)
    out = tmp_path / "out"
    settings = {"lr": 0.001, "subject": [1, 2]}
    run = StageRun(out, settings=settings, inputs=inputs)
    assert run.needed() is True  # never run
    out.mkdir()
    run.finish({"lr": 0.001}, steps=3)
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["settings"] == settings and manifest["steps"] == 3
    assert set(manifest["inputs"]) == {"a", "b"}

    assert StageRun(out, settings=settings, inputs=inputs).needed() is False  # current: skip
    assert StageRun(out, settings=settings, inputs=inputs).needed(complete=False) is True  # outputs gone: redo
    assert StageRun(out, settings=settings, inputs=inputs).needed(overwrite=True) is True

    with pytest.raises(BadInputError) as err:
        StageRun(out, settings={**settings, "lr": 0.01}, inputs=inputs).needed()
    line = str(err.value)
    assert str(out / "run.json") in line and "lr" in line and "--overwrite" in line and "\n" not in line

    # A resolved subject list that grew ('all' after adding a subject) is a change of settings.
    with pytest.raises(BadInputError, match="subject"):
        StageRun(out, settings={**settings, "subject": [1, 2, 3]}, inputs=inputs).needed()

    # Regenerated input content (same name) is a change of input.
    np.save(tmp_path / "b.npy", np.arange(10) + 1)
    with pytest.raises(BadInputError, match="input b changed"):
        StageRun(out, settings=settings, inputs=inputs).needed()


def test_stage_run_finish_into_staging_folder(tmp_path):
    final = tmp_path / "result"
    run = StageRun(final, settings={"k": 1})
    with staged_folder(final) as staging:
        (staging / "data.txt").write_text("x")
        run.finish({}, into=staging)
    assert (final / "run.json").is_file() and (final / "data.txt").read_text() == "x"
    assert StageRun(final, settings={"k": 1}).needed() is False


def test_staged_folder_replaces_whole_and_cleans_up_on_error(tmp_path):
    final = tmp_path / "folder"
    with staged_folder(final) as staging:
        (staging / "one").write_text("1")
    with pytest.raises(RuntimeError), staged_folder(final) as staging:
        (staging / "two").write_text("2")
        raise RuntimeError("boom")
    assert sorted(p.name for p in final.iterdir()) == ["one"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]
    with staged_folder(final) as staging:
        (staging / "three").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["three"]


def test_recover_staged_after_kills(tmp_path):
    final = tmp_path / "folder"
    # Killed while building: the staging folder goes, the old result stays.
    final.mkdir()
    (final / "old").write_text("o")
    staging_path(final).mkdir()
    recover_staged(final)
    assert not staging_path(final).exists() and (final / "old").is_file()
    # Killed between the two renames of a swap: the old (complete) folder comes back.
    old = tmp_path / ".folder.old"
    final.rename(old)
    recover_staged(final)
    assert (final / "old").is_file() and not old.exists()


def test_staged_folder_survives_sigkill_then_rerun(tmp_path):
    """A real SIGKILL inside the staged block leaves only the hidden staging folder; a rerun removes it."""
    final = tmp_path / "out"
    code = (
        "import os, signal, sys\n"
        "from llava_brain.io import staged_folder\n"
        f"with staged_folder({str(final)!r}) as s:\n"
        "    (s / 'half').write_text('x')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9
    assert staging_path(final).is_dir() and not final.exists()
    with staged_folder(final) as staging:
        (staging / "full").write_text("y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in final.iterdir()) == ["full"]


def test_require_writable(tmp_path):
    assert require_writable(tmp_path / "new" / "deeper" / "file.json") == tmp_path / "new" / "deeper" / "file.json"
    assert not (tmp_path / "new").exists()  # the check creates nothing
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(BadInputError) as err:
        require_writable(blocker / "out", "output folder")
    assert "is a file" in str(err.value) and str(blocker / "out") in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_require_writable_reports_a_failed_probe(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(io_files.tempfile, "mkstemp", refuse)
    with pytest.raises(BadInputError, match="Permission denied"):
        require_writable(tmp_path / "out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_require_writable_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(BadInputError, match="cannot be written"):
            require_writable(folder / "out.json")
    finally:
        folder.chmod(0o755)


def test_remove_stale_temps_only_of_that_file(tmp_path):
    final = tmp_path / "store.jsonl"
    code = (
        "import os, signal\n"
        "from llava_brain.io import atomic_path\n"
        f"with atomic_path({str(final)!r}) as tmp:\n"
        "    tmp.write_text('half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    other = tmp_path / "other.jsonl"
    with atomic_path(other) as tmp:
        tmp.write_text("{}\n")
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".store.jsonl.")]
    assert len(leftovers) == 1
    assert remove_stale_temps(final) == leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.jsonl"]
