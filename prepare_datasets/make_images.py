"""Write the NSD stimuli that the selected subjects saw as lossless PNGs, one file per image.

Reads `imgBrick` of `nsd_stimuli.hdf5` (uint8 RGB, 425 x 425 as stored; no resizing) and writes
`<dataset-root>/nsd/images/nsd_image_{nsdId:06d}.png`. Each PNG is written to a temporary name and
renamed, so a killed run leaves only complete PNGs; a rerun skips them and finishes the set.

The folder is a per-image cache: a PNG's bytes depend only on the stimulus brick and the PNG
level, which `images/run.json` records (io.StageRun); the images a run selects do not. So a run
for more subjects adds their PNGs, a run whose PNGs are all there skips, and a changed brick or
--compress-level refuses (exit 2, naming what changed) unless --overwrite re-encodes.

  python prepare_datasets/make_images.py --nsd-root /data/nsd --dataset-root /data/brain --subject 1 2 5 7 \\
      --num-workers 8
  python prepare_datasets/make_images.py --nsd-root data/mini_nsd --dataset-root /tmp/tiny --subject all  # mini-NSD
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

from llava_brain import cli
from llava_brain.errors import exits_on_bad_input
from llava_brain.io import StageRun, atomic_path, require_writable
from llava_brain.layout import DatasetRoot, NsdTree
from llava_brain.nsd import NsdStimuli, StimInfo
from llava_brain.nsd.design import stim_info_subjects

log = logging.getLogger("make_images")

# Images read from HDF5 per batch: 32 x 542 KB keeps ~35 MB in flight per batch and amortises the read loop.
READ_BATCH = 32
# A complete PNG ends with an empty IEND chunk (length 0, type, CRC); a truncated file does not.
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__,
        add_help=add_help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a renamed flag's old prefix (--all of --all-images) must not still work
    )
    # Data
    p.add_argument(
        "--nsd-root", type=Path, required=True, help="root of the raw NSD tree (holds nsddata/, nsddata_stimuli/)"
    )
    cli.add_dataset_root(p, "prepared dataset root; PNGs go to <root>/nsd/images/")
    which = p.add_mutually_exclusive_group(required=True)
    cli.add_subject(
        p,
        source=lambda args: stim_info_subjects(args.nsd_root),
        default=None,
        group=which,
        help="NSD subjects (1-8) whose seen images to write, or 'all' = every subject with a shown trial "
        "in nsd_stim_info_merged.csv (the paper: 1 2 5 7 = 37000 images, ~9 GB)",
    )
    which.add_argument(
        "--all-images", action="store_true", help="write every image of imgBrick (NSD: 73000 images, ~18 GB)"
    )
    # Encoding. The sizes and times in --compress-level's help were measured on four natural photos
    # (scikit-image's astronaut, coffee, chelsea, rocket) cropped and resized to 425 x 425, Pillow 13.
    cli.add_num_workers(
        p,
        default=min(8, os.cpu_count() or 1),
        what="threads encoding PNGs in parallel (HDF5 reads stay in the main thread; default: CPU cores, at most 8)",
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
    cli.add_overwrite(p, "re-encode the selected images even if their PNG exists (needed after a new brick or level)")
    cli.add_quiet(p)
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
    """Read `todo` in batches (main thread: h5py serialises reads anyway) and encode on `workers` threads
    (0: in the main thread)."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="png") if workers else None
    pending: set[Future] = set()
    bar = tqdm(total=len(todo), unit="img", desc="PNG", disable=not progress)
    try:
        for start in range(0, len(todo), READ_BATCH):
            batch = todo[start : start + READ_BATCH]
            for nsd_id, pixels in zip(batch, stimuli.read(batch), strict=True):
                if pool is None:
                    write_png(root.image(nsd_id), pixels, compress_level)
                    bar.update(1)
                    continue
                pending.add(pool.submit(write_png, root.image(nsd_id), pixels, compress_level))
            # Bound memory: at most three batches (~50 MB) of decoded pixels wait for an encoder.
            while len(pending) > 2 * READ_BATCH:
                pending = _collect(pending, bar)
        while pending:
            pending = _collect(pending, bar)
    finally:
        # On an error or Ctrl-C, drop queued images; running ones finish (atomically) before we return.
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()


def _collect(pending: set[Future], bar: tqdm) -> set[Future]:
    done, still = wait(pending, return_when=FIRST_COMPLETED)
    for future in done:
        future.result()  # re-raise an encoder's exception in the main thread
    bar.update(len(done))
    return still


def select_images(args: argparse.Namespace, tree: NsdTree, stimuli: NsdStimuli) -> np.ndarray:
    """Sorted nsdIds to write: every image of the brick, or those the subjects saw per the CSV."""
    if args.all_images:
        return np.arange(len(stimuli))
    selected = StimInfo.load(tree.stim_info).images_seen_by(args.subject)
    if selected.size:
        stimuli.require_images(int(selected[-1]), tree.stim_info)
    return selected


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = cli.parse_args(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not 0 <= args.compress_level <= 9:
        parser.error(f"--compress-level must be in 0..9, got {args.compress_level}")

    start = time.perf_counter()
    tree, root = NsdTree(args.nsd_root), DatasetRoot(args.dataset_root)
    require_writable(root.images_dir, "--dataset-root")
    with NsdStimuli(tree.stimuli) as stimuli:
        selected = select_images(args, tree, stimuli)
        # Only the brick and the level shape a PNG's bytes; the selection is recorded, not compared.
        run = StageRun(
            root.images_dir, settings={"compress_level": args.compress_level}, inputs={"stimuli": stimuli.path}
        )
        removed = remove_stale_temporaries(root.images_dir)
        if removed:
            log.info("removed %d temporary PNGs left by an interrupted run", removed)
        todo = [int(i) for i in selected if args.overwrite or not is_complete_png(root.image(i))]
        if not run.needed(args.overwrite, complete=not todo):
            log.info("all %d selected PNGs are in %s and current; nothing to do", len(selected), root.images_dir)
            return 0
        if args.overwrite:  # PNGs of other settings must not sit under the old provenance if this run is killed
            run.begin()
        # Only atomic writes go to the final name, so a truncated PNG there came from elsewhere (a copy, a full disk).
        truncated = 0 if args.overwrite else sum(root.image(i).exists() for i in todo)
        if truncated:
            log.info("%d existing PNGs are truncated and will be rewritten", truncated)
        which = "all of imgBrick" if args.all_images else f"seen by subjects {args.subject}"
        log.info(
            "%d images selected (%s); %d to write with %d workers", len(selected), which, len(todo), args.num_workers
        )
        encode_all(stimuli, todo, root, args.num_workers, args.compress_level, progress=not args.quiet)

    seconds = time.perf_counter() - start
    num_skipped = len(selected) - len(todo)
    run.finish(
        args,
        selection="all-images" if args.all_images else {"subjects": args.subject},
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
