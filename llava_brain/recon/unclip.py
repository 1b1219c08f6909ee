"""The paper's decoder: x̂ = D((1 − β)·ẑ_vae + β·ε | ẑ_clip, prompt) on Stable unCLIP's components.

The predicted VAE latent ẑ_vae (scaled by the VAE's scaling_factor, as the training targets) is the start: the
pipeline's scheduler noises it to strength β (β = 0.93: the last 93 % of the denoising steps run; β = 1 or
`vae_init=False` starts from pure noise), then the UNet denoises it conditioned on the predicted CLIP image
embedding ẑ_clip and on a text prompt, with classifier-free guidance. The image embedding goes through the
pipeline's own normaliser and noise augmentation (`noise_level`, 0 = none) and its sinusoidal noise-level
embedding, exactly as `StableUnCLIPImg2ImgPipeline` conditions the UNet (`noise_image_embeddings`); the
unconditional branch gets zeros for it and the empty prompt, as the pipeline's does. diffusers'
`StableUnCLIPImg2ImgPipeline.__call__` has no strength argument, hence this loop on its components.

Every sample has its own seed (its noise, the image-embedding noise), so a sample's image does not depend on
the batch it is decoded in, and a resumed run reproduces an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llava_brain.errors import BadInputError

# Components the decoder reads from a StableUnCLIPImg2ImgPipeline folder (model_index.json names them).
COMPONENTS = ("unet", "vae", "scheduler", "text_encoder", "tokenizer", "image_normalizer", "image_noising_scheduler")


@dataclass(frozen=True)
class UnclipSettings:
    beta: float = 0.93  # share of the denoising steps run from the noised VAE latent (strength)
    steps: int = 20  # denoising steps of the full schedule (β · steps of them run)
    guidance: float = 3.0  # classifier-free guidance scale (1 = none)
    noise_level: int = 0  # noise augmentation of the image embedding (0..999 of the image noising schedule)
    vae_init: bool = True  # False: start from pure noise (the "w/o VAE feature" ablation)

    def check(self) -> None:
        if not 0.0 < self.beta <= 1.0:
            raise ValueError(f"beta must be in (0, 1], got {self.beta}")
        if self.steps < 1 or self.guidance < 1.0 or not 0 <= self.noise_level < 1000:
            raise ValueError(f"need steps >= 1, guidance >= 1, noise_level in [0, 1000); got {self}")


def check_pipeline_folder(name: str) -> None:
    """A local folder must be a StableUnCLIPImg2ImgPipeline with the decoder's components (BadInputError)."""
    folder = Path(name)
    if not folder.exists():
        return  # a hub id: from_pretrained reports it
    index = folder / "model_index.json"
    if not index.is_file():
        raise BadInputError(folder, "is not a diffusers pipeline folder (no model_index.json); expected a Stable "
                                    "unCLIP pipeline (StableUnCLIPImg2ImgPipeline)")  # fmt: skip
    import json

    found = json.loads(index.read_text())
    missing = [c for c in COMPONENTS if c not in found or not (folder / c).is_dir()]
    if missing:
        raise BadInputError(folder, f"lacks the Stable unCLIP component(s) {', '.join(missing)} (model_index.json "
                                    f"names {', '.join(k for k in found if not k.startswith('_'))})")  # fmt: skip


def load_pipeline(name: str, device: str, dtype: torch.dtype):
    """StableUnCLIPImg2ImgPipeline from a folder or hub id, without the safety checker, on `device`."""
    from diffusers import StableUnCLIPImg2ImgPipeline

    check_pipeline_folder(name)
    pipe = StableUnCLIPImg2ImgPipeline.from_pretrained(name, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def sample_noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """Float32 standard normal noise of `shape` from a CPU generator seeded with `seed` (device independent)."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(seed)))


def image_conditioning(pipe, clip: torch.Tensor, noise_level: int, seeds: Sequence[int]) -> torch.Tensor:
    """(n, 2·D) class labels of the UNet: the normalised, noise-augmented embedding and its level's embedding."""
    noise = torch.stack([sample_noise(clip.shape[1:], s + 1_000_003) for s in seeds]).to(clip.device, clip.dtype)
    return pipe.noise_image_embeddings(clip, noise_level=noise_level, noise=noise)


@torch.no_grad()
def decode(pipe, clip: np.ndarray, vae_latents: np.ndarray | None, prompts: Sequence[str], seeds: Sequence[int],
           settings: UnclipSettings, on_step: Callable[[int, int], None] | None = None) -> np.ndarray:  # fmt: skip
    """(n, H, W, 3) uint8 images of n samples: clip (n, D), vae_latents (n, C, h, w) scaled or None, prompts
    ("" = none), one seed each. The caller batches; results do not depend on the batch. `on_step(k, total)`
    is called after each of the denoising steps (k = 1..total), e.g. for a progress bar."""
    settings.check()
    device, dtype = pipe.unet.device, pipe.unet.dtype
    n = len(seeds)
    if len(clip) != n or len(prompts) != n or (vae_latents is not None and len(vae_latents) != n):
        raise ValueError("clip, vae_latents, prompts and seeds need one entry per sample")
    cfg = settings.guidance > 1.0
    text, negative = pipe.encode_prompt(list(prompts), device, 1, cfg, negative_prompt=[""] * n if cfg else None)
    clip_t = torch.from_numpy(np.array(clip, dtype=np.float32)).to(device, dtype)  # a copy: maps are read-only
    labels = image_conditioning(pipe, clip_t, settings.noise_level, seeds)
    if cfg:
        text, labels = torch.cat([negative, text]), torch.cat([torch.zeros_like(labels), labels])
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # a private copy: no shared state
    scheduler.set_timesteps(settings.steps, device=device)
    timesteps = scheduler.timesteps
    channels, size = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    noise = torch.stack([sample_noise((channels, size, size), s) for s in seeds]).to(device, dtype)
    use_vae = settings.vae_init and settings.beta < 1.0 and vae_latents is not None
    if use_vae:
        start = settings.steps - min(round(settings.steps * settings.beta), settings.steps)
        timesteps = timesteps[start:]
        z = torch.from_numpy(np.array(vae_latents, dtype=np.float32)).to(device, dtype)
        latents = scheduler.add_noise(z, noise, timesteps[:1].repeat(n))
    else:
        latents = noise * scheduler.init_noise_sigma
    for k, t in enumerate(timesteps, start=1):
        model_input = torch.cat([latents] * 2) if cfg else latents
        model_input = scheduler.scale_model_input(model_input, t)
        out = pipe.unet(model_input, t, encoder_hidden_states=text, class_labels=labels, return_dict=False)[0]
        if cfg:
            uncond, cond = out.chunk(2)
            out = uncond + settings.guidance * (cond - uncond)
        latents = scheduler.step(out, t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step(k, len(timesteps))
    return to_uint8(pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0])


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(n, 3, H, W) in [-1, 1] -> (n, H, W, 3) uint8 (rounded, as diffusers' image processor)."""
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round()
    return images.permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)


@torch.no_grad()
def vae_images(vae, latents: np.ndarray) -> np.ndarray:
    """(n, H, W, 3) uint8: latents (n, C, h, w), scaled by the VAE's scaling_factor as the ViT3D's targets, through
    an AutoencoderKL's decoder (the low-level reconstruction)."""
    dtype = next(vae.parameters()).dtype
    # a copy: a memory-mapped prediction file is read-only, torch wants writable memory
    z = torch.from_numpy(np.array(latents, dtype=np.float32)).to(vae.device, dtype)
    return to_uint8(vae.decode(z / vae.config.scaling_factor).sample)


def sample_seed(seed: int, nsd_id: int, candidate: int = 0) -> int:
    """The noise seed of one reconstruction: fixed by the run's seed, the image and the candidate number, so
    it does not depend on the batch, the order or a resume."""
    return (int(seed) * 1_000_003 + int(nsd_id) * 101 + int(candidate)) % (2**63)


@torch.no_grad()
def closest_to_embedding(pipe, candidates: np.ndarray, clip: np.ndarray) -> np.ndarray:
    """MindEye's selection among K reconstructions per sample: the index (n,) of the candidate whose CLIP image
    embedding (the pipeline's image encoder) has the highest cosine with the sample's predicted embedding.
    candidates (n, K, H, W, 3) uint8, clip (n, D)."""
    n, k = candidates.shape[:2]
    flat = [candidates[i, j] for i in range(n) for j in range(k)]
    pixels = pipe.feature_extractor(images=flat, return_tensors="pt").pixel_values
    encoder = pipe.image_encoder
    embeds = encoder(pixel_values=pixels.to(encoder.device, encoder.dtype)).image_embeds.float().cpu()
    embeds = torch.nn.functional.normalize(embeds, dim=-1).view(n, k, -1)
    target = torch.nn.functional.normalize(torch.from_numpy(np.array(clip, dtype=np.float32)), dim=-1)
    return torch.einsum("nkd,nd->nk", embeds, target).argmax(1).numpy()
