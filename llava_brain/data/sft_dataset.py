"""Brain-LLaVA's instruction data: SFT records -> tokens with assistant-only labels, plus the record's fMRI volume.

Records are LLaVA's custom-data format as `prepare_datasets/generate_sft_data.py` writes them
(`llava_brain.sft`): `{"id", "image": "subj01/te/3+9+12", "conversations": [{"from": "human", "value":
"<image>\\n..."}, {"from": "gpt", "value": ...}, ...]}`; `image` is a sample reference (`llava_brain.subjects`).

Tokens. The turns become user / assistant messages and go through the tokenizer's own chat template
(`apply_chat_template(..., return_assistant_tokens_mask=True)`); the template must wrap each assistant message
and its end-of-turn token in `{% generation %}` (`llava_brain.data.chat_templates`). Labels are the input ids
where that mask is 1 and -100 elsewhere: the answers and their end-of-turn token (Llama-3: `<|eot_id|>`,
Vicuna: `</s>`) are learned, never the system prompt, the questions, the role headers or the fMRI tokens.
As LLaVA does, `<image>` is moved to the front of the first human turn as `<image>\\n`; its single token is
then expanded to `num_image_tokens` copies (the vision tower's token count: `LlavaForConditionalGeneration`
needs one placeholder per feature vector).

Truncation (`max_length`): the tail is cut. The placeholders sit right after the template's prefix, so they
either all fit or `max_length` is too small for any record (refused once, when the dataset is built); a
record whose first answer starts past `max_length` keeps no label and adds nothing to the loss.

Volumes. A record's rows of its subject's split (`subj01/te/3+9+12` = the mean of rows 3, 9 and 12) are
read from the memory-mapped whole-brain arrays, resized to the tower's grid by
`llava_brain.data.fmri.resize_blocks` (float16), averaged in float32 and rounded to float16, exactly as
`llava_brain.evaluation.encoders.prepared_volumes` prepares test volumes, and returned as float32.

Lengths for length-grouped batching (`lengths`, `modality_lengths`, as LLaVA's dataset has them): the
record's word count plus `num_image_tokens` (LLaVA's estimate, without tokenizing every record up front;
LLaVA adds a fixed 128 for the image). Every record has an fMRI sample, so every modality length is
positive (LLaVA marks text-only records with negative lengths; there are none here).

Every record is checked when the dataset is built; a bad one stops with one line naming the file and the
record (`BadInputError`, exit 2 in scripts): a broken LLaVA record (`llava_brain.sft.read_sft_data`:
`<image>` not exactly once in the first human turn, an empty or blank turn, roles out of order), a
control token of the tokenizer written inside a turn (it would break the label mask), a sample reference
that does not parse, names a subject or split that is not prepared, rows past the split's samples, or rows
of other images than the record's `nsd_id`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from llava_brain.data.chat_templates import IMAGE_TOKEN, marks_assistant_turns
from llava_brain.data.fmri import averaged_volumes, open_betas, read_split
from llava_brain.errors import BadInputError
from llava_brain.layout import DatasetRoot, subject_name
from llava_brain.sft import read_sft_data
from llava_brain.subjects import parse_sample_reference, prepared_subjects

IGNORE_INDEX = -100  # label of every token that is not learned (PyTorch's cross-entropy default)
ROLE_OF = {"human": "user", "gpt": "assistant"}


def to_messages(conversations: Sequence[Mapping[str, str]], image_token: str = IMAGE_TOKEN) -> list[dict[str, str]]:
    """LLaVA turns -> chat messages; `<image>` moved to the front of the first human turn, as LLaVA's
    `preprocess_multimodal` does (`<image>\\n` + the rest, stripped)."""
    messages = []
    for i, turn in enumerate(conversations):
        text = turn["value"]
        if i == 0:
            text = f"{image_token}\n{text.replace(image_token, '').strip()}"
        messages.append({"role": ROLE_OF[turn["from"]], "content": text})
    return messages


def image_token_id(tokenizer, image_token: str = IMAGE_TOKEN) -> int:
    """The id of `image_token`, which must be one token of the tokenizer (`chat_templates.add_image_token`)."""
    ids = tokenizer.encode(image_token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"the tokenizer splits {image_token} into {len(ids)} tokens; add it as one special token "
            "(llava_brain.data.chat_templates.add_image_token)"
        )
    return int(ids[0])


def tokenize_conversation(tokenizer, conversations: Sequence[Mapping[str, str]], *, image_token: str = IMAGE_TOKEN,
                          num_image_tokens: int, max_length: int | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """`{"input_ids", "labels"}` (1-D int64 tensors of one length) of one record's LLaVA turns.

    The turns go through the tokenizer's chat template, the one `<image>` token becomes `num_image_tokens`
    copies, labels = input ids on the assistant tokens (content + end-of-turn), -100 elsewhere. With
    `max_length` the tail is cut; ValueError if the placeholders themselves would be cut.
    """
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be positive, got {num_image_tokens}")
    if not marks_assistant_turns(tokenizer.chat_template):
        raise ValueError(
            "the tokenizer's chat template has no {% generation %} block, so no assistant token would be learned; "
            "give it one (llava_brain.data.chat_templates.set_chat_template)"
        )
    image_id = image_token_id(tokenizer, image_token)
    out = tokenizer.apply_chat_template(
        to_messages(conversations, image_token), return_assistant_tokens_mask=True, return_dict=True
    )
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    where = [k for k, token in enumerate(ids) if token == image_id]
    if len(where) != 1:
        raise ValueError(f"the chat template rendered {len(where)} {image_token} tokens; expected exactly one")
    at = where[0]
    ids[at : at + 1] = [image_id] * num_image_tokens
    mask[at : at + 1] = [0] * num_image_tokens
    if max_length is not None and len(ids) > max_length:
        if at + num_image_tokens >= max_length:
            raise ValueError(
                f"max_length {max_length} cuts the fMRI placeholders (tokens {at}..{at + num_image_tokens - 1}); "
                f"it must exceed {at + num_image_tokens}"
            )
        ids, mask = ids[:max_length], mask[:max_length]
    input_ids = torch.tensor(ids, dtype=torch.long)
    labels = torch.where(torch.tensor(mask, dtype=torch.bool), input_ids, torch.tensor(IGNORE_INDEX))
    return {"input_ids": input_ids, "labels": labels}


def control_tokens_pattern(tokenizer, image_token: str = IMAGE_TOKEN) -> re.Pattern | None:
    """A regex of the tokenizer's special tokens other than `<image>` (None if it has none)."""
    tokens = set(tokenizer.all_special_tokens)
    tokens |= {str(t) for t in tokenizer.added_tokens_decoder.values() if getattr(t, "special", False)}
    tokens.discard(image_token)
    tokens = sorted((t for t in tokens if t), key=len, reverse=True)  # longest first: no prefix shadows a token
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


def sample_volume(betas: np.ndarray, grid: Sequence[int], rows: Sequence[int], *, path: Path) -> np.ndarray:
    """(*grid) float32: `rows` of a (samples, X, Y, Z) array resized to `grid` (float16), averaged in float32 and
    rounded to float16, as `llava_brain.evaluation.encoders.prepared_volumes` does for one sample."""
    return averaged_volumes(betas, grid, [rows], path=path)[0].astype(np.float32)


class SftDataset(Dataset):
    """One item per SFT record: input_ids, labels, attention_mask (1-D int64) and pixel_values (float32, *grid).

    The volume travels as `pixel_values` (what `LlavaForConditionalGeneration.forward` takes), so the HF
    Trainer's `remove_unused_columns` keeps it. Tokens are made on access (about 1 ms a record), volumes read
    from memory maps on access; DataLoader workers reopen the maps (they are not pickled).
    """

    def __init__(self, sft_json_path: str | Path, dataset_root: str | Path | DatasetRoot, tokenizer, *,
                 grid: Sequence[int], num_image_tokens: int, max_length: int,
                 image_token: str = IMAGE_TOKEN, types: Sequence[str] | None = None):  # fmt: skip
        self.path = Path(sft_json_path)
        self.layout = dataset_root if isinstance(dataset_root, DatasetRoot) else DatasetRoot(dataset_root)
        self.tokenizer, self.image_token = tokenizer, image_token
        self.grid = tuple(int(n) for n in grid)  # the tower's grid (ViT3DConfig.grid)
        self.num_image_tokens, self.max_length = int(num_image_tokens), int(max_length)
        if len(self.grid) != 3:
            raise ValueError(f"grid must have 3 axes, got {self.grid}")
        self.records = read_sft_data(self.path)  # LLaVA format, one <image> in the first human turn, no blank turn
        if not self.records:
            raise BadInputError(self.path, "holds no record; expected LLaVA SFT records (generate_sft_data.py)")
        if types:  # --data_types: the records of these types only
            found = sorted({str(r.get("type")) for r in self.records})
            self.records = [r for r in self.records if r.get("type") in set(types)]
            if not self.records:
                raise BadInputError(self.path, f"has no record of type {' or '.join(types)} (types found: "
                                    f"{', '.join(found)})")  # fmt: skip
        self._split_nsd_ids: dict[tuple[int, str], np.ndarray] = {}
        self._betas: dict[tuple[int, str], np.ndarray] = {}
        self.samples = self._check_records()
        self._check_tokenizer()
        # LLaVA's estimate (words, no tokenizing); + the fMRI tokens, which every record has.
        words = [sum(len(t["value"].split()) for t in r["conversations"]) for r in self.records]
        self.lengths = [w + self.num_image_tokens for w in words]
        self.modality_lengths = list(self.lengths)  # positive: every record is multimodal

    # Checks --------------------------------------------------------------------------------------

    def _bad(self, index: int, problem: str) -> BadInputError:
        return BadInputError(self.path, f"record {index} ({self.records[index]['id']}): {problem}")

    def _check_records(self) -> list[tuple[int, str, tuple[int, ...]]]:
        """(subject, split, rows) of every record, each checked against the prepared root."""
        control = control_tokens_pattern(self.tokenizer, self.image_token)
        subjects = prepared_subjects(self.layout)
        samples = []
        for index, record in enumerate(self.records):
            if control is not None:
                for k, turn in enumerate(record["conversations"]):
                    found = control.search(turn["value"])
                    if found:
                        raise self._bad(index, f"turn {k} contains the tokenizer's control token {found[0]!r}")
            reference = record["image"]
            try:
                subject, split, rows = parse_sample_reference(reference)
            except ValueError as err:
                raise self._bad(index, str(err)) from None
            if subject not in subjects:
                found = ", ".join(map(subject_name, subjects)) or "none"
                raise self._bad(index, f"sample {reference}: {subject_name(subject)} is not prepared in "
                                       f"{self.layout.fmris_dir} (found: {found})")  # fmt: skip
            try:
                nsd_ids = self._split_images(subject, split)
            except BadInputError as err:
                raise self._bad(index, f"sample {reference}: {err}") from None
            past = [r for r in rows if r >= len(nsd_ids)]
            if past:
                raise self._bad(index, f"sample {reference}: row {past[0]} is past the {len(nsd_ids)} {split} "
                                       f"samples of {subject_name(subject)}")  # fmt: skip
            shown = sorted({int(nsd_ids[r]) for r in rows})
            expected = record.get("nsd_id")
            if len(shown) > 1 or (expected is not None and shown != [expected]):
                raise self._bad(index, f"sample {reference}: its rows show nsdIds {shown}, the record's nsd_id "
                                       f"is {expected}")  # fmt: skip
            samples.append((subject, split, tuple(rows)))
        return samples

    def _split_images(self, subject: int, split: str) -> np.ndarray:
        """nsdId of every sample of a subject's split (checked against its betas' length), cached."""
        key = (subject, split)
        if key not in self._split_nsd_ids:
            betas = open_betas(self.layout, subject, split)
            self._split_nsd_ids[key] = read_split(self.layout, subject, split, len(betas)).nsd_ids
        return self._split_nsd_ids[key]

    def _check_tokenizer(self) -> None:
        """Tokenize the first record once: a template without assistant marks, a split `<image>` or a
        max_length that cannot hold the placeholders stops here, not in the middle of training."""
        try:
            self._tokens(0)
        except ValueError as err:
            name = getattr(self.tokenizer, "name_or_path", "") or "the tokenizer"
            raise BadInputError(name, str(err)) from None

    # Items ---------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.records)

    def _tokens(self, index: int) -> dict[str, torch.Tensor]:
        return tokenize_conversation(self.tokenizer, self.records[index]["conversations"],
                                     image_token=self.image_token, num_image_tokens=self.num_image_tokens,
                                     max_length=self.max_length)  # fmt: skip

    def volume(self, index: int) -> torch.Tensor:
        """(*grid) float32: the record's fMRI sample on the tower's grid."""
        subject, split, rows = self.samples[index]
        key = (subject, split)
        if key not in self._betas:
            self._betas[key] = open_betas(self.layout, subject, split)
        path = self.layout.whole_betas(subject, split)
        return torch.from_numpy(sample_volume(self._betas[key], self.grid, rows, path=path))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        item = self._tokens(index)
        item["attention_mask"] = torch.ones_like(item["input_ids"])
        item["pixel_values"] = self.volume(index)
        return item

    def __getstate__(self) -> dict[str, Any]:
        # A pickled np.memmap would carry the whole array to every DataLoader worker; reopen it there instead.
        return {**self.__dict__, "_betas": {}}


@dataclass
class SftCollator:
    """Pads a list of `SftDataset` items on the right: input_ids with `pad_token_id`, labels with -100,
    attention_mask with 0; stacks the volumes into `pixel_values` (batch, *grid) float32."""

    pad_token_id: int

    def __call__(self, items: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        longest = max(len(it["input_ids"]) for it in items)
        batch = {
            "input_ids": torch.full((len(items), longest), int(self.pad_token_id), dtype=torch.long),
            "labels": torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.zeros((len(items), longest), dtype=torch.long),
        }
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            batch["input_ids"][row, :n] = item["input_ids"]
            batch["labels"][row, :n] = item["labels"]
            batch["attention_mask"][row, :n] = item["attention_mask"]
        batch["pixel_values"] = torch.stack([it["pixel_values"].float() for it in items])
        return batch
