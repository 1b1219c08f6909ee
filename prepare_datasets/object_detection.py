"""DETR object detection on the NSD images -> <root>/nsd/nsd_instances.json (boxes as 425-px vertices).

The detector's objects scoring above --threshold, in the format of the human annotations in
nsd_coco_instances.json (llava_brain/annotations.py): box vertices (x1, y1, x2, y2) in pixels of
the 425 x 425 NSD image, category ids and names from the model's id2label (COCO's for DETR),
and the score. Batched, resumable (kill and rerun continues; output identical), shardable with
`accelerate launch` (llava_brain/image_stage.py).

Full scale (GPUs):
  accelerate launch --multi_gpu --num_processes 4 prepare_datasets/object_detection.py \\
      --dataset-root /data/brain --model facebook/detr-resnet-101 --threshold 0.9 --batch-size 32
Tiny (mini-NSD, CPU):
  python prepare_datasets/object_detection.py --dataset-root demo_out/root \\
      --model demo_out/tiny_models/detr --threshold 0.0 --device cpu
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from llava_brain.annotations import read_instances, write_instances
from llava_brain.errors import exits_on_bad_input
from llava_brain.image_stage import (
    DTYPES,
    RecordParts,
    add_run_arguments,
    add_selection_arguments,
    already_done,
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

log = logging.getLogger("object_detection")


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
    return {"model": str(args.model), "threshold": args.threshold, "batch_size": args.batch_size, "dtype": args.dtype}


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quiet:
        quiet_transformers()
    if not 0.0 <= args.threshold <= 1.0 or args.batch_size < 1:
        build_parser().error("--threshold must be in [0, 1] and --batch-size >= 1")
    layout = DatasetRoot(args.dataset_root)
    output = layout.instances
    nsd_ids = select_images(layout, None if args.all_images else args.subject, args.all_images)
    settings = _settings(args)
    if already_done(output, settings, nsd_ids, read_instances, args.overwrite):
        log.info("detections of %d images already complete in %s; nothing to do", len(nsd_ids), output)
        return 0
    paths = require_images(layout, nsd_ids)

    check_model_folder(args.model, ("detr",), "a DETR model (DetrForObjectDetection)")
    from transformers import DetrForObjectDetection, DetrImageProcessor

    accelerator = make_accelerator(args.device)
    dtype = DTYPES[args.dtype]
    with loading_model(args.model, "a DETR model (DetrForObjectDetection)"):
        model = DetrForObjectDetection.from_pretrained(args.model, torch_dtype=dtype).eval()
        processor = DetrImageProcessor.from_pretrained(args.model)
    model.to(accelerator.device)
    categories = {int(k): v for k, v in model.config.id2label.items() if v != "N/A"}  # COCO's unused ids are "N/A"

    work = open_work_folder(output, {**settings, "nsd_ids": nsd_ids}, accelerator, args.overwrite)
    parts = RecordParts(work, accelerator.process_index)
    plan = plan_batches(nsd_ids, paths, args.batch_size, parts.done(), accelerator.process_index,
                        accelerator.num_processes)  # fmt: skip
    if accelerator.is_main_process:
        log.info("%d images, %d already done; %d processes", len(nsd_ids), plan.finished_images,
                 accelerator.num_processes)  # fmt: skip

    @torch.inference_mode()
    def step(batch) -> None:
        sizes = batch.inputs.pop("sizes")
        inputs = {k: v.to(accelerator.device) for k, v in batch.inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        outputs = model(**inputs)
        outputs.logits, outputs.pred_boxes = outputs.logits.float(), outputs.pred_boxes.float()
        # Boxes come back as (x1, y1, x2, y2) in the pixels of each image as stored (425 x 425 for NSD).
        results = processor.post_process_object_detection(outputs, threshold=args.threshold, target_sizes=sizes)
        records = []
        n = len(batch.nsd_ids)  # results beyond n pad a short last batch
        for nsd_id, result, (height, width) in zip(batch.nsd_ids, results[:n], sizes[:n].tolist(), strict=True):
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
            records.append({"nsd_id": nsd_id, "objects": objects})
        parts.add(records)

    run_batches(plan, step, Preprocess(processor), args.num_workers, "DETR detections",
                progress=not args.quiet and accelerator.is_main_process)  # fmt: skip
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return 0
    merged = parts.merged()
    if sorted(merged) != nsd_ids:
        raise RuntimeError(f"detected in {len(merged)} images, expected {len(nsd_ids)}")
    # Provenance lives in the file's info (a run.json beside it would clash with other stages' files in nsd/).
    info = {"source": "DETR detections (object_detection.py)", "settings": settings,
            "run": provenance(args)}  # fmt: skip
    write_instances(output, {i: merged[i]["objects"] for i in nsd_ids}, categories, info)
    remove_parts(output)
    count = sum(len(merged[i]["objects"]) for i in nsd_ids)
    log.info("wrote %d objects in %d images to %s", count, len(nsd_ids), output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
