"""retrieve_captions.py: perfect predictions retrieve the designed training image and its first COCO caption; the
output feeds eval_captions.py and scores above its shuffled control; one-line bad input; the rerun rule.

A hand-made root: CLIP targets are random 8-d vectors, except that each test image's embedding is (a multiple
of) one training image's and a second subject's training images are noisy copies of those, so the nearest
training image of every test image is known in advance (the cosine ignores the scale). Training captions say
the same as the test captions they stand in for, as a good retrieval would.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from llava_brain.annotations import write_captions
from llava_brain.evaluation.predictions import prediction_samples, write_predictions
from llava_brain.layout import DatasetRoot
from llava_brain.subjects import sample_index

from conftest import load_script
from stage_checks import error_line, hidden_leftovers

CAPTIONS = {1: ["A red bus on a street."], 2: ["A cat is sleeping on a sofa.", "second caption"],
            3: ["A brown dog runs across the grass."], 4: ["A tall tree."],
            5: ["A dog runs on the grass."], 6: ["A cat lies on the couch."],
            10: ["A brown dog runs on the green grass.", "A dog playing outside."],
            11: ["A cat sleeping on a sofa.", "A grey cat on a couch."]}  # fmt: skip
# The nearest training image of each test image, per subject (by construction of the embeddings below).
EXPECTED = {(1, 10): 3, (1, 11): 2, (2, 10): 5, (2, 11): 6}
SCRIPTS = {}


def write_root(root: Path) -> DatasetRoot:
    layout = DatasetRoot(root)
    design = {1: ([1, 2, 3, 4, 1], [0, 0, 0, 0, 1], [10, 11, 10, 11], [0, 0, 1, 1]),
              2: ([5, 6], [0, 0], [10, 11], [0, 0])}  # fmt: skip
    for subject, (train, train_repeat, val, val_repeat) in design.items():
        layout.fmri2image(subject).parent.mkdir(parents=True)
        layout.fmri2image(subject).write_text(json.dumps({"train": train, "train_repeat": train_repeat,
                                                          "val": val, "val_repeat": val_repeat}))  # fmt: skip
    rng = np.random.default_rng(0)
    embeds = {n: rng.normal(size=8) for n in (1, 2, 3, 4)}
    embeds[10], embeds[11] = 3.0 * embeds[3], embeds[2]  # cosine ignores scale: 10 is image 3 for subj01
    embeds[5], embeds[6] = embeds[3] + 0.05 * rng.normal(size=8), embeds[2] + 0.05 * rng.normal(size=8)
    ids = sorted(embeds)
    layout.clip_embeds.parent.mkdir(parents=True)
    np.save(layout.clip_embeds, np.stack([embeds[n] for n in ids]).astype(np.float32))
    layout.clip_index.write_text(json.dumps({"nsd_ids": ids}))
    write_captions(layout.coco_captions, CAPTIONS, {"source": "hand-made"})
    return layout


def perfect_predictions(layout: DatasetRoot, run: str, kind: str = "avg", dims: int | None = None) -> Path:
    """Prediction folders whose rows are the test images' own target embeddings."""
    index = json.loads(layout.clip_index.read_text())["nsd_ids"]
    targets = np.load(layout.clip_embeds)
    for subject in (1, 2):
        test = sample_index(layout, subject, "te")
        samples = prediction_samples(test, kind)
        clip = np.stack([targets[index.index(s.nsd_id)] for s in samples])
        write_predictions(layout.predictions(run, subject, kind), samples, test, kind,
                          clip if dims is None else clip[:, :dims], None, {"encoder": "perfect"})  # fmt: skip
    return layout.predictions(run)


def run(name: str, args: list[str]) -> tuple[int, str]:
    if name not in SCRIPTS:
        SCRIPTS[name] = load_script(f"tools/evaluate/{name}.py")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = SCRIPTS[name].main(args)
    return code, out.getvalue()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def root(tmp_path) -> DatasetRoot:
    return write_root(tmp_path / "root")


def test_perfect_predictions_retrieve_the_expected_captions(root, tmp_path):
    preds = perfect_predictions(root, "perfect")
    out = tmp_path / "captions" / "retrieved.jsonl"
    code, stdout = run("retrieve_captions", ["--predictions", str(preds), "--dataset-root", str(root.root),
                                             "--out", str(out)])  # fmt: skip
    assert code == 0 and "wrote 4 captions" in stdout
    lines = read_jsonl(out)
    assert [r["sample"] for r in lines] == ["subj01/te/0+2", "subj01/te/1+3", "subj02/te/0", "subj02/te/1"]
    for record in lines:
        subject, nsd_id = int(record["sample"][4:6]), 10 if record["sample"].endswith(("0+2", "te/0")) else 11
        source = EXPECTED[subject, nsd_id]
        assert record == {"sample": record["sample"], "task": "brief_description", "text": CAPTIONS[source][0],
                          "source_nsd_id": source}  # fmt: skip
    assert Path(f"{out}.run.json").is_file() and not hidden_leftovers(out.parent)


def test_single_trial_folders(root, tmp_path):
    preds = perfect_predictions(root, "perfect", kind="single")
    out = tmp_path / "single.jsonl"
    code, _ = run("retrieve_captions", ["--predictions", str(preds), "--dataset-root", str(root.root),
                                        "--kind", "single", "--out", str(out), "--quiet"])  # fmt: skip
    assert code == 0
    assert [(r["sample"], r["source_nsd_id"]) for r in read_jsonl(out)] == [
        ("subj01/te/0", 3), ("subj01/te/1", 2), ("subj02/te/0", 5), ("subj02/te/1", 6)]  # fmt: skip


def test_retrieved_captions_score_above_the_shuffled_control(root, tmp_path):
    preds = perfect_predictions(root, "perfect")
    out = tmp_path / "retrieved.jsonl"
    assert run("retrieve_captions", ["--predictions", str(preds), "--dataset-root", str(root.root),
                                     "--out", str(out), "--quiet"])[0] == 0  # fmt: skip
    scores = tmp_path / "scores.json"
    code, _ = run("eval_captions", ["--captions", str(out), "--dataset-root", str(root.root), "--metrics", "bleu1",
                                    "rouge_l", "--quiet", "--json", str(scores)])  # fmt: skip
    result = json.loads(scores.read_text())
    assert code == 0 and result["n"] == 4
    for metric in ("bleu1", "rouge_l"):
        assert result["mean"][metric] > result["shuffled"]["mean"][metric] + 0.2


def test_ties_go_to_the_first_candidate():
    script = load_script("tools/evaluate/retrieve_captions.py")
    picked = script.nearest(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[0.0, 1.0], [2.0, 0.0], [1.0, 0.0]]))
    assert picked.tolist() == [1, 0]


def test_bad_input_is_one_line_and_writes_nothing(root, tmp_path, capsys):
    out = tmp_path / "out" / "retrieved.jsonl"
    args = ["--dataset-root", str(root.root), "--out", str(out)]
    # predictions of another width than the targets
    preds = perfect_predictions(root, "narrow", dims=4)
    assert run("retrieve_captions", ["--predictions", str(preds), *args])[0] == 2
    line = error_line(capsys)
    assert str(root.predictions("narrow", 1, "avg") / "clip.npy") in line and "4 dimensions" in line
    # not a prediction run folder
    assert run("retrieve_captions", ["--predictions", str(tmp_path / "nothing"), *args])[0] == 2
    assert str(tmp_path / "nothing") in error_line(capsys)
    # no folders of the requested kind
    preds = perfect_predictions(root, "perfect")
    assert run("retrieve_captions", ["--predictions", str(preds), "--kind", "single", *args])[0] == 2
    assert "subjXX_single" in error_line(capsys)
    # a training image without a COCO caption
    write_captions(root.coco_captions, {k: v for k, v in CAPTIONS.items() if k != 4}, {})
    assert run("retrieve_captions", ["--predictions", str(preds), *args])[0] == 2
    line = error_line(capsys)
    assert str(root.coco_captions) in line and "nsdId 4" in line
    assert not out.exists() and not Path(f"{out}.run.json").exists()
    assert not out.parent.exists() or not hidden_leftovers(out.parent)


def test_rerun_skips_and_other_settings_need_overwrite(root, tmp_path, capsys):
    preds = perfect_predictions(root, "perfect")
    out = tmp_path / "retrieved.jsonl"
    args = ["--predictions", str(preds), "--dataset-root", str(root.root), "--out", str(out), "--quiet"]
    assert run("retrieve_captions", args)[0] == 0
    first = out.read_bytes()
    code, stdout = run("retrieve_captions", args)
    assert code == 0 and "is current" in stdout and out.read_bytes() == first
    assert run("retrieve_captions", [*args, "--task", "other"])[0] == 2
    assert "--overwrite" in error_line(capsys)
    assert run("retrieve_captions", [*args, "--task", "other", "--overwrite"])[0] == 0
    assert {r["task"] for r in read_jsonl(out)} == {"other"}
