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
from pathlib import Path

import pytest

from llava_brain.annotations import write_captions, write_instances
from llava_brain.instructions import (
    ImageContext,
    ImageObject,
    MalformedAnswer,
    RetryPolicy,
    answer_to_conversation,
    normalise_box,
    parse_qa,
    region,
    retry_after_seconds,
    template_conversation,
)
from llava_brain.io import write_json
from llava_brain.layout import DatasetRoot
from llava_brain.testing.fake_openai import FakeOpenAI, by_image, by_request, combine

from conftest import REPO, load_script

KEY = "sk-test-SECRET-12345"
SCRIPT = "prepare_datasets/generate_conversation.py"
CATEGORIES = {1: "person", 3: "car", 18: "dog", 47: "cup", 67: "dining table"}
# Images of subject 1 (train + val); 90 and 91 have captions but no subject saw them (--all-images only).
SUBJECT_IDS = [3, 7, 11, 15, 20, 24, 31, 40, 52, 66]
ALL_IDS = [*SUBJECT_IDS, 90, 91]
# Fast retries: the waits are not what is tested (Retry-After still makes the 429 waits 0.1 s).
FAST = ["--backoff-base", "0.01", "--backoff-max", "0.5", "--timeout", "0.5"]


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
    with FakeOpenAI(faults=faults, slow_seconds=1.5) as server:
        assert run_openai(stage, root, server, "--concurrency", "4") == 0
    assert_valid(records(root), "conversation", SUBJECT_IDS)
    assert {"429", "500", "drop", "malformed", "slow", "empty"} <= set(server.outcomes)
    assert server.authorizations == {f"Bearer {KEY}"}  # the key is sent, and only to the server
    manifest = json.loads(DatasetRoot(root).gpt_conversation("conversation").with_suffix(".run.json").read_text())
    api = manifest["api"]
    assert api["requests"] == server.requests == len(SUBJECT_IDS) + api["retries"]
    assert api["retries"] == 8 and api["failed_nsd_ids"] == []
    assert set(api["retry_causes"]) == {"http_429", "http_500", "connection", "malformed", "timeout"}
    assert api["prompt_tokens"] > 0 and api["estimated_cost_usd"] > 0
    out = capsys.readouterr()
    assert KEY not in out.out + out.err + caplog.text + all_text(root)


def test_retry_after_is_honoured(stage, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    root = make_root(tmp_path)
    with FakeOpenAI(faults=by_request({0: "429", 1: "429"})) as server:
        start = time.perf_counter()
        # Our own backoff would wait U(0, 1000 s); the server's Retry-After says 0.1 s.
        assert (
            run_openai(stage, root, server, "--concurrency", "1", "--backoff-base", "1000", "--backoff-max", "1000")
            == 0
        )
        assert 0.2 <= time.perf_counter() - start < 10
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
    with FakeOpenAI(latency=0.3) as server:
        cmd = [sys.executable, SCRIPT, "--dataset-root", str(killed), "--prompt-type", "conversation",
               "--base-url", server.base_url, "--concurrency", "2"]  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (not store.exists() or store.read_text().count("\n") < 3):
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        output = proc.communicate()[0].decode()
        assert proc.returncode == -signal.SIGKILL
        assert 3 <= store.read_text().count("\n") < len(SUBJECT_IDS)
        assert KEY not in output
        assert run_openai(stage, killed, server) == 0
        assert run_openai(stage, whole, server) == 0
    assert store.read_bytes() == DatasetRoot(whole).gpt_conversation("conversation").read_bytes()


def test_ctrl_c_keeps_finished_records_sorted(stage, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    root = make_root(tmp_path)
    store = DatasetRoot(root).gpt_conversation("conversation")
    with FakeOpenAI(latency=0.3) as server:
        cmd = [sys.executable, SCRIPT, "--dataset-root", str(root), "--prompt-type", "conversation",
               "--base-url", server.base_url, "--concurrency", "3"]  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (not store.exists() or store.read_text().count("\n") < 2):
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=20)[0].decode()
        assert proc.returncode == 130, output
        ids = [r["nsd_id"] for r in records(root)]
        assert 2 <= len(ids) < len(SUBJECT_IDS) and ids == sorted(ids)  # compacted on the way out
        assert json.loads(store.with_suffix(".run.json").read_text())["stop_reason"] == "interrupted"
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


# Library pieces ---------------------------------------------------------------------------------


def test_parse_qa_is_strict():
    text = "Question:\nWhat is it?\n===\nAnswer:\nA dog.\n===\nQuestion: Where?\nAnswer:\nOn the left.\n  more\n"
    assert parse_qa(text) == [("What is it?", "A dog."), ("Where?", "On the left.\n  more")]
    bad = [
        "",
        "Sure! Here is the conversation.\nQuestion: a?\nAnswer: b",
        "Answer: b",
        "Question: a?\n===\nQuestion: b?\nAnswer: c",
        "Question: a?\n===\nAnswer:\n===\n",
        "Question: a?",
    ]
    for text in bad:
        with pytest.raises(MalformedAnswer):
            parse_qa(text)
    with pytest.raises(MalformedAnswer):
        answer_to_conversation("complex_reasoning", "Question: a?\nAnswer: b\nQuestion: c?\nAnswer: d")
    with pytest.raises(MalformedAnswer):
        answer_to_conversation("detail_description", "  \n", "Describe it.")
    assert answer_to_conversation("detail_description", " A dog. ", "Describe it.") == [
        {"from": "human", "value": "Describe it."},
        {"from": "gpt", "value": "A dog."},
    ]


def test_retry_policy_full_jitter_and_retry_after():
    policy = RetryPolicy(max_retries=6, base_delay=1.0, max_delay=8.0)
    delays = [policy.delay(attempt) for attempt in range(6) for _ in range(50)]
    assert all(0 <= d <= 8.0 for d in delays) and max(delays) > 4  # grows, capped
    assert all(policy.delay(0) <= 1.0 for _ in range(50))
    assert policy.delay(3, retry_after=0.1) == 0.1
    assert policy.delay(3, retry_after=3600) == 8.0
    assert retry_after_seconds({"retry-after": "0.1"}) == 0.1
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None
    assert retry_after_seconds({}) is None


def test_context_and_template_pieces():
    assert normalise_box([0, 42.5, 212.5, 425]) == (0.0, 0.1, 0.5, 1.0)
    assert region((0.0, 0.0, 0.2, 0.2)) == "top left" and region((0.4, 0.4, 0.6, 0.6)) == "center"
    ctx = ImageContext(5, ("A red car next to a man.",), (ImageObject("car", (0.1, 0.5, 0.3, 0.9)),))
    assert ctx.text() == "A red car next to a man.\ncar: [0.100, 0.500, 0.300, 0.900]"
    bare = ImageContext(6, (), ())
    for prompt_type in ("conversation", "detail_description", "complex_reasoning"):
        for c in (ctx, bare):
            turns = template_conversation(c, prompt_type, 0, ["Describe it."])
            assert turns == template_conversation(c, prompt_type, 0, ["Describe it."])
            assert turns and all(t["value"].strip() for t in turns)
