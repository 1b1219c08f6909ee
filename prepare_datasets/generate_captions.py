"""BLIP-2 captions of the NSD images -> <root>/nsd/nsd_captions.json (N sampled captions per image).

The paper captions every image with BLIP-2 (8 captions per image) to enrich the instruction data
beside the 5 human COCO captions. Output format: llava_brain/annotations.py (keys = nsdId).
Sampling is seeded per fixed batch, so a resumed or multi-process run writes the same captions.
Batched, resumable (kill and rerun continues; output identical), shardable with `accelerate launch`
(llava_brain/image_stage.py).

Full scale (GPUs):
  accelerate launch --multi_gpu --num_processes 4 prepare_datasets/generate_captions.py \\
      --dataset-root /data/brain --model Salesforce/blip2-opt-2.7b --num-captions 8 --dtype fp16 --batch-size 32
Tiny (mini-NSD, CPU):
  python prepare_datasets/generate_captions.py --dataset-root demo_out/root \\
      --model demo_out/tiny_models/blip2 --num-captions 2 --max-new-tokens 8 --device cpu
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from llava_brain.annotations import read_captions, write_captions
from llava_brain.errors import exits_on_bad_input
from llava_brain.image_stage import (
    DTYPES,
    RecordParts,
    add_run_arguments,
    add_selection_arguments,
    already_done,
    batch_seed,
    check_model_folder,
    loading_model,
    make_accelerator,
    open_work_folder,
    plan_batches,
    provenance,
    quiet_transformers,
    remove_parts,
    require_images,
    run_batches,
    select_images,
)
from llava_brain.layout import DatasetRoot

log = logging.getLogger("generate_captions")


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
    keys = ("model", "num_captions", "prompt", "max_new_tokens", "temperature", "top_p", "seed", "batch_size", "dtype")
    return {k: str(getattr(args, k)) if k == "model" else getattr(args, k) for k in keys}


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quiet:
        quiet_transformers()
    if args.num_captions < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        build_parser().error("--num-captions, --batch-size and --max-new-tokens must be >= 1")
    layout = DatasetRoot(args.dataset_root)
    output = layout.captions
    nsd_ids = select_images(layout, None if args.all_images else args.subject, args.all_images)
    settings = _settings(args)
    if already_done(output, settings, nsd_ids, read_captions, args.overwrite):
        log.info("captions of %d images already complete in %s; nothing to do", len(nsd_ids), output)
        return 0
    paths = require_images(layout, nsd_ids)

    check_model_folder(args.model, ("blip-2",), "a BLIP-2 model (Blip2ForConditionalGeneration)")
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    accelerator = make_accelerator(args.device)
    dtype = DTYPES[args.dtype]
    with loading_model(args.model, "a BLIP-2 model (Blip2ForConditionalGeneration)"):
        model = Blip2ForConditionalGeneration.from_pretrained(args.model, torch_dtype=dtype).eval()
        processor = Blip2Processor.from_pretrained(args.model)
    model.to(accelerator.device)

    work = open_work_folder(output, {**settings, "nsd_ids": nsd_ids}, accelerator, args.overwrite)
    parts = RecordParts(work, accelerator.process_index)
    plan = plan_batches(nsd_ids, paths, args.batch_size, parts.done(), accelerator.process_index,
                        accelerator.num_processes)  # fmt: skip
    if accelerator.is_main_process:
        log.info("%d images, %d already captioned; %d processes", len(nsd_ids), plan.finished_images,
                 accelerator.num_processes)  # fmt: skip
    tokenizer = processor.tokenizer

    @torch.inference_mode()
    def step(batch) -> None:
        inputs = {k: v.to(accelerator.device) for k, v in batch.inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
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
        records = []
        for i, nsd_id in enumerate(batch.nsd_ids):
            captions = [t.strip() for t in texts[i * args.num_captions : (i + 1) * args.num_captions]]
            records.append({"nsd_id": nsd_id, "captions": captions})
        parts.add(records)

    run_batches(plan, step, Preprocess(processor, args.prompt), args.num_workers, "BLIP-2 captions",
                progress=not args.quiet and accelerator.is_main_process)  # fmt: skip
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return 0
    merged = parts.merged()
    if sorted(merged) != nsd_ids:
        raise RuntimeError(f"captioned {len(merged)} images, expected {len(nsd_ids)}")
    # Provenance lives in the file's info (a run.json beside it would clash with other stages' files in nsd/).
    info = {
        "source": "BLIP-2 sampled captions (generate_captions.py)",
        "settings": settings,
        "run": provenance(args),
    }
    write_captions(output, {i: merged[i]["captions"] for i in nsd_ids}, info)
    remove_parts(output)
    log.info("wrote %d captions for %d images to %s", len(nsd_ids) * args.num_captions, len(nsd_ids), output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
