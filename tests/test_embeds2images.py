"""embeds2images.py --decoder vae: predicted latents -> PNGs named by sample, stimuli beside them, a grid.

The expected images are computed here directly with the VAE (decode(latent / scaling_factor)), not by the
script's own helpers; reruns, refused settings and bad input are checked on the files left behind.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from llava_brain.evaluation.predictions import Predictions, prediction_samples, write_predictions
from llava_brain.layout import DatasetRoot
from llava_brain.subjects import SampleIndex
from llava_brain.tiny import build_vae

from conftest import load_script
from stage_checks import error_line, hidden_leftovers

SIZE = 32  # stimulus and VAE resolution (latents 8x8)
NSD_IDS = np.array([7, 3, 7, 11, 3, 7, 20])  # trial rows of one subject's test split (ids repeat)
REPEATS = np.array([0, 0, 1, 0, 1, 2, 0])


@pytest.fixture(scope="module")
def script():
    return load_script("tools/evaluate/embeds2images.py")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A dataset root with stimulus PNGs, a tiny VAE folder, and a prediction run whose latents are the
    stimuli's own VAE latents (scaled, as generate_clip_embeds.py stores targets)."""
    base = tmp_path_factory.mktemp("e2i")
    layout = DatasetRoot(base / "root")
    rng = np.random.default_rng(0)
    layout.images_dir.mkdir(parents=True)
    for nsd_id in np.unique(NSD_IDS):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(layout.image(int(nsd_id)))
    vae = build_vae(image_size=SIZE)
    vae.register_to_config(scaling_factor=0.5)
    vae.save_pretrained(base / "vae")
    index = SampleIndex(subject=1, split="te", nsd_ids=NSD_IDS, repeats=REPEATS, trials=None)
    run = layout.predictions("enc")
    for kind in ("avg", "single"):
        samples = prediction_samples(index, kind)
        latents = rng.normal(size=(len(samples), 4, SIZE // 4, SIZE // 4)).astype(np.float32)
        folder = layout.predictions("enc", 1, kind)
        folder.mkdir(parents=True)
        write_predictions(folder, samples, index, kind, rng.normal(size=(len(samples), 8)), latents, {"test": 1})
    return {"base": base, "layout": layout, "run": run, "vae": base / "vae"}


def _argv(world, out, *extra):
    return ["--dataset-root", str(world["layout"].root), "--predictions", str(world["run"]), "--decoder", "vae",
            "--model", str(world["vae"]), "--out", str(out), "--device", "cpu", "--quiet", *extra]  # fmt: skip


def _expected(world, latents: np.ndarray) -> np.ndarray:
    """(n, H, W, 3) uint8 computed directly from the diffusers VAE."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(world["vae"]).eval()
    with torch.no_grad():
        images = vae.decode(torch.from_numpy(latents) / vae.config.scaling_factor).sample
    return ((images.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(np.uint8)


def test_decodes_every_sample_with_its_stimulus(script, world, tmp_path):
    out = tmp_path / "recons"
    assert script.main(_argv(world, out)) == 0
    for kind, count in (("avg", 4), ("single", 4)):
        pred = Predictions.load(world["layout"].predictions("enc", 1, kind))
        folder = out / f"subj01_{kind}"
        expected = _expected(world, np.asarray(pred.vae))
        index = json.loads((folder / "index.json").read_text())
        assert [s["sample"] for s in index["samples"]] == pred.samples and len(pred) == count
        for k, (key, nsd_id) in enumerate(zip(pred.keys, pred.nsd_ids, strict=True)):
            np.testing.assert_array_equal(np.asarray(Image.open(folder / "recons" / f"{key}.png")), expected[k])
            stimulus = (folder / "stimuli" / f"{key}.png").read_bytes()
            assert stimulus == world["layout"].image(int(nsd_id)).read_bytes()
        assert Image.open(folder / "grid.png").size == (4 * 2 * script.GRID_TILE, script.GRID_TILE)
        assert (folder / "run.json").is_file()
    # avg files are named by image, single ones by trial row; both pair with their stimulus by name
    assert sorted(p.name for p in (out / "subj01_avg" / "recons").iterdir())[0] == "subj01_te_nsd000003.png"
    assert sorted(p.name for p in (out / "subj01_single" / "recons").iterdir())[0] == "subj01_te_000000.png"
    assert hidden_leftovers(out) == []


def test_rerun_keeps_current_and_refuses_other_settings(script, world, tmp_path, capsys):
    out = tmp_path / "recons"
    assert script.main(_argv(world, out, "--kinds", "avg")) == 0
    before = (out / "subj01_avg" / "run.json").stat().st_mtime_ns
    capsys.readouterr()
    assert script.main(_argv(world, out, "--kinds", "avg")) == 0
    assert "current" in capsys.readouterr().out
    assert (out / "subj01_avg" / "run.json").stat().st_mtime_ns == before
    assert script.main(_argv(world, out, "--kinds", "avg", "--seed", "3")) == 2
    assert "--overwrite" in error_line(capsys)
    assert script.main(_argv(world, out, "--kinds", "avg", "--seed", "3", "--overwrite")) == 0


def _without_latents(world, tmp_path):
    """(run, folder): a copy of the avg prediction folder without its vae.npy."""
    run = tmp_path / "preds"
    folder = run / "subj01_avg"
    folder.mkdir(parents=True)
    source = world["layout"].predictions("enc", 1, "avg")
    for name in ("clip.npy", "index.json"):
        (folder / name).write_bytes((source / name).read_bytes())
    return run, folder


def test_missing_latents_are_one_line_and_nothing_is_written(script, world, tmp_path, capsys):
    run, folder = _without_latents(world, tmp_path)
    argv = _argv(world, tmp_path / "out")
    argv[argv.index("--predictions") + 1] = str(run)
    assert script.main(argv) == 2
    line = error_line(capsys)
    assert str(folder / "vae.npy") in line and "VAE head" in line
    assert not (tmp_path / "out" / "subj01_avg").exists() and hidden_leftovers(tmp_path / "out") == []


def test_latents_of_another_vae_are_refused(script, world, tmp_path, capsys):
    run, folder = _without_latents(world, tmp_path)
    np.save(folder / "vae.npy", np.zeros((4, 3, 8, 8), dtype=np.float32))  # 3 channels; the VAE has 4
    argv = _argv(world, tmp_path / "out")
    argv[argv.index("--predictions") + 1] = str(run)
    assert script.main(argv) == 2
    assert "4" in error_line(capsys) and not (tmp_path / "out" / "subj01_avg").exists()


def test_a_missing_stimulus_is_named(script, world, tmp_path, capsys):
    layout = DatasetRoot(tmp_path / "root")
    layout.images_dir.mkdir(parents=True)
    for nsd_id in (3, 7, 11):  # nsdId 20 is missing
        (layout.image(nsd_id)).write_bytes(world["layout"].image(nsd_id).read_bytes())
    argv = _argv(world, tmp_path / "out", "--kinds", "avg")
    argv[argv.index("--dataset-root") + 1] = str(layout.root)
    assert script.main(argv) == 2
    assert str(layout.image(20)) in error_line(capsys)
    assert not (tmp_path / "out" / "subj01_avg").exists()
