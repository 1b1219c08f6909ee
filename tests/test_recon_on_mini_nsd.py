"""On mini-NSD, low-level reconstructions from a trained ViT3D beat shuffled pairs on PixCorr and SSIM.

The whole chain of the demo with its real pieces, small: a tiny VAE trained briefly on the stimuli makes the
VAE targets, a tiny ViT3D learns them from subj01's fMRI (fixed seeds), fmri2embeds.py writes its predictions,
embeds2images.py decodes them with the same VAE, eval_recon.py scores them against the stimuli.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from llava_brain.layout import DatasetRoot, NsdTree
from llava_brain.tiny import build_vae, train_vae

from conftest import load_script
from vit3d_data import TINY, linked_root, replace_npy, shared_strong_root

SIZE = 32  # VAE resolution: latents 4 x 8 x 8


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    source = shared_strong_root(tmp_path_factory)
    base = tmp_path_factory.mktemp("recon_chain")
    layout = DatasetRoot(linked_root(source, base / "root", subjects=(1,)))
    with h5py.File(NsdTree(source.parent / "nsd").stimuli, "r") as f:
        brick = f["imgBrick"][:]  # (images, H, W, 3) uint8
    layout.images_dir.mkdir(parents=True, exist_ok=True)
    for nsd_id, image in enumerate(brick):
        Image.fromarray(image).save(layout.image(nsd_id))
    pixels = torch.from_numpy(brick).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    pixels = F.interpolate(pixels, size=SIZE, mode="area")
    torch.manual_seed(0)
    vae = build_vae(image_size=SIZE, seed=0)
    train_vae(vae, pixels, steps=120, batch_size=32, seed=0)
    with torch.no_grad():
        latents = torch.cat([vae.encode(c).latent_dist.mean for c in pixels.split(64)]) * vae.config.scaling_factor
    vae.save_pretrained(base / "vae")
    replace_npy(layout.vae_latents, latents.numpy().astype(np.float32))
    layout.vae_index.unlink()
    layout.vae_index.write_text(json.dumps({"nsd_ids": list(range(len(brick)))}))

    vit3d = base / "vit3d"
    argv = ["--dataset-root", str(layout.root), "--out", str(vit3d), "--subject", "1", *TINY, "--vae",
            "--vae-weight", "1.0", "--epochs", "8", "--batch-size", "32", "--lr", "3e-3", "--warmup-steps", "10",
            "--num-workers", "0", "--device", "cpu", "--precision", "fp32", "--seed", "0"]  # fmt: skip
    assert load_script("pretrain_vit3d.py").main(argv) == 0
    predictions = base / "predictions"
    assert load_script("tools/evaluate/fmri2embeds.py").main(
        ["--encoder", "vit3d", "--model", str(vit3d), "--dataset-root", str(layout.root), "--kinds", "avg",
         "--out", str(predictions / "vit3d"), "--device", "cpu", "--quiet"]) == 0  # fmt: skip
    recons = base / "recons"
    assert load_script("tools/evaluate/embeds2images.py").main(
        ["--dataset-root", str(layout.root), "--predictions", str(predictions / "vit3d"), "--decoder", "vae",
         "--model", str(base / "vae"), "--out", str(recons), "--device", "cpu", "--quiet"]) == 0  # fmt: skip
    return {"recons": recons / "subj01_avg", "base": base}


def test_reconstructions_beat_shuffled_pairs(chain):
    folder, out = chain["recons"], chain["base"] / "scores.json"
    argv = ["--recons", str(folder / "recons"), "--stimuli", str(folder / "stimuli"), "--metrics", "pixcorr",
            "ssim", "--seed", "0", "--json", str(out), "--quiet"]  # fmt: skip
    assert load_script("tools/evaluate/eval_recon.py").main(argv) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 50 and (result["run"], result["subject"], result["kind"]) == ("vit3d_vae", 1, "avg")
    metrics, shuffled = result["metrics"], result["shuffled"]
    assert metrics["pixcorr"] > shuffled["pixcorr"] + 0.15, result
    assert metrics["ssim"] > shuffled["ssim"] + 0.02, result
