"""LLaVA-style instruction data about NSD images: context, prompts, answer protocol, templates, retries.

What `prepare_datasets/generate_conversation.py` needs, kept apart from the script's orchestration:

- context: the text an LLM sees instead of the image, as in LLaVA's COCO instruction data: the
  captions (COCO's human captions first, then BLIP-2's), then one line per object,
  `category: [x1, y1, x2, y2]` with the box normalised to [0, 1] by the image size;
- prompts: the system prompts and the detail-description questions under `data/prompts/`;
- the answer protocol: the model writes `Question:` / `Answer:` blocks separated by `===` lines
  (LLaVA's format); `parse_qa` validates it strictly (alternating non-empty turns, >= 1 pair);
- the template backend: offline, free, deterministic conversations built from the same context;
- the retry policy and the per-image request loop of the OpenAI backend, with a request/token
  budget shared by all concurrent requests.

A record (one JSON line per image in `nsd_gpt_conversation/<prompt_type>.jsonl`)::

    {"nsd_id": 42, "prompt_type": "conversation",
     "conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}, ...],
     "backend": "openai", "model": "gpt-3.5-turbo-0125"}

No `<image>` token: the SFT stage adds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_brain.annotations import read_captions, read_instances
from llava_brain.errors import BadInputError
from llava_brain.io import read_json
from llava_brain.layout import DatasetRoot
from llava_brain.nsd.constants import IMAGE_SIZE

log = logging.getLogger(__name__)

PROMPT_TYPES = ("conversation", "detail_description", "complex_reasoning")
PROMPTS_DIR = Path(__file__).resolve().parent.parent / "data" / "prompts"
PREAMBLE_FILE = "context_preamble.txt"
DETAIL_QUESTIONS_FILE = "detail_description_questions.txt"
# The template backend's "model": bump when the templates change, so old and new records are told apart.
TEMPLATE_MODEL = "template-v1"
BOX_DECIMALS = 3  # LLaVA's COCO contexts print normalised boxes with 3 decimals
# A DETR box this close to a human COCO box of the same category is the same object seen twice.
DUPLICATE_IOU = 0.5
COCO_CAPTIONS_WHAT = "COCO captions keyed by nsdId (written by prepare_datasets/make_coco_annotations.py)"


# Context -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageObject:
    category: str
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 as fractions of the image side


@dataclass(frozen=True)
class ImageContext:
    nsd_id: int
    captions: tuple[str, ...]  # human COCO captions first, then BLIP-2's (duplicates dropped)
    objects: tuple[ImageObject, ...]

    def text(self) -> str:
        """What the LLM sees instead of the image: captions, then `category: [x1, y1, x2, y2]` lines."""
        lines = list(self.captions)
        lines += [f"{o.category}: [{', '.join(f'{v:.{BOX_DECIMALS}f}' for v in o.box)}]" for o in self.objects]
        return "\n".join(lines)


def normalise_box(box: Sequence[float], image_size: int = IMAGE_SIZE) -> tuple[float, float, float, float]:
    """Pixel vertices of the 425 x 425 NSD image -> fractions in [0, 1], rounded as LLaVA printed them."""
    return tuple(round(min(max(float(v) / image_size, 0.0), 1.0), BOX_DECIMALS) for v in box)


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    width, height = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    inter = max(width, 0.0) * max(height, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def merge_objects(human: Sequence[dict], detected: Sequence[dict]) -> list[ImageObject]:
    """COCO's human boxes, then the detector's boxes that do not duplicate a human box of the same category.

    The paper feeds DETR boxes (NSD crops break some COCO boxes); where both exist, human boxes win.
    Detected objects are ordered by score (most confident first), as a detector lists them.
    """
    kept = [dict(obj) for obj in human]
    by_score = sorted(detected, key=lambda obj: -float(obj.get("score", 1.0)))
    for obj in by_score:
        same = (k for k in kept if k["category"] == obj["category"])
        if all(_iou(obj["box"], k["box"]) < DUPLICATE_IOU for k in same):
            kept.append(dict(obj))
    return [ImageObject(str(obj["category"]), normalise_box(obj["box"])) for obj in kept]


def _unique_captions(*sources: Sequence[str]) -> list[str]:
    seen, out = set(), []
    for captions in sources:
        for caption in captions:
            text = " ".join(caption.split())
            key = text.lower().rstrip(".")
            if text and key not in seen:
                seen.add(key)
                out.append(text)
    return out


@dataclass(frozen=True)
class ContextSources:
    """The annotation files a run read (absent optional files are None)."""

    coco_captions: Path
    captions: Path | None
    instances: Path | None
    coco_instances: Path | None

    def used(self) -> list[str]:
        return [str(p) for p in (self.coco_captions, self.captions, self.instances, self.coco_instances) if p]


def load_contexts(layout: DatasetRoot, nsd_ids: Sequence[int]) -> tuple[list[ImageContext], ContextSources]:
    """Contexts of `nsd_ids` from the annotation files; nsd_coco_captions.json is required, the rest optional.

    A selected image absent from nsd_coco_captions.json is an error (the file is stale); absent from
    an optional file it just gets no captions/objects from that file (counted in the log).
    """
    coco_captions = read_captions(_required(layout.coco_captions, COCO_CAPTIONS_WHAT))
    missing = [i for i in nsd_ids if i not in coco_captions]
    if missing:
        raise BadInputError(
            layout.coco_captions,
            f"has no entry for {len(missing)} selected images (first: nsdId {missing[0]}); rerun "
            "make_coco_annotations.py for the same subjects",
        )
    blip = read_captions(layout.captions) if layout.captions.is_file() else None
    detr = read_instances(layout.instances) if layout.instances.is_file() else None
    coco_instances = read_instances(layout.coco_instances) if layout.coco_instances.is_file() else None
    sources = ContextSources(
        layout.coco_captions,
        layout.captions if blip is not None else None,
        layout.instances if detr is not None else None,
        layout.coco_instances if coco_instances is not None else None,
    )
    for name, table in (("BLIP-2 captions", blip), ("DETR instances", detr), ("COCO instances", coco_instances)):
        if table is None:
            log.info("no %s file; contexts go without them", name)
        elif uncovered := sum(1 for i in nsd_ids if i not in table):
            log.warning("%s lack %d of the %d selected images; those go without them", name, uncovered, len(nsd_ids))
    contexts = []
    for nsd_id in nsd_ids:
        human = coco_captions[nsd_id]
        captions = _unique_captions(human, (blip or {}).get(nsd_id, []))
        objects = merge_objects((coco_instances or {}).get(nsd_id, []), (detr or {}).get(nsd_id, []))
        contexts.append(ImageContext(int(nsd_id), tuple(captions), tuple(objects)))
    return contexts, sources


def _required(path: Path, what: str) -> Path:
    if not path.is_file():
        raise BadInputError(path, f"missing; expected {what}")
    return path


# Selection -----------------------------------------------------------------------------------


def select_images(layout: DatasetRoot, subjects: Sequence[int | str] | None, all_images: bool) -> list[int]:
    """Sorted nsdIds: the train + val images of prepared subjects (["all"] = every one under nsd/fmris/),
    or with `all_images` every image of nsd_coco_captions.json."""
    if all_images:
        path = _required(layout.coco_captions, COCO_CAPTIONS_WHAT)
        return sorted(read_captions(path))
    fmris = layout.nsd / "fmris"
    if not subjects or list(subjects) == ["all"]:
        found = sorted(int(p.name[4:]) for p in fmris.glob("subj[0-9][0-9]") if p.is_dir()) if fmris.is_dir() else []
        if not found:
            raise BadInputError(fmris, "holds no prepared subject; run make_subjmri.py first or pass --all-images")
        subjects = found
    ids: set[int] = set()
    for subject in subjects:
        mapping = read_json(layout.fmri2image(int(subject)), "nsd_fmri2image.json of a prepared subject")
        if not isinstance(mapping, dict):
            raise BadInputError(layout.fmri2image(int(subject)), 'expected an object with "train" and "val" lists')
        ids.update(int(i) for key in ("train", "val") for i in mapping.get(key, []))
    return sorted(ids)


# Prompts -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompts:
    system: str  # the system prompt of one prompt type, preamble filled in
    detail_questions: tuple[str, ...]

    @property
    def sha256(self) -> str:
        """Fingerprint of everything sent besides the context (goes into the run manifest)."""
        text = self.system + "\n".join(self.detail_questions)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_prompts(prompt_type: str, prompts_dir: Path = PROMPTS_DIR) -> Prompts:
    if prompt_type not in PROMPT_TYPES:
        raise ValueError(f"Unknown prompt type {prompt_type!r}; choose from {list(PROMPT_TYPES)}")
    preamble = _read_prompt(prompts_dir / PREAMBLE_FILE).strip()
    system = _read_prompt(prompts_dir / f"{prompt_type}.txt").replace("{preamble}", preamble).strip()
    questions = [q.strip() for q in _read_prompt(prompts_dir / DETAIL_QUESTIONS_FILE).splitlines() if q.strip()]
    if not questions:
        raise BadInputError(prompts_dir / DETAIL_QUESTIONS_FILE, "holds no question (one per line expected)")
    return Prompts(system, tuple(questions))


def _read_prompt(path: Path) -> str:
    _required(path, "a prompt text file (data/prompts/)")
    return path.read_text(encoding="utf-8")


def image_rng(seed: int, nsd_id: int, purpose: str) -> random.Random:
    """A generator fixed by (seed, image, purpose): same draws whatever the order or process (str seeds are
    hashed with SHA-512 by `random`, so PYTHONHASHSEED does not matter)."""
    return random.Random(f"{seed}:{nsd_id}:{purpose}")


def pick_question(questions: Sequence[str], nsd_id: int, seed: int) -> str:
    """The detail-description question of an image, drawn from the list as LLaVA did, but reproducibly."""
    return image_rng(seed, nsd_id, "detail_question").choice(list(questions))


# Answer protocol -----------------------------------------------------------------------------


class MalformedAnswer(ValueError):
    """The model's text does not follow the output protocol of the prompt (the request is retried)."""


_SEPARATOR = re.compile(r"^\s*=+\s*$")
_MARKER = re.compile(r"^\s*(Question|Answer)\s*:\s*", re.IGNORECASE)


def parse_qa(text: str) -> list[tuple[str, str]]:
    """(question, answer) pairs of a `Question:` / `===` / `Answer:` reply; MalformedAnswer on any deviation.

    Strict: nothing but separators before the first `Question:`, turns alternate Question/Answer and
    end on an Answer, every turn has text. Separator lines are optional between turns (models drop them).
    """
    turns: list[list[str]] = []  # [role, lines...]
    for line in (text or "").splitlines():
        if _SEPARATOR.match(line):
            continue
        marker = _MARKER.match(line)
        if marker:
            turns.append([marker.group(1).lower(), line[marker.end() :]])
        elif turns:
            turns[-1].append(line)
        elif line.strip():
            raise MalformedAnswer(f"text before the first 'Question:': {line.strip()[:60]!r}")
    if not turns:
        raise MalformedAnswer("no 'Question:' / 'Answer:' blocks")
    pairs = []
    for i, (role, *lines) in enumerate(turns):
        expected = "question" if i % 2 == 0 else "answer"
        if role != expected:
            raise MalformedAnswer(f"turn {i + 1} is {role!r}, expected {expected!r} (turns must alternate)")
        body = "\n".join(lines).strip()
        if not body:
            raise MalformedAnswer(f"turn {i + 1} ({role}) is empty")
        if role == "question":
            pairs.append([body])
        else:
            pairs[-1].append(body)
    if len(pairs[-1]) != 2:
        raise MalformedAnswer("the last question has no answer")
    return [(q, a) for q, a in pairs]


def to_turns(pairs: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    turns = []
    for question, answer in pairs:
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return turns


def answer_to_conversation(prompt_type: str, text: str, question: str | None = None) -> list[dict[str, str]]:
    """The conversation of one image from the model's reply; MalformedAnswer if the reply breaks the protocol.

    conversation: >= 1 Q/A pair; complex_reasoning: exactly one pair; detail_description: the whole
    reply is the answer to `question` (ours, drawn from the list).
    """
    if prompt_type == "conversation":
        return to_turns(parse_qa(text))
    if prompt_type == "complex_reasoning":
        pairs = parse_qa(text)
        if len(pairs) != 1:
            raise MalformedAnswer(f"expected one question and its answer, got {len(pairs)} pairs")
        return to_turns(pairs)
    if prompt_type == "detail_description":
        answer = (text or "").strip()
        if not answer:
            raise MalformedAnswer("empty description")
        if question is None:
            raise ValueError("detail_description needs the question the description answers")
        return to_turns([(question, answer)])
    raise ValueError(f"Unknown prompt type {prompt_type!r}; choose from {list(PROMPT_TYPES)}")


def make_record(nsd_id: int, prompt_type: str, turns: list[dict[str, str]], backend: str, model: str) -> dict:
    return {"nsd_id": int(nsd_id), "prompt_type": prompt_type, "conversations": turns, "backend": backend,
            "model": model}  # fmt: skip


# Template backend ----------------------------------------------------------------------------

COLOURS = ("black", "white", "red", "green", "blue", "yellow", "orange", "pink", "purple", "brown", "gray", "grey",
           "silver", "gold", "tan", "beige")  # fmt: skip
# Caption words that name a COCO category other than by its name (COCO's most frequent synonyms).
SYNONYMS = {
    "person": ("man", "men", "woman", "women", "people", "person", "persons", "boy", "boys", "girl", "girls",
               "child", "children", "kid", "kids", "guy", "guys", "lady", "ladies", "player", "players", "skier",
               "surfer", "skateboarder", "rider"),
    "dining table": ("table", "tables"),
    "tv": ("tv", "television", "tvs"),
    "couch": ("couch", "sofa"),
    "cell phone": ("phone", "cellphone", "phones"),
    "motorcycle": ("motorcycle", "motorbike", "motorcycles"),
    "airplane": ("airplane", "plane", "jet", "airplanes", "planes"),
}  # fmt: skip
IRREGULAR_PLURALS = {"person": "people", "mouse": "mice", "sheep": "sheep", "knife": "knives", "skis": "skis",
                     "scissors": "scissors", "wine glass": "wine glasses", "bus": "buses"}  # fmt: skip
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
# Objects whose presence hints at the setting, for the complex-reasoning templates.
SETTINGS = (
    (("car", "bus", "truck", "traffic light", "stop sign", "motorcycle", "bicycle", "fire hydrant",
      "parking meter"), "a street or road in a town or city"),
    (("train",), "a railway line or station"),
    (("airplane",), "an airport or the sky above one"),
    (("boat",), "a harbour, river or lake"),
    (("surfboard", "kite"), "a beach or the seaside"),
    (("skis", "snowboard"), "a snowy mountain slope"),
    (("sports ball", "baseball bat", "baseball glove", "tennis racket", "frisbee", "skateboard"),
     "a sports game or outdoor leisure time"),
    (("bed",), "a bedroom"),
    (("toilet", "sink", "toothbrush", "hair drier"), "a bathroom"),
    (("oven", "microwave", "refrigerator", "toaster"), "a kitchen"),
    (("couch", "tv", "remote", "chair", "potted plant"), "a living room or another indoor space"),
    (("dining table", "cup", "fork", "knife", "spoon", "bowl", "pizza", "sandwich", "cake", "wine glass",
      "bottle", "donut", "hot dog"), "a meal or a place where food is served"),
    (("laptop", "keyboard", "mouse", "cell phone", "book"), "a home or office workspace"),
    (("horse", "cow", "sheep"), "a farm or open countryside"),
    (("elephant", "giraffe", "zebra", "bear"), "a wildlife park, zoo or savanna"),
    (("dog", "cat", "bird"), "a place shared with animals"),
)  # fmt: skip
CAUTIONS = {
    "car": "watching for moving traffic", "bus": "keeping clear of the large vehicle as it moves",
    "truck": "staying out of the driver's blind spots", "motorcycle": "wearing protective gear and watching traffic",
    "bicycle": "riding predictably and watching for cars", "traffic light": "obeying the traffic signals",
    "knife": "handling the sharp blade carefully", "oven": "avoiding burns from hot surfaces",
    "skis": "controlling speed on the slope", "snowboard": "controlling speed on the slope",
    "surfboard": "watching the waves and currents", "skateboard": "wearing a helmet and keeping balance",
    "horse": "staying calm and out of kicking range", "elephant": "keeping a respectful distance from the animal",
    "bear": "keeping a safe distance from a potentially dangerous animal", "train": "staying behind the platform edge",
    "dog": "making sure the dog is comfortable with strangers", "scissors": "handling the sharp blades carefully",
}  # fmt: skip
# Categories the negative-presence question may ask about (common enough to be a fair question).
ABSENT_CANDIDATES = ("dog", "cat", "car", "person", "bicycle", "horse", "umbrella", "clock", "chair", "bus", "bird",
                     "airplane", "laptop", "pizza", "boat")  # fmt: skip


def plural(category: str, count: int = 2) -> str:
    if count == 1:
        return category
    if category in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[category]
    if category.endswith(("s", "x", "ch", "sh")):
        return category + "es"
    if category.endswith("y") and category[-2:-1] not in "aeiou":
        return category[:-1] + "ies"
    return category + "s"


def _count_phrase(category: str, count: int) -> str:
    number = NUMBER_WORDS[count] if count < len(NUMBER_WORDS) else str(count)
    if count == 1:
        return f"{'an' if category[0] in 'aeiou' else 'a'} {category}"
    return f"{number} {plural(category, count)}"


def _join(items: Sequence[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _sentence(text: str) -> str:
    text = text.strip().rstrip(".!")
    return text[:1].upper() + text[1:] + "."


def _lower_first(text: str) -> str:
    """A caption made to continue a sentence ('A dog runs' -> 'a dog runs'); acronyms ('TV') stay."""
    text = text.strip().rstrip(".!")
    first = text.split()[0] if text.split() else ""
    return text if len(first) > 1 and first.isupper() else text[:1].lower() + text[1:]


def region(box: Sequence[float]) -> str:
    """Where a box's centre lies, by thirds of the image: 'top left', 'left side', 'center', 'bottom', ..."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    horizontal = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    vertical = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
    if horizontal and vertical:
        return f"{vertical} {horizontal}"
    if horizontal:
        return f"{horizontal} side"
    return vertical or "center"


def size_word(box: Sequence[float]) -> str:
    area = (box[2] - box[0]) * (box[3] - box[1])
    return "large" if area >= 0.3 else "medium-sized" if area >= 0.05 else "small"


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def _mentions(words: Sequence[str], category: str) -> list[int]:
    """Word positions where a caption names `category` (its last word, plural or a common synonym)."""
    names = set(SYNONYMS.get(category, ()))
    head = category.split()[-1]
    names |= {head, plural(head)}
    return [i for i, w in enumerate(words) if w in names]


def caption_colours(captions: Sequence[str], categories: Sequence[str]) -> dict[str, str]:
    """category -> a colour word the captions put right before it ('a red fire hydrant')."""
    found: dict[str, str] = {}
    for caption in captions:
        words = _words(caption)
        for category in categories:
            for i in _mentions(words, category):
                before = [w for w in words[max(0, i - 3) : i] if w in COLOURS]
                if before and category not in found:
                    found[category] = before[-1]
    return found


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
            if obj.category not in largest or _area(obj.box) > _area(largest[obj.category].box):
                largest[obj.category] = obj
        words = {w for c in ctx.captions for w in _words(c)}
        return cls(ctx, counts, largest, caption_colours(ctx.captions, list(counts)), words)

    @property
    def main_caption(self) -> str | None:
        return self.ctx.captions[0] if self.ctx.captions else None

    def inventory(self) -> str:
        return _join([_count_phrase(c, n) for c, n in self.counts.items()])


def _area(box: Sequence[float]) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


def _overview(f: _Facts, rng: random.Random):
    if not f.main_caption:
        return None
    question = rng.choice(["What is happening in this image?", "What do you see in this picture?",
                           "Can you briefly describe the scene?", "What does this image show?"])  # fmt: skip
    return question, _sentence(f.main_caption)


def _count(f: _Facts, rng: random.Random):
    if not f.counts:
        return None
    category = rng.choice(list(f.counts))
    n = f.counts[category]
    verb = "is" if n == 1 else "are"
    return (
        f"How many {plural(category)} are there in the image?",
        f"There {verb} {_count_phrase(category, n)} in the image.",
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
    answer = f"There are {_count_phrase(category, len(places))}: {_join(parts)} of the image."
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
    percent = max(1, round(100 * _area(box)))
    article = "The" if f.counts[category] == 1 else "The largest"
    answer = f"{article} {category} is {size_word(box)}, taking up about {percent}% of the image."
    return f"How big does the {category} appear in the image?", answer


def _absent(f: _Facts, rng: random.Random):
    present = set(f.counts)
    candidates = [c for c in ABSENT_CANDIDATES if c not in present and not _mentions(sorted(f.caption_words), c)]
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
    sentences = [_sentence(f.main_caption)] if f.main_caption else []
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
        sentences.append(f"{opener} {_lower_first(f.ctx.captions[1])}.")
    answer = " ".join(sentences) or _FALLBACK[1]
    return [(question, answer)]


def _setting(f: _Facts) -> str | None:
    for categories, place in SETTINGS:
        if any(c in f.counts for c in categories):
            return place
    return None


def _template_reasoning(f: _Facts, rng: random.Random) -> list[tuple[str, str]]:
    evidence = f"The image shows {f.inventory()}" if f.counts else "The image shows the scene described"
    scene = f", and overall it depicts {_lower_first(f.main_caption)}" if f.main_caption else ""
    options = []
    if place := _setting(f):
        options.append(("Where might this scene take place, and what suggests it?",
                        f"{evidence}{scene}. Objects like these are typical of {place}, so the scene most likely "
                        f"takes place there."))  # fmt: skip
    cautions = [CAUTIONS[c] for c in f.counts if c in CAUTIONS]
    if cautions:
        options.append(("What should someone in this scene be careful about?",
                        f"{evidence}{scene}. Given what is present, a person here should be careful about "
                        f"{_join(cautions[:2])}."))  # fmt: skip
    if "person" in f.counts:
        n = f.counts["person"]
        who = "the person" if n == 1 else "the people"
        purpose = f"{_lower_first(f.main_caption)}" if f.main_caption else "an everyday activity"
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
    facts = _Facts.of(ctx)
    rng = image_rng(seed, ctx.nsd_id, f"template:{prompt_type}")
    if prompt_type == "conversation":
        pairs = _template_conversation(facts, rng)
    elif prompt_type == "detail_description":
        pairs = _template_detail(facts, rng, pick_question(detail_questions, ctx.nsd_id, seed))
    elif prompt_type == "complex_reasoning":
        pairs = _template_reasoning(facts, rng)
    else:
        raise ValueError(f"Unknown prompt type {prompt_type!r}; choose from {list(PROMPT_TYPES)}")
    return to_turns(pairs)


# OpenAI backend: retry policy, budget, the per-image request loop ----------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter (AWS architecture blog), or the server's Retry-After."""

    max_retries: int = 6
    base_delay: float = 1.0  # seconds; attempt k waits U(0, min(max_delay, base_delay * 2**k))
    max_delay: float = 60.0  # seconds; also caps a server's Retry-After

    def delay(self, attempt: int, retry_after: float | None = None, rng: random.Random | None = None) -> float:
        if retry_after is not None and retry_after >= 0:
            return min(retry_after, self.max_delay)
        return (rng or random).uniform(0.0, min(self.max_delay, self.base_delay * 2**attempt))


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds a response asks the client to wait (`retry-after-ms`, OpenAI's, or `retry-after` in seconds)."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(float(value) * scale, 0.0)
        except ValueError:
            continue  # an HTTP date: fall back to our own backoff
    return None


RETRIED_STATUS = frozenset({408, 409, 429})  # plus every 5xx
# These mean every later request fails too (wrong key, no access, unknown model or URL): stop the run.
FATAL_STATUS = frozenset({401, 403, 404})


@dataclass
class ApiStats:
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retry_reasons: Counter = field(default_factory=Counter)
    failures: list[tuple[int, str]] = field(default_factory=list)  # (nsd_id, last error)

    def cost(self, price_in_per_1k: float, price_out_per_1k: float) -> float:
        return self.prompt_tokens / 1000 * price_in_per_1k + self.completion_tokens / 1000 * price_out_per_1k


class Budget:
    """Caps on requests sent and tokens used, shared by the concurrent workers of one event loop.

    A request may start only while both caps hold; once one is reached the run stops cleanly:
    requests in flight finish (their tokens may overshoot the token cap) and are stored.
    """

    def __init__(self, stats: ApiStats, max_requests: int | None = None, max_tokens: int | None = None):
        self.stats, self.max_requests, self.max_tokens = stats, max_requests, max_tokens
        self.stop_reason: str | None = None
        self.fatal = False
        self._stopped = asyncio.Event()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def stop(self, reason: str, fatal: bool = False) -> None:
        if not self.stopped:
            self.stop_reason, self.fatal = reason, fatal
            self._stopped.set()

    def acquire(self) -> bool:
        """Count one request about to be sent; False (and stop) if a cap is reached."""
        if self.stopped:
            return False
        if self.max_requests is not None and self.stats.requests >= self.max_requests:
            self.stop(f"--max-requests {self.max_requests} reached")
            return False
        used = self.stats.prompt_tokens + self.stats.completion_tokens
        if self.max_tokens is not None and used >= self.max_tokens:
            self.stop(f"--max-tokens-budget {self.max_tokens} reached ({used} tokens used)")
            return False
        self.stats.requests += 1
        return True

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds`, or less if the run stops meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), timeout=seconds)


def redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "[redacted]") if secret else text


@dataclass(frozen=True)
class RequestSettings:
    model: str
    prompt_type: str
    timeout: float
    seed: int
    policy: RetryPolicy


async def request_conversation(
    client: Any, ctx: ImageContext, prompts: Prompts, settings: RequestSettings, budget: Budget, secret: str | None
) -> list[dict[str, str]] | None:
    """The conversation of one image from the API, retried per `settings.policy`.

    Returns None when the image is not done: it failed (recorded in `budget.stats.failures`) or the
    run stopped first. Retried: 408/409/429/5xx, timeouts, connection errors and replies that break
    the protocol; 401/403/404 stop the whole run; other 4xx fail the image at once.
    """
    import openai  # the client library is needed only by this backend

    stats, policy = budget.stats, settings.policy
    question = pick_question(prompts.detail_questions, ctx.nsd_id, settings.seed)
    messages = [{"role": "system", "content": prompts.system}, {"role": "user", "content": ctx.text()}]
    error = "not attempted"
    for attempt in range(policy.max_retries + 1):
        if not budget.acquire():
            return None
        if attempt:
            stats.retries += 1
        retry_after = None
        try:
            response = await client.chat.completions.create(
                model=settings.model, messages=messages, timeout=settings.timeout, seed=settings.seed
            )
        except openai.APIStatusError as err:
            status = err.status_code
            error = f"HTTP {status} {type(err).__name__}: {redact(str(err), secret)}"
            if status in FATAL_STATUS:
                budget.stop(error, fatal=True)
                return None
            if status not in RETRIED_STATUS and status < 500:
                stats.failures.append((ctx.nsd_id, error))
                return None
            stats.retry_reasons[f"http_{status}"] += 1
            retry_after = retry_after_seconds(err.response.headers)
        except openai.APITimeoutError:
            error = f"no reply within --timeout {settings.timeout} s"
            stats.retry_reasons["timeout"] += 1
        except openai.APIConnectionError as err:
            error = f"connection error: {redact(str(err.__cause__ or err), secret)}"
            stats.retry_reasons["connection"] += 1
        except openai.APIError as err:  # e.g. a body that is not a chat completion
            error = f"unusable response: {redact(str(err), secret)}"
            stats.retry_reasons["bad_response"] += 1
        else:
            usage = getattr(response, "usage", None)
            stats.prompt_tokens += int(getattr(usage, "prompt_tokens", 0) or 0)
            stats.completion_tokens += int(getattr(usage, "completion_tokens", 0) or 0)
            try:
                content = response.choices[0].message.content
                if not isinstance(content, str):
                    raise MalformedAnswer(f"message content is {type(content).__name__}, not text")
                return answer_to_conversation(settings.prompt_type, content, question)
            except (MalformedAnswer, AttributeError, IndexError, TypeError) as err:
                error = f"malformed reply: {redact(str(err), secret)}"
                stats.retry_reasons["malformed"] += 1
        if attempt < policy.max_retries:
            log.debug("nsdId %d attempt %d: %s", ctx.nsd_id, attempt + 1, error)
            await budget.sleep(policy.delay(attempt, retry_after))
            if budget.stopped:
                return None
    stats.failures.append((ctx.nsd_id, error))
    return None
