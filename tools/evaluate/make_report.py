"""One report from any set of evaluation outputs: retrieval, the paper's Table 2 and Table 1 layouts, grids.

Reads the JSON files that the evaluators write with --json (eval_retrieval.py, eval_recon.py,
eval_captions.py; each names itself with an "evaluation" key), given as files or folders searched
recursively, and writes `report.md` and `report.json` into --out:

- Retrieval: per run, subject means of top-1 brain->image / image->brain among all test images and in
  MindEye's 300-image pools (mean ± sd over the seeded draws), for repeat-averaged (avg) and single-trial
  inputs, beside chance and the shuffled-fMRI control.
- Table 2 (reconstruction), one table per protocol: the paper's columns in its order with ↑/↓, the
  published rows (labelled "published: ..."), then one row per run and kind (the mean over its
  subjects) and its shuffled-pairs control row.
- Table 1 (captioning), one table per reference set and task: the paper's columns plus RefCLIP-S and the
  MiniLM sentence similarity, the published rows (brief captions only, where the paper has them), one row
  per run and its shuffled-references control row.
- The β sweep of the unCLIP decoder (the paper's Fig. 5), when the scored folders hold one (unCLIP runs that
  differ only in --beta, at least 3 values; llava_brain.evaluation.beta_sweep): PixCorr and CLIP two-way
  identification against β beside shuffled pairs, drawn as report_grids/beta_sweep_<protocol>_<kind>.png
  with its numbers as a table.
- Concept localization (eval_concepts.py): per located concept, the zeroing check (score drop for the
  located vs random voxels, Wilcoxon p) and on mini-NSD the agreement with the true encoding map, with the mean
  map's slice montage copied into report_grids/concept_<subject>_<kind>_<concept>.png.
- The grids (stimulus | reconstruction; unCLIP: stimulus | low-level VAE decode | reconstruction) of each
  reconstruction folder that was scored, copied beside the report so that report.md shows them wherever it
  is moved.
Values that an evaluator could not compute (a metric network that is not installed, SPICE without
CoreNLP) appear as "n/a" with the reason in the notes; a report never invents a number.

Full scale:
  python tools/evaluate/make_report.py --evals /data/brain/runs/eval --out /data/brain/runs/eval/report
Tiny (demo):
  python tools/evaluate/make_report.py --evals demo_out/root/runs/eval --out demo_out
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from llava_brain import cli
from llava_brain.errors import BadInputError, exits_on_bad_input
from llava_brain.evaluation.published import PUBLISHED_TABLE1, PUBLISHED_TABLE2, TABLE1, TABLE2, Column
from llava_brain.io import read_json, require_writable, write_json, write_text
from llava_brain.layout import subject_name

KINDS = {"avg": "repeat-averaged", "single": "single trial"}
GRIDS = "report_grids"


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--evals", type=Path, nargs="+", required=True,
                   help="evaluation JSON files, or folders searched recursively for them")  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="folder for report.md, report.json and the grid images")
    p.add_argument("--title", default="Evaluation report", help="the report's first heading")
    p.add_argument("--note", default="", help="a paragraph printed under the title (e.g. which data and models)")
    return p


# Reading --------------------------------------------------------------------------------------


def collect(paths: list[Path]) -> dict[str, list[dict]]:
    """{"retrieval"|"recon"|"captions": [results]} from files and folders; each result keeps its "source"."""
    found: dict[str, list[dict]] = defaultdict(list)
    for path in paths:
        if not path.exists():
            raise BadInputError(path, "missing; expected an evaluation JSON file or a folder of them")
        files = sorted(path.rglob("*.json")) if path.is_dir() else [path]
        for file in files:
            if file.name in ("run.json", "report.json", "index.json"):
                continue
            data = read_json(file, "an evaluation result")
            kind = data.get("evaluation") if isinstance(data, dict) else None
            if kind in ("retrieval", "recon", "captions", "concepts"):
                found[kind].append({**data, "source": str(file)})
            elif path == file:
                raise BadInputError(file, "is not an evaluation result (no 'evaluation' key of retrieval, "
                                          "recon, captions or concepts)")  # fmt: skip
    if not found:
        raise BadInputError(paths[0], "holds no evaluation results (eval_retrieval.py, eval_recon.py, "
                                      "eval_captions.py or eval_concepts.py --json outputs)")  # fmt: skip
    return found


def _mean(values: list) -> float | str | None:
    numbers = [v for v in values if isinstance(v, int | float)]
    if numbers and len(numbers) == len(values):
        return float(np.mean(numbers))
    return "unavailable" if any(isinstance(v, str) for v in values) else None


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def _metric_table(columns: tuple[Column, ...], rows: list[tuple[str, str, dict]]) -> str:
    """rows: (label, #subjects or #models, values by metric key)."""
    header = ["", "n", *[c.title for c in columns]]
    return _markdown(header, [[label, str(n), *[c.format(values.get(c.key)) for c in columns]]
                              for label, n, values in rows])  # fmt: skip


def _notes(results: list[dict]) -> list[str]:
    reasons = {}
    for result in results:
        for name, reason in (result.get("unavailable") or {}).items():
            reasons.setdefault(name, reason)
    return [f"- {name}: not computed: {reason}" for name, reason in sorted(reasons.items())]


# Sections -------------------------------------------------------------------------------------


def retrieval_section(results: list[dict]) -> tuple[list[str], list[dict]]:
    """A summary across runs (subject means), then each run's own table (llava_brain.evaluation.report)."""
    from llava_brain.evaluation.report import retrieval_markdown

    header = ["run", "trials", "subjects", "brain→image", "image→brain", "MindEye-300 brain→image", "chance",
              "shuffled fMRI brain→image"]  # fmt: skip
    rows, data = [], []
    for result in sorted(results, key=lambda r: r["run"]):
        shuffled = result.get("controls", {}).get("shuffled", {}).get("mean", {})
        for kind, mean in result["mean"].items():
            if not isinstance(mean, dict):
                continue
            pool = f"{_pct(mean.get('mindeye300_brain_to_image'))} ± {_pct(mean.get('mindeye300_brain_to_image_sd'))}"
            rows.append([result["run"], KINDS.get(kind, kind), str(len(mean.get("subjects", []))),
                         _pct(mean.get("top1_brain_to_image")), _pct(mean.get("top1_image_to_brain")), pool,
                         _pct(mean.get("chance")),
                         _pct(shuffled.get(kind, {}).get("top1_brain_to_image"))])  # fmt: skip
            data.append({"run": result["run"], "kind": kind, "mean": mean, "shuffled": shuffled.get(kind),
                         "source": result["source"]})  # fmt: skip
    lines = ["## Retrieval of predicted CLIP embeddings",
             "", "Top-1 among all test images (percent, mean over subjects); MindEye-300: top-1 in 300-image pools "
             "(all images when a subject has fewer), mean ± sd over 30 seeded draws. Shuffled fMRI: the same "
             "predictions paired with other images (a seeded derangement).", "",
             _markdown(header, rows)]  # fmt: skip
    for result in sorted(results, key=lambda r: r["run"]):
        lines += ["", f"### {result['run']}: per subject (fractions)", "", retrieval_markdown(result)]
    return lines, data


def _pct(value) -> str:
    return f"{100 * value:.1f}" if isinstance(value, int | float) else "-"


def _grouped_means(results: list[dict], group: tuple[str, ...]) -> dict[tuple, dict]:
    """{group key: {"values", "shuffled", "subjects", "results"}}: each metric averaged over the group's subjects."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for result in results:
        groups[tuple(result.get(k) for k in group)].append(result)
    out = {}
    for key, members in sorted(groups.items(), key=lambda kv: tuple(str(v) for v in kv[0])):
        metrics = list(members[0]["metrics"])
        out[key] = {
            "values": {m: _mean([r["metrics"].get(m) for r in members]) for m in metrics},
            "shuffled": {m: _mean([r["shuffled"].get(m) for r in members]) for m in metrics},
            "subjects": sorted(r.get("subject") for r in members if r.get("subject") is not None),
            "results": members,
        }
    return out


def reconstruction_section(results: list[dict]) -> tuple[list[str], dict]:
    lines = ["## Table 2: reconstruction", "",
             "PixCorr and SSIM at 425²; AlexNet(2), AlexNet(5), Inception and CLIP: two-way identification in "
             "percent (chance 50); EffNet-B and SwAV: correlation distance. Measured rows: the mean over the "
             "run's subjects (n = subjects); shuffled pairs: each reconstruction scored against another "
             "stimulus (chance level). Published rows: the paper's Table 2 (n = models for 4 subjects)."]  # fmt: skip
    data = {}
    protocols = sorted({r.get("protocol") for r in results})
    for protocol in protocols:
        grouped = _grouped_means([r for r in results if r.get("protocol") == protocol], ("run", "kind"))
        rows = [(f"published: {m}", str(n), v) for m, n, v in PUBLISHED_TABLE2] if protocol == "braindiffuser" else []
        for (run, kind), group in grouped.items():
            label = f"{run}, {KINDS.get(kind, kind)}"
            rows.append((f"**{label}**", str(len(group["subjects"])), group["values"]))
            rows.append((f"{label}, shuffled pairs", str(len(group["subjects"])), group["shuffled"]))
        lines += ["", f"### protocol {protocol}", "", _metric_table(TABLE2, rows)]
        notes = _notes([r for g in grouped.values() for r in g["results"]])
        lines += ["", *notes] if notes else []
        data[protocol] = [{"row": label, "n": n, "values": values} for label, n, values in rows]
    return lines, data


def captioning_section(results: list[dict]) -> tuple[list[str], dict]:
    from llava_brain.evaluation.captions import task_results

    flat = [{**task, "run": result["run"], "refs": result.get("refs"), "task": name, "source": result["source"]}
            for result in results for name, task in task_results(result).items()]  # fmt: skip
    lines = ["## Table 1: captioning", "",
             "Percent (x 100) as in the paper; CLIP-S = 2.5 · max(cos, 0) can exceed 100. Measured rows: the "
             "mean over the run's subjects (n = subjects); shuffled: the same texts scored against the references "
             "and images of other samples (chance level). Published rows: the paper's Table 1 (brief captions, "
             "n = models for 4 subjects)."]  # fmt: skip
    data = {}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for task in flat:
        groups[(task["refs"], task["task"])].append(task)
    for (refs, name), tasks in sorted(groups.items()):
        published = []
        if name == "brief_description":
            published = [row for row in PUBLISHED_TABLE1 if ("BLIP-2" in row[0]) == (refs == "blip2")]
        rows = [(f"published: {m}", str(n), v) for m, n, v in published]
        for task in sorted(tasks, key=lambda t: t["run"]):
            count = str(len(task.get("subjects", [])))
            rows.append((f"**{task['run']}**", count, task["mean"]))
            rows.append((f"{task['run']}, shuffled", count, task.get("shuffled", {}).get("mean", {})))
        lines += ["", f"### {name}, {refs} references", "", _metric_table(TABLE1, rows)]
        notes = _notes(tasks)
        lines += ["", *notes] if notes else []
        data[f"{name}/{refs}"] = [{"row": label, "n": n, "values": values} for label, n, values in rows]
    return lines, data


def grids_section(results: list[dict], out: Path) -> tuple[list[str], list[str]]:
    """Copy each scored folder's grid.png (embeds2images.py) beside the report, once per run, subject and kind."""
    seen, copied = set(), []
    for result in sorted(results, key=lambda r: (r["run"], str(r.get("kind")), r.get("subject") or 0)):
        grid = Path(result.get("recons", "")).parent / "grid.png"
        key = (result["run"], result.get("subject"), result.get("kind"))
        if key in seen or not result.get("recons") or not grid.is_file():
            continue
        seen.add(key)
        subject = subject_name(key[1]) if isinstance(key[1], int) else key[1]
        name = "_".join(str(k) for k in (key[0], subject, key[2]) if k is not None).replace("/", "_") + ".png"
        (out / GRIDS).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(grid, out / GRIDS / name)
        copied.append(f"{GRIDS}/{name}")
    if not copied:
        return [], []
    lines = [
        "## Reconstructions",
        "",
        "Each sample: stimulus | reconstruction; unCLIP folders: stimulus | the "
        "low-level VAE decode of the predicted latent | reconstruction (the first samples of each folder).",
    ]
    for path in copied:
        lines += ["", f"{Path(path).stem}:", "", f"![{Path(path).stem}]({path})"]
    return lines, copied


def beta_sweep_section(results: list[dict], out: Path) -> tuple[list[str], list[dict]]:
    """The β sweeps among the scored unCLIP folders, each plotted into report_grids/ with its table."""
    from llava_brain.evaluation.beta_sweep import find_sweeps, plot_sweep, sweep_markdown

    sweeps = find_sweeps(results)
    if not sweeps:
        return [], []
    lines = ["## β sweep of the unCLIP decoder", "",
             "x = D((1 - β) z_vae + β ε | z_clip, prompt): the lower β, the more of the predicted VAE latent "
             "survives. Each point: the mean over its subjects (n); dashed: the same folders' shuffled "
             "pairs."]  # fmt: skip
    for sweep in sweeps:
        name = f"beta_sweep_{sweep['protocol']}_{sweep['kind']}.png"
        plot_sweep(sweep, out / GRIDS / name)
        sweep["plot"] = f"{GRIDS}/{name}"
        fixed = ", ".join(f"{k} {v}" for k, v in sweep["settings"].items() if k not in ("prompts",))
        lines += ["", f"### protocol {sweep['protocol']}, {KINDS.get(sweep['kind'], sweep['kind'])}", "",
                  f"Fixed: {fixed}.", "", f"![β sweep]({sweep['plot']})", "", sweep_markdown(sweep)]  # fmt: skip
    return lines, sweeps


def _f(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def concepts_section(results: list[dict], out: Path) -> tuple[list[str], list[dict]]:
    """One row per located concept: zeroing check and (mini-NSD) ground-truth agreement; montages copied."""
    rows, pictures, kept = [], [], []
    for result in results:
        for row in result.get("rows", []):
            kept.append(row)
            truth, ablation = row.get("truth") or {}, row.get("ablation") or {}
            own, rnd = truth.get("own", {}), truth.get("random", {})
            rows.append([subject_name(row["subject"]), row["concept"], row.get("method", "gradcam"),
                         str(row["samples"]),
                         f"{_f(ablation.get('drop_located'), '+.4f')} / {_f(ablation.get('drop_random'), '+.4f')}",
                         _f(ablation.get("wilcoxon_p"), ".2g"), _f(own.get("spearman"), "+.3f"),
                         _f(truth.get("others_max", {}).get("spearman"), "+.3f"), _f(rnd.get("spearman_p95"), "+.3f"),
                         f"{truth['rank']}/{len(truth['per_feature'])}" if truth else "n/a",
                         f"{_f(own.get('top_overlap'), '.2f')} ({_f(truth.get('top_fraction'), '.2f')})"])  # fmt: skip
            montage = Path(row.get("montage", ""))
            if montage.is_file():
                folder = Path(row["folder"])  # <out>/subjXX_<kind>/<concept>: two outs may hold the same concept
                name = (f"concept_{folder.parent.parent.name}_{subject_name(row['subject'])}_{row['kind']}_"
                        f"{folder.name}.png")  # fmt: skip
                (out / GRIDS).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(montage, out / GRIDS / name)
                title = f"{subject_name(row['subject'])} {row['concept']!r} ({row.get('method', 'gradcam')})"
                pictures.append((title, f"{GRIDS}/{name}"))
    if not rows:
        return [], []
    header = ["subject", "concept", "method", "samples", "zeroing drop: located / random", "p", "truth rho",
              "max other", "random 95%", "rank", "top overlap (chance)"]  # fmt: skip
    lines = ["## Concept localization", "",
             "Maps of where the ViT3D's CLIP head reads the concept's CLIP text embedding (tools/evaluate/"
             "locate_concepts.py): gradcam = the paper's Grad-CAM, pattern = the encoding pattern of the concept "
             "score (each voxel's signed correlation with it over the subject's samples; montages: warm where the "
             "response rises with the score, cold where it falls). Zeroing: the drop of the concept score when "
             "the map's top voxels are set to 0, against as many random voxels of the same region (one-sided "
             "Wilcoxon p). Truth (mini-NSD only): "
             "Spearman's rho of the mean map with the true encoding map of the concept (signed for a signed "
             "map), the best rho among the "
             "other features' true maps, random maps' 95th percentile, the concept's rank among all features, "
             "and the top-voxel overlap with its chance level.", "", _markdown(header, rows)]  # fmt: skip
    for title, path in pictures:
        lines += ["", f"{title}, mean map:", "", f"![{title}]({path})"]
    return lines, kept


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    args = cli.parse_args(build_parser(), argv)
    require_writable(args.out, "--out folder")
    found = collect(args.evals)
    report: dict = {"title": args.title, "sources": sorted(r["source"] for rs in found.values() for r in rs)}
    lines = [f"# {args.title}", "",
             f"Made by tools/evaluate/make_report.py from {len(report['sources'])} evaluation files. Every "
             "measured row has its control row (shuffled fMRI, shuffled pairs, shuffled references); published "
             "rows are the paper's (real NSD, full-size models), for reference."]  # fmt: skip
    if args.note:
        lines += ["", args.note]
    if found.get("retrieval"):
        section, report["retrieval"] = retrieval_section(found["retrieval"])
        lines += ["", *section]
    if found.get("recon"):
        section, report["table2"] = reconstruction_section(found["recon"])
        lines += ["", *section]
        section, report["beta_sweeps"] = beta_sweep_section(found["recon"], args.out)
        lines += ["", *section] if section else []
    if found.get("captions"):
        section, report["table1"] = captioning_section(found["captions"])
        lines += ["", *section]
    if found.get("concepts"):
        section, report["concepts"] = concepts_section(found["concepts"], args.out)
        lines += ["", *section] if section else []
    if found.get("recon"):
        section, report["grids"] = grids_section(found["recon"], args.out)
        lines += ["", *section] if section else []
    write_text(args.out / "report.md", "\n".join(lines) + "\n")
    write_json(args.out / "report.json", report)
    print(f"report ({', '.join(f'{len(v)} {k}' for k, v in sorted(found.items()))}) -> {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
