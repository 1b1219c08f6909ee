"""One `accelerate.Accelerator` set-up for every stage that runs a model: where it runs and in what precision.

`--device cpu` forces the CPU (also under `accelerate launch --multi_gpu`, which on a CPU machine
uses gloo); `auto` takes CUDA when torch sees it; `cuda` without a GPU is an error. `--precision`
is explicit: nothing switches to bf16 behind the user's back. For training, fp16/bf16 mean mixed
precision (fp32 master weights, autocast); inference stages cast the model instead.
"""

from __future__ import annotations

import torch

MIXED_PRECISION = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def mixed_precision_of(precision: str) -> str:
    """accelerate's `mixed_precision` for `--precision` (bf16 also runs on CPUs, slowly; fp16 needs a GPU)."""
    if precision not in MIXED_PRECISION:
        raise ValueError(f"precision must be one of {sorted(MIXED_PRECISION)}, got {precision!r}")
    return MIXED_PRECISION[precision]


def make_accelerator(device: str, precision: str = "fp32", *, mixed: bool = True):
    """An Accelerator on `device` (auto | cpu | cuda); `mixed`: autocast training in `precision`."""
    from accelerate import Accelerator

    from llava_brain.cli import resolve_device

    resolved = resolve_device(device)
    mixed_precision = mixed_precision_of(precision) if mixed else "no"
    return Accelerator(cpu=resolved == "cpu", mixed_precision=mixed_precision)
