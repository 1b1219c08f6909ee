"""Pre-train the ViT3D fMRI encoder (paper Sec. 3.1, App. B): whole-brain volumes -> CLIP embedding + VAE latent.

Every selected subject's volumes are resized to one grid (subj01's), cut into patches, and only the patches
touching the union of the subjects' --area masks become tokens. Loss = MSE(clip) + alpha * MSE(vae)
(alpha = 1/64), MixUp between repeats of the same image, AdamW with linear warm-up then cosine decay.

Writes under --out (default <dataset-root>/runs/vit3d):
  checkpoint/   model, optimizer, scheduler, RNG states and the trainer state (step, epoch, position in the
                epoch's data order, the epoch's running loss); every --save-every steps, at each epoch end and
                on SIGTERM / SIGINT (then exit 143 / 130). --resume continues from it to the same weights,
                metrics and RNG state as an uninterrupted run (llava_brain/train/checkpoint.py).
  metrics.json  one dict per epoch: train loss and retrieval of the CLIP head on the test images,
                repeat-averaged (avg/...) and single-trial (single/...), per subject and averaged.
  final/        the trained model (`ViT3D.from_pretrained`; the config holds grid and active patches)
  run.json      arguments, versions, resolved settings, fingerprints of every input; written last (io.StageRun)
A rerun with the same settings and inputs does nothing; other settings or changed inputs (regenerated CLIP
targets, a subject added under --subject all) are refused saying what changed; --overwrite retrains from
scratch; an unfinished run needs --resume or --overwrite. NaN / inf inputs are refused naming the file; a
non-finite loss stops the run (exit 2) before anything is written as final.
Multi-GPU: `accelerate launch --multi_gpu --num_processes N pretrain_vit3d.py ...` (--batch-size is per process).

Full scale (paper: one A100-80GB, ~8 h; writes /data/brain/runs/vit3d):
  python pretrain_vit3d.py --dataset-root /data/brain --subject all --area nsdgeneral \\
      --num-layers 16 --patch-size 14 --vae --precision bf16 --device cuda
Tiny (mini-NSD demo root, CPU, about two minutes; see docs/vit3d.md for the top-1 it reaches):
  python pretrain_vit3d.py --dataset-root demo_out/root --out demo_out/runs/vit3d --num-layers 2 \\
      --hidden-size 128 --num-heads 8 --head-hidden 256 --patch-size 6 --vae --epochs 10 --batch-size 32 --lr 2e-3 \\
      --warmup-steps 50 --num-workers 0 --precision fp32 --device cpu
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers.utils import logging as hf_logging

from llava_brain import cli, runtime
from llava_brain.data.fmri import (
    FmriTrainSet,
    Targets,
    collate,
    common_grid,
    epoch_batches,
    input_files,
    load_test_sets,
    resized_bytes,
    union_area_mask,
)
from llava_brain.errors import BadInputError, exits_on_bad_input
from llava_brain.io import StageRun, read_json, recover_staged, require_writable, staged_folder, write_json
from llava_brain.layout import DatasetRoot, subject_name
from llava_brain.model.vit3d import ViT3D, ViT3DConfig, active_patch_indices
from llava_brain.train import (
    Progress,
    StopFlag,
    adamw,
    has_checkpoint,
    load_checkpoint,
    make_accelerator,
    read_trainer_state,
    recover_checkpoint,
    save_checkpoint,
    warmup_cosine_scheduler,
)
from llava_brain.train.checkpoint import STATE_FILE

log = logging.getLogger("pretrain_vit3d")
CHECKPOINT, FINAL, METRICS = "checkpoint", "final", "metrics.json"
# Settings that shape the trained weights (with the resolved subjects, grid, world size and cache mode).
SETTING_KEYS = ("area", "num_layers", "hidden_size", "num_heads", "patch_size", "head_hidden", "pos_init_std",
                "vae", "vae_weight", "mixup", "epochs", "batch_size", "grad_accum", "lr", "weight_decay",
                "warmup_steps", "seed", "precision")  # fmt: skip


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_dataset_root(p, "prepared dataset root (nsd/fmris/, nsd/vision_embeds/, nsd/vae_embeds/)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default <dataset-root>/runs/vit3d)")
    p.add_argument("--num-layers", type=int, default=16, help="Transformer blocks (paper: 16)")
    p.add_argument("--hidden-size", type=int, default=768, help="Transformer width (paper: 768)")
    p.add_argument("--num-heads", type=int, default=12, help="attention heads (paper: 12)")
    p.add_argument("--patch-size", type=int, default=14, help="cubic patch edge in voxels (paper: 14; also 12, 10)")
    p.add_argument("--head-hidden", type=int, default=1024, help="hidden width of the two MLP heads (paper: 1024)")
    p.add_argument("--pos-init-std", type=float, default=1.0,
                   help="std of the position embeddings' initialisation (default 1.0; ViT's usual 0.02 learns "
                   "about half as well on mini-NSD; the paper does not say; see ViT3DConfig)")  # fmt: skip
    cli.add_subject(p, help="subjects trained together in one model: numbers, or 'all' prepared (default)")
    p.add_argument("--area", default="nsdgeneral",
                   help="mask of whole/masks.npz whose union over the subjects picks the tokens "
                   "(default nsdgeneral)")  # fmt: skip
    p.add_argument("--vae", action=argparse.BooleanOptionalAction, default=True,
                   help="train the VAE-latent head too (default: yes)")  # fmt: skip
    p.add_argument("--vae-weight", type=float, default=1 / 64, help="alpha of MSE(vae) in the loss (default 1/64)")
    p.add_argument("--mixup", action=argparse.BooleanOptionalAction, default=True,
                   help="MixUp between repeats of the same image (default: yes)")  # fmt: skip
    p.add_argument("--epochs", type=int, default=30, help="passes over the training trials (default 30)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per process and micro-batch (default 32)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak AdamW learning rate (default 5e-4)")
    p.add_argument("--weight-decay", type=float, default=0.05,
                   help="AdamW weight decay of the matrices; biases, norms and embeddings get none "
                   "(default 0.05)")  # fmt: skip
    p.add_argument("--warmup-steps", type=int, default=500,
                   help="linear warm-up optimizer steps before the cosine decay (default 500)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="model init, data order and MixUp (default 0)")
    p.add_argument("--save-every", type=int, default=1000, help="checkpoint every N optimizer steps (0: epoch ends)")
    p.add_argument("--resume", action="store_true", help="continue the unfinished run from <out>/checkpoint/")
    cli.add_overwrite(p, "delete <out>'s checkpoint, final model and metrics and train from scratch (a finished "
                         "run with the same settings and inputs is otherwise skipped)")  # fmt: skip
    cli.add_num_workers(p, default=2, what="DataLoader workers per process")
    cli.add_device(p)
    cli.add_precision(p, help="fp32 (default), or bf16 / fp16 mixed precision (autocast, fp32 master weights)")
    p.add_argument("--cache-gb", type=float, default=32.0,
                   help="keep the resized training volumes in memory (float16) when they need at most this much; "
                   "else read and resize them on the fly (default 32)")  # fmt: skip
    p.add_argument("--eval-batch-size", type=int, default=64, help="test volumes per forward pass (default 64)")
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size", "grad_accum", "num_layers", "hidden_size", "num_heads", "patch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.hidden_size % args.num_heads:
        parser.error("--hidden-size must be divisible by --num-heads")
    if args.save_every < 0 or args.warmup_steps < 0:
        parser.error("--save-every and --warmup-steps must be 0 or more")
    cli.check_not_both(parser, args, "resume", "overwrite")


@torch.no_grad()
def evaluate(model, test_sets, device, batch_size: int, autocast) -> dict[str, float]:
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


def prepare_out(run: StageRun, args, out: Path, accelerator) -> bool:
    """Apply the rerun rule; True: train (fresh or resumed), False: the finished output is current."""
    if accelerator.is_main_process:
        recover_staged(out / FINAL)
    recover_checkpoint(accelerator, out / CHECKPOINT)
    if args.overwrite:
        if accelerator.is_main_process:
            run.begin()
            for folder in (CHECKPOINT, FINAL):
                shutil.rmtree(out / folder, ignore_errors=True)
            (out / METRICS).unlink(missing_ok=True)
        accelerator.wait_for_everyone()
        return True
    if not run.needed(complete=(out / FINAL / "model.safetensors").is_file()):
        return False
    state = out / CHECKPOINT / STATE_FILE
    if not args.resume:
        if has_checkpoint(out / CHECKPOINT):
            raise BadInputError(state, "an unfinished run is here; pass --resume to continue it or --overwrite "
                                       "to start over")  # fmt: skip
        return True
    if not has_checkpoint(out / CHECKPOINT):
        raise BadInputError(state, "missing; --resume needs a checkpoint of an earlier run")
    changes = run.changes(read_trainer_state(out / CHECKPOINT).get("run") or {})
    if changes:
        raise BadInputError(state, f"was written by a run made differently ({'; '.join(changes[:3])}); "
                                   "pass --overwrite to start over")  # fmt: skip
    return True


def build_model(args, config: ViT3DConfig, total_steps: int):
    model = ViT3D(config)
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or n in ("pos_embed", "cls_token")]
    decay = [p for n, p in model.named_parameters() if not (p.ndim < 2 or n in ("pos_embed", "cls_token"))]
    optimizer = adamw(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )
    return model, optimizer, warmup_cosine_scheduler(optimizer, warmup=args.warmup_steps, total=total_steps)


def checkpoint(accelerator, parts, run: StageRun, out: Path, done: Progress) -> None:
    model, optimizer, scheduler = parts
    state = {**asdict(done), "run": {"settings": run.settings, "inputs": run.inputs}}  # --resume compares "run"
    save_checkpoint(accelerator, out / CHECKPOINT, model=model, optimizer=optimizer, scheduler=scheduler,
                    trainer_state=state)  # fmt: skip
    log.info("checkpoint at step %d -> %s", done.step, out / CHECKPOINT)


def train_epochs(args, accelerator, parts, train: FmriTrainSet, test_sets, run: StageRun, out: Path,
                 done: Progress, steps_per_epoch: int, stop: StopFlag) -> int:  # fmt: skip
    """Train the epochs left after `done` (updated in place); 0 when all are done, 128 + signal number when
    SIGTERM / SIGINT stopped them (after a checkpoint). A non-finite loss raises before the optimizer step."""
    model, optimizer, scheduler = parts
    world, rank = accelerator.num_processes, accelerator.process_index
    device, autocast = accelerator.device, accelerator.autocast
    model.train()
    while done.epoch < args.epochs:
        train.set_epoch(done.epoch)
        batches = epoch_batches(len(train), seed=args.seed, epoch=done.epoch, batch_size=args.batch_size,
                                world=world, rank=rank)[: steps_per_epoch * args.grad_accum]  # fmt: skip
        # Its own generator: a DataLoader iterator draws its workers' base seed, which must not come from
        # torch's global RNG (a resumed run creates one more iterator, and its saved RNG state would differ).
        loader = DataLoader(train, batch_sampler=batches[done.position * args.grad_accum :], collate_fn=collate,
                            num_workers=args.num_workers,
                            generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
        started, non_finite = time.perf_counter(), None
        for micro, batch in enumerate(loader):
            data = train.device_batch(batch, device)
            with autocast():
                output = model(data["volumes"])
                loss = F.mse_loss(output.clip.float(), data["clip"])
                if args.vae:
                    loss = loss + args.vae_weight * F.mse_loss(output.vae.float(), data["vae"])
            boundary = (micro + 1) % args.grad_accum == 0
            if boundary:
                accelerator.backward(loss / args.grad_accum)
            else:
                with accelerator.no_sync(model):
                    accelerator.backward(loss / args.grad_accum)
            value = loss.item()
            if math.isfinite(value):
                done.loss_sum, done.loss_count = done.loss_sum + value, done.loss_count + 1
            else:
                non_finite = value
            if not boundary:
                continue
            flags = torch.tensor([stop.signum, non_finite is not None], device=device)
            if world > 1:
                flags = accelerator.reduce(flags, reduction="max")
            if flags[1]:
                raise BadInputError(out, f"training stopped at step {done.step + 1}: the loss became non-finite "
                                         f"({non_finite}; nothing was written as final); lower --lr or check the "
                                         "targets, then --overwrite")  # fmt: skip
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done.step, done.position = done.step + 1, done.position + 1
            if flags[0]:
                checkpoint(accelerator, parts, run, out, done)
                log.info("stopped by signal %d; resume with --resume", int(flags[0]))
                return 128 + int(flags[0])
            if args.save_every and done.step % args.save_every == 0 and done.position < steps_per_epoch:
                checkpoint(accelerator, parts, run, out, done)
        train_loss = done.loss_sum / done.loss_count if done.loss_count else float("nan")
        if accelerator.is_main_process:
            record = {"epoch": done.epoch + 1, "step": done.step, "train_loss": train_loss,
                      "lr": scheduler.get_last_lr()[0], "epoch_seconds": time.perf_counter() - started}  # fmt: skip
            record.update(evaluate(accelerator.unwrap_model(model), test_sets, device, args.eval_batch_size, autocast))
            append_metrics(out / METRICS, record)
            log.info("epoch %d: loss %.4f, avg top-1 brain->image %.3f (chance %.3f), single %.3f",
                     done.epoch + 1, train_loss, record["avg/top1_brain_to_image"], record["avg/chance"],
                     record["single/top1_brain_to_image"])  # fmt: skip
        done.epoch, done.position, done.loss_sum, done.loss_count = done.epoch + 1, 0, 0.0, 0
        checkpoint(accelerator, parts, run, out, done)
    return 0


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    runtime.limit_threads()
    parser = build_parser()
    args = cli.parse_args(parser, argv)
    check_args(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar at every checkpoint: one log line says it
    layout = DatasetRoot(args.dataset_root)
    out = Path(args.out) if args.out is not None else layout.run_dir("vit3d")
    require_writable(out, "--out")
    subjects = args.subject
    grid = common_grid(layout, subjects)
    union = union_area_mask(layout, subjects, args.area, grid)
    active = active_patch_indices(union, args.patch_size)
    if not active:
        raise BadInputError(layout.whole_masks(subjects[0]), f"the {args.area!r} masks are empty")
    cache_bytes = args.cache_gb * 1e9
    cached = resized_bytes(layout, subjects, grid) <= cache_bytes  # float16 cache or float32 on the fly

    accelerator = make_accelerator(args.device, args.precision)
    world = accelerator.num_processes
    settings = {"subjects": subjects, "grid": list(grid), "world_size": world, "cached_float16": cached,
                **{k: getattr(args, k) for k in SETTING_KEYS}}  # fmt: skip
    run = StageRun(out, settings=settings, inputs=input_files(layout, subjects, vae=args.vae), folder=True)
    if not prepare_out(run, args, out, accelerator):
        log.info("already trained with these settings and inputs: %s; nothing to do (--overwrite retrains)",
                 out / FINAL)  # fmt: skip
        return 0

    torch.manual_seed(args.seed), np.random.seed(args.seed), random.seed(args.seed)  # noqa: NPY002
    targets = Targets(layout, vae=args.vae)
    train = FmriTrainSet(layout, subjects, grid, targets, mixup=args.mixup, seed=args.seed, cache_bytes=cache_bytes)
    test_sets = load_test_sets(layout, subjects, grid, targets) if accelerator.is_main_process else []
    steps_per_epoch = len(train) // (args.batch_size * world) // args.grad_accum
    if steps_per_epoch < 1:
        raise BadInputError(layout.whole_betas(subjects[0], "tr"),
                            f"{len(train)} training samples give no full step of {args.batch_size} x {world} "
                            f"processes x {args.grad_accum} accumulation")  # fmt: skip
    config = ViT3DConfig(grid=grid, patch_size=args.patch_size, hidden_size=args.hidden_size,
                         num_layers=args.num_layers, num_heads=args.num_heads, clip_dim=targets.clip_dim,
                         vae_shape=targets.vae_shape, head_hidden=args.head_hidden, active_patches=active,
                         position_init_std=args.pos_init_std)  # fmt: skip
    model, optimizer, scheduler = build_model(args, config, steps_per_epoch * args.epochs)
    model, optimizer = accelerator.prepare(model, optimizer)
    log.info(
        "ViT3D: %s, grid %s, patch %d -> %d of %d patches active; %d train samples, %d steps/epoch x %d epochs",
        ", ".join(subject_name(s) for s in subjects), grid, args.patch_size, len(active),
        config.num_patches_total, len(train), steps_per_epoch, args.epochs,
    )  # fmt: skip

    done = Progress()
    if args.resume:
        state = load_checkpoint(accelerator, out / CHECKPOINT, model=model, optimizer=optimizer, scheduler=scheduler)
        done = Progress.of(state, out / CHECKPOINT / STATE_FILE)
        log.info("resumed at step %d (epoch %d, step %d of it)", done.step, done.epoch, done.position)
    elif accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / METRICS).unlink(missing_ok=True)
    with StopFlag() as stop:
        code = train_epochs(args, accelerator, (model, optimizer, scheduler), train, test_sets, run, out, done,
                            steps_per_epoch, stop)  # fmt: skip
    if code:
        return code

    if accelerator.is_main_process:
        with staged_folder(out / FINAL) as staging:  # swapped in whole: a kill never leaves half a final model
            accelerator.unwrap_model(model).save_pretrained(staging, safe_serialization=True)
        run.finish(args, active_patches=len(active), steps=done.step)  # last: marks the run finished
        log.info("final model -> %s", out / FINAL)
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
