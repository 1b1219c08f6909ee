"""tools/describe_nsd.py's shared flags: --subject resolved against the raw tree's betas, --json checked first."""

from __future__ import annotations

import json

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def describe():
    return load_script("tools/describe_nsd.py")


def test_subject_selects_and_writes_json(describe, small_tree, tmp_path, capsys):
    summary = tmp_path / "out" / "summary.json"
    assert describe.main(["--nsd-root", str(small_tree.root), "--subject", "5", "--json", str(summary)]) == 0
    out = capsys.readouterr().out
    assert "subj05: grid" in out and "subj01:" not in out
    assert list(json.loads(summary.read_text())["subjects"]) == ["5"]


def test_subject_the_tree_lacks_exits_2_in_one_line(describe, small_tree, capsys):
    assert describe.main(["--nsd-root", str(small_tree.root), "--subject", "1", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "subj02" in err
    assert str(small_tree.root / "nsddata_betas" / "ppdata") in err


def test_unwritable_json_exits_2_before_reading(describe, small_tree, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert describe.main(["--nsd-root", str(small_tree.root), "--json", str(blocker / "summary.json")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert str(blocker / "summary.json") in captured.err and "cannot be written" in captured.err
