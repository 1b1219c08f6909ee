"""BLIP-2 captions of the NSD images -> <root>/nsd/nsd_captions.json (N sampled captions per image).

The paper captions every image with BLIP-2 (8 captions per image) to enrich the instruction data
beside the 5 human COCO captions. Output format: llava_brain/annotations.py (keys = nsdId).
Sampling is seeded per fixed batch, so a resumed or multi-process run writes the same captions.
Batched, resumable (kill and rerun continues; output identical), shardable with `accelerate launch`
(llava_brain/image_stage/); the provenance is nsd_captions.json.run.json beside the file.

Full scale (GPUs):
  accelerate launch --multi_gpu --num_processes 4 prepare_datasets/generate_captions.py \\
      --dataset-root /data/brain --model Salesforce/blip2-opt-2.7b --num-captions 8 --precision fp16 --batch-size 32
Tiny (mini-NSD, CPU):
  python prepare_datasets/generate_captions.py --dataset-root demo_out/root \\
      --model demo_out/tiny_models/blip2 --num-captions 2 --max-new-tokens 8 --device cpu
"""

from __future__ import annotations

import argparse
import sys

import torch

from llava_brain import cli, runtime
from llava_brain.annotations import write_captions
from llava_brain.errors import exits_on_bad_input
from llava_brain.image_stage import (
    Context,
    ImageStage,
    Model,
    add_run_arguments,
    add_selection_arguments,
    batch_seed,
    check_model_folder,
    loading_model,
    model_files,
    model_setting,
    run_image_stage,
)

WHAT = "a BLIP-2 model (Blip2ForConditionalGeneration)"


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_selection_arguments(p, "caption")
    p.add_argument(
        "--model", default="Salesforce/blip2-opt-2.7b", help="Blip2ForConditionalGeneration folder or hub id"
    )
    p.add_argument("--num-captions", type=int, default=8, help="captions sampled per image (paper: 8)")
    p.add_argument("--prompt", default="", help="text prompt BLIP-2 continues (default: none, plain captioning)")
    p.add_argument("--max-new-tokens", type=int, default=30, help="longest caption, in tokens")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (1.0 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; each fixed batch derives its own from it")
    add_run_arguments(p, batch_size=16, output="nsd_captions.json")
    return p


class Preprocess:
    """Runs in the loader workers: BLIP-2 pixel values (and the tokenised prompt)."""

    def __init__(self, processor, prompt: str):
        self.processor, self.prompt = processor, prompt

    def __call__(self, images):
        text = [self.prompt] * len(images) if self.prompt else None
        return dict(self.processor(images=images, text=text, return_tensors="pt"))


def _settings(args) -> dict:
    keys = ("num_captions", "prompt", "max_new_tokens", "temperature", "top_p", "seed")
    return {"model": model_setting(args.model), **{k: getattr(args, k) for k in keys}}


def _inputs(args) -> dict:
    check_model_folder(args.model, ("blip-2",), WHAT)
    return {"model": model_files(args.model)}


def _load(ctx: Context) -> Model:
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    args = ctx.args
    with loading_model(args.model, WHAT):
        model = Blip2ForConditionalGeneration.from_pretrained(args.model, torch_dtype=ctx.dtype).eval()
        processor = Blip2Processor.from_pretrained(args.model)
    model.to(ctx.device)
    tokenizer = processor.tokenizer

    def step(batch) -> list[dict]:
        inputs = {k: v.to(ctx.device) for k, v in batch.inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(ctx.dtype)
        torch.manual_seed(batch_seed(args.seed, batch.index))  # generate() samples from the global generator
        generated = model.generate(
            **inputs,
            do_sample=True,
            num_return_sequences=args.num_captions,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
        )
        if "input_ids" in inputs:  # decoder-only LM: the prompt is echoed before the caption
            generated = generated[:, inputs["input_ids"].shape[1] :]
        # Rows are image-major (num_captions per image); those beyond the real images pad a short last batch.
        texts = tokenizer.batch_decode(generated[: len(batch.nsd_ids) * args.num_captions], skip_special_tokens=True)
        k = args.num_captions
        return [
            {"nsd_id": nsd_id, "captions": [t.strip() for t in texts[i * k : (i + 1) * k]]}
            for i, nsd_id in enumerate(batch.nsd_ids)
        ]

    def write(parts, nsd_ids: list[int]) -> str:
        merged = parts.merged()
        info = {"source": "BLIP-2 sampled captions (generate_captions.py)", "settings": ctx.settings}
        write_captions(ctx.layout.captions, {i: merged[i]["captions"] for i in nsd_ids}, info)
        return f"wrote {len(nsd_ids) * args.num_captions} captions for {len(nsd_ids)} images to {ctx.layout.captions}"

    return Model(step=step, write=write, transform=Preprocess(processor, args.prompt))


STAGE = ImageStage(
    what="captions",
    description="BLIP-2 captions",
    outputs=lambda layout, args: {layout.captions: layout.captions},
    settings=_settings,
    inputs=_inputs,
    load=_load,
)


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    runtime.limit_threads()
    args = cli.parse_args(build_parser(), argv)
    if args.num_captions < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        build_parser().error("--num-captions, --batch-size and --max-new-tokens must be >= 1")
    return run_image_stage(STAGE, args)


if __name__ == "__main__":
    sys.exit(main())
