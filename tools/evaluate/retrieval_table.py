"""Print test retrieval of several decoders side by side (e.g. the ViT3D beside the ridge baseline) and chance.

Each --run is NAME=PATH: a pretrain_vit3d.py output folder (its metrics.json, last epoch) or a
ridge_baseline.py run <out>/ridge_<area>[_pixels] (its per-subject folders PATH_subjXX/metrics.json). Rows
are subjects and their mean; columns are chance and, per run, the repeat-averaged ("avg") and single-trial
("single") test sets (the test set is NSD's shared-1000 images). Metric names are those of
llava_brain.evaluation.retrieval_report (top-1 among all test images by default; mindeye300_* for MindEye's
300-image protocol). --json is checked for writability before anything is read.

Full scale:
  python tools/evaluate/retrieval_table.py --run ridge=/data/brain/runs/ridge/ridge_nsdgeneral \\
      --run vit3d=/data/brain/runs/vit3d --json /data/brain/runs/retrieval_table.json
Tiny (demo):
  python tools/evaluate/retrieval_table.py --run ridge=demo_out/root/runs/ridge/ridge_nsdgeneral \\
      --run vit3d=demo_out/runs/vit3d
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llava_brain import cli
from llava_brain.errors import exits_on_bad_input
from llava_brain.evaluation.report import comparison_table, load_run
from llava_brain.io import require_writable, write_json

METRICS = ("top1_brain_to_image", "top1_image_to_brain", "mindeye300_brain_to_image", "mindeye300_image_to_brain",
           "mse", "cosine")  # fmt: skip


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run", action="append", required=True, metavar="NAME=PATH",
                   help="a run to show: NAME=a pretrain_vit3d.py --out folder, or NAME=a ridge_baseline.py "
                   "run <out>/ridge_<area>[_pixels]; repeat for more columns")  # fmt: skip
    p.add_argument("--metric", default="top1_brain_to_image", choices=METRICS,
                   help="which metric to tabulate (default top1_brain_to_image)")  # fmt: skip
    p.add_argument("--json", type=Path, help="also write {name: {subject: metrics}} here")
    return p


def _parse_runs(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, Path]:
    runs = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            parser.error(f"--run takes NAME=PATH, got {item!r}")
        if name in runs:
            parser.error(f"--run name {name!r} given twice")
        runs[name] = Path(path)
    return runs


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = cli.parse_args(parser, argv)
    if args.json:
        require_writable(args.json, "--json file")
    results = {name: load_run(path) for name, path in _parse_runs(parser, args.run).items()}
    print(f"test retrieval, {args.metric} (avg: repeat-averaged trials, single: first presentation)")
    print(comparison_table(results, metric=args.metric))
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
