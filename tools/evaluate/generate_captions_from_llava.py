"""Generate a Brain-LLaVA's answers for every test sample and task: a JSONL that eval_captions.py scores.

For each subject (default: every prepared one) the test samples of --kind (avg: one per image, its repeats
averaged; single: its first presentation), in ascending nsdId, are asked each task's question
(llava_brain.evaluation.generation: the SFT prompts, one fixed prompt per task, --prompt-index) about their fMRI,
in left-padded batches with the KV cache (`model.generate`), greedy or sampled with --seed. --shuffle-fmri asks
every question about another test image's fMRI of the same subject (a seeded derangement): the control of every
claim that an answer comes from the brain. One line per (sample, task), in subject, task, nsdId order:
  {"sample": "subj01/te/3+9+12", "task": "brief_description", "text": "...", "fmri_sample": "subj01/te/4+8+20",
   "prompt": "Describe the image concisely."}
`sample` is the question's sample (what the text is scored against), `fmri_sample` the fMRI the model read.

Resumable: finished batches are appended to <out>.partial (a JsonlStore whose first line records the settings);
a rerun after a kill skips them and needs the same settings (else exit 2, or --overwrite). --out is written
atomically at the end with its provenance in <out>.run.json; a rerun with the same settings skips.

Full scale:
  python tools/evaluate/generate_captions_from_llava.py --model /data/brain/runs/brain_llava/stage2 \\
      --dataset-root /data/brain --kind avg --tasks brief_description instruction_reconstruction \\
      --batch-size 16 --precision bf16
Tiny (demo root):
  python tools/evaluate/generate_captions_from_llava.py --model demo_out/brain_llava/stage2 \\
      --dataset-root demo_out/root --batch-size 8 --max-new-tokens 24 --shuffle-fmri --out /tmp/shuffled.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from llava_brain import cli
from llava_brain.errors import BadInputError, exits_on_bad_input
from llava_brain.evaluation import generation as gen
from llava_brain.evaluation.predictions import KINDS, prediction_samples
from llava_brain.io import JsonlStore, StageRun, require_writable, write_text
from llava_brain.layout import DatasetRoot
from llava_brain.model.brain_llava import load_brain_llava
from llava_brain.subjects import sample_index

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PARTIAL_SUFFIX = ".partial"


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=Path, required=True, help="a Brain-LLaVA folder (llava_brain.train's output)")
    cli.add_dataset_root(p, "prepared dataset root (whole/nsd_betas_te.npy, nsd_fmri2image.json)")
    cli.add_subject(p)
    p.add_argument(
        "--kind",
        choices=KINDS,
        default="avg",
        help="avg = repeat-averaged fMRI, one sample per image (default); single = first presentation",
    )
    p.add_argument("--tasks", nargs="+", default=[gen.DEFAULT_TASK],
                   help=f"tasks to ask, of {', '.join(gen.TASKS)} (default {gen.DEFAULT_TASK})")  # fmt: skip
    p.add_argument(
        "--prompt-index",
        type=int,
        default=0,
        help="which prompt of each task's list is asked (0-based; default 0, the first)",
    )
    p.add_argument(
        "--concept", default=None, help='the object concept_localization asks for (Locating the concept of "<concept>")'
    )
    p.add_argument("--batch-size", type=int, default=8, help="questions per generate() call (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per answer at most (default 64)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: all tokens)")
    p.add_argument("--seed", type=int, default=0, help="seeds sampling and the --shuffle-fmri pairing (default 0)")
    p.add_argument(
        "--shuffle-fmri",
        action="store_true",
        help="control: ask every question about another test image's fMRI (seeded derangement)",
    )
    p.add_argument("--out", type=Path, default=None,
                   help="the JSONL to write (default <root>/runs/captions/<model folder name>_<kind>[_shuffled]"
                   ".jsonl; provenance: <out>.run.json)")  # fmt: skip
    cli.add_device(p)
    cli.add_precision(p, help="weights' precision (fp16/bf16 on GPUs; default fp32)")
    cli.add_overwrite(p, "replace an --out (or a partial run) made with other settings")
    cli.add_quiet(p)
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One-line exit 2 on settings that cannot run (argparse's own errors print the usage too)."""
    args.tasks = list(dict.fromkeys(args.tasks))  # a task named twice is asked once (one line per sample and task)
    unknown = [t for t in args.tasks if t not in gen.TASKS]
    problem = None
    if unknown:
        problem = f"--tasks: unknown task {unknown[0]!r}; expected some of {', '.join(gen.TASKS)}"
    elif "concept_localization" in args.tasks and not args.concept:
        problem = "--tasks concept_localization needs --concept (the object to locate)"
    elif args.batch_size < 1 or args.max_new_tokens < 1:
        problem = "--batch-size and --max-new-tokens must be at least 1"
    else:
        try:
            for task in args.tasks:
                gen.task_question(task, args.prompt_index, args.concept)
            gen.generation_kwargs(args.max_new_tokens, args.do_sample, args.temperature, args.top_p)
        except ValueError as err:
            problem = str(err)
    if problem:
        parser.exit(2, f"error: {problem}\n")


def plan(layout: DatasetRoot, subjects: list[int], args) -> list[dict]:
    """Every question to ask, in output order: {"sample", "task", "fmri_sample", "prompt"}."""
    jobs = []
    for subject in subjects:
        samples = [s.reference for s in prediction_samples(sample_index(layout, subject, "te"), args.kind)]
        if args.shuffle_fmri and len(samples) < 2:
            raise BadInputError(layout.fmri2image(subject), f"--shuffle-fmri needs 2 or more test images; "
                                                           f"subject {subject} has {len(samples)}")  # fmt: skip
        fmri = gen.shuffled_pairing(samples, args.seed) if args.shuffle_fmri else samples
        for task in args.tasks:
            question = gen.task_question(task, args.prompt_index, args.concept)
            jobs += [{"sample": s, "task": task, "fmri_sample": f, "prompt": question}
                     for s, f in zip(samples, fmri, strict=True)]  # fmt: skip
    return jobs


def open_partial(path: Path, header: dict, overwrite: bool) -> JsonlStore:
    """The store of finished batches: its first record is `header` (the settings); another run's is refused."""
    if overwrite:
        path.unlink(missing_ok=True)
    store = JsonlStore(path)
    if not len(store):
        store.append({"settings": header})
    elif store.records[0].get("settings") != json.loads(json.dumps(header)):
        raise BadInputError(path, "holds a partial run made with other settings; pass --overwrite to start over")
    return store


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = cli.parse_args(parser, argv)
    check_args(parser, args)
    started = time.time()
    layout = DatasetRoot(args.dataset_root)
    subjects = list(args.subject or [])
    if not subjects:
        raise BadInputError(layout.fmris_dir, "has no prepared subjects (subjXX/nsd_fmri2image.json)")
    model_dir = args.model.resolve()
    if args.out is None:
        args.out = layout.generated_texts(f"{model_dir.name}_{args.kind}" + ("_shuffled" if args.shuffle_fmri else ""))
    require_writable(args.out, "--out file")
    jobs = plan(layout, subjects, args)
    settings = {"model": str(model_dir), "subjects": subjects, "kind": args.kind, "tasks": args.tasks,
                "prompt_index": args.prompt_index, "concept": args.concept, "batch_size": args.batch_size,
                "max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample, "seed": args.seed,
                "temperature": args.temperature if args.do_sample else None,
                "top_p": args.top_p if args.do_sample else None, "shuffle_fmri": args.shuffle_fmri,
                "precision": args.precision}  # fmt: skip
    inputs = {"model": [model_dir / "config.json", model_dir / "model.safetensors"],
              "fmri2image": [layout.fmri2image(s) for s in subjects],
              "betas": [layout.whole_betas(s, "te") for s in subjects]}  # fmt: skip
    stage = StageRun(args.out, settings=settings, inputs=inputs, folder=False)
    if not stage.needed(args.overwrite, complete=args.out.is_file()):
        print(f"{args.out} is current (same settings and inputs); pass --overwrite to redo it")
        return 0
    model, processor = load_brain_llava(args.model, torch_dtype=DTYPES[args.precision],
                                        device=cli.resolve_device(args.device))  # fmt: skip
    partial = args.out.with_name(args.out.name + PARTIAL_SUFFIX)
    store = open_partial(partial, {**settings, "inputs": stage.inputs}, args.overwrite)
    done = {int(r["batch"]): r["lines"] for r in store.records[1:]}
    # An older --out's provenance goes now: a kill from here on leaves the partial file, which a rerun with these
    # settings resumes (the old provenance would otherwise make that rerun refuse and ask for --overwrite).
    stage.begin()
    kwargs = gen.generation_kwargs(args.max_new_tokens, args.do_sample, args.temperature, args.top_p)
    starts = range(0, len(jobs), args.batch_size)
    todo = [b for b in range(len(starts)) if b not in done]
    for b in tqdm(todo, desc="generate", unit="batch", disable=args.quiet, initial=len(starts) - len(todo),
                  total=len(starts)):  # fmt: skip
        batch = jobs[b * args.batch_size : (b + 1) * args.batch_size]
        prompts = [gen.chat_prompt(processor, job["prompt"]) for job in batch]
        texts = gen.generate_texts(model, processor, prompts, [job["fmri_sample"] for job in batch],
                                   layout, seed=gen.batch_seed(args.seed, b), **kwargs)  # fmt: skip
        lines = [{"sample": j["sample"], "task": j["task"], "text": t, "fmri_sample": j["fmri_sample"],
                  "prompt": j["prompt"]} for j, t in zip(batch, texts, strict=True)]  # fmt: skip
        gen.append_batch(store, {"batch": b, "lines": lines})
        done[b] = lines
    records = [line for b in range(len(starts)) for line in done[b]]
    write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    stage.finish(args, dataset_root=layout.root, batches=len(starts))
    partial.unlink(missing_ok=True)
    print(f"wrote {len(records)} answers ({len(args.tasks)} tasks, {len(subjects)} subjects) to {args.out} "
          f"in {time.time() - started:.1f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
