"""AdamW's fused kernel against torch's CPU default (the single-tensor loop), on the demo's tiny models.

`llava_brain.train.adamw` (every training loop of the project) passes fused=True, because on a CPU torch
picks its single-tensor loop by default. This times whole training steps (forward, backward, optimizer) of
a ViT3D of the demo's size (2 blocks, width 128, patch 6, 75 tokens, CLIP + VAE heads, batch 16) and of a tiny VAE-sized
conv net, with each optimizer, on the same data, in the same run, and prints the seconds and
`ratio = fused / default` (below 1: fused is faster). It also prints the largest parameter difference after
the steps: the two compute the same update, so it stays at float32 rounding.

  python benchmarks/bench_optimizer.py                # 100 steps each, the threads torch picks
  OMP_NUM_THREADS=2 python benchmarks/bench_optimizer.py --steps 200
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from llava_brain.model.vit3d import ViT3D, ViT3DConfig


def vit3d_case() -> tuple[torch.nn.Module, callable]:
    grid, patch = (27, 34, 27), 6
    # every other patch of the 5 x 6 x 5 patch grid active (the demo's mask keeps 57 of 150)
    config = ViT3DConfig(grid=list(grid), patch_size=patch, hidden_size=128, num_layers=2, num_heads=8,
                         head_hidden=256, clip_dim=32, vae_shape=[4, 16, 16],
                         active_patches=list(range(0, 150, 2)))  # fmt: skip
    model = ViT3D(config)
    x = torch.randn(16, *grid)

    def loss(m):
        out = m(x)
        return out.clip.pow(2).mean() + out.vae.pow(2).mean()

    return model, loss


def conv_case() -> tuple[torch.nn.Module, callable]:
    layers = []
    for c_in, c_out in ((3, 16), (16, 32), (32, 64), (64, 64)):
        layers += [torch.nn.Conv2d(c_in, c_out, 3, padding=1), torch.nn.GroupNorm(8, c_out), torch.nn.SiLU()]
    model = torch.nn.Sequential(*layers, torch.nn.Conv2d(64, 3, 3, padding=1))
    x = torch.randn(16, 3, 64, 64)
    return model, lambda m: (m(x) - x).pow(2).mean()


def run(model: torch.nn.Module, loss, fused: bool, steps: int) -> tuple[float, torch.nn.Module]:
    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, **({"fused": True} if fused else {}))
    for k in range(steps + 5):
        if k == 5:  # warm-up steps excluded
            start = time.perf_counter()
        opt.zero_grad()
        loss(model).backward()
        opt.step()
    return time.perf_counter() - start, model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100, help="timed training steps per optimizer (default 100)")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps")
    for name, case in (("tiny ViT3D", vit3d_case), ("VAE-sized conv net", conv_case)):
        torch.manual_seed(0)
        model, loss = case()
        default_s, a = run(model, loss, False, args.steps)
        fused_s, b = run(model, loss, True, args.steps)
        diff = max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters(), strict=True))
        print(f"{name}: {sum(t.numel() for t in model.parameters()):,} parameters in "
              f"{len(list(model.parameters()))} tensors; default {default_s:.2f} s, fused {fused_s:.2f} s, "
              f"ratio={fused_s / default_s:.2f}, max parameter difference {diff:.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
