"""Map COCO 2017 captions and instance boxes onto the NSD images the selected subjects saw.

Joins each nsdId through `nsd_stim_info_merged.csv` (cocoSplit, cocoId, cropBox) to the COCO
annotation files of the raw tree, and writes `<dataset-root>/nsd/nsd_coco_captions.json` and
`nsd_coco_instances.json`, keyed by nsdId (formats: `llava_brain/annotations.py`). Boxes are cut to
NSD's square crop and scaled to the 425 x 425 image; objects cropped away are dropped.

Each file gets `<file>.run.json` (io.StageRun: the resolved settings and the fingerprints of the CSV
and COCO files read), written after it: a rerun with the same settings and inputs skips, with other
ones refuses (exit 2, naming what changed) unless --overwrite.

  python prepare_datasets/make_coco_annotations.py --nsd-root /data/nsd --dataset-root /data/brain --subject 1 2 5 7
  python prepare_datasets/make_coco_annotations.py --nsd-root data/mini_nsd --dataset-root /tmp/tiny --subject all
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from llava_brain import cli
from llava_brain.annotations import write_captions, write_instances
from llava_brain.errors import BadInputError, exits_on_bad_input
from llava_brain.io import StageRun, require_writable
from llava_brain.layout import DatasetRoot, NsdTree
from llava_brain.nsd import CocoAnnotations, StimInfo, coco_box_to_nsd
from llava_brain.nsd.constants import IMAGE_SIZE
from llava_brain.nsd.design import stim_info_subjects

log = logging.getLogger("make_coco_annotations")
# The "info" of each file: what it is (the format needs the object); provenance is in <file>.run.json.
CAPTIONS_INFO = "COCO 2017 captions of NSD images, keyed by 0-based nsdId"
INSTANCES_INFO = "COCO 2017 instance boxes of NSD images in 425 x 425 NSD pixels, keyed by 0-based nsdId"


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__,
        add_help=add_help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a renamed flag's old prefix (--all of --all-images) must not still work
    )
    # Data
    p.add_argument(
        "--nsd-root",
        type=Path,
        required=True,
        help="root of the raw NSD tree (nsd_stim_info_merged.csv and the COCO 2017 annotation JSONs, "
        "nsddata_stimuli/stimuli/nsd/annotations/{captions,instances}_{train2017,val2017}.json)",
    )
    cli.add_dataset_root(p, "prepared dataset root; writes <root>/nsd/nsd_coco_{captions,instances}.json")
    which = p.add_mutually_exclusive_group(required=True)
    cli.add_subject(
        p,
        source=lambda args: stim_info_subjects(args.nsd_root),
        default=None,
        group=which,
        help="NSD subjects (1-8) whose seen images to annotate, or 'all' = every subject with a shown trial "
        "in nsd_stim_info_merged.csv (the paper: 1 2 5 7)",
    )
    which.add_argument("--all-images", action="store_true", help="annotate every image of the CSV (NSD: 73000)")
    # Boxes
    p.add_argument(
        "--min-visible",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="fraction (0-1) of a COCO box's area that must lie inside NSD's crop to keep the object "
        "(0 = any overlap); boxes are always clipped to the crop",
    )
    # Output
    cli.add_overwrite(p, "rewrite both files even if they are current (needed when settings or inputs changed)")
    return p


def load_coco(tree: NsdTree, kind: str, splits: list[str]) -> dict[str, CocoAnnotations]:
    return {split: CocoAnnotations.load(tree.coco_annotations(kind, split), kind) for split in splits}


def coco_image(coco: CocoAnnotations, coco_id: int, nsd_id: int, stim_info: Path) -> dict:
    image = coco.images.get(coco_id)
    if image is None:
        raise BadInputError(coco.path, f"has no image id {coco_id}, which {stim_info} gives for nsdId {nsd_id}")
    return image


def nsd_captions(info: StimInfo, nsd_ids: np.ndarray, coco: dict[str, CocoAnnotations]) -> dict[int, list[str]]:
    captions = {}
    for nsd_id in map(int, nsd_ids):
        split, coco_id = str(info.coco_split[nsd_id]), int(info.coco_id[nsd_id])
        coco_image(coco[split], coco_id, nsd_id, info.path)
        anns = sorted(coco[split].annotations(coco_id), key=lambda a: a.get("id", 0))
        captions[nsd_id] = [str(a["caption"]).strip() for a in anns]
    return captions


def nsd_instances(
    info: StimInfo, nsd_ids: np.ndarray, coco: dict[str, CocoAnnotations], min_visible: float
) -> tuple[dict[int, list[dict]], int]:
    """nsdId -> instances in NSD pixels, and the number of objects dropped as cropped away."""
    instances, dropped = {}, 0
    for nsd_id in map(int, nsd_ids):
        split, coco_id = str(info.coco_split[nsd_id]), int(info.coco_id[nsd_id])
        image = coco_image(coco[split], coco_id, nsd_id, info.path)
        if "width" not in image or "height" not in image:
            raise BadInputError(coco[split].path, f"image {coco_id} lacks width/height, needed to map its boxes")
        size = (image["width"], image["height"])
        objects = []
        for ann in sorted(coco[split].annotations(coco_id), key=lambda a: a.get("id", 0)):
            box = coco_box_to_nsd(ann["bbox"], size, info.crop_box[nsd_id], IMAGE_SIZE, min_visible)
            if box is not None:
                # Rounding to the stored 2 decimals can push a vertex a hair past the border or collapse a sliver.
                box = [min(max(round(v, 2), 0.0), float(IMAGE_SIZE)) for v in box]
            if box is None or box[2] <= box[0] or box[3] <= box[1]:
                dropped += 1
                continue
            objects.append({"category_id": int(ann["category_id"]), "box": box, "iscrowd": int(ann.get("iscrowd", 0))})
        instances[nsd_id] = objects
    return instances, dropped


def merged_categories(coco: dict[str, CocoAnnotations]) -> dict[int, str]:
    """The category list of the instance files; train2017 and val2017 share COCO's 80 categories."""
    categories: dict[int, str] = {}
    for split_file in coco.values():
        for category_id, name in split_file.categories.items():
            if categories.setdefault(category_id, name) != name:
                raise BadInputError(
                    split_file.path, f"category {category_id} is {name!r} here but {categories[category_id]!r} in "
                    "the other split's instances file",
                )  # fmt: skip
    return categories


def publish(run: StageRun, args: argparse.Namespace, write: Callable[[Path], object], **counts) -> None:
    """Write one output file, then its provenance (last). Under --overwrite the old provenance goes first,
    so a kill between the two leaves a file a rerun redoes, never a new file under the old settings."""
    if args.overwrite:
        run.begin()
    write(run.output)
    run.finish(args, **counts)
    log.info("wrote %s (%s)", run.output, ", ".join(f"{k.removeprefix('num_')} {v}" for k, v in counts.items()))


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = cli.parse_args(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not 0.0 <= args.min_visible <= 1.0:
        parser.error(f"--min-visible is a fraction in [0, 1], got {args.min_visible}")

    start = time.perf_counter()
    tree, root = NsdTree(args.nsd_root), DatasetRoot(args.dataset_root)
    for output in (root.coco_captions, root.coco_instances):
        require_writable(output, "--dataset-root")
    info = StimInfo.load(tree.stim_info)
    nsd_ids = np.arange(len(info)) if args.all_images else info.images_seen_by(args.subject)
    splits = sorted(set(info.coco_split[nsd_ids].tolist()))
    settings = {
        "selection": "all-images" if args.all_images else {"subjects": args.subject},
        "min_visible": args.min_visible,
        "image_size": IMAGE_SIZE,
    }
    runs = {
        kind: StageRun(
            output,
            settings=settings,
            inputs={"stim_info": info.path, "coco": [tree.coco_annotations(kind, s) for s in splits]},
        )
        for kind, output in (("captions", root.coco_captions), ("instances", root.coco_instances))
    }
    # Both are checked before either is written: a refusal leaves the pair as it was.
    needed = {kind: run.needed(args.overwrite, complete=run.output.is_file()) for kind, run in runs.items()}
    if not any(needed.values()):
        log.info(
            "%s and %s are current (same settings and inputs); nothing to do", root.coco_captions, root.coco_instances
        )
        return 0

    # Both are computed before either is written: bad input in one leaves both files as they were.
    if needed["captions"]:
        captions = nsd_captions(info, nsd_ids, load_coco(tree, "captions", splits))
    if needed["instances"]:
        coco = load_coco(tree, "instances", splits)
        instances, dropped = nsd_instances(info, nsd_ids, coco, args.min_visible)
        categories = merged_categories(coco)
    if needed["captions"]:
        publish(runs["captions"], args, lambda path: write_captions(path, captions, {"description": CAPTIONS_INFO}),
                num_images=len(nsd_ids), num_captions=sum(map(len, captions.values())))  # fmt: skip
    if needed["instances"]:
        publish(runs["instances"], args,
                lambda path: write_instances(path, instances, categories, {"description": INSTANCES_INFO}),
                num_images=len(nsd_ids), num_instances=sum(map(len, instances.values())),
                num_dropped_cropped_away=dropped)  # fmt: skip
    log.info("done in %.1f s", time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
