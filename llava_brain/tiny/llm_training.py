"""Brief causal-LM pretraining of the tiny Llama on the NSD tree's text, so Brain-LLaVA starts from a language model.

Llama-3 was a language model long before the paper coupled it to fMRI; stage 1 (projector only, LLM
frozen) learns to place fMRI tokens where that model already expects words. A random tiny Llama gives
stage 1 nothing to learn against, so `tools/make_tiny_models.py` first trains it on the text Brain-LLaVA
will read and write, text only:

- documents of one COCO caption each, `<s>caption</s>`;
- one conversation per image and instruction type, rendered through the tokenizer's chat template (LLaVA
  v1 / Vicuna: system prompt, `USER:` / `ASSISTANT:` turns, `</s>` after each answer). The instruction
  dataset root is not at hand here (only the raw NSD tree), so the conversations are rebuilt from the
  tree's COCO captions and boxes with the code and wording of the instruction data itself: the prompt
  lists of `data/instructions/` and the answers of `llava_brain.sft` (brief description, Stable Diffusion
  prompt, concept localisation) and the offline template backend of `llava_brain.instructions`
  (conversation, detailed description, complex reasoning). The `<image>` placeholder is left out: text only.

`tree_contexts` reads each image's captions and boxes from the raw tree, `image_conversations` builds the
conversations, `build_corpus` renders, trains the tokenizer on the training images' text and tokenizes
both splits, `train_llm` trains on packed windows of the token stream, `perplexity` scores documents one by
one from their first token (as generation reads them), and `unigram_perplexity` is the control that knows
token frequencies and nothing else of the text.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llava_brain.tiny.builders import DEFAULT_SEED, build_llm, seeded
from llava_brain.tiny.tokenizers import INSTRUCTION_SENTENCES, build_llm_tokenizer, train_byte_bpe
from llava_brain.train import adamw, warmup_cosine_scheduler

WARMUP_STEPS = 20  # linear warm-up before the cosine decay (fewer when training is shorter)
# The instruction types whose conversations the corpus holds: every type of the SFT data (llava_brain.sft).
CONVERSATION_TYPES = (
    "brief_description",
    "instruction_reconstruction",
    "concept_localization",
    "conversation",
    "detail_description",
    "complex_reasoning",
)


def tree_contexts(info, nsd_ids: Sequence[int], captions: Mapping[int, Sequence[str]], instances: Mapping) -> list:
    """`llava_brain.instructions.ImageContext` of each nsdId, from the raw tree instead of a dataset root.

    info: `nsd.StimInfo`; captions: nsdId -> COCO captions (cleaned, repeats dropped, as the contexts of
    `instructions.load_contexts` hold them); instances: COCO split -> `nsd.CocoAnnotations` of kind
    "instances" (a split without a file gives its images no objects). Boxes are mapped onto NSD's crop
    (`nsd.coco_box_to_nsd`; cropped-away ones dropped) and stored as fractions (`instructions.normalise_box`),
    as make_coco_annotations.py and the dataset root's contexts do. Raises `BadInputError` naming the instances
    file when it lacks an image (or its size) that nsd_stim_info_merged.csv maps an nsdId to.
    """
    from llava_brain.errors import BadInputError
    from llava_brain.instructions import ImageContext, ImageObject, normalise_box
    from llava_brain.nsd import coco_box_to_nsd
    from llava_brain.nsd.constants import IMAGE_SIZE
    from llava_brain.sft import clean_text

    contexts = []
    for nsd_id in map(int, nsd_ids):
        coco = instances.get(str(info.coco_split[nsd_id]))
        objects = []
        if coco is not None:
            coco_id = int(info.coco_id[nsd_id])
            image = coco.images.get(coco_id, {})
            if "width" not in image or "height" not in image:
                raise BadInputError(
                    coco.path, f"lacks image {coco_id} with width/height (nsdId {nsd_id} in {info.path})"
                )
            for ann in sorted(coco.annotations(coco_id), key=lambda a: a.get("id", 0)):
                box = coco_box_to_nsd(ann["bbox"], (image["width"], image["height"]), info.crop_box[nsd_id], IMAGE_SIZE)
                name = coco.categories.get(int(ann["category_id"]))
                if name is None:
                    raise BadInputError(coco.path, f"annotation {ann.get('id')} has category {ann['category_id']}, "
                                        "which its categories do not list")  # fmt: skip
                if box is not None:
                    objects.append(ImageObject(name, normalise_box(box)))
        texts: dict[str, str] = {}  # repeats dropped as the root's contexts drop them: case and final period aside
        for text in map(clean_text, captions.get(nsd_id, ())):
            if text:
                texts.setdefault(text.lower().rstrip("."), text)
        contexts.append(ImageContext(nsd_id, tuple(texts.values()), tuple(objects)))
    return contexts


def image_conversations(
    ctx, *, instructions: Mapping[str, Sequence[str]], detail_questions: Sequence[str], seed: int = DEFAULT_SEED
) -> list[list[dict[str, str]]]:
    """The conversations of one image, one per `CONVERSATION_TYPES` entry the image supports, as chat
    messages (`{"role": "user" | "assistant", "content": str}`), without `<image>`.

    ctx: a `llava_brain.instructions.ImageContext` (captions, objects with boxes as fractions of the image).
    instructions: `llava_brain.sft.load_instruction_lists()`; detail_questions: `load_prompts(...).detail_questions`.
    Prompts and captions are drawn with `sft.pick` keyed by (seed, nsdId, type): the wording of the SFT
    records, not their exact draws (those are keyed by sample). An image without captions gets no brief
    description or Stable Diffusion prompt, one without objects no concept localisation.
    """
    from llava_brain.instructions import template_conversation
    from llava_brain.sft import CONCEPT_FIELD, GPT_TYPES, pick, salient_categories, sd_prompt

    categories = salient_categories([{"category": o.category, "box": o.box} for o in ctx.objects])
    pairs_by_type: list[list[tuple[str, str]]] = []
    for kind in CONVERSATION_TYPES:
        key = (ctx.nsd_id, kind)
        if kind in GPT_TYPES:
            turns = template_conversation(ctx, kind, seed, detail_questions)
            pairs_by_type.append([(q["value"], a["value"]) for q, a in zip(turns[::2], turns[1::2], strict=True)])
            continue
        prompts = instructions[kind]
        if kind == "concept_localization":
            pairs = [(prompts[pick(len(prompts), seed, *key, i)].replace(CONCEPT_FIELD, name), name)
                     for i, name in enumerate(categories)]  # fmt: skip
        elif ctx.captions:
            caption = ctx.captions[pick(len(ctx.captions), seed, *key, "answer")]
            answer = sd_prompt(caption, categories) if kind == "instruction_reconstruction" else caption
            pairs = [(prompts[pick(len(prompts), seed, *key, "prompt")], answer)]
        else:
            pairs = []
        pairs_by_type.append(pairs)
    return [
        [
            {"role": role, "content": text}
            for pair in pairs
            for role, text in zip(("user", "assistant"), pair, strict=True)
        ]
        for pairs in pairs_by_type
        if pairs
    ]


def render_conversations(tokenizer, conversations: Sequence[Sequence[Mapping[str, str]]]) -> list[str]:
    """Each conversation as the chat template writes it: `<s>{system} USER: ... ASSISTANT: ...</s>USER: ...`.

    The text depends on the template and the special tokens' strings only, not on the vocabulary, so a
    tokenizer over any BPE (even one trained on nothing) renders the text the final tokenizer is trained on.
    """
    if not conversations:
        return []
    return tokenizer.apply_chat_template([list(c) for c in conversations], tokenize=False)


def without_specials(tokenizer, text: str) -> str:
    """A rendered conversation with `<s>` dropped and each `</s>` made a line break: BPE training text (the
    BPE trainer reads them as text and would learn merges such as "</")."""
    return text.replace(tokenizer.bos_token, "").replace(tokenizer.eos_token, "\n")


def tokenize_documents(tokenizer, captions: Sequence[str], rendered: Sequence[str]) -> dict[str, list[list[int]]]:
    """Token ids of every document, by kind: {"captions": each `<s>caption</s>`, "conversations": each rendered
    conversation as it is}. The template writes `<s>` and every `</s>` itself, so rendered text is tokenized
    without added specials (one `<s>`, as `apply_chat_template(..., tokenize=True)` gives)."""
    eos = tokenizer.eos_token_id
    return {
        "captions": [[*ids, eos] for ids in tokenizer(list(captions)).input_ids] if captions else [],
        "conversations": tokenizer(list(rendered), add_special_tokens=False).input_ids if rendered else [],
    }


@dataclass
class Corpus:
    """The LLM's pretraining text, tokenized: token id lists by kind ("captions", "conversations") for the
    training and the held-out images, and the tokenizer (`build_llm_tokenizer`) over `bpe`, the shared BPE."""

    bpe: Any  # tokenizers.Tokenizer: also BLIP-2's vocabulary (build_opt_tokenizer)
    tokenizer: Any
    train: dict[str, list[list[int]]]
    heldout: dict[str, list[list[int]]]

    def training_documents(self) -> list[list[int]]:
        return [doc for docs in self.train.values() for doc in docs]


def image_texts(contexts: Sequence, *, seed: int = DEFAULT_SEED) -> tuple[list[str], list[list[dict[str, str]]]]:
    """(captions, conversations) of `contexts`: every caption, and `image_conversations` of each image, with
    the prompt lists of `data/instructions/` and the detail questions of `data/prompts/`."""
    from llava_brain.instructions import load_prompts
    from llava_brain.sft import load_instruction_lists

    instructions = load_instruction_lists()
    questions = load_prompts("detail_description").detail_questions
    captions = [caption for ctx in contexts for caption in ctx.captions]
    conversations = [
        conversation
        for ctx in contexts
        for conversation in image_conversations(ctx, instructions=instructions, detail_questions=questions, seed=seed)
    ]
    return captions, conversations


def build_corpus(train: Sequence, heldout: Sequence, *, vocab_size: int = 4096, seed: int = DEFAULT_SEED) -> Corpus:
    """The corpus of the `train` and `heldout` contexts (`tree_contexts`): their captions and conversations
    rendered through the chat template, a BPE (`train_byte_bpe`, at most `vocab_size` tokens) trained on the
    training text only (+ `INSTRUCTION_SENTENCES`), and both splits tokenized with it."""

    # The rendered text does not depend on the vocabulary: render with a bytes-only BPE, then train the real one.
    renderer = build_llm_tokenizer(train_byte_bpe((), vocab_size=300))
    texts = {}
    for split, contexts in (("train", train), ("heldout", heldout)):
        captions, conversations = image_texts(contexts, seed=seed)
        texts[split] = captions, render_conversations(renderer, conversations)
    captions, rendered = texts["train"]
    bpe_texts = [*captions, *(without_specials(renderer, t) for t in rendered), *INSTRUCTION_SENTENCES]
    bpe = train_byte_bpe(bpe_texts, vocab_size=vocab_size)
    tokenizer = build_llm_tokenizer(bpe)
    return Corpus(bpe, tokenizer, *(tokenize_documents(tokenizer, *texts[split]) for split in ("train", "heldout")))


def train_llm(
    model,
    documents: Sequence[Sequence[int]],
    *,
    steps: int,
    block_size: int = 128,
    batch_size: int = 16,
    lr: float = 3e-3,
    weight_decay: float = 0.01,
    seed: int = DEFAULT_SEED,
    progress: bool = False,
) -> dict:
    """Train a causal LM in place on `documents` (token id lists, each `<s> ... </s>`), next-token cross-entropy.

    GPT-style packing: the documents, in an order shuffled by `seed`, form one token stream; each step reads
    `batch_size` windows of `block_size` tokens at random offsets (no padding, every token is a target). AdamW,
    `train.warmup_cosine` schedule (WARMUP_STEPS linear warm-up steps, then cosine decay to 0). Deterministic for
    a fixed seed (Llama has no dropout by default) on one machine with one torch thread count. Leaves the model
    in eval mode. Returns {"seconds", "final_loss" (nats per token, mean of the last 10 steps), "train_tokens"}.
    """
    from tqdm.auto import tqdm

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    rng = np.random.default_rng(seed)
    stream = np.concatenate([np.asarray(documents[i], dtype=np.int64) for i in rng.permutation(len(documents))])
    block_size = min(block_size, stream.size - 1)
    if block_size < 2:
        raise ValueError(f"need more than 2 training tokens, got {stream.size}")
    windows = np.arange(block_size)
    optimizer = adamw(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = warmup_cosine_scheduler(optimizer, warmup=min(WARMUP_STEPS, steps), total=steps)
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    with seeded(seed):  # nothing here draws from torch's RNG today; a dropout would, reproducibly
        for _ in tqdm(range(steps), desc="LLM", disable=not progress):
            offsets = rng.integers(0, stream.size - block_size + 1, batch_size)
            batch = torch.from_numpy(stream[offsets[:, None] + windows])  # (batch_size, block_size)
            loss = model(input_ids=batch, labels=batch).loss  # the model shifts labels by one
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
    model.eval()
    return {"seconds": time.perf_counter() - start, "final_loss": float(np.mean(losses[-10:])),
            "train_tokens": int(stream.size)}  # fmt: skip


@torch.no_grad()
def perplexity(model, documents: Sequence[Sequence[int]], *, batch_size: int = 64) -> float:
    """exp(mean next-token negative log-likelihood) over every token after each document's first.

    Each document is read on its own from position 0 (padded batches, pad positions masked out): how the
    model meets a prompt at generation time. NLLs are summed in float64, so the result does not depend on
    how documents are batched (beyond float32 logits).
    """
    docs = sorted((list(d) for d in documents if len(d) > 1), key=len)
    if not docs:
        raise ValueError("need at least one document of 2 or more tokens")
    total, count = 0.0, 0
    for start in range(0, len(docs), batch_size):
        chunk = docs[start : start + batch_size]
        width = len(chunk[-1])
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, doc in enumerate(chunk):
            ids[row, : len(doc)] = torch.tensor(doc)
            mask[row, : len(doc)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        total += float((nll.double() * mask[:, 1:]).sum())
        count += int(mask[:, 1:].sum())
    return math.exp(total / count)


def unigram_perplexity(train: Sequence[Sequence[int]], heldout: Sequence[Sequence[int]], vocab_size: int) -> float:
    """Perplexity on `heldout` of token frequencies counted in `train` (add-one smoothed over `vocab_size`),
    over the same tokens `perplexity` scores: a model that knows which tokens are common, nothing of context."""
    counts = np.ones(vocab_size, dtype=np.float64)
    for doc in train:
        np.add.at(counts, np.asarray(doc[1:], dtype=np.int64), 1.0)
    log_p = np.log(counts / counts.sum())
    targets = np.concatenate([np.asarray(d[1:], dtype=np.int64) for d in heldout if len(d) > 1])
    return math.exp(-float(log_p[targets].mean()))


def pretrain_llm(
    train: Sequence,
    heldout: Sequence,
    *,
    vocab_size: int = 4096,
    steps: int,
    seed: int = DEFAULT_SEED,
    progress: bool = False,
) -> tuple[Corpus, Any, dict]:
    """`build_corpus`, `build_llm` over its tokenizer, `train_llm` for `steps` (0: leave it random); returns
    (corpus, model, report). The report holds held-out perplexity by document kind of the trained model
    ("perplexity"), of the same model before training ("untrained_perplexity": same architecture and seed) and
    of `unigram_perplexity` ("unigram_perplexity"), document and token counts, and "seconds" ({"corpus",
    "train"}: wall time, kept out of manifests by the caller)."""
    started = time.perf_counter()
    corpus = build_corpus(train, heldout, vocab_size=vocab_size, seed=seed)
    model = build_llm(tokenizer=corpus.tokenizer, seed=seed)
    training, vocab = corpus.training_documents(), len(corpus.tokenizer)
    seconds = {"corpus": time.perf_counter() - started}

    def scores(score) -> dict[str, float]:  # captions: what the answers say; conversations: prompts and answers
        return {kind: round(score(docs), 4) for kind, docs in corpus.heldout.items()}

    report = {
        "train_images": len(train), "heldout_images": len(heldout), "steps": steps,
        "train_documents": {kind: len(docs) for kind, docs in corpus.train.items()},
        "heldout_documents": {kind: len(docs) for kind, docs in corpus.heldout.items()},
        "heldout_tokens": {kind: sum(len(d) - 1 for d in docs) for kind, docs in corpus.heldout.items()},
        "untrained_perplexity": scores(lambda docs: perplexity(model, docs)),
        "unigram_perplexity": scores(lambda docs: unigram_perplexity(training, docs, vocab)),
    }  # fmt: skip
    if steps > 0:
        trained = train_llm(model, training, steps=steps, seed=seed, progress=progress)
        seconds["train"] = trained["seconds"]
        report.update(train_tokens=trained["train_tokens"], final_loss=round(trained["final_loss"], 4))
    report["perplexity"] = scores(lambda docs: perplexity(model, docs))
    return corpus, model, {**report, "seconds": seconds}
