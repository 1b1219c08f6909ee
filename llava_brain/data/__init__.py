"""Datasets of the training stages."""

from llava_brain.data.fmri import (
    FmriTrainSet,
    Targets,
    TestSet,
    collate,
    common_grid,
    epoch_batches,
    input_files,
    load_test_sets,
    mixup_partners,
    to_grid,
    union_area_mask,
)

__all__ = [
    "FmriTrainSet",
    "Targets",
    "TestSet",
    "collate",
    "common_grid",
    "epoch_batches",
    "input_files",
    "load_test_sets",
    "mixup_partners",
    "to_grid",
    "union_area_mask",
]
