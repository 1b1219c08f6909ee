"""Instruction-tuning (SFT) records of Brain-LLaVA in LLaVA's custom-data format.

`sft_data_{tr,te}.json` (paths: `DatasetRoot.sft_data`) hold one JSON list each, one record per line::

    {"id": "subj01_tr_000123_brief_description",
     "image": "subj01/tr/123",
     "conversations": [{"from": "human", "value": "<image>\\nDescribe the image concisely."},
                       {"from": "gpt", "value": "A herd of cows standing in a field."}],
     "nsd_id": 4567, "subject": 1, "split": "tr", "sample": 123, "type": "brief_description"}

LLaVA's loader reads `id`, `image` and `conversations` and ignores the other keys, which say where the
record came from. `<image>` appears exactly once, at the start of the first human turn; the model
replaces it with the fMRI tokens of the sample that `image` names.

Sample reference (`image`): `"subjXX/<split>/<row>[+<row>...]"`. `<split>` is "tr" or "te" and `<row>`
is a row of `whole/nsd_betas_<split>.npy` and the same position in the "train" ("tr") or "val" ("te",
NSD's shared-1000 test set) list of `nsd_fmri2image.json` (split names: `llava_brain.subjects`). One
row is one fMRI sample (a single trial). Several rows joined by "+" mean the average of those samples;
`--per-image` writes these, one record per subject and image over all its repeats, with the rows in
a `samples` list instead of `sample`, and ids such as `subj01_te_nsd004567_brief_description`.
`parse_sample_reference` reads a reference back (all three live in `llava_brain.subjects`).

Instruction types. Three are built here, with no LLM, from the image's captions and objects:
- brief_description: one of the paper's 14 prompts (Tab. 3); answer: one caption of the image
  (COCO and/or BLIP-2), both chosen per record by a seeded hash, so repeats of one image differ.
- instruction_reconstruction: "Provide the corresponding Stable Diffusion prompts for the image." (Tab. 5);
  answer: a caption (chosen independently of the brief description's), then the image's most
  salient object categories that the caption does not already name, comma-separated: a concise
  prompt for the reconstruction stage, e.g. "a man riding a horse on a beach, dog, umbrella".
- concept_localization: `Locating the concept of "<object>"` (Tab. 6), one round per object category
  in the image, most salient first; answer: the category name. The paper's LLM only extracts the
  concept from the request; Grad-CAM on the ViT3D's CLIP head then locates it in the brain volume
  from the CLIP text embedding of that answer, so the answer must be the bare concept (positions
  or extra words would change the embedding). Salience = total box area of the category.
Three come from GPT (`nsd_gpt_conversation/<type>.jsonl`, written by generate_conversation.py):
conversation, detail_description, complex_reasoning; the record copies one generated dialogue of
the image (chosen by the same hash when there are several) and adds `<image>`.

The prompt lists live in `data/instructions/<type>.txt`, one prompt per line (blank lines ignored);
in concept_localization.txt `{concept}` marks where the category name goes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_brain.errors import BadInputError
from llava_brain.io import read_json
from llava_brain.subjects import Sample

IMAGE_TOKEN = "<image>"
CONCEPT_FIELD = "{concept}"
BUILT_TYPES = ("brief_description", "instruction_reconstruction", "concept_localization")
GPT_TYPES = ("conversation", "detail_description", "complex_reasoning")
ALL_TYPES = BUILT_TYPES + GPT_TYPES
ROLES = ("human", "gpt")
# The data files ship with the repository, not the package (an editable install finds them).
INSTRUCTIONS_DIR = Path(__file__).resolve().parent.parent / "data" / "instructions"
# Object categories appended to a Stable Diffusion prompt: CLIP's text encoder sees 77 tokens, and a
# caption plus five object names stays well inside that.
MAX_PROMPT_OBJECTS = 5

log = logging.getLogger(__name__)


# Instruction lists ----------------------------------------------------------------------------


def read_instructions(path: str | Path) -> list[str]:
    """The prompts of one list file: non-blank lines, stripped; duplicates are an error."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(path, "missing; expected an instruction list, one prompt per line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise BadInputError(path, "holds no prompt; expected one prompt per line")
    repeated = sorted({p for p in prompts if prompts.count(p) > 1})
    if repeated:
        raise BadInputError(path, f"lists a prompt more than once: {repeated}")
    if IMAGE_TOKEN in "".join(prompts):
        raise BadInputError(path, f"prompts must not contain {IMAGE_TOKEN} (the SFT builder adds it)")
    return prompts


def load_instruction_lists(folder: str | Path = INSTRUCTIONS_DIR) -> dict[str, list[str]]:
    """`{type: prompts}` for the built types, from `<folder>/<type>.txt`."""
    lists = {name: read_instructions(Path(folder) / f"{name}.txt") for name in BUILT_TYPES}
    for prompt in lists["concept_localization"]:
        if prompt.count(CONCEPT_FIELD) != 1:
            path = Path(folder) / "concept_localization.txt"
            raise BadInputError(path, f"every prompt needs {CONCEPT_FIELD} exactly once; found {prompt!r}")
    return lists


# Answers built from annotations ---------------------------------------------------------------


def pick(num_choices: int, seed: int, *key: Any) -> int:
    """A choice in [0, num_choices) fixed by (seed, key): the same on every machine and Python run
    (unlike hash(), which is salted per process)."""
    digest = hashlib.sha256("/".join(map(str, (seed, *key))).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_choices


def clean_text(text: str) -> str:
    """Whitespace collapsed to single spaces (COCO captions carry newlines and double spaces)."""
    return " ".join(str(text).split())


def merge_captions(*sources: Mapping[int, Sequence[str]]) -> dict[int, list[str]]:
    """nsdId -> captions of all sources in order (COCO first), cleaned, empty and repeated ones dropped."""
    merged: dict[int, list[str]] = {}
    for captions in sources:
        for nsd_id, texts in captions.items():
            out = merged.setdefault(nsd_id, [])
            out.extend(t for t in map(clean_text, texts) if t and t not in out)
    return merged


def salient_categories(instances: Iterable[Mapping[str, Any]], min_score: float = 0.0) -> list[str]:
    """Distinct category names of an image, largest total box area first (ties by name).

    Instances with a `score` below `min_score` are ignored; COCO instances have no score and count.
    """
    area: dict[str, float] = {}
    for obj in instances:
        if obj.get("score") is not None and obj["score"] < min_score:
            continue
        x1, y1, x2, y2 = obj["box"]
        area[obj["category"]] = area.get(obj["category"], 0.0) + (x2 - x1) * (y2 - y1)
    return sorted(area, key=lambda name: (-area[name], name))


def mentions(text: str, name: str) -> bool:
    """Whether `text` names the category `name` as whole words, singular or with a plural s/es."""
    return re.search(rf"\b{re.escape(name)}(?:e?s)?\b", text, flags=re.IGNORECASE) is not None


def sd_prompt(caption: str, categories: Sequence[str]) -> str:
    """A Stable Diffusion style prompt: the caption without its final period, then the salient
    categories it does not name, comma-separated."""
    text = clean_text(caption).rstrip(" .")
    extra = [name for name in categories[:MAX_PROMPT_OBJECTS] if not mentions(text, name)]
    return ", ".join([text, *extra])


@dataclass
class SftSources:
    """Everything records are built from, keyed by nsdId (only what the requested types need)."""

    instructions: dict[str, list[str]]
    captions: dict[int, list[str]]
    categories: dict[int, list[str]]
    gpt: dict[str, dict[int, list[list[dict[str, str]]]]]


def build_turns(sample: Sample, prompt_type: str, sources: SftSources, seed: int) -> list[dict[str, str]] | None:
    """The conversation of one record without `<image>`, or None if the image lacks what the type needs."""
    key = f"{sample.key}_{prompt_type}"
    if prompt_type in GPT_TYPES:
        dialogues = sources.gpt[prompt_type].get(sample.nsd_id)
        return [dict(turn) for turn in dialogues[pick(len(dialogues), seed, key)]] if dialogues else None
    prompts = sources.instructions[prompt_type]
    if prompt_type == "concept_localization":
        names = sources.categories.get(sample.nsd_id) or []
        pairs = [(prompts[pick(len(prompts), seed, key, i)].replace(CONCEPT_FIELD, n), n) for i, n in enumerate(names)]
    else:
        captions = sources.captions.get(sample.nsd_id)
        if not captions:
            return None
        caption = captions[pick(len(captions), seed, key, "answer")]
        if prompt_type == "instruction_reconstruction":
            caption = sd_prompt(caption, sources.categories.get(sample.nsd_id, []))
        pairs = [(prompts[pick(len(prompts), seed, key, "prompt")], caption)]
    return [{"from": role, "value": value} for pair in pairs for role, value in zip(ROLES, pair, strict=True)] or None


def make_record(sample: Sample, prompt_type: str, turns: list[dict[str, str]]) -> dict[str, Any]:
    """A record in LLaVA's format: `<image>` and a newline prepended to the first human turn."""
    conversations = [dict(turn) for turn in turns]
    conversations[0]["value"] = f"{IMAGE_TOKEN}\n{conversations[0]['value']}"
    return {
        "id": f"{sample.key}_{prompt_type}",
        "image": sample.reference,
        "conversations": conversations,
        **sample.fields,
        "type": prompt_type,
    }


# GPT conversations ----------------------------------------------------------------------------


def load_gpt_conversations(path: str | Path, prompt_type: str) -> dict[int, list[list[dict[str, str]]]]:
    """nsdId -> the dialogues of `<type>.jsonl` for that image, in file order, each validated."""
    path = Path(path)
    dialogues: dict[int, list[list[dict[str, str]]]] = {}
    for lineno, record in _read_jsonl(path, f"the {prompt_type} dialogues of generate_conversation.py"):
        where = f"line {lineno}"
        if not isinstance(record, dict):
            raise BadInputError(path, f"{where} must be a JSON object; found {type(record).__name__}")
        nsd_id = record.get("nsd_id")
        if not isinstance(nsd_id, int) or isinstance(nsd_id, bool) or nsd_id < 0:
            raise BadInputError(path, f"{where}: nsd_id must be a 0-based integer nsdId; found {nsd_id!r}")
        if record.get("prompt_type") != prompt_type:
            raise BadInputError(
                path, f"{where}: prompt_type must be {prompt_type!r}; found {record.get('prompt_type')!r}"
            )
        turns = record.get("conversations")
        problem = _conversation_problem(turns, image_tokens=0)
        if problem:
            raise BadInputError(path, f"{where} (nsd_id {nsd_id}): {problem}")
        dialogues.setdefault(nsd_id, []).append([{"from": t["from"], "value": t["value"]} for t in turns])
    return dialogues


def _read_jsonl(path: Path, what: str) -> Iterator[tuple[int, Any]]:
    """(line number, record) of the complete lines of a JSONL file, read without changing it.

    Not `JsonlStore`, which cuts off a torn last line: the file belongs to generate_conversation.py,
    which may be appending to it right now. A torn last line is left alone and skipped.
    """
    if not path.is_file():
        raise BadInputError(path, f"missing; expected {what}")
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    if complete < len(data):
        log.warning("%s: skipping an unfinished last line (its writer is still running or was killed)", path)
    for lineno, line in enumerate(data[:complete].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as err:
            raise BadInputError(path, f"line {lineno} is not valid JSON ({err.msg}); expected {what}") from None


# Validation -----------------------------------------------------------------------------------


def validate_sft_records(records: Any) -> None:
    """Raise ValueError naming the first record that breaks LLaVA's custom-data format.

    Each record: `id` a non-empty string, unique; `image` a non-empty string; `conversations` a list
    of {"from", "value"} turns alternating human, gpt, ..., ending with gpt, every value a non-empty
    string; `<image>` exactly once in the record, in the first human turn. Other keys are allowed.
    """
    if not isinstance(records, list):
        raise ValueError(f"SFT data must be a JSON list of records; found {type(records).__name__}")
    for _ in checked_sft_records(records):
        pass


def checked_sft_records(records: Iterable[Any]) -> Iterator[dict[str, Any]]:
    """Yield the records one by one, each checked as `validate_sft_records` does (its id against the
    ids before it), so that a writer can validate while streaming."""
    seen: set[str] = set()
    for index, record in enumerate(records):
        where = f"record {index}"
        if not isinstance(record, dict):
            raise ValueError(f"{where} must be an object; found {type(record).__name__}")
        record_id = record.get("id")
        if not isinstance(record_id, str) or not record_id:
            raise ValueError(f"{where}: id must be a non-empty string; found {record_id!r}")
        where = f"record {index} ({record_id})"
        if record_id in seen:
            raise ValueError(f"{where}: id is not unique")
        seen.add(record_id)
        if not isinstance(record.get("image"), str) or not record["image"]:
            raise ValueError(f"{where}: image must be a non-empty string; found {record.get('image')!r}")
        problem = _conversation_problem(record.get("conversations"), image_tokens=1)
        if problem:
            raise ValueError(f"{where}: {problem}")
        yield record


def _conversation_problem(turns: Any, image_tokens: int) -> str | None:
    """What is wrong with a list of turns (None if nothing): roles, types, `<image>` count and place."""
    if not isinstance(turns, list) or not turns:
        return f"conversations must be a non-empty list of turns; found {turns!r:.60}"
    for i, turn in enumerate(turns):
        expected = ROLES[i % 2]
        if not isinstance(turn, dict) or set(turn) != {"from", "value"}:
            return f"turn {i} must be an object with exactly 'from' and 'value'; found {turn!r:.60}"
        if turn["from"] != expected:
            return f"turn {i} must be from {expected!r} (human and gpt alternate, human first); found {turn['from']!r}"
        if not isinstance(turn["value"], str) or not turn["value"].replace(IMAGE_TOKEN, "").strip():
            return f"turn {i} must have a non-empty string value; found {turn['value']!r:.60}"
    if len(turns) % 2:
        return "conversations must end with a gpt turn (every human turn needs its answer)"
    count = sum(turn["value"].count(IMAGE_TOKEN) for turn in turns)
    if count != image_tokens:
        return f"{IMAGE_TOKEN} must appear {image_tokens} time(s) in the conversation; found {count}"
    if image_tokens and IMAGE_TOKEN not in turns[0]["value"]:
        return f"{IMAGE_TOKEN} must be in the first human turn"
    return None


def read_sft_data(path: str | Path) -> list[dict[str, Any]]:
    """The records of an `sft_data_{tr,te}.json`, validated (BadInputError naming the file)."""
    records = read_json(path, "LLaVA SFT data (a JSON list of records)")
    try:
        validate_sft_records(records)
    except ValueError as err:
        raise BadInputError(path, str(err)) from None
    return records


def dump_sft_records(records: Iterable[Mapping[str, Any]]) -> str:
    """A JSON list with one record per line (greppable, diffable, still one json.load); `records` may
    be a generator, so only the text is ever held in memory (NSD: ~700k records)."""
    rows = ",\n".join(json.dumps(r, ensure_ascii=False, allow_nan=False) for r in records)
    return "[\n" + rows + "\n]\n" if rows else "[]\n"
