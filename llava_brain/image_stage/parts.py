"""Resumable per-process storage of finished batches (JSON records or array rows) and its work folder.

Each process appends finished batches to its own part files in a work folder beside the output
(`.<output>.parts/`), so a kill loses at most the batch in flight and a rerun, with any number of
processes, skips what is stored. The folder records the settings its parts were made with
(`settings.json`): parts of a run with other settings are discarded, never merged.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from llava_brain.errors import BadInputError
from llava_brain.io import JsonlStore, NpyRows, atomic_path, read_json, write_json

log = logging.getLogger(__name__)
SETTINGS_FILE = "settings.json"


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

    def __init__(self, folder: Path, rank: int, kinds: dict[str, tuple[tuple[int, ...], Any]]):
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


def parts_folder(output: Path) -> Path:
    return output.parent / f".{output.name}.parts"


def open_work_folder(output: Path, settings: dict, accelerator, overwrite: bool) -> Path:
    """The work folder of `output`, holding only parts made with these `settings`.

    Part files of a run with other settings (a killed run, then a rerun with another batch size,
    model or image size) must never be merged into this output: the main process discards such a
    folder, then records the settings in it before any process stores a batch.
    """
    work = parts_folder(output)
    marker = work / SETTINGS_FILE
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
