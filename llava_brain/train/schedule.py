"""Linear warm-up, then cosine decay to zero: the schedule of the ViT3D and of the tiny models' training."""

from __future__ import annotations

import math
from functools import partial

import torch


def warmup_cosine(step: int, *, warmup: int, total: int) -> float:
    """Learning-rate factor at optimizer step `step` (0-based): (step + 1) / warmup during the first
    `warmup` steps, then 0.5 * (1 + cos(pi * progress)) with progress from 0 to 1 at step `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, *, warmup: int, total: int):
    """A `LambdaLR` over `warmup_cosine` (its state_dict holds only the step, so checkpoints resume it)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(warmup_cosine, warmup=warmup, total=total))
