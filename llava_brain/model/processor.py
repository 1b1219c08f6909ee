"""BrainLlavaProcessor: the LLM's tokenizer and chat template + fMRI volume preparation for Brain-LLaVA.

What an `<image>` in the text stands for is one fMRI volume, given as
- a sample reference (`subj01/te/12`: one trial; `subj01/te/3+9+12`: the average of those rows) read from a
  prepared dataset root: the rows of `whole/nsd_betas_<split>.npy` (memory-mapped) are resized to the tower's
  grid exactly as the SFT data and the ViT3D's evaluation prepare them (`llava_brain.data.sft_dataset.
  sample_volume`: `resize_blocks`, trilinear, float16, then averaged in float32 and rounded to float16);
- or a raw (X, Y, Z) / (n, X, Y, Z) array on any grid, resized the same way (`resize_blocks`).
`pixel_values` is (volumes, *grid) float32. Each `<image>` is expanded into `num_tokens` copies (the tower's
CLS + active patches: LLaVA needs one placeholder per feature vector), using ProcessorMixin's own replacement
machinery, so `apply_chat_template(..., tokenize=True, return_assistant_tokens_mask=True)` marks the right
tokens after the expansion. In a conversation an image part names its volume:
`{"type": "image", "image": "subj01/te/12"}` (or an array); pass the root as
`processor_kwargs={"dataset_root": root}`.

Saved settings (processor_config.json): grid, num_tokens, image_token; the tokenizer and chat template are
saved beside it. `AutoProcessor.from_pretrained(folder)` finds the class by name once `llava_brain.model`
(which registers it) is imported.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import BatchFeature, ProcessorMixin

from llava_brain.data.chat_templates import IMAGE_TOKEN
from llava_brain.data.fmri import open_betas, resize_blocks
from llava_brain.data.sft_dataset import sample_volume
from llava_brain.errors import BadInputError
from llava_brain.layout import DatasetRoot
from llava_brain.subjects import Sample, parse_sample_reference


def _reference_of(sample: str | Sample) -> str:
    return sample.reference if isinstance(sample, Sample) else str(sample)


def sample_volumes(samples: Sequence[str | Sample], dataset_root: str | Path | DatasetRoot,
                   grid: Sequence[int]) -> np.ndarray:  # fmt: skip
    """(len(samples), *grid) float32: each sample reference's rows resized to `grid` and averaged.

    The arithmetic is the SFT data's (`data.sft_dataset.sample_volume` = `evaluation.encoders.prepared_volumes`):
    rows resized by `resize_blocks` (float16), averaged in float32, stored as float16. A malformed reference is
    a ValueError; a missing betas file or a row the file does not have is a BadInputError naming the file.
    """
    if dataset_root is None:
        raise ValueError("sample references need dataset_root (the prepared dataset root holding the betas)")
    layout = dataset_root if isinstance(dataset_root, DatasetRoot) else DatasetRoot(Path(dataset_root))
    grid = tuple(int(n) for n in grid)
    out = np.empty((len(samples), *grid), dtype=np.float32)
    for k, sample in enumerate(samples):
        reference = _reference_of(sample)
        subject, split, rows = parse_sample_reference(reference)
        betas, path = open_betas(layout, subject, split), layout.whole_betas(subject, split)
        if max(rows) >= len(betas):
            raise BadInputError(path, f"has {len(betas)} rows; sample {reference} asks for row {max(rows)}")
        out[k] = sample_volume(betas, grid, rows, path=path)  # NaN / inf refused naming the file
    return out


def resize_volumes(volumes, grid: Sequence[int]) -> np.ndarray:
    """(n, *grid) float32 from one (X, Y, Z) or several (n, X, Y, Z) volumes (numpy or torch, any float dtype),
    resized like the prepared data (`resize_blocks`: trilinear, float16 result). NaN / inf is a ValueError."""
    array = volumes.detach().cpu().numpy() if isinstance(volumes, torch.Tensor) else np.asarray(volumes)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise ValueError(f"a volume is (X, Y, Z) or (n, X, Y, Z); got shape {array.shape}")
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise ValueError("fMRI volumes hold NaN or inf values")
    return resize_blocks(array, tuple(int(n) for n in grid), path=Path("volumes")).astype(np.float32)


class BrainLlavaProcessor(ProcessorMixin):
    """Tokenizer + chat template + volume preparation for a Brain-LLaVA (see the module docstring).

    tokenizer: the LLM's tokenizer, holding `image_token` as one token (`llava_brain.data.prepare_tokenizer`).
    chat_template: the conversation layout (the tokenizer's, normally).
    grid: the tower's (X, Y, Z) grid, in voxels (`ViT3DConfig.grid`).
    num_tokens: placeholders per volume = the tower's token count (`ViT3D.num_tokens`: CLS + active patches).
    image_token: the placeholder text.
    """

    # Positional-or-keyword on purpose: ProcessorMixin.from_args_and_dict only passes arguments it finds among
    # __init__'s positional parameters (keyword-only ones would be dropped when loading).
    def __init__(self, tokenizer=None, chat_template=None, grid=None, num_tokens=None, image_token=IMAGE_TOKEN):
        if tokenizer is None or grid is None or num_tokens is None:
            raise ValueError("BrainLlavaProcessor needs a tokenizer, the tower's grid and its num_tokens")
        self.grid = [int(n) for n in grid]
        self.num_tokens = int(num_tokens)
        self.image_token = str(image_token)
        ids = tokenizer.encode(self.image_token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"the tokenizer splits {self.image_token!r} into {len(ids)} tokens; add it as one "
                             "special token first (llava_brain.data.prepare_tokenizer)")  # fmt: skip
        self.image_token_id = int(ids[0])
        if len(self.grid) != 3 or self.num_tokens < 1:
            raise ValueError(f"grid must be (X, Y, Z) and num_tokens positive; got {grid}, {num_tokens}")
        super().__init__(tokenizer, chat_template=chat_template)

    def prepare_volumes(self, items, dataset_root: str | Path | DatasetRoot | None = None) -> np.ndarray:
        """(n, *grid) float32 of a list mixing sample references (str or `Sample`) and arrays, in order.

        A single reference or a single (X, Y, Z) array counts as a list of one; a (n, X, Y, Z) array as n volumes.
        """
        if isinstance(items, (str, Sample, np.ndarray, torch.Tensor)):
            items = [items]
        parts = []
        for item in _flatten(items):
            if isinstance(item, (str, Sample)):
                parts.append(sample_volumes([item], dataset_root, self.grid))
            else:
                parts.append(resize_volumes(item, self.grid))
        return np.concatenate(parts) if parts else np.empty((0, *self.grid), dtype=np.float32)

    def expand_image_tokens(self, text: str) -> str:
        """`text` with each image placeholder repeated `num_tokens` times (what the model needs)."""
        return text.replace(self.image_token, self.image_token * self.num_tokens)

    def __call__(self, text=None, volumes=None, samples=None, dataset_root=None, images=None, return_tensors=None,
                 **kwargs) -> BatchFeature:  # fmt: skip
        """Tokenize `text` (a string or a list: a batch) with each `<image>` expanded, and prepare its volumes.

        volumes / samples / images: the fMRI inputs, one per `<image>` over the whole batch, in order (give one
        of them). `samples` are references read from `dataset_root`; `images` (what apply_chat_template passes:
        one list per conversation) may mix references and arrays.
        return_tensors: "pt", "np" or None (lists; pixel_values stays a numpy array).
        kwargs: go to the tokenizer (padding=True, padding_side="left" for batched generation, truncation, ...);
            return_text_replacement_offsets=True adds where each placeholder was expanded.
        Returns input_ids, attention_mask and pixel_values (volumes, *grid) when there are volumes.
        """
        for name in ("videos", "audio"):
            if kwargs.pop(name, None) is not None:
                raise ValueError(f"BrainLlavaProcessor takes fMRI volumes, not {name}")
        given = [x for x in (volumes, samples, images) if x is not None]
        if len(given) > 1:
            raise ValueError("give the fMRI inputs once: volumes=, samples= or images=")
        if text is None and not given:
            raise ValueError("nothing to process: give text and/or fMRI inputs")
        pixel_values = self.prepare_volumes(given[0], dataset_root) if given else None
        count = 0 if pixel_values is None else len(pixel_values)
        data = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            placeholders = sum(t.count(self.image_token) for t in texts)
            if placeholders != count:
                raise ValueError(f"the text holds {placeholders} {self.image_token} placeholders but {count} fMRI "
                                 "volumes were given (one volume per placeholder)")  # fmt: skip
            offsets_wanted = kwargs.pop("return_text_replacement_offsets", False)
            texts, offsets = self.get_text_with_replacements(
                texts, images_replacements=[self.image_token * self.num_tokens] * count
            )
            data = dict(self.tokenizer(texts, **kwargs))
            self._check_special_mm_tokens(texts, data, modalities=["image"])
            if offsets_wanted:
                data["text_replacement_offsets"] = offsets
        if pixel_values is not None:
            data["pixel_values"] = pixel_values
        return BatchFeature(data, tensor_type=return_tensors, skip_tensor_conversion=self.skip_tensor_conversion)

    @property
    def model_input_names(self) -> list[str]:
        return [*self.tokenizer.model_input_names, "pixel_values"]


def _flatten(items):
    for item in items:
        if isinstance(item, (list, tuple)):
            yield from _flatten(item)
        else:
            yield item
