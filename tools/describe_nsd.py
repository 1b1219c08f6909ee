"""Summarise a raw NSD tree (real or mini-NSD) through the NSD readers, and optionally check decodability.

Prints, per subject: volume grid, sessions and trials on disk, train/test trials and test images
(split by `sharedix`), voxels per ROI area. With --ridge-check, fits ridge regression from single
training trials of `nsdgeneral` to an 8x8 pixel embedding and reports top-1 retrieval of the test
images (repeat-averaged and first trial) next to chance, plus the median empirical noise-ceiling SNR.

"Test" is NSD's shared-1000 set; there is no separate validation split. `--subject` takes subject numbers
or 'all' (default: every subject with a betas folder); one the tree lacks stops it with one line.

Full scale (real NSD: reads headers only):
  python tools/describe_nsd.py --nsd-root /data/nsd --subject 1 2 5 7 --json runs/nsd/nsd_summary.json
Tiny (mini-NSD, with the decodability check):
  python tools/describe_nsd.py --nsd-root demo_out/mini_nsd --ridge-check
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from llava_brain import cli
from llava_brain.errors import exits_on_bad_input
from llava_brain.io import require_writable, write_json
from llava_brain.layout import NsdTree, subject_name
from llava_brain.nsd import BetaSession, ExpDesign, NsdStimuli, StimInfo, area_masks, available_atlases


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--nsd-root", type=Path, required=True, help="root of the raw NSD tree (holds nsddata/, nsddata_betas/)"
    )
    cli.add_subject(p, source=cli.nsd_source, help="subjects to describe, or 'all' (default: every subject with betas)")
    p.add_argument("--ridge-check", action="store_true", help="also run the ridge retrieval check (reads all betas)")
    p.add_argument("--alpha", type=float, default=300.0, help="ridge penalty of --ridge-check")
    p.add_argument("--json", type=Path, default=None, help="also write the summary as JSON to this file")
    return p


def describe_subject(tree: NsdTree, design: ExpDesign, subject: int) -> dict:
    sessions = tree.sessions(subject, "hdf5")
    fmt = "hdf5"
    if not sessions:
        sessions, fmt = tree.sessions(subject, "nifti"), "nifti"
    grid, num_trials = None, 0
    for session in sessions:  # headers only: opening a session checks name, rank, dtype and grid
        with BetaSession(tree.betas(subject, session, fmt), expect_grid=grid) as f:
            grid = f.grid
            num_trials += f.num_trials
    nsd_ids = design.trial_images(subject, num_trials)
    test = design.is_shared(nsd_ids)
    masks = area_masks(tree, subject, available_atlases(tree, subject), expect_grid=grid)
    return {
        "grid_xyz": list(grid) if grid else None,
        "betas_format": fmt,
        "sessions": len(sessions),
        "trials": num_trials,
        "train_trials": int((~test).sum()),
        "test_trials": int(test.sum()),
        "test_images": int(np.unique(nsd_ids[test]).size),
        "train_images": int(np.unique(nsd_ids[~test]).size),
        "area_voxels": {name: int(mask.sum()) for name, mask in masks.items()},
    }


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    args = cli.parse_args(build_parser(), argv)
    if args.json:
        require_writable(args.json, "--json file")
    tree = NsdTree(args.nsd_root)
    design = ExpDesign.load(tree.expdesign)
    info = StimInfo.load(tree.stim_info)
    with NsdStimuli(tree.stimuli) as stimuli:
        num_images, image_size = len(stimuli), stimuli.image_size
    summary = {
        "nsd_root": str(args.nsd_root),
        "images": num_images,
        "image_size": list(image_size),
        "shared_images": int(design.shared.size),
        "stim_info_rows": len(info),
        "subjects": {},
    }
    print(f"NSD tree {args.nsd_root}: {num_images} images of {image_size[0]}x{image_size[1]}, "
          f"{design.shared.size} shared (test) images")  # fmt: skip
    for subject in args.subject:
        row = describe_subject(tree, design, subject)
        summary["subjects"][subject] = row
        grid = "x".join(str(n) for n in row["grid_xyz"])
        print(
            f"  {subject_name(subject)}: grid {grid} ({row['betas_format']}), {row['sessions']} sessions, "
            f"{row['trials']} trials = {row['train_trials']} train + {row['test_trials']} test, "
            f"{row['test_images']} test images, nsdgeneral {row['area_voxels'].get('nsdgeneral', 0)} voxels"
        )
        if args.ridge_check:
            from llava_brain.simulate.calibration import ridge_retrieval_check

            check = ridge_retrieval_check(tree, subject, alpha=args.alpha)
            row["ridge_check"] = check.__dict__
            print(f"    ridge retrieval top-1 among {check.num_test_images}: averaged {check.top1_averaged:.2f}, "
                  f"single trial {check.top1_single:.2f} (chance {check.chance:.2f}); "
                  f"median voxel ncsnr {check.median_voxel_snr:.2f}")  # fmt: skip
    if args.json:
        write_json(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
