"""The answer protocol: how a model's reply becomes the turns of one image's record, checked strictly.

The model writes `Question:` / `Answer:` blocks separated by `===` lines (LLaVA's format);
`parse_qa` accepts only alternating, non-empty turns with at least one pair. A reply that breaks
the protocol raises `MalformedAnswer`, which the OpenAI backend retries.

A record (one JSON line per image in `nsd_gpt_conversation/<prompt_type>.jsonl`)::

    {"nsd_id": 42, "prompt_type": "conversation",
     "conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}, ...],
     "backend": "openai", "model": "gpt-3.5-turbo-0125"}

No `<image>` token: the SFT stage adds it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from llava_brain.instructions.prompts import check_prompt_type


class MalformedAnswer(ValueError):
    """The model's text does not follow the output protocol of the prompt (the request is retried)."""


_SEPARATOR = re.compile(r"^\s*=+\s*$")
_MARKER = re.compile(r"^\s*(Question|Answer)\s*:\s*", re.IGNORECASE)


def parse_qa(text: str) -> list[tuple[str, str]]:
    """(question, answer) pairs of a `Question:` / `===` / `Answer:` reply; MalformedAnswer on any deviation.

    Strict: nothing but separators before the first `Question:`, turns alternate Question/Answer and
    end on an Answer, every turn has text. Separator lines are optional between turns (models drop them).
    """
    turns: list[list[str]] = []  # [role, lines...]
    for line in (text or "").splitlines():
        if _SEPARATOR.match(line):
            continue
        marker = _MARKER.match(line)
        if marker:
            turns.append([marker.group(1).lower(), line[marker.end() :]])
        elif turns:
            turns[-1].append(line)
        elif line.strip():
            raise MalformedAnswer(f"text before the first 'Question:': {line.strip()[:60]!r}")
    if not turns:
        raise MalformedAnswer("no 'Question:' / 'Answer:' blocks")
    pairs = []
    for i, (role, *lines) in enumerate(turns):
        expected = "question" if i % 2 == 0 else "answer"
        if role != expected:
            raise MalformedAnswer(f"turn {i + 1} is {role!r}, expected {expected!r} (turns must alternate)")
        body = "\n".join(lines).strip()
        if not body:
            raise MalformedAnswer(f"turn {i + 1} ({role}) is empty")
        if role == "question":
            pairs.append([body])
        else:
            pairs[-1].append(body)
    if len(pairs[-1]) != 2:
        raise MalformedAnswer("the last question has no answer")
    return [(q, a) for q, a in pairs]


def to_turns(pairs: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    turns = []
    for question, answer in pairs:
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return turns


def answer_to_conversation(prompt_type: str, text: str, question: str | None = None) -> list[dict[str, str]]:
    """The conversation of one image from the model's reply; MalformedAnswer if the reply breaks the protocol.

    conversation: >= 1 Q/A pair; complex_reasoning: exactly one pair; detail_description: the whole
    reply is the answer to `question` (ours, drawn from the list).
    """
    check_prompt_type(prompt_type)
    if prompt_type == "conversation":
        return to_turns(parse_qa(text))
    if prompt_type == "complex_reasoning":
        pairs = parse_qa(text)
        if len(pairs) != 1:
            raise MalformedAnswer(f"expected one question and its answer, got {len(pairs)} pairs")
        return to_turns(pairs)
    answer = (text or "").strip()  # detail_description
    if not answer:
        raise MalformedAnswer("empty description")
    if question is None:
        raise ValueError("detail_description needs the question the description answers")
    return to_turns([(question, answer)])


def make_record(nsd_id: int, prompt_type: str, turns: list[dict[str, str]], backend: str, model: str) -> dict:
    return {"nsd_id": int(nsd_id), "prompt_type": prompt_type, "conversations": turns, "backend": backend,
            "model": model}  # fmt: skip
