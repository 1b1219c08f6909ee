"""Run a trained fMRI encoder over each subject's test split and write prediction files, the one format every
evaluator reads (llava_brain/evaluation/predictions.py, docs/predictions.md).

For every --subject and --kinds (avg = all presentations of an image averaged, one row per test image;
single = its first presentation), rows in ascending nsdId, writes DatasetRoot.predictions(<run>, subject,
kind) = <root>/runs/predictions/<run>/subjXX_<kind>/ (or <--out>/subjXX_<kind>/):
  clip.npy    (samples, D) float32 predicted CLIP image embeddings
  vae.npy     (samples, C, H, W) float32 predicted VAE latents (a ViT3D with a VAE head)
  index.json  subject, split, kind, encoder, and per row its sample, nsdId, rows and repeats
  run.json    provenance; each folder is built under a hidden name and swapped in whole, run.json inside
A rerun skips folders that are current (same settings and inputs); a folder made with other settings or
inputs is refused unless --overwrite.

Encoders (--encoder, --model):
  vit3d  a pretrain_vit3d.py --out folder (final/ and run.json). The test volumes are prepared exactly as
         that run's own evaluation prepares them (the model's grid, float16 resize, repeats averaged in
         float32), in batches of its --eval-batch-size under its precision, so eval_retrieval.py on these
         files reproduces the run's last metrics.json epoch. CLIP head, and the VAE head when it has one.
  ridge  a ridge_baseline.py subject folder <out>/ridge_<area>_subjXX, or its prefix <out>/ridge_<area> for
         all its subjects: the area's test betas (repeats averaged / first presentation) @ W * std + mean.
         Only a --target clip ridge predicts CLIP embeddings; a pixels model is refused.
A model trained on other subjects than --subject is refused (exit 2, one line); so is a missing or
unfinished model. Default --run: "vit3d", or "ridge_<area>".

Full scale (subjects 1 2 5 7; the ViT3D on one GPU in minutes, ridge on CPU):
  python tools/evaluate/fmri2embeds.py --encoder vit3d --model /data/brain/runs/vit3d \\
      --dataset-root /data/brain --subject 1 2 5 7 --device cuda
  python tools/evaluate/fmri2embeds.py --encoder ridge --model /data/brain/runs/ridge/ridge_nsdgeneral \\
      --dataset-root /data/brain --subject 1 2 5 7
Tiny (demo root, seconds):
  python tools/evaluate/fmri2embeds.py --encoder vit3d --model demo_out/root/runs/vit3d \\
      --dataset-root demo_out/root --device cpu
  python tools/evaluate/fmri2embeds.py --encoder ridge --model demo_out/root/runs/ridge/ridge_nsdgeneral \\
      --dataset-root demo_out/root
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from llava_brain import cli, runtime
from llava_brain.errors import BadInputError, exits_on_bad_input
from llava_brain.evaluation.encoders import RidgeModel, Vit3dRun, load_area_betas, predict_vit3d, ridge_folders
from llava_brain.evaluation.predictions import (
    CLIP_FILE,
    INDEX_FILE,
    KINDS,
    VAE_FILE,
    folder_name,
    prediction_samples,
    write_predictions,
)
from llava_brain.io import StageRun, read_json, require_writable, staged_folder
from llava_brain.layout import DatasetRoot, subject_name
from llava_brain.subjects import SampleIndex, sample_index

SPLIT = "te"  # NSD's shared-1000 test images (llava_brain.subjects)


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # Model
    p.add_argument("--encoder", choices=["vit3d", "ridge"], required=True,
                   help="vit3d = a pretrain_vit3d.py output; ridge = a ridge_baseline.py model (clip)")  # fmt: skip
    p.add_argument("--model", type=Path, required=True,
                   help="vit3d: the pretrain_vit3d.py --out folder (final/ + run.json); ridge: a subject folder "
                   "<out>/ridge_<area>_subjXX or the prefix <out>/ridge_<area>")  # fmt: skip
    # Data
    cli.add_dataset_root(p, "prepared dataset root (nsd/fmris/: the test betas; default output under runs/)")
    cli.add_subject(p, default=None, help="subject numbers, or 'all' prepared (default: every subject the model "
                                          "was trained on; the paper uses 1 2 5 7)")  # fmt: skip
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                   help="avg = repeats averaged, single = first presentation (default: both)")  # fmt: skip
    # Run
    p.add_argument("--batch-size", type=int, default=None,
                   help="vit3d: test volumes per forward pass (default: the training run's --eval-batch-size, "
                   "so the numbers match its evaluation)")  # fmt: skip
    cli.add_device(p)
    p.add_argument("--precision", choices=cli.PRECISIONS, default=None,
                   help="vit3d: autocast precision (default: the training run's --precision)")  # fmt: skip
    # Output
    p.add_argument(
        "--run",
        default=None,
        help="name of the prediction run: <root>/runs/predictions/<run>/ (default vit3d or ridge_<area>)",
    )
    p.add_argument("--out", type=Path, default=None,
                   help="folder of the subjXX_<kind>/ outputs instead of <root>/runs/predictions/<run>")  # fmt: skip
    cli.add_overwrite(p, "redo folders that exist, even ones made with other settings or inputs")
    cli.add_quiet(p)
    return p


class Vit3dEncoder:
    """A pretrain_vit3d.py run: one model for all its subjects, run on the whole-brain test volumes."""

    def __init__(self, args: argparse.Namespace, layout: DatasetRoot):
        self.run = Vit3dRun.load(args.model)
        self.source = self.run.folder / "run.json"
        self.subjects, self.default_run = self.run.subjects, "vit3d"
        self.precision = args.precision or self.run.precision
        self.batch_size = args.batch_size or self.run.eval_batch_size
        self.device, self.quiet, self.layout, self._model = cli.resolve_device(args.device), args.quiet, layout, None
        config = read_json(self.run.final / "config.json", "the ViT3D config (final/config.json)")
        self.grid = [int(n) for n in config.get("grid", [])]
        self._check_grid()

    def _check_grid(self) -> None:
        """The model's grid is the common grid of the root it was trained on (`common_grid`): a root whose
        volumes would resize otherwise is not that root, and its predictions would not be the run's."""
        from llava_brain.data.fmri import common_grid

        first = 1 if 1 in self.subjects else self.subjects[0]
        if not self.layout.whole_meta(first).is_file():  # that subject is not prepared here: nothing to compare
            return
        grid = list(common_grid(self.layout, self.subjects))
        if grid != self.grid:
            raise BadInputError(self.layout.whole_meta(first), f"grid {grid} differs from the model's {self.grid} "
                                f"({self.run.final / 'config.json'}); is this the root it was trained on?")  # fmt: skip

    def settings(self, subject: int, kind: str) -> dict:
        return {"encoder": "vit3d", "model": str(self.run.folder.resolve()), "subject": subject, "kind": kind,
                "split": SPLIT, "precision": self.precision}  # fmt: skip

    def inputs(self, subject: int) -> dict:
        return {**self.run.files, "betas_te": self.layout.whole_betas(subject, SPLIT),
                "fmri2image": self.layout.fmri2image(subject)}  # fmt: skip

    def info(self, subject: int) -> dict:
        return {"type": "vit3d", "model": str(self.run.folder), "trained_subjects": self.subjects,
                "area": self.run.area, "grid": self.grid, "precision": self.precision,
                "batch_size": self.batch_size, "device": self.device}  # fmt: skip

    def expects_vae(self) -> bool:
        config = json.loads((self.run.final / "config.json").read_text())
        return config.get("vae_shape") is not None

    def predict(self, subject: int, samples: dict[str, list]) -> dict[str, tuple]:
        from llava_brain.data.fmri import open_betas, read_split

        if self._model is None:
            self._model = self.run.model(self.device)
        betas = open_betas(self.layout, subject, SPLIT)
        read_split(self.layout, subject, SPLIT, len(betas))  # the index must match the betas' length
        total = sum(len(s) for s in samples.values())
        out, path = {}, self.layout.whole_betas(subject, SPLIT)
        with tqdm(total=total, desc=f"{subject_name(subject)} vit3d", unit="sample", disable=self.quiet) as bar:
            for kind, kind_samples in samples.items():
                out[kind] = predict_vit3d(self._model, betas, kind_samples, path=path,
                                          batch_size=self.batch_size, device=self.device, precision=self.precision,
                                          progress=bar.update)  # fmt: skip
        return out


class RidgeEncoder:
    """ridge_baseline.py models, one per subject, run on the area's test betas."""

    def __init__(self, args: argparse.Namespace, layout: DatasetRoot):
        self.folders, self.layout, self.source = ridge_folders(args.model), layout, args.model
        self.subjects = sorted(self.folders)
        self.models: dict[int, RidgeModel] = {}

    def load(self, subjects: list[int]) -> None:
        """Load the requested subjects' models (before any work): each must predict CLIP embeddings."""
        for subject in subjects:
            model = self.models[subject] = RidgeModel.load(self.folders[subject])
            if model.target != "clip":
                raise BadInputError(self.folders[subject] / "metrics.json",
                                    f"is a ridge model of target {model.target!r}: only a --target clip ridge "
                                    "predicts CLIP embeddings (clip.npy)")  # fmt: skip
        areas = sorted({m.area for m in self.models.values()})
        if len(areas) > 1:
            raise BadInputError(self.source, f"holds ridge models of several areas {areas}; pick one per run")
        self.default_run = f"ridge_{areas[0]}"

    def settings(self, subject: int, kind: str) -> dict:
        return {"encoder": "ridge", "model": str(self.folders[subject].resolve()), "subject": subject, "kind": kind,
                "split": SPLIT}  # fmt: skip

    def inputs(self, subject: int) -> dict:
        folder, area = self.folders[subject], self.models[subject].area
        return {"model_weights": folder / "model.safetensors", "model_result": folder / "metrics.json",
                "betas_te": self.layout.area_betas(subject, area, SPLIT),
                "fmri2image": self.layout.fmri2image(subject)}  # fmt: skip

    def info(self, subject: int) -> dict:
        m = self.models[subject]
        return {"type": "ridge", "model": str(self.folders[subject]), "area": m.area, "target": m.target,
                "alpha": m.alpha, "num_voxels": m.num_voxels}  # fmt: skip

    def expects_vae(self) -> bool:
        return False

    def predict(self, subject: int, samples: dict[str, list]) -> dict[str, tuple]:
        model = self.models[subject]
        path = self.layout.area_betas(subject, model.area, SPLIT)
        betas = load_area_betas(path, model.area, len(sample_index(self.layout, subject, SPLIT)))
        if betas.shape[1] != model.num_voxels:
            raise BadInputError(path, f"has {betas.shape[1]} voxels; the model ({self.folders[subject]}) was "
                                      f"fitted on {model.num_voxels}")  # fmt: skip
        return {kind: (model.predict(betas, kind_samples), None) for kind, kind_samples in samples.items()}


def _line(subject: int, kind: str, folder: Path, n: int, note: str = "") -> str:
    return f"{subject_name(subject)} {kind}: {n} samples -> {folder}{note}"


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    runtime.limit_threads()
    parser = build_parser()
    args = cli.parse_args(parser, argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    args.kinds = list(dict.fromkeys(args.kinds))
    layout = DatasetRoot(args.dataset_root)
    encoder = Vit3dEncoder(args, layout) if args.encoder == "vit3d" else RidgeEncoder(args, layout)
    subjects = args.subject if args.subject is not None else encoder.subjects
    others = [s for s in subjects if s not in encoder.subjects]
    if others:
        trained = ", ".join(subject_name(s) for s in encoder.subjects)
        raise BadInputError(encoder.source, f"the model was trained on {trained}, not on "
                                            f"{', '.join(subject_name(s) for s in others)}; choose --subject among "
                                            "its subjects")  # fmt: skip
    if isinstance(encoder, RidgeEncoder):
        encoder.load(subjects)
    out = args.out if args.out is not None else layout.predictions(args.run or encoder.default_run)
    require_writable(out, "--out folder")

    files = [CLIP_FILE, INDEX_FILE, *([VAE_FILE] if encoder.expects_vae() else [])]
    stages, todo = {}, set()
    for subject in subjects:
        for kind in args.kinds:
            stage = StageRun(out / folder_name(subject, kind), settings=encoder.settings(subject, kind),
                             inputs=encoder.inputs(subject), folder=True)  # fmt: skip
            stages[subject, kind] = stage
            if stage.needed(args.overwrite, all((stage.output / f).is_file() for f in files)):
                todo.add((subject, kind))

    for subject in subjects:
        index: SampleIndex = sample_index(layout, subject, SPLIT)
        samples = {kind: prediction_samples(index, kind) for kind in args.kinds if (subject, kind) in todo}
        predicted = encoder.predict(subject, samples) if samples else {}
        for kind in args.kinds:
            stage = stages[subject, kind]
            if kind not in predicted:
                print(_line(subject, kind, stage.output, len(prediction_samples(index, kind)), " (current: kept)"))
                continue
            clip, vae = predicted[kind]
            with staged_folder(stage.output) as staging:
                write_predictions(staging, samples[kind], index, kind, clip, vae, encoder.info(subject))
                stage.finish(args, into=staging, dataset_root=layout.root)
            print(_line(subject, kind, stage.output, len(clip)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
