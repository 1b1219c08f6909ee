"""Model folders of the image stages: checked before loading, loaded with one-line errors, fingerprinted as inputs."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from llava_brain.errors import BadInputError
from llava_brain.io import read_json


def is_hub_id(name: str) -> bool:
    """An "owner/name" that is not a local path: from_pretrained resolves it on the hub (or its cache)."""
    return not Path(name).exists() and not name.startswith((".", "/", "~")) and name.count("/") == 1


def check_model_folder(path: str, model_types: Sequence[str], what: str, subfolder: str | None = None) -> None:
    """A local model folder must hold a config of one of `model_types`; hub ids pass through unchecked.

    Catches "the wrong model folder" before the model is loaded, with one line naming the file.
    """
    folder = Path(path)
    if not folder.exists():
        if is_hub_id(path):
            return  # e.g. "Salesforce/blip2-opt-2.7b": from_pretrained resolves it
        raise BadInputError(folder, f"missing; expected a local folder or hub id of {what}")
    if subfolder:
        folder = folder / subfolder
    config = folder / "config.json"
    if not config.is_file():
        raise BadInputError(config, f"missing; expected the config of {what} (a save_pretrained folder)")
    data = read_json(config, f"the config of {what}")
    found = data.get("model_type") or data.get("_class_name")
    if found not in model_types:
        raise BadInputError(config, f"is a {found!r} model; expected {what} ({' or '.join(model_types)})")


def vae_source(name: str) -> tuple[str | None, str]:
    """(subfolder, what) of a VAE argument: a pipeline (or hub id) holds its VAE in vae/, else it is an AutoencoderKL.

    The same Stable unCLIP pipeline folder serves the encoder (generate_clip_embeds.py) and the decoder
    (embeds2images.py), so predicted latents are decoded by the VAE that made the targets.
    """
    folder = Path(name)
    if (folder / "model_index.json").is_file() or not folder.exists():
        return "vae", "a Stable unCLIP pipeline with a VAE"
    return None, "an AutoencoderKL"


def model_setting(name: str) -> str:
    """How a model is recorded in the settings: a local folder as its absolute path, a hub id as given."""
    return str(Path(name).resolve()) if Path(name).exists() else name


def model_files(name: str, subfolder: str | None = None) -> list[Path]:
    """The files of a local model folder (config, preprocessor, weights), fingerprinted as a stage's inputs.

    A hub id has no local files to fingerprint: its name in the settings identifies it.
    """
    folder = Path(name) / subfolder if subfolder else Path(name)
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


@contextmanager
def loading_model(name: str | Path, what: str) -> Iterator[None]:
    """Turn a model that cannot be loaded into one line naming it (exit 2), not a traceback.

    from_pretrained raises OSError (or its subclasses) for a hub id that is neither cached nor reachable
    (these machines are offline; HF_HUB_OFFLINE=1 makes that immediate), and for unreadable files.
    """
    try:
        with warnings.catch_warnings():
            # diffusers passes huggingface_hub a deprecated argument on every hub lookup: noise, not news.
            warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated")
            yield
    except OSError as err:
        lines = str(err).strip().splitlines()
        reason = lines[0] if lines else type(err).__name__
        offline = " (HF_HUB_OFFLINE is set: pass a local folder)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise BadInputError(Path(name), f"could not be loaded as {what}{offline}: {reason}") from None


def quiet_transformers() -> None:
    """No "Loading weights" bars from from_pretrained (so --quiet output stays one line per event)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
