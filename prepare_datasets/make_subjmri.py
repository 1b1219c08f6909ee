"""Raw NSD betas -> z-scored fMRI arrays of the dataset root, per subject (whole brain and areas).

For each subject, writes under `<dataset-root>/nsd/fmris/subjXX/`:
  whole/nsd_betas_{tr,te}.npy (samples, X, Y, Z) float16, whole/nsd_betas_{mean,std}.npy,
  whole/masks.npz, whole/meta.json, area/nsd_{area}_betas_{tr,te,mean,std}.npy (samples, voxels)
  float32, nsd_fmri2image.json (image, repeat and trial of every sample) and run.json.
Betas are divided by 300 and z-scored per voxel with training statistics; trials of the shared
images (`sharedix`, NSD's shared-1000 test set) form the test split ("te"/"val"). Formats, choices
and disk/time figures: docs/prepare.md.

A finished subject is skipped when its settings and input files are unchanged, refused (exit 2,
naming what changed) when they differ, and redone with --overwrite.

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

from llava_brain import cli
from llava_brain.errors import BadInputError, exits_on_bad_input
from llava_brain.io import recover_staged, require_writable
from llava_brain.layout import DatasetRoot, NsdTree, subject_name
from llava_brain.nsd import available_atlases
from llava_brain.nsd.extract import extract_subject, parse_sessions, plan_subject
from llava_brain.runtime import limit_threads

log = logging.getLogger("make_subjmri")


def betas_source(args: argparse.Namespace) -> tuple[list[int], Path, str]:
    """`--subject` source: subjects of --nsd-root with betas files in --betas-format.

    Like `cli.nsd_source`, but 'all' with --betas-format nifti must mean the subjects that have
    NIfTI betas (mini-NSD writes them for subj01 only), not every subject with a betas folder.
    """
    tree = NsdTree(args.nsd_root)
    found = [s for s in tree.subjects() if tree.sessions(s, args.betas_format)]
    return found, tree.root / "nsddata_betas" / "ppdata", f"subjects with {args.betas_format} betas"


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__,
        add_help=add_help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a renamed flag's old prefix (--all of --all-images) must not still work
    )
    p.add_argument("--nsd-root", type=Path, required=True, help="raw NSD tree (nsddata/, nsddata_betas/, ...)")
    cli.add_dataset_root(p, "prepared dataset root; writes <root>/nsd/fmris/")
    cli.add_subject(
        p,
        source=betas_source,
        help="NSD subject numbers (1-8), or 'all' = every subject with betas of --betas-format in --nsd-root "
        "(default: all; the paper uses 1 2 5 7)",
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
    cli.add_overwrite(p, "redo subjects that are finished, or whose settings or input files changed")
    cli.add_quiet(p)
    return p


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = cli.parse_args(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    limit_threads()
    if args.prefetch < 0:
        parser.error("--prefetch must be 0 or more")
    try:
        parse_sessions(args.sessions, [1])
    except ValueError as err:
        parser.error(str(err))
    tree, layout = NsdTree(args.nsd_root), DatasetRoot(args.dataset_root)
    if not tree.expdesign.is_file():
        raise BadInputError(tree.expdesign, "missing; expected NSD's design file (is --nsd-root the raw NSD tree?)")
    require_writable(layout.fmris_dir, "--dataset-root")

    for subject in args.subject:
        atlases = available_atlases(tree, subject) if [a.lower() for a in args.areas] == ["all"] else args.areas
        plan = plan_subject(tree, subject, args.sessions, atlases, args.betas_format)
        recover_staged(layout.fmri_dir(subject))  # a killed earlier run may have left its staging folder
        run = plan.stage_run(tree, layout)
        if not run.needed(args.overwrite):
            log.info("%s: finished with the same settings and inputs; skipped", subject_name(subject))
            continue
        start = time.perf_counter()
        summary = extract_subject(layout, plan, run, args=args, progress=not args.quiet, prefetch=args.prefetch)
        log.info(
            "%s: %d sessions -> %d train + %d test samples, %d areas, in %.1f s -> %s",
            subject_name(subject), summary["sessions"], summary["train"], summary["test"], len(plan.areas),
            time.perf_counter() - start, layout.fmri_dir(subject),
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
