"""Training of the tiny VAE on NSD stimuli, so that its latents hold coarse shapes and colours."""

from __future__ import annotations

import time

import numpy as np
import torch

from llava_brain.tiny.builders import DEFAULT_SEED, seeded
from llava_brain.train import adamw, warmup_cosine_scheduler

WARMUP_STEPS = 20  # linear warm-up before the cosine decay (fewer when training is shorter)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(n, H, W, 3) uint8 RGB -> (n, 3, H, W) float32 in [-1, 1], the range diffusers' VAEs take."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(
    vae,
    images: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1.5e-3,
    kl_weight: float = 1e-4,
    low_res_fraction: float = 0.8,
    seed: int = DEFAULT_SEED,
    progress: bool = False,
) -> dict:
    """Train `vae` in place on `images` ((n, 3, S, S) in [-1, 1]): MSE + kl_weight x KL (nats per latent value).

    Why two resolutions: at 2 CPU cores, batches of >= 32 images are what make this architecture learn
    (batches of 8 stall at PixCorr ~0.65), and 32 images at S/2 cost what 8 cost at S. The first
    `low_res_fraction` of the steps therefore use S/2 images (the network is convolutional, and shapes at
    half size are still shapes), the rest full-size images at half the batch. AdamW, `train.warmup_cosine`
    schedule (WARMUP_STEPS linear warm-up steps, then cosine decay to 0). Afterwards `scaling_factor` is set
    as in Stable Diffusion: 1 / std of the latent means. Deterministic for a fixed seed on one machine with
    one torch thread count (another thread count sums the convolution gradients in another order).
    Returns {"seconds", "final_loss", "scaling_factor"}.
    """
    from tqdm.auto import tqdm

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    size = images.shape[-1]
    low_res = torch.nn.functional.interpolate(images, size=size // 2, mode="area")
    low_steps = round(steps * low_res_fraction)
    generator = torch.Generator().manual_seed(seed)
    optimizer = adamw(vae.parameters(), lr=lr)
    schedule = warmup_cosine_scheduler(optimizer, warmup=min(WARMUP_STEPS, steps), total=steps)
    start, loss = time.perf_counter(), torch.tensor(float("nan"))
    vae.train()
    with seeded(seed):  # the posterior samples draw from torch's global RNG
        for step in tqdm(range(steps), desc="VAE", disable=not progress):
            pool, n = (low_res, batch_size) if step < low_steps else (images, max(1, batch_size // 2))
            batch = pool[torch.randint(len(pool), (n,), generator=generator)]
            posterior = vae.encode(batch).latent_dist
            reconstruction = vae.decode(posterior.sample()).sample
            kl = posterior.kl().mean() / posterior.mean[0].numel()
            loss = torch.nn.functional.mse_loss(reconstruction, batch) + kl_weight * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images[:256].split(64)])
    scaling_factor = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    return {
        "seconds": time.perf_counter() - start,
        "final_loss": float(loss.detach()),
        "scaling_factor": scaling_factor,
    }
