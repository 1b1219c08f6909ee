"""What the per-image model stages share (captions, detections, embeddings): selection, loading,
sharding across processes, resumable storage and a deterministic merge.

A stage runs a model over NSD images in **fixed batches**: the selected nsdIds, sorted, cut into
batches of `--batch-size`. Batches are the unit of everything:

- sharding: under `accelerate launch`, process r of w takes the unfinished batches r, r + w, ...;
- storage: each process appends finished batches to its own part files in a work folder beside
  the output (`.<output>.parts/`), records for JSON outputs and rows for arrays, so a kill loses
  at most the batch in flight and a rerun (with any number of processes) skips what is stored;
- determinism: a batch always holds the same images whatever the number of processes or
  restarts, so results (even batched floating point and seeded sampling) are identical; the merge
  orders by nsdId and writes the output atomically, then removes the work folder.

Images are decoded (and preprocessed, if the stage gives a picklable `transform`) by DataLoader
workers in the background, so the model does not wait for PNG decoding.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llava_brain.errors import BadInputError
from llava_brain.io import JsonlStore, NpyRows, atomic_path, read_json, run_manifest, write_json
from llava_brain.layout import DatasetRoot

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# Command line --------------------------------------------------------------------------------


def add_selection_arguments(p, verb: str) -> None:
    """--dataset-root and which images (--subject ... | --all-images), shared by every image stage."""
    p.add_argument("--dataset-root", type=Path, required=True, help="prepared dataset root (holds nsd/images/)")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--subject",
        nargs="+",
        default=["all"],
        help=f"{verb} the images of these prepared subjects, or 'all' (default)",
    )
    which.add_argument("--all-images", action="store_true", help=f"{verb} every PNG in <root>/nsd/images/")


def add_run_arguments(p, *, batch_size: int, output: str) -> None:
    """Batching, loading, device, precision and rerun flags, shared by every image stage."""
    p.add_argument("--batch-size", type=int, default=batch_size, help="images per batch (also the unit of resuming)")
    p.add_argument("--num-workers", type=int, default=2, help="background processes decoding PNGs (0 = inline)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where the model runs")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="model precision (fp16/bf16 on GPU)")
    p.add_argument("--overwrite", action="store_true", help=f"recompute even if {output} exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def quiet_transformers() -> None:
    """No "Loading weights" bars from from_pretrained (so --quiet output stays one line per event)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


# Selection -----------------------------------------------------------------------------------


def select_images(layout: DatasetRoot, subjects: Sequence[str] | None, all_pngs: bool) -> list[int]:
    """Sorted nsdIds to process: the images of prepared subjects (`nsd_fmri2image.json`), or every PNG.

    subjects: ["all"] = every prepared subject under `nsd/fmris/`; or subject numbers.
    """
    if all_pngs:
        if not layout.images_dir.is_dir():
            raise BadInputError(layout.images_dir, "missing; run prepare_datasets/make_images.py first")
        ids = sorted(int(p.stem.rsplit("_", 1)[1]) for p in layout.images_dir.glob("nsd_image_*.png"))
        if not ids:
            raise BadInputError(layout.images_dir, "holds no nsd_image_*.png; run prepare_datasets/make_images.py")
        return ids
    fmris = layout.nsd / "fmris"
    if not subjects or [s.lower() for s in subjects] == ["all"]:
        found = sorted(int(p.name[4:]) for p in fmris.glob("subj[0-9][0-9]") if p.is_dir()) if fmris.is_dir() else []
        if not found:
            raise BadInputError(fmris, "no prepared subject; run make_subjmri.py first or pass --all-images")
        numbers = found
    else:
        try:
            numbers = [int(s) for s in subjects]
        except ValueError:
            raise BadInputError(fmris, f"--subject takes numbers 1-8 or 'all'; got {list(subjects)}") from None
    ids: set[int] = set()
    for subject in numbers:
        mapping = read_json(layout.fmri2image(subject), "nsd_fmri2image.json of a prepared subject (make_subjmri.py)")
        ids.update(int(i) for key in ("train", "val") for i in mapping.get(key, []))
    return sorted(ids)


def require_images(layout: DatasetRoot, nsd_ids: Sequence[int]) -> list[Path]:
    """PNG paths of the selected images; a missing one is a one-line error naming it."""
    paths = [layout.image(i) for i in nsd_ids]
    for path in paths:
        if not path.is_file():
            raise BadInputError(path, "missing; expected the NSD image PNG written by prepare_datasets/make_images.py")
    return paths


def check_model_folder(path: str, model_types: Sequence[str], what: str, subfolder: str | None = None) -> None:
    """A local model folder must hold a config of one of `model_types`; hub ids pass through unchecked.

    Catches "the wrong model folder" before the model is loaded, with one line naming the file.
    """
    folder = Path(path)
    if not folder.exists():
        if "/" in path and not path.startswith((".", "/")) and path.count("/") == 1:
            return  # a hub id such as "Salesforce/blip2-opt-2.7b": from_pretrained resolves it
        raise BadInputError(folder, f"missing; expected a local folder or hub id of {what}")
    if subfolder:
        folder = folder / subfolder
    config = folder / "config.json"
    if not config.is_file():
        raise BadInputError(config, f"missing; expected the config of {what} (a save_pretrained folder)")
    data = read_json(config, f"the config of {what}")
    found = data.get("model_type") or data.get("_class_name")
    if found not in model_types:
        raise BadInputError(config, f"is a {found!r} model; expected {what} ({' or '.join(model_types)})")


@contextmanager
def loading_model(name: str | Path, what: str) -> Iterator[None]:
    """Turn a model that cannot be loaded into one line naming it (exit 2), not a traceback.

    from_pretrained raises OSError (or its subclasses) for a hub id that is neither cached nor reachable
    (these machines are offline; HF_HUB_OFFLINE=1 makes that immediate), and for unreadable files.
    """
    try:
        with warnings.catch_warnings():
            # diffusers passes huggingface_hub a deprecated argument on every hub lookup: noise, not news.
            warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated")
            yield
    except OSError as err:
        lines = str(err).strip().splitlines()
        reason = lines[0] if lines else type(err).__name__
        offline = " (HF_HUB_OFFLINE is set: pass a local folder)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise BadInputError(Path(name), f"could not be loaded as {what}{offline}: {reason}") from None


# Background image loading --------------------------------------------------------------------


@dataclass
class Batch:
    index: int  # position in the fixed batch list
    nsd_ids: list[int]
    inputs: Any  # what `transform` returned for the batch's images (default: list of PIL images)


class _BatchDataset(torch.utils.data.Dataset):
    def __init__(self, batches: list[tuple[int, list[int], list[Path]]], transform: Callable | None, pad_to: int):
        self.batches, self.transform, self.pad_to = batches, transform, pad_to

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        from PIL import Image

        index, ids, paths = self.batches[i]
        images = []
        for path in paths:
            try:
                with Image.open(path) as im:
                    images.append(im.convert("RGB"))
            except Exception as err:  # PIL raises several types for corrupt files
                # Errors cross the worker boundary as plain data: BadInputError needs two arguments.
                return index, ids, None, (str(path), f"unreadable PNG ({type(err).__name__}: {err})")
        # A short last batch is padded with copies of its last image: CPU kernels can pick other
        # algorithms for other batch shapes (and thread counts), and the results must not depend on
        # which process got the short batch. Outputs beyond len(ids) are discarded by the stage.
        images += [images[-1]] * (self.pad_to - len(images))
        inputs = self.transform(images) if self.transform else images
        return index, ids, inputs, None


def iterate_batches(
    batches: list[tuple[int, list[int], list[Path]]],
    transform: Callable | None = None,
    num_workers: int = 2,
    pad_to: int = 0,
) -> Iterator[Batch]:
    """Yield the given batches in order, decoded (and transformed) by `num_workers` background workers.

    Each batch's inputs hold max(len(batch), pad_to) images (see _BatchDataset); `Batch.nsd_ids` the real ones.
    """
    loader = torch.utils.data.DataLoader(
        _BatchDataset(batches, transform, pad_to),
        batch_size=None,  # items are already batches
        num_workers=num_workers,
        prefetch_factor=2 if num_workers else None,
        collate_fn=lambda item: item,
    )
    for index, ids, inputs, error in loader:
        if error is not None:
            raise BadInputError(*error)
        yield Batch(index, ids, inputs)


# Resumable per-process storage ---------------------------------------------------------------


class RecordParts:
    """JSON records per image ({"nsd_id": int, ...}) in per-process JSONL part files."""

    def __init__(self, folder: Path, rank: int):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._store = JsonlStore(folder / f"part-{rank:03d}.jsonl")

    def done(self) -> set[int]:
        ids: set[int] = set()
        for part in sorted(self.folder.glob("part-*.jsonl")):
            ids.update(int(r["nsd_id"]) for r in JsonlStore(part))
        return ids

    def add(self, records: list[dict]) -> None:
        for record in records:
            self._store.append(record)

    def merged(self) -> dict[int, dict]:
        out: dict[int, dict] = {}
        for part in sorted(self.folder.glob("part-*.jsonl")):
            for record in JsonlStore(part):
                out.setdefault(int(record["nsd_id"]), record)
        return dict(sorted(out.items()))


class ArrayParts:
    """Fixed-shape array rows per image in per-process part files: `part-R.<kind>.bin` + `part-R.ids.jsonl`.

    Rows of a batch are written (and flushed) before its ids, so on reopen any rows beyond the
    recorded ids — a batch cut short by a kill — are truncated away and recomputed.
    """

    def __init__(self, folder: Path, rank: int, kinds: dict[str, tuple[tuple[int, ...], np.dtype]]):
        self.folder, self.kinds = folder, {k: (tuple(s), np.dtype(d)) for k, (s, d) in kinds.items()}
        folder.mkdir(parents=True, exist_ok=True)
        self._ids = JsonlStore(folder / f"part-{rank:03d}.ids.jsonl")
        self._bins = {kind: folder / f"part-{rank:03d}.{kind}.bin" for kind in self.kinds}
        for kind, path in self._bins.items():
            rows = len(self._ids)
            size = rows * self._row_bytes(kind)
            if path.exists() and path.stat().st_size > size:
                os.truncate(path, size)
            elif rows and (not path.exists() or path.stat().st_size < size):
                raise BadInputError(path, f"holds fewer rows than {self._ids.path.name} records; remove the folder")

    def _row_bytes(self, kind: str) -> int:
        shape, dtype = self.kinds[kind]
        return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize

    def done(self) -> set[int]:
        ids: set[int] = set()
        for part in sorted(self.folder.glob("part-*.ids.jsonl")):
            ids.update(int(r) for r in JsonlStore(part))
        return ids

    def add(self, nsd_ids: list[int], arrays: dict[str, np.ndarray]) -> None:
        for kind, path in self._bins.items():
            shape, dtype = self.kinds[kind]
            block = np.ascontiguousarray(arrays[kind], dtype=dtype)
            if block.shape != (len(nsd_ids), *shape):
                raise ValueError(f"{kind}: expected rows of shape {shape}, got {block.shape}")
            with open(path, "ab") as f:
                f.write(block.tobytes())
        for i in nsd_ids:
            self._ids.append(int(i))

    def write_merged(self, kind: str, path: Path, block_rows: int = 256) -> list[int]:
        """Write all stored rows of `kind`, ordered by nsdId, to the .npy `path` (atomically); return the ids.

        Streams through memory-mapped part files, so outputs larger than memory (CLIP tokens of
        37,000 images: ~19 GB) are fine.
        """
        shape, dtype = self.kinds[kind]
        where: dict[int, tuple[np.ndarray, int]] = {}
        for ids_path in sorted(self.folder.glob("part-*.ids.jsonl")):
            ids = [int(r) for r in JsonlStore(ids_path)]
            bin_path = ids_path.with_name(ids_path.name.replace(".ids.jsonl", f".{kind}.bin"))
            if not ids:
                continue
            rows = np.memmap(bin_path, dtype=dtype, mode="r", shape=(len(ids), *shape))
            for r, i in enumerate(ids):
                where.setdefault(i, (rows, r))
        order = sorted(where)
        with atomic_path(path) as tmp, NpyRows(tmp, (len(order), *shape), dtype) as out:
            for start in range(0, len(order), block_rows):
                chunk = order[start : start + block_rows]
                out.write(start, np.stack([where[i][0][where[i][1]] for i in chunk]))
        return order


# The loop ------------------------------------------------------------------------------------


@dataclass
class Plan:
    """The batches of one stage run and this process's share of the unfinished ones."""

    batches: list[tuple[int, list[int], list[Path]]]  # all fixed batches: (index, nsdIds, paths)
    mine: list[tuple[int, list[int], list[Path]]]
    finished_images: int
    batch_size: int


def plan_batches(nsd_ids: list[int], paths: list[Path], batch_size: int, done: set[int], rank: int, world: int) -> Plan:
    batches = [
        (b, nsd_ids[i : i + batch_size], paths[i : i + batch_size])
        for b, i in enumerate(range(0, len(nsd_ids), batch_size))
    ]
    todo = [batch for batch in batches if not set(batch[1]) <= done]
    return Plan(batches, todo[rank::world], sum(i in done for i in nsd_ids), batch_size)


def batch_seed(seed: int, batch_index: int) -> int:
    """Seed of one batch's sampling: depends on the batch, not on the process or the restart."""
    return int(np.random.SeedSequence([seed, batch_index]).generate_state(1)[0])


def parts_folder(output: Path) -> Path:
    return output.parent / f".{output.name}.parts"


def open_work_folder(output: Path, settings: dict, accelerator, overwrite: bool) -> Path:
    """The work folder of `output`, holding only parts made with these `settings`.

    Part files of a run with other settings (a killed run, then a rerun with another batch size,
    model or image size) must never be merged into this output: the main process discards such a
    folder, then records the settings in it before any process stores a batch.
    """
    work = parts_folder(output)
    marker = work / "settings.json"
    if accelerator.is_main_process:
        current = json.loads(json.dumps(settings, default=str))
        stale = work.exists() and (not marker.is_file() or read_json(marker, "a work-folder settings file") != current)
        if overwrite or stale:
            if stale and not overwrite:
                log.warning("discarding %s: its parts were made with other settings", work)
            shutil.rmtree(work, ignore_errors=True)
        if not marker.is_file():
            work.mkdir(parents=True, exist_ok=True)
            write_json(marker, current)
    accelerator.wait_for_everyone()
    return work


def remove_parts(output: Path) -> None:
    shutil.rmtree(parts_folder(output), ignore_errors=True)


def already_done(output: Path, settings: dict, nsd_ids: list[int], stored_ids: Callable[[Path], Any],
                 overwrite: bool) -> bool:  # fmt: skip
    """True if `output` (a JSON file whose info holds "settings") already covers `nsd_ids` with `settings`.

    An output made with other settings or for other images stops the stage unless --overwrite is
    given; `stored_ids(output)` lists the nsdIds it holds. A finished output also clears the work
    folder a killed --overwrite run may have left.
    """
    same = settings_match(output, settings)
    if same is None or overwrite:
        return False
    if not same or sorted(stored_ids(output)) != nsd_ids:
        raise BadInputError(output, "was written with other settings or images; pass --overwrite to recompute")
    remove_parts(output)
    return True


def provenance(args) -> dict:
    """The run manifest (arguments, versions, git commit) as plain JSON, for an output's "info"."""
    return json.loads(json.dumps(run_manifest(args), default=str))


def settings_match(path: Path, settings: dict) -> bool | None:
    """None if `path` (a JSON output whose "info" holds "settings") is absent, else whether settings match."""
    if not path.is_file():
        return None
    info = read_json(path, "a stage output").get("info", {})
    return json.loads(json.dumps(info.get("settings"))) == json.loads(json.dumps(settings))


def make_accelerator(device: str):
    """An `accelerate.Accelerator` for this process: `--device cpu` forces the CPU (also under
    `accelerate launch --multi_gpu` with gloo, as on CPU test machines); `auto` takes CUDA when present."""
    from accelerate import Accelerator

    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda; got {device!r}")
    return Accelerator(cpu=device == "cpu" or (device == "auto" and not torch.cuda.is_available()))


def run_batches(plan: Plan, step: Callable[[Batch], None], transform: Callable | None, num_workers: int,
                desc: str, progress: bool) -> None:  # fmt: skip
    """Feed this process's batches, decoded in the background, to `step` (which stores its results)."""
    from tqdm import tqdm

    images = sum(len(b[1]) for b in plan.mine)
    with tqdm(total=images, desc=desc, unit="image", disable=not progress) as bar:
        for batch in iterate_batches(plan.mine, transform, num_workers, pad_to=plan.batch_size):
            step(batch)
            bar.update(len(batch.nsd_ids))
