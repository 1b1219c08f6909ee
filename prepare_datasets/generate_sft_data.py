"""Instruction-tuning data of Brain-LLaVA -> <root>/nsd/sft_data_tr.json and sft_data_te.json.

One record per fMRI sample and instruction type (paper, App. A.2), in LLaVA's custom-data format;
the record format, the sample reference in `image` and how each type's answer is made are in
llava_brain/sft.py. Train samples of nsd_fmri2image.json go to sft_data_tr.json, "val" samples
(NSD's shared-1000 test set; there is no separate validation split) to sft_data_te.json.
brief_description, instruction_reconstruction and concept_localization are built from the
captions and objects of each image; conversation, detail_description and
complex_reasoning copy the dialogues of nsd_gpt_conversation/<type>.jsonl (generate_conversation.py).
Choices (prompt, caption, dialogue) are fixed by --seed and the record id, so a rerun writes the same
bytes. Provenance of both files (the resolved settings, the fingerprint of every input file, the
record counts) is one manifest, <root>/nsd/sft_data_tr.json.run.json, written after both files: a
rerun with the same settings and inputs does nothing, other settings or inputs are refused until
--overwrite, and files without the manifest (a run killed before its end) are simply made again.

Full scale (the paper: COCO + BLIP-2 captions, DETR objects; CPU only, about a minute):
  python prepare_datasets/generate_sft_data.py --dataset-root /data/brain --subject 1 2 5 7 \\
      --caption-sources coco blip2 --instance-source detr
Tiny (mini-NSD):
  python prepare_datasets/generate_sft_data.py --dataset-root demo_out/root --subject all \\
      --types brief_description instruction_reconstruction concept_localization
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llava_brain import cli
from llava_brain.annotations import read_captions, read_instances
from llava_brain.errors import BadInputError, exits_on_bad_input, require_file
from llava_brain.io import StageRun, manifest_of, require_writable, write_text
from llava_brain.layout import DatasetRoot, subject_name
from llava_brain.sft import (
    ALL_TYPES,
    BUILT_TYPES,
    GPT_TYPES,
    INSTRUCTIONS_DIR,
    SftSources,
    build_turns,
    checked_sft_records,
    dump_sft_records,
    load_gpt_conversations,
    load_instruction_lists,
    make_record,
    merge_captions,
    salient_categories,
)
from llava_brain.subjects import SPLITS, fmri_samples, read_fmri2image, split_key

log = logging.getLogger("generate_sft_data")

CAPTION_TYPES = ("brief_description", "instruction_reconstruction")
OBJECT_TYPES = ("instruction_reconstruction", "concept_localization")


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # Data
    cli.add_dataset_root(
        p,
        "prepared dataset root; reads nsd/fmris, the caption/instance files and nsd_gpt_conversation/, "
        "writes nsd/sft_data_{tr,te}.json",
    )
    cli.add_subject(
        p,
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
    cli.add_overwrite(p, "rewrite both files even if they are current (needed when settings or inputs changed)")
    cli.add_quiet(p)
    return p


# Inputs ---------------------------------------------------------------------------------------


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


def sample_images(layout: DatasetRoot, subject: int) -> dict[str, list[int]]:
    """Split ("tr"/"te") -> nsdId of every sample, checked against the rows of the whole-brain arrays."""
    path = layout.fmri2image(subject)
    mapping = read_fmri2image(layout, subject)
    out = {}
    for split in SPLITS:
        key, ids = split_key(split), mapping[split_key(split)]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
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


def input_files(layout: DatasetRoot, subjects: list[int], types: list[str], args) -> dict[str, tuple[Path, str]]:
    """Every file the records depend on, by name: (path, what it holds). Their fingerprints decide
    whether a rerun has anything to do."""
    files = _annotation_files(layout)
    inputs = [(layout.fmri2image(s), "the sample -> image map of make_subjmri.py") for s in subjects]
    if set(types) & set(CAPTION_TYPES):
        inputs += [files[f"captions/{source}"] for source in args.caption_sources]
    if set(types) & set(OBJECT_TYPES):
        inputs.append(files[f"instances/{args.instance_source}"])
    inputs += [
        (layout.gpt_conversation(t), f"the {t} dialogues of generate_conversation.py") for t in types if t in GPT_TYPES
    ]
    named = {str(path.relative_to(layout.root)): (path, what) for path, what in inputs}
    for name in BUILT_TYPES:  # the prompt lists (outside the root: named by type)
        named[f"instructions/{name}.txt"] = (args.instructions_dir / f"{name}.txt", "an instruction list")
    return named


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
    args = cli.parse_args(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Sanity checks
    if not 0.0 <= args.min_score <= 1.0:
        parser.error(f"--min-score is a score in [0, 1], got {args.min_score}")
    args.caption_sources = list(dict.fromkeys(args.caption_sources))  # order kept: it orders the caption pool

    start = time.perf_counter()
    layout = DatasetRoot(args.dataset_root)
    outputs = [layout.sft_data(split) for split in SPLITS]
    # One manifest for both files, beside the first (written after both: its presence marks them complete).
    for path in [*outputs, manifest_of(outputs[0])]:
        require_writable(path, "dataset root")
    subjects = args.subject
    types = resolve_types(layout, args.types)
    instructions = load_instruction_lists(args.instructions_dir)
    files = input_files(layout, subjects, types, args)
    inputs = {name: require_file(path, what) for name, (path, what) in files.items()}
    settings = {
        "subjects": subjects,
        "types": types,
        "unit": args.unit,
        "seed": args.seed,
        "caption_sources": args.caption_sources,
        "instance_source": args.instance_source,
        "min_score": args.min_score,
    }
    run = StageRun(outputs[0], settings=settings, inputs=inputs)
    if not run.needed(args.overwrite, complete=all(p.is_file() for p in outputs)):
        log.info("%s and %s are up to date (same settings and inputs); nothing to do", *outputs)
        return 0

    mappings = {subject: sample_images(layout, subject) for subject in subjects}
    nsd_ids = {i for mapping in mappings.values() for ids in mapping.values() for i in ids}
    sources = load_sources(layout, types, nsd_ids, instructions, args)
    counts = {split: {t: [0, 0] for t in types} for split in SPLITS}
    # Checked while streaming: a failure here is a bug in the builders, not bad input. The text of
    # both files is made before anything is written, so a bug leaves the old outputs in place.
    texts = {
        split: dump_sft_records(checked_sft_records(split_records(mappings, split, types, sources, args, counts)))
        for split in SPLITS
    }

    # The manifest goes first and comes back last, so that a kill in between never leaves old
    # settings vouching for new files (files without a manifest are redone by the next run).
    run.begin()
    for split, path in zip(SPLITS, outputs, strict=True):
        write_text(path, texts[split])
    summary = {split: {t: {"records": n, "skipped": s} for t, (n, s) in c.items()} for split, c in counts.items()}
    run.finish(args, counts=summary, outputs=[str(p) for p in outputs])
    if not args.quiet:
        log_counts(counts, time.perf_counter() - start)
    log.info("wrote %s and %s for %s", *outputs, ", ".join(subject_name(s) for s in subjects))
    return 0


if __name__ == "__main__":
    sys.exit(main())
