"""Chat templates whose assistant turns are marked for training, and the tokenizer set-up Brain-LLaVA needs.

The SFT data are tokenized through the tokenizer's own chat template (`apply_chat_template(...,
return_assistant_tokens_mask=True)`, transformers' maintained way). That mask is only as good as the template:
every assistant message, with its end-of-turn token, must sit inside a `{% generation %}` block, or no token
is learned. Templates shipped with hub models (Meta's Llama-3 one included) have no such block, so a model
folder is given one of these:

- `LLAMA3_CHAT_TEMPLATE`: Meta's Llama-3-Instruct layout (no default system prompt, `| trim` on every
  message, as Meta's template does)::

      <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n<image>\\nDescribe the image.<|eot_id|>
      <|start_header_id|>assistant<|end_header_id|>\\n\\n{% generation %}A dog.<|eot_id|>{% endgeneration %}

  Generation must stop at `<|eot_id|>` (Llama-3-Instruct's generation config lists it among its eos ids).
- `VICUNA_CHAT_TEMPLATE`: LLaVA v1's Vicuna layout (`... USER: q ASSISTANT: a</s>`), the tiny LLM's template
  (`llava_brain.tiny.tokenizers.CHAT_TEMPLATE`, one definition).

Message content is a string, or a list of `{"type": "image"}` / `{"type": "text", "text": ...}` parts; an image
part renders as `<image>\\n`, as LLaVA writes it. The `<image>` placeholder is one special token of the
tokenizer (`add_image_token`), expanded to the vision tower's token count after tokenization.
"""

from __future__ import annotations

from llava_brain.tiny.tokenizers import CHAT_TEMPLATE as VICUNA_CHAT_TEMPLATE
from llava_brain.tiny.tokenizers import IMAGE_TOKEN, RENDER_CONTENT

LLAMA3_CHAT_TEMPLATE = (
    RENDER_CONTENT + "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('roles must be system, user or assistant') }}{%- endif -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{ render(message['content']) | trim }}{{ '<|eot_id|>' }}{%- endgeneration -%}"
    "{%- else -%}{{ render(message['content']) | trim }}{{ '<|eot_id|>' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)
CHAT_TEMPLATES = {"llama3": LLAMA3_CHAT_TEMPLATE, "vicuna_v1": VICUNA_CHAT_TEMPLATE}
LLAMA3_END_OF_TURN = "<|eot_id|>"


def marks_assistant_turns(template: str | None) -> bool:
    """Whether a chat template has a `{% generation %}` block (else `return_assistant_tokens_mask` marks nothing)."""
    return bool(template) and "generation" in template and "endgeneration" in template


def set_chat_template(tokenizer, template: str):
    """Give `tokenizer` a chat template: a name of `CHAT_TEMPLATES` or a Jinja string with `{% generation %}`.

    Returns the tokenizer (changed in place); `save_pretrained` then writes the template with it.
    """
    text = CHAT_TEMPLATES.get(template, template)
    if not marks_assistant_turns(text):
        raise ValueError(
            f"chat template {template!r:.60} has no {{% generation %}} block around the assistant turns; "
            f"use one of {sorted(CHAT_TEMPLATES)} or add the block"
        )
    tokenizer.chat_template = text
    return tokenizer


def add_image_token(tokenizer, image_token: str = IMAGE_TOKEN) -> int:
    """Make `image_token` one special token of `tokenizer` (never split, skipped when decoding with
    skip_special_tokens), named `tokenizer.image_token` as LLaVA's processor looks for it; returns its id.

    A token that is new grows the vocabulary by one: the LLM's embeddings must then be resized to
    `len(tokenizer)` (Llama-3-8B: 128256 -> 128257 rows).
    """
    from tokenizers import AddedToken

    token = AddedToken(image_token, special=True, normalized=False, lstrip=False, rstrip=False)
    if getattr(tokenizer, "image_token", None) != image_token:
        # The public add_special_tokens() accepts only the fixed names (bos, eos, ...); this is how the
        # tokenizer's constructor registers `extra_special_tokens={"image_token": ...}` (saved and reloaded).
        tokenizer._set_model_specific_special_tokens({"image_token": token})
    tokenizer.add_tokens([token], special_tokens=True)  # no-op when already in the vocabulary
    return int(tokenizer.convert_tokens_to_ids(image_token))


def prepare_tokenizer(tokenizer, *, chat_template: str | None = None, image_token: str = IMAGE_TOKEN,
                      pad_token: str | None = None):  # fmt: skip
    """A tokenizer ready for Brain-LLaVA: `<image>` added, the chat template set (None keeps the tokenizer's own,
    which must mark assistant turns), a pad token (the given one, else the existing one, else Llama-3's
    `<|finetune_right_pad_id|>` when in the vocabulary, else the eos token). Returns the tokenizer."""
    add_image_token(tokenizer, image_token)
    if chat_template is not None:
        set_chat_template(tokenizer, chat_template)
    elif not marks_assistant_turns(tokenizer.chat_template):
        raise ValueError(
            f"the tokenizer's chat template does not mark assistant turns with {{% generation %}}; "
            f"pass chat_template= one of {sorted(CHAT_TEMPLATES)}"
        )
    if pad_token is not None:
        tokenizer.pad_token = pad_token
    elif tokenizer.pad_token is None:
        llama_pad = "<|finetune_right_pad_id|>"
        in_vocab = tokenizer.convert_tokens_to_ids(llama_pad) not in (None, tokenizer.unk_token_id)
        tokenizer.pad_token = llama_pad if in_vocab else tokenizer.eos_token
    return tokenizer
