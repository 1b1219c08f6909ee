"""Score reconstructions against their stimuli with the paper's eight image metrics (Table 2), and a shuffled control.

PNGs of --recons and --stimuli are paired by file name (embeds2images.py writes <folder>/recons/<key>.png and
<folder>/stimuli/<key>.png). Metrics (docs/image_metrics.md): PixCorr and SSIM at 425²; two-way identification
(exhaustive over all N−1 distractors, chance 0.5) with AlexNet(2), AlexNet(5), InceptionV3 and CLIP ViT-L/14;
correlation distance (lower is better) with EfficientNet-B1 and SwAV ResNet-50. --protocol braindiffuser (the
paper's) scores the originals, every network at 224² (CLIP at its own size); --protocol mindeye first resizes
both images to 256² and gives AlexNet 256, Inception 342, EffNet 255, SwAV 224. The shuffled control scores recon
j against stimulus p[j] (p: a seeded derangement), so every metric shows its chance level.

Networks are read offline: torchvision's from $TORCH_HOME/hub/checkpoints/<torchvision's file name> or
--weights-dir, CLIP from --clip-model (a folder or a hub id in the Hugging Face cache), SwAV from --swav-weights.
A network that is not there makes its metrics "unavailable" (the reason names the missing file and where to get
it) and the rest are still computed; --require-all makes that an error (exit 2).

Prints a markdown table (metric | value | shuffled | ↑/↓). --json OUT writes {"evaluation": "recon", "run",
"subject", "kind", "recons", "stimuli", "metrics", "shuffled", "n", "protocol", "unavailable", "networks"} and
its provenance OUT.run.json; a rerun with the same settings and inputs is skipped, other settings are refused unless
--overwrite. Labels default to the reconstruction layout: with <recons>/../index.json (embeds2images.py),
run = its "run" or the name of <recons>/../.. (<run>_<decoder>), subject and kind from it; otherwise run =
the name of <recons>/.. . Several folders (--recons A B --stimuli A' B' --json a.json b.json) are scored in one
process, the networks loaded once: every folder is checked before anything is scored.

Full scale (982 test images, GPU; weights in the torchvision cache, SwAV from facebookresearch/swav):
  python tools/evaluate/eval_recon.py --recons /data/brain/runs/recons/vit3d_vae/subj01_avg/recons \\
      --stimuli /data/brain/runs/recons/vit3d_vae/subj01_avg/stimuli \\
      --swav-weights ~/.cache/torch/hub/checkpoints/swav_800ep_pretrain.pth.tar \\
      --json /data/brain/runs/eval/recon_vit3d_vae_subj01_avg.json --device cuda
Tiny (demo, CPU; only PixCorr, SSIM and the tiny CLIP are available there):
  python tools/evaluate/eval_recon.py --recons demo_out/root/runs/recons/vit3d_vae/subj01_avg/recons \\
      --stimuli demo_out/root/runs/recons/vit3d_vae/subj01_avg/stimuli \\
      --clip-model demo_out/tiny_models/clip_vision --json demo_out/root/runs/eval/recon_subj01_avg.json
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from llava_brain import cli
from llava_brain.errors import BadInputError, exits_on_bad_input
from llava_brain.evaluation.controls import derangement
from llava_brain.evaluation.feature_nets import DEFAULT_CLIP, METRIC_NODES, load_networks, network_of, weights_file
from llava_brain.evaluation.image_metrics import (
    DEFAULT_PROTOCOL,
    IDENTIFICATION_METRICS,
    LOWER_IS_BETTER,
    METRICS,
    PROTOCOLS,
)
from llava_brain.evaluation.recon_scores import ImageFiles, pair_folders, score_reconstructions
from llava_brain.io import StageRun, read_json, require_writable, write_json
from llava_brain.io.provenance import fingerprint

TITLES = {
    "pixcorr": "PixCorr", "ssim": "SSIM", "alexnet2": "AlexNet(2)", "alexnet5": "AlexNet(5)",
    "inceptionv3": "Inception", "clip": "CLIP", "effnet": "EffNet-B", "swav": "SwAV",
}  # fmt: skip
UNAVAILABLE = "unavailable"


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--recons", type=Path, nargs="+", required=True,
                   help="folder of reconstruction PNGs (<key>.png); several folders are scored one after another "
                   "with the networks loaded once")  # fmt: skip
    p.add_argument("--stimuli", type=Path, nargs="+", required=True,
                   help="folder of the stimulus PNGs, same file names (one per --recons folder)")  # fmt: skip
    p.add_argument("--metrics", nargs="+", choices=METRICS, default=list(METRICS), metavar="NAME",
                   help=f"metrics to compute, of {' '.join(METRICS)} (default all)")  # fmt: skip
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default=DEFAULT_PROTOCOL,
                   help="braindiffuser (the paper's: originals, networks at 224²) or mindeye (everything through "
                   f"a 256² resize first); default {DEFAULT_PROTOCOL}")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled control's derangement (default 0)")
    p.add_argument("--ties", choices=["half", "loss"], default="half",
                   help="two-way identification ties: half = half a success (default), loss = the published "
                   "scripts' strict '<'")  # fmt: skip
    # Networks
    p.add_argument("--weights-dir", type=Path, default=None,
                   help="folder holding torchvision's weight files under torchvision's names (and SwAV's "
                   "swav_800ep_pretrain.pth.tar); default $TORCH_HOME/hub/checkpoints")  # fmt: skip
    p.add_argument(
        "--clip-model",
        default=DEFAULT_CLIP,
        help=f"CLIP vision model: a local folder or a hub id in the Hugging Face cache (default {DEFAULT_CLIP})",
    )
    p.add_argument("--swav-weights", type=Path, default=None,
                   help="SwAV ResNet-50 state dict (swav_800ep_pretrain.pth.tar); default "
                   "<--weights-dir or $TORCH_HOME/hub/checkpoints>/swav_800ep_pretrain.pth.tar")  # fmt: skip
    p.add_argument(
        "--require-all",
        action="store_true",
        help="exit 2 when a requested metric's network is missing (default: mark it unavailable)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="image pairs per batch (default 16)")
    cli.add_device(p)
    # Labels and output
    p.add_argument("--run", default=None, help="row label stored in the JSON (default: from the folder layout)")
    p.add_argument("--subject", type=int, default=None, help="subject number stored in the JSON (default: index.json)")
    p.add_argument(
        "--kind",
        choices=["avg", "single"],
        default=None,
        help="avg = repeat-averaged, single = first presentation, stored in the JSON (default: index.json)",
    )
    p.add_argument("--json", type=Path, nargs="+", default=None,
                   help="write the scores here (and provenance OUT.run.json); one per --recons folder")  # fmt: skip
    cli.add_overwrite(p, "rescore even if --json holds a result made with other settings or inputs")
    cli.add_quiet(p)
    return p


def labels(args, recons: Path) -> dict:
    """run/subject/kind: the flags, else the reconstruction layout's index.json, else the folder names."""
    folder = recons.resolve().parent  # <run>_<decoder>/subjXX_<kind> in the reconstruction layout
    index_file = folder / "index.json"
    index = read_json(index_file, "the reconstructions' index.json") if index_file.is_file() else {}
    index = index if isinstance(index, dict) else {}
    default_run = index.get("run") or (folder.parent.name if index else folder.name)
    return {
        "run": args.run or default_run,
        "subject": args.subject if args.subject is not None else index.get("subject"),
        "kind": args.kind or index.get("kind"),
    }


def folder_fingerprint(paths: list[Path]) -> dict:
    """One fingerprint of many files: their count and a sha256 over (name, content) in order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        digest.update(fingerprint(path)["sha256"].encode())
    return {"files": len(paths), "sha256": digest.hexdigest()}


def weight_inputs(args, networks: list[str]) -> dict:
    """{network: weight file, or a fingerprint of a local CLIP folder's files} (a hub id is a setting only)."""
    files = {}
    for network in networks:
        if network == "clip":
            folder = Path(args.clip_model)
            if folder.is_dir():
                files["clip"] = folder_fingerprint(sorted(p for p in folder.iterdir() if p.is_file()))
        elif network == "swav" and args.swav_weights:
            files["swav"] = args.swav_weights
        else:
            files[network] = weights_file(network, args.weights_dir)
    return files


def markdown_table(result: dict) -> str:
    lines = ["| metric | value | shuffled | ↑/↓ |", "|---|---|---|---|"]
    for metric in result["metrics"]:
        cells = [format_value(metric, result[key][metric]) for key in ("metrics", "shuffled")]
        lines.append(f"| {TITLES[metric]} | {cells[0]} | {cells[1]} | {'↓' if metric in LOWER_IS_BETTER else '↑'} |")
    return "\n".join(lines)


def format_value(metric: str, value) -> str:
    if isinstance(value, str):
        return value
    return f"{100 * value:.1f}%" if metric in IDENTIFICATION_METRICS else f"{value:.3f}"


def print_result(result: dict) -> None:
    label = ", ".join(f"{k} {result[k]}" for k in ("run", "subject", "kind") if result.get(k) is not None)
    print(f"reconstruction metrics ({label}; n = {result['n']}, protocol {result['protocol']}; "
          "two-way identification chance 50%)")  # fmt: skip
    print(markdown_table(result))
    for metric, reason in result["unavailable"].items():
        print(f"- {TITLES[metric]} unavailable: {reason}")


def check_args(parser: argparse.ArgumentParser, args) -> None:
    if args.batch_size < 1:
        parser.error("--batch-size must be 1 or more")
    if len(args.stimuli) != len(args.recons) or (args.json and len(args.json) != len(args.recons)):
        parser.error("give one --stimuli folder (and one --json file) per --recons folder")
    if len(args.recons) > 1 and (args.run or args.subject is not None or args.kind):
        parser.error("--run, --subject and --kind label one folder; with several, labels come from index.json")


def prepare(args, recons: Path, stimuli: Path, out: Path | None, metrics: list[str], networks: list[str]):
    """(pairs, labels, stage or None, current result or None) of one --recons folder; nothing is loaded yet."""
    pairs = pair_folders(recons, stimuli)
    names = labels(args, recons)
    if out is None:
        return pairs, names, None, None
    settings = {"metrics": metrics, "protocol": args.protocol, "seed": args.seed, "ties": args.ties,
                "clip_model": args.clip_model if "clip" in networks else None, **names}  # fmt: skip
    inputs = {"recons": folder_fingerprint([r for _, r, _ in pairs]),
              "stimuli": folder_fingerprint([s for _, _, s in pairs]), **weight_inputs(args, networks)}  # fmt: skip
    stage = StageRun(out, settings=settings, inputs=inputs, folder=False)
    if not stage.needed(args.overwrite, complete=out.is_file()):
        print(f"{out} is current (same settings and inputs); pass --overwrite to rescore")
        return pairs, names, stage, read_json(out, "an eval_recon.py result")
    return pairs, names, stage, None


def score(args, pairs, names: dict, metrics: list[str], nets: dict, missing: dict, recons: Path, stimuli: Path):
    perm = derangement(len(pairs), args.seed)
    values, shuffled = score_reconstructions(
        ImageFiles(r for _, r, _ in pairs), ImageFiles(s for _, _, s in pairs), metrics=metrics,
        protocol=PROTOCOLS[args.protocol], nets=nets, perm=perm, batch_size=args.batch_size, ties=args.ties,
        progress=iter if args.quiet else partial(tqdm, desc="scoring batches", unit="batch"),
    )  # fmt: skip
    unavailable = {m: str(missing[network_of(m)]) for m in metrics if m not in values}
    return {
        "evaluation": "recon", **names, "recons": str(recons), "stimuli": str(stimuli),
        "metrics": {m: values.get(m, UNAVAILABLE) for m in metrics},
        "shuffled": {m: shuffled.get(m, UNAVAILABLE) for m in metrics},
        "n": len(pairs), "protocol": args.protocol, "seed": args.seed, "ties": args.ties,
        "unavailable": unavailable, "networks": {name: net.source for name, net in nets.items()},
    }  # fmt: skip


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = cli.parse_args(parser, argv)
    check_args(parser, args)
    metrics = [m for m in METRICS if m in args.metrics]  # the paper's order, each once
    outs = args.json or [None] * len(args.recons)
    for out in outs:
        if out is not None:
            require_writable(out, "--json file")
    networks = sorted({network_of(m) for m in metrics if m in METRIC_NODES})
    # Every folder is checked (pairing, labels, rerun rule) before any network is loaded or anything written.
    jobs = [(recons, stimuli, out, *prepare(args, recons, stimuli, out, metrics, networks))
            for recons, stimuli, out in zip(args.recons, args.stimuli, outs, strict=True)]  # fmt: skip
    todo = [job for job in jobs if job[6] is None]
    for job in jobs:
        if job[6] is not None:
            print_result(job[6])
    if not todo:
        return 0
    device = cli.resolve_device(args.device)
    torch.backends.cudnn.allow_tf32 = False  # full fp32 convolutions on GPUs too: the same features as on a CPU
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" of the CLIP folder
    nets, missing = load_networks(metrics, weights_dir=args.weights_dir, clip_model=args.clip_model,
                                  swav_weights=args.swav_weights, device=device)  # fmt: skip
    if missing and args.require_all:
        first = next(iter(missing.values()))
        others = f"; also unavailable: {', '.join(list(missing)[1:])}" if len(missing) > 1 else ""
        raise BadInputError(first.path, f"missing; {first.how} ({first.network} weights, needed with --require-all"
                            f"{others})")  # fmt: skip
    for recons, stimuli, out, pairs, names, stage, _ in todo:
        started = time.monotonic()
        result = score(args, pairs, names, metrics, nets, missing, recons, stimuli)
        print_result(result)
        if stage is not None:
            stage.begin()
            write_json(out, result)
            stage.finish(args, seconds=round(time.monotonic() - started, 2), device=device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
