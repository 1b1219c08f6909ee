"""What every training loop of the project shares: the accelerator, the optimizer, the learning-rate schedule,
checkpoints."""

from llava_brain.train.accel import make_accelerator, mixed_precision_of
from llava_brain.train.checkpoint import (
    Progress,
    StopFlag,
    has_checkpoint,
    load_checkpoint,
    read_trainer_state,
    recover_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from llava_brain.train.optim import adamw
from llava_brain.train.schedule import warmup_cosine, warmup_cosine_scheduler

__all__ = [
    "Progress",
    "StopFlag",
    "adamw",
    "has_checkpoint",
    "load_checkpoint",
    "make_accelerator",
    "mixed_precision_of",
    "read_trainer_state",
    "recover_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "warmup_cosine",
    "warmup_cosine_scheduler",
]
