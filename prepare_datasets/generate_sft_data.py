"""Instruction-tuning data of Brain-LLaVA -> <root>/nsd/sft_data_tr.json and sft_data_te.json.

One record per fMRI sample and instruction type (paper, App. A.2), in LLaVA's custom-data format;
the record format, the sample reference in `image` and how each type's answer is made are in
llava_brain/sft.py. Train samples of nsd_fmri2image.json go to sft_data_tr.json, val (shared-image)
samples to sft_data_te.json. brief_description, instruction_reconstruction and concept_localization
are built from the captions and objects of each image; conversation, detail_description and
complex_reasoning copy the dialogues of nsd_gpt_conversation/<type>.jsonl (generate_conversation.py).
Choices (prompt, caption, dialogue) are fixed by --seed and the record id, so a rerun writes the same
bytes. A rerun with the same settings and inputs does nothing; the settings, the SHA-256 of every
input and the record counts are in <root>/nsd/sft_data_run.json.

Full scale (the paper: COCO + BLIP-2 captions, DETR objects; CPU only, about a minute):
  python prepare_datasets/generate_sft_data.py --dataset-root /data/brain --subject 1 2 5 7 \\
      --caption-sources coco blip2 --instance-source detr
Tiny (mini-NSD):
  python prepare_datasets/generate_sft_data.py --dataset-root demo_out/root --subject all \\
      --types brief_description instruction_reconstruction concept_localization
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llava_brain.annotations import read_captions, read_instances, subject_or_all
from llava_brain.errors import BadInputError, exits_on_bad_input, require_file
from llava_brain.io import read_json, run_manifest, write_json, write_text
from llava_brain.layout import DatasetRoot, default_data_root, subject_name
from llava_brain.nsd.constants import NUM_SUBJECTS
from llava_brain.sft import (
    ALL_TYPES,
    BUILT_TYPES,
    GPT_TYPES,
    INSTRUCTIONS_DIR,
    SPLIT_KEYS,
    SftSources,
    build_turns,
    checked_sft_records,
    dump_sft_records,
    fmri_samples,
    load_gpt_conversations,
    load_instruction_lists,
    make_record,
    merge_captions,
    salient_categories,
)

log = logging.getLogger("generate_sft_data")

CAPTION_TYPES = ("brief_description", "instruction_reconstruction")
OBJECT_TYPES = ("instruction_reconstruction", "concept_localization")


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # Data
    p.add_argument(
        "--dataset-root",
        type=Path,
        default=default_data_root(),
        help="prepared dataset root; reads nsd/fmris, the caption/instance files and nsd_gpt_conversation/, "
        "writes nsd/sft_data_{tr,te}.json (default: $BRAIN_DATA_ROOT)",
    )
    p.add_argument(
        "--subject",
        type=subject_or_all,
        nargs="+",
        default=["all"],
        metavar="S",
        help="prepared subjects (1-8) whose samples get records, or 'all' = every subject with an "
        "nsd_fmri2image.json (default; the paper: 1 2 5 7)",
    )
    p.add_argument(
        "--types",
        nargs="+",
        choices=ALL_TYPES,
        metavar="TYPE",
        help=f"instruction types, from {', '.join(ALL_TYPES)} (default: the first three plus every GPT "
        "type whose nsd_gpt_conversation/<type>.jsonl exists; a GPT type named here must have its file)",
    )
    p.add_argument(
        "--caption-sources",
        nargs="+",
        choices=["coco", "blip2"],
        default=["coco"],
        help="captions the brief description and Stable Diffusion prompt answers are drawn from: "
        "coco = nsd_coco_captions.json, blip2 = nsd_captions.json (the paper: coco blip2)",
    )
    p.add_argument(
        "--instance-source",
        choices=["coco", "detr"],
        default="coco",
        help="objects of concept localization and the Stable Diffusion prompts: coco = nsd_coco_instances.json "
        "(human boxes), detr = nsd_instances.json (detections, the paper's choice)",
    )
    p.add_argument(
        "--min-score",
        type=float,
        default=0.0,
        help="ignore detected objects scoring below this (0-1; 0 = keep all); COCO objects have no score",
    )
    p.add_argument(
        "--instructions-dir",
        type=Path,
        default=INSTRUCTIONS_DIR,
        help="folder of the prompt lists <type>.txt of the built types, one prompt per line (default: the "
        "paper's lists in data/instructions/)",
    )
    # Records
    unit = p.add_mutually_exclusive_group()
    unit.add_argument(
        "--per-sample",
        dest="unit",
        action="store_const",
        const="sample",
        help="one record per fMRI sample (single trial) and type; image = 'subjXX/<split>/<row>' (default)",
    )
    unit.add_argument(
        "--per-image",
        dest="unit",
        action="store_const",
        const="image",
        help="one record per subject, image and type over all the image's repeats; "
        "image = 'subjXX/<split>/<row>+<row>...' (the samples to average)",
    )
    p.set_defaults(unit="sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-record choice of prompt, caption and dialogue")
    # Output
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="rewrite both files even if they exist (needed when settings or inputs changed)",
    )
    return p


def run_manifest_path(layout: DatasetRoot) -> Path:
    """Settings, input digests and counts of the last finished run, beside the two outputs."""
    return layout.sft_data_run


# Inputs ---------------------------------------------------------------------------------------


def resolve_subjects(layout: DatasetRoot, requested: list[int | str]) -> list[int]:
    if requested == ["all"]:
        found = [s for s in range(1, NUM_SUBJECTS + 1) if layout.fmri2image(s).is_file()]
        if not found:
            raise BadInputError(layout.fmri_dir(1).parent, "holds no prepared subject; run make_subjmri.py first")
        return found
    for subject in requested:
        require_file(layout.fmri2image(subject), "the sample -> image map of a prepared subject (make_subjmri.py)")
    return sorted(set(requested))


def resolve_types(layout: DatasetRoot, requested: list[str] | None) -> list[str]:
    if requested is None:
        return [*BUILT_TYPES, *(t for t in GPT_TYPES if layout.gpt_conversation(t).is_file())]
    for prompt_type in set(requested) & set(GPT_TYPES):
        require_file(
            layout.gpt_conversation(prompt_type),
            f"the {prompt_type} dialogues of prepare_datasets/generate_conversation.py (or leave "
            f"{prompt_type} out of --types)",
        )
    return [t for t in ALL_TYPES if t in requested]


def _num_rows(path: Path) -> int:
    """Length of the first axis of a .npy file, from its header alone (NSD: ~40 GB per file)."""
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, _ = read_header(f)
    except (OSError, ValueError) as err:
        raise BadInputError(path, f"expected a .npy array of whole-brain volumes ({err})") from None
    if not shape:
        raise BadInputError(path, "expected an array of (samples, X, Y, Z) volumes; found a scalar")
    return int(shape[0])


def read_fmri2image(layout: DatasetRoot, subject: int) -> dict[str, list[int]]:
    """Split ("tr"/"te") -> nsdId of every sample, checked against the rows of the whole-brain arrays."""
    path = layout.fmri2image(subject)
    mapping = read_json(path, "nsd_fmri2image.json of a prepared subject (make_subjmri.py)")
    out = {}
    for split, key in SPLIT_KEYS.items():
        ids = mapping.get(key) if isinstance(mapping, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise BadInputError(path, f'"{key}" must be a list of 0-based nsdIds, one per sample')
        betas = require_file(layout.whole_betas(subject, split), "the whole-brain volumes of make_subjmri.py")
        rows = _num_rows(betas)
        if rows != len(ids):
            raise BadInputError(
                betas, f'has {rows} samples but {path} lists {len(ids)} under "{key}"; rerun make_subjmri.py'
            )
        out[split] = ids
    return out


# What produces each annotation file, for the message when one is missing or incomplete.
def _annotation_files(layout: DatasetRoot) -> dict[str, tuple[Path, str]]:
    return {
        "captions/coco": (layout.coco_captions, "COCO captions of make_coco_annotations.py"),
        "captions/blip2": (layout.captions, "BLIP-2 captions of generate_captions.py"),
        "instances/coco": (layout.coco_instances, "COCO objects of make_coco_annotations.py"),
        "instances/detr": (layout.instances, "DETR objects of object_detection.py"),
    }


def _read_covering(path: Path, what: str, reader, nsd_ids: set[int]) -> dict[int, Any]:
    """Annotations of `path`, which must have an entry (possibly empty) for every image in `nsd_ids`."""
    data = reader(require_file(path, f"the {what}, keyed by nsdId"))
    absent = sorted(nsd_ids - set(data))
    if absent:
        raise BadInputError(
            path, f"has no entry for {len(absent)} image(s) of the selected subjects (nsdIds {_few(absent)}); "
            f"rerun the stage that writes the {what} for these subjects",
        )  # fmt: skip
    return data


def _few(values: list[int], shown: int = 5) -> str:
    return ", ".join(map(str, values[:shown])) + (", ..." if len(values) > shown else "")


def input_files(layout: DatasetRoot, subjects: list[int], types: list[str], args) -> list[tuple[Path, str]]:
    """(path, what it holds) of every file the records depend on; their digests decide whether a
    rerun has anything to do."""
    files = _annotation_files(layout)
    inputs = [(layout.fmri2image(s), "the sample -> image map of make_subjmri.py") for s in subjects]
    if set(types) & set(CAPTION_TYPES):
        inputs += [files[f"captions/{source}"] for source in args.caption_sources]
    if set(types) & set(OBJECT_TYPES):
        inputs.append(files[f"instances/{args.instance_source}"])
    gpt = [
        (layout.gpt_conversation(t), f"the {t} dialogues of generate_conversation.py") for t in types if t in GPT_TYPES
    ]
    return inputs + gpt


def load_sources(layout: DatasetRoot, types: list[str], nsd_ids: set[int], instructions, args) -> SftSources:
    files = _annotation_files(layout)
    captions: dict[int, list[str]] = {}
    if set(types) & set(CAPTION_TYPES):
        per_source = [_read_covering(*files[f"captions/{s}"], read_captions, nsd_ids) for s in args.caption_sources]
        captions = merge_captions(*per_source)
    categories: dict[int, list[str]] = {}
    if set(types) & set(OBJECT_TYPES):
        instances = _read_covering(*files[f"instances/{args.instance_source}"], read_instances, nsd_ids)
        categories = {i: salient_categories(instances[i], args.min_score) for i in nsd_ids}
    gpt = {}
    for prompt_type in (t for t in types if t in GPT_TYPES):
        gpt[prompt_type] = load_gpt_conversations(layout.gpt_conversation(prompt_type), prompt_type)
        uncovered = len(nsd_ids - set(gpt[prompt_type]))
        if uncovered:
            log.warning(
                "%s: %d of %d images have no dialogue in %s; their samples get no %s record",
                prompt_type, uncovered, len(nsd_ids), layout.gpt_conversation(prompt_type), prompt_type,
            )  # fmt: skip
    return SftSources(instructions=instructions, captions=captions, categories=categories, gpt=gpt)


# Reruns ---------------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def up_to_date(outputs: list[Path], manifest: Path, settings: dict) -> bool:
    """True if both outputs exist from a run with `settings`; BadInputError if what exists came from
    other settings or inputs, or from an unfinished run (its manifest is written last)."""
    existing = [p for p in outputs if p.exists()]
    if manifest.is_file():
        data = read_json(manifest, "the run manifest of generate_sft_data.py")
        previous = data.get("settings") if isinstance(data, dict) else None
        if previous == settings:
            return len(existing) == len(outputs)
        previous = previous if isinstance(previous, dict) else {}
        changed = sorted(k for k in settings if k != "inputs" and previous.get(k) != settings[k])
        changed += [f"input {name}" for name in _changed_inputs(previous.get("inputs"), settings["inputs"])]
        raise BadInputError(
            manifest, f"the SFT data were written with other settings or inputs ({', '.join(changed)}); "
            "pass --overwrite to rewrite them",
        )  # fmt: skip
    if existing:
        raise BadInputError(
            existing[0], f"exists without {manifest.name} (an interrupted run or another tool wrote it); "
            "pass --overwrite to replace it",
        )  # fmt: skip
    return False


def _changed_inputs(previous: Any, current: dict[str, str]) -> list[str]:
    previous = previous if isinstance(previous, dict) else {}
    return sorted(name for name in {*previous, *current} if previous.get(name) != current.get(name))


# Records --------------------------------------------------------------------------------------


def split_records(
    mappings: dict[int, dict[str, list[int]]], split: str, types: list[str], sources: SftSources, args, counts
) -> Iterator[dict]:
    """The records of one split, ordered by subject, sample and type, made one at a time (NSD: ~700k
    records, ~2 KB each as Python objects); counts[split][type] = [written, skipped] is updated."""
    for subject, mapping in mappings.items():
        for sample in fmri_samples(mapping[split], subject, split, per_image=args.unit == "image"):
            for prompt_type in types:
                turns = build_turns(sample, prompt_type, sources, args.seed)
                if turns is None:
                    counts[split][prompt_type][1] += 1
                    continue
                counts[split][prompt_type][0] += 1
                yield make_record(sample, prompt_type, turns)


def log_counts(counts: dict[str, dict[str, list[int]]], elapsed: float) -> None:
    log.info("%-28s %10s %10s   (skipped tr/te: the image has no caption, object or dialogue)", "type", "tr", "te")
    for prompt_type in counts["tr"]:
        (tr, tr_skip), (te, te_skip) = counts["tr"][prompt_type], counts["te"][prompt_type]
        log.info("%-28s %10d %10d   (skipped %d/%d)", prompt_type, tr, te, tr_skip, te_skip)
    total = {split: sum(n for n, _ in c.values()) for split, c in counts.items()}
    log.info("%-28s %10d %10d   in %.1f s", "total", total["tr"], total["te"], elapsed)


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Sanity checks
    if args.dataset_root is None:
        parser.error("--dataset-root is required (or set $BRAIN_DATA_ROOT)")
    if "all" in args.subject and len(args.subject) > 1:
        parser.error(f"--subject all cannot be combined with subject numbers, got {args.subject}")
    if not 0.0 <= args.min_score <= 1.0:
        parser.error(f"--min-score is a score in [0, 1], got {args.min_score}")
    args.caption_sources = list(dict.fromkeys(args.caption_sources))  # order kept: it orders the caption pool

    start = time.perf_counter()
    layout = DatasetRoot(args.dataset_root)
    subjects = resolve_subjects(layout, args.subject)
    types = resolve_types(layout, args.types)
    instructions = load_instruction_lists(args.instructions_dir)
    inputs = [require_file(path, what) for path, what in input_files(layout, subjects, types, args)]
    # JSON round trip so that the comparison with the manifest sees the same types (lists, floats).
    settings = {
        "subjects": subjects,
        "types": types,
        "unit": args.unit,
        "seed": args.seed,
        "caption_sources": args.caption_sources,
        "instance_source": args.instance_source,
        "min_score": args.min_score,
        "instructions": instructions,
        "inputs": {str(p.relative_to(layout.root)): sha256(p) for p in inputs},
    }
    settings = json.loads(json.dumps(settings))
    outputs = [layout.sft_data(split) for split in SPLIT_KEYS]
    manifest = run_manifest_path(layout)
    if not args.overwrite and up_to_date(outputs, manifest, settings):
        log.info("%s and %s are up to date (same settings and inputs); nothing to do", *outputs)
        return 0

    mappings = {subject: read_fmri2image(layout, subject) for subject in subjects}
    nsd_ids = {i for mapping in mappings.values() for ids in mapping.values() for i in ids}
    sources = load_sources(layout, types, nsd_ids, instructions, args)
    counts = {split: {t: [0, 0] for t in types} for split in SPLIT_KEYS}
    # Checked while streaming: a failure here is a bug in the builders, not bad input. The text of
    # both files is made before anything is written, so a bug leaves the old outputs in place.
    texts = {
        split: dump_sft_records(checked_sft_records(split_records(mappings, split, types, sources, args, counts)))
        for split in SPLIT_KEYS
    }

    # The manifest goes first and comes back last, so that a kill in between never leaves old
    # settings vouching for new files.
    manifest.unlink(missing_ok=True)
    for split, path in zip(SPLIT_KEYS, outputs, strict=True):
        write_text(path, texts[split])
    summary = {split: {t: {"records": n, "skipped": s} for t, (n, s) in c.items()} for split, c in counts.items()}
    write_json(manifest, run_manifest(args, settings=settings, counts=summary, outputs=[str(p) for p in outputs]))
    log_counts(counts, time.perf_counter() - start)
    log.info(
        "wrote %s and %s for %s",
        *outputs,
        ", ".join(subject_name(s) for s in subjects),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
