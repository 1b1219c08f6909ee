"""Test retrieval of predicted CLIP embeddings (fmri2embeds.py prediction files), with its chance and shuffled levels.

For every subject and kind (avg = repeats averaged, single = first presentation) of --predictions RUN_DIR,
the targets are the dataset root's CLIP image embeddings (DatasetRoot.clip_embeds, rows named by
clip_index) of each sample's nsdId, and the metrics those of llava_brain.evaluation.retrieval_report:
  top1_brain_to_image, top1_image_to_brain  top-1 among all the subject's N test images; chance 1/N
  mindeye300_brain_to_image[_sd], ..._image_to_brain[_sd]  MindEye's protocol: 300-image pools, 30 seeded
                draws, mean and sd over the draws (numpy std, ddof 0); chance 1/300 (all N, sd 0, if N <= 300)
  mse, cosine   of the paired rows
per subject and their mean over subjects. Control "shuffled": the same computation with the prediction rows
deranged (llava_brain.evaluation.controls.derangement(N, --seed): no row keeps its own image), i.e. the
score of predictions unrelated to their images: it must be near chance, or the pipeline leaks.
These are the numbers pretrain_vit3d.py logs in its last metrics.json epoch and ridge_baseline.py in its
metrics.json, for the same model (tests/test_eval_retrieval.py).

Writes --json (default RUN_DIR/retrieval.json; {"evaluation": "retrieval", "run", "n", "subjects", "mean",
"controls", ...}, docs/predictions.md) atomically, with its provenance beside it (<json>.run.json), and prints
a markdown table. Always recomputed (seconds); nothing is written unless every folder is valid. Bad input —
prediction files of different lengths, nsdIds without a CLIP embedding, another embedding size, no prediction
folder — stops with one line naming the file (exit 2).

Full scale:
  python tools/evaluate/eval_retrieval.py --predictions /data/brain/runs/predictions/vit3d
Tiny (demo root):
  python tools/evaluate/eval_retrieval.py --predictions demo_out/root/runs/predictions/vit3d
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from llava_brain import cli
from llava_brain.data.fmri import Targets
from llava_brain.errors import BadInputError, exits_on_bad_input
from llava_brain.evaluation.controls import derangement
from llava_brain.evaluation.predictions import CLIP_FILE, INDEX_FILE, KINDS, Predictions, prediction_folders
from llava_brain.evaluation.report import RETRIEVAL_FILE, retrieval_markdown
from llava_brain.evaluation.retrieval import MINDEYE_REPEATS, MINDEYE_SEED, MINDEYE_SUBSET, retrieval_report
from llava_brain.io import StageRun, read_json, require_finite, require_writable, write_json
from llava_brain.layout import DATA_ROOT_ENV, DatasetRoot, default_data_root, subject_name

SHUFFLED = "shuffled"


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_predictions(p, subject_filter=True)
    p.add_argument("--dataset-root", type=Path, default=None,
                   help="dataset root holding the CLIP embeddings (default: the root the run folder lies in, "
                   f"<root>/runs/predictions/<run>; else the one its run.json names; else "
                   f"${DATA_ROOT_ENV})")  # fmt: skip
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                   help="avg = repeats averaged, single = first presentation (default: both)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled control's derangement (default 0)")
    p.add_argument("--name", default=None, help='the row label "run" (default: the run folder\'s name)')
    p.add_argument("--json", type=Path, default=None, help=f"output JSON (default RUN_DIR/{RETRIEVAL_FILE})")
    return p


def dataset_root(args: argparse.Namespace, folders: dict) -> DatasetRoot:
    """--dataset-root; else the root that holds the run folder; else the one fmri2embeds.py recorded; else $env."""
    if args.dataset_root is not None:
        return DatasetRoot(args.dataset_root)
    run = args.predictions
    if run.parent.name == "predictions" and run.parent.parent.name == "runs":
        return DatasetRoot(run.parent.parent.parent)
    manifest = next(iter(folders.values())) / "run.json"
    recorded = read_json(manifest, "provenance").get("dataset_root") if manifest.is_file() else None
    if recorded:
        return DatasetRoot(Path(recorded))
    if default_data_root() is not None:
        return DatasetRoot(default_data_root())
    raise BadInputError(run, "cannot tell which dataset root holds the CLIP targets; pass --dataset-root")


def load_checked(folder: Path, subject: int, kind: str, targets: Targets) -> Predictions:
    """A prediction folder that can be scored against `targets`, or a BadInputError naming the bad file."""
    pred = Predictions.load(folder)  # lengths of clip.npy / vae.npy against index.json
    index = folder / INDEX_FILE
    if (pred.subject, pred.kind) != (subject, kind):
        raise BadInputError(index, f"says {subject_name(pred.subject)} {pred.kind}, but the folder is {folder.name}")
    if len(np.unique(pred.nsd_ids)) != len(pred.nsd_ids):
        raise BadInputError(index, "lists an nsdId twice; expected one row per test image")
    targets.check(pred.nsd_ids, index)
    if pred.clip.shape[1] != targets.clip_dim:
        raise BadInputError(folder / CLIP_FILE, f"holds {pred.clip.shape[1]}-d embeddings; the targets "
                                                f"{targets.clip_path} are {targets.clip_dim}-d")  # fmt: skip
    require_finite(np.asarray(pred.clip), folder / CLIP_FILE, "the predicted CLIP embeddings")
    return pred


def _means(blocks: dict[str, dict[str, dict]], kinds: list[str]) -> dict[str, dict]:
    """Per kind: each metric's mean over the subjects that have it (and which subjects those are)."""
    means = {}
    for kind in kinds:
        have = {s: b[kind] for s, b in blocks.items() if isinstance(b.get(kind), dict)}
        if not have:
            continue
        names = [k for k, v in next(iter(have.values())).items() if isinstance(v, float)]
        means[kind] = {"subjects": [int(s[4:]) for s in have],
                       **{k: float(np.mean([b[k] for b in have.values()])) for k in names}}  # fmt: skip
    return means


def evaluate(folders: dict, targets: Targets, seed: int) -> tuple[dict, dict, dict]:
    """(per-subject blocks, shuffled-control blocks, unavailable) over every (subject, kind) folder."""
    checked = {key: load_checked(folder, *key, targets) for key, folder in folders.items()}  # all, before scoring
    blocks, shuffled, unavailable = {}, {}, {}
    for (subject, kind), pred in checked.items():
        name = subject_name(subject)
        clip, target = np.asarray(pred.clip), targets.clip_of(pred.nsd_ids)
        where = {"n": len(pred), "folder": str(pred.folder), "encoder": pred.encoder}
        blocks.setdefault(name, {})[kind] = {**where, **retrieval_report(clip, target)}
        if len(pred) < 2:
            unavailable[f"controls.{SHUFFLED}.{name}.{kind}"] = "a derangement needs at least 2 samples"
            continue
        deranged = clip[derangement(len(pred), seed)]
        shuffled.setdefault(name, {})[kind] = {"n": len(pred), **retrieval_report(deranged, target)}
    return blocks, shuffled, unavailable


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = cli.parse_args(parser, argv)
    kinds = list(dict.fromkeys(args.kinds))
    out = args.json if args.json is not None else args.predictions / RETRIEVAL_FILE
    require_writable(out, "--json file")
    folders = prediction_folders(args.predictions)
    folders = {(s, k): f for (s, k), f in folders.items() if k in kinds and (args.subject is None or s in args.subject)}
    if not folders:
        raise BadInputError(args.predictions, f"holds no prediction folder for subjects {args.subject} and "
                                              f"kinds {kinds}")  # fmt: skip
    layout = dataset_root(args, folders)
    targets = Targets(layout, vae=False)

    blocks, shuffled, unavailable = evaluate(folders, targets, args.seed)
    sizes = {f"{s}/{k}": b["n"] for s, kb in blocks.items() for k, b in kb.items()}
    kinds = [k for k in kinds if any(k in b for b in blocks.values())]
    result = {
        "evaluation": "retrieval",
        "run": args.name or args.predictions.resolve().name,
        "n": next(iter(sizes.values())) if len(set(sizes.values())) == 1 else sizes,
        "predictions": str(args.predictions),
        "dataset_root": str(layout.root),
        "targets": {"clip_embeds": str(layout.clip_embeds), "clip_index": str(layout.clip_index)},
        "protocol": {"top1": "among all N test images of the subject and kind; chance 1/N",
                     "mindeye": {"pool": MINDEYE_SUBSET, "draws": MINDEYE_REPEATS, "seed": MINDEYE_SEED,
                                 "sd": "numpy std (ddof 0) over the draws; all N and sd 0 when N <= pool"}},
        "kinds": kinds,
        "subjects": blocks,
        "mean": _means(blocks, kinds),
        "controls": {SHUFFLED: {"what": "prediction rows deranged (no row keeps its own image): chance level "
                                "of every metric", "seed": args.seed, "subjects": shuffled,
                                "mean": _means(shuffled, kinds)}},
        "unavailable": unavailable,
    }  # fmt: skip
    inputs = {"clip_embeds": layout.clip_embeds, "clip_index": layout.clip_index}
    inputs.update({f"{subject_name(s)}_{k}": [f / CLIP_FILE, f / INDEX_FILE] for (s, k), f in folders.items()})
    stage = StageRun(out, settings={"seed": args.seed, "kinds": kinds, "subjects": sorted({s for s, _ in folders})},
                     inputs=inputs, folder=False)  # fmt: skip
    write_json(out, result)
    stage.finish(args, dataset_root=layout.root)
    print(
        f"test retrieval of {result['run']} ({args.predictions}): top-1 among all test images; MindEye: "
        f"{MINDEYE_SUBSET}-image pools, {MINDEYE_REPEATS} draws (mean ± sd); shuffled: rows deranged (seed {args.seed})"
    )
    print(retrieval_markdown(result))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
