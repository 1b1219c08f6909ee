"""Prediction files: what an encoder predicted for one subject's test samples, the one format evaluators read.

One folder per (encoder run, subject, kind), `DatasetRoot.predictions(run, subject, kind)`:

    clip.npy    (samples, D) float32         predicted CLIP image embeddings
    vae.npy     (samples, C, H, W) float32   predicted VAE latents (scaled, as nsd/vae_embeds), if the
                                             encoder has a VAE head
    index.json  {"subject": 1, "split": "te", "kind": "avg", "encoder": {...},
                 "samples": [{"sample": "subj01/te/3+9+12", "nsd_id": 2951, "rows": [3, 9, 12],
                              "repeats": [0, 1, 2]}, ...]}
    run.json    provenance (tools/evaluate/fmri2embeds.py)

Row i of every array is `samples[i]`. Kinds: "avg" = every presentation of an image averaged (one row per
test image, ascending nsdId; NSD's usual protocol), "single" = only the first presentation of each image
(repeat 0; ascending nsdId). A sample's name is its reference (`llava_brain.subjects.Sample`), so generated
texts and reconstructions are keyed the same way; `Sample.key` is its file-name form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llava_brain.errors import BadInputError, require_file
from llava_brain.io import load_npy, read_json, save_npy, write_json
from llava_brain.layout import subject_name
from llava_brain.subjects import Sample, SampleIndex, parse_sample_reference

KINDS = ("avg", "single")  # repeat-averaged, first presentation only
CLIP_FILE, VAE_FILE, INDEX_FILE = "clip.npy", "vae.npy", "index.json"


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


def prediction_samples(index: SampleIndex, kind: str) -> list[Sample]:
    """The samples of one subject's split for `kind`, in ascending nsdId (the order of every prediction file).

    avg: one sample per image holding all its rows (in row order); single: the image's first presentation
    (repeat 0, or its earliest row when no repeat 0 was recorded, e.g. a subject that stopped early).
    """
    check_kind(kind)
    samples = []
    for nsd_id in np.unique(index.nsd_ids):
        rows = np.flatnonzero(index.nsd_ids == nsd_id)
        if kind == "single":
            first = rows[index.repeats[rows] == 0]
            rows = first[:1] if len(first) else rows[:1]
        samples.append(Sample(index.subject, index.split, int(nsd_id), tuple(int(r) for r in rows), kind == "avg"))
    return samples


@dataclass
class Predictions:
    """One prediction folder, loaded and checked (arrays memory-mapped)."""

    folder: Path
    subject: int
    split: str
    kind: str
    samples: list[str]  # sample references, row order
    nsd_ids: np.ndarray  # (samples,) int64
    clip: np.ndarray  # (samples, D)
    vae: np.ndarray | None = None  # (samples, C, H, W)
    encoder: dict = field(default_factory=dict)
    rows: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def keys(self) -> list[str]:
        """File-name form of each sample (`Sample.key`): subj01_te_nsd002951 (avg) or subj01_te_000012 (single)."""
        return [
            Sample(self.subject, self.split, int(n), tuple(r), self.kind == "avg").key
            for n, r in zip(self.nsd_ids, self.rows, strict=True)
        ]

    @classmethod
    def load(cls, folder: str | Path) -> Predictions:
        folder = Path(folder)
        index_path = require_file(folder / INDEX_FILE, "a prediction folder's index.json (fmri2embeds.py)")
        index = read_json(index_path, "a prediction index: subject, split, kind and a 'samples' list")
        if not isinstance(index, dict) or not isinstance(index.get("samples"), list) or not index["samples"]:
            raise BadInputError(index_path, "expected an object with a non-empty 'samples' list")
        kind = index.get("kind")
        if kind not in KINDS:
            raise BadInputError(index_path, f"'kind' must be one of {KINDS}, found {kind!r}")
        try:
            samples = [str(s["sample"]) for s in index["samples"]]
            nsd_ids = np.asarray([int(s["nsd_id"]) for s in index["samples"]], dtype=np.int64)
            rows = [parse_sample_reference(s)[2] for s in samples]
        except (KeyError, TypeError, ValueError) as err:
            expected = f"every sample needs 'sample' (subjXX/te/row[+row]) and 'nsd_id': {err}"
            raise BadInputError(index_path, expected) from None
        clip = load_npy(require_file(folder / CLIP_FILE, "predicted CLIP embeddings"), "(samples, D)", mmap=True)
        if clip.ndim != 2 or len(clip) != len(samples):
            raise BadInputError(folder / CLIP_FILE, f"expected ({len(samples)}, D) rows as in {INDEX_FILE}; "
                                                    f"found {clip.shape}")  # fmt: skip
        vae = None
        if (folder / VAE_FILE).is_file():
            vae = load_npy(folder / VAE_FILE, "(samples, C, H, W) predicted VAE latents", mmap=True)
            if vae.ndim != 4 or len(vae) != len(samples):
                raise BadInputError(folder / VAE_FILE, f"expected ({len(samples)}, C, H, W) rows as in "
                                                       f"{INDEX_FILE}; found {vae.shape}")  # fmt: skip
        return cls(folder, int(index["subject"]), str(index["split"]), kind, samples, nsd_ids, clip, vae,
                   dict(index.get("encoder", {})), rows)  # fmt: skip


def write_predictions(folder: str | Path, samples: list[Sample], index: SampleIndex, kind: str, clip: np.ndarray,
                      vae: np.ndarray | None, encoder: dict) -> None:  # fmt: skip
    """Write clip.npy, vae.npy and index.json into `folder` (a staging folder: the caller swaps it in whole)."""
    folder = Path(folder)
    if len(clip) != len(samples) or (vae is not None and len(vae) != len(samples)):
        raise ValueError("one prediction row per sample")
    save_npy(folder / CLIP_FILE, np.ascontiguousarray(clip, dtype=np.float32))
    if vae is not None:
        save_npy(folder / VAE_FILE, np.ascontiguousarray(vae, dtype=np.float32))
    entries = [
        {"sample": s.reference, "nsd_id": s.nsd_id, "rows": list(s.rows),
         "repeats": [int(index.repeats[r]) for r in s.rows]}
        for s in samples
    ]  # fmt: skip
    write_json(folder / INDEX_FILE, {"subject": index.subject, "split": index.split, "kind": check_kind(kind),
                                     "encoder": encoder, "samples": entries})  # fmt: skip


def prediction_folders(run: str | Path) -> dict[tuple[int, str], Path]:
    """{(subject, kind): folder} of a prediction run folder (`<run>/subjXX_<kind>/index.json`), sorted."""
    run = Path(run)
    found = {}
    for subject_dir in sorted(run.glob("subj[0-9][0-9]_*")):
        subject, _, kind = subject_dir.name.partition("_")
        if kind in KINDS and (subject_dir / INDEX_FILE).is_file():
            found[(int(subject[4:]), kind)] = subject_dir
    if not found:
        raise BadInputError(run, "expected prediction folders subjXX_avg/ or subjXX_single/ with index.json "
                                 "(tools/evaluate/fmri2embeds.py)")  # fmt: skip
    return found


def folder_name(subject: int, kind: str) -> str:
    return f"{subject_name(subject)}_{check_kind(kind)}"


__all__ = ["KINDS", "Predictions", "folder_name", "prediction_folders", "prediction_samples",
           "write_predictions"]  # fmt: skip
