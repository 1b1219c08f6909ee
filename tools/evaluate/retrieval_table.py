"""Print test retrieval of several encoders side by side (e.g. the ViT3D beside the ridge baseline), with
chance and each run's shuffled control.

Each --run is NAME=PATH: an eval_retrieval.py result (its --json file) or the prediction run folder holding
it (retrieval.json). Rows are subjects, each run's mean over subjects (computed by eval_retrieval.py), and
the shuffled control's mean; columns are chance and, per run, the repeat-averaged ("avg") and single-trial
("single") test sets (NSD's shared-1000 images). Metric names are those of
llava_brain.evaluation.retrieval_report (top-1 among all test images by default; mindeye300_* for MindEye's
300-image protocol, shown as mean ± sd over its draws). --json is checked for writability before anything
is read.

Full scale:
  python tools/evaluate/retrieval_table.py --run ridge=/data/brain/runs/predictions/ridge_nsdgeneral \\
      --run vit3d=/data/brain/runs/predictions/vit3d --json /data/brain/runs/eval/retrieval_table.json
Tiny (demo):
  python tools/evaluate/retrieval_table.py --run ridge=demo_out/root/runs/predictions/ridge_nsdgeneral \\
      --run vit3d=demo_out/root/runs/predictions/vit3d
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llava_brain import cli
from llava_brain.errors import exits_on_bad_input
from llava_brain.evaluation.report import comparison_table, load_retrieval, table_values
from llava_brain.io import require_writable, write_json

METRICS = ("top1_brain_to_image", "top1_image_to_brain", "mindeye300_brain_to_image", "mindeye300_image_to_brain",
           "mse", "cosine")  # fmt: skip


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run", action="append", required=True, metavar="NAME=PATH",
                   help="a run to show: NAME=an eval_retrieval.py JSON, or the prediction run folder holding "
                   "its retrieval.json; repeat for more columns")  # fmt: skip
    p.add_argument("--metric", default="top1_brain_to_image", choices=METRICS,
                   help="which metric to tabulate (default top1_brain_to_image)")  # fmt: skip
    p.add_argument("--json", type=Path,
                   help="also write {metric, runs: {name: {source, subjects, mean, shuffled}}} here")  # fmt: skip
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
    paths = _parse_runs(parser, args.run)
    results = {name: load_retrieval(path) for name, path in paths.items()}
    print(f"test retrieval, {args.metric} (avg: repeat-averaged trials, single: first presentation)")
    print(comparison_table(results, metric=args.metric))
    if args.json:
        runs = {name: {"source": str(paths[name]), **table_values(r, args.metric)} for name, r in results.items()}
        write_json(args.json, {"metric": args.metric, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
