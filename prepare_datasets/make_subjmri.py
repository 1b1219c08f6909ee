"""Raw NSD betas -> z-scored fMRI arrays of the dataset root, per subject (whole brain and areas).

For each subject, writes under `<dataset-root>/nsd/fmris/subjXX/`:
  whole/nsd_betas_{tr,te}.npy (samples, X, Y, Z) float16, whole/nsd_betas_{mean,std}.npy,
  whole/masks.npz, whole/meta.json, area/nsd_{area}_betas_{tr,te,mean,std}.npy (samples, voxels)
  float32, nsd_fmri2image.json (image, repeat and trial of every sample) and run.json.
Betas are divided by 300 and z-scored per voxel with training statistics; trials of the shared
images (`sharedix`) form the test split. Formats, choices and disk/time figures: docs/prepare.md.

Memory: two sessions of int16 betas (the one being written and the one read ahead; NSD: 2 x 1.05
GB) plus ~0.3 GB of blocks, whatever the number of sessions (measured peak RSS 3.0 GB at NSD's grid,
benchmarks/bench_make_subjmri.py); outputs go to disk block by block.

Full scale (real NSD, 4 subjects x 40 sessions):
  python prepare_datasets/make_subjmri.py --nsd-root /data/nsd --dataset-root /data/brain \\
      --subject 1 2 5 7 --sessions all --areas nsdgeneral streams
Tiny (mini-NSD, seconds):
  python prepare_datasets/make_subjmri.py --nsd-root demo_out/mini_nsd --dataset-root demo_out/root --subject all
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from llava_brain.errors import BadInputError, exits_on_bad_input
from llava_brain.layout import DatasetRoot, NsdTree, subject_name
from llava_brain.nsd import available_atlases
from llava_brain.nsd.extract import (
    extract_subject,
    finished_settings,
    parse_sessions,
    plan_subject,
    recover_interrupted,
)

log = logging.getLogger("make_subjmri")


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--nsd-root", type=Path, required=True, help="raw NSD tree (nsddata/, nsddata_betas/, ...)")
    p.add_argument("--dataset-root", type=Path, required=True, help="prepared dataset root; writes <root>/nsd/fmris/")
    p.add_argument(
        "--subject",
        nargs="+",
        default=["all"],
        help="NSD subject numbers (1-8), or 'all' = every subject with betas in --nsd-root (default: all; "
        "the paper uses 1 2 5 7)",
    )
    p.add_argument(
        "--sessions",
        default="all",
        help="sessions to extract: 'all' (1 to the last session file found; a gap is an error), "
        "a range '1-37' or a list '1,3,5-7' (default: all)",
    )
    p.add_argument(
        "--areas",
        nargs="+",
        default=["nsdgeneral", "streams"],
        help="ROI atlases of roi/ to extract as areas, or 'all' = every atlas the subject has. A single-label "
        "atlas is one area (nsdgeneral); each label of a multi-label atlas is its own (streams -> early, "
        "midventral, ..., parietal). Default: nsdgeneral streams",
    )
    p.add_argument(
        "--betas-format",
        choices=["hdf5", "nifti"],
        default="hdf5",
        help="read betas_sessionNN.hdf5 (fast: uncompressed chunk reads) or .nii.gz (gzip: ~3x slower); "
        "both give identical output",
    )
    p.add_argument(
        "--prefetch",
        type=int,
        default=1,
        help="sessions read ahead in a background thread while one is written (default 1); each costs one "
        "session of memory (NSD: 1.05 GB)",
    )
    p.add_argument("--overwrite", action="store_true", help="redo subjects that are already finished")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _subjects(tree: NsdTree, requested: list[str], betas_format: str) -> list[int]:
    found = [s for s in tree.subjects() if tree.sessions(s, betas_format)]
    if [r.lower() for r in requested] == ["all"]:
        if not found:
            raise BadInputError(tree.root / "nsddata_betas", f"no subject has {betas_format} betas under this NSD root")
        return found
    try:
        subjects = [int(r) for r in requested]
    except ValueError:
        raise BadInputError(tree.root, f"--subject takes numbers 1-8 or 'all'; got {requested}") from None
    return subjects


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.prefetch < 0:
        build_parser().error("--prefetch must be 0 or more")
    try:
        parse_sessions(args.sessions, [1])
    except ValueError as err:
        build_parser().error(str(err))
    tree, layout = NsdTree(args.nsd_root), DatasetRoot(args.dataset_root)
    if not tree.expdesign.is_file():
        raise BadInputError(tree.expdesign, "missing; expected NSD's design file (is --nsd-root the raw NSD tree?)")

    for subject in _subjects(tree, args.subject, args.betas_format):
        atlases = available_atlases(tree, subject) if [a.lower() for a in args.areas] == ["all"] else args.areas
        plan = plan_subject(tree, subject, args.sessions, atlases, args.betas_format)
        recover_interrupted(layout, subject)
        previous = finished_settings(layout, subject)
        if previous is not None and not args.overwrite:
            if previous != plan.settings():
                raise BadInputError(
                    layout.fmri_dir(subject) / "run.json",
                    f"was written with other settings ({previous}); pass --overwrite to redo {subject_name(subject)}",
                )
            log.info("%s: already finished with the same settings; skipped", subject_name(subject))
            continue
        start = time.perf_counter()
        summary = extract_subject(layout, plan, args=args, progress=not args.quiet, prefetch=args.prefetch)
        log.info(
            "%s: %d sessions -> %d train + %d test samples, %d areas, in %.1f s -> %s",
            subject_name(subject), summary["sessions"], summary["train"], summary["test"], len(plan.areas),
            time.perf_counter() - start, layout.fmri_dir(subject),
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
