"""The offline template backend: free, deterministic conversations built from the same context an LLM sees.

Each image's answers are drawn by a generator seeded with (seed, nsdId, prompt type), so a run is
reproducible whatever the order, and every image gets a valid record, even one without captions or
objects. Records carry `"model": TEMPLATE_MODEL`.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from llava_brain.instructions.answers import to_turns
from llava_brain.instructions.context import ImageContext, ImageObject
from llava_brain.instructions.phrases import (
    ABSENT_CANDIDATES,
    CAUTIONS,
    NUMBER_WORDS,
    SETTINGS,
    box_area,
    caption_colours,
    count_phrase,
    join_words,
    lower_first,
    mentions,
    plural,
    region,
    sentence,
    size_word,
    words_of,
)
from llava_brain.instructions.prompts import check_prompt_type, image_rng, pick_question

# The template backend's "model": bump when the templates change, so old and new records are told apart.
TEMPLATE_MODEL = "template-v1"


@dataclass
class _Facts:
    """What the templates say about one image, derived from its context."""

    ctx: ImageContext
    counts: dict[str, int]  # category -> number of boxes, most frequent first
    first: dict[str, ImageObject]  # category -> its largest box
    colours: dict[str, str]
    caption_words: set[str]

    @classmethod
    def of(cls, ctx: ImageContext) -> _Facts:
        counter = Counter(o.category for o in ctx.objects)
        counts = dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))
        largest: dict[str, ImageObject] = {}
        for obj in ctx.objects:
            if obj.category not in largest or box_area(obj.box) > box_area(largest[obj.category].box):
                largest[obj.category] = obj
        words = {w for c in ctx.captions for w in words_of(c)}
        return cls(ctx, counts, largest, caption_colours(ctx.captions, list(counts)), words)

    @property
    def main_caption(self) -> str | None:
        return self.ctx.captions[0] if self.ctx.captions else None

    def inventory(self) -> str:
        return join_words([count_phrase(c, n) for c, n in self.counts.items()])


def _overview(f: _Facts, rng: random.Random):
    if not f.main_caption:
        return None
    question = rng.choice(["What is happening in this image?", "What do you see in this picture?",
                           "Can you briefly describe the scene?", "What does this image show?"])  # fmt: skip
    return question, sentence(f.main_caption)


def _count(f: _Facts, rng: random.Random):
    if not f.counts:
        return None
    category = rng.choice(list(f.counts))
    n = f.counts[category]
    verb = "is" if n == 1 else "are"
    return (
        f"How many {plural(category)} are there in the image?",
        f"There {verb} {count_phrase(category, n)} in the image.",
    )


def _location(f: _Facts, rng: random.Random):
    if not f.counts:
        return None
    category = rng.choice(list(f.counts))
    places = [region(o.box) for o in f.ctx.objects if o.category == category]
    if len(places) == 1:
        return f"Where is the {category} in the image?", f"The {category} is at the {places[0]} of the image."
    spots = Counter(places)
    parts = [f"{NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else n} at the {p}" for p, n in spots.most_common()]
    answer = f"There are {count_phrase(category, len(places))}: {join_words(parts)} of the image."
    return f"Where are the {plural(category)} located?", answer


def _colour(f: _Facts, rng: random.Random):
    if not f.colours:
        return None
    category = rng.choice(sorted(f.colours))
    colour = "gray" if f.colours[category] == "grey" else f.colours[category]
    if category == "person":
        return "What color is the person wearing?", f"The person is wearing {colour}."
    return f"What color is the {category}?", f"The {category} is {colour}."


def _objects(f: _Facts, rng: random.Random):
    if not f.counts:
        return None
    question = rng.choice(["What objects can be seen in the image?", "Which objects are visible in this picture?"])
    return question, f"The image shows {f.inventory()}."


def _relation(f: _Facts, rng: random.Random):
    pairs = []
    categories = [c for c, n in f.counts.items() if n == 1]
    for a in categories:
        for b in categories:
            ca, cb = f.first[a].box, f.first[b].box
            if a != b and abs((ca[0] + ca[2]) - (cb[0] + cb[2])) / 2 > 0.15:
                pairs.append((a, b))
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    side = "left" if f.first[a].box[0] + f.first[a].box[2] < f.first[b].box[0] + f.first[b].box[2] else "right"
    return f"Is the {a} to the left or to the right of the {b}?", f"The {a} is to the {side} of the {b}."


def _size(f: _Facts, rng: random.Random):
    if not f.counts:
        return None
    category = rng.choice(list(f.counts))
    box = f.first[category].box
    percent = max(1, round(100 * box_area(box)))
    article = "The" if f.counts[category] == 1 else "The largest"
    answer = f"{article} {category} is {size_word(box)}, taking up about {percent}% of the image."
    return f"How big does the {category} appear in the image?", answer


def _absent(f: _Facts, rng: random.Random):
    present = set(f.counts)
    candidates = [c for c in ABSENT_CANDIDATES if c not in present and not mentions(sorted(f.caption_words), c)]
    if not candidates or not f.ctx.objects:
        return None
    category = rng.choice(candidates)
    article = "an" if category[0] in "aeiou" else "a"
    return f"Is there {article} {category} in the image?", f"No, there is no {category} in the image."


_CONVERSATION_TURNS = (_count, _location, _colour, _objects, _relation, _size, _absent)
_FALLBACK = ("What does this image show?", "The image shows a scene whose details are hard to make out.")


def _template_conversation(f: _Facts, rng: random.Random) -> list[tuple[str, str]]:
    pairs = [p for p in [_overview(f, rng)] if p]
    others = [p for make in _CONVERSATION_TURNS if (p := make(f, rng))]
    rng.shuffle(others)
    pairs += others[: max(0, rng.randint(3, 5) - len(pairs))]
    return pairs or [_FALLBACK]


def _template_detail(f: _Facts, rng: random.Random, question: str) -> list[tuple[str, str]]:
    sentences = [sentence(f.main_caption)] if f.main_caption else []
    if f.counts:
        single = sum(f.counts.values()) == 1
        opener = rng.choice(["The scene contains", f"In the image there {'is' if single else 'are'}",
                             "Visible in the picture: "])  # fmt: skip
        sentences.append(f"{opener.rstrip()} {f.inventory()}.")
    for category in list(f.counts)[:3]:
        box = f.first[category].box
        colour = f.colours.get(category)
        noun = f"{colour} {category}" if colour and category != "person" else category
        sentences.append(f"A {size_word(box)} {noun} appears at the {region(box)} of the frame.")
    if len(f.ctx.captions) > 1:
        opener = rng.choice(["The scene could also be described as", "In other words, it shows"])
        sentences.append(f"{opener} {lower_first(f.ctx.captions[1])}.")
    answer = " ".join(sentences) or _FALLBACK[1]
    return [(question, answer)]


def _setting(f: _Facts) -> str | None:
    for categories, place in SETTINGS:
        if any(c in f.counts for c in categories):
            return place
    return None


def _template_reasoning(f: _Facts, rng: random.Random) -> list[tuple[str, str]]:
    evidence = f"The image shows {f.inventory()}" if f.counts else "The image shows the scene described"
    scene = f", and overall it depicts {lower_first(f.main_caption)}" if f.main_caption else ""
    options = []
    if place := _setting(f):
        options.append(("Where might this scene take place, and what suggests it?",
                        f"{evidence}{scene}. Objects like these are typical of {place}, so the scene most likely "
                        f"takes place there."))  # fmt: skip
    cautions = [CAUTIONS[c] for c in f.counts if c in CAUTIONS]
    if cautions:
        options.append(("What should someone in this scene be careful about?",
                        f"{evidence}{scene}. Given what is present, a person here should be careful about "
                        f"{join_words(cautions[:2])}."))  # fmt: skip
    if "person" in f.counts:
        n = f.counts["person"]
        who = "the person" if n == 1 else "the people"
        purpose = f"{lower_first(f.main_caption)}" if f.main_caption else "an everyday activity"
        options.append((f"What is {who} in the image likely doing, and why?",
                        f"{evidence}. Judging from the scene, {who} {'is' if n == 1 else 'are'} most likely "
                        f"taking part in what the image shows: {purpose}. The surrounding objects support this, "
                        f"as they are what such an activity needs."))  # fmt: skip
    if not options:
        options.append(("What can you infer about the situation in this image?",
                        f"{evidence}{scene}. Nothing in it looks unusual, which suggests an ordinary, everyday "
                        f"moment captured as it happened."))  # fmt: skip
    return [rng.choice(options)]


def template_conversation(
    ctx: ImageContext, prompt_type: str, seed: int, detail_questions: Sequence[str]
) -> list[dict[str, str]]:
    """Offline conversation of one image: deterministic in (ctx, prompt_type, seed), valid for every image."""
    check_prompt_type(prompt_type)
    facts = _Facts.of(ctx)
    rng = image_rng(seed, ctx.nsd_id, f"template:{prompt_type}")
    if prompt_type == "conversation":
        pairs = _template_conversation(facts, rng)
    elif prompt_type == "detail_description":
        pairs = _template_detail(facts, rng, pick_question(detail_questions, ctx.nsd_id, seed))
    else:
        pairs = _template_reasoning(facts, rng)
    return to_turns(pairs)
