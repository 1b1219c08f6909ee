"""Pre-train the ViT3D fMRI encoder (paper Sec. 3.1, App. B): whole-brain volumes -> CLIP embedding + VAE latent.

Every selected subject's volumes are resized to one grid (subj01's), cut into patches, and only the patches
touching the union of the subjects' --select-region masks become tokens. Loss = MSE(clip) + alpha * MSE(vae)
(alpha = 1/64), MixUp between repeats of the same image, AdamW with linear warm-up then cosine decay.

Writes under --out:
  checkpoint/        model (safetensors), optimizer.pt, scheduler.pt, trainer_state.json (step, epoch,
                     position in the epoch's data order), rng_rankN.json; every --save-every steps, at each
                     epoch end and on SIGTERM / SIGINT (then the run exits 143 / 130). --resume continues
                     from it to the same weights as an uninterrupted run.
  metrics.json       one dict per epoch: train loss and retrieval of the CLIP head on the test images,
                     repeat-averaged (avg/...) and single-trial (single/...), per subject and averaged.
  final/             the trained model (`ViT3D.from_pretrained`; the config holds grid and active patches)
  run.json           arguments, versions and the settings; written last, so it marks a finished run
A rerun of a finished run with the same settings does nothing; --overwrite retrains from scratch.
Multi-GPU: `accelerate launch --multi_gpu --num_processes N pretrain_vit3d.py ...` (--batch-size is per process).

Full scale (paper: one A100-80GB, ~8 h):
  python pretrain_vit3d.py --dataset-root /data/brain --out runs/vit3d_p14 \\
      --num-layers 16 --patch-size 14 --subject all --select-region nsdgeneral --vae
Tiny (mini-NSD demo root, CPU, about two minutes; top-1 0.12 against chance 0.01, see docs/vit3d.md):
  python pretrain_vit3d.py --dataset-root demo_out/root --out demo_out/vit3d --num-layers 2 --hidden-size 128 \\
      --num-heads 8 --head-hidden 256 --patch-size 6 --epochs 16 --batch-size 16 --lr 1e-3 --warmup-steps 50 \\
      --num-workers 0 --device cpu
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import shutil
import signal
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers.utils import logging as hf_logging

from llava_brain.data.fmri import (
    FmriTrainSet,
    Targets,
    collate,
    common_grid,
    load_test_sets,
    resolve_subjects,
    to_grid,
    union_region_mask,
)
from llava_brain.errors import BadInputError, exits_on_bad_input
from llava_brain.io import read_json, write_json, write_run_json
from llava_brain.layout import DatasetRoot, default_data_root, subject_name
from llava_brain.model.vit3d import ViT3D, ViT3DConfig, active_patch_indices

log = logging.getLogger("pretrain_vit3d")
CHECKPOINT, FINAL, METRICS, STATE = "checkpoint", "final", "metrics.json", "trainer_state.json"
RUN_JSON = "run.json"  # written last: its presence beside final/ marks a finished run


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    root = default_data_root()
    p.add_argument("--dataset-root", type=Path, default=root, required=root is None,
                   help="prepared dataset root (nsd/fmris/, nsd/vision_embeds/, nsd/vae_embeds/); "
                   "default $BRAIN_DATA_ROOT")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("runs/vit3d"), help="output folder (default runs/vit3d)")
    p.add_argument("--num-layers", type=int, default=16, help="Transformer blocks (paper: 16)")
    p.add_argument("--hidden-size", type=int, default=768, help="Transformer width (paper: 768)")
    p.add_argument("--num-heads", type=int, default=12, help="attention heads (paper: 12)")
    p.add_argument("--patch-size", type=int, default=14, help="cubic patch edge in voxels (paper: 14; also 12, 10)")
    p.add_argument("--head-hidden", type=int, default=1024, help="hidden width of the two MLP heads (paper: 1024)")
    p.add_argument("--pos-init-std", type=float, default=1.0,
                   help="std of the position embeddings' initialisation (default 1.0; ViT's usual 0.02 learns "
                   "about half as well on mini-NSD; the paper does not say; see ViT3DConfig)")  # fmt: skip
    p.add_argument("--subject", nargs="+", default=["all"], help="subject numbers, or 'all' prepared (default)")
    p.add_argument("--select-region", default="nsdgeneral",
                   help="mask of whole/masks.npz whose union over the subjects picks the tokens "
                   "(default nsdgeneral)")  # fmt: skip
    p.add_argument("--vae", action=argparse.BooleanOptionalAction, default=True,
                   help="train the VAE-latent head too (default: yes)")  # fmt: skip
    p.add_argument("--vae-weight", type=float, default=1 / 64, help="alpha of MSE(vae) in the loss (default 1/64)")
    p.add_argument("--mixup", action=argparse.BooleanOptionalAction, default=True,
                   help="MixUp between repeats of the same image (default: yes)")  # fmt: skip
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32, help="samples per process and micro-batch (default 32)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=500, help="linear warm-up steps before the cosine decay")
    p.add_argument("--seed", type=int, default=0, help="model init, data order and MixUp (default 0)")
    p.add_argument("--save-every", type=int, default=1000, help="checkpoint every N optimizer steps (0: epoch ends)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint/")
    p.add_argument("--overwrite", action="store_true",
                   help="delete <out>'s checkpoint, final model and metrics and train from scratch (a finished "
                   "run with the same settings is otherwise skipped; an unfinished one needs --resume or "
                   "this)")  # fmt: skip
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per process")
    p.add_argument("--device", choices=["auto", "cpu"], default="auto", help="auto: CUDA when present (bf16)")
    p.add_argument("--cache-gb", type=float, default=32.0,
                   help="keep the resized training volumes in memory (float16) when they need at most this much; "
                   "else read and resize them on the fly (default 32)")  # fmt: skip
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--step-delay", type=float, default=0.0, help=argparse.SUPPRESS)  # tests: slow a run down
    return p


def lr_lambda(step: int, *, warmup: int, total: int) -> float:
    """Linear warm-up from 0 to 1 over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def epoch_batches(n: int, *, seed: int, epoch: int, batch_size: int, world: int, rank: int) -> list[list[int]]:
    """This process's micro-batches of one epoch: a permutation seeded by (seed, epoch), cut into global
    batches of batch_size * world (last partial batch dropped), rank r taking every world-th sample."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    step = batch_size * world
    return [order[s + rank : s + step : world].tolist() for s in range(0, n - step + 1, step)]


class StopFlag:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self):
        self.signum = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum


def rng_state() -> dict:
    np_state = np.random.get_state()  # noqa: NPY002
    return {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_checkpoint(accelerator, model, optimizer, scheduler, out: Path, state: dict) -> None:
    """Write <out>/checkpoint.partial/ then swap it in, so a kill never leaves a half checkpoint."""
    final, partial_dir = out / CHECKPOINT, out / f"{CHECKPOINT}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial_dir, ignore_errors=True)
        partial_dir.mkdir(parents=True)
    accelerator.wait_for_everyone()
    write_json(partial_dir / f"rng_rank{accelerator.process_index}.json", rng_state(), indent=None)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(partial_dir, safe_serialization=True)
        torch.save(optimizer.state_dict(), partial_dir / "optimizer.pt")
        torch.save(scheduler.state_dict(), partial_dir / "scheduler.pt")
        write_json(partial_dir / STATE, state)  # written last: marks the checkpoint complete
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        old = out / f"{CHECKPOINT}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        partial_dir.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, model, optimizer, scheduler, out: Path) -> dict:
    folder = out / CHECKPOINT
    state = read_json(folder / STATE, "a checkpoint of pretrain_vit3d.py (trainer_state.json)")
    from safetensors.torch import load_file

    weights = load_file(folder / "model.safetensors")
    accelerator.unwrap_model(model).load_state_dict(weights)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=True))
    rng = folder / f"rng_rank{accelerator.process_index}.json"
    if rng.is_file():
        set_rng_state(read_json(rng))
    return state


@torch.no_grad()
def evaluate(model, test_sets, grid, device, batch_size: int, autocast) -> dict[str, float]:
    """Retrieval of the CLIP head on each subject's test images; `avg/...` and `single/...` are subject means."""
    from llava_brain.evaluation.retrieval import retrieval_report

    model.eval()
    metrics: dict[str, float] = {}
    per_kind: dict[str, list[dict[str, float]]] = {}
    for ts in test_sets:
        preds = []
        for start in range(0, len(ts.volumes), batch_size):
            volumes = ts.volumes[start : start + batch_size].to(device, torch.float32)
            with autocast():
                preds.append(model(volumes).clip.float().cpu())
        report = retrieval_report(torch.cat(preds), ts.clip, prefix="")
        per_kind.setdefault(ts.kind, []).append(report)
        metrics.update({f"{subject_name(ts.subject)}/{ts.kind}/{k}": v for k, v in report.items()})
    for kind, reports in per_kind.items():
        for key in reports[0]:
            metrics[f"{kind}/{key}"] = float(np.mean([r[key] for r in reports]))
    model.train()
    return metrics


def append_metrics(path: Path, record: dict) -> None:
    """metrics.json is a list of per-epoch dicts; an epoch evaluated again (after a resume) replaces its entry."""
    records = read_json(path, "the metrics of pretrain_vit3d.py") if path.is_file() else []
    records = [r for r in records if r.get("epoch") != record["epoch"]] + [record]
    write_json(path, records)


def make_accelerator(device: str):
    from accelerate import Accelerator

    cpu = device == "cpu" or not torch.cuda.is_available()
    return Accelerator(cpu=cpu, mixed_precision="no" if cpu else "bf16")


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar at every checkpoint: one log line says it
    for name in ("epochs", "batch_size", "grad_accum", "num_layers", "hidden_size", "num_heads", "patch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.hidden_size % args.num_heads:
        parser.error("--hidden-size must be divisible by --num-heads")
    if args.save_every < 0 or args.warmup_steps < 0 or args.num_workers < 0:
        parser.error("--save-every, --warmup-steps and --num-workers must be 0 or more")
    if args.resume and args.overwrite:
        parser.error("--resume continues a run, --overwrite starts it again: pass one of them")
    out = Path(args.out)

    layout = DatasetRoot(args.dataset_root)
    subjects = resolve_subjects(layout, args.subject)
    grid = common_grid(layout, subjects)
    targets = Targets(layout, vae=args.vae)
    union = union_region_mask(layout, subjects, args.select_region, grid)
    active = active_patch_indices(union, args.patch_size)
    if not active:
        raise BadInputError(layout.whole_masks(subjects[0]), f"the {args.select_region!r} masks are empty")

    accelerator = make_accelerator(args.device)
    world, rank = accelerator.num_processes, accelerator.process_index
    if args.overwrite:
        if accelerator.is_main_process:
            for name in (CHECKPOINT, f"{CHECKPOINT}.partial", f"{CHECKPOINT}.old", FINAL, f"{FINAL}.partial"):
                shutil.rmtree(out / name, ignore_errors=True)
            for name in (METRICS, RUN_JSON):
                (out / name).unlink(missing_ok=True)
        accelerator.wait_for_everyone()
    elif (out / RUN_JSON).is_file() and (out / FINAL / "model.safetensors").is_file():
        previous = read_json(out / RUN_JSON, "run.json of a finished pretrain_vit3d.py run")
        if previous.get("settings") != settings(args, world):
            raise BadInputError(out / RUN_JSON, "belongs to a finished run with other settings; pass --overwrite "
                                                "to retrain or choose another --out")  # fmt: skip
        log.info("already trained with these settings: %s; nothing to do (--overwrite retrains)", out / FINAL)
        return 0
    elif (out / CHECKPOINT / STATE).is_file() and not args.resume:
        raise BadInputError(out / CHECKPOINT / STATE, "an unfinished run is here; pass --resume to continue it "
                                                      "or --overwrite to start over")  # fmt: skip
    if args.resume and not (out / CHECKPOINT / STATE).is_file():
        raise BadInputError(out / CHECKPOINT / STATE, "missing; --resume needs a checkpoint of an earlier run")
    torch.manual_seed(args.seed), np.random.seed(args.seed), random.seed(args.seed)  # noqa: NPY002
    train = FmriTrainSet(layout, subjects, grid, targets, mixup=args.mixup, seed=args.seed,
                         cache_bytes=args.cache_gb * 1e9)  # fmt: skip
    test_sets = load_test_sets(layout, subjects, grid, targets) if accelerator.is_main_process else []
    micro_per_epoch = len(train) // (args.batch_size * world)
    steps_per_epoch = micro_per_epoch // args.grad_accum
    if steps_per_epoch < 1:
        raise BadInputError(layout.whole_betas(subjects[0], "tr"),
                            f"{len(train)} training samples give no full step of {args.batch_size} x {world} "
                            f"processes x {args.grad_accum} accumulation")  # fmt: skip
    total_steps = steps_per_epoch * args.epochs

    config = ViT3DConfig(grid=grid, patch_size=args.patch_size, hidden_size=args.hidden_size,
                         num_layers=args.num_layers, num_heads=args.num_heads, clip_dim=targets.clip_dim,
                         vae_shape=targets.vae_shape, head_hidden=args.head_hidden, active_patches=active,
                         position_init_std=args.pos_init_std)  # fmt: skip
    model = ViT3D(config)
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or n in ("pos_embed", "cls_token")]
    decay = [p for n, p in model.named_parameters() if not (p.ndim < 2 or n in ("pos_embed", "cls_token"))]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_lambda, warmup=args.warmup_steps, total=total_steps)
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    log.info(
        "ViT3D: %s, grid %s, patch %d -> %d of %d patches active; %d train samples, %d steps/epoch x %d epochs",
        ", ".join(subject_name(s) for s in subjects), grid, args.patch_size, len(active),
        config.num_patches_total, len(train), steps_per_epoch, args.epochs,
    )  # fmt: skip

    step, epoch, position = 0, 0, 0  # position: optimizer steps done in `epoch`
    if args.resume:
        state = load_checkpoint(accelerator, model, optimizer, scheduler, out)
        if state.get("settings") != settings(args, world):
            raise BadInputError(out / CHECKPOINT / STATE, f"was written with other settings ({state.get('settings')})")
        step, epoch, position = int(state["step"]), int(state["epoch"]), int(state["position"])
        log.info("resumed at step %d (epoch %d, step %d of it)", step, epoch, position)
    elif accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / METRICS).unlink(missing_ok=True)

    stop = StopFlag()

    def checkpoint(ep: int, pos: int) -> None:
        state = {"step": step, "epoch": ep, "position": pos, "settings": settings(args, world)}
        save_checkpoint(accelerator, model, optimizer, scheduler, out, state)
        log.info("checkpoint at step %d -> %s", step, out / CHECKPOINT)

    autocast = accelerator.autocast
    model.train()
    while epoch < args.epochs:
        train.set_epoch(epoch)
        batches = epoch_batches(len(train), seed=args.seed, epoch=epoch, batch_size=args.batch_size,
                                world=world, rank=rank)[: steps_per_epoch * args.grad_accum]  # fmt: skip
        loader = DataLoader(train, batch_sampler=batches[position * args.grad_accum :], collate_fn=collate,
                            num_workers=args.num_workers, persistent_workers=False)  # fmt: skip
        losses, started = [], time.perf_counter()
        for micro, batch in enumerate(loader):
            volumes = to_grid(batch["volumes"], grid, device)
            with autocast():
                output = model(volumes)
                loss = F.mse_loss(output.clip.float(), batch["clip"].to(device))
                if args.vae:
                    loss = loss + args.vae_weight * F.mse_loss(output.vae.float(), batch["vae"].to(device))
            boundary = (micro + 1) % args.grad_accum == 0
            if boundary:
                accelerator.backward(loss / args.grad_accum)
            else:
                with accelerator.no_sync(model):
                    accelerator.backward(loss / args.grad_accum)
            losses.append(loss.item())
            if not boundary:
                continue
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step, position = step + 1, position + 1
            if args.step_delay:
                time.sleep(args.step_delay)
            stopping = stop.signum
            if world > 1:
                stopping = int(accelerator.reduce(torch.tensor(stopping, device=device), reduction="max").item())
            if stopping:
                checkpoint(epoch, position)
                log.info("stopped by signal %d; resume with --resume", stopping)
                return 128 + stopping
            if args.save_every and step % args.save_every == 0 and position < steps_per_epoch:
                checkpoint(epoch, position)
        train_loss = float(np.mean(losses)) if losses else float("nan")
        if accelerator.is_main_process:
            record = {"epoch": epoch + 1, "step": step, "train_loss": train_loss, "lr": scheduler.get_last_lr()[0],
                      "epoch_seconds": time.perf_counter() - started}  # fmt: skip
            record.update(evaluate(accelerator.unwrap_model(model), test_sets, grid, device, args.eval_batch_size,
                                   autocast))  # fmt: skip
            append_metrics(out / METRICS, record)
            log.info("epoch %d: loss %.4f, avg top-1 brain->image %.3f (chance %.3f), single %.3f",
                     epoch + 1, train_loss, record["avg/top1_brain_to_image"], record["avg/chance"],
                     record["single/top1_brain_to_image"])  # fmt: skip
        epoch, position = epoch + 1, 0
        checkpoint(epoch, position)

    if accelerator.is_main_process:
        staging = out / f"{FINAL}.partial"  # renamed into place whole: a kill never leaves half a final model
        shutil.rmtree(staging, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(staging, safe_serialization=True)
        shutil.rmtree(out / FINAL, ignore_errors=True)
        staging.rename(out / FINAL)
        write_run_json(out, args, settings=settings(args, world), subjects=subjects, grid=list(grid),
                       active_patches=len(active), steps=step, world_size=world)  # fmt: skip
        log.info("final model -> %s", out / FINAL)
    accelerator.wait_for_everyone()
    return 0


def settings(args, world: int) -> dict:
    """What a resumed run must share with the checkpoint's run to reach the same result."""
    keys = ("num_layers", "hidden_size", "num_heads", "patch_size", "head_hidden", "pos_init_std", "subject",
            "select_region", "vae", "vae_weight", "mixup", "epochs", "batch_size", "grad_accum", "lr", "weight_decay",
            "warmup_steps", "seed")  # fmt: skip
    return {"world_size": world, **{k: getattr(args, k) for k in keys}, "dataset_root": str(args.dataset_root)}


if __name__ == "__main__":
    sys.exit(main())
