"""Controls: the pairings that give every score its chance level.

A shuffled control scores each output against the target of *another* sample. A derangement (a
permutation with no fixed point) guarantees that no sample keeps its own target, so the control row is
pure chance, not chance diluted by a few correct pairs. Seeded, so a report is reproducible.
"""

from __future__ import annotations

import numpy as np


def derangement(n: int, seed: int = 0) -> np.ndarray:
    """A permutation `p` of range(n) with p[i] != i for every i (n >= 2), the same for the same (n, seed).

    Sattolo's algorithm (a uniformly random n-cycle) from a seeded generator: every element moves.
    """
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    rng = np.random.default_rng(seed)
    perm = np.arange(n)
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(0, i))  # j < i: Sattolo, not Fisher-Yates
        perm[i], perm[j] = perm[j], perm[i]
    return perm
