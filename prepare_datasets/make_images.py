"""Write the NSD stimuli that the selected subjects saw as lossless PNGs, one file per image.

Reads `imgBrick` of `nsd_stimuli.hdf5` (uint8 RGB, 425 x 425 as stored; no resizing) and writes
`<dataset-root>/nsd/images/nsd_image_{nsdId:06d}.png`. Each PNG is written to a temporary name and
renamed, so a killed run leaves only complete PNGs; a rerun skips them and finishes the set.

  python prepare_datasets/make_images.py --nsd-root /data/nsd --dataset-root /data/brain --subject 1 2 5 7 --workers 8
  python prepare_datasets/make_images.py --nsd-root data/mini_nsd --dataset-root /tmp/tiny --subject all   # mini-NSD
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from llava_brain.annotations import images_seen_by, subject_or_all
from llava_brain.errors import BadInputError, exits_on_bad_input
from llava_brain.io import atomic_path, write_run_json
from llava_brain.layout import DatasetRoot, NsdTree, default_data_root
from llava_brain.nsd import NsdStimuli, StimInfo

log = logging.getLogger("make_images")

# Images read from HDF5 per batch: 32 x 542 KB keeps ~35 MB in flight per batch and amortises the read loop.
READ_BATCH = 32
# A complete PNG ends with an empty IEND chunk (length 0, type, CRC); a truncated file does not.
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # Data
    p.add_argument(
        "--nsd-root", type=Path, required=True, help="root of the raw NSD tree (holds nsddata/, nsddata_stimuli/)"
    )
    p.add_argument(
        "--dataset-root",
        type=Path,
        default=default_data_root(),
        help="prepared dataset root; PNGs go to <root>/nsd/images/ (default: $BRAIN_DATA_ROOT)",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--subject",
        type=subject_or_all,
        nargs="+",
        metavar="S",
        help="NSD subjects (1-8) whose seen images to write, or 'all' = every subject with a shown trial "
        "in nsd_stim_info_merged.csv (the paper: 1 2 5 7 = 37000 images, ~9 GB)",
    )
    which.add_argument("--all", action="store_true", help="write every image of imgBrick (NSD: 73000 images, ~18 GB)")
    # Encoding. The sizes and times in --compress-level's help were measured on four natural photos
    # (scikit-image's astronaut, coffee, chelsea, rocket) cropped and resized to 425 x 425, Pillow 13.
    p.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        metavar="N",
        help="threads encoding PNGs in parallel (HDF5 reads stay in the main thread); default: CPU cores, at most 8",
    )
    p.add_argument(
        "--compress-level",
        type=int,
        default=6,
        metavar="LEVEL",
        help="PNG zlib level 0-9, lossless at every level. Measured on 425x425 photos (1 core): 0 = 6 ms and "
        "543 KB per image, 1 = 11 ms / 282 KB, 6 = 43 ms / 253 KB, 9 = 110 ms / 251 KB",
    )
    # Output
    p.add_argument("--overwrite", action="store_true", help="re-encode images whose PNG already exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def is_complete_png(path: Path) -> bool:
    """True if `path` ends like a finished PNG (cheap: reads 12 bytes, decodes nothing)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() < len(_PNG_END):
                return False
            f.seek(-len(_PNG_END), os.SEEK_END)
            return f.read() == _PNG_END
    except FileNotFoundError:
        return False


def write_png(path: Path, pixels: np.ndarray, compress_level: int) -> None:
    """Encode one (H, W, 3) uint8 image losslessly; Pillow releases the GIL while deflating."""
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG", compress_level=compress_level)


def remove_stale_temporaries(images_dir: Path) -> int:
    """Delete temporary PNGs a killed run left behind (atomic_path names them `.<name>.<random>.tmp.png`).

    Assumes one writer per images folder: a concurrent run's in-progress files would be removed too.
    """
    stale = list(images_dir.glob(".nsd_image_*.tmp.png")) if images_dir.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def encode_all(
    stimuli: NsdStimuli, todo: list[int], root: DatasetRoot, workers: int, compress_level: int, progress: bool
) -> None:
    """Read `todo` in batches (main thread: h5py serialises reads anyway) and encode on `workers` threads."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="png")
    pending: set[Future] = set()
    bar = tqdm(total=len(todo), unit="img", desc="PNG", disable=not progress)
    try:
        for start in range(0, len(todo), READ_BATCH):
            batch = todo[start : start + READ_BATCH]
            for nsd_id, pixels in zip(batch, stimuli.read(batch), strict=True):
                pending.add(pool.submit(write_png, root.image(nsd_id), pixels, compress_level))
            # Bound memory: at most three batches (~50 MB) of decoded pixels wait for an encoder.
            while len(pending) > 2 * READ_BATCH:
                pending = _collect(pending, bar)
        while pending:
            pending = _collect(pending, bar)
    finally:
        # On an error or Ctrl-C, drop queued images; running ones finish (atomically) before we return.
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()


def _collect(pending: set[Future], bar: tqdm) -> set[Future]:
    done, still = wait(pending, return_when=FIRST_COMPLETED)
    for future in done:
        future.result()  # re-raise an encoder's exception in the main thread
    bar.update(len(done))
    return still


def select_images(args: argparse.Namespace, tree: NsdTree, stimuli: NsdStimuli) -> tuple[list[int] | None, np.ndarray]:
    """(subjects, sorted nsdIds) to write: every image of the brick, or those the subjects saw per the CSV."""
    if args.all:
        return None, np.arange(len(stimuli))
    subjects, selected = images_seen_by(StimInfo.load(tree.stim_info), args.subject)
    if selected.size and selected[-1] >= len(stimuli):
        raise BadInputError(
            stimuli.path, f"imgBrick has {len(stimuli)} images but {tree.stim_info} lists nsdId {selected[-1]}"
        )
    return subjects, selected


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Sanity checks
    if args.dataset_root is None:
        parser.error("--dataset-root is required (or set $BRAIN_DATA_ROOT)")
    if not 0 <= args.compress_level <= 9:
        parser.error(f"--compress-level must be in 0..9, got {args.compress_level}")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.subject and "all" in args.subject and len(args.subject) > 1:
        parser.error(f"--subject all cannot be combined with subject numbers, got {args.subject}")

    start = time.perf_counter()
    tree, root = NsdTree(args.nsd_root), DatasetRoot(args.dataset_root)
    with NsdStimuli(tree.stimuli) as stimuli:
        subjects, selected = select_images(args, tree, stimuli)
        removed = remove_stale_temporaries(root.images_dir)
        if removed:
            log.info("removed %d temporary PNGs left by an interrupted run", removed)
        todo = [int(i) for i in selected if args.overwrite or not is_complete_png(root.image(i))]
        # Only atomic writes go to the final name, so a truncated PNG there came from elsewhere (a copy, a full disk).
        truncated = 0 if args.overwrite else sum(root.image(i).exists() for i in todo)
        if truncated:
            log.info("%d existing PNGs are truncated and will be rewritten", truncated)
        which = "all of imgBrick" if args.all else f"seen by subjects {subjects}"
        log.info("%d images selected (%s); %d to write with %d workers", len(selected), which, len(todo), args.workers)
        encode_all(stimuli, todo, root, args.workers, args.compress_level, progress=not args.quiet)

    seconds = time.perf_counter() - start
    num_skipped = len(selected) - len(todo)
    write_run_json(
        root.images_dir,
        args,
        subjects=subjects,
        num_selected=len(selected),
        num_written=len(todo),
        num_skipped=num_skipped,
        num_truncated_rewritten=truncated,
        seconds=round(seconds, 2),
    )
    log.info(
        "wrote %d PNGs, skipped %d already complete, in %s (%.1f s)", len(todo), num_skipped, root.images_dir, seconds
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
