"""Readers for the raw Natural Scenes Dataset layout (see `llava_brain.layout.NsdTree` for paths).

All readers validate what they open and raise `BadInputError` (one line: file + expectation) on
a missing or malformed file. Everything they return uses 0-based indices.
"""

from llava_brain.nsd.betas import BetaSession, to_percent_signal_change
from llava_brain.nsd.coco import CocoAnnotations, coco_box_to_nsd, crop_window
from llava_brain.nsd.design import ExpDesign, StimInfo, repeat_index
from llava_brain.nsd.roi import area_masks, atlas_label_names, available_atlases, read_roi, read_volume
from llava_brain.nsd.stimuli import NsdStimuli

__all__ = [
    "BetaSession",
    "CocoAnnotations",
    "ExpDesign",
    "NsdStimuli",
    "StimInfo",
    "area_masks",
    "atlas_label_names",
    "available_atlases",
    "coco_box_to_nsd",
    "crop_window",
    "read_roi",
    "read_volume",
    "repeat_index",
    "to_percent_signal_change",
]
