"""CLIP image embeddings and VAE latents of the NSD images: the targets the ViT3D is aligned to.

Writes, one memory-mappable array per kind with an index (row i <-> nsdIds[i], sorted):
  <root>/nsd/vision_embeds/clip_image_embeds.npy   (images, D) float32   projected CLIP image embedding,
                                                   the vector Stable unCLIP is conditioned on (ViT-L/14: 768)
  <root>/nsd/vision_embeds/clip_tokens.npy         (images, tokens, H) float16, penultimate-layer tokens
                                                   (--tokens; ViT-L/14: 257 x 1024)
  <root>/nsd/vision_embeds/index.json              nsd_ids, model, settings, shapes
  <root>/nsd/vae_embeds/vae_latents.npy            (images, 4, S/8, S/8) float32: the unCLIP VAE's latent
                                                   mean x scaling_factor of the image resized to S (--vae-size)
  <root>/nsd/vae_embeds/index.json
Batched, resumable (kill and rerun continues; output identical), shardable with `accelerate launch`;
see llava_brain/image_stage.py for how.

Full scale (one or more GPUs):
  accelerate launch --multi_gpu --num_processes 4 prepare_datasets/generate_clip_embeds.py \\
      --dataset-root /data/brain --clip-model openai/clip-vit-large-patch14 \\
      --vae-model stabilityai/stable-diffusion-2-1-unclip-small --vae-size 512 --dtype fp16 --batch-size 64
Tiny (mini-NSD, CPU):
  python prepare_datasets/generate_clip_embeds.py --dataset-root demo_out/root \\
      --clip-model demo_out/tiny_models/clip_vision --vae-model demo_out/tiny_models/unclip --vae-size 64 --device cpu
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from llava_brain.errors import BadInputError, exits_on_bad_input
from llava_brain.image_stage import (
    DTYPES,
    ArrayParts,
    add_run_arguments,
    add_selection_arguments,
    check_model_folder,
    loading_model,
    make_accelerator,
    open_work_folder,
    plan_batches,
    quiet_transformers,
    remove_parts,
    require_images,
    run_batches,
    select_images,
)
from llava_brain.io import read_json, write_json, write_run_json
from llava_brain.layout import DatasetRoot

log = logging.getLogger("generate_clip_embeds")
CLIP_FILE, TOKENS_FILE, VAE_FILE, INDEX = "clip_image_embeds.npy", "clip_tokens.npy", "vae_latents.npy", "index.json"


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
    add_run_arguments(p, batch_size=32, output="vision_embeds/index.json")
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


def _load_vae(name: str, dtype):
    from diffusers import AutoencoderKL

    folder = Path(name)
    if (folder / "model_index.json").is_file() or not folder.exists():
        check_model_folder(name, ("AutoencoderKL",), "a Stable unCLIP pipeline with a VAE", subfolder="vae")
        with loading_model(name, "a Stable unCLIP pipeline with a VAE"):
            return AutoencoderKL.from_pretrained(name, subfolder="vae", torch_dtype=dtype)
    check_model_folder(name, ("AutoencoderKL",), "an AutoencoderKL")
    with loading_model(name, "an AutoencoderKL"):
        return AutoencoderKL.from_pretrained(name, torch_dtype=dtype)


def _settings(args) -> dict:
    return {
        "clip_model": str(args.clip_model),
        "tokens": args.tokens,
        "vae_model": None if args.no_vae else str(args.vae_model),
        "vae_size": None if args.no_vae else args.vae_size,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
    }


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quiet:
        quiet_transformers()
    if args.batch_size < 1 or args.vae_size < 8:
        build_parser().error("--batch-size must be >= 1 and --vae-size >= 8")
    layout = DatasetRoot(args.dataset_root)
    out_dir, vae_dir = layout.vision_embeds_dir, layout.vae_embeds_dir
    nsd_ids = select_images(layout, None if args.all_images else args.subject, args.all_images)
    settings = _settings(args)
    index = out_dir / INDEX
    if index.is_file() and not args.overwrite:
        previous = read_json(index, "a vision_embeds index")
        if previous.get("settings") != settings or previous.get("nsd_ids") != nsd_ids:
            raise BadInputError(index, "was written with other settings or images; pass --overwrite to recompute")
        remove_parts(out_dir)  # leftovers of a killed --overwrite run
        log.info("embeddings of %d images already complete in %s; nothing to do", len(nsd_ids), out_dir)
        return 0
    paths = require_images(layout, nsd_ids)

    check_model_folder(args.clip_model, ("clip_vision_model", "clip"), "a CLIP vision model with projection")
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    accelerator = make_accelerator(args.device)
    dtype = DTYPES[args.dtype]
    with loading_model(args.clip_model, "a CLIP vision model with projection"):
        clip = CLIPVisionModelWithProjection.from_pretrained(args.clip_model, torch_dtype=dtype).eval()
        processor = CLIPImageProcessor.from_pretrained(args.clip_model)
    clip.to(accelerator.device)
    vae = None if args.no_vae else _load_vae(args.vae_model, dtype).eval().to(accelerator.device)

    embed_dim = clip.config.projection_dim
    grid = clip.config.image_size // clip.config.patch_size
    kinds = {"clip": ((embed_dim,), np.float32)}
    if args.tokens:
        kinds["tokens"] = ((grid * grid + 1, clip.config.hidden_size), np.float16)
    if vae is not None:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        latent = args.vae_size // factor
        kinds["vae"] = ((vae.config.latent_channels, latent, latent), np.float32)

    shapes_of = {kind: [list(shape), np.dtype(dtype).name] for kind, (shape, dtype) in kinds.items()}
    work = open_work_folder(out_dir, {**settings, "nsd_ids": nsd_ids, "kinds": shapes_of}, accelerator, args.overwrite)
    parts = ArrayParts(work, accelerator.process_index, kinds)
    plan = plan_batches(nsd_ids, paths, args.batch_size, parts.done(), accelerator.process_index,
                        accelerator.num_processes)  # fmt: skip
    if accelerator.is_main_process:
        log.info("%d images, %d already stored; %d processes", len(nsd_ids), plan.finished_images,
                 accelerator.num_processes)  # fmt: skip

    @torch.inference_mode()
    def step(batch) -> None:
        n = len(batch.nsd_ids)  # rows beyond n pad a short last batch
        pixels = batch.inputs["clip"].to(accelerator.device, dtype)
        output = clip(pixel_values=pixels, output_hidden_states=args.tokens)
        arrays = {"clip": output.image_embeds[:n].float().cpu().numpy()}
        if args.tokens:
            # Penultimate layer, CLS first; via float16 since numpy has no bfloat16.
            arrays["tokens"] = output.hidden_states[-2][:n].to(torch.float16).cpu().numpy()
        if vae is not None:
            x = batch.inputs["vae"].to(accelerator.device, dtype)
            mean = vae.encode(x).latent_dist.mean * vae.config.scaling_factor  # deterministic: no sampling
            arrays["vae"] = mean[:n].float().cpu().numpy()
        parts.add(batch.nsd_ids, arrays)

    transform = Preprocess(processor, None if vae is None else args.vae_size)
    run_batches(plan, step, transform, args.num_workers, "CLIP/VAE embeddings",
                progress=not args.quiet and accelerator.is_main_process)  # fmt: skip
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return 0

    shapes = {}
    for kind, name, folder in (
        ("clip", CLIP_FILE, out_dir),
        ("tokens", TOKENS_FILE, out_dir),
        ("vae", VAE_FILE, vae_dir),
    ):
        if kind in kinds:
            stored = parts.write_merged(kind, folder / name)
            if stored != nsd_ids:
                raise RuntimeError(f"{kind}: stored {len(stored)} images, expected {len(nsd_ids)}")
            shapes[name] = {"shape": [len(stored), *kinds[kind][0]], "dtype": np.dtype(kinds[kind][1]).name}
    if vae is not None:
        write_json(vae_dir / INDEX, {"nsd_ids": nsd_ids, "settings": settings, "arrays": {VAE_FILE: shapes[VAE_FILE]},
                                     "scaling_factor": vae.config.scaling_factor}, indent=None)  # fmt: skip
        write_run_json(vae_dir, args)
    clip_shapes = {k: v for k, v in shapes.items() if k != VAE_FILE}
    # The index goes last: its presence marks complete embeddings.
    write_json(index, {"nsd_ids": nsd_ids, "settings": settings, "arrays": clip_shapes}, indent=None)
    write_run_json(out_dir, args)
    remove_parts(out_dir)
    log.info(
        "wrote embeddings of %d images: %s", len(nsd_ids), ", ".join(f"{k} {v['shape']}" for k, v in shapes.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
