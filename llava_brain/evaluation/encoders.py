"""What a trained encoder predicts for one subject's test samples: the ViT3D of pretrain_vit3d.py, and the
ridge model of tools/evaluate/ridge_baseline.py. Both take the sample list of
`llava_brain.evaluation.predictions.prediction_samples` (avg: all of an image's rows, single: its first
presentation) and return one row per sample, in that order; tools/evaluate/fmri2embeds.py writes the rows
as prediction files.

ViT3D: the test volumes are prepared exactly as the training run's own evaluation prepares them
(`llava_brain.data.fmri.load_test_sets`): every row resized to the model's grid by `resize_blocks`
(float16), an image's rows averaged in float32 and stored as float16, then the model in float32 under the
training precision's autocast, in batches of the run's --eval-batch-size. So the predictions, and every
retrieval number computed from them, equal that run's last metrics.json epoch.

Ridge: one area's test betas (float64), the mean of a sample's rows, times the weights fitted on
z-scored targets, then un-z-scored: `x @ W * y_std + y_mean` (float64), returned as float32.
ridge_baseline.py scores exactly these float32 rows, so its metrics equal eval_retrieval.py's.
A ridge subject folder `ridge_<area>[_<target>]_subjXX/` holds:
    model.safetensors  weights (voxels, D), y_mean (D,), y_std (D,), all float32
    metrics.json       subject, area, target, num_voxels, target_dim, alpha and the scores
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llava_brain.errors import BadInputError, require_file
from llava_brain.io import load_npy, read_json, require_finite, write_bytes
from llava_brain.layout import DatasetRoot
from llava_brain.subjects import Sample

RIDGE_MODEL, RIDGE_RESULT = "model.safetensors", "metrics.json"
VIT3D_FINAL, VIT3D_RUN = "final", "run.json"
DEFAULT_BATCH = 64  # pretrain_vit3d.py's --eval-batch-size default


def rows_mean(betas: np.ndarray, samples: Sequence[Sample]) -> np.ndarray:
    """(samples, voxels) float64: each sample's rows of `betas` averaged (a single trial: its one row)."""
    return np.stack([np.asarray(betas[list(s.rows)], dtype=np.float64).mean(axis=0) for s in samples])


# Ridge ------------------------------------------------------------------------------------------


def load_area_betas(path: Path, area: str, num_samples: int) -> np.ndarray:
    """(samples, voxels) float64 betas of one area, checked against the sample count and for NaN / inf."""
    betas = load_npy(path, f"(samples, voxels) betas of area {area!r}")
    if betas.ndim != 2 or len(betas) != num_samples:
        raise BadInputError(path, f"expected ({num_samples}, voxels) to match nsd_fmri2image.json; found {betas.shape}")
    return require_finite(betas, path, "the betas").astype(np.float64)


@dataclass
class RidgeModel:
    """One subject's fitted ridge map from an area's betas to a target (z-scored per dimension)."""

    subject: int
    area: str
    target: str  # "clip" or "pixels" (ridge_baseline.py --target)
    weights: np.ndarray  # (voxels, D) float32, fitted on z-scored targets
    y_mean: np.ndarray  # (D,) float32, training targets' mean
    y_std: np.ndarray  # (D,) float32, training targets' std (+1e-8)
    alpha: float | None = None
    folder: Path | None = None

    @property
    def num_voxels(self) -> int:
        return int(self.weights.shape[0])

    @property
    def dim(self) -> int:
        return int(self.weights.shape[1])

    def predict(self, betas: np.ndarray, samples: Sequence[Sample]) -> np.ndarray:
        """(samples, D) float32 predictions in the target's units from (rows, voxels) betas."""
        x = rows_mean(betas, samples)
        if x.shape[1] != self.num_voxels:
            raise ValueError(f"betas have {x.shape[1]} voxels, the model {self.num_voxels}")
        y = x @ self.weights.astype(np.float64) * self.y_std.astype(np.float64) + self.y_mean.astype(np.float64)
        return y.astype(np.float32)

    def save(self, folder: Path) -> Path:
        """Write model.safetensors into `folder` (atomically; normally the subject folder's staging folder)."""
        from safetensors.numpy import save

        tensors = {name: np.ascontiguousarray(getattr(self, name), dtype=np.float32)
                   for name in ("weights", "y_mean", "y_std")}  # fmt: skip
        metadata = {"subject": str(self.subject), "area": self.area, "target": self.target, "alpha": str(self.alpha)}
        write_bytes(Path(folder) / RIDGE_MODEL, save(tensors, metadata=metadata))
        return Path(folder) / RIDGE_MODEL

    @classmethod
    def load(cls, folder: str | Path) -> RidgeModel:
        folder = Path(folder)
        result_path = require_file(folder / RIDGE_RESULT, "a ridge_baseline.py subject folder's metrics.json")
        result = read_json(result_path, "ridge_baseline.py results (subject, area, target, num_voxels, target_dim)")
        try:
            subject, area, target = int(result["subject"]), str(result["area"]), str(result["target"])
            voxels, dim = int(result["num_voxels"]), int(result["target_dim"])
        except (KeyError, TypeError, ValueError):
            raise BadInputError(result_path, "expected ridge_baseline.py results with subject, area, target, "
                                             "num_voxels and target_dim") from None  # fmt: skip
        path = require_file(folder / RIDGE_MODEL, "the fitted ridge model; rerun ridge_baseline.py (it saves one)")
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise BadInputError(path, f"expected a safetensors file with weights, y_mean, y_std ({err})") from None
        shapes = {"weights": (voxels, dim), "y_mean": (dim,), "y_std": (dim,)}
        for name, shape in shapes.items():
            if name not in tensors or tensors[name].shape != shape:
                found = tensors[name].shape if name in tensors else "none"
                raise BadInputError(path, f"expected {name} of shape {shape} as metrics.json says; found {found}")
            require_finite(tensors[name], path, f"the ridge {name}")
        return cls(subject, area, target, tensors["weights"], tensors["y_mean"], tensors["y_std"],
                   result.get("alpha"), folder)  # fmt: skip


def ridge_folders(path: str | Path) -> dict[int, Path]:
    """{subject: folder} of a ridge model: one subject folder (holds metrics.json), or a run prefix
    `<out>/ridge_<area>[_<target>]` standing for its `<prefix>_subjXX` folders."""
    path = Path(path)
    if (path / RIDGE_RESULT).is_file():
        result = read_json(path / RIDGE_RESULT, "ridge_baseline.py results with a 'subject'")
        if not isinstance(result, dict) or not isinstance(result.get("subject"), int):
            raise BadInputError(path / RIDGE_RESULT, "expected ridge_baseline.py results with a 'subject' number")
        return {result["subject"]: path}
    found = {s: p for s, p in DatasetRoot.ridge_subject_runs(path).items() if (p / RIDGE_RESULT).is_file()}
    if not found:
        raise BadInputError(path, "expected a ridge_baseline.py subject folder (ridge_<area>_subjXX/ with "
                                  "metrics.json and model.safetensors) or its prefix <out>/ridge_<area>")  # fmt: skip
    return found


# ViT3D ------------------------------------------------------------------------------------------


@dataclass
class Vit3dRun:
    """A finished pretrain_vit3d.py output folder: final/ (the model) and run.json (what it was trained on)."""

    folder: Path
    subjects: list[int]
    area: str
    precision: str
    eval_batch_size: int

    @property
    def final(self) -> Path:
        return self.folder / VIT3D_FINAL

    @property
    def files(self) -> dict[str, Path]:
        """The files that define the model (what a prediction folder's provenance fingerprints)."""
        return {"model_weights": self.final / "model.safetensors", "model_config": self.final / "config.json",
                "model_run": self.folder / VIT3D_RUN}  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> Vit3dRun:
        """`path`: the --out folder of pretrain_vit3d.py, or its final/ folder."""
        path = Path(path)
        folder = path.parent if path.name == VIT3D_FINAL and not (path / VIT3D_FINAL).is_dir() else path
        what = "a finished pretrain_vit3d.py output folder (final/ and run.json)"
        require_file(folder / VIT3D_FINAL / "config.json", what)
        require_file(folder / VIT3D_FINAL / "model.safetensors", what)
        run = read_json(require_file(folder / VIT3D_RUN, what), "pretrain_vit3d.py's run.json")
        settings = run.get("settings") if isinstance(run, dict) else None
        arguments = run.get("arguments") if isinstance(run, dict) else None
        if not isinstance(settings, dict) or not isinstance(settings.get("subjects"), list):
            raise BadInputError(folder / VIT3D_RUN, "expected pretrain_vit3d.py's run.json with settings.subjects")
        arguments = arguments if isinstance(arguments, dict) else {}
        return cls(folder, [int(s) for s in settings["subjects"]], str(settings.get("area", "nsdgeneral")),
                   str(settings.get("precision", "fp32")),
                   int(arguments.get("eval_batch_size") or DEFAULT_BATCH))  # fmt: skip

    def model(self, device: str):
        from transformers.utils import logging as hf_logging

        from llava_brain.model.vit3d import ViT3D

        hf_logging.disable_progress_bar()
        return ViT3D.from_pretrained(self.final).to(device).eval()


def prepared_volumes(betas: np.ndarray, grid: Sequence[int], samples: Sequence[Sample], path: Path) -> np.ndarray:
    """(samples, *grid) float16: each sample's rows resized to `grid` and averaged, as `load_test_sets` does.

    Resizing is per volume (trilinear), so resizing the rows of several samples in one call gives each
    the same values as resizing them image by image; the average is float32 over the (rows, *grid) block.
    """
    from llava_brain.data.fmri import averaged_volumes

    return averaged_volumes(betas, grid, [s.rows for s in samples], path=path)


def predict_vit3d(model, betas: np.ndarray, samples: Sequence[Sample], *, path: Path, batch_size: int, device: str,
                  precision: str = "fp32",
                  progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray | None]:  # fmt: skip
    """(clip (samples, D) float32, vae (samples, C, H, W) float32 or None) of a ViT3D on (rows, X, Y, Z) betas.

    `path` names the betas in errors; `progress(n)` is called after each batch of n samples.
    """
    import torch

    from llava_brain.train.accel import DTYPES

    grid = tuple(model.config.grid)
    autocast = (
        contextlib.nullcontext
        if precision == "fp32"
        else lambda: torch.autocast(torch.device(device).type, dtype=DTYPES[precision])
    )
    clips, vaes = [], []
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            volumes = torch.from_numpy(prepared_volumes(betas, grid, batch, path)).to(device, torch.float32)
            with autocast():
                output = model(volumes)
            clips.append(output.clip.float().cpu().numpy())
            if output.vae is not None:
                vaes.append(output.vae.float().cpu().numpy())
            if progress is not None:
                progress(len(batch))
    return np.concatenate(clips), (np.concatenate(vaes) if vaes else None)
