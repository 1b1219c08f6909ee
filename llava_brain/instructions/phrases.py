"""The words of the offline template backend: colour, plural and synonym lists, settings and cautions by object,
and the small phrase helpers (counts, positions, sizes) its sentences are built from."""

from __future__ import annotations

import re
from collections.abc import Sequence

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


def count_phrase(category: str, count: int) -> str:
    number = NUMBER_WORDS[count] if count < len(NUMBER_WORDS) else str(count)
    if count == 1:
        return f"{'an' if category[0] in 'aeiou' else 'a'} {category}"
    return f"{number} {plural(category, count)}"


def join_words(items: Sequence[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def sentence(text: str) -> str:
    text = text.strip().rstrip(".!")
    return text[:1].upper() + text[1:] + "."


def lower_first(text: str) -> str:
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


def words_of(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def mentions(words: Sequence[str], category: str) -> list[int]:
    """Word positions where a caption names `category` (its last word, plural or a common synonym)."""
    names = set(SYNONYMS.get(category, ()))
    head = category.split()[-1]
    names |= {head, plural(head)}
    return [i for i, w in enumerate(words) if w in names]


def caption_colours(captions: Sequence[str], categories: Sequence[str]) -> dict[str, str]:
    """category -> a colour word the captions put right before it ('a red fire hydrant')."""
    found: dict[str, str] = {}
    for caption in captions:
        words = words_of(caption)
        for category in categories:
            for i in mentions(words, category):
                before = [w for w in words[max(0, i - 3) : i] if w in COLOURS]
                if before and category not in found:
                    found[category] = before[-1]
    return found


def box_area(box: Sequence[float]) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])
