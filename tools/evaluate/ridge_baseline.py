"""Ridge-regression baseline: one area's single-trial betas -> the image embedding, scored by test retrieval.

Per subject: closed-form ridge (float64; dual samples x samples when voxels > samples, primal otherwise)
from the training betas of `--area` to each sample's image target, z-scored per dimension with training
statistics (predictions are un-z-scored before scoring). The ridge penalty is picked from the `--alpha`
grid by validation MSE on the last 10 % of the training samples (by sample order; earlier samples of the
same images are left out of that fit so repeats cannot leak), then refit on all training samples. Test
retrieval (llava_brain.evaluation.retrieval_report) is reported on (a) repeat-averaged test betas, one row
per test image in ascending nsdId, and (b) single trials = each image's first presentation (repeat 0) —
the samples of the prediction files (`predictions.prediction_samples`). The test set is NSD's shared-1000
images ("te"/"val" in the dataset root; there is no separate validation split).

Targets: `clip` = the CLIP image embeddings of generate_clip_embeds.py (`DatasetRoot.clip_embeds`, rows named
by `clip_index`); `pixels` = an 8x8 RGB thumbnail of each stimulus PNG minus its mean colour (as
llava_brain/simulate/calibration.py), a check that stays meaningful when the CLIP model is a random tiny one
(the demo).

Writes, under --out (default <root>/runs/ridge), one folder per subject, ridge_<area>[_pixels]_subjXX/
{model.safetensors, metrics.json, run.json}, and last the run's summary ridge_<area>[_pixels]/{summary.json,
run.json} (each subject's metrics and their mean). model.safetensors is the fitted model (weights (voxels, D)
on z-scored targets, y_mean, y_std; float32; llava_brain.evaluation.encoders.RidgeModel); metrics.json says
what it needs to predict (subject, area, target, num_voxels, target_dim). The metrics are computed from the
saved float32 model's predictions, so `fmri2embeds.py --encoder ridge --model <out>/ridge_<area>` followed by
`eval_retrieval.py` gives the same numbers (docs/predictions.md). Prints one line per subject. A rerun skips
subjects whose result is current (same settings and inputs, every file there), so a run killed between
subjects finishes the rest; a result made with other settings or inputs is refused unless --overwrite.
Non-finite betas or targets are refused, naming the file.

Full scale (real NSD, nsdgeneral ~15.7k voxels x ~27k training trials; memory and time not measured here — the
float64 dual/primal Gram matrix alone is ~15.7k^2 x 8 B = 2 GB):
  python tools/evaluate/ridge_baseline.py --dataset-root /data/brain --subject 1 2 5 7 \\
      --area nsdgeneral --alpha 1e3 1e4 6e4 3e5
Tiny (demo root, seconds):
  python tools/evaluate/ridge_baseline.py --dataset-root demo_out/root --subject all --target pixels
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

from llava_brain import cli
from llava_brain.errors import BadInputError, exits_on_bad_input, require_file
from llava_brain.evaluation import retrieval_report
from llava_brain.evaluation.encoders import RIDGE_MODEL, RidgeModel, load_area_betas
from llava_brain.evaluation.predictions import KINDS, prediction_samples
from llava_brain.io import StageRun, load_npy, read_json, require_finite, require_writable, staged_folder, write_json
from llava_brain.layout import DatasetRoot, subject_name
from llava_brain.subjects import SampleIndex, read_fmri2image, sample_index

DEFAULT_ALPHAS = [1e1, 1e2, 1e3, 1e4, 6e4, 3e5, 1e6]  # 6e4: Ozcelik & VanRullen's CLIP-vision ridge on nsdgeneral
HOLDOUT_FRACTION = 0.1
THUMB_SIZE = 8  # pixels target: 8x8 RGB thumbnail (as simulate/calibration.py)
METRICS_FILE = "metrics.json"
SUMMARY_FILE = "summary.json"


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # Data
    cli.add_dataset_root(p, "prepared dataset root (holds nsd/fmris/ and nsd/vision_embeds/)")
    cli.add_subject(p, help="subject numbers, or 'all' (default) = every prepared subject; the paper uses 1 2 5 7")
    p.add_argument("--area", default="nsdgeneral", help="area of <root>/nsd/fmris/subjXX/area/ (default: nsdgeneral)")
    p.add_argument(
        "--target",
        choices=["clip", "pixels"],
        default="clip",
        help="clip = the CLIP image embeddings (nsd/vision_embeds/); pixels = 8x8 RGB thumbnail minus its mean colour",
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
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <root>/runs/ridge)")
    cli.add_overwrite(p, "refit subjects whose result exists, even one made with other settings or inputs")
    return p


# Inputs


def _clip_targets(layout: DatasetRoot, nsd_ids: np.ndarray) -> np.ndarray:
    """(len(nsd_ids), D) float64 CLIP image embeddings, in the order of `nsd_ids`."""
    index = read_json(layout.clip_index, f"{{'nsd_ids': [...]}} naming the rows of {layout.clip_embeds.name}")
    embeds = load_npy(layout.clip_embeds, "(images, D) CLIP image embeddings", mmap=True)
    row_of = {int(n): i for i, n in enumerate(index.get("nsd_ids", []))}
    if embeds.ndim != 2 or len(embeds) != len(row_of):
        raise BadInputError(
            layout.clip_embeds, f"expected ({len(row_of)}, D) rows as in {layout.clip_index.name}; found {embeds.shape}"
        )
    absent = [int(n) for n in nsd_ids if int(n) not in row_of]
    if absent:
        raise BadInputError(layout.clip_index, f"no embedding for {len(absent)} needed images, e.g. nsdId {absent[0]}")
    rows = np.asarray([row_of[int(n)] for n in nsd_ids], dtype=np.int64)
    return require_finite(np.asarray(embeds[rows], dtype=np.float64), layout.clip_embeds, "the CLIP embeddings", rows)


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


def _png_listing(layout: DatasetRoot, nsd_ids: np.ndarray) -> dict:
    """A cheap fingerprint of the stimulus PNGs a pixels fit reads: name, size and mtime of each (no hashing)."""
    digest = hashlib.sha256()
    for nsd_id in nsd_ids:
        stat = require_file(layout.image(nsd_id), "the stimulus PNG (make_images.py)").stat()
        digest.update(f"{layout.image(nsd_id).name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return {"count": len(nsd_ids), "stat_sha256": digest.hexdigest()}


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


def _splits(layout: DatasetRoot, subject: int) -> tuple[SampleIndex, SampleIndex]:
    mapping = read_fmri2image(layout, subject)
    return sample_index(layout, subject, "tr", mapping), sample_index(layout, subject, "te", mapping)


def evaluate_subject(layout: DatasetRoot, subject: int, args: argparse.Namespace) -> tuple[dict, RidgeModel]:
    """Fit one subject and score the saved (float32) model's test predictions: (result, model)."""
    train, test = _splits(layout, subject)
    x_tr = load_area_betas(layout.area_betas(subject, args.area, "tr"), args.area, len(train))
    x_te = load_area_betas(layout.area_betas(subject, args.area, "te"), args.area, len(test))
    if x_tr.shape[1] != x_te.shape[1]:
        raise BadInputError(layout.area_betas(subject, args.area, "te"), "voxel count differs from train")

    image_ids = np.unique(np.concatenate([train.nsd_ids, test.nsd_ids]))
    embed = _clip_targets(layout, image_ids) if args.target == "clip" else _pixel_targets(layout, image_ids)
    row_of = {int(n): i for i, n in enumerate(image_ids)}
    y_tr = embed[[row_of[int(n)] for n in train.nsd_ids]]
    y_mean, y_std = y_tr.mean(axis=0), y_tr.std(axis=0) + 1e-8
    y_tr_z = (y_tr - y_mean) / y_std

    alpha, selection = choose_alpha(x_tr, y_tr_z, train.nsd_ids, args.alpha)
    weights = RidgeSolver(x_tr, y_tr_z).weights(alpha)
    model = RidgeModel(subject, args.area, args.target, weights.astype(np.float32), y_mean.astype(np.float32),
                       y_std.astype(np.float32), alpha)  # fmt: skip

    # The test sets of every prediction file (avg: repeats averaged, single: first presentation; ascending
    # nsdId), predicted as fmri2embeds.py predicts them: scores equal eval_retrieval.py's on those files.
    metrics, counts = {}, {}
    for kind in KINDS:
        samples = prediction_samples(test, kind)
        pred = model.predict(x_te, samples)
        metrics.update(retrieval_report(pred, embed[[row_of[s.nsd_id] for s in samples]], prefix=f"{kind}/"))
        counts[kind] = len(samples)
    return {
        "subject": subject,
        "area": args.area,
        "target": args.target,
        "alpha": alpha,
        "alpha_grid": [float(a) for a in args.alpha],
        "holdout_mse": selection["mse"],
        "solver": "dual" if x_tr.shape[1] > x_tr.shape[0] else "primal",
        "num_voxels": int(x_tr.shape[1]),
        "num_train_samples": len(x_tr),
        "num_fit_samples": selection["num_fit"],
        "num_holdout_samples": selection["num_holdout"],
        "num_test_images": counts["avg"],
        "num_test_single": counts["single"],
        "target_dim": int(embed.shape[1]),
        "model_file": RIDGE_MODEL,
        "metrics": metrics,
    }, model


def subject_stage(layout: DatasetRoot, subject: int, args: argparse.Namespace, out: Path) -> StageRun:
    """The rerun rule of one subject's folder: resolved settings and the fingerprints of every file it reads."""
    inputs = {
        "betas_tr": layout.area_betas(subject, args.area, "tr"),
        "betas_te": layout.area_betas(subject, args.area, "te"),
        "fmri2image": layout.fmri2image(subject),
    }
    if args.target == "clip":
        inputs.update(clip_embeds=layout.clip_embeds, clip_index=layout.clip_index)
    settings = {
        "subject": subject,
        "area": args.area,
        "target": args.target,
        "alphas": [float(a) for a in args.alpha],
        "holdout_fraction": HOLDOUT_FRACTION,
    }
    if args.target == "pixels":
        settings["thumb_size"] = THUMB_SIZE
    if args.target == "pixels":  # tens of thousands of PNGs: fingerprinted by their listing, not hashed
        train, test = _splits(layout, subject)
        inputs["stimulus_pngs"] = _png_listing(layout, np.unique(np.concatenate([train.nsd_ids, test.nsd_ids])))
    return StageRun(
        layout.ridge_run(args.area, args.target, subject, out), settings=settings, inputs=inputs, folder=True
    )


def _report_line(result: dict, path: Path, note: str = "") -> str:
    m = result["metrics"]
    return (
        f"{subject_name(result['subject'])} {result['area']} -> {result['target']}: top-1 brain->image "
        f"averaged {m['avg/top1_brain_to_image']:.3f} (chance {m['avg/chance']:.3f}), "
        f"single-trial {m['single/top1_brain_to_image']:.3f} (chance {m['single/chance']:.3f}), "
        f"alpha {result['alpha']:g}, {result['seconds']:.1f} s -> {path}{note}"
    )


def _read_result(path: Path) -> dict:
    result = read_json(path, "ridge_baseline.py results")
    if not isinstance(result, dict) or not isinstance(result.get("metrics"), dict):
        raise BadInputError(path, "expected ridge_baseline.py results with a 'metrics' dict; pass --overwrite to refit")
    return result


def write_summary(layout: DatasetRoot, args: argparse.Namespace, out: Path, results: dict[int, dict]) -> Path:
    """The run's summary (each subject's metrics as subjXX/<kind>/<metric>, and their mean), its run.json last."""
    folder = layout.ridge_run(args.area, args.target, out=out)
    metrics = {f"{subject_name(s)}/{k}": v for s, r in results.items() for k, v in r["metrics"].items()}
    for key in results[min(results)]["metrics"]:
        metrics[key] = float(np.mean([r["metrics"][key] for r in results.values()]))
    subject_files = [layout.ridge_run(args.area, args.target, s, out) / METRICS_FILE for s in results]
    stage = StageRun(
        folder,
        settings={"subjects": sorted(results), "area": args.area, "target": args.target},
        inputs={"subject_metrics": subject_files},
        folder=True,
    )
    previous = stage.previous()
    if previous is None or stage.changes(previous) or not (folder / SUMMARY_FILE).is_file():  # derived: never refused
        write_json(folder / SUMMARY_FILE, {"subjects": sorted(results), "area": args.area, "target": args.target,
                                           "metrics": metrics})  # fmt: skip
        stage.finish(args, dataset_root=layout.root)
    return folder / SUMMARY_FILE


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = cli.parse_args(parser, argv)
    if any(a <= 0 for a in args.alpha):
        parser.error(f"--alpha values must be positive, got {args.alpha}")
    layout = DatasetRoot(args.dataset_root)
    out = args.out if args.out is not None else layout.run_dir("ridge")

    # Before any work: every subject has the area, the output can be written, no result would be replaced silently.
    for subject in args.subject:
        what = f"{subject_name(subject)}'s betas of area {args.area!r} (make_subjmri.py --areas)"
        for split in ("tr", "te"):
            require_file(layout.area_betas(subject, args.area, split), what)
    require_writable(out, "--out folder")
    stages = {subject: subject_stage(layout, subject, args, out) for subject in args.subject}
    # Complete = the scores and the model: a folder from before models were saved is refit.
    todo = {
        s
        for s, stage in stages.items()
        if stage.needed(args.overwrite, all((stage.output / f).is_file() for f in (METRICS_FILE, RIDGE_MODEL)))
    }

    results = {}
    for subject, stage in stages.items():
        path = stage.output / METRICS_FILE
        if subject not in todo:
            results[subject] = _read_result(path)
            print(_report_line(results[subject], path, " (current: kept)"))
            continue
        start = time.perf_counter()
        result, model = evaluate_subject(layout, subject, args)
        result["seconds"] = round(time.perf_counter() - start, 2)
        bad = sorted(k for k, v in result["metrics"].items() if not np.isfinite(v))
        if bad:  # never let a degenerate fit replace a result: nothing is written
            raise BadInputError(layout.area_betas(subject, args.area, "tr"),
                                f"the fit on these betas gave non-finite metrics ({', '.join(bad[:3])}); "
                                "nothing written, any earlier result is kept")  # fmt: skip
        with staged_folder(stage.output) as staging:
            model.save(staging)
            write_json(staging / METRICS_FILE, result)
            stage.finish(args, into=staging, dataset_root=layout.root)
        results[subject] = result
        print(_report_line(result, path))
    write_summary(layout, args, out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
