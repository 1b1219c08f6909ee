"""Reconstruction from predicted embeddings: the paper's Stable unCLIP decoder (`unclip`)."""

from llava_brain.recon.unclip import (
    COMPONENTS,
    UnclipSettings,
    check_pipeline_folder,
    closest_to_embedding,
    decode,
    load_pipeline,
    sample_seed,
    to_uint8,
    vae_images,
)

__all__ = [
    "COMPONENTS",
    "UnclipSettings",
    "check_pipeline_folder",
    "closest_to_embedding",
    "decode",
    "load_pipeline",
    "sample_seed",
    "to_uint8",
    "vae_images",
]
