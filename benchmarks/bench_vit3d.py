"""How much faster is ViT3D's active-patch gather than dense attention over the whole padded grid, in training?

Builds one ViT3D at one configuration twice, with the same seed (so the same weights and inputs): once with
`active_patches` from an NSD-like union mask (only patches touching the mask become tokens) and once with
`dense_attention=True` (every patch of the padded grid is a token). Each runs training steps
(forward + backward + AdamW step, MSE loss of the CLIP head, and of the VAE head with --vae-head, against
fixed random targets); after --warmup untimed steps each, --steps timed steps alternate between the two
models (so load or clock drift hits both alike) and the median step time gives samples/s.

The mask is the union over 8 simulated subjects of an nsdgeneral-like region: a cortical shell (outer ~9%
of a wobbly brain ellipsoid, cf. llava_brain.simulate.brain) within a cone of 1.0 rad around the occipital
pole (low y in NSD's LPI order), each subject jittered by up to 2 voxels and 4% in scale; ~16k voxels per
subject, as NSD's nsdgeneral (13-18k at 1.8 mm). --mask PATH.npz loads a real union instead (bool array
under key `union`; resized to --grid if it is on another grid).

Achieved GFLOP/s of the gather step uses an analytic count per sample, with n tokens (CLS included),
L layers, hidden d and P = parameters in the Transformer blocks:

    flops = 6 * P * n  +  12 * L * n**2 * d

6 * P * n: each block weight does one multiply-add per token forward (2 FLOPs) and two backward (4 FLOPs);
12 * L * n**2 * d: QK^T and attention @ V are 2 * n**2 * d FLOPs each forward, x3 with the backward.
Patch embedding, heads, norms, softmax, gather and the optimiser are not counted (so this is a lower bound).
It is compared with a plain float32 --matmul-size square torch.matmul on the same device (2 * m**3 FLOPs,
median of 10 timed runs): mfu_cpu = gflops_step / gflops_matmul ("model FLOP utilisation" against what the
device's BLAS reaches, not against a datasheet peak).

Defaults are CPU-friendly (~10 s on 2 cores): NSD's subj01 grid and the paper's patch 14, but a 4-layer,
256-wide, 8-head model (the paper's is 16 x 768 x 12), batch 4, 2 warm-up and 20 timed steps per model.

  python benchmarks/bench_vit3d.py
  python benchmarks/bench_vit3d.py --device cuda --hidden-size 768 --num-layers 16 --num-heads 12 --batch-size 32
  python benchmarks/bench_vit3d.py --mask union.npz --patch-size 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llava_brain.geometry import union_mask_on_grid
from llava_brain.model.vit3d import ViT3D, ViT3DConfig, active_patch_indices
from llava_brain.simulate.brain import smooth_field

MASK_SUBJECTS = 8
SHELL_INNER, POLE_ANGLE = 0.91, 1.0  # cortical shell (fraction of the brain radius) and occipital cone (rad)


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--grid", type=int, nargs=3, default=[81, 104, 83], metavar=("X", "Y", "Z"),
                   help="model grid in voxels (default 81 104 83, NSD subj01 func1pt8mm)")  # fmt: skip
    p.add_argument("--patch-size", type=int, default=14, help="cubic patch edge in voxels (default 14)")
    p.add_argument("--hidden-size", type=int, default=256, help="Transformer width (default 256; paper 768)")
    p.add_argument("--num-layers", type=int, default=4, help="Transformer depth (default 4; paper 16)")
    p.add_argument("--num-heads", type=int, default=8, help="attention heads (default 8)")
    p.add_argument("--batch-size", type=int, default=4, help="volumes per step (default 4)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per model; the median is kept (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first (default 2)")
    p.add_argument("--vae-head", action="store_true", help="also build and train the VAE head (4x64x64)")
    p.add_argument("--mask", type=Path, default=None, help="npz with a bool union mask under key `union`")
    p.add_argument("--matmul-size", type=int, default=2048, help="edge of the reference float32 matmul")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="torch / numpy seed (default 0)")
    return p


def nsd_like_union(grid: tuple[int, int, int], seed: int) -> np.ndarray:
    """OR of MASK_SUBJECTS simulated nsdgeneral masks (posterior cortical shell), bool (*grid); see the docstring."""
    rng = np.random.default_rng(seed)
    union = np.zeros(grid, dtype=bool)
    for _ in range(MASK_SUBJECTS):
        shift, scale = rng.uniform(-2, 2, 3), rng.uniform(0.96, 1.04)
        axes = [(np.arange(n) - (n - 1) / 2 - s) / (0.46 * n * scale) for n, s in zip(grid, shift, strict=True)]
        coords = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).astype(np.float32)
        norm = np.linalg.norm(coords, axis=-1)
        radius = norm + 0.05 * smooth_field(rng, grid, sigma=max(grid) / 6)  # subject-specific head shape
        pole_angle = np.arccos(np.clip(-coords[..., 1] / (norm + 1e-6), -1.0, 1.0))  # 0 at the occipital pole
        union |= (radius <= 1.0) & (radius >= SHELL_INNER) & (pole_angle < POLE_ANGLE)
    return union


def load_union(args: argparse.Namespace) -> np.ndarray:
    grid = tuple(args.grid)
    if args.mask is None:
        return nsd_like_union(grid, args.seed)
    with np.load(args.mask) as f:
        mask = np.asarray(f["union"], dtype=bool)
    return mask if mask.shape == grid else union_mask_on_grid([mask], grid)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """One model with its optimiser, inputs and targets; `step()` runs one timed training step."""

    def __init__(self, config: ViT3DConfig, args: argparse.Namespace, device: torch.device):
        torch.manual_seed(args.seed)  # same weights, inputs and targets for the gather and the dense model
        self.device = device
        self.model = ViT3D(config).to(device).train()
        self.volumes = torch.randn(args.batch_size, *args.grid, device=device)
        self.clip_target = torch.randn(args.batch_size, config.clip_dim, device=device)
        shape = config.vae_shape
        self.vae_target = None if shape is None else torch.randn(args.batch_size, *shape, device=device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)

    def step(self) -> float:
        """Seconds of forward + backward + AdamW step."""
        _sync(self.device)
        start = time.perf_counter()
        out = self.model(self.volumes)
        loss = F.mse_loss(out.clip, self.clip_target)
        if self.vae_target is not None:
            loss = loss + F.mse_loss(out.vae, self.vae_target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        _sync(self.device)
        return time.perf_counter() - start


def time_training(trainers: list[Trainer], warmup: int, steps: int) -> list[float]:
    """Median step seconds per trainer; timed steps alternate between trainers so drift hits all alike."""
    for trainer in trainers:
        for _ in range(warmup):
            trainer.step()
    times = [[] for _ in trainers]
    for _ in range(steps):
        for trainer, t in zip(trainers, times, strict=True):
            t.append(trainer.step())
    return [statistics.median(t) for t in times]


def matmul_gflops(size: int, device: torch.device, repeats: int = 10) -> float:
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    torch.matmul(a, b)  # warm-up (BLAS threads, cuBLAS handle)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def step_flops_per_sample(model: ViT3D) -> float:
    """6 * P_blocks * n + 12 * L * n**2 * d (see the module docstring)."""
    n, d, layers = model.num_tokens, model.config.hidden_size, model.config.num_layers
    block_params = sum(p.numel() for p in model.blocks.parameters())
    return 6 * block_params * n + 12 * layers * n**2 * d


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        raise SystemExit("--steps and --batch-size must be >= 1, --warmup >= 0")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    torch.manual_seed(args.seed)

    union = load_union(args)
    active = active_patch_indices(union, args.patch_size)
    head = dict(vae_shape=(4, 64, 64) if args.vae_head else None)
    common = dict(grid=args.grid, patch_size=args.patch_size, hidden_size=args.hidden_size,
                  num_layers=args.num_layers, num_heads=args.num_heads, active_patches=active, **head)  # fmt: skip
    gather_cfg = ViT3DConfig(**common)
    dense_cfg = ViT3DConfig(**common, dense_attention=True)
    total = gather_cfg.num_patches_total

    gather, dense = Trainer(gather_cfg, args, device), Trainer(dense_cfg, args, device)
    gather_s, dense_s = time_training([gather, dense], args.warmup, args.steps)
    gather_model, dense_model = gather.model, dense.model
    flops = step_flops_per_sample(gather_model) * args.batch_size
    gflops_step = flops / gather_s / 1e9
    gflops_mm = matmul_gflops(args.matmul_size, device)

    print(f"device={device.type} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"grid={'x'.join(map(str, args.grid))} patch_size={args.patch_size} hidden_size={args.hidden_size} "
          f"num_layers={args.num_layers} num_heads={args.num_heads} batch_size={args.batch_size}")  # fmt: skip
    print(f"mask={'simulated' if args.mask is None else args.mask} mask_voxels={int(union.sum())}")
    print(f"tokens_gather={gather_model.num_tokens} tokens_dense={dense_model.num_tokens}")
    print(f"step_s_gather={gather_s:.4f} step_s_dense={dense_s:.4f}")
    print(f"active_fraction={len(active) / total:.4f}")
    print(f"samples_per_s_gather={args.batch_size / gather_s:.2f}")
    print(f"samples_per_s_dense={args.batch_size / dense_s:.2f}")
    print(f"speedup={dense_s / gather_s:.2f}")
    print(f"gflop_per_step={flops / 1e9:.2f}")
    print(f"gflops_step={gflops_step:.1f}")
    print(f"gflops_matmul={gflops_mm:.1f}")
    print(f"mfu_cpu={gflops_step / gflops_mm:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
