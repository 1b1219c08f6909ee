"""Write the tiny stand-in of every model the pipeline loads, each a `save_pretrained` folder.

Stages load them with `from_pretrained(<out>/<name>)` exactly as they load real weights:
  blip2/        Blip2ForConditionalGeneration + Blip2Processor (OPT byte-level BPE tokenizer)
  detr/         DetrForObjectDetection + DetrImageProcessor, id2label = the NSD tree's COCO categories
  clip_vision/  CLIPVisionModelWithProjection + CLIPImageProcessor
  clip_text/    CLIPTextModelWithProjection + CLIPTokenizer (OpenAI's real 49408-token vocabulary);
                both towers trained together, contrastively, on the tree's (stimulus, COCO caption)
                pairs (shared1000 images held out)
  vae/          AutoencoderKL, trained briefly on the tree's stimuli (shared1000 images held out)
  unclip/       StableUnCLIPImg2ImgPipeline built from clip_vision/, clip_text/'s tower and vae/; its UNet
                trained briefly as a latent diffusion model on the VAE latents of the VAE's training images,
                conditioned on their CLIP image embeddings and captions (shared1000 images held out)
  llm/          LlamaForCausalLM pretrained briefly (next-token prediction) on the tree's text: its COCO
                captions and, rendered through LLaVA v1's chat template, one conversation per image and
                instruction type built from its captions and boxes with the instruction data's own
                wording (shared1000 images held out); a byte-level BPE tokenizer trained on the same
                text (+ instruction sentences), with `<image>` and the chat template
  tiny_models.json (what each folder holds, parameter counts, CLIP held-out retrieval, VAE PixCorr,
                the LLM's held-out perplexity beside the untrained one's and a unigram model's, and
                unCLIP's images from the held-out images' true CLIP embeddings: PixCorr and two-way
                identification with the tiny CLIP, against shuffled pairs)
  and run.json (settings, input fingerprints, timings, torch threads: `io.StageRun`).
Weights are random except the CLIP towers', the VAE's, the LLM's and the unCLIP UNet's. Built under a hidden
`.<name>.partial` sibling swapped in whole, so a rerun after a kill starts over and writes the same files. A rerun with
the same settings and NSD inputs does nothing; other ones are refused without --overwrite. The CLIP
vocabulary comes from the open-clip-torch wheel (read, not imported).
Same settings, inputs, CPU type and torch thread count (the CPU quota or OMP_NUM_THREADS, in run.json)
give identical files. Another thread count sums floats in another order, so the weights differ in their
last bits (on mini-NSD, 1 and 2 threads gave the same scores to 4 decimals).

  python tools/make_tiny_models.py --out demo_out/tiny_models --nsd-root data/mini_nsd    # default, 2-4 min
  python tools/make_tiny_models.py --out /tmp/tiny_models --nsd-root /tmp/mini_nsd --vae-steps 40 --clip-steps 40 \
      --llm-steps 40
On 2 CPU cores the VAE takes 85-220 s of the default build (the machine's load), CLIP ~30 s, the unCLIP UNet
~40 s, the LLM ~13 s.
On real NSD (COCO's varied captions fill the 4096-token vocabulary; CLIP, the VAE and the LLM each learn
from 2048 NSD images; the LLM is scored on all 1000 shared1000 images' texts):
  python tools/make_tiny_models.py --out /data/tiny_models --nsd-root /data/nsd
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from llava_brain import cli, runtime
from llava_brain.errors import BadInputError, exits_on_bad_input
from llava_brain.instructions import TEMPLATE_MODEL
from llava_brain.io import StageRun, manifest_of, read_json, recover_staged, require_writable, staged_folder, write_json
from llava_brain.layout import NsdTree
from llava_brain.tiny.inputs import Plan, plan_inputs, read_stimuli, tree_inputs

log = logging.getLogger("make_tiny_models")
MANIFEST = "tiny_models.json"
# Bump when the builders change what they write, so that an old folder is not taken as up to date.
# 2: trained CLIP towers; 3: the shared warm-up + cosine schedule, run.json via StageRun; 4: pretrained LLM;
# 5: trained unCLIP UNet
FORMAT_VERSION = 5
PROJECTION_DIM = 32  # CLIP image/text embedding size (ViT-L/14: 768)


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # Input / output
    p.add_argument("--out", type=Path, required=True, help="folder to create; one subfolder per model")
    p.add_argument(
        "--nsd-root", type=Path, required=True,
        help="raw NSD tree (mini-NSD or real): COCO captions train the LLM tokenizer, stimuli train the VAE, "
        "(stimulus, caption) pairs train CLIP, COCO instance categories name DETR's labels",
    )  # fmt: skip
    cli.add_overwrite(p, "rebuild even if --out holds a complete set (made with other settings or inputs)")
    # Models
    p.add_argument(
        "--seed", type=int, default=0, help="seed of every random initialisation and of CLIP, VAE and LLM training"
    )
    p.add_argument(
        "--image-size", type=int, default=64,
        help="pixels (square) of the VAE's training images and of unCLIP's output; latents are size/4 a side",
    )  # fmt: skip
    p.add_argument("--vocab-size", type=int, default=4096, help="largest LLM/BLIP-2 BPE vocabulary (the corpus may "
                   "support fewer: mini-NSD's templated text gives ~1000)")  # fmt: skip
    # CLIP training
    p.add_argument(
        "--clip-steps", type=int, default=1000,
        help="CLIP optimisation steps, batches of 64 (image, caption) pairs (default 1000: ~20-30 s on 2 CPU cores; "
        "0 = leave both towers random)",
    )  # fmt: skip
    p.add_argument(
        "--clip-images", type=int, default=2048,
        help="most CLIP training images (32 px), spread evenly over the non-shared nsdIds (mini-NSD has 1600)",
    )  # fmt: skip
    # VAE training
    p.add_argument(
        "--vae-steps", type=int, default=500,
        help="VAE optimisation steps (default 500: 85-220 s on 2 CPU cores; 0 = leave it untrained)",
    )  # fmt: skip
    p.add_argument(
        "--vae-images", type=int, default=2048,
        help="most training images, spread evenly over the non-shared nsdIds (mini-NSD has 1600)",
    )  # fmt: skip
    p.add_argument(
        "--unet-steps", type=int, default=200,
        help="unCLIP UNet optimisation steps, batches of 16 VAE latents of the VAE's training images (default 200: "
        "~40 s on 2 CPU cores; 0 = leave it random)",
    )  # fmt: skip
    # LLM pretraining
    p.add_argument(
        "--llm-steps", type=int, default=200,
        help="LLM pretraining steps, batches of 16 windows of 128 tokens (default 200: 7-10 s on 2 CPU cores; "
        "0 = leave it random)",
    )  # fmt: skip
    p.add_argument(
        "--llm-images", type=int, default=2048,
        help="most images whose captions and conversations the LLM and its tokenizer learn from, spread evenly "
        "over the non-shared nsdIds (mini-NSD has 1600); held-out perplexity is on every shared1000 image",
    )  # fmt: skip
    cli.add_quiet(p)
    return p


def _settings(args) -> dict:
    """What shapes the output (the NSD tree's content is in the input fingerprints, not its path)."""
    return {
        "format_version": FORMAT_VERSION,
        "seed": args.seed,
        "image_size": args.image_size,
        "vocab_size": args.vocab_size,
        "clip_steps": args.clip_steps,
        "clip_images": args.clip_images,
        "vae_steps": args.vae_steps,
        "vae_images": args.vae_images,
        "llm_steps": args.llm_steps,
        "llm_images": args.llm_images,
        "unet_steps": args.unet_steps,
        "conversations": TEMPLATE_MODEL,  # the template backend's version: its wording is in the LLM's corpus
    }


def _describe(model, **extra) -> dict:
    from llava_brain.tiny import num_parameters

    entry = {"class": type(model).__name__, "parameters": num_parameters(model)}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return {**entry, **({"model_type": model_type} if model_type else {}), **extra}


def _build_vae(tree: NsdTree, args, plan: Plan, staging: Path, timings: dict) -> tuple:
    from llava_brain import tiny

    started = time.perf_counter()
    train = tiny.images_to_tensor(read_stimuli(tree, plan.vae_train, args.image_size))
    heldout = tiny.images_to_tensor(read_stimuli(tree, plan.vae_heldout, args.image_size))
    timings["vae_read"] = round(time.perf_counter() - started, 1)
    vae = tiny.build_vae(image_size=args.image_size, seed=args.seed)
    report = {"train_images": len(plan.vae_train), "heldout_images": len(plan.vae_heldout), "steps": args.vae_steps}
    if args.vae_steps > 0:
        trained = tiny.train_vae(vae, train, steps=args.vae_steps, seed=args.seed, progress=not args.quiet)
        timings["vae_train"] = round(trained.pop("seconds"), 1)
        report.update({k: round(v, 4) for k, v in trained.items()})
    report.update({k: round(v, 4) for k, v in tiny.reconstruction_pixcorr(vae, heldout).items()})
    vae.save_pretrained(staging / "vae")
    return vae, report, train


def _train_clip(tree: NsdTree, args, plan: Plan, vision, processor, text, tokenizer, timings: dict) -> dict:
    """Train the CLIP towers in place on non-shared1000 (stimulus, caption) pairs (`--clip-steps` > 0) and
    score image<->caption retrieval among the held-out shared1000 images; return the manifest's report."""
    from llava_brain import tiny

    size = vision.config.image_size
    started = time.perf_counter()
    train = tiny.clip_pixel_values(read_stimuli(tree, plan.clip_train, size), processor)
    heldout = tiny.clip_pixel_values(read_stimuli(tree, plan.clip_heldout, size), processor)
    timings["clip_read"] = round(time.perf_counter() - started, 1)
    report = {"train_images": len(plan.clip_train), "heldout_images": len(plan.clip_heldout), "image_size": size,
              "steps": args.clip_steps}  # fmt: skip
    captions = plan.captions_by_nsd_id
    if args.clip_steps > 0:
        trained = tiny.train_clip(vision, text, tokenizer, train, [captions[i] for i in plan.clip_train],
                                  steps=args.clip_steps, seed=args.seed, progress=not args.quiet)  # fmt: skip
        timings["clip_train"] = round(trained.pop("seconds"), 1)
        report.update({k: round(v, 4) for k, v in trained.items()})
    scores = tiny.clip_retrieval(vision, text, tokenizer, heldout, [captions[i] for i in plan.clip_heldout])
    report.update({k: round(v, 4) for k, v in scores.items()})
    return report


def _log_scores(clip: dict, vae: dict, llm: dict, timings: dict) -> None:
    def took(report: dict, key: str) -> str:
        return f" ({report['steps']} steps, {timings[key]:.0f} s)" if key in timings else ""

    log.info(
        "CLIP on %d held-out shared1000 images: image->text top-1 %.3f, text->image %.3f (chance %.3f)%s",
        clip["heldout_images"], clip["image_to_text_top1"], clip["text_to_image_top1"], clip["chance"],
        took(clip, "clip_train"),
    )  # fmt: skip
    log.info(
        "VAE PixCorr on %d held-out shared1000 images: reconstructions %.3f, shuffled pairs %.3f%s",
        vae["heldout_images"], vae["pixcorr"], vae["shuffled_pixcorr"], took(vae, "vae_train"),
    )  # fmt: skip
    trained, untrained, unigram = llm["perplexity"], llm["untrained_perplexity"], llm["unigram_perplexity"]
    log.info(
        "LLM perplexity on the texts of %d held-out shared1000 images: captions %.2f (untrained %.0f, unigram %.1f), "
        "conversations %.2f (untrained %.0f, unigram %.1f)%s",
        llm["heldout_images"], trained["captions"], untrained["captions"], unigram["captions"],
        trained["conversations"], untrained["conversations"], unigram["conversations"], took(llm, "llm_train"),
    )  # fmt: skip


def _train_unet(tree: NsdTree, args, plan: Plan, pipe, clip_vision, clip_processor, images, timings: dict) -> dict:
    """Train unCLIP's UNet in place (`--unet-steps` > 0) on the VAE's training images ((n, 3, S, S) in [-1, 1]):
    their scaled VAE latents, CLIP image embeddings and captions, then score the held-out check."""
    import torch

    from llava_brain import tiny

    report = {"train_images": len(plan.vae_train), "heldout_images": len(plan.vae_heldout), "steps": args.unet_steps}
    if args.unet_steps == 0:
        return report  # a random UNet: nothing to train, and its check would say nothing
    started = time.perf_counter()
    with torch.no_grad():
        latents = torch.cat([pipe.vae.encode(c).latent_dist.mean for c in images.split(64)])
        latents = latents * pipe.vae.config.scaling_factor
        pixels = tiny.clip_pixel_values(read_stimuli(tree, plan.vae_train, clip_vision.config.image_size),
                                        clip_processor)  # fmt: skip
        embeds = torch.cat([clip_vision(pixel_values=c).image_embeds for c in pixels.split(256)])
    captions = [plan.captions_by_nsd_id.get(int(i)) or [""] for i in plan.vae_train]
    timings["unet_inputs"] = round(time.perf_counter() - started, 1)
    trained = tiny.train_unclip(pipe, latents, embeds, captions, steps=args.unet_steps, batch_size=16, lr=2e-3,
                                seed=args.seed, progress=not args.quiet)  # fmt: skip
    timings["unet_train"] = round(trained.pop("seconds"), 1)
    report.update({k: round(v, 4) for k, v in trained.items()})
    check = tiny.unclip_check(pipe, clip_vision, clip_processor,
                              read_stimuli(tree, plan.vae_heldout, args.image_size), seed=args.seed)  # fmt: skip
    report.update({k: round(v, 4) for k, v in check.items()})
    return report


def _log_unclip(report: dict, timings: dict) -> None:
    if "pixcorr" not in report:
        log.info("unCLIP UNet left random (--unet-steps 0): no held-out check")
        return
    took = f" ({report['steps']} steps, {timings['unet_train']:.0f} s)" if "unet_train" in timings else ""
    log.info(
        "unCLIP from the true CLIP embeddings of %d held-out shared1000 images: PixCorr %.3f (shuffled pairs %.3f), "
        "two-way identification with the tiny CLIP %.3f (shuffled %.3f, chance 0.5)%s",
        report["heldout_images"], report["pixcorr"], report["shuffled_pixcorr"], report["two_way"],
        report["shuffled_two_way"], took,
    )  # fmt: skip


def _build_llm(args, plan: Plan, timings: dict) -> tuple:
    from llava_brain import tiny

    corpus, llm, report = tiny.pretrain_llm(plan.llm_train, plan.llm_heldout, vocab_size=args.vocab_size,
                                            steps=args.llm_steps, seed=args.seed, progress=not args.quiet)  # fmt: skip
    timings.update({f"llm_{k}": round(v, 1) for k, v in report.pop("seconds").items()})
    return corpus, llm, report


def build_all(tree: NsdTree, args, plan: Plan, staging: Path, timings: dict) -> dict:
    """Write every model folder into `staging`; return the manifest's "models", "clip_training" and
    "vae_training" entries (seconds go to `timings`, so the manifest is the same in every run)."""
    from llava_brain import tiny

    models: dict[str, dict] = {}
    corpus, llm, llm_report = _build_llm(args, plan, timings)
    bpe, llm_tokenizer = corpus.bpe, corpus.tokenizer
    llm.save_pretrained(staging / "llm")
    llm_tokenizer.save_pretrained(staging / "llm")
    texts = {**llm_report["train_documents"], "instruction_sentences": len(tiny.INSTRUCTION_SENTENCES)}
    models["llm"] = _describe(llm, tokenizer=type(llm_tokenizer).__name__, vocab_size=len(llm_tokenizer),
                              tokenizer_corpus=texts, chat_template="LLaVA v1 (Vicuna)")  # fmt: skip

    blip2, blip2_processor = tiny.build_blip2(tokenizer=tiny.build_opt_tokenizer(bpe), seed=args.seed)
    blip2.save_pretrained(staging / "blip2")
    blip2_processor.save_pretrained(staging / "blip2")
    models["blip2"] = _describe(blip2, processor=type(blip2_processor).__name__,
                                tokenizer=type(blip2_processor.tokenizer).__name__)  # fmt: skip

    detr, detr_processor = tiny.build_detr(categories=plan.categories, seed=args.seed)
    detr.save_pretrained(staging / "detr")
    detr_processor.save_pretrained(staging / "detr")
    models["detr"] = _describe(detr, processor=type(detr_processor).__name__, id2label=detr.config.id2label)

    clip_vision, clip_processor = tiny.build_clip_vision(projection_dim=PROJECTION_DIM, seed=args.seed)
    clip_text, clip_tokenizer = tiny.build_clip_text(projection_dim=PROJECTION_DIM, seed=args.seed)
    # Trained before anything is saved and before build_unclip, so every folder holds the trained towers.
    clip_report = _train_clip(tree, args, plan, clip_vision, clip_processor, clip_text, clip_tokenizer, timings)
    clip_vision.save_pretrained(staging / "clip_vision")
    clip_processor.save_pretrained(staging / "clip_vision")
    models["clip_vision"] = _describe(clip_vision, processor=type(clip_processor).__name__,
                                      projection_dim=PROJECTION_DIM)  # fmt: skip
    clip_text.save_pretrained(staging / "clip_text")
    clip_tokenizer.save_pretrained(staging / "clip_text")
    models["clip_text"] = _describe(clip_text, tokenizer=type(clip_tokenizer).__name__, vocab_size=len(clip_tokenizer))

    vae, vae_report, vae_images = _build_vae(tree, args, plan, staging, timings)
    models["vae"] = _describe(vae, latent_channels=vae.config.latent_channels,
                              scaling_factor=vae.config.scaling_factor)  # fmt: skip

    pipe = tiny.build_unclip(clip_vision=clip_vision, feature_extractor=clip_processor, clip_tokenizer=clip_tokenizer,
                             clip_text=clip_text, vae=vae, seed=args.seed)  # fmt: skip
    unclip_report = _train_unet(tree, args, plan, pipe, clip_vision, clip_processor, vae_images, timings)
    pipe.save_pretrained(staging / "unclip")
    models["unclip"] = {"class": type(pipe).__name__,
                        "components": {name: type(c).__name__ for name, c in pipe.components.items()},
                        "unet_parameters": tiny.num_parameters(pipe.unet)}  # fmt: skip
    return {"models": models, "clip_training": clip_report, "vae_training": vae_report, "llm_training": llm_report,
            "unclip_training": unclip_report}  # fmt: skip


def _check_args(parser: argparse.ArgumentParser, args) -> None:
    # The VAE halves the image for most of its training and downsamples by 4.
    if args.image_size < 16 or args.image_size % 8:
        parser.error(f"--image-size must be a multiple of 8 and >= 16, got {args.image_size}")
    steps = (args.vae_steps, args.clip_steps, args.llm_steps, args.unet_steps)
    images = (args.clip_images, args.llm_images)
    if min(steps) < 0 or args.vae_images < 1 or min(images) < 2:
        parser.error(
            "--vae-steps, --clip-steps, --llm-steps and --unet-steps must be >= 0, --vae-images >= 1, --clip-images "
            "and --llm-images >= 2"
        )
    if args.vocab_size < 300:
        parser.error("--vocab-size must be >= 300 (256 bytes + specials)")


def _require_ours(out: Path, overwrite: bool) -> None:
    """Never replace what this tool did not write: a file, or (without --overwrite) a non-empty folder
    without run.json."""
    if out.exists() and not out.is_dir():
        raise BadInputError(out, "is a file; --out must be a folder (new, or one this tool wrote)")
    if not overwrite and out.is_dir() and any(out.iterdir()) and not manifest_of(out, folder=True).is_file():
        raise BadInputError(out, "exists but is not a finished tiny-model folder; pass --overwrite or another --out")


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    threads = runtime.limit_threads()
    parser = build_parser()
    args = cli.parse_args(parser, argv)
    _check_args(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = require_writable(args.out, "--out")
    recover_staged(out)  # a kill left a half-built staging folder, or cut a swap between its two renames
    _require_ours(out, args.overwrite)
    tree = NsdTree(args.nsd_root)
    run = StageRun(out, settings=_settings(args), inputs=tree_inputs(tree), folder=True)
    if not run.needed(args.overwrite, complete=(out / MANIFEST).is_file()):
        log.info("tiny models already complete at %s (same settings and inputs); nothing to do", out)
        manifest = read_json(out / MANIFEST, "the tiny models manifest")
        _log_scores(manifest["clip_training"], manifest["vae_training"], manifest["llm_training"], {})
        _log_unclip(manifest["unclip_training"], {})
        return 0
    plan = plan_inputs(tree, args.vae_images, args.clip_images, args.llm_images)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Writing model shards" bars of save_pretrained
    started, timings = time.perf_counter(), {}
    with staged_folder(out) as staging:
        summary = build_all(tree, args, plan, staging, timings)
        write_json(staging / MANIFEST, {"seed": args.seed, **summary})
        timings["total"] = round(time.perf_counter() - started, 1)
        run.finish(args, into=staging, timings=timings, torch_threads=threads)
    _log_scores(summary["clip_training"], summary["vae_training"], summary["llm_training"], timings)
    _log_unclip(summary["unclip_training"], timings)
    log.info("wrote tiny models to %s in %.1f s: %s", out, timings["total"], ", ".join(summary["models"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
