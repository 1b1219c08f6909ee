"""The β sweep of the unCLIP decoder (the paper's Fig. 5): PixCorr and CLIP two-way identification against β.

A sweep is found, not declared: eval_recon.py results whose reconstruction folders (embeds2images.py
--decoder unclip, index.json's "unclip" block) share every decoder setting but β, for one protocol and kind,
and that cover at least MIN_BETAS values of β. Each point is the mean over the subjects scored at that β;
the shuffled-pairs control of the same folders is drawn beside it (dashed), so a curve reads against chance.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from llava_brain.io import read_json

MIN_BETAS = 3
# (metric key of eval_recon.py, axis label, scale to the plotted unit)
PLOTTED = (("pixcorr", "PixCorr", 1.0), ("clip", "CLIP two-way (%)", 100.0))
# Settings that do not separate sweeps: β is the swept one, and the run label only names the folder.
_FREE = ("beta",)


def unclip_settings(result: dict[str, Any]) -> dict[str, Any] | None:
    """The decoder settings of a scored folder (index.json beside its recons/), or None if it was not unCLIP."""
    recons = result.get("recons")
    if not recons:
        return None
    index = Path(recons).parent / "index.json"
    if not index.is_file():
        return None
    return read_json(index, "a reconstruction index (embeds2images.py)").get("unclip")


def _mean(values: list) -> float | None:
    numbers = [v for v in values if isinstance(v, int | float)]
    return sum(numbers) / len(numbers) if numbers else None


def find_sweeps(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sweeps in eval_recon.py results: [{"protocol", "kind", "settings", "points": [{"beta", "run",
    "subjects", "values": {metric: mean}, "shuffled": {metric: mean}}] sorted by β}]."""
    groups: dict[tuple, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    fixed: dict[tuple, dict] = {}
    for result in results:
        settings = unclip_settings(result)
        if not settings or not settings.get("vae_init", True) or "beta" not in settings:
            continue  # β means nothing without the VAE start
        rest = {k: v for k, v in sorted(settings.items()) if k not in _FREE}
        key = (result.get("protocol"), result.get("kind"), repr(rest))
        groups[key][float(settings["beta"])].append(result)
        fixed[key] = rest
    sweeps = []
    for key, by_beta in sorted(groups.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
        if len(by_beta) < MIN_BETAS:
            continue
        points = []
        for beta, members in sorted(by_beta.items()):
            metrics = [m for m, _, _ in PLOTTED]
            points.append({
                "beta": beta,
                "run": sorted({r["run"] for r in members}),
                "subjects": sorted(r.get("subject") for r in members if r.get("subject") is not None),
                "values": {m: _mean([r["metrics"].get(m) for r in members]) for m in metrics},
                "shuffled": {m: _mean([r.get("shuffled", {}).get(m) for r in members]) for m in metrics},
            })  # fmt: skip
        sweeps.append({"protocol": key[0], "kind": key[1], "settings": fixed[key], "points": points})
    return sweeps


def plot_sweep(sweep: dict[str, Any], path: Path, title: str = "") -> Path:
    """Two panels (PixCorr, CLIP two-way) against β, measured and shuffled, written as a PNG at path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on GPU nodes or CI
    import matplotlib.pyplot as plt

    betas = [p["beta"] for p in sweep["points"]]
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(4.2 * len(PLOTTED), 3.4), constrained_layout=True)
    for ax, (metric, label, scale) in zip(axes, PLOTTED, strict=True):
        for field, style, name in (("values", "o-", "reconstructions"), ("shuffled", "s--", "shuffled pairs")):
            ys = [p[field][metric] for p in sweep["points"]]
            if all(y is None for y in ys):
                continue
            ax.plot(betas, [None if y is None else y * scale for y in ys], style, label=name)
        if metric == "clip":
            ax.axhline(50.0, color="grey", linewidth=0.8, linestyle=":", label="chance")
        ax.set_xlabel("β (strength: 1 = pure noise start)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    subjects = ", ".join(str(s) for s in sorted({s for p in sweep["points"] for s in p["subjects"]}))
    fig.suptitle(title or f"β sweep: protocol {sweep['protocol']}, {sweep['kind']}, subjects {subjects}",
                 fontsize=10)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}")
    fig.savefig(partial, format="png", dpi=110)
    plt.close(fig)
    partial.replace(path)
    return path


def sweep_markdown(sweep: dict[str, Any]) -> str:
    """The plotted numbers as a table (the PNG's data, readable without it)."""
    lines = ["| β | n | PixCorr | CLIP two-way | shuffled PixCorr | shuffled CLIP |", "|---|---|---|---|---|---|"]
    for p in sweep["points"]:
        v, s = p["values"], p["shuffled"]
        cells = [_fmt(v["pixcorr"], 1, 3), _fmt(v["clip"], 100, 1), _fmt(s["pixcorr"], 1, 3), _fmt(s["clip"], 100, 1)]
        lines.append(f"| {p['beta']:g} | {len(p['subjects'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value, scale: float, digits: int) -> str:
    return f"{value * scale:.{digits}f}" if isinstance(value, int | float) else "n/a"
