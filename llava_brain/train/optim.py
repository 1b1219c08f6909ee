"""The one AdamW of the project's own training loops (the ViT3D, the tiny CLIP, VAE, unCLIP UNet and LLM).

torch's AdamW defaults to its single-tensor loop on a CPU (the multi-tensor and fused paths are picked by
default only on GPUs): about ten small ops per parameter tensor per step, which in the demo's tiny models
cost as much as the forward pass. The fused kernel computes the same update in one pass per tensor
(`python benchmarks/bench_optimizer.py` prints its time against the default's, same run), on CPUs and GPUs
alike. Brain-LLaVA's HF Trainer already defaults to it (`--optim adamw_torch_fused`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def adamw(params: Iterable, *, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """torch.optim.AdamW(params, lr, weight_decay) with the fused kernel; `params` may be parameter groups."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
