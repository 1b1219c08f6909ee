"""Atomic writes, run manifests and the kill-safe JSONL store (llava_brain/io.py)."""

import argparse
import json
import pathlib
import random
import threading
from pathlib import Path

import numpy as np
import pytest

import llava_brain.io.files as lbio_files
import llava_brain.io.provenance as lbio_provenance
from llava_brain.errors import BadInputError
from llava_brain.io import JsonlStore, atomic_path, git_sha, save_npy, write_json, write_run_json


def temp_leftovers(folder: Path, name: str) -> list[Path]:
    """Temporary files atomic_path would leave beside `name` (`.<name>.*.tmp*`)."""
    return sorted(folder.glob(f".{name}.*.tmp*"))


# ----------------------------------------------------------------------------------------------
# atomic_path / write_json / save_npy


def test_atomic_path_success_renames_onto_final_path_and_keeps_suffix(tmp_path):
    final = tmp_path / "sub" / "volume.nii.gz"
    with atomic_path(final) as tmp:
        assert tmp.parent == final.parent  # same folder, so os.replace is a rename on one filesystem
        assert tmp.name.startswith(".volume.nii.gz.")
        assert tmp.name.endswith(".nii.gz")  # libraries dispatching on the extension still see .nii.gz
        assert ".tmp" in tmp.name
        assert tmp != final
        assert not final.exists()  # nothing under the final name while writing
        tmp.write_bytes(b"payload")
    assert final.read_bytes() == b"payload"
    assert temp_leftovers(final.parent, final.name) == []
    assert sorted(p.name for p in final.parent.iterdir()) == ["volume.nii.gz"]


def test_atomic_path_npy_temp_keeps_npy_suffix(tmp_path):
    with atomic_path(tmp_path / "x.npy") as tmp:
        assert tmp.suffix == ".npy"
        np.save(tmp, np.arange(3))  # np.save would append ".npy" if the suffix were lost
        assert tmp.is_file()
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_atomic_path_error_leaves_no_final_and_no_temp(tmp_path, exc_type):
    final = tmp_path / "out.json"
    with pytest.raises(exc_type), atomic_path(final) as tmp:
        tmp.write_text('{"half": ')
        raise exc_type("killed mid-write")
    assert not final.exists()
    assert temp_leftovers(tmp_path, final.name) == []
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_error_keeps_previous_content(tmp_path):
    final = tmp_path / "out.txt"
    final.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        tmp.write_text("new but partial")
        raise RuntimeError("boom")
    assert final.read_text() == "old"
    assert temp_leftovers(tmp_path, final.name) == []


def _failing_write_bytes(self, data):
    """Writes half of the bytes, then fails like a full disk."""
    with open(self, "wb") as f:
        f.write(data[: len(data) // 2])
    raise OSError(28, "No space left on device")


def test_write_json_failure_mid_write_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    final = tmp_path / "meta.json"
    write_json(final, {"version": 1})
    monkeypatch.setattr(pathlib.Path, "write_bytes", _failing_write_bytes)
    with pytest.raises(OSError, match="No space left"):
        write_json(final, {"version": 2, "payload": list(range(100))})
    monkeypatch.undo()
    assert json.loads(final.read_text()) == {"version": 1}
    assert temp_leftovers(tmp_path, final.name) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]


def test_write_json_failure_mid_write_creates_nothing(tmp_path, monkeypatch):
    final = tmp_path / "new.json"
    monkeypatch.setattr(pathlib.Path, "write_bytes", _failing_write_bytes)
    with pytest.raises(OSError):
        write_json(final, {"a": 1})
    monkeypatch.undo()
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_write_json_content_and_numpy_path_conversion(tmp_path):
    obj = {
        "n": np.int64(7),
        "x": np.float32(0.5),
        "arr": np.arange(3, dtype=np.int16),
        "where": Path("/data/nsd"),
        "nested": [1, "two", None],
    }
    out = write_json(tmp_path / "a" / "b.json", obj)
    assert out == tmp_path / "a" / "b.json"
    text = out.read_text()
    assert text.endswith("\n")
    assert json.loads(text) == {"n": 7, "x": 0.5, "arr": [0, 1, 2], "where": "/data/nsd", "nested": [1, "two", None]}


def test_write_json_unserialisable_raises_and_writes_nothing(tmp_path):
    with pytest.raises(TypeError, match="not JSON serialisable"):
        write_json(tmp_path / "bad.json", {"obj": object()})
    assert list(tmp_path.iterdir()) == []


def test_save_npy_content(tmp_path):
    array = np.arange(24, dtype=np.float16).reshape(2, 3, 4)
    out = save_npy(tmp_path / "arr.npy", array)
    loaded = np.load(out)
    assert loaded.dtype == np.float16
    np.testing.assert_array_equal(loaded, array)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arr.npy"]


def test_save_npy_failure_mid_write_keeps_old_array_and_removes_temp(tmp_path, monkeypatch):
    final = tmp_path / "arr.npy"
    save_npy(final, np.array([1, 2, 3]))
    real_save = np.save

    def failing_save(f, array, *args, **kwargs):
        f.write(b"\x93NUMPY partial header")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lbio_files.np, "save", failing_save)
    with pytest.raises(OSError):
        save_npy(final, np.zeros(1000))
    monkeypatch.setattr(lbio_files.np, "save", real_save)
    np.testing.assert_array_equal(np.load(final), [1, 2, 3])
    assert temp_leftovers(tmp_path, final.name) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arr.npy"]


# ----------------------------------------------------------------------------------------------
# JsonlStore


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")


def test_jsonl_append_and_reopen(tmp_path):
    path = tmp_path / "deep" / "store.jsonl"
    store = JsonlStore(path)
    assert len(store) == 0 and not path.exists()
    records = [{"id": 0, "text": "héllo"}, {"id": 1, "v": np.float32(1.5)}, [1, 2], "plain"]
    for r in records:
        store.append(r)
    expected = [{"id": 0, "text": "héllo"}, {"id": 1, "v": 1.5}, [1, 2], "plain"]
    assert store.records == expected
    assert list(store) == expected
    reopened = JsonlStore(path)
    assert reopened.records == expected
    assert reopened.dropped_torn_line is False
    lines = _lines(path)
    assert lines[-1] == ""  # file ends with a newline
    assert [json.loads(line) for line in lines[:-1]] == expected


def test_jsonl_torn_last_line_is_dropped_and_next_append_is_valid(tmp_path):
    path = tmp_path / "store.jsonl"
    complete = [{"id": i, "caption": f"image {i}"} for i in range(3)]
    good_bytes = "".join(json.dumps(r) + "\n" for r in complete).encode()
    path.write_bytes(good_bytes + b'{"id": 3, "caption": "ima')  # killed mid-write: no newline

    store = JsonlStore(path)
    assert store.dropped_torn_line is True
    assert store.records == complete
    assert path.read_bytes() == good_bytes  # truncated back to the last complete record

    store.append({"id": 3, "caption": "image 3"})
    lines = _lines(path)
    assert lines[-1] == ""
    parsed = [json.loads(line) for line in lines[:-1]]  # every line parses
    assert parsed == [*complete, {"id": 3, "caption": "image 3"}]
    again = JsonlStore(path)
    assert again.dropped_torn_line is False
    assert again.records == parsed


def test_jsonl_only_a_torn_line(tmp_path):
    path = tmp_path / "store.jsonl"
    path.write_bytes(b'{"id": 0, "cap')
    store = JsonlStore(path)
    assert store.dropped_torn_line is True
    assert store.records == []
    store.append({"id": 0})
    assert path.read_text() == '{"id": 0}\n'


def test_jsonl_malformed_middle_line_raises_naming_file_and_line(tmp_path):
    path = tmp_path / "store.jsonl"
    path.write_text('{"id": 0}\n{"id": 1}\n{"id": 2, oops}\n{"id": 3}\n')
    with pytest.raises(BadInputError) as excinfo:
        JsonlStore(path)
    message = str(excinfo.value)
    assert str(path) in message
    assert "line 3" in message
    assert "\n" not in message
    assert excinfo.value.path == path


def test_jsonl_concurrent_appends_land_exactly_once(tmp_path):
    path = tmp_path / "store.jsonl"
    store = JsonlStore(path)
    num_threads, per_thread = 8, 50
    barrier = threading.Barrier(num_threads)

    def worker(t: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            store.append({"thread": t, "i": i, "pad": "x" * (10 * t)})

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(num_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()

    expected = {(t, i) for t in range(num_threads) for i in range(per_thread)}
    in_memory = [(r["thread"], r["i"]) for r in store.records]
    assert len(in_memory) == num_threads * per_thread
    assert set(in_memory) == expected

    lines = _lines(path)
    assert lines[-1] == ""
    on_disk = [json.loads(line) for line in lines[:-1]]
    assert len(on_disk) == num_threads * per_thread
    assert {(r["thread"], r["i"]) for r in on_disk} == expected
    assert all(r["pad"] == "x" * (10 * r["thread"]) for r in on_disk)  # no interleaved bytes
    # each thread's own records stay in its append order
    for t in range(num_threads):
        assert [r["i"] for r in on_disk if r["thread"] == t] == list(range(per_thread))
    assert len(JsonlStore(path)) == num_threads * per_thread


def test_jsonl_compact_sorts_deterministically(tmp_path):
    records = [{"id": i, "text": f"t{i}"} for i in range(20)]
    outputs = []
    for seed in (0, 1):
        shuffled = records[:]
        random.Random(seed).shuffle(shuffled)
        path = tmp_path / f"store{seed}.jsonl"
        store = JsonlStore(path)
        for r in shuffled:
            store.append(r)
        assert store.records == shuffled
        store.compact(key=lambda r: r["id"])
        assert store.records == records
        assert JsonlStore(path).records == records
        assert temp_leftovers(tmp_path, path.name) == []
        outputs.append(path.read_bytes())
    assert outputs[0] == outputs[1]  # same content whatever the append order
    assert outputs[0].decode().splitlines()[0] == json.dumps(records[0])


def test_jsonl_compact_without_key_keeps_order(tmp_path):
    path = tmp_path / "store.jsonl"
    store = JsonlStore(path)
    for i in (3, 1, 2):
        store.append({"id": i})
    store.compact()
    assert [r["id"] for r in JsonlStore(path).records] == [3, 1, 2]


# ----------------------------------------------------------------------------------------------
# run.json


def test_write_run_json_records_arguments_versions_and_git_sha(tmp_path, monkeypatch):
    monkeypatch.setattr(lbio_provenance, "git_sha", lambda repo_dir=None: "0123abc-dirty")
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset-root", type=Path)
    parser.add_argument("--subject", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.set_defaults(func=print)  # callables (sub-command handlers) are not arguments
    args = parser.parse_args(["--dataset-root", "/data/root", "--subject", "5"])

    out = write_run_json(tmp_path / "run_dir", args, num_samples=np.int64(12))
    assert out == tmp_path / "run_dir" / "run.json"
    manifest = json.loads(out.read_text())
    assert manifest["arguments"] == {"dataset_root": "/data/root", "subject": 5, "lr": 1e-4}
    assert manifest["git_sha"] == "0123abc-dirty"
    assert manifest["versions"]["numpy"] == np.__version__
    assert all(isinstance(v, str) for v in manifest["versions"].values())
    assert manifest["num_samples"] == 12
    assert isinstance(manifest["argv"], list)
    assert manifest["python"].count(".") == 2
    assert temp_leftovers(out.parent, out.name) == []


def test_write_run_json_accepts_a_plain_dict(tmp_path, monkeypatch):
    monkeypatch.setattr(lbio_provenance, "git_sha", lambda repo_dir=None: "unknown")
    out = write_run_json(tmp_path, {"subject": 2})
    manifest = json.loads(out.read_text())
    assert manifest["arguments"] == {"subject": 2}
    assert "git_sha" in manifest and "versions" in manifest


def test_git_sha_outside_a_repository_is_unknown(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert git_sha(tmp_path) == "unknown"
