"""What the LLM sees instead of an NSD image: its captions and object boxes, read from the annotation files.

As in LLaVA's COCO instruction data, the context is the captions (COCO's human captions first, then
BLIP-2's) and one line per object, `category: [x1, y1, x2, y2]`, with the box normalised to [0, 1]
by the image size. Human COCO boxes come first; DETR boxes are added where they do not duplicate a
human box of the same category.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llava_brain.annotations import read_captions, read_instances
from llava_brain.errors import BadInputError, require_file
from llava_brain.layout import DatasetRoot
from llava_brain.nsd.constants import IMAGE_SIZE

log = logging.getLogger(__name__)

BOX_DECIMALS = 3  # LLaVA's COCO contexts print normalised boxes with 3 decimals
# A DETR box this close to a human COCO box of the same category is the same object seen twice.
DUPLICATE_IOU = 0.5
COCO_CAPTIONS_WHAT = "COCO captions keyed by nsdId (written by prepare_datasets/make_coco_annotations.py)"


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

    def used(self) -> list[Path]:
        return [p for p in (self.coco_captions, self.captions, self.instances, self.coco_instances) if p]


def captioned_images(layout: DatasetRoot) -> list[int]:
    """Sorted nsdIds of every image of nsd_coco_captions.json (`--all-images`)."""
    return sorted(read_captions(require_file(layout.coco_captions, COCO_CAPTIONS_WHAT)))


def load_contexts(layout: DatasetRoot, nsd_ids: Sequence[int]) -> tuple[list[ImageContext], ContextSources]:
    """Contexts of `nsd_ids` from the annotation files; nsd_coco_captions.json is required, the rest optional.

    A selected image absent from nsd_coco_captions.json is an error (the file is stale); absent from
    an optional file it just gets no captions/objects from that file (counted in the log).
    """
    coco_captions = read_captions(require_file(layout.coco_captions, COCO_CAPTIONS_WHAT))
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
