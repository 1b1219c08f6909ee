"""Ridge-regression baseline: one area's single-trial betas -> the image embedding, scored by test retrieval.

Per subject: closed-form ridge (float64; dual samples x samples when voxels > samples, primal otherwise)
from the training betas of `--select-region` to each sample's image target, z-scored per dimension with
training statistics (predictions are un-z-scored before scoring). The ridge penalty is picked from the
`--alpha` grid by validation MSE on the last 10 % of the training samples (by sample order; earlier samples
of the same images are left out of that fit so repeats cannot leak), then refit on all training samples.
Test retrieval (llava_brain.evaluation.retrieval_report) is reported on (a) repeat-averaged test betas,
one row per test image in ascending nsdId, and (b) single trials = first presentation (`val_repeat == 0`).

Targets: `clip` = <root>/nsd/vision_embeds/clip_image_embeds.npy; `pixels` = an 8x8 RGB thumbnail of each
stimulus PNG minus its mean colour (as llava_brain/simulate/calibration.py), a check that stays meaningful
when the CLIP model is a random tiny one (the demo).

Writes <out>/ridge_<region>[_pixels]_subjXX/{metrics.json,run.json}; prints one line per subject.

Full scale (real NSD, nsdgeneral ~15.7k voxels x ~27k training trials; memory and time not measured here — the
float64 dual/primal Gram matrix alone is ~15.7k^2 x 8 B = 2 GB):
  python tools/evaluate/ridge_baseline.py --dataset-root /data/brain --subject 1 2 5 7 \\
      --select-region nsdgeneral --alpha 1e3 1e4 6e4 3e5
Tiny (demo root, seconds):
  python tools/evaluate/ridge_baseline.py --dataset-root demo_out/root --subject all --target pixels
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from llava_brain.errors import BadInputError, exits_on_bad_input, require_file
from llava_brain.evaluation import retrieval_report
from llava_brain.io import read_json, write_json, write_run_json
from llava_brain.layout import DatasetRoot, default_data_root, subject_name

DEFAULT_ALPHAS = [1e1, 1e2, 1e3, 1e4, 6e4, 3e5, 1e6]  # 6e4: Ozcelik & VanRullen's CLIP-vision ridge on nsdgeneral
HOLDOUT_FRACTION = 0.1
THUMB_SIZE = 8  # pixels target: 8x8 RGB thumbnail (as simulate/calibration.py)
METRICS_FILE = "metrics.json"


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # Data
    p.add_argument(
        "--dataset-root",
        type=Path,
        default=default_data_root(),
        required=default_data_root() is None,
        help="prepared dataset root (default: $BRAIN_DATA_ROOT)",
    )
    p.add_argument(
        "--subject",
        nargs="+",
        default=["all"],
        help="subject numbers, or 'all' = every subject under <root>/nsd/fmris with the region (default: all; "
        "the paper uses 1 2 5 7)",
    )
    p.add_argument(
        "--select-region", default="nsdgeneral", help="area of <root>/nsd/fmris/subjXX/area/ (default: nsdgeneral)"
    )
    p.add_argument(
        "--target",
        choices=["clip", "pixels"],
        default="clip",
        help="clip = vision_embeds/clip_image_embeds.npy; pixels = 8x8 RGB thumbnail minus its mean colour",
    )
    # Model
    p.add_argument(
        "--alpha",
        type=float,
        nargs="+",
        default=DEFAULT_ALPHAS,
        help=f"ridge penalties to choose from on the held-out 10%% of training samples (default: {DEFAULT_ALPHAS})",
    )
    # Output
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <root>/runs/ridge/)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing metrics.json")
    return p


# Inputs


def _subjects(layout: DatasetRoot, requested: list[str], region: str) -> list[int]:
    if [r.lower() for r in requested] == ["all"]:
        folder = layout.nsd / "fmris"
        names = sorted(p.name for p in folder.glob("subj[0-9][0-9]")) if folder.is_dir() else []
        found = [int(n[4:]) for n in names if layout.area_betas(int(n[4:]), region, "tr").is_file()]
        if not found:
            raise BadInputError(folder, f"no subject has area betas for region {region!r}")
        return found
    try:
        return [int(r) for r in requested]
    except ValueError:
        raise BadInputError(layout.nsd / "fmris", f"--subject takes numbers or 'all'; got {requested}") from None


def _load_betas(layout: DatasetRoot, subject: int, region: str, split: str, num_samples: int) -> np.ndarray:
    path = require_file(layout.area_betas(subject, region, split), f"(samples, voxels) betas of area {region!r}")
    betas = np.load(path)
    if betas.ndim != 2 or len(betas) != num_samples:
        raise BadInputError(path, f"expected ({num_samples}, voxels) to match nsd_fmri2image.json; found {betas.shape}")
    return betas.astype(np.float64)


def _load_fmri2image(layout: DatasetRoot, subject: int) -> dict[str, np.ndarray]:
    path = layout.fmri2image(subject)
    mapping = read_json(path, "the nsdId of every sample (train, val, val_repeat)")
    missing = [k for k in ("train", "val", "val_repeat") if k not in mapping]
    if missing or len(mapping["val"]) != len(mapping["val_repeat"]):
        raise BadInputError(path, f"expected lists train, val and val_repeat of matching length; missing {missing}")
    return {k: np.asarray(mapping[k], dtype=np.int64) for k in ("train", "val", "val_repeat")}


def _clip_targets(layout: DatasetRoot, nsd_ids: np.ndarray) -> np.ndarray:
    """(len(nsd_ids), D) float64 CLIP image embeddings, in the order of `nsd_ids`."""
    folder = layout.vision_embeds_dir
    embeds_path = require_file(folder / "clip_image_embeds.npy", "(images, D) CLIP image embeddings")
    index_path = folder / "index.json"
    index = read_json(index_path, "{'nsd_ids': [...]} naming the rows of clip_image_embeds.npy")
    embeds = np.load(embeds_path, mmap_mode="r")
    row_of = {int(n): i for i, n in enumerate(index.get("nsd_ids", []))}
    if embeds.ndim != 2 or len(embeds) != len(row_of):
        raise BadInputError(embeds_path, f"expected ({len(row_of)}, D) rows as in index.json; found {embeds.shape}")
    absent = [int(n) for n in nsd_ids if int(n) not in row_of]
    if absent:
        raise BadInputError(index_path, f"no embedding for {len(absent)} needed images, e.g. nsdId {absent[0]}")
    return np.asarray(embeds[[row_of[int(n)] for n in nsd_ids]], dtype=np.float64)


def _pixel_targets(layout: DatasetRoot, nsd_ids: np.ndarray) -> np.ndarray:
    """(len(nsd_ids), 3*8*8) float64: box-averaged 8x8 RGB thumbnail minus the image's mean colour."""
    from PIL import Image

    rows = []
    for nsd_id in nsd_ids:
        path = require_file(layout.image(nsd_id), "the stimulus PNG")
        with Image.open(path) as im:
            small = im.convert("RGB").resize((THUMB_SIZE, THUMB_SIZE), Image.BOX)
        rows.append(np.asarray(small, dtype=np.float64).reshape(-1, 3) / 255.0)
    thumbs = np.stack(rows)  # (images, 64, 3)
    # Colour contrast: visual cortex codes local contrast far more than the overall light level.
    return (thumbs - thumbs.mean(axis=1, keepdims=True)).reshape(len(nsd_ids), -1)


# Ridge


class RidgeSolver:
    """Closed-form ridge for many penalties from one eigendecomposition (float64, no intercept).

    Primal (voxels <= samples): W = V diag(1/(s+a)) V^T X^T Y with X^T X = V diag(s) V^T.
    Dual (voxels > samples):    W = X^T U diag(1/(s+a)) U^T Y with X X^T = U diag(s) U^T.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.dual = x.shape[1] > x.shape[0]
        gram = x @ x.T if self.dual else x.T @ x
        self.eigvals, vecs = np.linalg.eigh(gram)
        self.eigvals = np.maximum(self.eigvals, 0.0)  # round-off can make tiny eigenvalues negative
        if self.dual:
            self.left, self.right = x.T @ vecs, vecs.T @ y  # (voxels, n), (n, D)
        else:
            self.left, self.right = vecs, vecs.T @ (x.T @ y)  # (voxels, voxels), (voxels, D)

    def weights(self, alpha: float) -> np.ndarray:
        """(voxels, D) coefficients for penalty `alpha`."""
        return self.left @ (self.right / (self.eigvals + alpha)[:, None])


def choose_alpha(x: np.ndarray, y: np.ndarray, ids: np.ndarray, alphas: list[float]) -> tuple[float, dict]:
    """Pick the penalty with the lowest MSE on the last 10 % of samples (z-scored targets)."""
    num_holdout = max(1, round(HOLDOUT_FRACTION * len(x)))
    holdout = np.zeros(len(x), dtype=bool)
    holdout[-num_holdout:] = True
    # Earlier presentations of held-out images would let the fit memorise them: leave them out.
    fit = ~holdout & ~np.isin(ids, ids[holdout])
    if fit.sum() == 0 or len(alphas) == 1:
        return float(alphas[0]), {"num_fit": int(fit.sum()), "num_holdout": num_holdout, "mse": {}}
    solver = RidgeSolver(x[fit], y[fit])
    mse = {float(a): float(np.mean((x[holdout] @ solver.weights(a) - y[holdout]) ** 2)) for a in alphas}
    best = min(mse, key=mse.get)
    return best, {"num_fit": int(fit.sum()), "num_holdout": num_holdout, "mse": mse}


# Per subject


def _test_sets(betas_te: np.ndarray, val: np.ndarray, val_repeat: np.ndarray):
    """(averaged betas, their nsdIds), (first-presentation betas, their nsdIds); both in ascending nsdId."""
    test_ids = np.unique(val)
    averaged = np.stack([betas_te[val == i].mean(axis=0) for i in test_ids])
    first = np.flatnonzero(val_repeat == 0)
    first = first[np.argsort(val[first], kind="stable")]
    return (averaged, test_ids), (betas_te[first], val[first])


def evaluate_subject(layout: DatasetRoot, subject: int, args: argparse.Namespace) -> dict:
    mapping = _load_fmri2image(layout, subject)
    train_ids, val_ids = mapping["train"], mapping["val"]
    x_tr = _load_betas(layout, subject, args.select_region, "tr", len(train_ids))
    x_te = _load_betas(layout, subject, args.select_region, "te", len(val_ids))
    if x_tr.shape[1] != x_te.shape[1]:
        raise BadInputError(layout.area_betas(subject, args.select_region, "te"), "voxel count differs from train")

    image_ids = np.unique(np.concatenate([train_ids, val_ids]))
    embed = _clip_targets(layout, image_ids) if args.target == "clip" else _pixel_targets(layout, image_ids)
    row_of = {int(n): i for i, n in enumerate(image_ids)}
    y_tr = embed[[row_of[int(n)] for n in train_ids]]
    y_mean, y_std = y_tr.mean(axis=0), y_tr.std(axis=0) + 1e-8
    y_tr_z = (y_tr - y_mean) / y_std

    alpha, selection = choose_alpha(x_tr, y_tr_z, train_ids, args.alpha)
    weights = RidgeSolver(x_tr, y_tr_z).weights(alpha)

    (avg_x, avg_ids), (single_x, single_ids) = _test_sets(x_te, val_ids, mapping["val_repeat"])
    metrics = {}
    for name, x, ids in (("avg/", avg_x, avg_ids), ("single/", single_x, single_ids)):
        pred = x @ weights * y_std + y_mean  # back to the target's units
        metrics.update(retrieval_report(pred, embed[[row_of[int(n)] for n in ids]], prefix=name))
    return {
        "subject": subject,
        "region": args.select_region,
        "target": args.target,
        "alpha": alpha,
        "alpha_grid": [float(a) for a in args.alpha],
        "holdout_mse": selection["mse"],
        "solver": "dual" if x_tr.shape[1] > x_tr.shape[0] else "primal",
        "num_voxels": int(x_tr.shape[1]),
        "num_train_samples": len(x_tr),
        "num_fit_samples": selection["num_fit"],
        "num_holdout_samples": selection["num_holdout"],
        "num_test_images": len(avg_ids),
        "num_test_single": len(single_ids),
        "target_dim": int(embed.shape[1]),
        "metrics": metrics,
    }


def run_dir(out: Path, region: str, target: str, subject: int) -> Path:
    """<out>/ridge_<region>_subjXX for CLIP targets, <out>/ridge_<region>_pixels_subjXX for pixels."""
    suffix = "" if target == "clip" else f"_{target}"
    return out / f"ridge_{region}{suffix}_{subject_name(subject)}"


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Sanity checks
    if any(a <= 0 for a in args.alpha):
        build_parser().error(f"--alpha values must be positive, got {args.alpha}")
    layout = DatasetRoot(args.dataset_root)
    out = args.out if args.out is not None else layout.root / "runs" / "ridge"

    for subject in _subjects(layout, args.subject, args.select_region):
        folder = run_dir(out, args.select_region, args.target, subject)
        if (folder / METRICS_FILE).exists() and not args.overwrite:
            raise BadInputError(folder / METRICS_FILE, "already exists; pass --overwrite to replace it")
        start = time.perf_counter()
        result = evaluate_subject(layout, subject, args)
        result["seconds"] = round(time.perf_counter() - start, 2)
        write_json(folder / METRICS_FILE, result)
        write_run_json(folder, args, dataset_root=layout.root)
        m = result["metrics"]
        print(
            f"{subject_name(subject)} {args.select_region} -> {args.target}: top-1 brain->image "
            f"averaged {m['avg/top1_brain_to_image']:.3f} (chance {m['avg/chance']:.3f}), "
            f"single-trial {m['single/top1_brain_to_image']:.3f} (chance {m['single/chance']:.3f}), "
            f"alpha {result['alpha']:g}, {result['seconds']:.1f} s -> {folder / METRICS_FILE}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
