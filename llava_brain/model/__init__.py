"""Models: the ViT3D fMRI encoder and Brain-LLaVA (registered with transformers' Auto classes at import).

Importing this package registers model_type "vit3d" (AutoConfig, AutoModel) and BrainLlavaProcessor
(AutoProcessor), which is what `AutoModelForImageTextToText.from_pretrained` / `AutoProcessor.from_pretrained`
need to load a Brain-LLaVA folder. Volume geometry (resizing to the common grid, mask unions, padding to
patches) lives in `llava_brain.geometry`.
"""

from transformers import AutoConfig, AutoModel, AutoProcessor

from llava_brain.model.vit3d import ViT3D, ViT3DConfig, ViT3DOutput, active_patch_indices, patchify

AutoConfig.register("vit3d", ViT3DConfig, exist_ok=True)
AutoModel.register(ViT3DConfig, ViT3D, exist_ok=True)

from llava_brain.model.processor import BrainLlavaProcessor  # noqa: E402  (after the ViT3D registration)

# AutoProcessor resolves a saved processor by its class name among the registered ones; the key (a config class)
# only serves folders without processor_config.json, so the tower's config is as good a key as any.
AutoProcessor.register(ViT3DConfig, BrainLlavaProcessor, exist_ok=True)

from llava_brain.model.brain_llava import (  # noqa: E402
    build_brain_llava,
    load_brain_llava,
    save_brain_llava,
)

__all__ = [
    "BrainLlavaProcessor",
    "ViT3D",
    "ViT3DConfig",
    "ViT3DOutput",
    "active_patch_indices",
    "build_brain_llava",
    "load_brain_llava",
    "patchify",
    "save_brain_llava",
]
