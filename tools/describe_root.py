"""Summarise a prepared dataset root: fMRI arrays per subject, images and annotations.

Opens arrays memory-mapped (reads headers, not data), so it is instant on real NSD too.

Full scale:  python tools/describe_root.py --dataset-root /data/brain
Tiny:        python tools/describe_root.py --dataset-root demo_out/root
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from llava_brain.errors import BadInputError, exits_on_bad_input
from llava_brain.io import read_json, write_json
from llava_brain.layout import DatasetRoot


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset-root", type=Path, required=True, help="prepared dataset root (holds nsd/)")
    p.add_argument("--json", type=Path, default=None, help="also write the summary to this JSON file")
    return p


def _subject_summary(layout: DatasetRoot, subject: int) -> dict:
    meta = read_json(layout.whole_meta(subject), "whole-brain metadata (meta.json)")
    mapping = read_json(layout.fmri2image(subject), "nsd_fmri2image.json")
    whole = {s: np.load(layout.whole_betas(subject, s), mmap_mode="r") for s in ("tr", "te")}
    val = np.asarray(mapping["val"])
    return {
        "grid": meta["grid"],
        "sessions": len(meta["sessions"]),
        "train_samples": int(whole["tr"].shape[0]),
        "test_samples": int(whole["te"].shape[0]),
        "test_images": int(np.unique(val).size),
        "test_repeats": np.bincount(np.asarray(mapping["val_repeat"], dtype=int)).tolist(),
        "whole_dtype": str(whole["tr"].dtype),
        "areas": meta["areas"],
    }


def describe(layout: DatasetRoot) -> dict:
    fmris = layout.nsd / "fmris"
    subjects = sorted(int(p.name[4:]) for p in fmris.glob("subj[0-9][0-9]") if p.is_dir()) if fmris.is_dir() else []
    if not subjects and not layout.images_dir.is_dir():
        raise BadInputError(layout.nsd, "no prepared subjects (nsd/fmris/subjXX) or images; run make_subjmri.py first")
    summary: dict = {"subjects": {f"subj{s:02d}": _subject_summary(layout, s) for s in subjects}}
    summary["images"] = len(list(layout.images_dir.glob("nsd_image_*.png"))) if layout.images_dir.is_dir() else 0
    annotation_files = (
        ("coco_captions", layout.coco_captions),
        ("coco_instances", layout.coco_instances),
        ("captions", layout.captions),
        ("instances", layout.instances),
    )
    for key, path in annotation_files:
        if path.is_file():
            images = read_json(path, "NSD-keyed annotations").get("images", {})
            count = sum(len(v) for v in images.values())
            summary[key] = {"images": len(images), "entries": count}
    for folder in (layout.vision_embeds_dir, layout.vae_embeds_dir):
        index = folder / "index.json"
        if index.is_file():
            summary[folder.name] = read_json(index, "an embeddings index").get("arrays", {})
    return summary


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    layout = DatasetRoot(args.dataset_root)
    summary = describe(layout)
    print(f"dataset root {layout.root}:")
    for name, s in summary["subjects"].items():
        areas = ", ".join(f"{a} {n}" for a, n in s["areas"].items())
        print(
            f"  {name}: grid {'x'.join(map(str, s['grid']))}, {s['sessions']} sessions -> "
            f"{s['train_samples']} train + {s['test_samples']} test samples ({s['whole_dtype']}), "
            f"{s['test_images']} test images (test samples of repeat 1/2/3: {s['test_repeats']});\n"
            f"    areas (voxels): {areas}"
        )
    print(f"  images: {summary['images']} PNGs")
    for key in ("coco_captions", "coco_instances", "captions", "instances"):
        if key in summary:
            print(f"  {key}: {summary[key]['entries']} for {summary[key]['images']} images")
    for folder in ("vision_embeds", "vae_embeds"):
        for name, array in summary.get(folder, {}).items():
            print(f"  {folder}/{name}: {array['dtype']} {'x'.join(map(str, array['shape']))}")
    if args.json:
        write_json(args.json, json.loads(json.dumps(summary)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
