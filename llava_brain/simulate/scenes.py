"""Rendered scenes for mini-NSD: shapes of known category, colour, size and position.

Each scene is drawn at a COCO-like original size (e.g. 640 × 480), with COCO-format captions
and instance boxes in that original pixel space; the stimulus the "subject" sees is NSD's
square crop of it (`cropBox` fractions), resized to 425 × 425 — exactly how NSD made its
stimuli from COCO, so the crop/box mapping code meets the real geometry.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from llava_brain.nsd.coco import crop_window

STIMULUS_SIZE = 425
SHAPES = ("circle", "square", "triangle", "cross", "ring")  # COCO category ids 1..5
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 170),
    "white": (245, 245, 245),
}
BACKGROUNDS = {  # name -> (top colour, bottom colour) of a vertical gradient
    "gray": ((150, 150, 150), (105, 105, 105)),
    "sky-blue": ((120, 170, 230), (205, 225, 245)),
    "grassy green": ((110, 170, 90), (45, 105, 40)),
    "sandy": ((235, 215, 165), (195, 170, 120)),
    "dark": ((25, 25, 55), (60, 60, 95)),
}
BACKGROUND_JITTER = 30.0  # sd of the per-image colour jitter, 8-bit units
SIZES = {"small": 0.07, "medium": 0.12, "large": 0.19}  # radius as a fraction of the shorter image side
ORIGINAL_SIZES = ((640, 480), (480, 640), (640, 427), (500, 375), (612, 612))  # (width, height), COCO-like


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    cx: float  # centre, original pixels
    cy: float
    radius: float  # pixels

    def polygon(self) -> list[tuple[float, float]]:
        """Outline in original pixels (circles/rings as 24-gons), used for drawing and COCO segmentation."""
        r, cx, cy = self.radius, self.cx, self.cy
        if self.shape in ("circle", "ring"):
            angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
            return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles]
        if self.shape == "square":
            s = r * 0.85
            return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
        if self.shape == "triangle":
            return [(cx, cy - r), (cx + r * 0.87, cy + r * 0.5), (cx - r * 0.87, cy + r * 0.5)]
        w = r * 0.33  # cross: a plus sign of arm half-width w
        return [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
            (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
            (cx - r, cy - w), (cx - w, cy - w),
        ]  # fmt: skip

    def bbox(self, width: int, height: int) -> list[float]:
        """COCO box [x, y, w, h] of the drawn outline, clipped to the image."""
        pts = np.asarray(self.polygon())
        x1, y1 = np.clip(pts.min(0), 0, [width, height])
        x2, y2 = np.clip(pts.max(0), 0, [width, height])
        return [round(float(x1), 2), round(float(y1), 2), round(float(x2 - x1), 2), round(float(y2 - y1), 2)]

    def area(self) -> float:
        pts = np.asarray(self.polygon())
        x, y = pts[:, 0], pts[:, 1]
        area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))  # shoelace formula
        return float(area * (1 - 0.6**2) if self.shape == "ring" else area)


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: str  # palette name, used in captions
    objects: tuple[SceneObject, ...]
    crop_box: tuple[float, float, float, float]  # NSD cropBox: (top, bottom, left, right) fractions
    gradient: tuple[tuple[int, int, int], tuple[int, int, int]] = ((128, 128, 128), (128, 128, 128))  # top, bottom

    def visible_objects(self) -> list[SceneObject]:
        """Objects whose centre lies inside NSD's crop (what the subject can recognise)."""
        x1, y1, x2, y2 = crop_window((self.width, self.height), self.crop_box)
        return [o for o in self.objects if x1 <= o.cx < x2 and y1 <= o.cy < y2]


def sample_scene(rng: np.random.Generator) -> Scene:
    width, height = ORIGINAL_SIZES[rng.integers(len(ORIGINAL_SIZES))]
    side = min(width, height)
    objects = []
    for _ in range(rng.integers(1, 4)):  # 1-3 objects
        size = list(SIZES)[rng.integers(len(SIZES))]
        radius = SIZES[size] * side
        objects.append(
            SceneObject(
                shape=SHAPES[rng.integers(len(SHAPES))],
                colour=list(COLOURS)[rng.integers(len(COLOURS))],
                size=size,
                cx=float(rng.uniform(radius, width - radius)),
                cy=float(rng.uniform(radius, height - radius)),
                radius=float(radius),
            )
        )
    # NSD cut the long side to a square; mostly centred, sometimes shifted (cropBox varies in NSD too).
    excess = max(width, height) - side
    offset = excess / 2 if rng.random() < 0.6 else float(rng.uniform(0, excess))
    first, last = offset / max(width, height), (excess - offset) / max(width, height)
    crop_box = (0.0, 0.0, first, last) if width >= height else (first, last, 0.0, 0.0)
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    # Each photo's colours differ: jitter the palette's gradient so no two backgrounds are alike.
    gradient = tuple(
        tuple(int(v) for v in np.clip(np.asarray(c) + rng.normal(0, BACKGROUND_JITTER, 3), 0, 255))
        for c in BACKGROUNDS[background]
    )
    return Scene(width, height, background, tuple(objects), tuple(round(v, 7) for v in crop_box), gradient)


def render_original(scene: Scene) -> Image.Image:
    top, bottom = (np.asarray(c, dtype=np.float32) for c in scene.gradient)
    t = np.linspace(0.0, 1.0, scene.height, dtype=np.float32)[:, None, None]
    gradient = (1 - t) * top + t * bottom  # (H, 1, 3)
    canvas = np.broadcast_to(gradient, (scene.height, scene.width, 3)).astype(np.uint8)
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        draw.polygon(obj.polygon(), fill=COLOURS[obj.colour])
        if obj.shape == "ring":  # punch the hole with the local background colour
            hole = SceneObject("circle", obj.colour, obj.size, obj.cx, obj.cy, obj.radius * 0.6)
            row = int(np.clip(obj.cy, 0, scene.height - 1))
            draw.polygon(hole.polygon(), fill=tuple(int(v) for v in gradient[row, 0]))
    return image


def render_stimulus(scene: Scene) -> np.ndarray:
    """(425, 425, 3) uint8: NSD's crop of the original scene, resized like NSD's stimuli."""
    box = crop_window((scene.width, scene.height), scene.crop_box)
    crop = render_original(scene).resize((STIMULUS_SIZE, STIMULUS_SIZE), Image.BILINEAR, box=box)
    return np.asarray(crop)


def _phrase(obj: SceneObject, with_size: bool = True) -> str:
    size = {"small": "small ", "medium": "", "large": "large "}[obj.size] if with_size else ""
    return f"{size}{obj.colour} {obj.shape}"


def _where(obj: SceneObject, scene: Scene) -> str:
    fx, fy = obj.cx / scene.width, obj.cy / scene.height
    horizontal = "on the left" if fx < 0.36 else "on the right" if fx > 0.64 else "in the middle"
    vertical = "near the top" if fy < 0.33 else "near the bottom" if fy > 0.67 else ""
    return f"{horizontal} {vertical}".strip()


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def captions(scene: Scene) -> list[str]:
    """Five COCO-style captions of the *original* image (COCO captions ignore NSD's crop)."""
    objs = scene.objects
    with_article = [f"a {_phrase(o)}" for o in objs]
    count = {1: "A single shape", 2: "Two shapes", 3: "Three shapes"}[len(objs)]
    placed = [f"a {_phrase(o)} {_where(o, scene)}" for o in objs]
    plain = [_phrase(o, with_size=False) for o in objs]
    return [
        f"{_join(with_article).capitalize()} on a {scene.background} background.",
        f"{count} on a {scene.background} background: {_join(with_article)}.",
        f"There is {_join(placed)}.",
        f"A simple picture of {_join([f'a {p}' for p in plain])}.",
        f"{_join(plain).capitalize()} over a {scene.background} backdrop.",
    ]


# The columns of semantic_features, in order.
FEATURE_NAMES = (*SHAPES, *COLOURS, "count", "size", *BACKGROUNDS)


def semantic_features(scene: Scene) -> np.ndarray:
    """(18,) what a 'ventral' voxel can respond to: shapes, colours, count, size, background."""
    visible = scene.visible_objects()
    vec = np.zeros(len(FEATURE_NAMES), dtype=np.float32)
    for obj in visible:
        vec[SHAPES.index(obj.shape)] = 1.0
        vec[len(SHAPES) + list(COLOURS).index(obj.colour)] = 1.0
    vec[len(SHAPES) + len(COLOURS)] = len(visible) / 3.0
    sizes = [SIZES[o.size] / max(SIZES.values()) for o in visible]
    vec[len(SHAPES) + len(COLOURS) + 1] = float(np.mean(sizes)) if sizes else 0.0
    vec[len(SHAPES) + len(COLOURS) + 2 + list(BACKGROUNDS).index(scene.background)] = 1.0
    return vec


def thumbnails(stimuli: np.ndarray, size: int) -> np.ndarray:
    """(n, size, size, 3) float32 in [0, 1]: box-averaged low-resolution copies of 425-px stimuli."""
    return np.stack(
        [np.asarray(Image.fromarray(im).resize((size, size), Image.BOX), dtype=np.float32) / 255.0 for im in stimuli]
    )
