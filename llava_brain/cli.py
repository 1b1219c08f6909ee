"""The flags every stage shares, spelled and explained once, and the parse step that checks them against the data.

    p = argparse.ArgumentParser(...)
    cli.add_dataset_root(p, "prepared dataset root (holds nsd/fmris/)")
    cli.add_subject(p)                       # --subject N ... | all, resolved against <root>/nsd/fmris
    cli.add_num_workers(p, default=2, what="background processes decoding PNGs")
    cli.add_device(p); cli.add_precision(p)
    cli.add_overwrite(p, "recompute the output even if it is current"); cli.add_quiet(p)
    args = cli.parse_args(p, argv)           # args.subject is now a sorted list of ints

`parse_args` resolves `--subject` before any work: a subject the data does not hold, or an
empty 'all', stops the script with one line naming the folder (exit 2 under
`errors.exits_on_bad_input`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

from llava_brain.layout import DATA_ROOT_ENV, DatasetRoot, NsdTree, default_data_root
from llava_brain.subjects import ALL, prepared_subjects, resolve_subjects, subject_arg

# Where the subjects of `--subject` come from: a function of the parsed arguments giving
# (available subjects, the file or folder that says so, what a subject there is).
SubjectSource = Callable[[argparse.Namespace], tuple[Sequence[int], Path, str]]
PRECISIONS = ("fp32", "fp16", "bf16")


def prepared_source(args: argparse.Namespace) -> tuple[list[int], Path, str]:
    """Subjects prepared under `--dataset-root` (those with fmris/subjXX/nsd_fmri2image.json)."""
    layout = DatasetRoot(args.dataset_root)
    return prepared_subjects(layout), layout.fmris_dir, "prepared subjects (run make_subjmri.py)"


def nsd_source(args: argparse.Namespace) -> tuple[list[int], Path, str]:
    """Subjects with a betas folder in the raw NSD tree at `--nsd-root`."""
    tree = NsdTree(args.nsd_root)
    return tree.subjects(), tree.root / "nsddata_betas" / "ppdata", "subjects with betas"


def add_dataset_root(p: argparse.ArgumentParser, help: str = "prepared dataset root (holds nsd/)") -> None:
    default = default_data_root()
    p.add_argument(
        "--dataset-root",
        type=Path,
        default=default,
        required=default is None,
        help=f"{help}; default ${DATA_ROOT_ENV}" + (f" ({default})" if default else ""),
    )


def add_subject(
    p, *, source: SubjectSource = prepared_source, default: Sequence[int | str] | None = (ALL,),
    help: str = "subject numbers, or 'all' (default)", group=None,
) -> None:  # fmt: skip
    """`--subject 1 2 5 7 | all`; `cli.parse_args` resolves it with `source` into sorted subject numbers."""
    (group or p).add_argument(
        "--subject", nargs="+", type=subject_arg, default=None if default is None else list(default), help=help
    )
    p.set_defaults(_subject_source=source)


def add_num_workers(p, *, default: int, what: str = "DataLoader worker processes") -> None:
    help = f"{what} (0 = in the main process; default {default})"
    p.add_argument("--num-workers", type=int, default=default, help=help)


def add_device(p, *, default: str = "auto") -> None:
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default=default,
        help=f"where the model runs: cuda, cpu, or auto = CUDA when present (default {default})",
    )


def add_precision(p, *, default: str = "fp32", help: str = "") -> None:
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=default,
        help=help or f"numeric precision of the model (fp16/bf16 on GPUs; default {default})",
    )


def add_overwrite(p, help: str = "redo the output even if it is current") -> None:
    p.add_argument("--overwrite", action="store_true", help=help)


def add_predictions(p, *, subject_filter: bool = False) -> None:
    """--predictions: a prediction run folder (llava_brain/evaluation/predictions.py); with `subject_filter`
    also --subject, a subset of the subjects it holds (checked by the script against the folder)."""
    from pathlib import Path

    p.add_argument("--predictions", type=Path, required=True,
                   help="a prediction run folder of fmri2embeds.py (holds subjXX_avg/, subjXX_single/)")  # fmt: skip
    if subject_filter:
        p.add_argument("--subject", type=int, nargs="+", default=None,
                       help="only these subject numbers (default: every subject in --predictions)")  # fmt: skip


def add_unclip_settings(p) -> None:
    """The Stable unCLIP decoder's settings (llava_brain.recon.UnclipSettings); `unclip_settings` reads them."""
    p.add_argument(
        "--beta",
        type=float,
        default=0.93,
        help="strength: share of the denoising steps run from the noised VAE latent (default 0.93)",
    )
    p.add_argument("--steps", type=int, default=20, help="denoising steps of the full schedule (default 20)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default 3.0)")
    p.add_argument(
        "--noise-level", type=int, default=0, help="noise augmentation of the CLIP embedding, 0..999 (default 0: none)"
    )
    p.add_argument(
        "--no-vae-init",
        action="store_true",
        help="start from pure noise, not the predicted VAE latent (the 'w/o VAE feature' ablation)",
    )


def unclip_settings(args: argparse.Namespace):
    """UnclipSettings of the flags of `add_unclip_settings`."""
    from llava_brain.recon.unclip import UnclipSettings

    return UnclipSettings(beta=args.beta, steps=args.steps, guidance=args.guidance, noise_level=args.noise_level,
                          vae_init=not args.no_vae_init)  # fmt: skip


def add_quiet(p) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when present else 'cpu'; an explicit 'cuda' without a GPU is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was given but torch sees no CUDA device; use --device cpu or auto")
    return device


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """`parser.parse_args`, then `--subject` resolved against the data (sorted ints, or None if not given)."""
    args = parser.parse_args(argv)
    source = vars(args).pop("_subject_source", None)
    if source is not None and getattr(args, "subject", None) is not None:
        available, where, what = source(args)
        args.subject = resolve_subjects(args.subject, available, where, what)
    if getattr(args, "num_workers", 0) < 0:
        parser.error("--num-workers must be 0 or more")
    return args


def check_not_both(parser, args, first: str, second: str) -> None:
    if getattr(args, first) and getattr(args, second):
        parser.error(f"--{first.replace('_', '-')} and --{second.replace('_', '-')} exclude each other: pass one")


__all__ = [
    "PRECISIONS",
    "add_dataset_root",
    "add_device",
    "add_num_workers",
    "add_overwrite",
    "add_precision",
    "add_quiet",
    "add_subject",
    "check_not_both",
    "nsd_source",
    "parse_args",
    "prepared_source",
    "resolve_device",
]
