"""On mini-NSD, the Stable unCLIP decoder's reconstructions from a trained ViT3D's predictions beat shuffled pairs.

The shared small chain (tests/mini_chain.py): mini-NSD, the tiny models with a trained unCLIP UNet, the ViT3D with
its CLIP and VAE heads and its prediction files, Brain-LLaVA's brief captions as the prompts. embeds2images.py
--decoder unclip decodes the predictions (fixed seed), eval_recon.py scores them against the stimuli and against
shuffled pairs (PixCorr, SSIM, two-way identification with the tiny CLIP).
"""

from __future__ import annotations

import json

import pytest

from mini_chain import brain_llava, mini_chain, run


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    chain, captions = mini_chain(tmp_path_factory), brain_llava(tmp_path_factory)
    base = tmp_path_factory.mktemp("unclip_scores")
    results = {}
    for label, flags in (("full", ["--prompts", captions["real"], "--prompt-task", "brief_description"]),
                         ("no_vae", ["--no-text", "--no-vae-init"])):  # fmt: skip
        out = base / label
        run("tools/evaluate/embeds2images.py", "--dataset-root", chain["root"], "--predictions",
            chain["predictions"], "--decoder", "unclip", "--model", chain["tiny"] / "unclip", "--kinds", "avg",
            "--steps", "8", "--batch-size", "25", "--out", out, "--device", "cpu", "--quiet", *flags)  # fmt: skip
        scored = base / f"{label}.json"
        run("tools/evaluate/eval_recon.py", "--recons", out / "subj01_avg" / "recons", "--stimuli",
            out / "subj01_avg" / "stimuli", "--json", scored, "--protocol", "braindiffuser", "--clip-model",
            chain["tiny"] / "clip_vision", "--device", "cpu", "--quiet")  # fmt: skip
        results[label] = json.loads(scored.read_text())
    return results


def test_the_full_decoder_beats_shuffled_pairs(scores):
    full = scores["full"]
    metrics, shuffled = full["metrics"], full["shuffled"]
    # Measured here (50 test images): PixCorr .269 vs .093, SSIM .889 vs .785, two-way CLIP .728 vs .510.
    assert metrics["pixcorr"] > shuffled["pixcorr"] + 0.05, full
    assert metrics["ssim"] > shuffled["ssim"] + 0.02, full
    assert metrics["clip"] > shuffled["clip"] + 0.1, full


def test_starting_from_the_vae_latent_is_what_brings_the_layout(scores):
    # The paper's "w/o VAE feature" row: PixCorr falls when the decoder starts from pure noise (measured .180).
    assert scores["full"]["metrics"]["pixcorr"] > scores["no_vae"]["metrics"]["pixcorr"], scores
