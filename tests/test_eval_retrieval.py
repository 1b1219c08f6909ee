"""tools/evaluate/eval_retrieval.py: retrieval from prediction files, equal to what the encoders' own runs logged.

- a ViT3D trained here: fmri2embeds.py -> eval_retrieval.py gives exactly the last metrics.json epoch of the
  training run (every metric, avg and single, per subject and their mean);
- ridge: the same on ridge_baseline.py's saved model equals its metrics.json;
- hand-made prediction files with known answers: perfect predictions score 1 and their shuffled control 0
  (a derangement moves every row), the mean over subjects, the n and chance fields;
- bad input (files of different lengths, an nsdId without an embedding, another embedding size, no
  prediction folder) is one line, exit 2, and leaves any earlier retrieval.json as it was.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llava_brain.evaluation.predictions import prediction_samples, write_predictions
from llava_brain.evaluation.retrieval import retrieval_report
from llava_brain.layout import DatasetRoot
from llava_brain.subjects import SampleIndex

from conftest import load_script
from stage_checks import error_line
from vit3d_data import TINY, shared_strong_root

fmri2embeds = load_script("tools/evaluate/fmri2embeds.py")
eval_retrieval = load_script("tools/evaluate/eval_retrieval.py")
REPORT_KEYS = set(retrieval_report(np.eye(3), np.eye(3)))


@pytest.fixture(scope="module")
def strong_root(tmp_path_factory) -> Path:
    return shared_strong_root(tmp_path_factory)


@pytest.fixture(scope="module")
def trained_vit3d(strong_root, tmp_path_factory) -> Path:
    """A small ViT3D trained long enough to retrieve above chance (6 epochs, ~20 s on one thread)."""
    out = tmp_path_factory.mktemp("vit3d") / "run"
    argv = ["--dataset-root", str(strong_root), "--out", str(out), *TINY, "--patch-size", "4", "--hidden-size", "64",
            "--head-hidden", "128", "--epochs", "6", "--batch-size", "32", "--lr", "3e-3", "--weight-decay", "0",
            "--warmup-steps", "10", "--num-workers", "0", "--device", "cpu", "--precision", "fp32"]  # fmt: skip
    assert load_script("pretrain_vit3d.py").main(argv) == 0
    return out


def test_vit3d_predictions_reproduce_the_training_runs_final_evaluation(strong_root, trained_vit3d, tmp_path,
                                                                          capsys):  # fmt: skip
    pred = tmp_path / "pred"
    assert fmri2embeds.main(["--encoder", "vit3d", "--model", str(trained_vit3d), "--dataset-root", str(strong_root),
                             "--out", str(pred), "--device", "cpu", "--quiet"]) == 0  # fmt: skip
    assert eval_retrieval.main(["--predictions", str(pred), "--dataset-root", str(strong_root)]) == 0
    last = json.loads((trained_vit3d / "metrics.json").read_text())[-1]
    result = json.loads((pred / "retrieval.json").read_text())
    assert result["evaluation"] == "retrieval" and result["run"] == "pred" and result["n"] == 50
    for subject in ("subj01", "subj02"):
        for kind in ("avg", "single"):
            block = result["subjects"][subject][kind]
            assert {k: block[k] for k in REPORT_KEYS} == {k: last[f"{subject}/{kind}/{k}"] for k in REPORT_KEYS}
    for kind in ("avg", "single"):
        assert {k: result["mean"][kind][k] for k in REPORT_KEYS} == {k: last[f"{kind}/{k}"] for k in REPORT_KEYS}
    assert last["avg/top1_brain_to_image"] > last["avg/chance"]  # the equality is about a model that learned
    table = capsys.readouterr().out
    top1 = last["subj01/avg/top1_brain_to_image"]
    assert f"| subj01 | avg | 50 | {top1:.3f} |" in table and "| shuffled (mean) | single |" in table


def test_ridge_predictions_reproduce_ridge_baselines_metrics(strong_root, tmp_path):
    out = tmp_path / "ridge"
    ridge = load_script("tools/evaluate/ridge_baseline.py")
    assert ridge.main(["--dataset-root", str(strong_root), "--out", str(out), "--alpha", "1e2", "1e4"]) == 0
    pred = tmp_path / "pred"
    assert fmri2embeds.main(["--encoder", "ridge", "--model", str(out / "ridge_nsdgeneral"), "--dataset-root",
                             str(strong_root), "--out", str(pred)]) == 0  # fmt: skip
    assert eval_retrieval.main(["--predictions", str(pred), "--dataset-root", str(strong_root), "--json",
                                str(tmp_path / "ridge.json")]) == 0  # fmt: skip
    result = json.loads((tmp_path / "ridge.json").read_text())
    for subject in (1, 2):
        metrics = json.loads((out / f"ridge_nsdgeneral_subj{subject:02d}" / "metrics.json").read_text())["metrics"]
        for kind in ("avg", "single"):
            block = result["subjects"][f"subj{subject:02d}"][kind]
            assert {k: block[k] for k in REPORT_KEYS} == {k: metrics[f"{kind}/{k}"] for k in REPORT_KEYS}
    summary = json.loads((out / "ridge_nsdgeneral" / "summary.json").read_text())["metrics"]
    assert result["mean"]["avg"]["top1_brain_to_image"] == pytest.approx(summary["avg/top1_brain_to_image"])


# Hand-made prediction files -----------------------------------------------------------------------

IDS = [30, 10, 20, 40, 50]  # rows of the CLIP table (stored out of nsdId order: the index must be honoured)
DIM = 6


def _root(tmp_path: Path) -> DatasetRoot:
    layout = DatasetRoot(tmp_path / "root")
    layout.vision_embeds_dir.mkdir(parents=True)
    clip = np.random.default_rng(0).normal(size=(len(IDS), DIM)).astype(np.float32)
    np.save(layout.clip_embeds, clip)
    layout.clip_index.write_text(json.dumps({"nsd_ids": IDS}))
    return layout


def _clip_of(layout: DatasetRoot, nsd_ids) -> np.ndarray:
    table = np.load(layout.clip_embeds)
    return table[[IDS.index(int(n)) for n in nsd_ids]]


def _write(layout: DatasetRoot, run: str, subject: int, kind: str, clip_of_rows) -> Path:
    """A prediction folder of 4 test images x 2 repeats; `clip_of_rows(nsd_ids)` gives its clip rows."""
    index = SampleIndex(subject, "te", np.array([10, 20, 30, 40, 10, 20, 30, 40]), np.repeat([0, 1], 4), None)
    samples = prediction_samples(index, kind)
    folder = layout.predictions(run, subject, kind)
    write_predictions(folder, samples, index, kind, clip_of_rows([s.nsd_id for s in samples]), None, {"type": "hand"})
    return folder


def test_perfect_and_swapped_predictions_and_their_shuffled_control(tmp_path, capsys):
    layout = _root(tmp_path)
    _write(layout, "hand", 1, "avg", lambda ids: 3.0 * _clip_of(layout, ids))  # perfect (cosine ignores scale)
    # Subject 2: rows swapped in pairs (10<->20, 30<->40), so every prediction is another image's embedding.
    _write(layout, "hand", 2, "avg", lambda ids: _clip_of(layout, [20, 10, 40, 30]))
    run = layout.predictions("hand")
    assert eval_retrieval.main(["--predictions", str(run)]) == 0  # the root is the one the run folder lies in
    result = json.loads((run / "retrieval.json").read_text())
    assert result["n"] == 4 and result["kinds"] == ["avg"] and result["run"] == "hand"
    s1, s2 = result["subjects"]["subj01"]["avg"], result["subjects"]["subj02"]["avg"]
    assert (s1["top1_brain_to_image"], s1["top1_image_to_brain"], s1["chance"]) == (1.0, 1.0, 0.25)
    assert (s2["top1_brain_to_image"], s2["top1_image_to_brain"]) == (0.0, 0.0)
    assert s1["mindeye300_brain_to_image"] == 1.0 and s1["mindeye300_brain_to_image_sd"] == 0.0  # N <= 300
    assert s1["mindeye300_chance"] == 0.25 and s1["n"] == 4
    mean = result["mean"]["avg"]
    assert mean["subjects"] == [1, 2] and mean["top1_brain_to_image"] == 0.5
    shuffled = result["controls"]["shuffled"]
    # Perfect predictions, deranged: row i holds image p(i) != i's embedding, so no row finds its own image.
    assert shuffled["subjects"]["subj01"]["avg"]["top1_brain_to_image"] == 0.0
    assert shuffled["subjects"]["subj01"]["avg"]["top1_image_to_brain"] == 0.0
    assert shuffled["seed"] == 0 and set(shuffled["mean"]) == {"avg"}
    assert result["unavailable"] == {}
    assert (run / "retrieval.json.run.json").is_file()
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("| subject | kind | n | brain→image | image→brain | chance | MindEye brain→image")
    assert lines[3] == ("| subj01 | avg | 4 | 1.000 | 1.000 | 0.250 | 1.000 ± 0.000 | 1.000 ± 0.000 | 0.250 |")


def test_subject_and_kind_selection_and_another_seed(tmp_path):
    layout = _root(tmp_path)
    for kind in ("avg", "single"):
        for subject in (1, 2):
            _write(layout, "hand", subject, kind, lambda ids: _clip_of(layout, ids))
    out = tmp_path / "only.json"
    argv = ["--predictions", str(layout.predictions("hand")), "--subject", "2", "--kinds", "single", "--json", str(out)]
    assert eval_retrieval.main([*argv, "--seed", "5"]) == 0
    result = json.loads(out.read_text())
    assert list(result["subjects"]) == ["subj02"] and list(result["subjects"]["subj02"]) == ["single"]
    assert result["controls"]["shuffled"]["seed"] == 5


def _bad_run(layout: DatasetRoot, case: str) -> Path:
    """A run with one good folder (subj01) and, in subj02, the fault `case`; returns the file to be named."""
    _write(layout, "bad", 1, "avg", lambda ids: _clip_of(layout, ids))
    folder = _write(layout, "bad", 2, "avg", lambda ids: _clip_of(layout, ids))
    if case == "length":
        np.save(folder / "clip.npy", np.load(folder / "clip.npy")[:3])
        return folder / "clip.npy"
    if case == "dim":
        np.save(folder / "clip.npy", np.zeros((4, DIM + 1), np.float32))
        return folder / "clip.npy"
    index = json.loads((folder / "index.json").read_text())
    index["samples"][2]["nsd_id"] = 99 if case == "unknown_id" else index["samples"][1]["nsd_id"]
    (folder / "index.json").write_text(json.dumps(index))
    return folder / "index.json"


@pytest.mark.parametrize("case, words", [("length", "(4, D)"), ("dim", "7-d"), ("unknown_id", "99"),
                                         ("duplicate_id", "twice")])  # fmt: skip
def test_bad_prediction_files_exit_2_and_keep_the_earlier_result(tmp_path, case, words, capsys):
    layout = _root(tmp_path)
    run = layout.predictions("bad")
    run.mkdir(parents=True)
    (run / "retrieval.json").write_text("earlier result")
    named = _bad_run(layout, case)
    assert eval_retrieval.main(["--predictions", str(run)]) == 2
    line = error_line(capsys)
    assert str(named) in line and words in line, line
    assert (run / "retrieval.json").read_text() == "earlier result"
    assert not (run / "retrieval.json.run.json").exists()
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []


def test_missing_run_folder_or_root_is_one_line(tmp_path, capsys, monkeypatch):
    assert eval_retrieval.main(["--predictions", str(tmp_path / "nothing")]) == 2
    assert str(tmp_path / "nothing") in error_line(capsys)
    assert not (tmp_path / "nothing").exists()
    layout = _root(tmp_path)
    folder = _write(layout, "hand", 1, "avg", lambda ids: _clip_of(layout, ids))
    moved = tmp_path / "elsewhere"
    folder.parent.rename(moved)  # outside any root, no run.json: nothing says where the targets are
    monkeypatch.delenv("BRAIN_DATA_ROOT", raising=False)
    assert eval_retrieval.main(["--predictions", str(moved)]) == 2
    assert "--dataset-root" in error_line(capsys)
    assert eval_retrieval.main(["--predictions", str(moved), "--dataset-root", str(layout.root)]) == 0
