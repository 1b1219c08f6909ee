"""Read the retrieval results of different decoders into one shape, and lay them side by side.

Both writers use the same metric names (`llava_brain.evaluation.retrieval_report`) under a test-set kind:
`avg/<metric>` (repeat-averaged test trials) and `single/<metric>` (first presentation only).

- pretrain_vit3d.py: `<run>/metrics.json` is a list of per-epoch dicts with keys `subjXX/<kind>/<metric>`;
  the last epoch is the result.
- tools/evaluate/ridge_baseline.py: one folder per subject, `<prefix>_subjXX/metrics.json`, whose
  "metrics" dict holds `<kind>/<metric>`; a run is named by the prefix (`DatasetRoot.ridge_run`, e.g.
  `<root>/runs/ridge/ridge_nsdgeneral`), and every subject folder of that prefix is read.
"""

from __future__ import annotations

import re
from pathlib import Path

from llava_brain.errors import BadInputError
from llava_brain.io import read_json
from llava_brain.layout import DatasetRoot, subject_name

METRICS_FILE = "metrics.json"  # the file name both writers use
_SUBJECT_KEY = re.compile(r"^(subj\d\d)/(.+)$")


def load_run(path: str | Path) -> dict[str, dict[str, float]]:
    """{"subj01": {"avg/top1_brain_to_image": ..., ...}, ...} from a ViT3D run folder or a ridge prefix."""
    path = Path(path)
    if (path / METRICS_FILE).is_file():
        return _load_epochs(path / METRICS_FILE)
    folders = {s: p for s, p in DatasetRoot.ridge_subject_runs(path).items() if (p / METRICS_FILE).is_file()}
    if not folders:
        raise BadInputError(path, f"expected a folder with {METRICS_FILE} (pretrain_vit3d.py) or folders "
                                  f"{path.name}_subjXX/{METRICS_FILE} (ridge_baseline.py); found neither")  # fmt: skip
    out = {}
    for subject, folder in folders.items():
        result = read_json(folder / METRICS_FILE, "ridge_baseline.py results with a 'metrics' dict")
        if not isinstance(result, dict) or not isinstance(result.get("metrics"), dict):
            raise BadInputError(folder / METRICS_FILE, "expected a dict with a 'metrics' dict")
        out[subject_name(subject)] = {k: float(v) for k, v in result["metrics"].items()}
    return out


def _load_epochs(path: Path) -> dict[str, dict[str, float]]:
    epochs = read_json(path, "pretrain_vit3d.py metrics: a list of per-epoch dicts")
    if not isinstance(epochs, list) or not epochs or not isinstance(epochs[-1], dict):
        raise BadInputError(path, "expected a non-empty list of per-epoch dicts")
    out: dict[str, dict[str, float]] = {}
    for key, value in epochs[-1].items():
        match = _SUBJECT_KEY.match(key)
        if match:
            out.setdefault(match.group(1), {})[match.group(2)] = float(value)
    if not out:
        raise BadInputError(path, "the last epoch holds no per-subject metrics (keys subjXX/<kind>/<metric>)")
    return out


def comparison_table(runs: dict[str, dict[str, dict[str, float]]], *, metric: str = "top1_brain_to_image",
                     kinds: tuple[str, ...] = ("avg", "single")) -> str:  # fmt: skip
    """A Markdown table: one row per subject (and their mean), columns chance + run x kind.

    Subjects missing from a run show "-"; the mean row averages each column over the subjects it has.
    """
    subjects = sorted({s for run in runs.values() for s in run})
    columns = [(name, kind) for name in runs for kind in kinds]
    header = ["subject", "chance", *[f"{name} {kind}" for name, kind in columns]]
    rows, sums = [], {c: [] for c in ["chance", *columns]}
    for subject in subjects:
        chance = next((run[subject].get(f"{kinds[0]}/chance") for run in runs.values() if subject in run), None)
        cells = [subject, _fmt(chance)]
        if chance is not None:
            sums["chance"].append(chance)
        for name, kind in columns:
            value = runs[name].get(subject, {}).get(f"{kind}/{metric}")
            cells.append(_fmt(value))
            if value is not None:
                sums[(name, kind)].append(value)
        rows.append(cells)
    mean = ["mean", *[_fmt(sum(v) / len(v) if v else None) for v in sums.values()]]
    lines = [header, ["---"] * len(header), *rows, mean]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
