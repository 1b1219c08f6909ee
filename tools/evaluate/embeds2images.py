"""Decode prediction files into images: one PNG per test sample, named by its sample, and a stimulus | recon grid.

Decoders (--decoder):
  vae   the predicted VAE latents (vae.npy of fmri2embeds.py) through the decoder of the VAE that made the
        training targets (the Stable unCLIP pipeline's vae/, as generate_clip_embeds.py --vae-model): the
        low-level reconstruction (layout, colour, coarse shape). Needs an encoder with a VAE head
        (pretrain_vit3d.py --vae). Deterministic; --seed is recorded but unused.
The Stable unCLIP decoder (conditioned on clip.npy and a text prompt, started from the VAE latent mixed
with noise) is meant to join as another --decoder choice with the same outputs; --model already takes
the pipeline folder and --seed its noise.

Writes, for every subject and kind of --predictions (or those of --subject / --kinds), the folder
DatasetRoot.reconstructions(<run>, <decoder>, subject, kind) = <root>/runs/recons/<run>_<decoder>/subjXX_<kind>
(or <--out>/subjXX_<kind>), swapped in whole when complete:
  recons/<key>.png    the reconstruction at the decoder's resolution, <key> = Sample.key (subj01_te_nsd002951)
  stimuli/<key>.png   the stimulus the subject saw (hard link to <root>/nsd/images, or a copy), so that
                      `eval_recon.py --recons recons --stimuli stimuli` pairs them by file name
  grid.png            the first --grid-count samples, each as stimulus | reconstruction, 4 pairs a row
  index.json          subject, split, kind, run (<run>_<decoder>: eval_recon.py's row label), decoder,
                      samples [{sample, nsd_id, file}]
  run.json            provenance; a rerun with the same settings and inputs skips the folder, other
                      settings are refused unless --overwrite
Bad input (no vae.npy, latents of another shape than the VAE's, a missing stimulus) stops with one line
naming the file (exit 2); nothing half-written is left.

Full scale (subjects 1 2 5 7, SD 2.1 unCLIP's VAE; 7,856 PNGs at 512x512, ~2.4 GB at an estimated 0.3 MB each):
  python tools/evaluate/embeds2images.py --dataset-root /data/brain --predictions /data/brain/runs/predictions/vit3d \\
      --decoder vae --model stabilityai/stable-diffusion-2-1-unclip-small --device cuda --precision fp16
Tiny (demo, seconds):
  python tools/evaluate/embeds2images.py --dataset-root demo_out/root \\
      --predictions demo_out/root/runs/predictions/vit3d --decoder vae --model demo_out/tiny_models/unclip --device cpu
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from llava_brain import cli
from llava_brain.errors import BadInputError, exits_on_bad_input, require_file
from llava_brain.evaluation.predictions import KINDS, VAE_FILE, Predictions, folder_name, prediction_folders
from llava_brain.image_stage import check_model_folder, loading_model, model_files, model_setting, vae_source
from llava_brain.io import StageRun, require_writable, staged_folder, write_json
from llava_brain.layout import DatasetRoot
from llava_brain.train.accel import DTYPES

DECODERS = ("vae",)
GRID_TILE = 128  # pixels a side of each image in grid.png
GRID_PAIRS_PER_ROW = 4


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # Data
    cli.add_dataset_root(p, "prepared dataset root (the stimuli, nsd/images/, and the default output under runs/)")
    cli.add_predictions(p, subject_filter=True)
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                   help="avg = repeat-averaged, single = first presentation (default: both)")  # fmt: skip
    # Model
    p.add_argument("--decoder", choices=DECODERS, default="vae",
                   help="vae = the predicted VAE latents through the VAE decoder (default vae)")  # fmt: skip
    p.add_argument("--model", required=True,
                   help="Stable unCLIP pipeline folder or hub id (its vae/ is used), or an AutoencoderKL folder; "
                   "the VAE that encoded the training targets")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=16, help="latents decoded per forward pass (default 16)")
    p.add_argument("--seed", type=int, default=0, help="noise seed of stochastic decoders (default 0)")
    cli.add_device(p)
    cli.add_precision(p)
    # Output
    p.add_argument(
        "--out", type=Path, default=None,
        help="folder of the subjXX_<kind>/ outputs (default <root>/runs/recons/<run>_<decoder>)",
    )  # fmt: skip
    p.add_argument("--grid-count", type=int, default=16, help="samples shown in grid.png (default 16)")
    cli.add_overwrite(p, "redo folders that exist, even ones made with other settings or inputs")
    cli.add_quiet(p)
    return p


def load_vae(name: str, device: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    subfolder, what = vae_source(name)
    check_model_folder(name, ("AutoencoderKL",), what, subfolder=subfolder)
    with loading_model(name, what):
        extra = {"subfolder": subfolder} if subfolder else {}
        return AutoencoderKL.from_pretrained(name, torch_dtype=dtype, **extra).eval().to(device)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(n, 3, H, W) in [-1, 1] -> (n, H, W, 3) uint8 (rounded, as diffusers' image processor)."""
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round()
    return images.permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)


@torch.no_grad()
def decode_vae(vae, latents: np.ndarray, batch_size: int, device: str, quiet: bool):
    """Yield (start, uint8 images) per batch; latents are scaled by the VAE's scaling_factor (as the targets)."""
    dtype = next(vae.parameters()).dtype
    for start in tqdm(range(0, len(latents), batch_size), desc="decode", unit="batch", disable=quiet):
        # a copy: the memory-mapped file is read-only, torch wants writable memory
        z = torch.from_numpy(np.array(latents[start : start + batch_size], dtype=np.float32))
        z = z.to(device, dtype) / vae.config.scaling_factor
        yield start, to_uint8(vae.decode(z).sample)


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link costs no disk; across file systems (or where links are refused) fall back to a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def write_grid(path: Path, pairs: list[tuple[Path, Path]]) -> None:
    """Stimulus | reconstruction tiles, GRID_PAIRS_PER_ROW pairs a row, on a white background."""
    rows = -(-len(pairs) // GRID_PAIRS_PER_ROW)
    cols = min(len(pairs), GRID_PAIRS_PER_ROW)
    grid = Image.new("RGB", (cols * 2 * GRID_TILE, rows * GRID_TILE), "white")
    for k, (stimulus, recon) in enumerate(pairs):
        x, y = (k % GRID_PAIRS_PER_ROW) * 2 * GRID_TILE, (k // GRID_PAIRS_PER_ROW) * GRID_TILE
        for offset, png in ((0, stimulus), (GRID_TILE, recon)):
            with Image.open(png) as im:
                grid.paste(im.convert("RGB").resize((GRID_TILE, GRID_TILE), Image.Resampling.BICUBIC), (x + offset, y))
    grid.save(path)


def check_latents(pred: Predictions, vae) -> np.ndarray:
    if pred.vae is None:
        expected = "missing: --decoder vae needs predicted VAE latents (an encoder with a VAE head: --vae)"
        raise BadInputError(pred.folder / VAE_FILE, expected)
    channels = vae.config.latent_channels
    if pred.vae.shape[1] != channels:
        raise BadInputError(pred.folder / VAE_FILE, f"latents have {pred.vae.shape[1]} channels; the VAE of "
                                                    f"--model decodes {channels}")  # fmt: skip
    return pred.vae


def decode_folder(pred: Predictions, layout: DatasetRoot, vae, args, stage: StageRun, device: str) -> None:
    latents = check_latents(pred, vae)
    stimuli = [require_file(layout.image(n), "the stimulus PNG (make_images.py)") for n in pred.nsd_ids]
    keys = pred.keys
    with staged_folder(stage.output) as staging:
        (staging / "recons").mkdir()
        (staging / "stimuli").mkdir()
        for start, images in decode_vae(vae, latents, args.batch_size, device, args.quiet):
            for k, image in enumerate(images, start):
                Image.fromarray(image).save(staging / "recons" / f"{keys[k]}.png")
        for key, stimulus in zip(keys, stimuli, strict=True):
            link_or_copy(stimulus, staging / "stimuli" / f"{key}.png")
        shown = keys[: args.grid_count]
        write_grid(staging / "grid.png", [(staging / "stimuli" / f"{k}.png", staging / "recons" / f"{k}.png")
                                          for k in shown])  # fmt: skip
        samples = [{"sample": s, "nsd_id": int(n), "file": f"{k}.png"}
                   for s, n, k in zip(pred.samples, pred.nsd_ids, keys, strict=True)]  # fmt: skip
        write_json(staging / "index.json", {"subject": pred.subject, "split": pred.split, "kind": pred.kind,
                                            "run": f"{args.predictions.name}_{args.decoder}", "decoder": args.decoder,
                                            "predictions": str(pred.folder.resolve()), "samples": samples})  # fmt: skip
        stage.finish(args, into=staging, dataset_root=layout.root)


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = cli.parse_args(parser, argv)
    if args.batch_size < 1 or args.grid_count < 1:
        parser.error("--batch-size and --grid-count must be at least 1")
    layout = DatasetRoot(args.dataset_root)
    folders = prediction_folders(args.predictions)
    if args.subject:
        absent = sorted(set(args.subject) - {s for s, _ in folders})
        if absent:
            raise BadInputError(args.predictions, f"has no predictions of subject {absent[0]}; it holds "
                                                  f"{sorted({s for s, _ in folders})}")  # fmt: skip
    folders = {(s, k): f for (s, k), f in folders.items()
               if k in args.kinds and (not args.subject or s in args.subject)}  # fmt: skip
    if not folders:
        raise BadInputError(args.predictions, f"has no prediction folders of kinds {args.kinds}")
    out = args.out if args.out is not None else layout.reconstructions(args.predictions.name, args.decoder)
    require_writable(out, "--out folder")

    settings = {"decoder": args.decoder, "model": model_setting(args.model), "seed": args.seed,
                "precision": args.precision, "run": args.predictions.name}  # fmt: skip
    subfolder, _ = vae_source(args.model)
    stages = {}
    for (subject, kind), folder in folders.items():
        inputs = {"predictions": sorted(p for p in folder.iterdir() if p.suffix in (".npy", ".json")),
                  "model": model_files(args.model, subfolder)}  # fmt: skip
        stage = StageRun(out / folder_name(subject, kind), settings={**settings, "subject": subject, "kind": kind},
                         inputs=inputs, folder=True)  # fmt: skip
        if stage.needed(args.overwrite, complete=(stage.output / "index.json").is_file()):
            stages[(subject, kind)] = stage
        else:
            print(f"{stage.output}: current (same settings and inputs), kept")
    if not stages:
        return 0
    device = cli.resolve_device(args.device)
    vae = load_vae(args.model, device, DTYPES[args.precision])
    for (subject, kind), stage in stages.items():
        pred = Predictions.load(folders[(subject, kind)])
        decode_folder(pred, layout, vae, args, stage, device)
        print(f"{stage.output}: {len(pred)} reconstructions ({args.decoder}), grid -> {stage.output / 'grid.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
