"""LLaVA-style instruction data about NSD images, for `prepare_datasets/generate_conversation.py`.

An LLM that never sees the image gets its captions and object boxes and writes, "as if seeing the
image", a conversation, a detailed description or a complex-reasoning Q&A. By concern:

- `context`: the text the LLM sees instead of the image (`ImageContext`, `load_contexts`);
- `prompts`: the system prompts and detail-description questions of `data/prompts/` (`load_prompts`)
  and the seeded per-image draws;
- `answers`: the answer protocol (`parse_qa`, `answer_to_conversation`, `MalformedAnswer`) and the
  record format of `nsd_gpt_conversation/<prompt_type>.jsonl` (`make_record`);
- `templates` (words in `phrases`): the offline backend, deterministic conversations from the context;
- `openai_client`: the retry policy, the request/token budget and the per-image request loop of
  the OpenAI backend.
"""

from llava_brain.instructions.answers import (
    MalformedAnswer,
    answer_to_conversation,
    make_record,
    parse_qa,
    to_turns,
)
from llava_brain.instructions.context import (
    ContextSources,
    ImageContext,
    ImageObject,
    captioned_images,
    load_contexts,
    merge_objects,
    normalise_box,
)
from llava_brain.instructions.openai_client import (
    ApiStats,
    Budget,
    RequestSettings,
    RetryPolicy,
    redact,
    request_conversation,
    retry_after_seconds,
)
from llava_brain.instructions.phrases import region
from llava_brain.instructions.prompts import (
    PROMPT_TYPES,
    PROMPTS_DIR,
    Prompts,
    image_rng,
    load_prompts,
    pick_question,
    prompt_files,
)
from llava_brain.instructions.templates import TEMPLATE_MODEL, template_conversation

__all__ = [
    "PROMPTS_DIR",
    "PROMPT_TYPES",
    "TEMPLATE_MODEL",
    "ApiStats",
    "Budget",
    "ContextSources",
    "ImageContext",
    "ImageObject",
    "MalformedAnswer",
    "Prompts",
    "RequestSettings",
    "RetryPolicy",
    "answer_to_conversation",
    "captioned_images",
    "image_rng",
    "load_contexts",
    "load_prompts",
    "make_record",
    "merge_objects",
    "normalise_box",
    "parse_qa",
    "pick_question",
    "prompt_files",
    "redact",
    "region",
    "request_conversation",
    "retry_after_seconds",
    "template_conversation",
    "to_turns",
]
