"""DETR object detection on the NSD images -> <root>/nsd/nsd_instances.json (boxes as 425-px vertices).

The detector's objects scoring above --threshold, in the format of the human annotations in
nsd_coco_instances.json (llava_brain/annotations.py): box vertices (x1, y1, x2, y2) in pixels of
the 425 x 425 NSD image, category ids and names from the model's id2label (COCO's for DETR),
and the score. Batched, resumable (kill and rerun continues; output identical), shardable with
`accelerate launch` (llava_brain/image_stage/); the provenance is nsd_instances.json.run.json.

Full scale (GPUs):
  accelerate launch --multi_gpu --num_processes 4 prepare_datasets/object_detection.py \\
      --dataset-root /data/brain --model facebook/detr-resnet-101 --threshold 0.9 --batch-size 32
Tiny (mini-NSD, CPU):
  python prepare_datasets/object_detection.py --dataset-root demo_out/root \\
      --model demo_out/tiny_models/detr --threshold 0.0 --device cpu
"""

from __future__ import annotations

import argparse
import sys

import torch

from llava_brain import cli, runtime
from llava_brain.annotations import write_instances
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
)

WHAT = "a DETR model (DetrForObjectDetection)"


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_selection_arguments(p, "detect objects in")
    p.add_argument("--model", default="facebook/detr-resnet-101", help="DetrForObjectDetection folder or hub id")
    p.add_argument(
        "--threshold", type=float, default=0.9, help="keep objects whose class score is at least this (0-1; "
        "DETR's examples use 0.9)"
    )  # fmt: skip
    add_run_arguments(p, batch_size=16, output="nsd_instances.json")
    return p


class Preprocess:
    """Runs in the loader workers: DETR pixel values and masks, plus each image's (height, width)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, images):
        inputs = dict(self.processor(images=images, return_tensors="pt"))
        inputs["sizes"] = torch.tensor([(im.height, im.width) for im in images])
        return inputs


def _settings(args) -> dict:
    return {"model": model_setting(args.model), "threshold": args.threshold}


def _inputs(args) -> dict:
    check_model_folder(args.model, ("detr",), WHAT)
    return {"model": model_files(args.model)}


def _objects(result: dict, categories: dict[int, str], height: int, width: int) -> list[dict]:
    """One image's kept objects: known categories, boxes clipped to the image and not empty; best first."""
    objects = []
    for score, label, box in zip(result["scores"], result["labels"], result["boxes"], strict=True):
        if int(label) not in categories:
            continue
        x1, y1, x2, y2 = box.tolist()
        box = [min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width),
               min(max(y2, 0.0), height)]  # fmt: skip
        if box[2] <= box[0] or box[3] <= box[1]:
            continue
        objects.append({"category_id": int(label), "box": box, "iscrowd": 0, "score": float(score)})
    objects.sort(key=lambda o: -o["score"])
    return objects


def _load(ctx: Context) -> Model:
    from transformers import DetrForObjectDetection, DetrImageProcessor

    args = ctx.args
    with loading_model(args.model, WHAT):
        model = DetrForObjectDetection.from_pretrained(args.model, torch_dtype=ctx.dtype).eval()
        processor = DetrImageProcessor.from_pretrained(args.model)
    model.to(ctx.device)
    categories = {int(k): v for k, v in model.config.id2label.items() if v != "N/A"}  # COCO's unused ids are "N/A"

    def step(batch) -> list[dict]:
        sizes = batch.inputs.pop("sizes")
        inputs = {k: v.to(ctx.device) for k, v in batch.inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(ctx.dtype)
        outputs = model(**inputs)
        outputs.logits, outputs.pred_boxes = outputs.logits.float(), outputs.pred_boxes.float()
        # Boxes come back as (x1, y1, x2, y2) in the pixels of each image as stored (425 x 425 for NSD).
        results = processor.post_process_object_detection(outputs, threshold=args.threshold, target_sizes=sizes)
        n = len(batch.nsd_ids)  # results beyond n pad a short last batch
        return [
            {"nsd_id": nsd_id, "objects": _objects(result, categories, height, width)}
            for nsd_id, result, (height, width) in zip(batch.nsd_ids, results[:n], sizes[:n].tolist(), strict=True)
        ]

    def write(parts, nsd_ids: list[int]) -> str:
        merged = parts.merged()
        info = {"source": "DETR detections (object_detection.py)", "settings": ctx.settings}
        write_instances(ctx.layout.instances, {i: merged[i]["objects"] for i in nsd_ids}, categories, info)
        count = sum(len(merged[i]["objects"]) for i in nsd_ids)
        return f"wrote {count} objects in {len(nsd_ids)} images to {ctx.layout.instances}"

    return Model(step=step, write=write, transform=Preprocess(processor))


STAGE = ImageStage(
    what="detections",
    description="DETR detections",
    outputs=lambda layout, args: {layout.instances: layout.instances},
    settings=_settings,
    inputs=_inputs,
    load=_load,
)


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    runtime.limit_threads()
    args = cli.parse_args(build_parser(), argv)
    if not 0.0 <= args.threshold <= 1.0 or args.batch_size < 1:
        build_parser().error("--threshold must be in [0, 1] and --batch-size >= 1")
    return run_image_stage(STAGE, args)


if __name__ == "__main__":
    sys.exit(main())
