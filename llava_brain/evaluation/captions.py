"""Caption metrics under BrainHub's protocol: generated texts, their references, the n-gram scores, the controls.

Inputs. A JSONL of generated texts, one object per line, `{"sample": "subj01/te/3+9+12", "task":
"brief_description", "text": "..."}` (a sample reference, `llava_brain.subjects`; every row of a sample must
show one image). References: the captions of that image in the dataset root, `--refs coco` = the human COCO
captions (`DatasetRoot.coco_captions`, prepare_datasets/make_coco_annotations.py), `--refs blip2` = the
BLIP-2 captions (`DatasetRoot.captions`, prepare_datasets/generate_captions.py); format
`llava_brain.annotations`.

N-gram metrics: pycocoevalcap exactly as BrainHub calls it. Every text (generated and reference) goes through
pycocoevalcap's PTBTokenizer (Stanford PTB tokenizer, Java: lowercased, punctuation dropped), then Bleu(4),
Meteor, Rouge, Cider (and Spice) score the samples of one subject together. BLEU and METEOR are corpus-level
scores, ROUGE-L the mean of per-sample scores, CIDEr the mean with document frequencies taken from the
scored set's references (so CIDEr depends on which samples are scored together: one subject's test set).
SPICE needs Stanford CoreNLP 3.6.0 beside pycocoevalcap's SPICE jar; without it SPICE is "unavailable" and
nothing is downloaded. CLIP-S, RefCLIP-S and the sentence similarity: `caption_models`.

Values are the metrics' own units ("raw": BLEU/METEOR/ROUGE-L/SPICE in 0..1, CIDEr 0..10, CLIP-S 0..2.5);
tables show them x `PAPER_SCALE` (100), the scale of the paper's Table 1.

Objects named (`object_hit`): the share of texts that name at least one object category annotated in the
image (`DatasetRoot.coco_instances`, COCO instances), a category counted when its name appears as a word or
with a plural "s" ("circle", "circles"). On mini-NSD it asks whether a caption names a shape that is there; on
real NSD it counts COCO category names only (a "man" is not a "person"), a lower bound of what a reader sees.

Shuffled control: each subject's texts scored against the references (and images) of other images, by a
seeded derangement of the subject's distinct images (`shuffled_images`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llava_brain.annotations import load_instances, read_captions
from llava_brain.errors import BadInputError
from llava_brain.evaluation.controls import derangement
from llava_brain.layout import DatasetRoot, subject_name
from llava_brain.subjects import SampleIndex, parse_sample_reference, prepared_subjects, sample_index

METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "spice", "clip_s", "refclip_s",
           "sentence_sim", "object_hit")  # fmt: skip
COCO_METRICS = METRICS[:8]  # pycocoevalcap, on PTB-tokenized text
CLIP_METRICS = ("clip_s", "refclip_s")
PAPER_SCALE = 100.0  # tables show every metric x100, as the paper's Table 1 (CLIP-S 65.49 = 0.6549)
UNAVAILABLE = "unavailable"
REFERENCE_SETS = ("coco", "blip2")
# SPICE parses with Stanford CoreNLP 3.6.0; pycocoevalcap's get_stanford_models() downloads it when missing,
# which is why this module checks for the jars itself and never constructs Spice() without them.
CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
CORENLP_URL = "http://nlp.stanford.edu/software/stanford-corenlp-full-2015-12-09.zip"


# Generated texts and references -------------------------------------------------------------------


@dataclass(frozen=True)
class Generated:
    """One line of a generated-texts JSONL, resolved to its subject and image."""

    line: int  # 1-based line number in the file
    sample: str
    task: str
    subject: int
    nsd_id: int
    text: str


def read_generated(path: str | Path, layout: DatasetRoot) -> list[Generated]:
    """Every line of a generated-texts JSONL, checked: JSON object with a sample reference of a prepared subject
    whose rows show one image, a task, a non-empty text; no sample twice for one task; at least one line."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(path, 'missing; expected a JSONL of {"sample", "task", "text"} lines')
    indexes: dict[tuple[int, str], SampleIndex] = {}
    prepared = set(prepared_subjects(layout))
    first_line: dict[tuple[str, str], int] = {}
    out = []
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"line {number}"
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as err:
                raise BadInputError(path, f"{where}: not a JSON object ({err})") from None
            if not isinstance(record, dict):
                raise BadInputError(path, f'{where}: expected an object {{"sample", "task", "text"}}')
            for key in ("sample", "task", "text"):
                if not isinstance(record.get(key), str) or not record[key].strip():
                    found = f"{record.get(key)!r:.60}"
                    raise BadInputError(path, f"{where}: needs a non-empty string {key!r}; found {found}")
            try:
                subject, split, rows = parse_sample_reference(record["sample"])
            except ValueError as err:
                raise BadInputError(path, f"{where}: {err}") from None
            if subject not in prepared:
                raise BadInputError(path, f"{where}: sample {record['sample']}: {subject_name(subject)} is not a "
                                          f"prepared subject of {layout.fmris_dir}")  # fmt: skip
            if (subject, split) not in indexes:
                indexes[subject, split] = sample_index(layout, subject, split)
            ids = indexes[subject, split].nsd_ids
            if max(rows) >= len(ids):
                raise BadInputError(path, f"{where}: sample {record['sample']}: row {max(rows)} is beyond the "
                                          f"{len(ids)} samples of {subject_name(subject)}/{split}")  # fmt: skip
            images = sorted({int(ids[r]) for r in rows})
            if len(images) != 1:
                raise BadInputError(path, f"{where}: sample {record['sample']}: its rows show {len(images)} images "
                                          f"(nsdIds {images[:4]}); a sample is one image")  # fmt: skip
            key = (record["task"], record["sample"])
            if key in first_line:
                raise BadInputError(path, f"{where}: sample {record['sample']} appears twice for task "
                                          f"{record['task']!r} (first on line {first_line[key]})")  # fmt: skip
            first_line[key] = number
            out.append(Generated(number, record["sample"], record["task"], subject, images[0], record["text"]))
    if not out:
        raise BadInputError(path, 'empty; expected one {"sample", "task", "text"} JSON object per line')
    return out


def by_task(entries: Sequence[Generated], tasks: Sequence[str] | None, path: Path) -> dict[str, list[Generated]]:
    """{task: its lines, file order}, tasks in order of first appearance (or as requested)."""
    found: dict[str, list[Generated]] = {}
    for entry in entries:
        found.setdefault(entry.task, []).append(entry)
    if not tasks:
        return found
    missing = [t for t in tasks if t not in found]
    if missing:
        raise BadInputError(path, f"has no lines for task {missing[0]!r} (tasks found: {', '.join(found)})")
    return {t: found[t] for t in dict.fromkeys(tasks)}


def references_file(layout: DatasetRoot, source: str) -> Path:
    if source not in REFERENCE_SETS:
        raise ValueError(f"references must be one of {REFERENCE_SETS}, got {source!r}")
    return layout.coco_captions if source == "coco" else layout.captions


def read_references(path: Path, needed: dict[int, str]) -> dict[int, list[str]]:
    """{nsdId: captions} for the images in `needed` ({nsdId: a sample that shows it}, for the error line)."""
    captions = read_captions(path)
    for nsd_id, sample in sorted(needed.items()):
        if not captions.get(nsd_id):
            raise BadInputError(path, f"has no reference captions for nsdId {nsd_id} (sample {sample})")
    return {nsd_id: captions[nsd_id] for nsd_id in needed}


def read_objects(path: Path, needed: dict[int, str]) -> tuple[list[str], dict[int, set[str]]]:
    """(category names, {nsdId: names of the categories annotated in it}) for the images in `needed`.

    An image without an entry has no annotated object (COCO leaves such images out); the file must exist.
    """
    instances = load_instances(path)
    present = {n: {obj["category"] for obj in instances.images.get(n, [])} for n in needed}
    return sorted(instances.categories.values()), present


def named_categories(text: str, categories: Sequence[str]) -> set[str]:
    """The category names `text` mentions as whole words, singular or with a plural "s" (case-insensitive)."""
    found = set()
    for name in categories:
        if re.search(rf"\b{re.escape(name.lower())}s?\b", text.lower()):
            found.add(name)
    return found


def object_hit(texts: Sequence[str], present: Sequence[set[str]], categories: Sequence[str]) -> float:
    """Share of texts[i] naming at least one category in present[i] (the `object_hit` metric, 0..1)."""
    if len(texts) != len(present) or not texts:
        raise ValueError(f"need as many object sets as texts (>= 1), got {len(present)} and {len(texts)}")
    return float(np.mean([bool(named_categories(t, categories) & p) for t, p in zip(texts, present, strict=True)]))


# PTB tokenization and the pycocoevalcap scorers -----------------------------------------------------


def java_unavailable_reason() -> str | None:
    if shutil.which("java") is None:
        return "needs Java on PATH (pycocoevalcap's PTBTokenizer and METEOR are Java programs): install a JRE"
    return None


@contextlib.contextmanager
def _captured_stderr() -> Iterator[Path]:
    """Send this process's file descriptor 2 (where pycocoevalcap's Java children write) to a temporary file."""
    with tempfile.NamedTemporaryFile(prefix="ptb-", suffix=".log", delete=False) as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            yield Path(log.name)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            Path(log.name).unlink(missing_ok=True)


def ptb_tokenize(texts: Sequence[str]) -> dict[str, str]:
    """{text: PTB-tokenized text} for every distinct text, in one Java call of pycocoevalcap's PTBTokenizer.

    The tokenizer reads one text per line, so each text's whitespace (including \\r and Unicode line
    separators, which Java also ends lines at) is collapsed to single spaces first, and blank texts map to ""
    without it: either would otherwise shift its line-by-line output onto the wrong texts.
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    distinct = sorted({t for t in texts if t.strip()})
    out = {t: "" for t in texts if not t.strip()}
    if not distinct:
        return out
    lines = {i: [{"caption": " ".join(t.split())}] for i, t in enumerate(distinct)}
    with _captured_stderr() as log:
        tokenized = PTBTokenizer().tokenize(lines)
        message = log.read_text(errors="replace").strip().splitlines()
    if len(tokenized) != len(distinct):
        detail = message[-1] if message else "no output"
        raise RuntimeError(f"PTBTokenizer returned {len(tokenized)} of {len(distinct)} lines: {detail}")
    out.update({t: tokenized[i][0] for i, t in enumerate(distinct)})
    return out


def spice_lib() -> Path:
    """pycocoevalcap's spice/lib folder, where SPICE looks for the CoreNLP jars (found without importing SPICE)."""
    spec = importlib.util.find_spec("pycocoevalcap")
    base = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    return (base / "spice" / "lib") if base else Path("pycocoevalcap/spice/lib")


def spice_unavailable_reason(lib: Path | None = None) -> str | None:
    """Why SPICE cannot run here (missing CoreNLP jars or Java), with how to get them; None when it can."""
    lib = spice_lib() if lib is None else Path(lib)
    missing = [jar for jar in CORENLP_JARS if not (lib / jar).is_file()]
    if missing:
        return (f"needs Stanford CoreNLP 3.6.0 in {lib}: {' and '.join(missing)} not found (nothing is downloaded "
                f"at run time); take both jars from {CORENLP_URL} (the folder stanford-corenlp-full-2015-12-09/) and "
                "copy them there, or run `python -m pycocoevalcap.spice.get_stanford_models` on a machine with "
                "internet access")  # fmt: skip
    return java_unavailable_reason()


class CocoScorers:
    """pycocoevalcap's scorers for the requested metrics; METEOR's JVM (seconds to start) starts once, here.

    SPICE runs only when `spice_unavailable_reason()` finds CoreNLP: pycocoevalcap's Spice() would otherwise
    download it. Why SPICE gave no score (missing jars, a failed run) is in `spice_error`.
    """

    def __init__(self, metrics: Sequence[str]):
        from pycocoevalcap.meteor.meteor import Meteor

        self.spice_error = spice_unavailable_reason() if "spice" in metrics else None
        self.metrics = [m for m in metrics if m in COCO_METRICS and (m != "spice" or self.spice_error is None)]
        self.meteor = Meteor() if "meteor" in self.metrics else None

    def score(self, refs: Sequence[Sequence[str]], hyps: Sequence[str]) -> dict[str, float | str]:
        """Scores of tokenized hypotheses `hyps[i]` against tokenized references `refs[i]`, scored together."""
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        gts = {i: list(r) for i, r in enumerate(refs)}
        res = {i: [h] for i, h in enumerate(hyps)}
        out: dict[str, float | str] = {}
        if any(m.startswith("bleu") for m in self.metrics):
            bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
            out.update({f"bleu{n + 1}": float(bleu[n]) for n in range(4) if f"bleu{n + 1}" in self.metrics})
        if self.meteor is not None:
            out["meteor"] = float(self.meteor.compute_score(gts, res)[0])
        if "rouge_l" in self.metrics:
            out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
        if "cider" in self.metrics:
            out["cider"] = float(Cider().compute_score(gts, res)[0])
        if "spice" in self.metrics:
            out["spice"] = self._spice(gts, res)
        elif self.spice_error is not None:
            out["spice"] = UNAVAILABLE
        return out

    def _spice(self, gts: dict, res: dict) -> float | str:
        from pycocoevalcap.spice.spice import Spice

        if self.spice_error is None:
            try:
                with _captured_stderr() as log:
                    try:
                        value = float(Spice().compute_score(gts, res)[0])
                    except (subprocess.CalledProcessError, OSError, ValueError) as err:
                        lines = log.read_text(errors="replace").strip().splitlines()
                        raise RuntimeError(lines[-1] if lines else str(err)) from err
                if math.isfinite(value):
                    return value
                self.spice_error = "SPICE returned NaN (no parse for some captions)"
            except RuntimeError as err:
                self.spice_error = f"SPICE failed: {err}"
        return UNAVAILABLE


# Controls and aggregation -----------------------------------------------------------------------------


def shuffled_images(nsd_ids: Sequence[int], seed: int) -> list[int]:
    """The image whose references a sample is scored against in the shuffled control: never its own.

    The subject's distinct images, in order of first appearance, are permuted by `derangement(M, seed)`; each
    sample takes the image its own image maps to. With one sample per image (the usual case) this is the
    derangement of the samples themselves: sample i gets sample perm[i]'s image.
    """
    images = list(dict.fromkeys(int(n) for n in nsd_ids))
    perm = derangement(len(images), seed)
    partner = {images[k]: images[int(perm[k])] for k in range(len(images))}
    return [partner[int(n)] for n in nsd_ids]


def mean_over_subjects(per_subject: dict[str, dict[str, float | str]], metrics: Sequence[str]) -> dict:
    """Each metric's mean over subjects; "unavailable" when any subject lacks it."""
    out: dict[str, float | str] = {}
    for metric in metrics:
        values = [scores.get(metric, UNAVAILABLE) for scores in per_subject.values()]
        numbers = [v for v in values if isinstance(v, int | float)]
        out[metric] = float(np.mean(numbers)) if numbers and len(numbers) == len(values) else UNAVAILABLE
    return out


def task_results(data: dict) -> dict[str, dict]:
    """{task: result} of an eval_captions.py JSON: one task is written flat (with "task"), several under "tasks"."""
    if isinstance(data.get("tasks"), dict):
        return dict(data["tasks"])
    return {str(data.get("task", "")): data}


__all__ = ["CLIP_METRICS", "COCO_METRICS", "METRICS", "PAPER_SCALE", "REFERENCE_SETS", "UNAVAILABLE",
           "CocoScorers", "Generated", "by_task", "java_unavailable_reason", "mean_over_subjects", "named_categories",
           "object_hit", "ptb_tokenize", "read_generated", "read_objects", "read_references", "references_file",
           "shuffled_images", "spice_lib", "spice_unavailable_reason", "task_results"]  # fmt: skip
