"""llava_brain.evaluation.report and tools/evaluate/retrieval_table.py: reading both writers' results, the table."""

from __future__ import annotations

import json

import pytest

from llava_brain.evaluation.report import comparison_table, load_run
from llava_brain.layout import DatasetRoot

from conftest import load_script


def _vit3d_run(folder, epochs):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(epochs))
    return folder


def _ridge_run(out, subject, metrics):
    folder = out / f"ridge_nsdgeneral_subj{subject:02d}"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"subject": subject, "metrics": metrics}))


def _metrics(top1, chance=0.01):
    return {"avg/top1_brain_to_image": top1, "avg/chance": chance, "single/top1_brain_to_image": top1 / 2,
            "single/chance": chance}  # fmt: skip


def test_vit3d_run_uses_the_last_epoch(tmp_path):
    first = {"epoch": 1, "subj01/avg/top1_brain_to_image": 0.01, "avg/top1_brain_to_image": 0.01}
    last = {"epoch": 2, "train_loss": 0.5, "subj01/avg/top1_brain_to_image": 0.3, "subj02/avg/chance": 0.01,
            "avg/top1_brain_to_image": 0.3}  # fmt: skip
    run = load_run(_vit3d_run(tmp_path / "vit3d", [first, last]))
    assert run == {"subj01": {"avg/top1_brain_to_image": 0.3}, "subj02": {"avg/chance": 0.01}}


def test_ridge_prefix_collects_every_subject_folder(tmp_path):
    _ridge_run(tmp_path, 1, _metrics(0.2))
    _ridge_run(tmp_path, 7, _metrics(0.4))
    (tmp_path / "ridge_nsdgeneral_pixels_subj01").mkdir()  # another target: not part of this prefix
    run = load_run(tmp_path / "ridge_nsdgeneral")
    assert sorted(run) == ["subj01", "subj07"] and run["subj07"]["avg/top1_brain_to_image"] == 0.4


def test_table_puts_runs_side_by_side_and_averages_what_exists():
    runs = {"ridge": {"subj01": _metrics(0.2), "subj02": _metrics(0.4)}, "vit3d": {"subj01": _metrics(0.1)}}
    lines = comparison_table(runs).splitlines()
    assert lines[0] == "| subject | chance | ridge avg | ridge single | vit3d avg | vit3d single |"
    assert lines[2] == "| subj01 | 0.010 | 0.200 | 0.100 | 0.100 | 0.050 |"
    assert lines[3] == "| subj02 | 0.010 | 0.400 | 0.200 | - | - |"
    assert lines[4] == "| mean | 0.010 | 0.300 | 0.150 | 0.100 | 0.050 |"


@pytest.mark.parametrize("case", ["missing", "not_a_list", "no_subject_keys"])
def test_bad_run_exits_2_naming_the_file(tmp_path, case, capsys):
    table = load_script("tools/evaluate/retrieval_table.py")
    if case == "missing":
        path, named = tmp_path / "nothing", tmp_path / "nothing"
    else:
        content = {"epoch": 1} if case == "not_a_list" else [{"epoch": 1, "avg/top1_brain_to_image": 0.1}]
        path = _vit3d_run(tmp_path / "run", content)
        named = path / "metrics.json"
    assert table.main(["--run", f"x={path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(named) in err


def test_run_must_be_name_equals_path(capsys):
    table = load_script("tools/evaluate/retrieval_table.py")
    with pytest.raises(SystemExit) as exc:
        table.main(["--run", "no-equals-sign"])
    assert exc.value.code == 2 and "NAME=PATH" in capsys.readouterr().err


def test_ridge_run_named_by_the_layout_is_read(tmp_path):
    layout = DatasetRoot(tmp_path / "root")
    for subject in (2, 5):
        folder = layout.ridge_run("streams", "pixels", subject)
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"subject": subject, "metrics": _metrics(0.1 * subject)}))
    layout.ridge_run("streams", "pixels").mkdir()  # the run's summary folder holds no metrics.json
    run = load_run(layout.ridge_run("streams", "pixels"))
    assert sorted(run) == ["subj02", "subj05"] and run["subj05"]["avg/top1_brain_to_image"] == 0.5


def test_unwritable_json_exits_2_before_reading(tmp_path, capsys):
    table = load_script("tools/evaluate/retrieval_table.py")
    run = _vit3d_run(tmp_path / "vit3d", [{"epoch": 1, "subj01/avg/top1_brain_to_image": 0.3}])
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert table.main(["--run", f"x={run}", "--json", str(blocker / "table.json")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert str(blocker / "table.json") in captured.err and "cannot be written" in captured.err
