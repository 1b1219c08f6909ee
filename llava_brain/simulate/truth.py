"""Ground truth of mini-NSD's response model: where, in a subject's own grid, each feature is encoded.

mini-NSD knows what real fMRI does not: every voxel's read-out of every semantic feature of a scene (the
shapes, colours, object count, mean size and background of `scenes.semantic_features`) and of the low-level,
retinotopic term (`brain.image_responses`). A concept map located from a trained model (Grad-CAM over the
ViT3D) can therefore be compared with the truth.

The encoding strength of feature f in voxel v is the share of v's simulated signal that f drives, times
how much of v's response is signal at all:

    truth_f(v) = ncsnr_v * sqrt(1 - w_v) * |a_vf| / ||a_v||      (semantic features)
    truth_low(v) = ncsnr_v * sqrt(w_v)                            (the low-level term)

with a_v the voxel's semantic read-out (`ResponseModel.semantic`), w_v its low-level weight and ncsnr_v its
noise-ceiling SNR. The unsigned map (the default) drops the sign of a_vf: a voxel whose response falls with
"red" encodes red as much as one whose response rises; it is the truth for non-negative maps (Grad-CAM). The
signed map keeps it (a_vf instead of |a_vf|: positive where the response rises with the feature), the truth
for a signed encoding pattern. The low-level term has no sign: its map is the same either way. Colours also
reach early visual cortex through the low-level term's colour tuning; that part is in truth_low, not in the
colour's semantic map. Maps are zero outside the brain mask and deterministic for a tree's seed
(`mini_nsd.subject_brain` builds the anatomy and the model, for `write_mini_nsd` and here alike).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llava_brain.simulate import brain, scenes
from llava_brain.simulate.mini_nsd import MiniNsdConfig, subject_brain, tree_scenes

LOW_LEVEL = "low_level"
SEMANTIC_FEATURES = scenes.FEATURE_NAMES  # the 18 columns of scenes.semantic_features
FEATURES = (*SEMANTIC_FEATURES, LOW_LEVEL)


@dataclass(frozen=True)
class SubjectTruth:
    """A subject's anatomy and response model as mini-NSD built them."""

    subject: int
    anatomy: brain.Anatomy
    model: brain.ResponseModel

    def map(self, feature: str, signed: bool = False) -> np.ndarray:
        """(X, Y, Z) float32 on the subject's grid: the true encoding strength of `feature` (module docstring),
        with the read-out's sign when `signed`."""
        if feature not in FEATURES:
            raise ValueError(f"unknown feature {feature!r}; mini-NSD encodes {', '.join(FEATURES)}")
        m = self.model
        if feature == LOW_LEVEL:
            values = m.ncsnr * np.sqrt(m.low_weight)
        else:
            readout = m.semantic[:, SEMANTIC_FEATURES.index(feature)]
            readout = readout if signed else np.abs(readout)
            share = readout / (np.linalg.norm(m.semantic, axis=1) + 1e-12)
            values = m.ncsnr * np.sqrt(1.0 - m.low_weight) * share
        volume = np.zeros(self.anatomy.grid, np.float32)
        volume[self.anatomy.brain] = values
        return volume

    @property
    def affine(self) -> np.ndarray:
        """The (4, 4) voxel-to-mm affine of the subject's NIfTI files."""
        return self.anatomy.affine


def subject_truth(config: MiniNsdConfig, subject: int) -> SubjectTruth:
    """Rebuild subject `subject`'s anatomy and response model of a tree written with `config`."""
    if subject not in config.subjects:
        raise ValueError(f"subject {subject} is not in this mini-NSD tree (subjects {list(config.subjects)})")
    anatomy, model = subject_brain(config, subject)
    return SubjectTruth(subject, anatomy, model)


def scene_features(config: MiniNsdConfig) -> np.ndarray:
    """(images, 18) float32: every image's semantic features (SEMANTIC_FEATURES, nsdId order), from the tree's seed."""
    return np.stack([scenes.semantic_features(s) for s in tree_scenes(config)]).astype(np.float32)


def score_tracking(nsd_ids, scores, features: np.ndarray) -> dict[str, float]:
    """What a concept score follows: its Pearson r over the samples with each semantic feature of their images
    (nsd_ids index `features`, as `scene_features` gives them); 0 for a feature constant over the samples."""
    f = features[np.asarray(nsd_ids, dtype=int)].astype(np.float64)
    s = np.asarray(scores, dtype=np.float64)
    out = {}
    for k, name in enumerate(SEMANTIC_FEATURES):
        column = f[:, k]
        ok = column.std() > 0 and s.std() > 0
        out[name] = float(np.corrcoef(column, s)[0, 1]) if ok else 0.0
    return out


def tree_config(nsd_root: str | Path) -> MiniNsdConfig:
    """The MiniNsdConfig a mini-NSD tree was written with, from the run.json make_mini_nsd.py put beside it."""
    path = Path(nsd_root) / "run.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; only a tree written by prepare_datasets/make_mini_nsd.py "
                                "has a ground truth")  # fmt: skip
    return MiniNsdConfig.from_arguments(json.loads(path.read_text())["arguments"])
