"""The one driver of the per-image model stages: shared flags, selection, the rerun rule, the batch loop, the merge.

A stage script gives an `ImageStage` (what it writes, its own settings, its model files, and a
`load` hook returning the per-batch `step` and the final `write`) and calls `run_image_stage`.
Order of the checks, all before a model is loaded: `--subject` against the prepared subjects
(`cli.parse_args`), the output locations writable, the model folders of the right class, the
rerun rule (`io.StageRun`: skip a current output, refuse one made differently), every selected PNG
present.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llava_brain import cli
from llava_brain.errors import BadInputError
from llava_brain.image_stage.batches import Batch, plan_batches, run_batches
from llava_brain.image_stage.models import quiet_transformers
from llava_brain.image_stage.parts import ArrayParts, RecordParts, open_work_folder, remove_parts
from llava_brain.io import StageRun, remove_stale_temps, require_writable
from llava_brain.layout import DatasetRoot
from llava_brain.subjects import ALL, images_of, resolve_prepared

log = logging.getLogger("llava_brain.image_stage")


# Command line --------------------------------------------------------------------------------


def add_selection_arguments(p: argparse.ArgumentParser, verb: str) -> None:
    """--dataset-root and which images (--subject ... | --all-images), shared by every image stage."""
    cli.add_dataset_root(p, "prepared dataset root (holds nsd/images/ and nsd/fmris/)")
    which = p.add_mutually_exclusive_group()
    # No default: with --all-images there is no subject; without either flag it means 'all' (run_image_stage).
    cli.add_subject(
        p, default=None, group=which, help=f"{verb} the images of these prepared subjects, or 'all' (the default)"
    )
    which.add_argument("--all-images", action="store_true", help=f"{verb} every PNG in <root>/nsd/images/")


def add_run_arguments(p: argparse.ArgumentParser, *, batch_size: int, output: str) -> None:
    """Batching, loading, device, precision and rerun flags, shared by every image stage."""
    p.add_argument("--batch-size", type=int, default=batch_size, help="images per batch (also the unit of resuming)")
    cli.add_num_workers(p, default=2, what="background processes decoding PNGs")
    cli.add_device(p)
    cli.add_precision(p, help="precision the model is cast to (fp16/bf16 on GPUs; default fp32)")
    cli.add_overwrite(p, f"recompute {output} even if it is current or was made with other settings")
    cli.add_quiet(p)


# Selection -----------------------------------------------------------------------------------


def select_images(layout: DatasetRoot, args: argparse.Namespace) -> list[int]:
    """Sorted nsdIds to process: the images of the `--subject`s (default: every prepared one), or every PNG.

    Sets `args.subject` to the resolved subject numbers (None with --all-images), as recorded in the settings.
    """
    if args.all_images:
        args.subject = None
        if not layout.images_dir.is_dir():
            raise BadInputError(layout.images_dir, "missing; run prepare_datasets/make_images.py first")
        ids = sorted(int(p.stem.rsplit("_", 1)[1]) for p in layout.images_dir.glob("nsd_image_*.png"))
        if not ids:
            raise BadInputError(layout.images_dir, "holds no nsd_image_*.png; run prepare_datasets/make_images.py")
        return ids
    if args.subject is None:
        args.subject = resolve_prepared(layout, [ALL])
    return images_of(layout, args.subject)


def require_images(layout: DatasetRoot, nsd_ids: list[int]) -> list[Path]:
    """PNG paths of the selected images; a missing one is a one-line error naming it."""
    paths = [layout.image(i) for i in nsd_ids]
    for path in paths:
        if not path.is_file():
            raise BadInputError(path, "missing; expected the NSD image PNG written by prepare_datasets/make_images.py")
    return paths


def selection_settings(args: argparse.Namespace, nsd_ids: list[int]) -> dict[str, Any]:
    """Which images, as settings: the subjects (None = --all-images) and the nsdIds' count and hash."""
    digest = hashlib.sha256(json.dumps(nsd_ids).encode()).hexdigest()
    return {"subject": args.subject, "num_images": len(nsd_ids), "images_sha256": digest}


# The stage -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """What a stage's `load` hook gets: arguments, dataset root, where and in what precision the model runs."""

    args: argparse.Namespace
    layout: DatasetRoot
    device: torch.device
    dtype: torch.dtype
    settings: dict[str, Any]  # the resolved settings of this run; outputs describe themselves with them


@dataclass
class Model:
    """A loaded stage: what runs per batch and what writes the outputs once every batch is stored."""

    # One batch (inference mode) -> its records, one {"nsd_id": ..., ...} per real image (RecordParts), or,
    # with `kinds`, {kind: rows of the real images} (ArrayParts). Outputs beyond len(batch.nsd_ids) are padding.
    step: Callable[[Batch], list[dict] | dict[str, np.ndarray]]
    # (stored parts, sorted nsdIds) -> writes every output file (atomically); returns the closing log line.
    write: Callable[[Any, list[int]], str]
    transform: Callable | None = None  # picklable preprocessing run in the loader workers
    kinds: dict[str, tuple[tuple[int, ...], Any]] | None = None  # array kind -> (row shape, dtype)


@dataclass(frozen=True)
class ImageStage:
    """One per-image model stage: its outputs and its model-specific hooks; `run_image_stage` does the rest."""

    what: str  # what it makes, for log lines: "captions"
    description: str  # progress bar label: "BLIP-2 captions"
    # Output files or folders -> the file whose presence marks each complete. The first holds the work folder.
    outputs: Callable[[DatasetRoot, argparse.Namespace], dict[Path, Path]]
    settings: Callable[[argparse.Namespace], dict[str, Any]]  # the stage's own settings that shape the outputs
    # Checks the model folders (one line if of the wrong class) and lists their files, fingerprinted as inputs.
    inputs: Callable[[argparse.Namespace], dict[str, list[Path]]]
    load: Callable[[Context], Model]


def _remove_temps(output: Path, manifest: Path) -> None:
    """Temporary files a write killed by SIGKILL left in an output's place (this run is their only writer)."""
    if output.is_dir():
        for tmp in output.glob(".*.tmp*"):
            tmp.unlink(missing_ok=True)
    else:
        remove_stale_temps(output)
    remove_stale_temps(manifest)


def run_image_stage(stage: ImageStage, args: argparse.Namespace) -> int:
    """Run `stage` over the selected images: skip if current, resume stored batches, merge and write; exit code."""
    from llava_brain.train import make_accelerator
    from llava_brain.train.accel import DTYPES

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quiet:
        quiet_transformers()
    layout = DatasetRoot(args.dataset_root)
    nsd_ids = select_images(layout, args)
    outputs = stage.outputs(layout, args)
    for marker in outputs.values():
        require_writable(marker, "--dataset-root")
    settings = {**stage.settings(args), **selection_settings(args, nsd_ids), "batch_size": args.batch_size,
                "precision": args.precision}  # fmt: skip
    inputs = stage.inputs(args)
    runs = [StageRun(output, settings=settings, inputs=inputs) for output in outputs]
    # Every output is checked (no short cut): one made differently refuses the run.
    markers = list(outputs.values())
    needed = [run.needed(args.overwrite, complete=marker.is_file()) for run, marker in zip(runs, markers, strict=True)]
    primary = next(iter(outputs))
    if not any(needed):
        remove_parts(primary)  # leftovers of a killed --overwrite run
        log.info("%s of %d images already complete in %s; nothing to do", stage.what, len(nsd_ids), primary)
        return 0
    paths = require_images(layout, nsd_ids)
    if args.overwrite:
        # The old outputs are being replaced: if this run is killed, a plain rerun resumes its stored
        # batches instead of finding the old provenance and refusing the new settings.
        for run in runs:
            run.begin()

    accelerator = make_accelerator(args.device, args.precision, mixed=False)
    model = stage.load(Context(args, layout, accelerator.device, DTYPES[args.precision], runs[0].settings))
    shapes = {kind: [list(shape), np.dtype(dtype).name] for kind, (shape, dtype) in (model.kinds or {}).items()}
    work = open_work_folder(primary, {"settings": runs[0].settings, "inputs": runs[0].inputs, "kinds": shapes},
                            accelerator, args.overwrite)  # fmt: skip
    rank, world = accelerator.process_index, accelerator.num_processes
    parts = RecordParts(work, rank) if model.kinds is None else ArrayParts(work, rank, model.kinds)
    plan = plan_batches(nsd_ids, paths, args.batch_size, parts.done(), rank, world)
    if accelerator.is_main_process:
        log.info("%d images, %d already done; %d processes", len(nsd_ids), plan.finished_images, world)

    @torch.inference_mode()
    def step(batch: Batch) -> None:
        result = model.step(batch)
        if model.kinds is None:
            parts.add(result)
        else:
            parts.add(batch.nsd_ids, result)

    run_batches(plan, step, model.transform, args.num_workers, stage.description,
                progress=not args.quiet and accelerator.is_main_process)  # fmt: skip
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return 0
    stored = parts.done()
    if stored != set(nsd_ids):
        raise RuntimeError(f"{stage.what}: stored {len(stored)} images, expected {len(nsd_ids)}")
    for run in runs:
        # From here the outputs change: an old provenance must not vouch for them if this run dies.
        run.begin()
        _remove_temps(run.output, run.manifest)
    summary = model.write(parts, nsd_ids)
    for run in runs:
        run.finish(args)  # last: its presence marks the output complete
    remove_parts(primary)
    log.info("%s", summary)
    return 0
