"""llava_brain/tiny/llm_training.py: the tiny Llama's pretraining corpus, its training and held-out perplexity.

Perplexity is checked against hand-computed values and against transformers' own causal-LM loss; contexts
read from the raw tree against those the instruction data reads from a prepared dataset root.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from llava_brain import tiny
from llava_brain.instructions import ImageContext, ImageObject, load_prompts, template_conversation
from llava_brain.layout import DatasetRoot
from llava_brain.sft import load_instruction_lists

from conftest import load_script

CIRCLE = ImageContext(
    nsd_id=7,
    captions=("A large red circle and a small blue square on a gray background.", "Two shapes on gray."),
    objects=(ImageObject("circle", (0.1, 0.1, 0.6, 0.6)), ImageObject("square", (0.7, 0.7, 0.8, 0.8))),
)


@pytest.fixture(scope="module")
def tokenizer():
    texts = [*CIRCLE.captions, "A small green triangle on a sandy background.", *tiny.INSTRUCTION_SENTENCES]
    return tiny.build_llm_tokenizer(tiny.train_byte_bpe(texts))


def _conversations(ctx: ImageContext, seed: int = 0):
    questions = load_prompts("detail_description").detail_questions
    return tiny.image_conversations(ctx, instructions=load_instruction_lists(), detail_questions=questions, seed=seed)


# Conversations ------------------------------------------------------------------------------------


def test_one_conversation_per_instruction_type_in_the_sft_wording():
    brief, reconstruction, concepts, *templated = _conversations(CIRCLE)
    instructions = load_instruction_lists()
    assert brief[0]["role"] == "user" and brief[0]["content"] in instructions["brief_description"]
    assert [m["role"] for m in brief] == ["user", "assistant"] and brief[1]["content"] in CIRCLE.captions
    # The SD prompt: a caption without its period, then the salient categories it does not name (none here).
    assert reconstruction[0]["content"] == "Provide the corresponding Stable Diffusion prompts for the image."
    assert reconstruction[1]["content"] in {"A large red circle and a small blue square on a gray background",
                                            "Two shapes on gray, circle, square"}  # fmt: skip
    # One round per category, the largest first, the answer the bare category.
    assert concepts == [
        {"role": "user", "content": 'Locating the concept of "circle"'},
        {"role": "assistant", "content": "circle"},
        {"role": "user", "content": 'Locating the concept of "square"'},
        {"role": "assistant", "content": "square"},
    ]
    questions = load_prompts("detail_description").detail_questions
    for kind, conversation in zip(("conversation", "detail_description", "complex_reasoning"), templated, strict=True):
        turns = template_conversation(CIRCLE, kind, 0, questions)
        assert conversation == [{"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]}
                                for t in turns], kind  # fmt: skip
    assert all("<image>" not in m["content"] for c in _conversations(CIRCLE) for m in c)  # text only


def test_images_without_captions_or_objects_skip_the_types_that_need_them():
    bare = ImageContext(nsd_id=3, captions=(), objects=())
    assert len(_conversations(bare)) == 3  # the template backend answers for every image
    no_objects = ImageContext(nsd_id=3, captions=CIRCLE.captions, objects=())
    assert len(_conversations(no_objects)) == 5  # no concept localisation
    assert tiny.CONVERSATION_TYPES[2] == "concept_localization" and len(tiny.CONVERSATION_TYPES) == 6


def test_rendered_through_the_vicuna_template_and_tokenized_with_one_bos(tokenizer):
    messages = [{"role": "user", "content": "What is there?"}, {"role": "assistant", "content": "A red circle."},
                {"role": "user", "content": "Where?"}, {"role": "assistant", "content": "On the left."}]  # fmt: skip
    [text] = tiny.render_conversations(tokenizer, [messages])
    assert text == (f"<s>{tiny.VICUNA_SYSTEM} USER: What is there? ASSISTANT: A red circle.</s>"
                    "USER: Where? ASSISTANT: On the left.</s>")  # fmt: skip
    docs = tiny.tokenize_documents(tokenizer, ["A red circle."], [text])
    [caption], [chat] = docs["captions"], docs["conversations"]
    assert caption[0] == chat[0] == tokenizer.bos_token_id and caption[-1] == chat[-1] == tokenizer.eos_token_id
    assert chat.count(tokenizer.bos_token_id) == 1 and chat.count(tokenizer.eos_token_id) == 2
    assert tokenizer.decode(caption) == "<s>A red circle.</s>" and tokenizer.decode(chat) == text
    assert chat == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert tiny.without_specials(tokenizer, text).startswith(tiny.VICUNA_SYSTEM) and "<s>" not in tiny.without_specials(
        tokenizer, text
    )


def test_corpus_tokenizer_learns_only_from_the_training_images():
    zebra = ImageContext(nsd_id=11, captions=("A zebra zebra zebra beside a zebra.",), objects=())
    corpus = tiny.build_corpus([CIRCLE], [zebra], vocab_size=4096, seed=0)
    assert set(corpus.train) == set(corpus.heldout) == {"captions", "conversations"}
    assert (len(corpus.train["captions"]), len(corpus.train["conversations"])) == (2, 6)
    assert (len(corpus.heldout["captions"]), len(corpus.heldout["conversations"])) == (1, 5)
    training_text = "".join(corpus.tokenizer.decode(d) for d in corpus.training_documents())
    assert "zebra" not in training_text and "circle" in training_text
    # A held-out word, however frequent there, got no merge; a training word did.
    assert len(corpus.tokenizer.tokenize(" zebra")) > 1 and len(corpus.tokenizer.tokenize(" circle")) == 1


# Perplexity ---------------------------------------------------------------------------------------


class _ConstantLogits(torch.nn.Module):
    """Logits of zero over `vocab` tokens at every position: a uniform model, perplexity exactly `vocab`."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    docs = [[1, 2, 3], [4, 5], [1, 2, 3, 4, 5, 6, 7], [9]]  # the last has nothing to predict
    assert tiny.perplexity(_ConstantLogits(10), docs, batch_size=2) == pytest.approx(10.0, rel=1e-6)  # float32 CE
    with pytest.raises(ValueError, match="at least one document"):
        tiny.perplexity(_ConstantLogits(10), [[3]])


def test_perplexity_matches_the_models_own_loss_whatever_the_padding(tokenizer):
    model = tiny.build_llm(tokenizer=tokenizer, seed=0)
    docs = tiny.tokenize_documents(tokenizer, [*CIRCLE.captions, "A small green triangle."], [])["captions"]
    total = 0.0
    with torch.no_grad():
        for doc in docs:  # transformers' shifted mean cross-entropy, one unpadded document at a time
            ids = torch.tensor([doc])
            total += float(model(input_ids=ids, labels=ids).loss) * (len(doc) - 1)
    expected = math.exp(total / sum(len(d) - 1 for d in docs))
    for batch_size in (1, 2, 64):
        assert tiny.perplexity(model, docs, batch_size=batch_size) == pytest.approx(expected, rel=1e-4)


def test_unigram_perplexity_by_hand():
    # Counts over the predicted tokens (after each first one), add-one over 3 tokens: p = (1, 3, 1) / 5.
    assert tiny.unigram_perplexity([[0, 1, 1]], [[0, 1, 2]], vocab_size=3) == pytest.approx(1 / math.sqrt(0.6 * 0.2))


# Training -----------------------------------------------------------------------------------------


def test_train_llm_learns_is_deterministic_and_leaves_eval_mode(tokenizer):
    docs = tiny.tokenize_documents(tokenizer, [*CIRCLE.captions] * 8, tiny.render_conversations(
        tokenizer, _conversations(CIRCLE)))  # fmt: skip
    documents = [*docs["captions"], *docs["conversations"]]
    state = torch.random.get_rng_state()
    models, reports = [], []
    for seed in (0, 0, 1):
        model = tiny.build_llm(tokenizer=tokenizer, seed=0)
        reports.append(tiny.train_llm(model, documents, steps=40, block_size=32, batch_size=4, seed=seed))
        models.append(model)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not models[0].training and reports[0]["train_tokens"] == sum(map(len, documents))
    for key, value in models[0].state_dict().items():
        assert torch.equal(value, models[1].state_dict()[key]), key
    assert any(not torch.equal(v, models[2].state_dict()[k]) for k, v in models[0].state_dict().items())
    untrained = tiny.build_llm(tokenizer=tokenizer, seed=0)
    assert tiny.perplexity(models[0], documents) < 0.2 * tiny.perplexity(untrained, documents)
    with pytest.raises(ValueError, match="steps"):
        tiny.train_llm(untrained, documents, steps=0)


def test_pretrain_llm_reports_trained_untrained_and_unigram(tokenizer):
    triangle = ImageContext(nsd_id=8, captions=("A large red circle and a small green triangle.",), objects=())
    corpus, model, report = tiny.pretrain_llm([CIRCLE] * 3, [triangle], steps=30, seed=0)
    assert report["steps"] == 30 and (report["train_images"], report["heldout_images"]) == (3, 1)
    assert set(report["seconds"]) == {"corpus", "train"} and not model.training
    untrained = tiny.build_llm(tokenizer=corpus.tokenizer, seed=0)  # same architecture, same seed
    for kind, docs in corpus.heldout.items():
        assert report["untrained_perplexity"][kind] == pytest.approx(tiny.perplexity(untrained, docs), rel=1e-3)
        assert report["perplexity"][kind] == pytest.approx(tiny.perplexity(model, docs), rel=1e-3)
        assert report["heldout_tokens"][kind] == sum(len(d) - 1 for d in docs)


# Contexts from the raw tree -----------------------------------------------------------------------


def test_tree_contexts_equal_the_instruction_data_contexts(small_tree, tmp_path):
    """The contexts the LLM's conversations come from are those generate_conversation.py reads from a dataset
    root prepared by make_coco_annotations.py from the same tree (COCO captions and boxes only)."""
    from llava_brain.instructions import load_contexts
    from llava_brain.nsd import CocoAnnotations, StimInfo

    root = DatasetRoot(tmp_path / "root")
    make = load_script("prepare_datasets/make_coco_annotations.py")
    assert make.main(["--nsd-root", str(small_tree.root), "--dataset-root", str(root.root), "--subject", "all"]) == 0
    info = StimInfo.load(small_tree.stim_info)
    expected, _ = load_contexts(root, info.images_seen_by(info.shown_subjects())[:25].tolist())
    ids = [ctx.nsd_id for ctx in expected]
    paths = {s: small_tree.coco_annotations("instances", s) for s in ("train2017", "val2017")}
    instances = {s: CocoAnnotations.load(p, "instances") for s, p in paths.items() if p.is_file()}
    captions = {}
    for split in ("train2017", "val2017"):
        path = small_tree.coco_annotations("captions", split)
        if path.is_file():
            for coco_id, anns in CocoAnnotations.load(path, "captions").by_image.items():
                captions[coco_id] = [a["caption"] for a in sorted(anns, key=lambda a: a["id"])]
    by_nsd_id = {i: captions.get(int(info.coco_id[i]), []) for i in ids}
    ours = tiny.tree_contexts(info, ids, by_nsd_id, instances)
    assert sum(len(c.objects) for c in expected) > 0
    for mine, theirs in zip(ours, expected, strict=True):
        assert (mine.nsd_id, mine.captions) == (theirs.nsd_id, theirs.captions)
        assert [o.category for o in mine.objects] == [o.category for o in theirs.objects]
        for a, b in zip(mine.objects, theirs.objects, strict=True):
            assert a.box == pytest.approx(b.box, abs=1.5e-3)  # the root stores pixels to 2 decimals first


def test_tree_contexts_name_an_instances_file_that_lacks_an_image(small_tree):
    from llava_brain.errors import BadInputError
    from llava_brain.nsd import CocoAnnotations, StimInfo

    info = StimInfo.load(small_tree.stim_info)
    split = str(info.coco_split[0])
    coco = CocoAnnotations.load(small_tree.coco_annotations("instances", split), "instances")
    coco.images.pop(int(info.coco_id[0]))
    with pytest.raises(BadInputError, match=f"lacks image {int(info.coco_id[0])}") as err:
        tiny.tree_contexts(info, [0], {0: ["A caption."]}, {split: coco})
    assert str(coco.path) in str(err.value)
