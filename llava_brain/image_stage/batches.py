"""Fixed batches of images: planning them across processes, seeding them, and decoding them in the background."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llava_brain.errors import BadInputError

# One batch as planned: (position in the fixed batch list, its nsdIds, their PNG paths).
BatchSpec = tuple[int, list[int], list[Path]]


@dataclass
class Batch:
    index: int  # position in the fixed batch list
    nsd_ids: list[int]
    inputs: Any  # what `transform` returned for the batch's images (default: list of PIL images)


class _BatchDataset(torch.utils.data.Dataset):
    def __init__(self, batches: list[BatchSpec], transform: Callable | None, pad_to: int):
        self.batches, self.transform, self.pad_to = batches, transform, pad_to

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        from PIL import Image

        index, ids, paths = self.batches[i]
        images = []
        for path in paths:
            try:
                with Image.open(path) as im:
                    images.append(im.convert("RGB"))
            except Exception as err:  # PIL raises several types for corrupt files
                # Errors cross the worker boundary as plain data: BadInputError needs two arguments.
                return index, ids, None, (str(path), f"unreadable PNG ({type(err).__name__}: {err})")
        # A short last batch is padded with copies of its last image: CPU kernels can pick other
        # algorithms for other batch shapes (and thread counts), and the results must not depend on
        # which process got the short batch. Outputs beyond len(ids) are discarded by the stage.
        images += [images[-1]] * (self.pad_to - len(images))
        inputs = self.transform(images) if self.transform else images
        return index, ids, inputs, None


def iterate_batches(
    batches: list[BatchSpec],
    transform: Callable | None = None,
    num_workers: int = 2,
    pad_to: int = 0,
) -> Iterator[Batch]:
    """Yield the given batches in order, decoded (and transformed) by `num_workers` background workers.

    Each batch's inputs hold max(len(batch), pad_to) images (see _BatchDataset); `Batch.nsd_ids` the real ones.
    """
    loader = torch.utils.data.DataLoader(
        _BatchDataset(batches, transform, pad_to),
        batch_size=None,  # items are already batches
        num_workers=num_workers,
        prefetch_factor=2 if num_workers else None,
        collate_fn=lambda item: item,
    )
    for index, ids, inputs, error in loader:
        if error is not None:
            raise BadInputError(*error)
        yield Batch(index, ids, inputs)


@dataclass
class Plan:
    """The batches of one stage run and this process's share of the unfinished ones."""

    batches: list[BatchSpec]  # all fixed batches
    mine: list[BatchSpec]
    finished_images: int
    batch_size: int


def plan_batches(nsd_ids: list[int], paths: list[Path], batch_size: int, done: set[int], rank: int, world: int) -> Plan:
    """Cut the sorted `nsd_ids` into fixed batches; process `rank` of `world` takes every world-th unfinished one.

    A batch with any image not in `done` is redone whole, so a batch always holds the same images.
    """
    batches = [
        (b, nsd_ids[i : i + batch_size], paths[i : i + batch_size])
        for b, i in enumerate(range(0, len(nsd_ids), batch_size))
    ]
    todo = [batch for batch in batches if not set(batch[1]) <= done]
    return Plan(batches, todo[rank::world], sum(i in done for i in nsd_ids), batch_size)


def batch_seed(seed: int, batch_index: int) -> int:
    """Seed of one batch's sampling: depends on the batch, not on the process or the restart."""
    return int(np.random.SeedSequence([seed, batch_index]).generate_state(1)[0])


def run_batches(plan: Plan, step: Callable[[Batch], None], transform: Callable | None, num_workers: int,
                desc: str, progress: bool) -> None:  # fmt: skip
    """Feed this process's batches, decoded in the background, to `step` (which stores its results)."""
    from tqdm import tqdm

    images = sum(len(b[1]) for b in plan.mine)
    with tqdm(total=images, desc=desc, unit="image", disable=not progress) as bar:
        for batch in iterate_batches(plan.mine, transform, num_workers, pad_to=plan.batch_size):
            step(batch)
            bar.update(len(batch.nsd_ids))
