"""Write mini-NSD: a small dataset in the exact raw NSD formats, with a learnable brain signal.

The tree it writes (betas HDF5/NIfTI, ROI volumes, nsd_expdesign.mat, nsd_stim_info_merged.csv,
nsd_stimuli.hdf5, COCO annotations) is consumed unchanged by every stage that reads real NSD.
What it simulates and how its files map to real NSD: docs/mini_nsd.md.

  python prepare_datasets/make_mini_nsd.py --out data/mini_nsd                      # default: 4 subjects, ~16 s
  python prepare_datasets/make_mini_nsd.py --out /tmp/tiny --subjects 1 --sessions 2  # smoke
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from llava_brain.errors import BadInputError, exits_on_bad_input
from llava_brain.io import read_json, write_run_json
from llava_brain.simulate import MANIFEST, MiniNsdConfig, write_mini_nsd

log = logging.getLogger("make_mini_nsd")


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    defaults = MiniNsdConfig()
    p = argparse.ArgumentParser(
        description=__doc__, add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # Output
    p.add_argument("--out", type=Path, required=True, help="folder to create; it becomes the raw NSD root")
    p.add_argument("--overwrite", action="store_true", help="replace an existing mini-NSD at --out")
    # Design
    p.add_argument(
        "--subjects",
        type=int,
        nargs="+",
        default=list(defaults.subjects),
        help="NSD subject numbers (1-8) to simulate; each gets its own grid (NSD's scaled down)",
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
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p  # fmt: skip


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = MiniNsdConfig(
        subjects=tuple(args.subjects),
        sessions=args.sessions,
        seed=args.seed,
        num_shared=args.num_shared,
        images_per_subject=args.images_per_subject,
        trials_per_session=args.trials_per_session,
        grid_scale=args.grid_scale,
        nifti_subjects=tuple(args.nifti_subjects),
        snr_range=tuple(args.snr),
    )
    try:
        cfg.validate()
    except ValueError as err:
        build_parser().error(str(err))

    manifest = args.out / MANIFEST
    if args.out.exists() and not args.overwrite:
        if not manifest.is_file():
            raise BadInputError(
                args.out, "exists but is not a finished mini-NSD tree; pass --overwrite or another --out"
            )
        previous = read_json(manifest, "a mini-NSD manifest")
        if previous.get("config", {}) != json.loads(json.dumps(cfg.__dict__)):
            raise BadInputError(manifest, "was written with other settings; pass --overwrite to regenerate")
        log.info("mini-NSD already complete at %s (same settings); nothing to do", args.out)
        return 0
    if args.out.exists():
        shutil.rmtree(args.out)
    summary = write_mini_nsd(args.out, cfg, progress=not args.quiet)
    write_run_json(args.out, args, summary=summary)
    log.info("wrote mini-NSD to %s in %.1f s", args.out, summary["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
