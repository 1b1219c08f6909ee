"""Read eval_retrieval.py's results and lay them out: one run's full table, or several runs side by side.

eval_retrieval.py writes one JSON per prediction run (default `<run folder>/retrieval.json`):

    {"evaluation": "retrieval", "run": "vit3d", "n": 100, "kinds": ["avg", "single"],
     "subjects": {"subj01": {"avg": {"n": 100, "top1_brain_to_image": ..., "chance": ..., ...}, "single": {...}}},
     "mean": {"avg": {"subjects": [1, 2], "top1_brain_to_image": ..., ...}, "single": {...}},
     "controls": {"shuffled": {"seed": 0, "subjects": {...}, "mean": {...}}}, "unavailable": {}, ...}

Metric names are those of `llava_brain.evaluation.retrieval_report`. Means over subjects are the
evaluator's (this module never averages); a table shows what the file holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llava_brain.errors import BadInputError
from llava_brain.io import read_json

RETRIEVAL_FILE = "retrieval.json"  # eval_retrieval.py's default output inside the prediction run folder
KINDS = ("avg", "single")


def load_retrieval(path: str | Path) -> dict[str, Any]:
    """An eval_retrieval.py result: `path` is the JSON file or the prediction run folder holding retrieval.json."""
    path = Path(path)
    if path.is_dir():
        path = path / RETRIEVAL_FILE
    result = read_json(path, "an eval_retrieval.py result (tools/evaluate/eval_retrieval.py --predictions RUN)")
    if not isinstance(result, dict) or result.get("evaluation") != "retrieval":
        raise BadInputError(path, 'expected an eval_retrieval.py result ("evaluation": "retrieval")')
    if not isinstance(result.get("subjects"), dict) or not isinstance(result.get("mean"), dict):
        raise BadInputError(path, "expected per-subject results under 'subjects' and their 'mean'")
    return result


def _value(block: dict | None, metric: str) -> float | None:
    value = (block or {}).get(metric)
    return value if isinstance(value, int | float) else None


def _cell(block: dict | None, metric: str) -> str:
    """A value, with ' ± sd' when the block holds `<metric>_sd` (MindEye's draws); '-' when absent."""
    value, sd = _value(block, metric), _value(block, f"{metric}_sd")
    if value is None:
        return "-"
    return f"{value:.3f}" if sd is None else f"{value:.3f} ± {sd:.3f}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def retrieval_markdown(result: dict[str, Any]) -> str:
    """One run's table: a row per subject and kind, the mean over subjects, and the shuffled control's mean."""
    columns = [("brain→image", "top1_brain_to_image"), ("image→brain", "top1_image_to_brain"),
               ("chance", "chance"), ("MindEye brain→image", "mindeye300_brain_to_image"),
               ("MindEye image→brain", "mindeye300_image_to_brain"),
               ("MindEye chance", "mindeye300_chance")]  # fmt: skip
    kinds = [k for k in result.get("kinds", KINDS)]
    lines = [_row(["subject", "kind", "n", *[name for name, _ in columns]]), _row(["---"] * (3 + len(columns)))]
    for subject, blocks in result["subjects"].items():
        for kind in kinds:
            if kind in blocks:
                lines.append(_row([subject, kind, str(blocks[kind].get("n", "-")),
                                   *[_cell(blocks[kind], m) for _, m in columns]]))  # fmt: skip
    shuffled = result.get("controls", {}).get("shuffled", {}).get("mean", {})
    for label, means in (("mean", result["mean"]), ("shuffled (mean)", shuffled)):
        for kind in kinds:
            if isinstance(means.get(kind), dict):
                lines.append(_row([label, kind, "", *[_cell(means[kind], m) for _, m in columns]]))
    return "\n".join(lines)


def comparison_table(results: dict[str, dict[str, Any]], *, metric: str = "top1_brain_to_image",
                     kinds: tuple[str, ...] = KINDS) -> str:  # fmt: skip
    """Several runs side by side: a row per subject, then each run's mean and its shuffled control's mean;
    columns chance (of the first run holding the subject) and run x kind. Absent values show "-"."""
    subjects = sorted({s for r in results.values() for s in r["subjects"]})
    columns = [(name, kind) for name in results for kind in kinds]
    lines = [
        _row(["subject", "chance", *[f"{name} {kind}" for name, kind in columns]]),
        _row(["---"] * (2 + len(columns))),
    ]
    for subject in subjects:
        holder = next(r for r in results.values() if subject in r["subjects"])
        chance = _cell(holder["subjects"][subject].get(kinds[0]), _chance_of(metric))
        lines.append(_row([subject, chance, *[_cell(r["subjects"].get(subject, {}).get(k), metric)
                                              for r in results.values() for k in kinds]]))  # fmt: skip
    first = next(iter(results.values()))
    lines.append(_row(["mean", _cell(first["mean"].get(kinds[0]), _chance_of(metric)),
                       *[_cell(r["mean"].get(k), metric) for r in results.values() for k in kinds]]))  # fmt: skip
    shuffled = [r.get("controls", {}).get("shuffled", {}).get("mean", {}) for r in results.values()]
    lines.append(_row(["shuffled (mean)", "", *[_cell(s.get(k), metric) for s in shuffled for k in kinds]]))
    return "\n".join(lines)


def _chance_of(metric: str) -> str:
    return "mindeye300_chance" if metric.startswith("mindeye300_") else "chance"


def table_values(result: dict[str, Any], metric: str, kinds: tuple[str, ...] = KINDS) -> dict[str, Any]:
    """{"subjects": {subject: {kind: value}}, "mean": {kind: value}, "shuffled": {kind: value}} of one metric."""
    shuffled = result.get("controls", {}).get("shuffled", {}).get("mean", {})
    return {
        "subjects": {s: {k: _value(b.get(k), metric) for k in kinds} for s, b in result["subjects"].items()},
        "mean": {k: _value(result["mean"].get(k), metric) for k in kinds},
        "shuffled": {k: _value(shuffled.get(k), metric) for k in kinds},
    }
