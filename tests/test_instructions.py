"""The pieces of llava_brain.instructions: the answer protocol, the retry policy, contexts and templates."""

from __future__ import annotations

import pytest

from llava_brain.instructions import (
    ImageContext,
    ImageObject,
    MalformedAnswer,
    RetryPolicy,
    answer_to_conversation,
    normalise_box,
    parse_qa,
    region,
    retry_after_seconds,
    template_conversation,
)


def test_parse_qa_is_strict():
    text = "Question:\nWhat is it?\n===\nAnswer:\nA dog.\n===\nQuestion: Where?\nAnswer:\nOn the left.\n  more\n"
    assert parse_qa(text) == [("What is it?", "A dog."), ("Where?", "On the left.\n  more")]
    bad = [
        "",
        "Sure! Here is the conversation.\nQuestion: a?\nAnswer: b",
        "Answer: b",
        "Question: a?\n===\nQuestion: b?\nAnswer: c",
        "Question: a?\n===\nAnswer:\n===\n",
        "Question: a?",
    ]
    for text in bad:
        with pytest.raises(MalformedAnswer):
            parse_qa(text)
    with pytest.raises(MalformedAnswer):
        answer_to_conversation("complex_reasoning", "Question: a?\nAnswer: b\nQuestion: c?\nAnswer: d")
    with pytest.raises(MalformedAnswer):
        answer_to_conversation("detail_description", "  \n", "Describe it.")
    assert answer_to_conversation("detail_description", " A dog. ", "Describe it.") == [
        {"from": "human", "value": "Describe it."},
        {"from": "gpt", "value": "A dog."},
    ]


def test_retry_policy_full_jitter_and_retry_after():
    policy = RetryPolicy(max_retries=6, base_delay=1.0, max_delay=8.0)
    delays = [policy.delay(attempt) for attempt in range(6) for _ in range(50)]
    assert all(0 <= d <= 8.0 for d in delays) and max(delays) > 4  # grows, capped
    assert all(policy.delay(0) <= 1.0 for _ in range(50))
    assert policy.delay(3, retry_after=0.1) == 0.1
    assert policy.delay(3, retry_after=3600) == 8.0
    assert retry_after_seconds({"retry-after": "0.1"}) == 0.1
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None
    assert retry_after_seconds({}) is None


def test_context_and_template_pieces():
    assert normalise_box([0, 42.5, 212.5, 425]) == (0.0, 0.1, 0.5, 1.0)
    assert region((0.0, 0.0, 0.2, 0.2)) == "top left" and region((0.4, 0.4, 0.6, 0.6)) == "center"
    ctx = ImageContext(5, ("A red car next to a man.",), (ImageObject("car", (0.1, 0.5, 0.3, 0.9)),))
    assert ctx.text() == "A red car next to a man.\ncar: [0.100, 0.500, 0.300, 0.900]"
    bare = ImageContext(6, (), ())
    for prompt_type in ("conversation", "detail_description", "complex_reasoning"):
        for c in (ctx, bare):
            turns = template_conversation(c, prompt_type, 0, ["Describe it."])
            assert turns == template_conversation(c, prompt_type, 0, ["Describe it."])
            assert turns and all(t["value"].strip() for t in turns)
