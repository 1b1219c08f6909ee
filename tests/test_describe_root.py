"""tools/describe_root.py on a hand-made prepared root: the summary, --subject, and bad input in one line (exit 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llava_brain.layout import DatasetRoot

from conftest import load_script

GRID = (4, 5, 3)
SAMPLES = {"tr": 12, "te": 6}  # te: 2 test images x 3 repeats


@pytest.fixture(scope="module")
def describe():
    return load_script("tools/describe_root.py")


@pytest.fixture()
def root(tmp_path) -> DatasetRoot:
    layout = DatasetRoot(tmp_path / "root")
    for subject in (1, 2):
        layout.whole_meta(subject).parent.mkdir(parents=True)
        for split, num in SAMPLES.items():
            np.save(layout.whole_betas(subject, split), np.zeros((num, *GRID), np.float16))
        layout.whole_meta(subject).write_text(
            json.dumps({"grid": list(GRID), "sessions": [1, 2], "areas": {"nsdgeneral": 17}})
        )
        mapping = {"train": list(range(10, 22)), "train_repeat": [0] * 12, "val": [0, 1, 0, 1, 0, 1],
                   "val_repeat": [0, 0, 1, 1, 2, 2]}  # fmt: skip
        layout.fmri2image(subject).write_text(json.dumps(mapping))
    layout.images_dir.mkdir(parents=True)
    for nsd_id in (0, 1):
        layout.image(nsd_id).write_bytes(b"")  # counted by name only
    layout.vision_embeds_dir.mkdir(parents=True)
    layout.clip_index.write_text(
        json.dumps({"arrays": {"clip_image_embeds.npy": {"dtype": "float32", "shape": [24, 8]}}})
    )
    return layout


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_summary_of_every_prepared_subject(describe, root, tmp_path, capsys):
    summary_path = tmp_path / "summary.json"
    assert describe.main(["--dataset-root", str(root.root), "--json", str(summary_path)]) == 0
    out = capsys.readouterr().out
    assert "subj01: grid 4x5x3, 2 sessions -> 12 train + 6 test samples (float16), 2 test images" in out
    assert "subj02:" in out and "images: 2 PNGs" in out and "vision_embeds/clip_image_embeds.npy: float32 24x8" in out
    summary = json.loads(summary_path.read_text())
    assert sorted(summary["subjects"]) == ["subj01", "subj02"]
    assert summary["subjects"]["subj01"]["test_repeats"] == [2, 2, 2]


def test_subject_selects_and_unknown_subject_exits_2(describe, root, capsys, monkeypatch):
    monkeypatch.setenv("BRAIN_DATA_ROOT", str(root.root))  # --dataset-root defaults to it
    assert describe.main(["--subject", "2"]) == 0
    out = capsys.readouterr().out
    assert "subj02:" in out and "subj01:" not in out
    assert describe.main(["--subject", "3"]) == 2
    err = _one_line_error(capsys)
    assert str(root.fmris_dir) in err and "subj03" in err


def test_truncated_array_exits_2_naming_it(describe, root, capsys):
    path = root.whole_betas(2, "te")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert describe.main(["--dataset-root", str(root.root)]) == 2
    err = _one_line_error(capsys)
    assert str(path) in err and "truncated" in err


def test_unwritable_json_exits_2_before_reading(describe, root, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert describe.main(["--dataset-root", str(root.root), "--json", str(blocker / "summary.json")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert str(blocker / "summary.json") in captured.err and "cannot be written" in captured.err


def test_empty_root_exits_2(describe, tmp_path, capsys):
    assert describe.main(["--dataset-root", str(tmp_path / "empty")]) == 2
    assert "make_subjmri.py" in _one_line_error(capsys)
