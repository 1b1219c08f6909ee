"""COCO 2017 caption and instance annotations, and the mapping of COCO boxes onto NSD's crops.

COCO boxes are `[x, y, width, height]` in original image pixels (0-based, from the top-left).
NSD cut `cropBox` = (top, bottom, left, right) *fractions* from each side of the COCO image and
resized the square crop to 425 × 425 (docs/nsd_formats.md §1.6, §5).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llava_brain.errors import BadInputError
from llava_brain.io import read_json

_REQUIRED_ANNOTATION_KEYS = {
    "captions": ("image_id", "caption"),
    "instances": ("image_id", "category_id", "bbox"),
}


@dataclass
class CocoAnnotations:
    """One COCO annotation file, indexed by image id."""

    path: Path
    kind: str
    images: dict[int, dict]
    categories: dict[int, str]
    by_image: dict[int, list[dict]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path, kind: str) -> CocoAnnotations:
        if kind not in _REQUIRED_ANNOTATION_KEYS:
            raise ValueError(f"kind must be one of {sorted(_REQUIRED_ANNOTATION_KEYS)}, got {kind!r}")
        data = read_json(path, f"COCO {kind} annotations (images, annotations)")
        path = Path(path)
        top = ("images", "annotations", "categories") if kind == "instances" else ("images", "annotations")
        if not isinstance(data, dict) or any(k not in data for k in top):
            found = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise BadInputError(path, f"COCO {kind} file must have keys {list(top)}; found {found}")
        images = {int(im["id"]): im for im in data["images"]}
        categories = {int(c["id"]): c["name"] for c in data.get("categories", [])}
        by_image: dict[int, list[dict]] = {}
        needed = _REQUIRED_ANNOTATION_KEYS[kind]
        for i, ann in enumerate(data["annotations"]):
            missing = [k for k in needed if k not in ann]
            if missing:
                raise BadInputError(path, f"annotation {i} lacks {missing}; COCO {kind} entries need {list(needed)}")
            if kind == "instances" and len(ann["bbox"]) != 4:
                raise BadInputError(path, f"annotation {i}: bbox must be [x, y, width, height]; found {ann['bbox']}")
            by_image.setdefault(int(ann["image_id"]), []).append(ann)
        return cls(path, kind, images, categories, by_image)

    def annotations(self, image_id: int) -> list[dict]:
        return self.by_image.get(int(image_id), [])


def crop_window(image_size: tuple[int, int], crop_box) -> tuple[float, float, float, float]:
    """NSD's square crop (x1, y1, x2, y2) in COCO pixels, from (width, height) and cropBox fractions."""
    width, height = image_size
    top, bottom, left, right = (float(v) for v in crop_box)
    return left * width, top * height, (1.0 - right) * width, (1.0 - bottom) * height


def coco_box_to_nsd(
    bbox_xywh, image_size: tuple[int, int], crop_box, out_size: int = 425, min_visible: float = 0.0
) -> tuple[float, float, float, float] | None:
    """Map a COCO box into NSD image pixels as vertices (x1, y1, x2, y2); None if cropped away.

    min_visible: fraction of the box area that must stay inside the crop (0 = any overlap).
    """
    cx1, cy1, cx2, cy2 = crop_window(image_size, crop_box)
    x, y, w, h = (float(v) for v in bbox_xywh)
    x1, y1, x2, y2 = max(x, cx1), max(y, cy1), min(x + w, cx2), min(y + h, cy2)
    if x2 <= x1 or y2 <= y1:
        return None
    if w * h > 0 and (x2 - x1) * (y2 - y1) < min_visible * w * h:
        return None
    sx, sy = out_size / (cx2 - cx1), out_size / (cy2 - cy1)
    return ((x1 - cx1) * sx, (y1 - cy1) * sy, (x2 - cx1) * sx, (y2 - cy1) * sy)
