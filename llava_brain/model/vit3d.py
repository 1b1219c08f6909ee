"""ViT3D: the fMRI encoder of the paper (Sec. 3.1, App. B) with its CLIP and VAE heads.

Every subject's whole-brain volume (X, Y, Z in NSD's NIfTI order) is first resized to one common grid
(`llava_brain.geometry.resize_to_grid`), then zero-padded at the *end* of each axis to a multiple of the
patch size and cut into cubic patches (`patchify`). Only the "active" patches (those intersecting the
union of all subjects' masks of the selected area, `active_patch_indices`) become tokens: the token gather
is where the speed comes from, since attention cost grows with the square of the token count. The active
index is stored in the config so that `from_pretrained` needs no flags. One model serves all subjects: no
subject-specific parameters.

`patchify` and `active_patch_indices` stay here, not in `geometry`: together they define the model's token
order (C order over the padded patch grid, voxels in C order within a patch), which the stored
`active_patches` and the gather index depend on; the data never needs them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from llava_brain.geometry import pad_to_patches, padded_patch_grid

# subj01's func1pt8mm grid (X, Y, Z); the training script passes the prepared metadata's grid instead.
DEFAULT_GRID = (81, 104, 83)


def patchify(volumes: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(batch, X, Y, Z) -> (batch, num_patches, patch_size**3); patches in C order over the padded patch grid."""
    padded = pad_to_patches(volumes, patch_size)
    return rearrange(padded, "b (x p) (y q) (z r) -> b (x y z) (p q r)", p=patch_size, q=patch_size, r=patch_size)


def active_patch_indices(union_mask: np.ndarray | torch.Tensor, patch_size: int) -> list[int]:
    """Indices (C order over the padded patch grid) of the patches holding at least one mask voxel.

    `union_mask` is a bool (X, Y, Z) mask already on the model's grid (`geometry.union_mask_on_grid`).
    """
    mask = torch.as_tensor(np.asarray(union_mask, dtype=bool))
    if mask.ndim != 3:
        raise ValueError(f"mask must be (X, Y, Z), got shape {tuple(mask.shape)}")
    any_voxel = patchify(mask[None].to(torch.uint8), patch_size)[0].amax(dim=1)  # (num_patches,)
    return torch.nonzero(any_voxel, as_tuple=True)[0].tolist()


def _requested_layers(request: bool | int | Sequence[int] | None, num_layers: int) -> list[int] | None:
    """Hidden-state indices (0 = embeddings .. num_layers) that an int / list `output_hidden_states` names;
    None for a bool or None (everything is computed). Negative indices count from the end, as in a tuple."""
    if request is None or isinstance(request, bool):
        return None
    wanted = [request] if isinstance(request, int) else list(request)
    count = num_layers + 1
    if not wanted or any(isinstance(i, bool) or not isinstance(i, int) or not -count <= i < count for i in wanted):
        raise ValueError(
            f"output_hidden_states must be a bool or layer indices in [-{count}, {count}), got {request!r}"
        )
    return [i % count for i in wanted]


class ViT3DConfig(PretrainedConfig):
    model_type = "vit3d"

    def __init__(
        self,
        *,
        grid: Sequence[int] = DEFAULT_GRID,
        patch_size: int = 14,
        hidden_size: int = 768,
        num_layers: int = 16,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        clip_dim: int = 768,
        vae_shape: Sequence[int] | None = (4, 64, 64),
        head_hidden: int = 1024,
        active_patches: Sequence[int] | None = None,
        dense_attention: bool = False,
        initializer_range: float = 0.02,
        position_init_std: float = 1.0,
        **kwargs,
    ):
        """
        grid: common (X, Y, Z) grid, in voxels, that every subject is resized to before the model.
        patch_size: edge of the cubic patches, in voxels.
        hidden_size, num_layers, num_heads, mlp_ratio: Transformer width, depth, heads and MLP width / width.
        dropout: dropout probability in attention and MLPs (training only).
        clip_dim: size of the CLIP image embedding the CLIP head predicts.
        vae_shape: (channels, height, width) of the VAE latent the VAE head predicts; None = no VAE head.
        head_hidden: hidden width of both 2-layer MLP heads.
        active_patches: sorted indices, in C order over the padded patch grid, of the patches that become tokens
            (from `active_patch_indices`); None = every patch.
        dense_attention: embed and attend every patch of the padded grid, ignoring `active_patches` (the
            benchmark's baseline).
        initializer_range: std of the normal init of linear weights and the CLS token.
        position_init_std: std of the normal init of the position embeddings. 1.0, not ViT's usual 0.02: in
            fMRI a patch's place says what it codes (retinotopy, category areas), while its content is mostly
            noise. Each block LayerNorms its tokens, so with tiny positions a token is normalised by its own
            noisy content and loses both its amplitude and where it came from; with unit positions the content
            is a small perturbation of a per-patch anchor and passes through almost linearly. On mini-NSD this
            doubles the held-out retrieval at equal training (docs/vit3d.md).
        """
        self.grid = [int(n) for n in grid]
        self.patch_size = int(patch_size)
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        self.num_heads = int(num_heads)
        self.mlp_ratio = float(mlp_ratio)
        self.dropout = float(dropout)
        self.clip_dim = int(clip_dim)
        self.vae_shape = None if vae_shape is None else [int(n) for n in vae_shape]
        self.head_hidden = int(head_hidden)
        self.active_patches = None if active_patches is None else [int(i) for i in active_patches]
        self.dense_attention = bool(dense_attention)
        self.initializer_range = float(initializer_range)
        self.position_init_std = float(position_init_std)
        super().__init__(**kwargs)
        self._check()

    def _check(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        total = self.num_patches_total
        if self.active_patches is not None:
            idx = self.active_patches
            if not idx or idx != sorted(set(idx)) or idx[0] < 0 or idx[-1] >= total:
                raise ValueError(
                    f"active_patches must be non-empty, sorted, unique and in [0, {total}) for grid {self.grid} "
                    f"and patch {self.patch_size}; compute them with active_patch_indices()"
                )

    @property
    def patch_grid(self) -> tuple[int, int, int]:
        return padded_patch_grid(self.grid, self.patch_size)

    @property
    def num_patches_total(self) -> int:
        return math.prod(self.patch_grid)

    def token_patches(self) -> list[int]:
        """Patch indices that become tokens, in token order."""
        if self.dense_attention or self.active_patches is None:
            return list(range(self.num_patches_total))
        return list(self.active_patches)


@dataclass
class ViT3DOutput(ModelOutput):
    """clip: (batch, clip_dim); vae: (batch, *vae_shape) or None; last_hidden_state: (batch, num_tokens, hidden)
    after the final LayerNorm; hidden_states: embeddings then every block's output, when requested."""

    clip: torch.Tensor | None = None
    vae: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x)); fused SDPA attention."""

    def __init__(self, *, hidden_size: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(hidden_size)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mlp_hidden, hidden_size),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(self.norm1(x)), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        attn = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x + F.dropout(self.proj(rearrange(attn, "b h n d -> b n (h d)")), self.dropout, self.training)
        return x + self.mlp(self.norm2(x))


def _mlp_head(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class ViT3D(PreTrainedModel):
    config_class = ViT3DConfig
    base_model_prefix = "vit3d"
    main_input_name = "volumes"
    _no_split_modules = ("Block",)

    def __init__(self, config: ViT3DConfig):
        super().__init__(config)
        h = config.hidden_size
        self.patch_embed = nn.Linear(config.patch_size**3, h)
        # One learned position per patch of the *full* padded grid, gathered like the patches, so a checkpoint's
        # positions stay meaningful if the active set changes (e.g. dense vs sparse).
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches_total, h))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, h))
        self.embed_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(hidden_size=h, num_heads=config.num_heads, mlp_ratio=config.mlp_ratio, dropout=config.dropout)
            for _ in range(config.num_layers)
        )
        self.norm = nn.LayerNorm(h)
        self.clip_head = _mlp_head(h, config.head_hidden, config.clip_dim)
        self.vae_head = (
            None if config.vae_shape is None else _mlp_head(h, config.head_hidden, math.prod(config.vae_shape))
        )
        # The gather index lives in the config (not a buffer): nothing to load, and it is built lazily per device.
        self._token_patches = config.token_patches()
        self._index_cache: dict[torch.device, torch.Tensor] = {}
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, ViT3D):
            pos_std = self.config.position_init_std
            init.trunc_normal_(module.pos_embed, std=pos_std, a=-2.0 * pos_std, b=2.0 * pos_std)  # cut at 2 sigma
            init.trunc_normal_(module.cls_token, std=std)
        elif isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    @property
    def num_tokens(self) -> int:
        """Tokens per volume handed to the LLM: CLS + one per gathered patch."""
        return 1 + len(self._token_patches)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def _index(self, device: torch.device) -> torch.Tensor:
        if device not in self._index_cache:
            self._index_cache[device] = torch.tensor(self._token_patches, dtype=torch.long, device=device)
        return self._index_cache[device]

    def embed(self, volumes: torch.Tensor) -> torch.Tensor:
        """(batch, X, Y, Z) on the config's grid -> (batch, num_tokens, hidden): CLS first, then gathered patches."""
        grid = tuple(self.config.grid)
        if tuple(volumes.shape[1:]) != grid:
            raise ValueError(f"volumes must be (batch, {grid}) — call resize_to_grid first; got {tuple(volumes.shape)}")
        index = self._index(volumes.device)
        patches = patchify(volumes.to(self.patch_embed.weight.dtype), self.config.patch_size)  # (b, all, p**3)
        tokens = self.patch_embed(patches.index_select(1, index)) + self.pos_embed.index_select(1, index)
        cls = self.cls_token.expand(volumes.shape[0], -1, -1)
        return self.embed_dropout(torch.cat([cls, tokens], dim=1))

    def forward(self, volumes: torch.Tensor, *, output_hidden_states: bool | int | Sequence[int] | None = False,
                return_dict: bool | None = True, **kwargs) -> ViT3DOutput | tuple:  # fmt: skip
        """volumes (batch, X, Y, Z) on the config's grid -> heads' outputs and, on request, the hidden states.

        output_hidden_states: True = all hidden states (embeddings, then every block's output). LLaVA calls its
            vision tower as `tower(pixel_values, return_dict=True, output_hidden_states=<vision_feature_layer>)`:
            an int or a list of ints (0 included) asks for those layers only, so only the blocks up to the deepest
            of them run; the later entries of `hidden_states` are None, and so are clip, vae and last_hidden_state
            (the heads read the last block). For the penultimate layer (-2) that skips the last block.
        return_dict: False = a tuple of the non-None fields (transformers' convention).
        kwargs: what a caller forwards through the tower (e.g. the HF Trainer's num_items_in_batch) is ignored.
        """
        layers = _requested_layers(output_hidden_states, self.config.num_layers)
        x = self.embed(volumes)
        hidden_states = [x]
        depth = self.config.num_layers if layers is None else max(layers)
        for block in self.blocks[:depth]:
            x = block(x)
            hidden_states.append(x)
        if layers is not None:
            hidden_states += [None] * (self.config.num_layers - depth)
            output = ViT3DOutput(hidden_states=tuple(hidden_states))
        else:
            x = self.norm(x)
            cls = x[:, 0]
            vae = None
            if self.vae_head is not None:
                vae = self.vae_head(cls).view(-1, *self.config.vae_shape)
            output = ViT3DOutput(
                clip=self.clip_head(cls),
                vae=vae,
                last_hidden_state=x,
                hidden_states=tuple(hidden_states) if output_hidden_states else None,
            )
        return output if return_dict is not False else output.to_tuple()

    def tokens(self, volumes: torch.Tensor) -> torch.Tensor:
        """Penultimate layer's hidden states (batch, num_tokens, hidden) for the LLM projector.

        That is the output of block num_layers - 1 (the embeddings for a 1-layer model), before any final norm,
        as LLaVA takes CLIP's penultimate layer; the last block is not run.
        """
        x = self.embed(volumes)
        for block in self.blocks[:-1]:
            x = block(x)
        return x
