"""llava_brain.model.vit3d and llava_brain.geometry: patch gather, padding, resizing, save/load, full-size build
and a tiny learning run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModel

from llava_brain.geometry import pad_to_patches, padded_patch_grid, resize_to_grid, union_mask_on_grid
from llava_brain.model import ViT3D, ViT3DConfig, active_patch_indices, patchify

GRID = (20, 24, 18)  # not divisible by 6 along X: exercises padding
PATCH = 6  # padded patch grid (4, 4, 3) = 48 patches


def _union_mask() -> np.ndarray:
    """One voxel in patch (0, 0, 0) and one in the last patch (3, 3, 2), which is partly padding."""
    mask = np.zeros(GRID, bool)
    mask[1, 1, 1] = True
    mask[19, 23, 17] = True
    return mask


def _tiny_config(**overrides) -> ViT3DConfig:
    kwargs = dict(
        grid=GRID,
        patch_size=PATCH,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        clip_dim=16,
        vae_shape=(4, 4, 4),
        head_hidden=64,
        active_patches=active_patch_indices(_union_mask(), PATCH),
    )
    return ViT3DConfig(**{**kwargs, **overrides})


def _tiny_model(**overrides) -> ViT3D:
    torch.manual_seed(0)
    return ViT3D(_tiny_config(**overrides)).eval()


def _volumes(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, *GRID, generator=torch.Generator().manual_seed(1))


def test_active_patches_from_hand_made_mask():
    assert padded_patch_grid(GRID, PATCH) == (4, 4, 3)
    # C order over (4, 4, 3): patch (3, 3, 2) -> 3 * 12 + 3 * 3 + 2 = 47; all the others hold no mask voxel.
    assert active_patch_indices(_union_mask(), PATCH) == [0, 47]
    assert active_patch_indices(np.zeros(GRID, bool), PATCH) == []


def test_output_and_token_shapes():
    model = _tiny_model()
    x = _volumes()
    out = model(x, output_hidden_states=True)
    assert model.num_tokens == 1 + 2 and model.hidden_size == 32
    assert out.clip.shape == (2, 16)
    assert out.vae.shape == (2, 4, 4, 4)
    assert out.last_hidden_state.shape == (2, 3, 32)
    assert len(out.hidden_states) == 2 + 1  # embeddings + every block
    tokens = model.tokens(x)
    assert tokens.shape == (2, model.num_tokens, 32)
    torch.testing.assert_close(tokens, out.hidden_states[-2])
    assert model(x).hidden_states is None


def test_no_vae_head():
    out = _tiny_model(vae_shape=None)(_volumes())
    assert out.vae is None and out.clip.shape == (2, 16)


def test_wrong_grid_is_rejected():
    with pytest.raises(ValueError, match="resize_to_grid"):
        _tiny_model()(torch.zeros(1, 20, 24, 19))


def test_gather_ignores_inactive_patches_dense_does_not():
    model = _tiny_model()
    dense = ViT3D(_tiny_config(dense_attention=True)).eval()
    dense.load_state_dict(model.state_dict())  # same parameters: only the token set differs
    assert dense.num_tokens == 1 + 48
    x = _volumes()
    inactive = x.clone()
    inactive[:, 0, 0, 6:12] += 5.0  # patch (0, 0, 1) = index 1: no mask voxel
    active = x.clone()
    active[:, 2, 3, 4] += 5.0  # patch 0, active
    with torch.no_grad():
        base, base_dense = model(x), dense(x)
        torch.testing.assert_close(model(inactive).clip, base.clip, rtol=0, atol=0)
        torch.testing.assert_close(model(inactive).vae, base.vae, rtol=0, atol=0)
        assert not torch.allclose(model(active).clip, base.clip)
        assert not torch.allclose(dense(inactive).clip, base_dense.clip)
        assert dense(x).last_hidden_state.shape == (2, 49, 32)


def test_padding_is_zeros_and_at_the_end():
    ones = torch.ones(2, *GRID)
    padded = pad_to_patches(ones, PATCH)
    assert padded.shape == (2, 24, 24, 18)
    assert padded[:, :20].eq(1).all() and padded[:, 20:].eq(0).all()
    patches = patchify(ones, PATCH)  # (batch, 48, 216)
    assert patches.shape == (2, 48, PATCH**3)
    # The last X slab of patches (index >= 3 * 12) holds 2 real voxel rows of 6 along X: 2 / 6 of its values.
    torch.testing.assert_close(patches[:, 36:].mean(), torch.tensor(2 / 6))
    torch.testing.assert_close(patches[:, :36].mean(), torch.tensor(1.0))


def test_resize_to_grid():
    x = _volumes()
    assert resize_to_grid(x, GRID) is x
    const = torch.full((3, 27, 34, 27), 2.5)
    up = resize_to_grid(const, (81, 104, 83))
    assert up.shape == (3, 81, 104, 83)
    torch.testing.assert_close(up, torch.full_like(up, 2.5))
    half = resize_to_grid(const.half(), (10, 12, 9))
    assert half.dtype == torch.float16 and half.shape == (3, 10, 12, 9)
    mask = torch.zeros(1, 27, 34, 27, dtype=torch.bool)
    mask[0, 13, 20, 5] = True
    for grid in [(81, 104, 83), (8, 9, 7), (27, 40, 20)]:
        resized = resize_to_grid(mask, grid)
        assert resized.dtype == torch.bool and resized.shape == (1, *grid)
        assert 0 < resized.sum() < math.prod(grid) / 8
        # The region stays where it was, in relative coordinates.
        centre = torch.nonzero(resized[0]).float().mean(0) / torch.tensor(grid)
        expected = (torch.tensor([13, 20, 5]) + 0.5) / torch.tensor([27, 34, 27])
        assert torch.allclose(centre, expected, atol=0.15)


def test_union_mask_on_grid():
    a, b = np.zeros((27, 34, 27), bool), np.zeros((30, 30, 30), bool)
    a[0, 0, 0] = True
    b[29, 29, 29] = True
    union = union_mask_on_grid([a, b], GRID)
    assert union.shape == GRID and union[0, 0, 0] and union[-1, -1, -1]
    assert active_patch_indices(union, PATCH) == [0, 47]


def test_save_and_load_round_trip(tmp_path):
    # AutoModel knows "vit3d" because importing llava_brain.model (at the top of this file) registered it.
    model = _tiny_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    x = _volumes()
    for loaded in [ViT3D.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)]:
        assert isinstance(loaded, ViT3D)
        loaded.eval()
        assert loaded.config.active_patches == [0, 47]
        assert loaded.config.grid == list(GRID) and loaded.config.vae_shape == [4, 4, 4]
        assert loaded.num_tokens == model.num_tokens
        with torch.no_grad():
            want, got = model(x), loaded(x)
        torch.testing.assert_close(got.clip, want.clip, rtol=0, atol=0)
        torch.testing.assert_close(got.vae, want.vae, rtol=0, atol=0)


def _expected_parameters(cfg: ViT3DConfig) -> int:
    """Parameter count derived from the architecture (weights + biases of every Linear, LayerNorm = 2 * width)."""
    h, p3, m = cfg.hidden_size, cfg.patch_size**3, int(cfg.hidden_size * cfg.mlp_ratio)
    embedding = p3 * h + h
    positions = cfg.num_patches_total * h  # full padded grid
    cls = h
    block = 2 * (2 * h) + (h * 3 * h + 3 * h) + (h * h + h) + (h * m + m) + (m * h + h)
    final_norm = 2 * h
    clip_head = (h * cfg.head_hidden + cfg.head_hidden) + (cfg.head_hidden * cfg.clip_dim + cfg.clip_dim)
    vae_out = math.prod(cfg.vae_shape)
    vae_head = (h * cfg.head_hidden + cfg.head_hidden) + (cfg.head_hidden * vae_out + vae_out)
    return embedding + positions + cls + cfg.num_layers * block + final_norm + clip_head + vae_head


def test_full_configuration_builds_on_meta_device():
    grid = (81, 104, 83)
    # Ellipsoid brain-like union mask, semi-axes (30, 40, 30) voxels around the grid centre.
    axes = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in grid], indexing="ij")
    union = sum((a / r) ** 2 for a, r in zip(axes, (30, 40, 30), strict=True)) <= 1
    active = active_patch_indices(union, 14)
    cfg = ViT3DConfig(grid=grid, active_patches=active)  # defaults are the paper's full configuration
    assert (cfg.patch_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads) == (14, 768, 16, 12)
    assert (cfg.clip_dim, cfg.vae_shape, cfg.head_hidden) == (768, [4, 64, 64], 1024)
    assert padded_patch_grid(grid, 14) == (6, 8, 6) and cfg.num_patches_total == 288
    with torch.device("meta"):
        model = ViT3D(cfg)
    num_params = sum(p.numel() for p in model.parameters())
    assert num_params == _expected_parameters(cfg) == 134_893_312
    assert len(active) == 112  # of 288
    assert model.num_tokens == 1 + len(active) == 113
    with torch.device("meta"):
        assert ViT3D(ViT3DConfig(grid=grid, active_patches=active, dense_attention=True)).num_tokens == 289


def _blob_batch(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy Gaussian blobs in an 8^3 grid; the target is the sign (-1 / +1) of the blob's octant along X, Y, Z.

    Predicting the mean (0) gives MSE 1, so a clear drop below 1 means the model localises the blob.
    """
    octant = torch.randint(0, 2, (batch, 3), generator=generator)
    centre = 1.5 + 4.0 * octant + torch.rand(batch, 3, generator=generator)  # voxels, jittered by up to 1
    coords = torch.stack(torch.meshgrid(*[torch.arange(8.0)] * 3, indexing="ij"), dim=-1)  # (8, 8, 8, 3)
    dist2 = ((coords[None] - centre[:, None, None, None]) ** 2).sum(-1)  # (batch, 8, 8, 8), voxels^2
    volumes = torch.exp(-dist2 / 4.0) + 0.1 * torch.randn(batch, 8, 8, 8, generator=generator)
    return volumes, octant * 2.0 - 1.0


@pytest.fixture
def one_thread():
    """Tiny ops are fastest single-threaded; on a busy 2-core machine two threads made this test ~30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Clean, strong blobs are the regime where a patch's content says everything: small position embeddings learn
# it fastest. Unit ones (the default, for noisy fMRI) get there too, in about three times the steps.
@pytest.mark.parametrize("position_init_std, steps", [(0.02, 200), (1.0, 600)])
def test_tiny_model_learns_blob_position(one_thread, position_init_std, steps):
    torch.manual_seed(0)
    cfg = ViT3DConfig(
        grid=(8, 8, 8), patch_size=4, hidden_size=32, num_layers=2, num_heads=4, clip_dim=3, vae_shape=None,
        head_hidden=64, position_init_std=position_init_std,
    )  # fmt: skip
    model = ViT3D(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    test_x, test_y = _blob_batch(128, torch.Generator().manual_seed(123))

    def test_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = torch.nn.functional.mse_loss(model(test_x).clip, test_y).item()
        model.train()
        return loss

    before = test_loss()
    for _ in range(steps):
        x, y = _blob_batch(16, gen)
        loss = torch.nn.functional.mse_loss(model(x).clip, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = test_loss()
    assert before > 0.9 and after < 0.2 * before, (before, after)


@pytest.mark.parametrize("std", [1.0, 0.02])
def test_position_embeddings_are_initialised_with_their_own_std(std):
    # A big grid so the sample std is precise: 12^3 patches x 32 values.
    config = _tiny_config(grid=(72, 72, 72), active_patches=None, position_init_std=std)
    torch.manual_seed(0)
    model = ViT3D(config)
    pos = model.pos_embed.detach()
    # Truncated at 2 sigma: the std of N(0, 1) cut at +-2 is 0.880.
    assert pos.abs().max() <= 2 * std
    assert pos.std().item() == pytest.approx(0.880 * std, rel=0.03)
    # Linear weights and the CLS token keep initializer_range, whatever the positions use.
    assert model.patch_embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.cls_token.std().item() < 0.05


def test_position_init_std_defaults_to_one_and_is_saved(tmp_path):
    assert ViT3DConfig().position_init_std == 1.0
    _tiny_model(position_init_std=0.5).save_pretrained(tmp_path)
    assert ViT3D.from_pretrained(tmp_path).config.position_init_std == 0.5
