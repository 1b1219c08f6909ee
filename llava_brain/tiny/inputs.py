"""What the tiny models are trained on, read from a raw NSD tree before any model is built (so bad input
fails before the work): COCO captions and instances, the resized stimuli, and the train / held-out splits.

Held out are always shared1000 images, the test images of every later stage. `tools/make_tiny_models.py`
plans its build with `plan_inputs` and fingerprints `tree_inputs` in its run.json.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from llava_brain.errors import BadInputError
from llava_brain.layout import NsdTree

COCO_SPLITS = ("train2017", "val2017")
HELDOUT_IMAGES = 64  # shared1000 images whose reconstructions the VAE is scored on
CLIP_HELDOUT_IMAGES = 1000  # shared1000 images CLIP retrieval is scored on: all of them (mini-NSD: 100)


def tree_inputs(tree: NsdTree) -> dict:
    """The files the build reads (a caption or instances file of a split the tree lacks counts as missing):
    the NSD tree's, and the prompt lists whose wording the LLM's conversations use."""
    from llava_brain.instructions.prompts import DETAIL_QUESTIONS_FILE, PROMPTS_DIR
    from llava_brain.sft import BUILT_TYPES, INSTRUCTIONS_DIR

    return {
        "stimuli": tree.stimuli,
        "stim_info": tree.stim_info,
        "captions": [tree.coco_annotations("captions", split) for split in COCO_SPLITS],
        "instances": [tree.coco_annotations("instances", split) for split in COCO_SPLITS],
        "instructions": [
            *(INSTRUCTIONS_DIR / f"{name}.txt" for name in BUILT_TYPES),
            PROMPTS_DIR / DETAIL_QUESTIONS_FILE,
        ],
    }


def coco_captions(tree: NsdTree) -> dict[int, list[str]]:
    """COCO image id -> its captions, in file order, from every caption file of COCO_SPLITS present."""
    from llava_brain.nsd import CocoAnnotations

    paths = [tree.coco_annotations("captions", split) for split in COCO_SPLITS]
    present = [p for p in paths if p.is_file()]
    if not present:
        raise BadInputError(paths[0], "missing; expected COCO caption annotations (captions_{train,val}2017.json)")
    captions: dict[int, list[str]] = {}
    for path in present:
        for image_id, anns in CocoAnnotations.load(path, "captions").by_image.items():
            captions.setdefault(int(image_id), []).extend(ann["caption"] for ann in anns)
    return captions


def read_instances(tree: NsdTree) -> dict:
    """COCO split -> its instances file (`CocoAnnotations`), for every split of COCO_SPLITS present (>= 1)."""
    from llava_brain.nsd import CocoAnnotations

    paths = {split: tree.coco_annotations("instances", split) for split in COCO_SPLITS}
    found = {split: CocoAnnotations.load(path, "instances") for split, path in paths.items() if path.is_file()}
    if not found:
        raise BadInputError(paths[COCO_SPLITS[0]], "missing; expected COCO instances")
    return found


def category_names(instances: dict) -> list[str]:
    """Names of COCO category ids 1..max of the first instances file; ids COCO skips (real COCO: 12, 26, ...)
    are "N/A" as in DETR."""
    first = next(iter(instances.values()))
    categories = first.categories
    if not categories or min(categories) < 1:
        raise BadInputError(first.path, f"expected categories with ids 1, 2, ...; found ids {sorted(categories)}")
    return [categories.get(i, "N/A") for i in range(1, max(categories) + 1)]


def read_stimuli(tree: NsdTree, nsd_ids, size: int) -> np.ndarray:
    """(n, size, size, 3) uint8, each stimulus resized with PIL's antialiasing bicubic filter."""
    from PIL import Image

    from llava_brain.nsd import NsdStimuli

    with NsdStimuli(tree.stimuli) as stimuli:
        return np.stack(
            [np.asarray(Image.fromarray(stimuli[i]).resize((size, size), Image.Resampling.BICUBIC)) for i in nsd_ids]
        )


def spread(ids: np.ndarray, n: int) -> np.ndarray:
    """At most n of `ids`, evenly spaced (all of them when there are no more than n)."""
    return ids if ids.size <= n else ids[np.linspace(0, ids.size - 1, n).round().astype(int)]


def vae_split(tree: NsdTree, max_train: int) -> tuple[np.ndarray, np.ndarray]:
    """(train nsdIds, held-out nsdIds): held out are shared1000 images, the test images of every later stage."""
    from llava_brain.nsd import StimInfo

    info = StimInfo.load(tree.stim_info)
    shared, others = np.flatnonzero(info.shared1000), np.flatnonzero(~info.shared1000)
    if shared.size < 2 or others.size < 1:
        raise BadInputError(tree.stim_info, "expected >= 2 shared1000 images and >= 1 other image to train the VAE")
    return spread(others, max_train), spread(shared, HELDOUT_IMAGES)


def clip_split(tree: NsdTree, captions: dict[int, list[str]], max_train: int):
    """(train nsdIds, held-out nsdIds, captions of each nsdId): as `vae_split`, among images with captions."""
    from llava_brain.nsd import StimInfo

    info = StimInfo.load(tree.stim_info)
    by_nsd_id = {i: captions.get(int(coco_id), []) for i, coco_id in enumerate(info.coco_id)}
    captioned = np.array([bool(by_nsd_id[i]) for i in range(len(info.coco_id))], dtype=bool)
    shared = np.flatnonzero(info.shared1000 & captioned)
    others = np.flatnonzero(~info.shared1000 & captioned)
    if shared.size < 2 or others.size < 2:
        raise BadInputError(
            tree.stim_info, "expected >= 2 shared1000 and >= 2 other images with COCO captions to train CLIP"
        )
    return spread(others, max_train), spread(shared, CLIP_HELDOUT_IMAGES), by_nsd_id


class Plan(NamedTuple):
    """Everything read from the NSD tree before any model is built (so bad input fails before the work)."""

    categories: list[str]  # names of COCO category ids 1..N
    vae_train: np.ndarray  # nsdIds
    vae_heldout: np.ndarray
    clip_train: np.ndarray
    clip_heldout: np.ndarray
    captions_by_nsd_id: dict[int, list[str]]
    llm_train: list  # ImageContext of each LLM training image (non-shared1000 nsdIds with captions)
    llm_heldout: list  # ImageContext of each shared1000 image with captions (the test images)


def plan_inputs(tree: NsdTree, vae_images: int, clip_images: int, llm_images: int) -> Plan:
    """Read captions, instances and the stimulus design (the LLM's image contexts); check the stimulus brick
    holds every image needed. `*_images`: the most training images of each model (evenly spread)."""
    from llava_brain.nsd import NsdStimuli, StimInfo
    from llava_brain.tiny.llm_training import tree_contexts

    captions = coco_captions(tree)
    instances = read_instances(tree)
    vae_train, vae_heldout = vae_split(tree, vae_images)
    clip_train, clip_heldout, by_nsd_id = clip_split(tree, captions, clip_images)
    # The LLM's text is split as CLIP's images: the same shared1000 images held out (all of them).
    llm_train, llm_heldout, _ = clip_split(tree, captions, llm_images)
    info = StimInfo.load(tree.stim_info)
    contexts = [tree_contexts(info, ids, by_nsd_id, instances) for ids in (llm_train, llm_heldout)]
    last = int(np.concatenate([vae_train, vae_heldout, clip_train, clip_heldout]).max())
    with NsdStimuli(tree.stimuli) as stimuli:
        stimuli.require_images(last, tree.stim_info)
    return Plan(category_names(instances), vae_train, vae_heldout, clip_train, clip_heldout, by_nsd_id,
                *contexts)  # fmt: skip
