"""Caption each test sample by retrieval: the COCO caption of the training image nearest its predicted CLIP embedding.

A baseline caption generator (until Brain-LLaVA generates text): for every sample of the prediction folders
of one kind (fmri2embeds.py; avg = repeat-averaged, single = first presentation), the training image of the
same subject (the nsdIds of its "tr" split) whose target CLIP embedding (DatasetRoot.clip_embeds, rows named
by clip_index) has the highest cosine with the sample's predicted embedding; ties go to the lowest nsdId.
Its first COCO caption (nsd_coco_captions.json) becomes the sample's text. A test image is never a training
image in NSD, so a perfect prediction retrieves the training image that looks most like the stimulus, and
the captions score above the shuffled control of eval_captions.py only as far as the prediction carries the
image's content.

Writes --out, a JSONL that eval_captions.py reads, one line per sample in subject and row order:
  {"sample": "subj01/te/3+9+12", "task": "brief_description", "text": "...", "source_nsd_id": 123}
atomically, with its provenance in <out>.run.json; a rerun with the same settings and inputs skips, other
settings need --overwrite.

Full scale:
  python tools/evaluate/retrieve_captions.py --predictions /data/brain/runs/predictions/vit3d \\
      --dataset-root /data/brain --out /data/brain/runs/captions/vit3d_retrieval.jsonl
Tiny (demo root):
  python tools/evaluate/retrieve_captions.py --predictions demo_out/root/runs/predictions/vit3d \\
      --dataset-root demo_out/root --out /tmp/vit3d_retrieval.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from llava_brain import cli
from llava_brain.annotations import read_captions
from llava_brain.errors import BadInputError, exits_on_bad_input
from llava_brain.evaluation.predictions import CLIP_FILE, INDEX_FILE, KINDS, Predictions, prediction_folders
from llava_brain.io import StageRun, load_npy, read_json, require_finite, require_writable, write_text
from llava_brain.layout import DatasetRoot, subject_name
from llava_brain.subjects import sample_index

TASK = "brief_description"


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # Data
    cli.add_predictions(p)
    cli.add_dataset_root(p, "prepared dataset root (nsd/vision_embeds/, nsd/nsd_coco_captions.json, nsd/fmris/)")
    p.add_argument("--kind", choices=KINDS, default="avg",
                   help="which prediction folders: avg = repeat-averaged (default), "
                   "single = first presentation")  # fmt: skip
    p.add_argument("--task", default=TASK, help=f"task name written on every line (default {TASK})")
    # Output
    p.add_argument("--out", type=Path, default=None,
                   help="the JSONL to write (default <root>/runs/captions/<run>_retrieval_<kind>.jsonl; its "
                   "provenance: <out>.run.json)")  # fmt: skip
    cli.add_overwrite(p, "replace an --out made with other settings or inputs")
    cli.add_quiet(p)
    return p


def clip_targets(layout: DatasetRoot, nsd_ids: np.ndarray) -> np.ndarray:
    """(len(nsd_ids), D) float64 target CLIP image embeddings, in the order of `nsd_ids`."""
    index = read_json(layout.clip_index, f"{{'nsd_ids': [...]}} naming the rows of {layout.clip_embeds.name}")
    ids = index.get("nsd_ids") if isinstance(index, dict) else None
    if not isinstance(ids, list):
        raise BadInputError(layout.clip_index, "expected an object with an 'nsd_ids' list")
    embeds = load_npy(layout.clip_embeds, "(images, D) CLIP image embeddings", mmap=True)
    row_of = {int(n): i for i, n in enumerate(ids)}
    if embeds.ndim != 2 or len(embeds) != len(ids):
        raise BadInputError(layout.clip_embeds, f"expected ({len(ids)}, D) rows as in {layout.clip_index.name}; "
                                                f"found {embeds.shape}")  # fmt: skip
    absent = [int(n) for n in nsd_ids if int(n) not in row_of]
    if absent:
        raise BadInputError(layout.clip_index, f"no embedding for {len(absent)} training images, "
                                               f"e.g. nsdId {absent[0]}")  # fmt: skip
    rows = np.asarray([row_of[int(n)] for n in nsd_ids], dtype=np.int64)
    return require_finite(np.asarray(embeds[rows], dtype=np.float64), layout.clip_embeds, "the CLIP embeddings", rows)


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def nearest(predicted: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """(N,) index of the candidate row with the highest cosine to each predicted row (first one on ties)."""
    return np.argmax(_unit(np.asarray(predicted, dtype=np.float64)) @ _unit(candidates).T, axis=1)


def retrieve(layout: DatasetRoot, folder: Path, captions: dict[int, list[str]], task: str) -> list[dict]:
    """The JSONL records of one prediction folder (one subject, one kind)."""
    preds = Predictions.load(folder)
    train_ids = np.unique(sample_index(layout, preds.subject, "tr").nsd_ids)
    if not len(train_ids):
        raise BadInputError(layout.fmri2image(preds.subject), f"{subject_name(preds.subject)} has no training images")
    targets = clip_targets(layout, train_ids)
    if preds.clip.shape[1] != targets.shape[1]:
        raise BadInputError(folder / CLIP_FILE, f"predicted embeddings have {preds.clip.shape[1]} dimensions, the "
                                                f"targets {targets.shape[1]} ({layout.clip_embeds})")  # fmt: skip
    predicted = require_finite(np.asarray(preds.clip, dtype=np.float64), folder / CLIP_FILE, "the predictions")
    missing = [int(n) for n in train_ids if not captions.get(int(n))]
    if missing:
        who = subject_name(preds.subject)
        raise BadInputError(layout.coco_captions, f"no COCO caption for {len(missing)} training images of {who}, "
                                                  f"e.g. nsdId {missing[0]}")  # fmt: skip
    best = train_ids[nearest(predicted, targets)]
    return [{"sample": sample, "task": task, "text": captions[int(n)][0], "source_nsd_id": int(n)}
            for sample, n in zip(preds.samples, best, strict=True)]  # fmt: skip


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    args = cli.parse_args(build_parser(), argv)
    started = time.time()
    layout = DatasetRoot(args.dataset_root)
    if args.out is None:
        args.out = layout.generated_texts(f"{args.predictions.name}_retrieval_{args.kind}")
    require_writable(args.out, "--out file")
    folders = {s: f for (s, kind), f in prediction_folders(args.predictions).items() if kind == args.kind}
    if not folders:
        raise BadInputError(args.predictions, f"has no subjXX_{args.kind}/ prediction folders")
    inputs = {"predictions": [f / name for f in folders.values() for name in (CLIP_FILE, INDEX_FILE)],
              "fmri2image": [layout.fmri2image(s) for s in folders], "clip_embeds": layout.clip_embeds,
              "clip_index": layout.clip_index, "coco_captions": layout.coco_captions}  # fmt: skip
    settings = {"predictions": str(args.predictions.resolve()), "kind": args.kind, "task": args.task,
                "subjects": sorted(folders), "caption": "first COCO caption of the nearest training image"}  # fmt: skip
    stage = StageRun(args.out, settings=settings, inputs=inputs, folder=False)
    if not stage.needed(args.overwrite, complete=args.out.is_file()):
        print(f"{args.out} is current (same settings and inputs); pass --overwrite to redo it")
        return 0
    captions = read_captions(layout.coco_captions)
    records = []
    for subject, folder in sorted(folders.items()):
        mine = retrieve(layout, folder, captions, args.task)
        records += mine
        if not args.quiet:
            distinct = len({r["source_nsd_id"] for r in mine})
            print(f"{subject_name(subject)}: {len(mine)} samples captioned from {distinct} distinct training images")
    stage.begin()
    write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    stage.finish(args, dataset_root=layout.root)
    print(f"wrote {len(records)} captions to {args.out} in {time.time() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
