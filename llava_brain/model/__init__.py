"""Models: the ViT3D fMRI encoder (registered with transformers' Auto classes at import)."""

from transformers import AutoConfig, AutoModel

from llava_brain.model.vit3d import (
    ViT3D,
    ViT3DConfig,
    ViT3DOutput,
    active_patch_indices,
    padded_patch_grid,
    resize_to_grid,
    union_mask_on_grid,
)

AutoConfig.register("vit3d", ViT3DConfig, exist_ok=True)
AutoModel.register(ViT3DConfig, ViT3D, exist_ok=True)

__all__ = [
    "ViT3D",
    "ViT3DConfig",
    "ViT3DOutput",
    "active_patch_indices",
    "padded_patch_grid",
    "resize_to_grid",
    "union_mask_on_grid",
]
