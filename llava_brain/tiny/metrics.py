"""Scores of the tiny models on held-out images: CLIP image<->caption retrieval and the VAE's reconstruction PixCorr.

`pixcorr` is `llava_brain.evaluation.image_metrics.pixcorr`, the one eval_recon.py reports (re-exported here).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llava_brain.evaluation.image_metrics import pixcorr  # one PixCorr for the tiny VAE and eval_recon.py
from llava_brain.tiny.clip_training import tokenize_captions, unit_image_embeds, unit_text_embeds


@torch.no_grad()
def clip_retrieval(
    vision, text, tokenizer, pixel_values: torch.Tensor, captions: Sequence[Sequence[str]], batch_size: int = 256
) -> dict[str, float]:
    """Top-1 retrieval between n images and their first captions by cosine similarity of CLIP embeddings.

    image_to_text_top1: fraction of images whose most similar caption (among the n first captions) is their
    own; text_to_image_top1 the reverse; chance 1/n (`evaluation.top1_retrieval`: a tie goes to the lower
    index, so identical captions of two images count for the first only). pixel_values: (n, 3, S, S) from
    `clip_pixel_values`; captions: n caption lists, as for `train_clip`. Call it on held-out images with the
    towers in eval mode.
    """
    n = len(pixel_values)
    if n != len(captions) or n < 2:
        raise ValueError(f"need >= 2 images with one caption list each, got {n} and {len(captions)}")
    from llava_brain.evaluation import top1_retrieval

    ids = tokenize_captions(tokenizer, [caps[0] for caps in captions])
    image_embeds = torch.cat([unit_image_embeds(vision, chunk) for chunk in pixel_values.split(batch_size)])
    text_embeds = torch.cat(
        [unit_text_embeds(text, tokenizer.pad({"input_ids": ids[i : i + batch_size]}, return_tensors="pt"))
         for i in range(0, n, batch_size)]
    )  # fmt: skip
    top1 = top1_retrieval(image_embeds, text_embeds)  # rows: images (the "brain" side), columns: captions
    return {
        "image_to_text_top1": top1["brain_to_image"],
        "text_to_image_top1": top1["image_to_brain"],
        "chance": top1["chance"],
    }


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Decode the posterior mean of each image ((n, 3, S, S) in [-1, 1]); clipped to [-1, 1]."""
    out = [vae.decode(vae.encode(chunk).latent_dist.mean).sample for chunk in images.split(batch_size)]
    return torch.cat(out).clamp(-1.0, 1.0)


def reconstruction_pixcorr(vae, images: torch.Tensor) -> dict[str, float]:
    """PixCorr of VAE reconstructions with their originals, and of shuffled pairs (original i vs
    reconstruction i+1 mod n, never itself): the chance level the first must clearly beat."""
    if len(images) < 2:
        raise ValueError("need at least 2 images to form shuffled pairs")
    recon = reconstruct(vae, images)
    return {"pixcorr": pixcorr(recon, images), "shuffled_pixcorr": pixcorr(recon.roll(1, 0), images)}
