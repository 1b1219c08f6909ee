"""llava_brain.evaluation.report and tools/evaluate/retrieval_table.py: eval_retrieval.py's results, in tables."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llava_brain.evaluation.predictions import prediction_samples, write_predictions
from llava_brain.evaluation.report import comparison_table, load_retrieval, retrieval_markdown
from llava_brain.layout import DatasetRoot
from llava_brain.subjects import SampleIndex

from conftest import load_script
from stage_checks import error_line

table = load_script("tools/evaluate/retrieval_table.py")


def _block(top1, chance=0.01, **more):
    return {"n": round(1 / chance), "top1_brain_to_image": top1, "chance": chance, **more}


def _result(subjects: dict, mean: dict, shuffled_mean: dict | None = None) -> dict:
    controls = {"shuffled": {"seed": 0, "subjects": {}, "mean": shuffled_mean or {}}}
    return {"evaluation": "retrieval", "run": "x", "n": 100, "kinds": ["avg", "single"], "subjects": subjects,
            "mean": mean, "controls": controls}  # fmt: skip


RIDGE = _result(
    {"subj01": {"avg": _block(0.2), "single": _block(0.1)}, "subj02": {"avg": _block(0.4), "single": _block(0.2)}},
    {"avg": _block(0.3), "single": _block(0.15)},
    {"avg": _block(0.01), "single": _block(0.02)},
)
VIT3D = _result({"subj01": {"avg": _block(0.1), "single": _block(0.05)}}, {"avg": _block(0.1), "single": _block(0.05)})


def test_table_puts_runs_side_by_side_with_their_means_and_shuffled_rows():
    lines = comparison_table({"ridge": RIDGE, "vit3d": VIT3D}).splitlines()
    assert lines[0] == "| subject | chance | ridge avg | ridge single | vit3d avg | vit3d single |"
    assert lines[2] == "| subj01 | 0.010 | 0.200 | 0.100 | 0.100 | 0.050 |"
    assert lines[3] == "| subj02 | 0.010 | 0.400 | 0.200 | - | - |"
    assert lines[4] == "| mean | 0.010 | 0.300 | 0.150 | 0.100 | 0.050 |"  # each run's own mean (eval_retrieval's)
    assert lines[5] == "| shuffled (mean) |  | 0.010 | 0.020 | - | - |"


def test_mindeye_cells_show_the_sd_of_the_draws():
    block = _block(0.2, mindeye300_brain_to_image=0.5, mindeye300_brain_to_image_sd=0.025, mindeye300_chance=1 / 300)
    result = _result({"subj01": {"avg": block}}, {"avg": block})
    lines = comparison_table({"r": result}, metric="mindeye300_brain_to_image", kinds=("avg",)).splitlines()
    assert lines[2] == "| subj01 | 0.003 | 0.500 ± 0.025 |"
    full = retrieval_markdown(result).splitlines()
    assert full[2].startswith("| subj01 | avg | 100 | 0.200 | - | 0.010 | 0.500 ± 0.025 | - | 0.003 |")


def _predictions(layout: DatasetRoot, run: str, swap: bool) -> None:
    """One subject, 4 test images; predictions = the targets themselves, or with images 10 and 20 swapped."""
    table_rows = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    layout.vision_embeds_dir.mkdir(parents=True, exist_ok=True)
    np.save(layout.clip_embeds, table_rows)
    layout.clip_index.write_text(json.dumps({"nsd_ids": [10, 20, 30, 40]}))
    index = SampleIndex(1, "te", np.array([10, 20, 30, 40]), np.zeros(4, dtype=np.int64), None)
    clip = table_rows[[1, 0, 2, 3]] if swap else table_rows
    for kind in ("avg", "single"):
        folder = layout.predictions(run, 1, kind)
        write_predictions(folder, prediction_samples(index, kind), index, kind, clip, None, {"type": "hand"})


def test_reads_eval_retrieval_output_by_file_or_run_folder(tmp_path, capsys):
    layout = DatasetRoot(tmp_path / "root")
    _predictions(layout, "good", swap=False)
    _predictions(layout, "half", swap=True)
    evaluate = load_script("tools/evaluate/eval_retrieval.py")
    assert evaluate.main(["--predictions", str(layout.predictions("good"))]) == 0
    assert evaluate.main(["--predictions", str(layout.predictions("half")), "--json", str(tmp_path / "half.json")]) == 0
    assert load_retrieval(layout.predictions("good")) == load_retrieval(layout.predictions("good") / "retrieval.json")
    capsys.readouterr()
    out = tmp_path / "table.json"
    argv = [
        "--run",
        f"good={layout.predictions('good')}",
        "--run",
        f"half={tmp_path / 'half.json'}",
        "--json",
        str(out),
    ]
    assert table.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "| subject | chance | good avg | good single | half avg | half single |"
    assert lines[3] == "| subj01 | 0.250 | 1.000 | 1.000 | 0.500 | 0.500 |"
    assert lines[-1].startswith("| shuffled (mean) |  | 0.000 | 0.000 |")  # perfect rows, deranged: no hit
    saved = json.loads(out.read_text())
    assert saved["metric"] == "top1_brain_to_image" and saved["runs"]["half"]["subjects"]["subj01"]["avg"] == 0.5
    assert saved["runs"]["good"]["mean"] == {"avg": 1.0, "single": 1.0}


@pytest.mark.parametrize("case", ["missing", "not_json", "metrics_json"])
def test_bad_run_exits_2_naming_the_file(tmp_path, case, capsys):
    path = tmp_path / "retrieval.json"
    if case == "not_json":
        path.write_text("{")
    elif case == "metrics_json":  # pretrain_vit3d.py's per-epoch list is not a retrieval result
        path.write_text(json.dumps([{"epoch": 1, "avg/top1_brain_to_image": 0.1}]))
    assert table.main(["--run", f"x={tmp_path}"]) == 2
    assert str(path) in error_line(capsys)


def test_run_must_be_name_equals_path(capsys):
    with pytest.raises(SystemExit) as exc:
        table.main(["--run", "no-equals-sign"])
    assert exc.value.code == 2 and "NAME=PATH" in capsys.readouterr().err


def test_unwritable_json_exits_2_before_reading(tmp_path, capsys):
    (tmp_path / "retrieval.json").write_text(json.dumps(VIT3D))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert table.main(["--run", f"x={tmp_path}", "--json", str(blocker / "table.json")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert str(blocker / "table.json") in captured.err and "cannot be written" in captured.err
