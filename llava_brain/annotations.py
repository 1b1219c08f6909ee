"""Per-image captions and object instances of NSD images: the file formats every stage shares.

Four files under the prepared root use these formats (paths in `llava_brain.layout.DatasetRoot`):
`nsd_coco_captions.json` / `nsd_coco_instances.json` (human COCO annotations mapped onto NSD's crops)
and `nsd_captions.json` / `nsd_instances.json` (BLIP-2 captions, DETR detections).

Captions::

    {"info": {...},
     "images": {"<nsdId>": ["caption", ...], ...}}

Instances::

    {"info": {..., "box_format": BOX_FORMAT},
     "categories": [{"id": 1, "name": "person"}, ...],
     "images": {"<nsdId>": [{"category_id": 1, "category": "person", "box": [x1, y1, x2, y2],
                             "iscrowd": 0, "score": 0.97}, ...], ...}}

- Keys of "images" are decimal strings of the 0-based nsdId (the row of `imgBrick`), sorted numerically.
  Every image a stage covered has an entry, possibly an empty list.
- Captions are stripped of surrounding whitespace, in source order (COCO: annotation id order).
- Boxes are vertices in pixels of the 425 x 425 NSD image, x1 <= x2, y1 <= y2, rounded to 2 decimals.
  `iscrowd` is COCO's flag (0 for detectors); `score` is optional (detector confidence in [0, 1]).
- "info" is free-form provenance; writers put the settings that produced the file there, so that a
  rerun can tell whether an existing file is up to date.
Files are written with one line per image (greppable, diffable) and atomically.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_brain.errors import BadInputError
from llava_brain.io import read_json, write_text

BOX_FORMAT = "x1, y1, x2, y2: box vertices in pixels of the 425x425 NSD image"
BOX_DECIMALS = 2
SCORE_DECIMALS = 4


@dataclass(frozen=True)
class Captions:
    info: dict[str, Any]
    images: dict[int, list[str]]


@dataclass(frozen=True)
class Instances:
    info: dict[str, Any]
    categories: dict[int, str]
    images: dict[int, list[dict[str, Any]]]


# Writing


def write_captions(path: str | Path, captions: dict[int, list[str]], info: dict[str, Any]) -> Path:
    images = {int(k): [str(c).strip() for c in v] for k, v in captions.items()}
    return write_text(path, _dump({"info": dict(info)}, images))


def write_instances(
    path: str | Path,
    instances: dict[int, list[dict[str, Any]]],
    categories: dict[int, str],
    info: dict[str, Any],
) -> Path:
    """`instances[nsdId]` holds dicts with category_id, box (x1, y1, x2, y2), iscrowd and optionally score."""
    categories = {int(k): str(v) for k, v in categories.items()}
    images = {}
    for nsd_id, objects in instances.items():
        images[int(nsd_id)] = [_normalise_instance(obj, categories) for obj in objects]
    head = {
        "info": {**info, "box_format": BOX_FORMAT},
        "categories": [{"id": k, "name": categories[k]} for k in sorted(categories)],
    }
    return write_text(path, _dump(head, images))


def _normalise_instance(obj: dict[str, Any], categories: dict[int, str]) -> dict[str, Any]:
    category_id = int(obj["category_id"])
    if category_id not in categories:
        raise ValueError(f"category_id {category_id} is not among the categories {sorted(categories)}")
    out = {
        "category_id": category_id,
        "category": categories[category_id],
        "box": [round(float(v), BOX_DECIMALS) for v in obj["box"]],
        "iscrowd": int(obj.get("iscrowd", 0)),
    }
    if obj.get("score") is not None:
        out["score"] = round(float(obj["score"]), SCORE_DECIMALS)
    return out


def _dump(head: dict[str, Any], images: dict[int, Any]) -> str:
    """JSON with `head`'s keys first, then "images" with one line per image, keys sorted numerically."""
    lines = ["{"]
    lines += [f"  {json.dumps(key)}: {_json(value)}," for key, value in head.items()]
    rows = [f'    "{k}": {_json(images[k])}' for k in sorted(images)]
    lines.append('  "images": {' + ("\n" + ",\n".join(rows) + "\n  " if rows else "") + "}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _json(value: Any) -> str:
    # allow_nan=False: NaN/inf are not JSON and the readers reject them, so refuse to write them.
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


# Reading


def load_captions(path: str | Path) -> Captions:
    path = Path(path)
    data = _read_top(path, "captions", ("info", "images"))
    images = {}
    for nsd_id, key, captions in _image_entries(path, data["images"]):
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise BadInputError(path, f'images["{key}"] must be a list of caption strings; found {captions!r:.80}')
        images[nsd_id] = captions
    return Captions(info=data["info"], images=images)


def load_instances(path: str | Path) -> Instances:
    path = Path(path)
    data = _read_top(path, "instances", ("info", "categories", "images"))
    categories = _read_categories(path, data["categories"])
    images = {}
    for nsd_id, key, objects in _image_entries(path, data["images"]):
        if not isinstance(objects, list):
            raise BadInputError(path, f'images["{key}"] must be a list of instances; found {type(objects).__name__}')
        images[nsd_id] = [_check_instance(path, key, i, obj, categories) for i, obj in enumerate(objects)]
    return Instances(info=data["info"], categories=categories, images=images)


def read_captions(path: str | Path) -> dict[int, list[str]]:
    """nsdId -> captions, validated (BadInputError naming the file on any deviation from the format)."""
    return load_captions(path).images


def read_instances(path: str | Path) -> dict[int, list[dict[str, Any]]]:
    """nsdId -> instances (category_id, category, box, iscrowd[, score]), validated."""
    return load_instances(path).images


def read_info(path: str | Path) -> dict[str, Any]:
    """The "info" block of a captions or instances file (without validating the images)."""
    path = Path(path)
    data = read_json(path, "an NSD captions or instances file")
    if not isinstance(data, dict) or not isinstance(data.get("info"), dict):
        raise BadInputError(path, 'expected a JSON object with an "info" object')
    return data["info"]


def _read_top(path: Path, kind: str, keys: tuple[str, ...]) -> dict[str, Any]:
    data = read_json(path, f"NSD {kind} keyed by nsdId")
    if not isinstance(data, dict) or any(k not in data for k in keys):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise BadInputError(path, f"NSD {kind} file must be an object with keys {list(keys)}; found {found}")
    if not isinstance(data["info"], dict) or not isinstance(data["images"], dict):
        raise BadInputError(path, '"info" and "images" must be JSON objects')
    return data


def _image_entries(path: Path, images: dict[str, Any]):
    """(nsdId, key, value) for each entry, sorted by nsdId; keys must be canonical decimal integers."""
    entries = []
    for key, value in images.items():
        if not (key.isdigit() and key.isascii() and str(int(key)) == key):
            raise BadInputError(path, f'keys of "images" must be 0-based nsdIds in decimal (e.g. "42"); found {key!r}')
        entries.append((int(key), key, value))
    return sorted(entries, key=lambda entry: entry[0])


def _read_categories(path: Path, categories: Any) -> dict[int, str]:
    out: dict[int, str] = {}
    if not isinstance(categories, list):
        raise BadInputError(path, '"categories" must be a list of {"id": int, "name": str}')
    for entry in categories:
        ok = isinstance(entry, dict) and _is_int(entry.get("id")) and isinstance(entry.get("name"), str)
        if not ok or entry["id"] in out:
            raise BadInputError(path, f'"categories" needs unique {{"id": int, "name": str}} entries; found {entry!r}')
        out[entry["id"]] = entry["name"]
    return out


def _check_instance(path: Path, key: str, index: int, obj: Any, categories: dict[int, str]) -> dict[str, Any]:
    where = f'images["{key}"][{index}]'
    if not isinstance(obj, dict) or any(k not in obj for k in ("category_id", "category", "box", "iscrowd")):
        raise BadInputError(path, f"{where} must have category_id, category, box, iscrowd; found {obj!r:.80}")
    category_id = obj["category_id"]
    if not _is_int(category_id) or categories.get(category_id) != obj["category"]:
        raise BadInputError(
            path, f"{where}: category {category_id!r} {obj['category']!r} does not match the categories list"
        )
    box = obj["box"]
    if not (isinstance(box, list) and len(box) == 4 and all(_is_finite(v) for v in box)):
        raise BadInputError(path, f"{where}: box must be 4 finite numbers [x1, y1, x2, y2]; found {box!r}")
    if box[2] < box[0] or box[3] < box[1]:
        raise BadInputError(path, f"{where}: box must have x1 <= x2 and y1 <= y2 ({BOX_FORMAT}); found {box}")
    if obj["iscrowd"] not in (0, 1) or isinstance(obj["iscrowd"], bool):
        raise BadInputError(path, f"{where}: iscrowd must be 0 or 1; found {obj['iscrowd']!r}")
    if "score" in obj and not (_is_finite(obj["score"]) and 0.0 <= obj["score"] <= 1.0):
        raise BadInputError(path, f"{where}: score must be a number in [0, 1]; found {obj['score']!r}")
    return obj


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
