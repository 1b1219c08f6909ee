"""llava_brain.train.checkpoint: round trip of model, optimizer, scheduler, trainer state and RNG; staging that a
kill cannot leave half-done; trainable-only checkpoints; unreadable files named in one line."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from llava_brain.errors import BadInputError
from llava_brain.io import staging_path
from llava_brain.model import ViT3D, ViT3DConfig
from llava_brain.train import (
    has_checkpoint,
    load_checkpoint,
    recover_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    warmup_cosine_scheduler,
)


def _tiny(seed: int) -> tuple[ViT3D, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(seed)
    config = ViT3DConfig(grid=(8, 8, 8), patch_size=4, hidden_size=16, num_layers=1, num_heads=2, clip_dim=4,
                         vae_shape=None, head_hidden=8)  # fmt: skip
    model = ViT3D(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer, warmup_cosine_scheduler(optimizer, warmup=2, total=10)


def _train_steps(model, optimizer, scheduler, steps: int) -> None:
    for _ in range(steps):
        loss = model(torch.randn(2, 8, 8, 8)).clip.square().mean()
        loss.backward()
        optimizer.step(), scheduler.step(), optimizer.zero_grad()


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def test_round_trip_restores_everything(accelerator, tmp_path):
    model, optimizer, scheduler = _tiny(0)
    _train_steps(model, optimizer, scheduler, 3)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)  # noqa: NPY002
    folder = save_checkpoint(accelerator, tmp_path / "checkpoint", model=model, optimizer=optimizer,
                             scheduler=scheduler, trainer_state={"step": 3, "loss_sum": 0.1 + 0.2})  # fmt: skip
    assert has_checkpoint(folder) and not staging_path(folder).exists()
    expected_draws = (random.random(), np.random.rand(), torch.rand(1))  # noqa: NPY002

    other, other_opt, other_sched = _tiny(1)
    state = load_checkpoint(accelerator, folder, model=other, optimizer=other_opt, scheduler=other_sched)
    assert state == {"step": 3, "loss_sum": 0.1 + 0.2}  # floats round-trip exactly through JSON
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected_draws  # noqa: NPY002
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert other_sched.last_epoch == 3
    assert other_opt.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    torch.manual_seed(7)
    _train_steps(model, optimizer, scheduler, 2)
    torch.manual_seed(7)
    _train_steps(other, other_opt, other_sched, 2)
    torch.testing.assert_close(model.pos_embed, other.pos_embed, rtol=0, atol=0)  # continues identically


def test_a_new_checkpoint_replaces_the_old_whole(accelerator, tmp_path):
    model, optimizer, _ = _tiny(0)
    folder = tmp_path / "checkpoint"
    save_checkpoint(accelerator, folder, model=model, optimizer=optimizer, trainer_state={"step": 1})
    staging_path(folder).mkdir()  # what a kill during the next save leaves
    (staging_path(folder) / "model.safetensors").write_bytes(b"half")
    recover_checkpoint(accelerator, folder)
    assert not staging_path(folder).exists()
    assert json.loads((folder / "trainer_state.json").read_text()) == {"step": 1}
    save_checkpoint(accelerator, folder, model=model, optimizer=optimizer, trainer_state={"step": 2})
    assert json.loads((folder / "trainer_state.json").read_text()) == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert not (folder / "scheduler.pt").exists()  # no scheduler given: none saved, none needed to load
    load_checkpoint(accelerator, folder, model=model, optimizer=optimizer)


def test_trainable_only_saves_and_restores_the_trainable_parameters(accelerator, tmp_path):
    model, _, _ = _tiny(0)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("clip_head"))  # e.g. a frozen encoder under a trained projector
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    folder = save_checkpoint(accelerator, tmp_path / "c", model=model, optimizer=optimizer, trainer_state={},
                             trainable_only=True)  # fmt: skip
    from safetensors.torch import load_file

    assert set(load_file(folder / "model.safetensors")) == {n for n, p in model.named_parameters() if p.requires_grad}
    other, _, _ = _tiny(1)
    frozen = other.patch_embed.weight.detach().clone()
    other_opt = torch.optim.AdamW([p for n, p in other.named_parameters() if n.startswith("clip_head")], lr=1e-2)
    load_checkpoint(accelerator, folder, model=other, optimizer=other_opt, trainable_only=True)
    torch.testing.assert_close(other.clip_head[0].weight, model.clip_head[0].weight, rtol=0, atol=0)
    torch.testing.assert_close(other.patch_embed.weight, frozen, rtol=0, atol=0)  # untouched


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng_rank0.json"])
def test_a_truncated_file_is_named(accelerator, tmp_path, name):
    model, optimizer, scheduler = _tiny(0)
    folder = save_checkpoint(accelerator, tmp_path / "c", model=model, optimizer=optimizer, scheduler=scheduler,
                             trainer_state={"step": 0})  # fmt: skip
    path = folder / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    before = model.pos_embed.detach().clone()
    with pytest.raises(BadInputError) as err:
        load_checkpoint(accelerator, folder, model=model, optimizer=optimizer, scheduler=scheduler)
    assert err.value.path == path and "\n" not in str(err.value)
    torch.testing.assert_close(model.pos_embed, before, rtol=0, atol=0)  # nothing loaded from a bad checkpoint


def test_a_checkpoint_of_another_model_is_refused(accelerator, tmp_path):
    model, optimizer, _ = _tiny(0)
    folder = save_checkpoint(accelerator, tmp_path / "c", model=model, optimizer=optimizer, trainer_state={})
    bigger = ViT3D(ViT3DConfig(grid=(8, 8, 8), patch_size=4, hidden_size=32, num_layers=1, num_heads=2, clip_dim=4,
                               vae_shape=None, head_hidden=8))  # fmt: skip
    with pytest.raises(BadInputError, match="does not fit the model"):
        load_checkpoint(accelerator, folder, model=bigger, optimizer=torch.optim.AdamW(bigger.parameters()))


def test_rng_state_is_json_and_restores_every_generator():
    state = json.loads(json.dumps(rng_state()))
    draws = (random.random(), np.random.rand(), torch.rand(2))  # noqa: NPY002
    set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(2))  # noqa: NPY002
    assert draws[:2] == again[:2] and torch.equal(draws[2], again[2])
