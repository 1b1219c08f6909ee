"""The prompts sent besides the context (`data/prompts/`), and the seeded per-image draws that pick from them.

`data/prompts/<prompt_type>.txt` is the system prompt of one instruction type, with `{preamble}`
standing for `context_preamble.txt` (how to read the captions and boxes);
`detail_description_questions.txt` lists the questions a detailed description answers, one per line.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llava_brain.errors import BadInputError, require_file

PROMPT_TYPES = ("conversation", "detail_description", "complex_reasoning")
# The data files ship with the repository, not the package (an editable install finds them).
PROMPTS_DIR = Path(__file__).resolve().parents[2] / "data" / "prompts"
PREAMBLE_FILE = "context_preamble.txt"
DETAIL_QUESTIONS_FILE = "detail_description_questions.txt"


def check_prompt_type(prompt_type: str) -> str:
    if prompt_type not in PROMPT_TYPES:
        raise ValueError(f"Unknown prompt type {prompt_type!r}; choose from {list(PROMPT_TYPES)}")
    return prompt_type


@dataclass(frozen=True)
class Prompts:
    system: str  # the system prompt of one prompt type, preamble filled in
    detail_questions: tuple[str, ...]


def prompt_files(prompt_type: str, prompts_dir: Path = PROMPTS_DIR) -> dict[str, Path]:
    """The files `load_prompts` reads for one type, by name (the inputs of a generation run)."""
    names = (PREAMBLE_FILE, f"{check_prompt_type(prompt_type)}.txt", DETAIL_QUESTIONS_FILE)
    return {name: Path(prompts_dir) / name for name in names}


def load_prompts(prompt_type: str, prompts_dir: Path = PROMPTS_DIR) -> Prompts:
    files = prompt_files(prompt_type, prompts_dir)
    preamble = _read_prompt(files[PREAMBLE_FILE]).strip()
    system = _read_prompt(files[f"{prompt_type}.txt"]).replace("{preamble}", preamble).strip()
    questions = [q.strip() for q in _read_prompt(files[DETAIL_QUESTIONS_FILE]).splitlines() if q.strip()]
    if not questions:
        raise BadInputError(files[DETAIL_QUESTIONS_FILE], "holds no question (one per line expected)")
    return Prompts(system, tuple(questions))


def _read_prompt(path: Path) -> str:
    return require_file(path, "a prompt text file (data/prompts/)").read_text(encoding="utf-8")


def image_rng(seed: int, nsd_id: int, purpose: str) -> random.Random:
    """A generator fixed by (seed, image, purpose): same draws whatever the order or process (str seeds are
    hashed with SHA-512 by `random`, so PYTHONHASHSEED does not matter)."""
    return random.Random(f"{seed}:{nsd_id}:{purpose}")


def pick_question(questions: Sequence[str], nsd_id: int, seed: int) -> str:
    """The detail-description question of an image, drawn from the list as LLaVA did, but reproducibly."""
    return image_rng(seed, nsd_id, "detail_question").choice(list(questions))
