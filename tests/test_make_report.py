"""make_report.py: the paper's table layouts from evaluator outputs, subject means, control rows, published rows."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from llava_brain.evaluation.published import PUBLISHED_TABLE1, PUBLISHED_TABLE2, TABLE1, TABLE2

from conftest import REPO, load_script
from stage_checks import error_line

UNAVAILABLE = "unavailable"


@pytest.fixture(scope="module")
def script():
    return load_script("tools/evaluate/make_report.py")


def _docs_table(heading: str) -> list[list[str]]:
    """Rows (cells) of the first markdown table under `heading` in docs/paper.md."""
    lines = (REPO / "docs" / "paper.md").read_text().split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    table = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[start:end]]
    return [row for row in table[1:] if not row[0].startswith("---")]  # without the header and the rule


@pytest.mark.parametrize(("heading", "published", "columns"), [
    ("## Table 1: brain captioning", PUBLISHED_TABLE1, TABLE1[:9]),
    ("## Table 2: visual reconstruction", PUBLISHED_TABLE2, TABLE2),
])  # fmt: skip
def test_published_rows_are_those_of_the_docs(heading, published, columns):
    rows = _docs_table(heading)
    assert [r[0] for r in rows] == [m for m, _, _ in published]
    for row, (_, models, values) in zip(rows, published, strict=True):
        assert int(row[1]) == models
        assert row[2:] == [c.format(values[c.key]) for c in columns]


def _recon(subject: int, pixcorr: float, clip, shuffled_pixcorr: float, recons: str = "") -> dict:
    metrics = {c.key: UNAVAILABLE for c in TABLE2} | {"pixcorr": pixcorr, "ssim": 0.5, "clip": clip}
    shuffled = {c.key: UNAVAILABLE for c in TABLE2} | {"pixcorr": shuffled_pixcorr, "ssim": 0.4, "clip": 0.5}
    return {"evaluation": "recon", "run": "enc_vae", "subject": subject, "kind": "avg", "protocol": "braindiffuser",
            "n": 10, "metrics": metrics, "shuffled": shuffled, "recons": recons,
            "unavailable": {"alexnet2": "alexnet-owt-7be5be79.pth missing; download it"}}  # fmt: skip


def _write(path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _row(report: str, label: str) -> list[str]:
    line = next(line for line in report.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_reconstruction_rows_are_subject_means_beside_their_control(script, tmp_path):
    folder = tmp_path / "recons" / "subj01_avg"
    (folder / "recons").mkdir(parents=True)
    Image.new("RGB", (8, 4), "red").save(folder / "grid.png")
    evals = tmp_path / "eval"
    _write(evals / "a.json", _recon(1, 0.30, 0.80, -0.02, recons=str(folder / "recons")))
    _write(evals / "b.json", _recon(2, 0.20, 0.70, 0.04))
    _write(evals / "run.json", {"not": "a result"})  # provenance files are skipped
    assert script.main(["--evals", str(evals), "--out", str(tmp_path / "out")]) == 0
    report = (tmp_path / "out" / "report.md").read_text()
    row = _row(report, "**enc_vae, repeat-averaged**")
    # n = 2 subjects; PixCorr (0.30 + 0.20) / 2, CLIP two-way (0.80 + 0.70) / 2 in percent; AlexNet n/a
    assert row[1:4] == ["2", ".250", ".500"] and row[4] == "n/a" and row[7] == "75.0"
    assert _row(report, "enc_vae, repeat-averaged, shuffled pairs")[1:3] == ["2", ".010"]
    assert _row(report, "published: the paper")[2:4] == [".265", ".357"]
    assert "alexnet2: not computed: alexnet-owt-7be5be79.pth missing" in report
    assert (tmp_path / "out" / "report_grids" / "enc_vae_subj01_avg.png").is_file()
    assert "](report_grids/enc_vae_subj01_avg.png)" in report
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    measured = next(r for r in saved["table2"]["braindiffuser"] if r["row"].startswith("**"))
    assert measured["values"]["pixcorr"] == pytest.approx(0.25) and measured["values"]["alexnet2"] == UNAVAILABLE


def test_captions_and_retrieval_sections(script, tmp_path):
    mean = {c.key: 0.5 for c in TABLE1} | {"spice": UNAVAILABLE}
    captions = {"evaluation": "captions", "run": "gen", "refs": "coco", "task": "brief_description", "n": 20,
                "subjects": [1, 2], "mean": mean, "shuffled": {"mean": {c.key: 0.1 for c in TABLE1}},
                "unavailable": {"spice": "no CoreNLP jars"}}  # fmt: skip
    block = {"subjects": [1, 2], "top1_brain_to_image": 0.25, "top1_image_to_brain": 0.2, "chance": 0.01,
             "mindeye300_brain_to_image": 0.25, "mindeye300_brain_to_image_sd": 0.0}  # fmt: skip
    retrieval = {"evaluation": "retrieval", "run": "enc", "n": 100, "kinds": ["avg"],
                 "subjects": {"subj01": {"avg": {**block, "n": 100}}}, "mean": {"avg": block},
                 "controls": {"shuffled": {"mean": {"avg": {**block, "top1_brain_to_image": 0.02}}}}}  # fmt: skip
    _write(tmp_path / "c.json", captions)
    _write(tmp_path / "r.json", retrieval)
    argv = ["--evals", str(tmp_path / "c.json"), str(tmp_path / "r.json"), "--out", str(tmp_path / "out")]
    assert script.main([*argv, "--note", "tiny models on mini-NSD"]) == 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "tiny models on mini-NSD" in report
    gen = _row(report, "**gen**")
    assert gen[1] == "2" and gen[2] == "50.00" and gen[9] == "n/a"
    assert _row(report, "gen, shuffled")[2] == "10.00"
    assert _row(report, "published: the paper")[2] == "57.19"
    assert not any(line.startswith("| published: the paper, BLIP-2") for line in report.splitlines())
    assert _row(report, "enc")[1:4] == ["repeat-averaged", "2", "25.0"] and _row(report, "enc")[-1] == "2.0"
    headers = re.findall(r"^## (.+)$", report, flags=re.M)
    assert headers == ["Retrieval of predicted CLIP embeddings", "Table 1: captioning"]


def test_bad_input_is_one_line(script, tmp_path, capsys):
    _write(tmp_path / "x.json", {"metrics": {}})
    assert script.main(["--evals", str(tmp_path / "x.json"), "--out", str(tmp_path / "out")]) == 2
    assert str(tmp_path / "x.json") in error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert script.main(["--evals", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "holds no evaluation results" in error_line(capsys)
    assert not (tmp_path / "out" / "report.md").exists()
