"""Models: the ViT3D fMRI encoder (registered with transformers' Auto classes at import).

Volume geometry (resizing to the common grid, mask unions, padding to patches) lives in `llava_brain.geometry`.
"""

from transformers import AutoConfig, AutoModel

from llava_brain.model.vit3d import ViT3D, ViT3DConfig, ViT3DOutput, active_patch_indices, patchify

AutoConfig.register("vit3d", ViT3DConfig, exist_ok=True)
AutoModel.register(ViT3DConfig, ViT3D, exist_ok=True)

__all__ = ["ViT3D", "ViT3DConfig", "ViT3DOutput", "active_patch_indices", "patchify"]
