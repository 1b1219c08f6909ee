"""Training checkpoints that survive a kill and resume to the same result: model, optimizer, scheduler, state, RNG.

A checkpoint is one folder:

    config.json, model.safetensors  the unwrapped model (`save_pretrained`; shards + index for big models;
                                    only the trainable parameters with `trainable_only`)
    optimizer.pt, scheduler.pt      their state_dicts (scheduler.pt only when there is a scheduler)
    rng_rankN.json                  Python, NumPy, torch (and CUDA) RNG state of process N
    trainer_state.json              what the loop needs to continue (step, epoch, position, running sums, ...)

It is built in a hidden staging folder beside its final name (`io.staging_path`) and swapped in whole
(`io.swap_in`), so a kill leaves the previous checkpoint or the new one, never half of one;
`recover_checkpoint` tidies what a kill between the two left. Every process writes its own RNG file
into the staging folder, the main process writes the rest and does the swap; the processes wait for
each other between the phases. A file that cannot be read back (truncated, corrupt, or from another
model) is a BadInputError naming it: one line, exit 2 under `errors.exits_on_bad_input`.

Also here, for every training loop: `Progress` (step, epoch, position in the epoch, the epoch's running
loss: what a resumed run needs to record what an uninterrupted one does) and `StopFlag` (SIGTERM /
SIGINT -> checkpoint at the next step boundary, then exit).
"""

from __future__ import annotations

import random
import signal
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llava_brain.errors import BadInputError, require_file
from llava_brain.io import read_json, recover_staged, staging_path, swap_in, write_json

STATE_FILE = "trainer_state.json"
MODEL_FILE, MODEL_INDEX = "model.safetensors", "model.safetensors.index.json"
OPTIMIZER_FILE, SCHEDULER_FILE = "optimizer.pt", "scheduler.pt"


def rng_file(folder: str | Path, rank: int) -> Path:
    return Path(folder) / f"rng_rank{int(rank)}.json"


def rng_state() -> dict[str, Any]:
    """The global RNG states (Python, NumPy, torch CPU, every CUDA device) as JSON-serialisable lists."""
    np_state = np.random.get_state()  # noqa: NPY002 - the legacy global state is what libraries draw from
    return {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (CUDA states only when CUDA is present)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


@dataclass
class Progress:
    """Where a training loop stands, kept in its trainer state. position: optimizer steps done in `epoch`;
    loss_sum / loss_count: this process's micro-batch losses so far in `epoch`, summed in order, so that a
    resumed run records the same epoch loss as an uninterrupted one (a mean over the steps after the resume
    would not be)."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0

    @classmethod
    def of(cls, state: dict[str, Any], where: str | Path) -> Progress:
        """The progress fields of a trainer state read from `where` (other fields, e.g. provenance, ignored)."""
        defaults = cls()
        try:
            return cls(**{f.name: type(getattr(defaults, f.name))(state[f.name]) for f in fields(cls)})
        except (KeyError, TypeError, ValueError) as err:
            raise BadInputError(where, f"not a trainer state with the progress fields (bad or missing {err})") from None


class StopFlag:
    """While entered, SIGTERM / SIGINT only set `signum`: the loop checkpoints at the next step boundary and
    exits (128 + signum). On exit the previous handlers come back (a Ctrl-C during data loading, or after
    an in-process call, behaves as usual)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        self.signum = signum

    def __enter__(self) -> StopFlag:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def has_checkpoint(folder: str | Path) -> bool:
    """A complete checkpoint is there (its trainer_state.json is written last, inside the staging folder)."""
    return (Path(folder) / STATE_FILE).is_file()


def recover_checkpoint(accelerator, folder: str | Path) -> None:
    """After a kill: drop a half-built staging folder, finish a swap cut between its renames (main process)."""
    if accelerator.is_main_process:
        recover_staged(folder)
    accelerator.wait_for_everyone()


def save_checkpoint(accelerator, folder: str | Path, *, model, optimizer, scheduler=None,
                    trainer_state: dict[str, Any], trainable_only: bool = False) -> Path:  # fmt: skip
    """Write a checkpoint of every process into `folder` (staged, then swapped in whole); returns `folder`."""
    folder = Path(folder)
    staging = staging_path(folder)
    if accelerator.is_main_process:
        recover_staged(folder)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    write_json(rng_file(staging, accelerator.process_index), rng_state(), indent=None)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if trainable_only:
            from safetensors.torch import save_file

            trainable = {n: p.detach().contiguous() for n, p in unwrapped.named_parameters() if p.requires_grad}
            save_file(trainable, staging / MODEL_FILE)
        else:
            unwrapped.save_pretrained(staging, safe_serialization=True)
        torch.save(optimizer.state_dict(), staging / OPTIMIZER_FILE)
        if scheduler is not None:
            torch.save(scheduler.state_dict(), staging / SCHEDULER_FILE)
        write_json(staging / STATE_FILE, trainer_state)  # last: a staging folder without it is half-built
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        swap_in(staging, folder)
    accelerator.wait_for_everyone()
    return folder


def read_trainer_state(folder: str | Path) -> dict[str, Any]:
    state = read_json(Path(folder) / STATE_FILE, "the trainer state of a training checkpoint")
    if not isinstance(state, dict):
        raise BadInputError(Path(folder) / STATE_FILE, "expected a JSON object (the trainer state)")
    return state


def load_checkpoint(accelerator, folder: str | Path, *, model, optimizer, scheduler=None,
                    trainable_only: bool = False) -> dict[str, Any]:  # fmt: skip
    """Load what `save_checkpoint` wrote into the (prepared) model, optimizer and scheduler, restore this
    process's RNG state, and return the trainer state. Every file is checked before anything is changed."""
    folder = Path(folder)
    state = read_trainer_state(folder)
    weights = _read_weights(folder)
    optim_state = _torch_load(folder / OPTIMIZER_FILE)
    sched_state = None if scheduler is None else _torch_load(folder / SCHEDULER_FILE)
    rng = read_json(rng_file(folder, accelerator.process_index), "the RNG state of this process (rng_rankN.json)")
    unwrapped = accelerator.unwrap_model(model)
    try:
        result = unwrapped.load_state_dict(weights, strict=not trainable_only)
    except RuntimeError as err:
        raise BadInputError(_weights_path(folder), f"does not fit the model ({_first_line(err)})") from None
    if trainable_only and result.unexpected_keys:
        raise BadInputError(_weights_path(folder), f"holds parameters the model lacks: {result.unexpected_keys[:3]}")
    for name, obj, saved in (("optimizer", optimizer, optim_state), ("scheduler", scheduler, sched_state)):
        if obj is None:
            continue
        try:
            obj.load_state_dict(saved)
        except (KeyError, ValueError, RuntimeError) as err:
            path = folder / (OPTIMIZER_FILE if name == "optimizer" else SCHEDULER_FILE)
            raise BadInputError(path, f"does not fit this {name} ({_first_line(err)})") from None
    try:
        set_rng_state(rng)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise BadInputError(rng_file(folder, accelerator.process_index), f"not an RNG state ({err})") from None
    return state


def _weights_path(folder: Path) -> Path:
    return folder / MODEL_INDEX if (folder / MODEL_INDEX).is_file() else folder / MODEL_FILE


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of every shard its index lists."""
    from safetensors.torch import load_file

    files = [folder / MODEL_FILE]
    if (folder / MODEL_INDEX).is_file():
        index = read_json(folder / MODEL_INDEX, "the shard index of the checkpoint's model")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise BadInputError(folder / MODEL_INDEX, "expected a 'weight_map' object")
        files = [folder / name for name in sorted(set(weight_map.values()))]
    weights: dict[str, torch.Tensor] = {}
    for path in files:
        require_file(path, "the model weights of a training checkpoint")
        try:
            weights.update(load_file(path))
        except Exception as err:  # safetensors raises its own error type for a cut or garbled file
            raise BadInputError(path, f"cannot be read: truncated or corrupt ({_first_line(err)})") from None
    return weights


def _torch_load(path: Path) -> Any:
    require_file(path, "a state file of a training checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a cut zip archive, a garbled pickle, ...: all mean the file is unusable
        raise BadInputError(path, f"cannot be read: truncated or corrupt ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= 160 else line[:157] + "..."
