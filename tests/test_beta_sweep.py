"""The β sweep (llava_brain.evaluation.beta_sweep and make_report.py): found from the scored unCLIP folders'
decoder settings, averaged over subjects, plotted beside shuffled pairs, and never mixed with other settings."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from llava_brain.evaluation.beta_sweep import find_sweeps, plot_sweep

from conftest import load_script

SETTINGS = {"steps": 8, "guidance": 3.0, "noise_level": 0, "vae_init": True, "prompts": "p.jsonl",
            "prompt_task": "brief_description", "recons_per_sample": 1, "seed": 0}  # fmt: skip


def _scored(tmp_path, label: str, subject: int, pixcorr: float, clip: float, **settings) -> dict:
    """An eval_recon.py result whose folder holds embeds2images.py's index.json with these unCLIP settings."""
    folder = tmp_path / "recons" / f"vit3d_{label}" / f"subj0{subject}_avg"
    (folder / "recons").mkdir(parents=True)
    (folder / "index.json").write_text(json.dumps({"run": f"vit3d_{label}", "unclip": SETTINGS | settings}))
    return {"evaluation": "recon", "run": f"vit3d_{label}", "subject": subject, "kind": "avg",
            "protocol": "braindiffuser", "n": 10, "recons": str(folder / "recons"),
            "metrics": {"pixcorr": pixcorr, "ssim": 0.8, "clip": clip},
            "shuffled": {"pixcorr": 0.01, "ssim": 0.7, "clip": 0.5}}  # fmt: skip


def _sweep(tmp_path) -> list[dict]:
    results = []
    for beta, pixcorr in ((0.6, 0.40), (0.93, 0.38), (1.0, 0.30)):
        label = "unclip" if beta == 0.93 else f"unclip_b{beta}"  # the full decoder is the sweep's 0.93 point
        results += [_scored(tmp_path, label, 1, pixcorr, 0.70, beta=beta),
                    _scored(tmp_path, label, 2, pixcorr - 0.1, 0.60, beta=beta)]  # fmt: skip
    # Not part of the sweep: another guidance scale at one β, and the noise start (β means nothing there).
    results.append(_scored(tmp_path, "unclip_g7", 1, 0.9, 0.9, beta=0.6, guidance=7.0))
    results.append(_scored(tmp_path, "unclip_novae", 1, 0.1, 0.5, beta=0.93, vae_init=False))
    return results


def test_sweep_points_are_subject_means_of_one_setting(tmp_path):
    sweeps = find_sweeps(_sweep(tmp_path))
    assert len(sweeps) == 1  # the guidance-7 folder has one β only: no second sweep
    points = sweeps[0]["points"]
    assert [p["beta"] for p in points] == [0.6, 0.93, 1.0]
    assert [p["subjects"] for p in points] == [[1, 2]] * 3
    np.testing.assert_allclose([p["values"]["pixcorr"] for p in points], [0.35, 0.33, 0.25])
    np.testing.assert_allclose([p["values"]["clip"] for p in points], [0.65] * 3)
    assert points[1]["run"] == ["vit3d_unclip"]
    assert find_sweeps(_sweep(tmp_path / "again")[:4]) == []  # two values of β are no sweep


def test_plot_is_a_png(tmp_path):
    path = plot_sweep(find_sweeps(_sweep(tmp_path))[0], tmp_path / "plots" / "beta.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > image.size[1] > 100
    assert not list((tmp_path / "plots").glob(".*"))  # no partial file left


@pytest.fixture(scope="module")
def report_script():
    return load_script("tools/evaluate/make_report.py")


def test_report_draws_the_sweep_with_its_table(report_script, tmp_path):
    evals = tmp_path / "eval"
    evals.mkdir()
    for k, result in enumerate(_sweep(tmp_path)):
        (evals / f"r{k}.json").write_text(json.dumps(result))
    assert report_script.main(["--evals", str(evals), "--out", str(tmp_path / "out")]) == 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "](report_grids/beta_sweep_braindiffuser_avg.png)" in report
    assert (tmp_path / "out" / "report_grids" / "beta_sweep_braindiffuser_avg.png").is_file()
    assert "| 0.93 | 2 | 0.330 | 65.0 | 0.010 | 50.0 |" in report
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [p["beta"] for p in saved["beta_sweeps"][0]["points"]] == [0.6, 0.93, 1.0]
