"""CLIP image embeddings and VAE latents of the NSD images: the targets the ViT3D is aligned to.

Writes, one memory-mappable array per kind with an index (row i <-> nsdIds[i], sorted); the paths
are those of llava_brain/layout.py (clip_embeds, clip_tokens, clip_index, vae_latents, vae_index):
  <root>/nsd/vision_embeds/clip_image_embeds.npy   (images, D) float32   projected CLIP image embedding,
                                                   the vector Stable unCLIP is conditioned on (ViT-L/14: 768)
  <root>/nsd/vision_embeds/clip_tokens.npy         (images, tokens, H) float16, penultimate-layer tokens
                                                   (--tokens; ViT-L/14: 257 x 1024)
  <root>/nsd/vision_embeds/index.json              nsd_ids, settings, shapes
  <root>/nsd/vae_embeds/vae_latents.npy            (images, 4, S/8, S/8) float32: the unCLIP VAE's latent
                                                   mean x scaling_factor of the image resized to S (--vae-size)
  <root>/nsd/vae_embeds/index.json
and each folder's run.json (provenance; written last, it marks the folder complete).
Batched, resumable (kill and rerun continues; output identical), shardable with `accelerate launch`;
see llava_brain/image_stage/ for how.

Full scale (one or more GPUs):
  accelerate launch --multi_gpu --num_processes 4 prepare_datasets/generate_clip_embeds.py \\
      --dataset-root /data/brain --clip-model openai/clip-vit-large-patch14 \\
      --vae-model stabilityai/stable-diffusion-2-1-unclip-small --vae-size 512 --precision fp16 --batch-size 64
Tiny (mini-NSD, CPU):
  python prepare_datasets/generate_clip_embeds.py --dataset-root demo_out/root \\
      --clip-model demo_out/tiny_models/clip_vision --vae-model demo_out/tiny_models/unclip --vae-size 64 --device cpu
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from llava_brain import cli, runtime
from llava_brain.errors import exits_on_bad_input
from llava_brain.image_stage import (
    Context,
    ImageStage,
    Model,
    add_run_arguments,
    add_selection_arguments,
    check_model_folder,
    loading_model,
    model_files,
    model_setting,
    run_image_stage,
    vae_source,
)
from llava_brain.io import write_json

CLIP_WHAT = "a CLIP vision model with projection"


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_selection_arguments(p, "embed")
    p.add_argument(
        "--clip-model",
        default="openai/clip-vit-large-patch14",
        help="CLIPVisionModelWithProjection folder or hub id (with its CLIPImageProcessor); the paper: ViT-L/14",
    )
    p.add_argument("--tokens", action="store_true", help="also store the penultimate layer's tokens (float16)")
    p.add_argument(
        "--vae-model",
        default="stabilityai/stable-diffusion-2-1-unclip-small",
        help="Stable unCLIP pipeline folder or hub id whose vae/ subfolder encodes the images, or an AutoencoderKL "
        "folder",
    )
    p.add_argument("--no-vae", action="store_true", help="skip the VAE latents")
    p.add_argument(
        "--vae-size", type=int, default=512, help="pixels (square) the image is resized to before the VAE (default "
        "512, the paper's reconstruction size; latents are size/8 for SD VAEs)"
    )  # fmt: skip
    add_run_arguments(p, batch_size=32, output="vision_embeds/ and vae_embeds/")
    return p


class Preprocess:
    """Runs in the loader workers: CLIP pixel values and the VAE input ([-1, 1], vae_size square)."""

    def __init__(self, clip_processor, vae_size: int | None):
        self.clip_processor, self.vae_size = clip_processor, vae_size

    def __call__(self, images):
        from PIL import Image

        out = {"clip": self.clip_processor(images=images, return_tensors="pt")["pixel_values"]}
        if self.vae_size:
            resized = [np.asarray(im.resize((self.vae_size,) * 2, Image.Resampling.BICUBIC)) for im in images]
            pixels = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float()
            out["vae"] = pixels / 127.5 - 1.0
        return out


def _settings(args) -> dict:
    return {
        "clip_model": model_setting(args.clip_model),
        "tokens": args.tokens,
        "vae_model": None if args.no_vae else model_setting(args.vae_model),
        "vae_size": None if args.no_vae else args.vae_size,
    }


def _inputs(args) -> dict:
    check_model_folder(args.clip_model, ("clip_vision_model", "clip"), CLIP_WHAT)
    inputs = {"clip_model": model_files(args.clip_model)}
    if not args.no_vae:
        subfolder, what = vae_source(args.vae_model)
        check_model_folder(args.vae_model, ("AutoencoderKL",), what, subfolder=subfolder)
        inputs["vae_model"] = model_files(args.vae_model, subfolder)
    return inputs


def _outputs(layout, args) -> dict:
    outputs = {layout.vision_embeds_dir: layout.clip_index}
    if not args.no_vae:
        outputs[layout.vae_embeds_dir] = layout.vae_index
    return outputs


def _load(ctx: Context) -> Model:
    from diffusers import AutoencoderKL
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    args, layout = ctx.args, ctx.layout
    with loading_model(args.clip_model, CLIP_WHAT):
        clip = CLIPVisionModelWithProjection.from_pretrained(args.clip_model, torch_dtype=ctx.dtype).eval()
        processor = CLIPImageProcessor.from_pretrained(args.clip_model)
    clip.to(ctx.device)
    vae = None
    if not args.no_vae:
        subfolder, what = vae_source(args.vae_model)
        with loading_model(args.vae_model, what):
            extra = {"subfolder": subfolder} if subfolder else {}
            vae = AutoencoderKL.from_pretrained(args.vae_model, torch_dtype=ctx.dtype, **extra).eval().to(ctx.device)

    grid = clip.config.image_size // clip.config.patch_size
    kinds = {"clip": ((clip.config.projection_dim,), np.float32)}
    if args.tokens:
        kinds["tokens"] = ((grid * grid + 1, clip.config.hidden_size), np.float16)
    if vae is not None:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        latent = args.vae_size // factor
        kinds["vae"] = ((vae.config.latent_channels, latent, latent), np.float32)

    def step(batch) -> dict[str, np.ndarray]:
        n = len(batch.nsd_ids)  # rows beyond n pad a short last batch
        pixels = batch.inputs["clip"].to(ctx.device, ctx.dtype)
        output = clip(pixel_values=pixels, output_hidden_states=args.tokens)
        arrays = {"clip": output.image_embeds[:n].float().cpu().numpy()}
        if args.tokens:
            # Penultimate layer, CLS first; via float16 since numpy has no bfloat16.
            arrays["tokens"] = output.hidden_states[-2][:n].to(torch.float16).cpu().numpy()
        if vae is not None:
            x = batch.inputs["vae"].to(ctx.device, ctx.dtype)
            mean = vae.encode(x).latent_dist.mean * vae.config.scaling_factor  # deterministic: no sampling
            arrays["vae"] = mean[:n].float().cpu().numpy()
        return arrays

    def write(parts, nsd_ids: list[int]) -> str:
        shapes = {}
        for kind, path in (("clip", layout.clip_embeds), ("tokens", layout.clip_tokens), ("vae", layout.vae_latents)):
            if kind in kinds:
                stored = parts.write_merged(kind, path)
                if stored != nsd_ids:
                    raise RuntimeError(f"{kind}: stored {len(stored)} images, expected {len(nsd_ids)}")
                shapes[path] = {"shape": [len(stored), *kinds[kind][0]], "dtype": np.dtype(kinds[kind][1]).name}
        if not args.tokens:
            layout.clip_tokens.unlink(missing_ok=True)  # an earlier --tokens run's array would not match the index
        if vae is not None:
            write_json(layout.vae_index, {"nsd_ids": nsd_ids, "settings": ctx.settings,
                                          "arrays": {layout.vae_latents.name: shapes[layout.vae_latents]},
                                          "scaling_factor": vae.config.scaling_factor}, indent=None)  # fmt: skip
        clip_shapes = {p.name: s for p, s in shapes.items() if p != layout.vae_latents}
        write_json(layout.clip_index, {"nsd_ids": nsd_ids, "settings": ctx.settings, "arrays": clip_shapes},
                   indent=None)  # fmt: skip
        described = ", ".join(f"{p.name} {s['shape']}" for p, s in shapes.items())
        return f"wrote embeddings of {len(nsd_ids)} images: {described}"

    return Model(step=step, write=write, transform=Preprocess(processor, None if vae is None else args.vae_size),
                 kinds=kinds)  # fmt: skip


STAGE = ImageStage(
    what="embeddings",
    description="CLIP/VAE embeddings",
    outputs=_outputs,
    settings=_settings,
    inputs=_inputs,
    load=_load,
)


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    runtime.limit_threads()
    args = cli.parse_args(build_parser(), argv)
    if args.batch_size < 1 or args.vae_size < 8:
        build_parser().error("--batch-size must be >= 1 and --vae-size >= 8")
    return run_image_stage(STAGE, args)


if __name__ == "__main__":
    sys.exit(main())
