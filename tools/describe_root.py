"""Summarise a prepared dataset root: fMRI arrays per subject, images, annotations and embeddings.

Opens arrays memory-mapped (reads headers, not data), so it is instant on real NSD too. "test" is NSD's
shared-1000 test set (the "te" arrays, "val" in nsd_fmri2image.json); there is no separate validation split.
A truncated or unreadable file stops it with one line naming the file (exit 2).

Full scale:  python tools/describe_root.py --dataset-root /data/brain --json /data/brain/root_summary.json
Tiny:        python tools/describe_root.py --dataset-root demo_out/root
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from llava_brain import cli
from llava_brain.errors import BadInputError, exits_on_bad_input
from llava_brain.io import load_npy, read_json, require_writable, write_json
from llava_brain.layout import DatasetRoot, subject_name
from llava_brain.subjects import SPLITS, prepared_subjects, read_fmri2image, sample_index


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_dataset_root(p, "prepared dataset root (holds nsd/)")
    cli.add_subject(p, default=None, help="subject numbers or 'all' (default: every prepared subject)")
    p.add_argument("--json", type=Path, default=None, help="also write the summary to this JSON file")
    return p


def _subject_summary(layout: DatasetRoot, subject: int) -> dict:
    meta = read_json(layout.whole_meta(subject), "whole-brain metadata (meta.json)")
    mapping = read_fmri2image(layout, subject)
    test = sample_index(layout, subject, "te", mapping)
    whole = {s: load_npy(layout.whole_betas(subject, s), "(samples, X, Y, Z) whole-brain betas", mmap=True)
             for s in SPLITS}  # fmt: skip
    for split, index in (("tr", sample_index(layout, subject, "tr", mapping)), ("te", test)):
        if len(whole[split]) != len(index):
            expected = f"expected {len(index)} samples as in nsd_fmri2image.json; found {len(whole[split])}"
            raise BadInputError(layout.whole_betas(subject, split), expected)
    missing = [k for k in ("grid", "sessions", "areas") if k not in meta]
    if missing:
        raise BadInputError(layout.whole_meta(subject), f"missing {missing}; rerun make_subjmri.py")
    return {
        "grid": meta["grid"],
        "sessions": len(meta["sessions"]),
        "train_samples": int(whole["tr"].shape[0]),
        "test_samples": int(whole["te"].shape[0]),
        "test_images": int(np.unique(test.nsd_ids).size),
        "test_repeats": np.bincount(test.repeats).tolist(),
        "whole_dtype": str(whole["tr"].dtype),
        "areas": meta["areas"],
    }


def describe(layout: DatasetRoot, subjects: list[int] | None = None) -> dict:
    subjects = prepared_subjects(layout) if subjects is None else subjects
    if not subjects and not layout.images_dir.is_dir():
        raise BadInputError(layout.nsd, "no prepared subjects (nsd/fmris/subjXX) or images; run make_subjmri.py first")
    summary: dict = {"subjects": {subject_name(s): _subject_summary(layout, s) for s in subjects}}
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
    for folder, index in ((layout.vision_embeds_dir, layout.clip_index), (layout.vae_embeds_dir, layout.vae_index)):
        if index.is_file():
            summary[folder.name] = read_json(index, "an embeddings index").get("arrays", {})
    return summary


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    args = cli.parse_args(build_parser(), argv)
    if args.json:
        require_writable(args.json, "--json file")
    layout = DatasetRoot(args.dataset_root)
    summary = describe(layout, args.subject)
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
