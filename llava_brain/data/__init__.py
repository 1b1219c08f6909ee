"""Datasets of the training stages."""

from llava_brain.data.fmri import (
    FmriTrainSet,
    Targets,
    TestSet,
    collate,
    common_grid,
    load_test_sets,
    mixup_partners,
    resolve_subjects,
    to_grid,
    union_region_mask,
)

__all__ = [
    "FmriTrainSet",
    "Targets",
    "TestSet",
    "collate",
    "common_grid",
    "load_test_sets",
    "mixup_partners",
    "resolve_subjects",
    "to_grid",
    "union_region_mask",
]
