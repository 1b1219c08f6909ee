"""Writing outputs so that nothing is ever half-written, and knowing whether an output is current.

- `files`: atomic writes (temp file + rename), JSON reads with one-line errors, staged folders
  swapped in whole, the check that an output location can be written;
- `arrays`: `.npy` loads with one-line errors (truncated files, NaN/inf values);
- `npyrows`: `.npy` arrays larger than memory, by blocks of rows;
- `jsonl`: an append-only JSON-lines store that survives a kill;
- `provenance`: run.json (arguments, versions, git commit) and `StageRun`, the one rerun rule.
"""

from llava_brain.io.arrays import load_npy, require_finite
from llava_brain.io.files import (
    atomic_path,
    read_json,
    recover_staged,
    remove_stale_temps,
    require_writable,
    save_npy,
    staged_folder,
    staging_path,
    swap_in,
    write_bytes,
    write_json,
    write_text,
)
from llava_brain.io.jsonl import JsonlStore
from llava_brain.io.npyrows import NpyRows
from llava_brain.io.provenance import (
    RUN_MANIFEST,
    StageRun,
    fingerprint,
    git_sha,
    manifest_of,
    package_versions,
    run_manifest,
    write_run_json,
)

__all__ = [
    "RUN_MANIFEST",
    "JsonlStore",
    "NpyRows",
    "StageRun",
    "atomic_path",
    "fingerprint",
    "git_sha",
    "load_npy",
    "manifest_of",
    "package_versions",
    "read_json",
    "recover_staged",
    "remove_stale_temps",
    "require_finite",
    "require_writable",
    "run_manifest",
    "save_npy",
    "staged_folder",
    "staging_path",
    "swap_in",
    "write_bytes",
    "write_json",
    "write_run_json",
    "write_text",
]
