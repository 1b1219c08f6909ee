"""The tiny models' tokenizers: a byte-level BPE trained here (LLM and BLIP-2's OPT) and OpenAI's real CLIP vocabulary.

The LLM and BLIP-2 share one BPE vocabulary, trained on the NSD tree's COCO captions plus the fixed
`INSTRUCTION_SENTENCES`, so that captions and prompts tokenize into words, not bytes. The LLM's tokenizer
carries LLaVA v1's (Vicuna) chat template. CLIP's tokenizer is the real one: its BPE merges ship inside
the open-clip-torch wheel, which is read here, not imported.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from collections.abc import Iterable
from pathlib import Path

IMAGE_TOKEN = "<image>"
# One vocabulary serves BLIP-2's OPT tokenizer and the LLM's: the first four ids are OPT's
# (<s>=0, <pad>=1, </s>=2, <unk>=3), the image placeholder follows.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", IMAGE_TOKEN)
# LLaVA v1 (Vicuna) system prompt; the chat template below reproduces LLaVA's `conv_vicuna_v1` layout.
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
# "<s>{system} USER: {q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT:". Content is a string or a list of
# {"type": "image"} / {"type": "text", "text": ...} parts (an image part becomes "<image>\n", as in LLaVA).
# Assistant turns sit in {% generation %} so `return_assistant_tokens_mask=True` marks the trained tokens.
# The Jinja macro `render(content)` every chat template here starts with (llava_brain/data/chat_templates.py too).
RENDER_CONTENT = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}{{ '" + IMAGE_TOKEN + "\\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)
CHAT_TEMPLATE = (
    RENDER_CONTENT + "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{ render(messages[0]['content']) }}{%- set turns = messages[1:] -%}"
    "{%- else -%}{{ '" + VICUNA_SYSTEM.replace("'", "\\'") + "' }}{%- set turns = messages -%}{%- endif -%}"
    "{{ ' ' }}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}{{ 'USER: ' }}{{ render(message['content']) }}{{ ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' }}"
    "{%- generation -%}{{ render(message['content']) }}{{ eos_token }}{%- endgeneration -%}"
    "{%- else -%}{{ raise_exception('roles must be system (first only), user or assistant') }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)
# Instruction-style sentences added to the tokenizer corpus so that prompts of every SFT type
# (LLaVA's and the paper's Tab. 3-6 wording) tokenize into words, not bytes.
INSTRUCTION_SENTENCES = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
    "Describe the following image in detail.",
    "Provide a detailed description of the given image.",
    "Give an elaborate explanation of the image you see.",
    "Share a comprehensive rundown of the presented image.",
    "Offer a thorough analysis of the image.",
    "Explain the various aspects of the image before you.",
    "Clarify the contents of the displayed image with great detail.",
    "Characterize the image using a well-detailed description.",
    "Break down the elements of the image in a detailed manner.",
    "Walk through the important details of the image.",
    "Portray the image with a rich, descriptive narrative.",
    "Narrate the contents of the image with precision.",
    "Analyze the image in a comprehensive and detailed manner.",
    "Illustrate the image through a descriptive explanation.",
    "Examine the image closely and share its details.",
    "Write an exhaustive depiction of the given image.",
    "Provide the corresponding Stable Diffusion prompts for the image.",
    'Locating the concept of "circle"',
    "What objects can you see in the picture, and where are they?",
    "What is the colour of the largest shape, and what is it next to?",
    "How many objects are there in this image?",
    "Why might someone have drawn these shapes on this background?",
    "Is there anything unusual about the scene? Explain your reasoning.",
    "Yes, there is a red square in the lower left corner of the image.",
    "No, the background is a smooth gradient without any texture.",
    "The image shows three objects of different sizes and colours.",
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "I am sorry, but I cannot tell that from the image alone.",
    "Sure! Here is a detailed description of what I see: 1) a photo, 2) two people, 3) a dog.",
    "a photo of a cat sitting on a sofa; a man riding a horse on the beach at sunset.",
)


def train_byte_bpe(texts: Iterable[str], *, vocab_size: int = 4096, min_frequency: int = 2):
    """A byte-level BPE (GPT-2 style, no prefix space) trained on `texts`; `SPECIAL_TOKENS` take ids 0-4.

    `vocab_size` is an upper bound: training stops early when no pair occurs `min_frequency` times.
    Returns a `tokenizers.Tokenizer`; wrap it with `build_llm_tokenizer` or `build_opt_tokenizer`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    bpe.train_from_iterator(sorted(set(texts)), trainer=trainer)  # sorted: the same corpus in any order
    return bpe


def _vocab_and_merges(bpe) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = json.loads(bpe.to_str())["model"]
    return model["vocab"], [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def build_llm_tokenizer(bpe, *, model_max_length: int = 2048):
    """The LLM's tokenizer: Llama-2/Vicuna specials (<s> added in front), `<image>` as one special token,
    LLaVA v1's chat template. Returns a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(bpe.to_str())
    bos_id = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_opt_tokenizer(bpe, *, model_max_length: int = 512):
    """BLIP-2's OPT tokenizer (GPT-2 byte-level BPE, `</s>` as bos and eos, added in front) over the same
    vocabulary as `build_llm_tokenizer`. No named `image_token`: `Blip2Processor` registers `<image>` itself
    (with a named string attribute `Blip2Processor.__call__` raises "'str' object has no attribute 'content'";
    docs/environment.md)."""
    from transformers import GPT2Tokenizer

    vocab, merges = _vocab_and_merges(bpe)
    tokenizer = GPT2Tokenizer(
        vocab=vocab,
        merges=merges,
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=True,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.add_tokens([t for t in SPECIAL_TOKENS if t not in ("</s>", "<unk>", "<pad>")], special_tokens=True)
    return tokenizer


def openai_clip_bpe_path() -> Path:
    """OpenAI's CLIP BPE merges (`bpe_simple_vocab_16e6.txt.gz`) as shipped in the open-clip-torch wheel.

    Located without importing open_clip (its import pulls timm/torchvision and is slow).
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "OpenAI's CLIP vocabulary ships in the pip package open-clip-torch; install it "
            "(pip install open-clip-torch==3.3.0) or pass bpe_path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; expected OpenAI's CLIP BPE file inside open-clip-torch")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def openai_clip_vocab(bpe_path: str | Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) exactly as open_clip's SimpleTokenizer builds them: 49408 tokens.

    256 byte symbols, the same with the end-of-word suffix `</w>`, one token per merge (48894 merges,
    the first line of the file is a header), then <|startoftext|>=49406 and <|endoftext|>=49407.
    """
    with gzip.open(bpe_path or openai_clip_bpe_path()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def build_clip_tokenizer(*, bpe_path: str | Path | None = None):
    """`CLIPTokenizer` with OpenAI's real vocabulary ("a photo of a cat" -> 49406 320 1125 539 320 2368 49407)."""
    from transformers import CLIPTokenizer

    vocab, merges = openai_clip_vocab(bpe_path)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)  # CLIP's context length
