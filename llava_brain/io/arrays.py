"""Loading `.npy` arrays with one-line errors for truncated or non-finite files (every stage that reads arrays).

A `.npy` cut short (a copy or download interrupted, a full disk) makes `np.load` raise ValueError or
EOFError deep inside numpy; `load_npy` turns that into a BadInputError naming the file (exit 2, one
line). `require_finite` refuses NaN/inf in an array already in memory: one `np.isfinite` pass over
what was loaded anyway, never a second read of the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llava_brain.errors import BadInputError, require_file


def load_npy(path: str | Path, what: str, mmap: bool = False) -> np.ndarray:
    """`np.load(path)` (memory-mapped read-only with `mmap`), or a BadInputError naming the file."""
    path = require_file(path, what)
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:
        raise BadInputError(path, f"cannot be read as {what}; truncated or not a .npy file? ({err})") from None


def require_finite(array: np.ndarray, path: str | Path, what: str, rows: np.ndarray | None = None) -> np.ndarray:
    """`array` unchanged if every value is finite, else a BadInputError naming `path` and the first bad row.

    `rows`: the file's row number of each row of `array`, when `array` is a selection of the file's rows.
    """
    finite = np.isfinite(array)
    if not finite.all():
        bad = np.argwhere(~finite)
        first = int(bad[0][0]) if rows is None else int(rows[bad[0][0]])
        raise BadInputError(
            path,
            f"has {len(bad)} non-finite value(s) (NaN or inf) in {what}, the first in row {first}; regenerate the file",
        )
    return array
