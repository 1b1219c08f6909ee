"""Decode prediction files into images: one PNG per test sample, named by its sample, and a stimulus | recon grid.

Decoders (--decoder):
  vae     the predicted VAE latents (vae.npy of fmri2embeds.py) through the decoder of the VAE that made the
          training targets (the Stable unCLIP pipeline's vae/, as generate_clip_embeds.py --vae-model): the
          low-level reconstruction (layout, colour, coarse shape). Needs an encoder with a VAE head
          (pretrain_vit3d.py --vae). Deterministic; --seed is recorded but unused.
  unclip  the paper's decoder (llava_brain.recon.unclip): x = D((1-beta) z_vae + beta eps | z_clip, prompt) on the
          components of a StableUnCLIPImg2ImgPipeline: the predicted VAE latent noised to strength --beta, denoised
          by the UNet conditioned on the predicted CLIP embedding (clip.npy, through the pipeline's normaliser
          and --noise-level augmentation) and on the prompt of each sample (--prompts: generate_captions_from_llava.py's
          JSONL, its instruction_reconstruction answers by default; --no-text: none), with classifier-free
          guidance. --no-vae-init starts from pure noise. --recons-per-sample K draws K and keeps the one whose
          CLIP embedding is closest to the predicted one (MindEye's selection). Every sample has its own seed
          (--seed, its image, the candidate): the same seed gives the same PNGs, in any batch. Resumable: a killed
          run keeps the PNGs it wrote (in <folder>/../.<folder>.work) and a rerun makes only the missing ones.

Writes, for every subject and kind of --predictions (or those of --subject / --kinds), the folder
DatasetRoot.reconstructions(<run>, <decoder>, subject, kind) = <root>/runs/recons/<run>_<decoder>/subjXX_<kind>
(or <--out>/subjXX_<kind>), swapped in whole when complete:
  recons/<key>.png    the reconstruction at the decoder's resolution, <key> = Sample.key (subj01_te_nsd002951)
  stimuli/<key>.png   the stimulus the subject saw (hard link to <root>/nsd/images, or a copy), so that
                      `eval_recon.py --recons recons --stimuli stimuli` pairs them by file name
  grid.png            the first --grid-count samples, each as stimulus | reconstruction (unclip: stimulus |
                      the low-level VAE decode of the predicted latent | reconstruction), 4 samples a row
  index.json          subject, split, kind, run (<run>_<decoder>: eval_recon.py's row label), decoder,
                      samples [{sample, nsd_id, file}]
  run.json            provenance; a rerun with the same settings and inputs skips the folder, other
                      settings are refused unless --overwrite
Bad input (no vae.npy, latents or CLIP embeddings of another shape than the decoder's, a missing stimulus, a
prompt file that misses a sample, a decoder folder without the Stable unCLIP components) stops with one line
naming the file (exit 2); nothing half-written is left.

Full scale (subjects 1 2 5 7, SD 2.1 unCLIP's VAE; 7,856 PNGs at 512x512, ~2.4 GB at an estimated 0.3 MB each):
  python tools/evaluate/embeds2images.py --dataset-root /data/brain --predictions /data/brain/runs/predictions/vit3d \\
      --decoder vae --model stabilityai/stable-diffusion-2-1-unclip-small --device cuda --precision fp16
  python tools/evaluate/embeds2images.py --dataset-root /data/brain --predictions /data/brain/runs/predictions/vit3d \\
      --decoder unclip --model stabilityai/stable-diffusion-2-1-unclip-small --kinds avg \\
      --prompts /data/brain/runs/captions/brain_llava_avg_prompts.jsonl --steps 50 --device cuda --precision fp16
Tiny (demo, seconds):
  python tools/evaluate/embeds2images.py --dataset-root demo_out/root \\
      --predictions demo_out/root/runs/predictions/vit3d --decoder vae --model demo_out/tiny_models/unclip --device cpu
  python tools/evaluate/embeds2images.py --dataset-root demo_out/root \\
      --predictions demo_out/root/runs/predictions/vit3d --decoder unclip --model demo_out/tiny_models/unclip \\
      --kinds avg --no-text --steps 10 --device cpu
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
from llava_brain.io import StageRun, read_json, require_writable, staged_folder, write_json
from llava_brain.layout import DatasetRoot
from llava_brain.recon import check_pipeline_folder, closest_to_embedding, decode, load_pipeline
from llava_brain.recon.unclip import sample_seed, vae_images
from llava_brain.train.accel import DTYPES

DECODERS = ("vae", "unclip")
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
                   help="vae = the predicted VAE latents through the VAE decoder (default); unclip = Stable unCLIP "
                   "from the predicted CLIP embedding, VAE latent and a prompt")  # fmt: skip
    p.add_argument("--model", required=True,
                   help="Stable unCLIP pipeline folder or hub id (its vae/ is used), or an AutoencoderKL folder; "
                   "the VAE that encoded the training targets")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=16, help="samples decoded per forward pass (default 16)")
    p.add_argument("--seed", type=int, default=0, help="noise seed of stochastic decoders (default 0)")
    cli.add_device(p)
    cli.add_precision(p)
    # The unCLIP decoder
    u = p.add_argument_group("--decoder unclip")
    u.add_argument(
        "--prompts",
        type=Path,
        help="JSONL of generate_captions_from_llava.py: each sample's prompt (the --prompt-task answer)",
    )
    u.add_argument(
        "--prompt-task",
        default="instruction_reconstruction",
        help="which task's answers of --prompts are the prompts (default instruction_reconstruction, "
        "the paper's; brief_description is Table 7's other row)",
    )
    u.add_argument("--no-text", action="store_true", help="no prompt (the 'w/o LLM' ablation)")
    cli.add_unclip_settings(u)
    u.add_argument("--recons-per-sample", type=int, default=1,
                   help="draw K images per sample and keep the one closest to the predicted CLIP embedding "
                   "(MindEye's selection; default 1)")  # fmt: skip
    # Output
    p.add_argument("--label", help="name of this reconstruction run (default: the decoder): the output folder "
                   "<root>/runs/recons/<run>_<label> and eval_recon.py's row label, e.g. unclip_notext")  # fmt: skip
    p.add_argument(
        "--out", type=Path, default=None,
        help="folder of the subjXX_<kind>/ outputs (default <root>/runs/recons/<run>_<label>)",
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


@torch.no_grad()
def decode_vae(vae, latents: np.ndarray, batch_size: int, quiet: bool):
    """Yield (start, uint8 images) per batch; latents are scaled by the VAE's scaling_factor (as the targets)."""
    for start in tqdm(range(0, len(latents), batch_size), desc="decode", unit="batch", disable=quiet):
        yield start, vae_images(vae, latents[start : start + batch_size])


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link costs no disk; across file systems (or where links are refused) fall back to a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def write_grid(path: Path, rows: list[list]) -> None:
    """One tile per image (a PNG path or an (H, W, 3) uint8 array), each row's tiles side by side,
    GRID_PAIRS_PER_ROW rows of the list per line of the grid, on a white background."""
    per = max(len(r) for r in rows)
    lines = -(-len(rows) // GRID_PAIRS_PER_ROW)
    cols = min(len(rows), GRID_PAIRS_PER_ROW)
    grid = Image.new("RGB", (cols * per * GRID_TILE, lines * GRID_TILE), "white")
    for k, tiles in enumerate(rows):
        x, y = (k % GRID_PAIRS_PER_ROW) * per * GRID_TILE, (k // GRID_PAIRS_PER_ROW) * GRID_TILE
        for offset, tile in enumerate(tiles):
            im = Image.open(tile) if isinstance(tile, Path) else Image.fromarray(tile)
            with im:
                tile_image = im.convert("RGB").resize((GRID_TILE, GRID_TILE), Image.Resampling.BICUBIC)
            grid.paste(tile_image, (x + offset * GRID_TILE, y))
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


def decode_folder(pred: Predictions, layout: DatasetRoot, vae, args, stage: StageRun) -> None:
    latents = check_latents(pred, vae)
    stimuli = [require_file(layout.image(n), "the stimulus PNG (make_images.py)") for n in pred.nsd_ids]
    keys = pred.keys
    with staged_folder(stage.output) as staging:
        (staging / "recons").mkdir()
        (staging / "stimuli").mkdir()
        for start, images in decode_vae(vae, latents, args.batch_size, args.quiet):
            for k, image in enumerate(images, start):
                Image.fromarray(image).save(staging / "recons" / f"{keys[k]}.png")
        for key, stimulus in zip(keys, stimuli, strict=True):
            link_or_copy(stimulus, staging / "stimuli" / f"{key}.png")
        shown = keys[: args.grid_count]
        write_grid(staging / "grid.png", [[staging / "stimuli" / f"{k}.png", staging / "recons" / f"{k}.png"]
                                          for k in shown])  # fmt: skip
        write_index(staging, pred, keys, args)
        stage.finish(args, into=staging, dataset_root=layout.root)


def write_index(staging: Path, pred: Predictions, keys: list[str], args, **extra) -> None:
    samples = [{"sample": s, "nsd_id": int(n), "file": f"{k}.png"}
               for s, n, k in zip(pred.samples, pred.nsd_ids, keys, strict=True)]  # fmt: skip
    write_json(staging / "index.json", {"subject": pred.subject, "split": pred.split, "kind": pred.kind,
                                        "run": f"{args.predictions.name}_{args.label}", "decoder": args.decoder,
                                        "predictions": str(pred.folder.resolve()), "samples": samples,
                                        **extra})  # fmt: skip


# The unCLIP decoder ---------------------------------------------------------------------------------


def read_prompts(args, layout: DatasetRoot) -> dict[str, str] | None:
    """{sample reference: prompt} of --prompts' --prompt-task lines; None with --no-text."""
    if args.no_text:
        return None
    from llava_brain.evaluation.captions import read_generated

    lines = [g for g in read_generated(args.prompts, layout) if g.task == args.prompt_task]
    if not lines:
        raise BadInputError(args.prompts, f"has no {args.prompt_task!r} lines (pass --prompt-task, or --no-text)")
    return {g.sample: g.text for g in lines}


def check_unclip_inputs(pred: Predictions, pipe, args, prompts: dict[str, str] | None) -> list[str]:
    """The prompts of pred's samples, after checking the embeddings' and latents' shapes against the pipeline."""
    dim = pipe.image_normalizer.mean.shape[-1]
    if pred.clip.shape[1] != dim:
        raise BadInputError(pred.folder / "clip.npy", f"embeddings have {pred.clip.shape[1]} values; the unCLIP "
                                                      f"of --model is conditioned on {dim}")  # fmt: skip
    config = pipe.unet.config
    latent_shape = (config.in_channels, config.sample_size, config.sample_size)
    if not args.no_vae_init:
        if pred.vae is None:
            raise BadInputError(
                pred.folder / VAE_FILE,
                "missing: the unCLIP decoder starts from the predicted VAE "
                "latents (an encoder with a VAE head), or pass --no-vae-init",
            )
        if tuple(pred.vae.shape[1:]) != latent_shape:
            raise BadInputError(pred.folder / VAE_FILE, f"latents are {tuple(pred.vae.shape[1:])}; the UNet of "
                                                        f"--model denoises {latent_shape}")  # fmt: skip
    return prompts_of(pred, args, prompts)


def prompts_of(pred: Predictions, args, prompts: dict[str, str] | None) -> list[str]:
    """Each sample's prompt ("" with --no-text); a sample without one is a BadInputError naming --prompts."""
    if prompts is None:
        return [""] * len(pred)
    missing = [s for s in pred.samples if s not in prompts]
    if missing:
        raise BadInputError(
            args.prompts,
            f"has no {args.prompt_task!r} prompt for sample {missing[0]} "
            f"({len(missing)} of the {len(pred)} samples of {pred.folder} missing)",
        )
    return [prompts[s] for s in pred.samples]


def unclip_folder(pred: Predictions, layout: DatasetRoot, pipe, args, stage: StageRun, prompts) -> None:
    """Decode pred with unCLIP into a work folder one PNG at a time (a rerun after a kill keeps them), then stage
    and swap in the output folder."""
    texts = check_unclip_inputs(pred, pipe, args, prompts)
    stimuli = [require_file(layout.image(n), "the stimulus PNG (make_images.py)") for n in pred.nsd_ids]
    keys, settings = pred.keys, cli.unclip_settings(args)
    work = stage.output.parent / f".{stage.output.name}.work"
    marker = {"settings": stage.settings, "inputs": stage.inputs}
    if (work / "settings.json").is_file() and read_json(work / "settings.json", "a work marker") != marker:
        shutil.rmtree(work)  # left by a run with other settings: nothing of it is valid here
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / "settings.json", marker)
    todo = [k for k, key in enumerate(keys) if not (work / f"{key}.png").is_file()]
    count = args.recons_per_sample
    for start in tqdm(range(0, len(todo), args.batch_size), desc="unCLIP", unit="batch", disable=args.quiet):
        rows = todo[start : start + args.batch_size]
        vae = None if pred.vae is None or args.no_vae_init else np.repeat(pred.vae[rows], count, axis=0)
        seeds = [sample_seed(args.seed, pred.nsd_ids[k], c) for k in rows for c in range(count)]
        images = decode(pipe, np.repeat(pred.clip[rows], count, axis=0), vae,
                        [texts[k] for k in rows for _ in range(count)], seeds, settings)  # fmt: skip
        images = images.reshape(len(rows), count, *images.shape[1:])
        chosen = closest_to_embedding(pipe, images, pred.clip[rows]) if count > 1 else np.zeros(len(rows), int)
        for k, image, pick in zip(rows, images, chosen, strict=True):
            partial = work / f".{keys[k]}.png"
            Image.fromarray(image[pick]).save(partial, format="PNG")
            os.replace(partial, work / f"{keys[k]}.png")
    with staged_folder(stage.output) as staging:
        (staging / "recons").mkdir()
        (staging / "stimuli").mkdir()
        for key, stimulus in zip(keys, stimuli, strict=True):
            link_or_copy(work / f"{key}.png", staging / "recons" / f"{key}.png")
            link_or_copy(stimulus, staging / "stimuli" / f"{key}.png")
        shown = list(range(min(args.grid_count, len(keys))))
        low = None  # the grid's middle column: the low-level VAE decode of the predicted latent
        if pred.vae is not None and pred.vae.shape[1] == pipe.vae.config.latent_channels:
            low = vae_images(pipe.vae, pred.vae[shown])
        write_grid(staging / "grid.png", [[staging / "stimuli" / f"{keys[k]}.png",
                                           *([low[k]] if low is not None else []),
                                           staging / "recons" / f"{keys[k]}.png"] for k in shown])  # fmt: skip
        write_index(staging, pred, keys, args, unclip={**vars(settings), "prompts": str(args.prompts or ""),
                                                       "prompt_task": None if args.no_text else args.prompt_task,
                                                       "recons_per_sample": count, "seed": args.seed})  # fmt: skip
        stage.finish(args, into=staging, dataset_root=layout.root)
    shutil.rmtree(work, ignore_errors=True)


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = cli.parse_args(parser, argv)
    if args.batch_size < 1 or args.grid_count < 1 or args.recons_per_sample < 1:
        parser.error("--batch-size, --grid-count and --recons-per-sample must be at least 1")
    args.label = args.label or args.decoder
    if args.decoder == "unclip":
        if bool(args.prompts) == bool(args.no_text):
            parser.error("--decoder unclip needs --prompts FILE (the prompts) or --no-text (none), not both")
        try:
            cli.unclip_settings(args).check()
        except ValueError as err:
            parser.error(str(err))
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
    out = args.out if args.out is not None else layout.reconstructions(args.predictions.name, args.label)
    require_writable(out, "--out folder")

    settings = {"decoder": args.decoder, "model": model_setting(args.model), "seed": args.seed,
                "precision": args.precision, "run": args.predictions.name}  # fmt: skip
    prompts = None
    if args.decoder == "unclip":
        settings.update(unclip=vars(cli.unclip_settings(args)), prompt_task=None if args.no_text else args.prompt_task,
                        recons_per_sample=args.recons_per_sample, label=args.label)  # fmt: skip
        check_pipeline_folder(args.model)
        prompts = read_prompts(args, layout)
    subfolder, _ = vae_source(args.model) if args.decoder == "vae" else (None, None)
    stages = {}
    for (subject, kind), folder in folders.items():
        inputs = {"predictions": sorted(p for p in folder.iterdir() if p.suffix in (".npy", ".json")),
                  "model": model_files(args.model, subfolder)}  # fmt: skip
        if args.prompts and not args.no_text:
            inputs["prompts"] = args.prompts
        stage = StageRun(out / folder_name(subject, kind), settings={**settings, "subject": subject, "kind": kind},
                         inputs=inputs, folder=True)  # fmt: skip
        if stage.needed(args.overwrite, complete=(stage.output / "index.json").is_file()):
            stages[(subject, kind)] = stage
        else:
            print(f"{stage.output}: current (same settings and inputs), kept")
    if not stages:
        return 0
    device = cli.resolve_device(args.device)
    if args.decoder == "unclip":
        for subject, kind in stages:  # every prompt is there before the pipeline loads
            prompts_of(Predictions.load(folders[(subject, kind)]), args, prompts)
        if args.quiet:
            from diffusers.utils import logging as diffusers_logging
            from transformers.utils import logging as hf_logging

            diffusers_logging.disable_progress_bar()
            hf_logging.disable_progress_bar()
        with loading_model(args.model, "a Stable unCLIP pipeline"):
            pipe = load_pipeline(args.model, device, DTYPES[args.precision])
    else:
        vae = load_vae(args.model, device, DTYPES[args.precision])
    for (subject, kind), stage in stages.items():
        pred = Predictions.load(folders[(subject, kind)])
        if args.decoder == "unclip":
            unclip_folder(pred, layout, pipe, args, stage, prompts)
        else:
            decode_folder(pred, layout, vae, args, stage)
        print(f"{stage.output}: {len(pred)} reconstructions ({args.decoder}), grid -> {stage.output / 'grid.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
