"""Train the tiny Stable unCLIP's UNet on mini-NSD: a latent diffusion model conditioned on CLIP image embeddings.

Stable unCLIP's own objective, small: the VAE latents of training stimuli (scaled by the VAE's scaling_factor)
are noised at a random timestep of the pipeline's schedule (DDPM with the DDIM scheduler's betas), and the UNet
predicts the v-target (`get_velocity`, the schedule's prediction_type) given the image's CLIP embedding, itself
noise-augmented at a random level of the image noising schedule (`noise_image_embeddings`'s arithmetic; the
normaliser is first set to the embeddings' mean and std, as Stable unCLIP's holds CLIP's statistics), and one of
the image's captions through the frozen text encoder. For classifier-free guidance the image embedding is zeroed
and the caption emptied with probability `drop` each, independently, which is what the pipeline's unconditional
branch feeds.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from llava_brain.tiny.builders import DEFAULT_SEED, seeded
from llava_brain.train import adamw, warmup_cosine_scheduler

WARMUP_STEPS = 50
MAX_TRAIN_NOISE_LEVEL = 250  # image-embedding noise augmentation in training: levels 0..249 of 1000


def set_normalizer_stats(pipe, clip_embeds: torch.Tensor) -> None:
    """The image normaliser's mean / std := the CLIP embeddings' per-dimension statistics (Stable unCLIP's hold
    CLIP ViT-L/14's)."""
    with torch.no_grad():
        pipe.image_normalizer.mean.copy_(clip_embeds.mean(0, keepdim=True))
        pipe.image_normalizer.std.copy_(clip_embeds.std(0, keepdim=True).clamp_min(1e-6))


def augmented_embeddings(pipe, clip: torch.Tensor, levels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """`noise_image_embeddings` with one level per row: (n, D) -> (n, 2·D) class labels."""
    from diffusers.models.embeddings import get_timestep_embedding

    scaled = pipe.image_normalizer.scale(clip)
    noised = pipe.image_normalizer.unscale(pipe.image_noising_scheduler.add_noise(scaled, noise, levels))
    level_embedding = get_timestep_embedding(levels, clip.shape[-1], flip_sin_to_cos=True, downscale_freq_shift=0)
    return torch.cat([noised, level_embedding.to(noised.dtype)], dim=1)


def caption_states(pipe, captions: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """(n, 77, hidden) frozen text-encoder states of `captions`, padded to the tokenizer's length as the pipeline."""
    out = []
    with torch.no_grad():
        for start in range(0, len(captions), batch_size):
            ids = pipe.tokenizer(list(captions[start : start + batch_size]), padding="max_length", truncation=True,
                                 max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids  # fmt: skip
            out.append(pipe.text_encoder(ids)[0])
    return torch.cat(out)


def train_unclip(pipe, latents: torch.Tensor, clip_embeds: torch.Tensor, captions: Sequence[Sequence[str]], *,
                 steps: int, batch_size: int = 32, lr: float = 1e-3, drop: float = 0.1, seed: int = DEFAULT_SEED,
                 progress: bool = False) -> dict:  # fmt: skip
    """Train `pipe.unet` in place; latents (n, C, h, w) already scaled, clip_embeds (n, D), n caption lists.

    AdamW, `train.warmup_cosine` schedule (WARMUP_STEPS warm-up steps, then cosine decay to 0), MSE on the
    v-target. Deterministic for a fixed seed on one machine and torch thread count. Leaves the UNet in eval mode.
    Returns {"seconds", "final_loss"}.
    """
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    n = len(latents)
    if len(clip_embeds) != n or len(captions) != n or any(len(c) == 0 for c in captions):
        raise ValueError("need one CLIP embedding and >= 1 caption per latent")
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the denoiser's betas and v-prediction
    set_normalizer_stats(pipe, clip_embeds)
    flat = [c for caps in captions for c in caps]
    starts = np.cumsum([0, *(len(c) for c in captions)])
    states = caption_states(pipe, [*flat, ""])  # the last row: the empty prompt of the unconditional branch
    empty = len(flat)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = adamw(pipe.unet.parameters(), lr=lr)
    schedule = warmup_cosine_scheduler(optimizer, warmup=min(WARMUP_STEPS, steps), total=steps)
    train_steps = noise_scheduler.config.num_train_timesteps
    start, loss = time.perf_counter(), torch.tensor(float("nan"))
    pipe.unet.train()
    with seeded(seed):
        for _ in tqdm(range(steps), desc="unCLIP UNet", disable=not progress):
            rows = rng.choice(n, min(batch_size, n), replace=False)
            picks = starts[rows] + rng.integers(np.diff(starts)[rows])
            picks = np.where(rng.random(len(rows)) < drop, empty, picks)
            z = latents[torch.from_numpy(rows)]
            noise = torch.randn(z.shape, generator=generator)
            t = torch.randint(0, train_steps, (len(rows),), generator=generator)
            levels = torch.randint(0, MAX_TRAIN_NOISE_LEVEL, (len(rows),), generator=generator)
            embedding_noise = torch.randn(len(rows), clip_embeds.shape[1], generator=generator)
            labels = augmented_embeddings(pipe, clip_embeds[torch.from_numpy(rows)], levels, embedding_noise)
            keep = torch.from_numpy(rng.random(len(rows)) >= drop).float()[:, None]
            prediction = pipe.unet(noise_scheduler.add_noise(z, noise, t), t,
                                   encoder_hidden_states=states[torch.from_numpy(picks)],
                                   class_labels=labels * keep).sample  # fmt: skip
            loss = F.mse_loss(prediction, noise_scheduler.get_velocity(z, noise, t))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    pipe.unet.eval()
    return {"seconds": time.perf_counter() - start, "final_loss": float(loss.detach())}


def _resized_uint8(images: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC)) for im in images])


@torch.no_grad()
def unclip_check(pipe, clip_vision, clip_processor, stimuli: np.ndarray, *, steps: int = 10, guidance: float = 3.0,
                 seed: int = DEFAULT_SEED) -> dict:  # fmt: skip
    """Held-out check of a trained unCLIP: images generated from the *true* CLIP embeddings of `stimuli` (n, S, S, 3)
    uint8 (pure noise start, no prompt), scored against the stimuli and against shuffled pairs (each generated image
    with the next stimulus): PixCorr at the decoder's resolution and two-way identification on the tiny CLIP's
    image embeddings (chance 0.5). Returns {"pixcorr", "shuffled_pixcorr", "two_way", "shuffled_two_way"}."""
    from llava_brain.evaluation.image_metrics import pixcorr, two_way_identification
    from llava_brain.recon.unclip import UnclipSettings, decode
    from llava_brain.tiny.clip_training import clip_pixel_values

    size = clip_vision.config.image_size
    embeds = clip_vision(pixel_values=clip_pixel_values(_resized_uint8(stimuli, size), clip_processor)).image_embeds
    settings = UnclipSettings(beta=1.0, steps=steps, guidance=guidance, vae_init=False)
    seeds = [seed * 100_003 + k for k in range(len(stimuli))]
    generated = decode(pipe, embeds.numpy(), None, [""] * len(stimuli), seeds, settings)
    real = _resized_uint8(stimuli, generated.shape[1])
    shuffled = np.roll(real, 1, axis=0)
    features = clip_vision(pixel_values=clip_pixel_values(_resized_uint8(generated, size), clip_processor)).image_embeds
    real_features = embeds.numpy()
    return {
        "pixcorr": pixcorr(generated, real),
        "shuffled_pixcorr": pixcorr(generated, shuffled),
        "two_way": two_way_identification(real_features, features.numpy()),
        "shuffled_two_way": two_way_identification(np.roll(real_features, 1, axis=0), features.numpy()),
    }
