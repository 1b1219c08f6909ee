"""Tiny stand-ins for every full-scale model of the pipeline, built from configs (nothing is downloaded).

Each builder takes keyword-only arguments, seeds its own random stream (the global torch RNG is left
as it was) and returns the model, plus its processor or tokenizer, in the class the full-scale stage
loads: `save_pretrained` then gives a folder that `from_pretrained` reads exactly like real weights.
Sizes are chosen so that a forward pass takes milliseconds on a CPU. `tools/make_tiny_models.py` builds
them all into one folder; DESIGN.md's stage table says which stage uses which.

Tokenizers are real where a real one ships in a pip package (OpenAI's CLIP BPE inside open-clip-torch);
otherwise a byte-level BPE is trained here on mini-NSD captions plus fixed instruction sentences.
Two models are trained: the VAE (`train_vae` teaches it coarse shapes and colours) and CLIP (`train_clip`
pairs images with their captions, so image embeddings carry image information); all others are random.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import json
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

DEFAULT_SEED = 0
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
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}{{ '" + IMAGE_TOKEN + "\\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{ bos_token }}"
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


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's CPU RNG seeded, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Text tokenizers ---------------------------------------------------------------------------------


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
    (a named string attribute breaks `Blip2Processor.__call__`, see ENVIRONMENT.md §2)."""
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


# Vision-language models --------------------------------------------------------------------------


def build_blip2(*, tokenizer, image_size: int = 32, num_query_tokens: int = 4, seed: int = DEFAULT_SEED):
    """Tiny `Blip2ForConditionalGeneration` (ViT 32-d, Q-Former 32-d, OPT 32-d) + `Blip2Processor`.

    tokenizer: from `build_opt_tokenizer`; the processor adds `num_query_tokens` `<image>` placeholders.
    """
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
    )

    vision = Blip2VisionConfig(
        image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4,
    )  # fmt: skip
    qformer = Blip2QFormerConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, encoder_hidden_size=32,
        vocab_size=tokenizer.vocab_size,
    )  # fmt: skip
    text = OPTConfig(
        vocab_size=len(tokenizer), hidden_size=32, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    config = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    with seeded(seed):
        model = Blip2ForConditionalGeneration(config).eval()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(text, key))
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=num_query_tokens)
    return model, processor


def detr_id2label(categories: Sequence[str]) -> dict[int, str]:
    """DETR's label convention: a class id is the COCO category id and indexes `id2label`; id 0 (unused
    by COCO) is "N/A". The extra "no object" logit is not in `id2label` (it is logit index num_labels)."""
    return {0: "N/A", **{i: name for i, name in enumerate(categories, start=1)}}


def build_detr(*, categories: Sequence[str], image_size: int = 128, num_queries: int = 10, seed: int = DEFAULT_SEED):
    """Tiny `DetrForObjectDetection` on a tiny ResNet (no timm, no pretrained backbone) + `DetrImageProcessor`.

    categories: names of COCO category ids 1..N, e.g. mini-NSD's `simulate.scenes.SHAPES`.
    image_size: the processor's shortest edge in pixels (the longest is capped at DETR's 1333/800 ratio).
    """
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

    backbone = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], layer_type="basic",
        out_features=["stage4"],
    )  # fmt: skip
    id2label = detr_id2label(categories)
    # use_timm_backbone/use_pretrained_backbone are transformers 4.x flags; 5.x infers both from a
    # backbone_config of model_type "resnet" (transformers' ResNetBackbone, randomly initialised).
    config = DetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone.to_dict(),
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=num_queries,
        id2label=id2label, label2id={v: k for k, v in id2label.items()},
    )  # fmt: skip
    with seeded(seed):
        model = DetrForObjectDetection(config).eval()
    longest = round(image_size * 1333 / 800)
    processor = DetrImageProcessor(size={"shortest_edge": image_size, "longest_edge": longest})
    return model, processor


def build_clip_vision(*, image_size: int = 32, projection_dim: int = 32, seed: int = DEFAULT_SEED):
    """Tiny `CLIPVisionModelWithProjection` (patch 8, 2 layers, 32-d) + `CLIPImageProcessor` (OpenAI's
    normalisation). `image_embeds` has `projection_dim` values: the vector Stable unCLIP is conditioned on."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, projection_dim=projection_dim,
    )  # fmt: skip
    with seeded(seed):
        model = CLIPVisionModelWithProjection(config).eval()
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return model, processor


def _clip_text_config(tokenizer, projection_dim: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, projection_dim=projection_dim,
        # With the real eos id (not the legacy 2), pooling takes the hidden state at <|endoftext|>.
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip


def build_clip_text(*, tokenizer=None, projection_dim: int = 32, seed: int = DEFAULT_SEED):
    """Tiny `CLIPTextModelWithProjection` (2 layers, 32-d, 77 positions) + the real CLIP tokenizer.

    `text_embeds` has `projection_dim` values and lives in the space of `build_clip_vision`'s image_embeds
    once both towers are trained together with `train_clip` (as built, both are random).
    tokenizer: default `build_clip_tokenizer()`.
    """
    from transformers import CLIPTextModelWithProjection

    tokenizer = tokenizer if tokenizer is not None else build_clip_tokenizer()
    with seeded(seed):
        model = CLIPTextModelWithProjection(_clip_text_config(tokenizer, projection_dim)).eval()
    return model, tokenizer


# CLIP training -------------------------------------------------------------------------------------


def clip_pixel_values(images: np.ndarray, processor) -> torch.Tensor:
    """(n, S, S, 3) uint8 RGB -> (n, 3, S, S) float32 `pixel_values`, normalised as `processor` does.

    The same arithmetic as `CLIPImageProcessor` (x * rescale_factor - image_mean) / image_std, without its
    resize and crop: images must already be the model's image_size a side (`_read_stimuli` resizes them).
    Vectorised, so 1700 images take milliseconds rather than the processor's per-image PIL round trip.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected (n, H, W, 3) uint8 images, got {images.shape} {images.dtype}")
    mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() * processor.rescale_factor
    return (pixels - mean) / std


def _tokenize(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, <|startoftext|> ... <|endoftext|>, cut at the tokenizer's 77 positions."""
    return tokenizer(list(texts), truncation=True).input_ids


def _unit_image_embeds(vision, pixel_values: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(vision(pixel_values=pixel_values).image_embeds, dim=-1)


def _unit_text_embeds(text, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.nn.functional.normalize(text(**batch).text_embeds, dim=-1)


def train_clip(
    vision,
    text,
    tokenizer,
    pixel_values: torch.Tensor,
    captions: Sequence[Sequence[str]],
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 0.1,
    seed: int = DEFAULT_SEED,
    progress: bool = False,
) -> dict:
    """Train `build_clip_vision`'s and `build_clip_text`'s towers in place, contrastively on (image, caption) pairs.

    Why: random towers give image embeddings that carry no image information, so the ViT3D's CLIP targets
    would be noise and image and text embeddings would not share a space. CLIP's own objective fixes both:
    symmetric InfoNCE (cross-entropy image->text and text->image over a batch's cosine similarities) times a
    learned logit scale, initialised to 1/0.07 and capped at 100 as in CLIP. On mini-NSD, 1000 steps (~30 s
    on 2 CPU cores) bring held-out image->text top-1 among 100 shared1000 images to ~0.4 (chance 0.01).

    pixel_values: (n, 3, S, S) from `clip_pixel_values`; captions: n lists of >= 1 caption strings (image
    i's COCO captions). Each step draws `batch_size` distinct images (fewer if n is smaller; a repeated
    image would be its own negative) and one random caption of each, from a numpy Generator seeded with
    `seed`. AdamW (`weight_decay` on every parameter), 20 warm-up steps, cosine decay to 0.
    Deterministic for a fixed seed (the towers have no dropout). Leaves both towers in eval mode.
    Returns {"seconds", "final_loss" (nats, the last step's), "logit_scale" (the final multiplier, not its log)}.
    """
    from tqdm.auto import tqdm

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if len(pixel_values) != len(captions) or len(captions) < 2:
        raise ValueError(f"need >= 2 images with one caption list each, got {len(pixel_values)} and {len(captions)}")
    if any(len(c) == 0 for c in captions):
        raise ValueError("every image needs at least one caption")
    # Tokenize each caption once; a step then only pads its batch (the CLIP tokenizer is pure Python).
    flat = [c for caps in captions for c in caps]
    flat_ids = _tokenize(tokenizer, flat)
    starts = np.cumsum([0, *(len(c) for c in captions)])
    counts = np.diff(starts)
    batch_size = min(batch_size, len(captions))
    rng = np.random.default_rng(seed)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = [*vision.parameters(), *text.parameters(), log_scale]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = min(20, steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * s / steps))
    )
    labels = torch.arange(batch_size)
    start, loss = time.perf_counter(), torch.tensor(float("nan"))
    vision.train()
    text.train()
    with seeded(seed):  # nothing here draws from torch's RNG today; a future dropout would, reproducibly
        for _ in tqdm(range(steps), desc="CLIP", disable=not progress):
            images = rng.choice(len(captions), batch_size, replace=False)
            picks = starts[images] + rng.integers(counts[images])
            image_embeds = _unit_image_embeds(vision, pixel_values[torch.from_numpy(images)])
            batch = tokenizer.pad({"input_ids": [flat_ids[i] for i in picks]}, return_tensors="pt")
            text_embeds = _unit_text_embeds(text, batch)
            logits = image_embeds @ text_embeds.T * log_scale.exp().clamp(max=100.0)
            loss = (
                torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)
            ) / 2
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    vision.eval()
    text.eval()
    return {
        "seconds": time.perf_counter() - start,
        "final_loss": float(loss.detach()),
        "logit_scale": float(log_scale.detach().exp().clamp(max=100.0)),
    }


@torch.no_grad()
def clip_retrieval(
    vision, text, tokenizer, pixel_values: torch.Tensor, captions: Sequence[Sequence[str]], batch_size: int = 256
) -> dict[str, float]:
    """Top-1 retrieval between n images and their first captions by cosine similarity of CLIP embeddings.

    image_to_text_top1: fraction of images whose most similar caption (among the n first captions) is their
    own; text_to_image_top1 the reverse; chance 1/n (`evaluation.top1_retrieval`: a tie goes to the lower
    index, so identical captions of two images count for the first only). pixel_values: (n, 3, S, S) from
    `clip_pixel_values`; captions: n caption lists, as for `train_clip`. Call it on held-out images with the
    towers in eval mode.
    """
    n = len(pixel_values)
    if n != len(captions) or n < 2:
        raise ValueError(f"need >= 2 images with one caption list each, got {n} and {len(captions)}")
    from llava_brain.evaluation import top1_retrieval

    ids = _tokenize(tokenizer, [caps[0] for caps in captions])
    image_embeds = torch.cat([_unit_image_embeds(vision, chunk) for chunk in pixel_values.split(batch_size)])
    text_embeds = torch.cat(
        [_unit_text_embeds(text, tokenizer.pad({"input_ids": ids[i : i + batch_size]}, return_tensors="pt"))
         for i in range(0, n, batch_size)]
    )  # fmt: skip
    top1 = top1_retrieval(image_embeds, text_embeds)  # rows: images (the "brain" side), columns: captions
    return {
        "image_to_text_top1": top1["brain_to_image"],
        "text_to_image_top1": top1["image_to_brain"],
        "chance": top1["chance"],
    }


# Language model ----------------------------------------------------------------------------------


def build_llm(*, tokenizer, hidden_size: int = 64, num_layers: int = 2, seed: int = DEFAULT_SEED):
    """Tiny `LlamaForCausalLM` (4 heads, 2 KV heads as in Llama-3's grouped-query attention) over `tokenizer`
    (from `build_llm_tokenizer`); generation stops at `</s>`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=tokenizer.model_max_length, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    with seeded(seed):
        model = LlamaForCausalLM(config).eval()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(config, key))
    return model


# VAE ----------------------------------------------------------------------------------------------


def build_vae(*, image_size: int = 64, seed: int = DEFAULT_SEED):
    """Tiny `AutoencoderKL`: 3 blocks (16, 32, 64 channels), 4 latent channels, latents image_size/4 a side.

    No mid-block attention (it halves the training speed here and adds nothing at 16 x 16 latents).
    Random weights: train with `train_vae`, which also sets `scaling_factor`.
    """
    from diffusers import AutoencoderKL

    with seeded(seed):
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64),
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            layers_per_block=1, norm_num_groups=8, sample_size=image_size, mid_block_add_attention=False,
        )  # fmt: skip
    return vae.eval()


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(n, H, W, 3) uint8 RGB -> (n, 3, H, W) float32 in [-1, 1], the range diffusers' VAEs take."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(
    vae,
    images: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1.5e-3,
    kl_weight: float = 1e-4,
    low_res_fraction: float = 0.8,
    seed: int = DEFAULT_SEED,
    progress: bool = False,
) -> dict:
    """Train `vae` in place on `images` ((n, 3, S, S) in [-1, 1]): MSE + kl_weight x KL (nats per latent value).

    Why two resolutions: at 2 CPU cores, batches of >= 32 images are what make this architecture learn
    (batches of 8 stall at PixCorr ~0.65), and 32 images at S/2 cost what 8 cost at S. The first
    `low_res_fraction` of the steps therefore use S/2 images (the network is convolutional, and shapes at
    half size are still shapes), the rest full-size images at half the batch. AdamW, 20 warm-up steps,
    cosine decay. Afterwards `scaling_factor` is set as in Stable Diffusion: 1 / std of the latent means.
    Returns {"seconds", "final_loss", "scaling_factor"}.
    """
    from tqdm.auto import tqdm

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    size = images.shape[-1]
    low_res = torch.nn.functional.interpolate(images, size=size // 2, mode="area")
    low_steps = round(steps * low_res_fraction)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(20, steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * s / steps))
    )
    start, loss = time.perf_counter(), torch.tensor(float("nan"))
    vae.train()
    with seeded(seed):  # the posterior samples draw from torch's global RNG
        for step in tqdm(range(steps), desc="VAE", disable=not progress):
            pool, n = (low_res, batch_size) if step < low_steps else (images, max(1, batch_size // 2))
            batch = pool[torch.randint(len(pool), (n,), generator=generator)]
            posterior = vae.encode(batch).latent_dist
            reconstruction = vae.decode(posterior.sample()).sample
            kl = posterior.kl().mean() / posterior.mean[0].numel()
            loss = torch.nn.functional.mse_loss(reconstruction, batch) + kl_weight * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images[:256].split(64)])
    scaling_factor = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    return {
        "seconds": time.perf_counter() - start,
        "final_loss": float(loss.detach()),
        "scaling_factor": scaling_factor,
    }


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Decode the posterior mean of each image ((n, 3, S, S) in [-1, 1]); clipped to [-1, 1]."""
    out = [vae.decode(vae.encode(chunk).latent_dist.mean).sample for chunk in images.split(batch_size)]
    return torch.cat(out).clamp(-1.0, 1.0)


def pixcorr(a, b) -> float:
    """MindEye's PixCorr: mean over images of the Pearson correlation of their flattened pixels.

    a, b: (n, ...) arrays or tensors of the same shape (any layout and value range; pair i is a[i], b[i]).
    """
    a = torch.as_tensor(np.asarray(a) if not torch.is_tensor(a) else a, dtype=torch.float64).flatten(1)
    b = torch.as_tensor(np.asarray(b) if not torch.is_tensor(b) else b, dtype=torch.float64).flatten(1)
    if a.shape != b.shape:
        raise ValueError(f"pixcorr needs arrays of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)).mean())


def reconstruction_pixcorr(vae, images: torch.Tensor) -> dict[str, float]:
    """PixCorr of VAE reconstructions with their originals, and of shuffled pairs (original i vs
    reconstruction i+1 mod n, never itself): the chance level the first must clearly beat."""
    if len(images) < 2:
        raise ValueError("need at least 2 images to form shuffled pairs")
    recon = reconstruct(vae, images)
    return {"pixcorr": pixcorr(recon, images), "shuffled_pixcorr": pixcorr(recon.roll(1, 0), images)}


# Stable unCLIP ------------------------------------------------------------------------------------


def build_unclip(*, clip_vision, feature_extractor, clip_tokenizer, clip_text, vae, seed: int = DEFAULT_SEED):
    """A tiny `StableUnCLIPImg2ImgPipeline` (SD 2.1 unCLIP layout) around the given CLIP and VAE.

    image_encoder/feature_extractor: `build_clip_vision`'s; text_encoder: a `CLIPTextModel` (the class the
    pipeline requires) holding the text tower of `clip_text`; vae: the trained VAE. The UNet takes the
    noised image embedding concatenated with its noise-level embedding (2 x projection_dim) as class
    embedding, and the text tower's hidden states (32-d) through cross-attention; v-prediction DDIM.
    """
    from diffusers import DDIMScheduler, DDPMScheduler, StableUnCLIPImg2ImgPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import CLIPTextModel

    embed_dim = clip_vision.config.projection_dim
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    with seeded(seed):
        text_encoder = CLIPTextModel(clip_text.config).eval()
        text_encoder.load_state_dict(clip_text.text_model.state_dict())  # the same tower, without projection
        unet = UNet2DConditionModel(
            sample_size=vae.config.sample_size // factor, in_channels=vae.config.latent_channels,
            out_channels=vae.config.latent_channels, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=clip_text.config.hidden_size, attention_head_dim=8, norm_num_groups=8,
            use_linear_projection=True, class_embed_type="projection",
            projection_class_embeddings_input_dim=2 * embed_dim,
        )  # fmt: skip
    # Scheduler settings of stabilityai/stable-diffusion-2-1-unclip(-small).
    image_noising_scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", clip_sample=True
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    return StableUnCLIPImg2ImgPipeline(
        feature_extractor=feature_extractor,
        image_encoder=clip_vision,
        image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=embed_dim),
        image_noising_scheduler=image_noising_scheduler,
        tokenizer=clip_tokenizer,
        text_encoder=text_encoder,
        unet=unet.eval(),
        scheduler=scheduler,
        vae=vae,
    )
