"""Map COCO 2017 captions and instance boxes onto the NSD images the selected subjects saw.

Joins each nsdId through `nsd_stim_info_merged.csv` (cocoSplit, cocoId, cropBox) to the COCO
annotation files of the raw tree, and writes `<dataset-root>/nsd/nsd_coco_captions.json` and
`nsd_coco_instances.json`, keyed by nsdId (formats: `llava_brain/annotations.py`). Boxes are cut to
NSD's square crop and scaled to the 425 x 425 image; objects cropped away are dropped.

  python prepare_datasets/make_coco_annotations.py --nsd-root /data/nsd --dataset-root /data/brain --subject 1 2 5 7
  python prepare_datasets/make_coco_annotations.py --nsd-root data/mini_nsd --dataset-root /tmp/tiny --subject all
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from llava_brain.annotations import images_seen_by, read_info, subject_or_all, write_captions, write_instances
from llava_brain.errors import BadInputError, exits_on_bad_input
from llava_brain.layout import DatasetRoot, NsdTree, default_data_root
from llava_brain.nsd import CocoAnnotations, StimInfo, coco_box_to_nsd
from llava_brain.nsd.constants import IMAGE_SIZE

log = logging.getLogger("make_coco_annotations")


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # Data
    p.add_argument(
        "--nsd-root",
        type=Path,
        required=True,
        help="root of the raw NSD tree (nsd_stim_info_merged.csv and the COCO 2017 annotation JSONs, "
        "nsddata_stimuli/stimuli/nsd/annotations/{captions,instances}_{train2017,val2017}.json)",
    )
    p.add_argument(
        "--dataset-root",
        type=Path,
        default=default_data_root(),
        help="prepared dataset root; writes <root>/nsd/nsd_coco_{captions,instances}.json (default: $BRAIN_DATA_ROOT)",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--subject",
        type=subject_or_all,
        nargs="+",
        metavar="S",
        help="NSD subjects (1-8) whose seen images to annotate, or 'all' = every subject with a shown trial "
        "in nsd_stim_info_merged.csv (the paper: 1 2 5 7)",
    )
    which.add_argument("--all", action="store_true", help="annotate every image of the CSV (NSD: 73000)")
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
    p.add_argument(
        "--overwrite", action="store_true", help="rewrite both files even if they exist (needed when settings change)"
    )
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


def up_to_date(paths: list[Path], settings: dict) -> bool:
    """True if every output exists with `settings`; BadInputError if one exists with other settings."""
    complete = True
    for path in paths:
        if not path.exists():
            complete = False
            continue
        try:
            previous = read_info(path).get("settings")
        except BadInputError as err:
            raise BadInputError(path, f"{err.expectation}; pass --overwrite to replace it") from None
        if previous != settings:
            raise BadInputError(
                path, f"was written with other settings ({previous}, now {settings}); pass --overwrite to replace it"
            )
    return complete


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Sanity checks
    if args.dataset_root is None:
        parser.error("--dataset-root is required (or set $BRAIN_DATA_ROOT)")
    if not 0.0 <= args.min_visible <= 1.0:
        parser.error(f"--min-visible is a fraction in [0, 1], got {args.min_visible}")
    if args.subject and "all" in args.subject and len(args.subject) > 1:
        parser.error(f"--subject all cannot be combined with subject numbers, got {args.subject}")

    start = time.perf_counter()
    tree, root = NsdTree(args.nsd_root), DatasetRoot(args.dataset_root)
    info = StimInfo.load(tree.stim_info)
    subjects, nsd_ids = (None, np.arange(len(info))) if args.all else images_seen_by(info, args.subject)
    # JSON round trip so that the comparison with a file's info sees the same types (lists, floats).
    settings = json.loads(json.dumps({"subjects": subjects, "min_visible": args.min_visible, "image_size": IMAGE_SIZE}))
    outputs = [root.coco_captions, root.coco_instances]
    if not args.overwrite and up_to_date(outputs, settings):
        log.info("%s and %s are up to date (same settings); nothing to do", *outputs)
        return 0

    splits = sorted(set(info.coco_split[nsd_ids].tolist()))
    captions = nsd_captions(info, nsd_ids, load_coco(tree, "captions", splits))
    coco_instances = load_coco(tree, "instances", splits)
    instances, dropped = nsd_instances(info, nsd_ids, coco_instances, args.min_visible)
    sources = [str(tree.coco_annotations(kind, s)) for kind in ("captions", "instances") for s in splits]
    base = {
        "description": "COCO 2017 annotations of NSD images, keyed by 0-based nsdId",
        "sources": [str(info.path), *sources],
        "settings": settings,
        "num_images": len(nsd_ids),
    }
    num_captions = sum(map(len, captions.values()))
    num_objects = sum(map(len, instances.values()))
    write_instances(
        root.coco_instances,
        instances,
        merged_categories(coco_instances),
        {**base, "num_instances": num_objects, "num_dropped_cropped_away": dropped},
    )
    write_captions(root.coco_captions, captions, {**base, "num_captions": num_captions})
    log.info(
        "wrote %d captions and %d boxes (%d objects cropped away) of %d images to %s in %.1f s",
        num_captions,
        num_objects,
        dropped,
        len(nsd_ids),
        root.nsd,
        time.perf_counter() - start,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
