"""embeds2images.py --decoder unclip: seeds, resume after a kill, MindEye's selection, the grid, one-line errors.

A tiny Stable unCLIP pipeline (random weights: these tests are about the mechanics; that a trained one decodes
the brain is tests/test_unclip_on_mini_nsd.py's) and a hand-made prediction run of one subject.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from llava_brain import tiny
from llava_brain.evaluation.predictions import Predictions, prediction_samples, write_predictions
from llava_brain.layout import DatasetRoot
from llava_brain.recon import UnclipSettings, closest_to_embedding, decode, load_pipeline, sample_seed
from llava_brain.subjects import SampleIndex

from conftest import load_script
from stage_checks import error_line, hidden_leftovers

SIZE = 32  # stimulus and VAE resolution (latents 4 x 8 x 8)
DIM = 8  # CLIP embedding size
NSD_IDS = np.array([7, 3, 7, 11, 3, 7, 20])
REPEATS = np.array([0, 0, 1, 0, 1, 2, 0])


@pytest.fixture(scope="module")
def script():
    return load_script("tools/evaluate/embeds2images.py")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2i_unclip")
    layout = DatasetRoot(base / "root")
    rng = np.random.default_rng(0)
    layout.images_dir.mkdir(parents=True)
    for nsd_id in np.unique(NSD_IDS):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(layout.image(int(nsd_id)))
    vision, processor = tiny.build_clip_vision(projection_dim=DIM)
    text, tokenizer = tiny.build_clip_text(projection_dim=DIM)
    pipe = tiny.build_unclip(clip_vision=vision, feature_extractor=processor, clip_tokenizer=tokenizer,
                             clip_text=text, vae=tiny.build_vae(image_size=SIZE))  # fmt: skip
    pipe.save_pretrained(base / "unclip")
    index = SampleIndex(subject=1, split="te", nsd_ids=NSD_IDS, repeats=REPEATS, trials=None)
    samples = prediction_samples(index, "avg")
    folder = layout.predictions("enc", 1, "avg")
    folder.mkdir(parents=True)
    latents = rng.normal(size=(len(samples), 4, SIZE // 4, SIZE // 4)).astype(np.float32)
    write_predictions(folder, samples, index, "avg", rng.normal(size=(len(samples), DIM)), latents, {"test": 1})
    # fmri2image.json, so that the prompt file's sample references resolve (captions.read_generated)
    mapping = {"val": NSD_IDS.tolist(), "val_repeat": REPEATS.tolist(), "train": [], "train_repeat": []}
    layout.fmri2image(1).parent.mkdir(parents=True, exist_ok=True)
    layout.fmri2image(1).write_text(json.dumps(mapping))
    pred = Predictions.load(folder)
    prompts = base / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"sample": s, "task": "instruction_reconstruction",
                                           "text": f"a photo of shape {k}"}) + "\n"
                               for k, s in enumerate(pred.samples)))  # fmt: skip
    return {"base": base, "layout": layout, "run": layout.predictions("enc"), "model": base / "unclip",
            "prompts": prompts, "pred": pred}  # fmt: skip


def _argv(world, out, *extra):
    return ["--dataset-root", str(world["layout"].root), "--predictions", str(world["run"]), "--decoder", "unclip",
            "--model", str(world["model"]), "--out", str(out), "--device", "cpu", "--quiet", "--steps", "4",
            "--batch-size", "2", "--prompts", str(world["prompts"]), *extra]  # fmt: skip


def _pngs(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "recons").iterdir())}


def test_same_seed_same_pngs_equal_to_the_decoder_called_directly(script, world, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert script.main(_argv(world, one)) == 0
    assert script.main(_argv(world, two, "--batch-size", "3")) == 0  # another batching: the same images
    assert _pngs(one / "subj01_avg") == _pngs(two / "subj01_avg")
    pred = world["pred"]
    pipe = load_pipeline(str(world["model"]), "cpu", __import__("torch").float32)
    prompts = [f"a photo of shape {k}" for k in range(len(pred))]
    seeds = [sample_seed(0, n) for n in pred.nsd_ids]
    expected = decode(pipe, pred.clip, pred.vae, prompts, seeds, UnclipSettings(steps=4))
    for k, key in enumerate(pred.keys):
        np.testing.assert_array_equal(np.asarray(Image.open(one / "subj01_avg" / "recons" / f"{key}.png")),
                                      expected[k])  # fmt: skip
    grid = Image.open(one / "subj01_avg" / "grid.png")
    assert grid.size == (4 * 3 * script.GRID_TILE, script.GRID_TILE)  # stimulus | VAE decode | unCLIP
    index = json.loads((one / "subj01_avg" / "index.json").read_text())
    assert index["run"] == "enc_unclip" and index["unclip"]["beta"] == 0.93
    other = tmp_path / "other"
    assert script.main(_argv(world, other, "--seed", "5")) == 0
    assert _pngs(other / "subj01_avg") != _pngs(one / "subj01_avg")


def test_a_killed_run_keeps_its_images_and_the_rerun_makes_only_the_missing(script, world, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert script.main(_argv(world, whole, "--batch-size", "1")) == 0
    calls = []
    original = script.decode

    def killed_at_third(*args, **kwargs):
        calls.append(len(args[4]))
        if len(calls) == 3:
            raise KeyboardInterrupt  # what SIGINT raises; SIGKILL leaves the same files (PNGs are renamed in)
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(script, "decode", killed_at_third)
        with pytest.raises(KeyboardInterrupt):
            script.main(_argv(world, resumed, "--batch-size", "1"))
    assert not (resumed / "subj01_avg").exists()
    work = resumed / ".subj01_avg.work"
    assert len(list(work.glob("subj01_*.png"))) == 2
    calls.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(script, "decode", lambda *a, **k: calls.append(len(a[4])) or original(*a, **k))
        assert script.main(_argv(world, resumed, "--batch-size", "1")) == 0
    assert sum(calls) == len(world["pred"]) - 2  # only the missing samples
    assert _pngs(resumed / "subj01_avg") == _pngs(whole / "subj01_avg")
    assert hidden_leftovers(resumed) == [] and not work.exists()


def test_recons_per_sample_keeps_the_candidate_closest_to_the_predicted_embedding(script, world, tmp_path):
    out = tmp_path / "best"
    assert script.main(_argv(world, out, "--recons-per-sample", "3", "--no-vae-init")) == 0
    pred = world["pred"]
    pipe = load_pipeline(str(world["model"]), "cpu", __import__("torch").float32)
    prompts = [f"a photo of shape {k}" for k in range(len(pred)) for _ in range(3)]
    seeds = [sample_seed(0, n, c) for n in pred.nsd_ids for c in range(3)]
    settings = UnclipSettings(steps=4, vae_init=False)
    candidates = decode(pipe, np.repeat(pred.clip, 3, axis=0), None, prompts, seeds, settings)
    candidates = candidates.reshape(len(pred), 3, *candidates.shape[1:])
    chosen = closest_to_embedding(pipe, candidates, pred.clip)
    for k, key in enumerate(pred.keys):
        image = np.asarray(Image.open(out / "subj01_avg" / "recons" / f"{key}.png"))
        np.testing.assert_array_equal(image, candidates[k, chosen[k]])


def test_bad_input_exits_2_with_one_line_and_writes_nothing(script, world, tmp_path, capsys):
    out = tmp_path / "bad"
    short = tmp_path / "short.jsonl"
    short.write_text("".join(world["prompts"].read_text().splitlines(keepends=True)[:2]))
    assert script.main([*_argv(world, out)[:-2], "--prompts", str(short)]) == 2
    line = error_line(capsys)
    assert str(short) in line and "has no 'instruction_reconstruction' prompt for sample" in line
    with pytest.raises(SystemExit) as exit_info:  # neither --prompts nor --no-text
        script.main(_argv(world, out)[:-2])
    assert exit_info.value.code == 2 and "--prompts FILE" in capsys.readouterr().err
    no_unet = tmp_path / "no_unet"
    no_unet.mkdir()
    (no_unet / "model_index.json").write_text(json.dumps({"_class_name": "StableUnCLIPImg2ImgPipeline",
                                                          "vae": ["diffusers", "AutoencoderKL"]}))  # fmt: skip
    argv = _argv(world, out)
    argv[argv.index("--model") + 1] = str(no_unet)
    assert script.main(argv) == 2
    assert str(no_unet) in error_line(capsys)
    wrong = tmp_path / "wrong_run"
    folder = wrong / "subj01_avg"
    folder.mkdir(parents=True)
    pred = world["pred"]
    for name in ("index.json", "run.json"):
        if (pred.folder / name).is_file():
            (folder / name).write_bytes((pred.folder / name).read_bytes())
    np.save(folder / "clip.npy", np.zeros((len(pred), DIM + 1), np.float32))
    np.save(folder / "vae.npy", np.asarray(pred.vae))
    argv = _argv(world, out)
    argv[argv.index("--predictions") + 1] = str(wrong)
    assert script.main(argv) == 2
    assert "clip.npy" in error_line(capsys)
    assert not out.exists() or (hidden_leftovers(out) == [] and not any(out.iterdir()))
