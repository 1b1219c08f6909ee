"""generate_sft_data and llava_brain.sft: every record is well-formed LLaVA data pointing at the right fMRI sample."""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from llava_brain.annotations import write_captions, write_instances
from llava_brain.io import JsonlStore, manifest_of, write_json
from llava_brain.io import files as io_files
from llava_brain.layout import DatasetRoot
from llava_brain.sft import (
    INSTRUCTIONS_DIR,
    load_instruction_lists,
    pick,
    read_sft_data,
    salient_categories,
    sd_prompt,
    validate_sft_records,
)
from llava_brain.subjects import parse_sample_reference

from conftest import load_script

# subject -> nsd_fmri2image.json lists: repeats of one image, images shared between subjects.
SAMPLES = {
    1: {"train": [10, 11, 10, 12, 11], "val": [20, 21, 20]},
    2: {"train": [13, 10, 13], "val": [21, 20]},
}
COCO_CAPTIONS = {
    10: ["A dog lying on the grass.", "A brown dog  outside.\n"],
    11: ["A man riding a horse."],
    12: ["Two cats on a sofa."],
    13: [],  # covered but captionless: its samples get no caption-based record
    20: ["A red bus on a street.", "A double decker bus."],
    21: ["A plate of food."],
}
BLIP2_CAPTIONS = {i: [f"blip caption of image {i}"] for i in COCO_CAPTIONS}
CATEGORIES = {1: "person", 2: "dog", 3: "horse", 4: "cat", 5: "bus"}
INSTANCES = {  # nsdId -> (category_id, box)
    10: [(2, [0, 0, 100, 100]), (1, [0, 0, 200, 200]), (2, [300, 300, 310, 310])],
    11: [(1, [0, 0, 50, 50]), (3, [0, 0, 300, 300])],
    12: [(4, [10, 10, 20, 20])],
    13: [(2, [0, 0, 10, 10])],
    20: [(5, [0, 0, 400, 300]), (1, [10, 10, 30, 60])],
    21: [],  # no objects: no concept localization record
}
DIALOGUES = {  # nsdId -> GPT dialogues (20 has two: the record picks one)
    10: [[("What animal is there?", "A dog."), ("What colour is it?", "Brown.")]],
    20: [[("What vehicle is shown?", "A bus.")], [("Where is the bus?", "On a street.")]],
}
BUILT = ["brief_description", "instruction_reconstruction", "concept_localization"]


@pytest.fixture(scope="module")
def script():
    return load_script("prepare_datasets/generate_sft_data.py")


def _conversation_record(nsd_id: int, dialogue) -> dict:
    turns = [
        {"from": role, "value": text} for pair in dialogue for role, text in zip(("human", "gpt"), pair, strict=True)
    ]
    return {"nsd_id": nsd_id, "prompt_type": "conversation", "conversations": turns, "backend": "test", "model": "x"}


@pytest.fixture
def root(tmp_path) -> DatasetRoot:
    """A prepared root with only what generate_sft_data reads."""
    layout = DatasetRoot(tmp_path / "root")
    for subject, lists in SAMPLES.items():
        write_json(layout.fmri2image(subject), {**lists, "train_repeat": [0] * len(lists["train"])}, indent=None)
        for split, key in (("tr", "train"), ("te", "val")):
            layout.whole_betas(subject, split).parent.mkdir(parents=True, exist_ok=True)
            np.save(layout.whole_betas(subject, split), np.zeros((len(lists[key]), 2, 2, 2), np.float16))
    write_captions(layout.coco_captions, COCO_CAPTIONS, {"source": "test"})
    write_captions(layout.captions, BLIP2_CAPTIONS, {"source": "test"})
    objects = {i: [{"category_id": c, "box": box, "iscrowd": 0} for c, box in v] for i, v in INSTANCES.items()}
    write_instances(layout.coco_instances, objects, CATEGORIES, {"source": "test"})
    store = JsonlStore(layout.gpt_conversation("conversation"))
    for nsd_id, dialogues in DIALOGUES.items():
        for dialogue in dialogues:
            store.append(_conversation_record(nsd_id, dialogue))
    return layout


def _run(script, layout: DatasetRoot, *flags: str) -> int:
    return script.main(["--dataset-root", str(layout.root), *flags])


def _records(layout: DatasetRoot) -> dict[str, list[dict]]:
    return {split: read_sft_data(layout.sft_data(split)) for split in ("tr", "te")}  # read_sft_data validates


def test_records_point_at_their_fmri_samples(script, root):
    assert _run(script, root) == 0
    records = _records(root)
    keys = {"tr": "train", "te": "val"}
    seen = set()
    for split, split_records in records.items():
        for record in split_records:
            subject, ref_split, rows = parse_sample_reference(record["image"])
            assert (subject, ref_split, rows) == (record["subject"], split, [record["sample"]])
            assert record["split"] == split
            assert rows[0] < len(SAMPLES[subject][keys[split]])
            assert SAMPLES[subject][keys[split]][rows[0]] == record["nsd_id"]
            assert record["id"] == f"subj{subject:02d}_{split}_{rows[0]:06d}_{record['type']}"
            first = record["conversations"][0]["value"]
            assert first.startswith("<image>\n") and first.count("<image>") == 1
            assert sum(t["value"].count("<image>") for t in record["conversations"]) == 1
            seen.add((record["type"], (subject, split, rows[0])))

    # The GPT type is included by default because its JSONL exists.
    all_samples = {(s, split, row) for s in SAMPLES for split in keys for row in range(len(SAMPLES[s][keys[split]]))}

    def samples_of(prompt_type):
        return {sample for t, sample in seen if t == prompt_type}

    def image(s, split, row):
        return SAMPLES[s][keys[split]][row]

    assert samples_of("brief_description") == {x for x in all_samples if image(*x) != 13}
    assert samples_of("instruction_reconstruction") == {x for x in all_samples if image(*x) != 13}
    assert samples_of("concept_localization") == {x for x in all_samples if image(*x) != 21}
    assert samples_of("conversation") == {x for x in all_samples if image(*x) in DIALOGUES}
    assert {r["type"] for rs in records.values() for r in rs} == {*BUILT, "conversation"}


def test_answers_come_from_the_image(script, root):
    assert _run(script, root) == 0
    prompts = load_instruction_lists()
    for record in (r for rs in _records(root).values() for r in rs):
        nsd_id, turns = record["nsd_id"], record["conversations"]
        question, answer = turns[0]["value"].removeprefix("<image>\n"), turns[1]["value"]
        objects = [{"category": CATEGORIES[c], "box": box} for c, box in INSTANCES[nsd_id]]
        if record["type"] == "brief_description":
            assert question in prompts["brief_description"]
            assert answer in [" ".join(c.split()) for c in COCO_CAPTIONS[nsd_id]]
        elif record["type"] == "instruction_reconstruction":
            assert question == "Provide the corresponding Stable Diffusion prompts for the image."
            assert any(answer.startswith(" ".join(c.split()).rstrip(".")) for c in COCO_CAPTIONS[nsd_id])
        elif record["type"] == "concept_localization":
            names = salient_categories(objects)
            assert [t["value"] for t in turns[1::2]] == names
            asked = [t["value"] for t in turns[0::2]]
            assert asked == [f'<image>\nLocating the concept of "{names[0]}"'] + [
                f'Locating the concept of "{n}"' for n in names[1:]
            ]
        else:
            dialogues = [
                [t["value"] for t in _conversation_record(nsd_id, d)["conversations"]] for d in DIALOGUES[nsd_id]
            ]
            assert [question] + [t["value"] for t in turns[1:]] in dialogues
    assert salient_categories([{"category": CATEGORIES[c], "box": b} for c, b in INSTANCES[10]]) == ["person", "dog"]


def test_blip2_captions_join_the_pool(script, root):
    assert _run(script, root, "--types", "brief_description", "--caption-sources", "coco", "blip2") == 0
    answers = {r["conversations"][1]["value"] for r in _records(root)["tr"]}
    assert any(a.startswith("blip caption") for a in answers)
    # Image 13 has no COCO caption but a BLIP-2 one, so its samples now get a record.
    assert {r["nsd_id"] for r in _records(root)["tr"]} == {10, 11, 12, 13}


def test_per_image_records_average_the_repeats(script, root):
    assert _run(script, root, "--per-image", "--types", "brief_description") == 0
    records = _records(root)
    by_id = {r["id"]: r for rs in records.values() for r in rs}
    assert by_id["subj01_tr_nsd000010_brief_description"]["image"] == "subj01/tr/0+2"
    assert by_id["subj01_te_nsd000020_brief_description"]["samples"] == [0, 2]
    assert by_id["subj02_te_nsd000021_brief_description"]["image"] == "subj02/te/0"
    assert len(records["tr"]) == 4  # subj01: 10, 11, 12; subj02: 10 (13 has no caption)
    assert len(records["te"]) == 4


def test_deterministic_idempotent_and_guarded(script, root, tmp_path, capsys):
    assert _run(script, root) == 0
    first = {s: root.sft_data(s).read_bytes() for s in ("tr", "te")}
    stamp = root.sft_data("tr").stat().st_mtime_ns
    assert _run(script, root) == 0  # same settings and inputs: nothing to do
    assert root.sft_data("tr").stat().st_mtime_ns == stamp

    copy_root = DatasetRoot(tmp_path / "copy")
    shutil.copytree(root.root, copy_root.root)
    assert _run(script, copy_root, "--overwrite") == 0
    assert {s: copy_root.sft_data(s).read_bytes() for s in ("tr", "te")} == first

    capsys.readouterr()
    assert _run(script, root, "--seed", "1") == 2  # other settings need --overwrite
    assert "seed" in capsys.readouterr().err
    assert _run(script, root, "--seed", "1", "--overwrite") == 0
    assert root.sft_data("tr").read_bytes() != first["tr"]

    assert manifest_of(root.sft_data("tr")).is_file()
    store = JsonlStore(root.gpt_conversation("conversation"))
    store.append(_conversation_record(11, [("Who rides?", "A man.")]))
    assert _run(script, root, "--seed", "1") == 2  # a changed input needs --overwrite too
    assert "conversation.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("written", [["tr"], ["tr", "te"]], ids=["after-tr", "after-both"])
def test_a_run_killed_before_its_manifest_is_redone_by_a_plain_rerun(script, root, tmp_path, written):
    whole = DatasetRoot(tmp_path / "whole")
    shutil.copytree(root.root, whole.root)
    assert _run(script, whole) == 0
    expected = {s: whole.sft_data(s).read_bytes() for s in ("tr", "te")}
    # The kill states: an earlier run's files (other seed) and its manifest are gone first, then the new
    # run wrote `written` and was killed before its manifest.
    assert _run(script, root, "--seed", "7") == 0
    manifest_of(root.sft_data("tr")).unlink()
    for split in written:
        root.sft_data(split).write_bytes(expected[split])
    assert _run(script, root) == 0  # no manifest: unfinished, so redone (no --overwrite needed)
    assert {s: root.sft_data(s).read_bytes() for s in ("tr", "te")} == expected
    stamp = manifest_of(root.sft_data("tr")).stat().st_mtime_ns
    assert _run(script, root) == 0  # now complete: nothing to do
    assert manifest_of(root.sft_data("tr")).stat().st_mtime_ns == stamp


def test_an_output_folder_that_cannot_be_written_exits_2_before_any_work(script, root, monkeypatch, capsys):
    make_temp = io_files.tempfile.mkstemp

    def read_only_nsd(*args, prefix=None, dir=None, **kwargs):
        # The write probe of io.require_writable fails in nsd/, as on a read-only mount (tests run as
        # root, for whom chmod does not stop a write).
        if str(prefix).startswith(".write-probe") and dir is not None and Path(dir) == root.nsd:
            raise PermissionError(30, "Read-only file system")
        return make_temp(*args, prefix=prefix, dir=dir, **kwargs)

    monkeypatch.setattr(io_files.tempfile, "mkstemp", read_only_nsd)
    assert _run(script, root) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be written (Read-only file system" in err and "sft_data_tr.json" in err
    assert not root.sft_data("tr").exists() and not manifest_of(root.sft_data("tr")).exists()


def test_an_unknown_subject_exits_2_before_any_work(script, root, capsys):
    assert _run(script, root, "--subject", "1", "3") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "subj03" in err
    assert not root.sft_data("tr").exists()


def test_unfinished_last_dialogue_is_skipped_and_kept(script, root):
    path = root.gpt_conversation("conversation")
    torn = path.read_bytes() + b'{"nsd_id": 11, "prompt_type": "conv'
    path.write_bytes(torn)  # as while generate_conversation.py is appending
    assert _run(script, root, "--types", "conversation") == 0
    assert path.read_bytes() == torn  # the reader never changes another stage's file
    assert {r["nsd_id"] for rs in _records(root).values() for r in rs} == set(DIALOGUES)


def test_requested_gpt_type_without_its_file(script, root, capsys):
    assert _run(script, root, "--types", "conversation", "complex_reasoning") == 2
    err = capsys.readouterr().err.strip()
    assert "complex_reasoning.jsonl" in err and "\n" not in err
    assert not root.sft_data("tr").exists()


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda r: np.save(r.whole_betas(2, "te"), np.zeros((3, 2, 2, 2), np.float16)), "nsd_betas_te.npy"),
        (lambda r: write_captions(r.coco_captions, {10: ["x"]}, {}), "nsd_coco_captions.json"),
        (
            lambda r: JsonlStore(r.gpt_conversation("conversation")).append(
                _conversation_record(12, [("<image>\nWhat?", "Cats.")])
            ),
            "conversation.jsonl",
        ),
        (lambda r: r.gpt_conversation("conversation").write_text('{"nsd_id": 10,\n{}\n'), "line 1 is not valid JSON"),
    ],
    ids=["betas-rows", "captions-coverage", "image-token-in-dialogue", "bad-json-line"],
)
def test_bad_input_is_one_line_naming_the_file(script, root, capsys, damage, expected):
    damage(root)
    assert _run(script, root) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err
    assert not root.sft_data("tr").exists()


def test_instruction_lists():
    brief = (INSTRUCTIONS_DIR / "brief_description.txt").read_text().splitlines()
    assert len(brief) == 14 and len(set(brief)) == 14 and all(line.strip() == line and line for line in brief)
    assert brief[0] == "Describe the image concisely."
    lists = load_instruction_lists()
    assert lists["instruction_reconstruction"] == ["Provide the corresponding Stable Diffusion prompts for the image."]
    assert lists["concept_localization"] == ['Locating the concept of "{concept}"']


GOOD = {
    "id": "a",
    "image": "subj01/tr/0",
    "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image concisely."},
        {"from": "gpt", "value": "A dog."},
        {"from": "human", "value": "And its colour?"},
        {"from": "gpt", "value": "Brown."},
    ],
}


def _set(path, value):
    def change(record):
        target = record
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return [record]

    return change


@pytest.mark.parametrize(
    "make, message",
    [
        (_set(["conversations", 0, "value"], "Describe the image."), "<image>"),
        (_set(["conversations", 2, "value"], "<image>\nAgain?"), "<image>"),
        (_set(["conversations", 1, "value"], "<image> A dog."), "<image>"),
        (_set(["conversations", 0, "from"], "gpt"), "turn 0"),
        (_set(["conversations", 3, "from"], "human"), "turn 3"),
        (lambda r: [{**r, "conversations": r["conversations"][:3]}], "end with a gpt turn"),
        (lambda r: [{**r, "conversations": r["conversations"][1:]}], "turn 0"),
        (lambda r: [{**r, "conversations": []}], "non-empty list"),
        (lambda r: [r, copy.deepcopy(r)], "not unique"),
        (_set(["id"], 7), "id"),
        (_set(["image"], ""), "image"),
        (lambda r: [{k: v for k, v in r.items() if k != "image"}], "image"),
        (_set(["conversations", 1, "value"], " "), "non-empty string"),
        (_set(["conversations", 1, "speaker"], "x"), "exactly 'from' and 'value'"),
        (lambda r: {"records": [r]}, "JSON list"),
    ],
)
def test_validator_rejects_malformed_records(make, message):
    validate_sft_records([copy.deepcopy(GOOD)])
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_sft_records(make(copy.deepcopy(GOOD)))


def test_sample_references_and_prompts():
    assert parse_sample_reference("subj07/te/3+9+12") == (7, "te", [3, 9, 12])
    for bad in ("subj1/tr/3", "subj01/val/3", "subj01/tr/", "subj01/tr/3+", "subj01/tr/-1"):
        with pytest.raises(ValueError):
            parse_sample_reference(bad)
    assert (
        sd_prompt("Two dogs  chase a ball.", ["dog", "person", "frisbee"]) == "Two dogs chase a ball, person, frisbee"
    )
    six = ["person", "car", "tree", "sky", "road", "cloud"]
    assert sd_prompt("A bus.", six) == "A bus, person, car, tree, sky, road"  # at most 5 objects
    # The choice must not depend on the Python process (hash() is salted): pin one value.
    assert [pick(14, 0, "subj01_tr_000000_brief_description", "prompt") for _ in range(2)] == [9, 9]
