"""generate_conversation.py against a local fake OpenAI server (faults, budget stops, kills); template backend."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from llava_brain.annotations import write_captions, write_instances
from llava_brain.instructions import RetryPolicy, prompt_files
from llava_brain.io import manifest_of, write_json
from llava_brain.layout import DatasetRoot
from llava_brain.testing.fake_openai import FakeOpenAI, by_image, by_request, combine

from conftest import REPO, load_script

KEY = "sk-test-SECRET-12345"
SCRIPT = "prepare_datasets/generate_conversation.py"
CATEGORIES = {1: "person", 3: "car", 18: "dog", 47: "cup", 67: "dining table"}
# Images of subject 1 (train + val); 90 and 91 have captions but no subject saw them (--all-images only).
SUBJECT_IDS = [3, 7, 11, 15, 20, 24, 31, 40, 52, 66]
ALL_IDS = [*SUBJECT_IDS, 90, 91]
# Fast retries: the waits are not what is tested (Retry-After still makes the 429 waits 0.1 s). The
# timeout is far above any reply time of the local server, so only a "slow" fault ever reaches it.
FAST = ["--backoff-base", "0.01", "--backoff-max", "0.5", "--timeout", "10"]
# A request-timeout test has to wait this long once; "slow" replies wait far longer (until the server stops).
SHORT_TIMEOUT = ["--timeout", "3"]


@pytest.fixture(scope="module")
def stage():
    return load_script(SCRIPT)


def caption_of(nsd_id: int) -> str:
    return f"Photo number {nsd_id}: a man in a red shirt walks a brown dog past a car."


def make_root(root: Path, with_optional: bool = True) -> Path:
    layout = DatasetRoot(root)
    coco = {i: [caption_of(i), f"A person with a dog on a street ({i})."] for i in ALL_IDS}
    coco[24] = []  # no caption at all: the template backend must still write a valid record
    write_captions(layout.coco_captions, coco, {"description": "test"})
    human = {i: [{"category_id": 1, "box": [10, 40, 120, 400]}, {"category_id": 18, "box": [150, 300, 260, 420]}]
             for i in ALL_IDS if i % 2}  # fmt: skip
    for i in ALL_IDS:
        human.setdefault(i, [])  # even ids: no human boxes
    write_instances(layout.coco_instances, human, CATEGORIES, {"description": "test"})
    if with_optional:
        blip = {i: [f"a man walking a dog {i}", "a car parked on a street"] for i in ALL_IDS}
        write_captions(layout.captions, blip, {"description": "test"})
        detected = {i: [{"category_id": 3, "box": [300, 200, 420, 300], "score": 0.95},
                        {"category_id": 1, "box": [11, 41, 121, 399], "score": 0.9}]  # a duplicate of the human box
                    for i in ALL_IDS if i not in (24, 40)}  # fmt: skip
        detected.update({24: [], 40: []})
        write_instances(layout.instances, detected, CATEGORIES, {"description": "test"})
    write_json(layout.fmri2image(1), {"train": SUBJECT_IDS[:8] + SUBJECT_IDS[:3], "val": SUBJECT_IDS[8:]})
    return root


def records(root: Path, prompt_type: str = "conversation") -> list[dict]:
    path = DatasetRoot(root).gpt_conversation(prompt_type)
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_valid(recs: list[dict], prompt_type: str, ids: list[int]) -> None:
    assert [r["nsd_id"] for r in recs] == sorted(ids)  # every image exactly once, sorted
    for r in recs:
        assert set(r) == {"nsd_id", "prompt_type", "conversations", "backend", "model"}
        assert r["prompt_type"] == prompt_type
        turns = r["conversations"]
        assert len(turns) >= 2 and len(turns) % 2 == 0
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert all(isinstance(t["value"], str) and t["value"].strip() for t in turns)
        assert not any("<image>" in t["value"] for t in turns)


def run_openai(stage, root: Path, server: FakeOpenAI, *extra: str) -> int:
    argv = ["--dataset-root", str(root), "--prompt-type", "conversation", "--base-url", server.base_url, *FAST]
    return stage.main([*argv, *extra])


def all_text(root: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in root.rglob("*") if p.is_file())


def manifest(root: Path, prompt_type: str = "conversation") -> dict:
    return json.loads(manifest_of(DatasetRoot(root).gpt_conversation(prompt_type)).read_text())


def wait_for(condition: Callable[[], bool], what: str, proc: subprocess.Popen | None = None) -> None:
    """Wait until `condition()` holds: a state the test controls, not a time. The deadline only turns a
    hang into a failure, and a child that exits first fails at once."""
    deadline = time.monotonic() + 120
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the run exited ({proc.returncode}) before {what}: {proc.communicate()[0].decode()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def stored_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


# The OpenAI backend ---------------------------------------------------------------------------


def test_faults_are_retried_and_every_image_is_done_once(stage, tmp_path, monkeypatch, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    root = make_root(tmp_path)
    faults = combine(
        by_image("Photo number 3:", ["429"]),
        by_image("Photo number 7:", ["malformed", "slow", "429"]),
        by_image("Photo number 11:", ["empty", "500"]),
        by_image("Photo number 15:", ["500", "drop"]),
    )
    with FakeOpenAI(faults=faults, slow_seconds=600) as server:
        assert run_openai(stage, root, server, "--concurrency", "4", *SHORT_TIMEOUT) == 0
    assert_valid(records(root), "conversation", SUBJECT_IDS)
    assert {"429", "500", "drop", "malformed", "slow", "empty"} <= set(server.outcomes)
    assert server.authorizations == {f"Bearer {KEY}"}  # the key is sent, and only to the server
    run = manifest(root)
    api = run["api"]
    assert api["requests"] == server.requests == len(SUBJECT_IDS) + api["retries"]
    assert api["retries"] == 8 and api["failed_nsd_ids"] == []
    assert api["retry_causes"] == {"http_429": 2, "http_500": 2, "connection": 1, "malformed": 2, "timeout": 1}
    assert api["prompt_tokens"] > 0 and api["estimated_cost_usd"] > 0
    assert run["api_all_runs"]["requests"] == api["requests"]
    assert run["settings"] == {"prompt_type": "conversation", "backend": "openai", "model": "gpt-3.5-turbo-0125",
                               "seed": 0}  # fmt: skip
    assert run["subjects"] == [1] and run["missing_images"] == 0
    out = capsys.readouterr()
    assert KEY not in out.out + out.err + caplog.text + all_text(root)


def test_retry_after_is_honoured(stage, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    root = make_root(tmp_path)
    waits = []
    delay = RetryPolicy.delay

    def recorded(self, attempt, retry_after=None, rng=None):
        waits.append((retry_after, delay(self, attempt, retry_after, rng)))
        return waits[-1][1]

    monkeypatch.setattr(RetryPolicy, "delay", recorded)
    with FakeOpenAI(faults=by_request({0: "429", 1: "429"})) as server:
        start = time.perf_counter()
        # Our own backoff would wait U(0, 1000 s); the server's Retry-After says 0.1 s.
        argv = ["--concurrency", "1", "--backoff-base", "1000", "--backoff-max", "1000"]
        assert run_openai(stage, root, server, *argv) == 0
        assert time.perf_counter() - start >= 0.2  # the two waits happened
    assert waits == [(0.1, 0.1), (0.1, 0.1)]
    assert_valid(records(root), "conversation", SUBJECT_IDS)


def test_rerun_skips_stored_images(stage, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    root = make_root(tmp_path)
    with FakeOpenAI() as server:
        assert run_openai(stage, root, server) == 0
        first = server.requests
        assert run_openai(stage, root, server) == 0
        assert server.requests == first  # nothing left to ask
        assert run_openai(stage, root, server, "--all-images") == 0
        assert server.requests == first + 2  # only the two images no subject saw
        assert manifest(root)["api_all_runs"]["requests"] == first + 2  # counted over the runs
    assert_valid(records(root), "conversation", ALL_IDS)


def test_budget_stop_then_rerun_equals_uninterrupted_run(stage, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    whole, parts = make_root(tmp_path / "whole"), make_root(tmp_path / "parts")
    with FakeOpenAI() as server:
        assert run_openai(stage, whole, server) == 0
        assert run_openai(stage, parts, server, "--concurrency", "2", "--max-requests", "4") == 3
        assert "--max-requests 4 reached" in caplog.text
        assert len(records(parts)) == 4  # in-flight requests finished and were stored
        assert run_openai(stage, parts, server, "--concurrency", "3", "--max-tokens-budget", "1") == 3
        assert len(records(parts)) == 7  # the 3 requests already in flight when the budget ran out
        assert run_openai(stage, parts, server) == 0
    path = "nsd/nsd_gpt_conversation/conversation.jsonl"
    assert (parts / path).read_bytes() == (whole / path).read_bytes()


def test_sigkill_then_rerun_equals_uninterrupted_run(stage, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    whole, killed = make_root(tmp_path / "whole"), make_root(tmp_path / "killed")
    store = DatasetRoot(killed).gpt_conversation("conversation")
    with FakeOpenAI() as server:
        server.hold_after(3)  # three replies, then the run waits on the server until the test releases it
        cmd = [sys.executable, SCRIPT, "--dataset-root", str(killed), "--prompt-type", "conversation",
               "--base-url", server.base_url, "--concurrency", "2"]  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_for(lambda: stored_lines(store) == 3, "three records are stored", proc)
        proc.send_signal(signal.SIGKILL)
        output = proc.communicate()[0].decode()
        server.release()
        assert proc.returncode == -signal.SIGKILL
        assert stored_lines(store) == 3
        assert not manifest_of(store).exists()  # killed: no provenance, so the rerun simply continues
        assert KEY not in output
        assert run_openai(stage, killed, server) == 0
        assert run_openai(stage, whole, server) == 0
    assert store.read_bytes() == DatasetRoot(whole).gpt_conversation("conversation").read_bytes()


def test_ctrl_c_keeps_finished_records_sorted(stage, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    root = make_root(tmp_path)
    store = DatasetRoot(root).gpt_conversation("conversation")
    with FakeOpenAI() as server:
        server.hold_after(2)  # two replies, then every request waits until the test releases the server
        cmd = [sys.executable, SCRIPT, "--dataset-root", str(root), "--prompt-type", "conversation",
               "--base-url", server.base_url, "--concurrency", "3"]  # fmt: skip
        # A shell's background job (`make test &`) ignores SIGINT, and a child inherits that: Python then never
        # raises KeyboardInterrupt. Ctrl-C's default disposition is restored in the child before it starts.
        proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
        wait_for(lambda: stored_lines(store) == 2, "two records are stored", proc)
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=120)[0].decode()
        server.release()
        assert proc.returncode == 130, output
        ids = [r["nsd_id"] for r in records(root)]
        assert len(ids) == 2 and ids == sorted(ids)  # compacted on the way out
        assert manifest(root)["stop_reason"] == "interrupted"
        assert run_openai(stage, root, server) == 0
    assert_valid(records(root), "conversation", SUBJECT_IDS)


def test_a_second_concurrent_run_is_refused(stage, tmp_path, capsys):
    root = make_root(tmp_path)
    store = DatasetRoot(root).gpt_conversation("conversation")
    store.parent.mkdir(parents=True)
    with open(store.with_name(f".{store.name}.lock"), "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        argv = ["--dataset-root", str(root), "--prompt-type", "conversation", "--backend", "template"]
        assert stage.main(argv) == 2
    assert "another run" in capsys.readouterr().err
    assert not store.exists()


def test_unauthorised_stops_the_run_and_never_shows_the_key(stage, tmp_path, monkeypatch, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    root = make_root(tmp_path)
    # The server echoes the key in its error message, as a careless proxy might.
    with FakeOpenAI(faults=by_request({i: "401" for i in range(2, 100)})) as server:
        assert run_openai(stage, root, server, "--concurrency", "1") == 1
    assert len(records(root)) == 2
    assert "HTTP 401" in caplog.text and "[redacted]" in caplog.text
    out = capsys.readouterr()
    assert KEY not in out.out + out.err + caplog.text + all_text(root)


def test_failures_after_max_retries_are_left_for_a_rerun(stage, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    root = make_root(tmp_path)
    with FakeOpenAI(faults=by_image("Photo number 15:", ["malformed"] * 3)) as server:
        assert run_openai(stage, root, server, "--max-retries", "1") == 4
        assert 15 not in {r["nsd_id"] for r in records(root)}
        assert run_openai(stage, root, server, "--max-retries", "1") == 0  # attempts 3 (malformed) and 4 (ok)
    assert_valid(records(root), "conversation", SUBJECT_IDS)


def test_missing_api_key_exits_2_with_one_line(stage, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert stage.main(["--dataset-root", str(make_root(tmp_path)), "--prompt-type", "conversation"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "OPENAI_API_KEY" in err


def test_other_backend_records_are_not_mixed_in(stage, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    root = make_root(tmp_path)
    argv = ["--dataset-root", str(root), "--prompt-type", "conversation"]
    assert stage.main([*argv, "--backend", "template"]) == 0
    with FakeOpenAI() as server:
        assert stage.main([*argv, "--base-url", server.base_url]) == 2
        assert "pass --overwrite" in capsys.readouterr().err
        assert stage.main([*argv, "--base-url", server.base_url, "--overwrite"]) == 0
    assert {r["backend"] for r in records(root)} == {"openai"}


# Reruns, kills and unwritable outputs (template backend: offline) -------------------------------


def template_argv(root: Path, *extra: str) -> list[str]:
    return ["--dataset-root", str(root), "--prompt-type", "detail_description", "--backend", "template", *extra]


def test_other_settings_or_prompts_are_refused_until_overwrite(stage, tmp_path, capsys):
    root = make_root(tmp_path / "root")
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for name, path in prompt_files("detail_description").items():
        (prompts / name).write_bytes(path.read_bytes())
    assert stage.main(template_argv(root, "--prompts-dir", str(prompts))) == 0
    first = DatasetRoot(root).gpt_conversation("detail_description").read_bytes()
    capsys.readouterr()
    assert stage.main(template_argv(root, "--prompts-dir", str(prompts), "--seed", "1")) == 2
    err = capsys.readouterr().err
    assert "setting seed 0 -> 1" in err and "--overwrite" in err and err.count("\n") == 1
    questions = prompts / "detail_description_questions.txt"
    questions.write_text("Describe the photo in detail.\n")
    assert stage.main(template_argv(root, "--prompts-dir", str(prompts))) == 2
    assert "input detail_description_questions.txt changed" in capsys.readouterr().err
    assert DatasetRoot(root).gpt_conversation("detail_description").read_bytes() == first  # refused: untouched
    assert stage.main(template_argv(root, "--prompts-dir", str(prompts), "--overwrite")) == 0
    recs = records(root, "detail_description")
    assert_valid(recs, "detail_description", SUBJECT_IDS)
    assert {r["conversations"][0]["value"] for r in recs} == {"Describe the photo in detail."}


def test_a_compaction_killed_mid_write_leaves_nothing_after_a_rerun(stage, tmp_path):
    root = make_root(tmp_path)
    store = DatasetRoot(root).gpt_conversation("detail_description")
    assert stage.main(template_argv(root)) == 0
    before = store.read_bytes()
    # What a SIGKILL during the final compaction leaves: the atomic rewrite's temp file beside the store.
    leftover = store.with_name(f".{store.name}.k1ll3d.tmp.jsonl")
    leftover.write_bytes(before[: len(before) // 2])
    assert stage.main(template_argv(root)) == 0
    assert not leftover.exists() and store.read_bytes() == before
    assert sorted(p.name for p in store.parent.iterdir() if p.name.startswith(f".{store.name}")) == [
        f".{store.name}.lock"
    ]


def test_a_killed_first_run_is_continued_without_overwrite(stage, tmp_path):
    whole, killed = make_root(tmp_path / "whole"), make_root(tmp_path / "killed")
    assert stage.main(template_argv(whole)) == 0
    # A run killed before its end: some records, a torn last line, no provenance.
    lines = DatasetRoot(whole).gpt_conversation("detail_description").read_bytes().splitlines(keepends=True)
    store = DatasetRoot(killed).gpt_conversation("detail_description")
    store.parent.mkdir(parents=True)
    store.write_bytes(b"".join(lines[:4]) + lines[4][:20])
    assert stage.main(template_argv(killed)) == 0
    assert store.read_bytes() == b"".join(lines)
    assert manifest(killed, "detail_description")["written_images"] == len(SUBJECT_IDS) - 4


def test_an_output_folder_that_cannot_be_written_exits_2_before_any_work(stage, tmp_path, capsys):
    root = make_root(tmp_path)
    folder = DatasetRoot(root).gpt_conversation("conversation").parent
    folder.write_text("not a folder")  # the records' folder is taken by a file (tests run as root: no chmod)
    assert stage.main(["--dataset-root", str(root), "--prompt-type", "conversation", "--backend", "template"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be written" in err and str(folder) in err
    assert folder.read_text() == "not a folder"


# The template backend and input errors --------------------------------------------------------


@pytest.mark.parametrize("prompt_type", ["conversation", "detail_description", "complex_reasoning"])
def test_template_backend_is_deterministic_and_complete(stage, tmp_path, prompt_type):
    outputs = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        root = make_root(tmp_path / name)
        argv = ["--dataset-root", str(root), "--prompt-type", prompt_type, "--backend", "template", "--all-images"]
        assert stage.main([*argv, "--seed", seed]) == 0
        assert_valid(records(root, prompt_type), prompt_type, ALL_IDS)
        outputs.append(DatasetRoot(root).gpt_conversation(prompt_type).read_bytes())
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]  # the seed matters
    assert {(r["backend"], r["model"]) for r in records(tmp_path / "a", prompt_type)} == {("template", "template-v1")}


def test_missing_coco_captions_exits_2_naming_it(stage, tmp_path, capsys):
    root = make_root(tmp_path)
    DatasetRoot(root).coco_captions.unlink()
    argv = ["--dataset-root", str(root), "--prompt-type", "conversation", "--backend", "template"]
    assert stage.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nsd_coco_captions.json" in err


def test_optional_files_may_be_absent(stage, tmp_path):
    root = make_root(tmp_path, with_optional=False)
    DatasetRoot(root).coco_instances.unlink()
    assert stage.main(["--dataset-root", str(root), "--prompt-type", "conversation", "--backend", "template"]) == 0
    assert_valid(records(root), "conversation", SUBJECT_IDS)
