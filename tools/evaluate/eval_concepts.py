"""Score located concept maps: the zeroing check of each map, and on mini-NSD the agreement with the ground
truth (does the map of "red" sit where the simulator encodes red, rather than where it encodes the other features?).

Reads locate_concepts.py's output (<concepts>/subjXX_<kind>/<concept>/mean.nii.gz and its ablation.json) and,
with --nsd-root, the mini-NSD tree the dataset root was prepared from (its run.json seed rebuilds every
subject's response model, llava_brain/simulate/truth.py). For each map whose concept is a mini-NSD feature
(a shape, a colour, a background, count, size), over the voxels of --region (default nsdgeneral, what the
ViT3D reads), against the signed true maps for a signed map (the encoding pattern) and the unsigned ones for a
non-negative map (Grad-CAM; llava_brain/simulate/truth.py):
  own        Spearman's rho between the located map and the true map of its feature, and the overlap of
             their top --top-fraction voxels (chance = the fraction);
  others     the same against the true maps of the 18 other features (mean and maximum), and the rank of
             the own feature among all 19 (1 = the located map matches its own feature best);
  random     the located map's values permuted over the region (mean rho and its 95th percentile);
  tracks     for a pattern (its scores over all samples are in index.json): the concept score's correlation
             with each feature of the images, which says what the map can show (a "red" score that also
             follows "square" gives a map that is partly square's).
Prints one row per map and writes --json (default <root>/runs/eval/concepts_<name>.json) for make_report.py.
Real NSD has no ground truth: without --nsd-root the rows carry the zeroing check only.

  python tools/evaluate/eval_concepts.py --concepts demo_out/root/runs/concepts/vit3d_concepts \\
      --dataset-root demo_out/root --nsd-root demo_out/mini_nsd
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from llava_brain import cli
from llava_brain.errors import BadInputError, exits_on_bad_input, require_file
from llava_brain.io import read_json, write_json
from llava_brain.layout import DatasetRoot


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--concepts", type=Path, required=True, help="a locate_concepts.py output folder")
    cli.add_dataset_root(p, "prepared dataset root (the subjects' masks)")
    p.add_argument("--nsd-root", type=lambda v: Path(v) if v else None, default=None,
                   help="the mini-NSD tree (make_mini_nsd.py) the root was prepared from: adds the agreement "
                   "with its ground truth (empty: none)")  # fmt: skip
    p.add_argument("--region", default="nsdgeneral", help="mask of whole/masks.npz compared over (nsdgeneral)")
    p.add_argument("--top-fraction", type=float, default=0.1, help="share of the region in the top-voxel overlap")
    p.add_argument("--permutations", type=int, default=200, help="random maps per located map (default 200)")
    p.add_argument("--json", type=Path, default=None,
                   help="output JSON (default <root>/runs/eval/concepts_<name>.json)")  # fmt: skip
    cli.add_quiet(p)
    return p


def concept_folders(concepts: Path) -> list[Path]:
    """Every finished <subjXX_kind>/<concept>/ folder (mean.nii.gz and run.json), sorted."""
    found = sorted(p.parent for p in concepts.glob("subj*_*/*/mean.nii.gz") if (p.parent / "run.json").is_file())
    if not found:
        raise BadInputError(concepts, "holds no finished concept folder (subjXX_<kind>/<concept>/mean.nii.gz)")
    return found


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = cli.parse_args(parser, argv)
    if not 0 < args.top_fraction < 1 or args.permutations < 1:
        parser.error("--top-fraction must be in (0, 1) and --permutations at least 1")
    import nibabel as nib

    from llava_brain.data.fmri import area_mask
    from llava_brain.evaluation.concepts import truth_agreement
    from llava_brain.simulate.truth import FEATURES, scene_features, score_tracking, subject_truth, tree_config

    layout = DatasetRoot(args.dataset_root)
    config = None
    if args.nsd_root is not None:
        try:
            config = tree_config(args.nsd_root)
        except FileNotFoundError:
            raise BadInputError(args.nsd_root / "run.json", "missing; only a tree written by make_mini_nsd.py "
                                "has a ground truth") from None  # fmt: skip
    rows, truths, features = [], {}, None
    for folder in concept_folders(args.concepts):
        index = read_json(require_file(folder / "index.json", "locate_concepts.py's index.json"))
        subject, concept = int(index["subject"]), str(index["concept"])
        ablation = read_json(folder / "ablation.json") if (folder / "ablation.json").is_file() else None
        if ablation:
            ablation.pop("per_sample", None)
        row = {"subject": subject, "kind": index["kind"], "concept": concept, "folder": str(folder),
               "method": index.get("method", "gradcam"), "versus": index.get("versus", []),
               "signed": bool(index.get("signed", False)),
               "samples": len(index["samples"]), "patch_sizes": index.get("patch_sizes"), "truth": None,
               "ablation": ablation, "montage": str(folder / "mean.png")}  # fmt: skip
        rows.append(row)
        text = f"subj{subject:02d} {concept:10s} {row['method']:8s}"
        if ablation:
            text += (f" zeroing: drop {ablation['drop_located']:+.4f} vs random {ablation['drop_random']:+.4f} "
                     f"(p {ablation['wilcoxon_p']:.2g})")  # fmt: skip
        feature = concept.strip().lower()
        if config is None or feature not in FEATURES:
            print(text + ("" if config is None else f" | not a mini-NSD feature ({', '.join(FEATURES)})"))
            continue
        if subject not in truths:
            truths[subject] = subject_truth(config, subject)
        truth = {f: truths[subject].map(f, signed=row["signed"]) for f in FEATURES}
        located = np.asarray(nib.load(folder / "mean.nii.gz").get_fdata(), dtype=np.float32)
        region = area_mask(layout, subject, args.region)
        if located.shape != region.shape:
            raise BadInputError(folder / "mean.nii.gz", f"has shape {located.shape}; subject {subject}'s grid is "
                                f"{region.shape}")  # fmt: skip
        score = row["truth"] = truth_agreement(
            located, truth, feature, region, top_fraction=args.top_fraction, permutations=args.permutations
        )
        tracks = ""
        if index.get("pattern_scores"):
            features = scene_features(config) if features is None else features
            scored = index["pattern_scores"]
            row["score_tracks"] = score_tracking([x["nsd_id"] for x in scored], [x["score"] for x in scored], features)
            strongest = sorted(row["score_tracks"].items(), key=lambda kv: -abs(kv[1]))[:3]
            tracks = "; the score tracks " + ", ".join(f"{name} {r:+.2f}" for name, r in strongest)
        own, rnd = score["own"], score["random"]
        print(
            f"{text} | truth rho own {own['spearman']:+.3f}, other features mean "
            f"{score['others_mean']['spearman']:+.3f} max {score['others_max']['spearman']:+.3f}, random "
            f"{rnd['spearman']:+.3f} (95% {rnd['spearman_p95']:+.3f}), rank {score['rank']}/{len(FEATURES)}, "
            f"top-{args.top_fraction:.0%} overlap {own['top_overlap']:.2f} (chance {args.top_fraction:.2f}){tracks}"
        )
    out = args.json or layout.eval_dir / f"concepts_{args.concepts.name}.json"
    write_json(out, {"evaluation": "concepts", "concepts": str(args.concepts), "region": args.region,
                     "top_fraction": args.top_fraction, "rows": rows})  # fmt: skip
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
