"""Write mini-NSD: a small dataset in the exact raw NSD formats, with a learnable brain signal.

The tree it writes (betas HDF5/NIfTI, ROI volumes, nsd_expdesign.mat, nsd_stim_info_merged.csv,
nsd_stimuli.hdf5, COCO annotations) is consumed unchanged by every stage that reads real NSD.
What it simulates and how its files map to real NSD: docs/mini_nsd.md.

The tree is built in `.<out>.partial` and swapped in whole, with `run.json` (the settings) written
last; a rerun with the same settings skips, with other settings refuses (exit 2) unless --overwrite,
and after a kill removes the staging folder and starts again (same seed, same files).

  python prepare_datasets/make_mini_nsd.py --out data/mini_nsd                     # default: 4 subjects, ~16 s
  python prepare_datasets/make_mini_nsd.py --out /tmp/tiny --subject 1 --sessions 2  # smoke
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from llava_brain import cli
from llava_brain.errors import BadInputError, exits_on_bad_input
from llava_brain.io import StageRun, manifest_of, require_writable
from llava_brain.nsd.constants import NUM_SUBJECTS
from llava_brain.simulate import MiniNsdConfig, write_mini_nsd

log = logging.getLogger("make_mini_nsd")


def nsd_subjects(args: argparse.Namespace) -> tuple[range, Path, str]:
    """`--subject` source: any of NSD's 8 subjects can be simulated ('all' = 1..8)."""
    return range(1, NUM_SUBJECTS + 1), args.out, "NSD subjects"


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    defaults = MiniNsdConfig()
    p = argparse.ArgumentParser(
        description=__doc__,
        add_help=add_help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a renamed flag's old prefix (--all of --all-images) must not still work
    )
    # Output
    p.add_argument("--out", type=Path, required=True, help="folder to create; it becomes the raw NSD root")
    cli.add_overwrite(p, "replace an existing mini-NSD at --out (made with other settings, or not finished)")
    # Design
    cli.add_subject(
        p,
        source=nsd_subjects,
        default=defaults.subjects,
        help="NSD subject numbers (1-8) to simulate, or 'all'; each gets its own grid (NSD's scaled down). "
        f"Default: {' '.join(map(str, defaults.subjects))}",
    )
    p.add_argument(
        "--sessions",
        type=int,
        default=None,
        help="sessions each subject completed (default: all sessions of the design, "
        "3 x images-per-subject / trials-per-session); fewer leaves images shown < 3 times",
    )
    p.add_argument("--seed", type=int, default=defaults.seed, help="random seed; the same seed gives identical files")
    p.add_argument(
        "--num-shared",
        type=int,
        default=defaults.num_shared,
        help="shared test images seen by every subject (NSD: 1000)",
    )
    p.add_argument(
        "--images-per-subject",
        type=int,
        default=defaults.images_per_subject,
        help="images in each subject's list, shared ones included (NSD: 10000)",
    )
    p.add_argument(
        "--trials-per-session",
        type=int,
        default=defaults.trials_per_session,
        help="stimulus trials per session (NSD: 750)",
    )
    # Volumes
    p.add_argument(
        "--grid-scale",
        type=float,
        default=defaults.grid_scale,
        help="mini grid = round(NSD func1pt8mm grid of the subject x scale); 0.33 gives ~27 voxels a side",
    )
    p.add_argument(
        "--nifti-subjects",
        type=int,
        nargs="*",
        default=list(defaults.nifti_subjects),
        help="subjects whose betas are also written as betas_sessionNN.nii.gz (HDF5 is always written)",
    )
    p.add_argument(
        "--snr",
        type=float,
        nargs=2,
        default=list(defaults.snr_range),
        metavar=("LOW", "HIGH"),
        help="range of the noise-ceiling SNR (signal sd / noise sd) of visual voxels",
    )
    cli.add_quiet(p)
    return p  # fmt: skip


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = cli.parse_args(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = MiniNsdConfig.from_arguments(vars(args))
    try:
        cfg.validate()
    except ValueError as err:
        parser.error(str(err))
    require_writable(args.out, "--out")

    run = StageRun(args.out, settings=cfg.settings(), folder=True)  # simulated: no input files
    if args.out.exists() and not args.overwrite and not manifest_of(args.out).is_file():
        # Not ours (or a tree written without the CLI): never replace a folder we did not finish.
        raise BadInputError(args.out, "exists but is not a finished mini-NSD tree; pass --overwrite or another --out")
    if not run.needed(args.overwrite):
        log.info("mini-NSD already complete at %s (same settings); nothing to do", args.out)
        return 0
    summary = write_mini_nsd(
        args.out, cfg, progress=not args.quiet, replace=True,
        finish=lambda staging, summary: run.finish(args, into=staging, summary=summary),
    )  # fmt: skip
    log.info("wrote mini-NSD to %s in %.1f s", args.out, summary["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
