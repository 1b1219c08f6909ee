"""What every training loop of the project shares: the accelerator, the learning-rate schedule, checkpoints."""

from llava_brain.train.accel import make_accelerator, mixed_precision_of
from llava_brain.train.schedule import warmup_cosine, warmup_cosine_scheduler

__all__ = ["make_accelerator", "mixed_precision_of", "warmup_cosine", "warmup_cosine_scheduler"]
