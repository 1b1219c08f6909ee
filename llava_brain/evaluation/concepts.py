"""Concept localization (paper Sec. 4.4, Fig. 8): where in a subject's brain the ViT3D reads a named concept.

A concept's CLIP text embedding t (the text tower that goes with the CLIP image embeddings the ViT3D learned
to predict) is the target of the ViT3D's CLIP head: score(x) = cos(clip_head(ViT3D(x)), t). Grad-CAM
(Selvaraju et al., 2017) over the patch tokens A (tokens, hidden) of a hidden layer (the paper: the
penultimate layers) gives one value per token:

    alpha_d = mean over tokens of d score / d A[t, d]        one weight per hidden channel d
    cam[t]  = ReLU(sum_d alpha_d * A[t, d])                  one value per active patch

The CLS token is left out: it has no place in the brain. `to_subject_grid` takes the token values back
through the model's three steps, in reverse:
  1. the token gather: scattered onto the padded patch grid, 0 on the patches that are not tokens;
  2. the padding: a trilinear upsampling by the patch size (each patch's value at its centre, so the map is
     smooth across patch borders), then the padded end of each axis cropped;
  3. the data's trilinear resize: from the model's common grid back to the subject's own grid.
Outside the subject's brain mask the map is 0. Several layers: the mean of their maps. Several models
(`ensemble_maps`, e.g. patch sizes 14, 12, 10): each map scaled to a maximum of 1, then averaged, which
refines the map where the patch borders differ.

The encoding pattern (`EncodingPattern`, Haufe et al., 2014), the alternative to Grad-CAM: a gradient map says
where a decoder takes its evidence from, which is not where the brain encodes the concept (a decoder also
weights voxels that only cancel noise). The pattern asks the encoding question of the decoder's output: over a
subject's samples x_i, the Pearson correlation of each voxel's beta x_i[v] with the concept score s(x_i),

    pattern[v] = corr_i(x_i[v], s(x_i))

one signed map per subject and concept, on the subject's own grid (no patches, no upsampling): positive where
the voxel's response rises with the score, negative where it falls. The sign matters: a score that rises with
"red" and falls with "blue" (related concepts share a CLIP text space) gives red's voxels one sign and blue's
the other, where |corr| would paint both alike. `contrast_targets`
turns the target into t_c - mean(t_versus): the score then rises with the concept *more than* with a
vocabulary of related concepts (the class-discriminative score of Grad-CAM's softmax), which removes what all
concepts share (e.g. "some coloured object is there").

Maps are ranked by magnitude (the top voxels, the ROI shares, the zeroed voxels, the ensemble's scaling), which
for Grad-CAM's non-negative maps is their value. Ablation (`ablation_drops`): the top k voxels of a sample's map
inside a region are set to 0 (the betas are z-scored, so 0 is the voxel's mean response) and the ViT3D is run
again; the drop of the concept score is compared, sample by sample, with zeroing as many random voxels of the
same region.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llava_brain.errors import BadInputError, require_file
from llava_brain.geometry import resize_to_grid
from llava_brain.io import read_json
from llava_brain.layout import DatasetRoot

ROIS = ("early", "midventral", "midlateral", "midparietal", "ventral", "lateral", "parietal")  # streams atlas
DEFAULT_TEMPLATE = "{}"  # the bare concept, as Brain-LLaVA's concept_localization answer gives it


def load_clip_vit3d(folder: Path, device: str):
    """(Vit3dRun, model) of a pretrain_vit3d.py folder; one that is not a ViT3D with a CLIP head is refused."""
    from llava_brain.evaluation.encoders import Vit3dRun

    run = Vit3dRun.load(folder)
    config = read_json(run.final / "config.json", "the ViT3D config (final/config.json)")
    if config.get("model_type") != "vit3d" or not config.get("clip_dim"):
        raise BadInputError(run.final / "config.json", "is not a ViT3D with a CLIP head (model_type vit3d, clip_dim)")
    return run, run.model(device)


def subject_data(layout: DatasetRoot, subject: int, region: str) -> dict:
    """The subject's brain mask, ROI masks, region, affine and mean volume (the montage's background)."""
    meta = read_json(layout.whole_meta(subject), "make_subjmri.py's whole-brain metadata (grid, affine)")
    path = require_file(layout.whole_masks(subject), "the whole-brain masks (masks.npz) of make_subjmri.py")
    with np.load(path) as masks:
        for name in ("brain", region):
            if name not in masks.files:
                raise BadInputError(path, f"has no mask {name!r}; it has {sorted(masks.files)}")
        data = {"brain": masks["brain"].astype(bool), "region": masks[region].astype(bool),
                "rois": {r: masks[r].astype(bool) for r in ROIS if r in masks.files}}  # fmt: skip
    mean = np.load(require_file(layout.whole_stats(subject, "mean"), "the whole-brain mean betas of make_subjmri.py"))
    data["mean"] = np.asarray(mean, dtype=np.float32)
    data["affine"] = np.asarray(meta.get("affine", np.eye(4)), dtype=np.float64)
    return data


def concept_embeddings(text_model, tokenizer, texts: Sequence[str], template: str = DEFAULT_TEMPLATE) -> torch.Tensor:
    """(len(texts), D) unit CLIP text embeddings (`text_embeds` of a CLIPTextModelWithProjection) of the
    concepts, each written into `template` ("{}" = the concept itself; e.g. "a photo of {}.")."""
    if "{}" not in template:
        raise ValueError(f"the concept template needs a {{}} where the concept goes; got {template!r}")
    batch = tokenizer([template.format(t) for t in texts], padding=True, truncation=True, return_tensors="pt")
    device = next(text_model.parameters()).device
    with torch.no_grad():
        embeds = text_model(**{k: v.to(device) for k, v in batch.items()}).text_embeds.float()
    return F.normalize(embeds, dim=-1)


def contrast_targets(targets: torch.Tensor, versus: torch.Tensor) -> torch.Tensor:
    """(n, D) directions t - mean(versus) for (n, D) unit concept embeddings and (K, D) vocabulary embeddings; the
    concept may be among the vocabulary (the direction is then scaled, not turned)."""
    directions = targets - versus.mean(dim=0, keepdim=True)
    if bool((directions.norm(dim=-1) < 1e-6).any()):
        raise ValueError("a concept's contrast is empty: --versus needs concepts other than the one located")
    return directions


class EncodingPattern:
    """Running sums for `pattern[v] = corr_i(x_i[v], s_i)` over batches of samples (module docstring), so the
    full-scale test set (1000 volumes x 700k voxels) never has to be in memory at once."""

    def __init__(self):
        self.n, self.sx, self.sxx, self.sxs, self.ss, self.sss = 0, 0.0, 0.0, 0.0, 0.0, 0.0

    def add(self, volumes: np.ndarray, scores: np.ndarray) -> None:
        """volumes (batch, *grid) float, scores (batch,) the concept score of each volume."""
        x = np.asarray(volumes, dtype=np.float64)
        s = np.asarray(scores, dtype=np.float64).reshape(-1, *([1] * (x.ndim - 1)))
        self.n += len(x)
        self.sx, self.sxx, self.sxs = self.sx + x.sum(0), self.sxx + (x * x).sum(0), self.sxs + (x * s).sum(0)
        self.ss, self.sss = self.ss + float(s.sum()), self.sss + float((s * s).sum())

    def result(self) -> np.ndarray:
        """(*grid) float32 signed Pearson r; 0 where a voxel or the score does not vary. Needs at least 3 samples."""
        if self.n < 3:
            raise ValueError(f"an encoding pattern needs at least 3 samples, got {self.n}")
        cov = self.sxs / self.n - (self.sx / self.n) * (self.ss / self.n)
        var_x = np.maximum(self.sxx / self.n - (self.sx / self.n) ** 2, 0.0)
        var_s = max(self.sss / self.n - (self.ss / self.n) ** 2, 0.0)
        denom = np.sqrt(var_x * var_s)
        r = np.divide(cov, denom, out=np.zeros_like(denom), where=denom > 1e-12)
        return r.astype(np.float32)


def mentions(texts: Sequence[str], concept: str) -> bool:
    """Whether any text names `concept` as a whole word or phrase (case-insensitive; "red" is not in "bored")."""
    pattern = re.compile(rf"(?<!\w){re.escape(concept.lower())}(?!\w)")
    return any(pattern.search(str(t).lower()) for t in texts)


@dataclass
class TokenMaps:
    """Grad-CAM of one batch: cam (batch, tokens) >= 0 over the active patches (token order of the model),
    score (batch,) the concept's cosine similarity with the CLIP head's output."""

    cam: torch.Tensor
    score: torch.Tensor


def concept_scores(model, volumes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(batch,) cosine similarity of the CLIP head's output with each row's target (batch, D) or one (D,)."""
    clip = model(volumes).clip.float()
    return F.cosine_similarity(clip, targets.to(clip.device).expand_as(clip), dim=-1)


def gradcam_tokens(model, volumes: torch.Tensor, targets: torch.Tensor, layers: Sequence[int] = (-2,)) -> TokenMaps:
    """Grad-CAM (module docstring) of a ViT3D for volumes (batch, *grid) on the model's grid.

    targets: (batch, D) unit text embeddings, one per volume, or (D,) for all. layers: hidden-state indices
    (0 = the patch embeddings, -1 = the last block's output); the maps of several layers are averaged.
    """
    count = model.config.num_layers + 1
    for layer in layers:
        if not -count <= layer < count:
            raise ValueError(f"layer {layer} does not exist: the ViT3D has hidden states -{count}..{count - 1}")
    volumes = volumes.detach().float()
    with torch.enable_grad():
        output = model(volumes, output_hidden_states=True)
        clip = output.clip.float()
        score = F.cosine_similarity(clip, targets.to(clip.device).expand_as(clip), dim=-1)
        hidden = [output.hidden_states[layer] for layer in layers]
        grads = torch.autograd.grad(score.sum(), hidden)
    cams = []
    for a, g in zip(hidden, grads, strict=True):
        a, g = a[:, 1:].detach().float(), g[:, 1:].float()  # drop CLS: (batch, tokens, hidden)
        alpha = g.mean(dim=1, keepdim=True)  # (batch, 1, hidden)
        cams.append(F.relu((alpha * a).sum(dim=-1)))
    return TokenMaps(torch.stack(cams).mean(dim=0), score.detach())


def gradient_input_voxels(model, volumes: torch.Tensor, targets: torch.Tensor) -> TokenMaps:
    """The voxel-resolution alternative to Grad-CAM: ReLU(d score / d x * x) for volumes x (batch, X, Y, Z) on
    the *subject's* grid, through the data's trilinear resize to the model's grid; `cam` is then (batch, X, Y, Z),
    each voxel's first-order share of the score (what zeroing it would remove)."""
    x = volumes.detach().float().requires_grad_(True)
    with torch.enable_grad():
        clip = model(resize_to_grid(x, model.config.grid)).clip.float()
        score = F.cosine_similarity(clip, targets.to(clip.device).expand_as(clip), dim=-1)
        (grad,) = torch.autograd.grad(score.sum(), x)
    return TokenMaps(F.relu(grad * x.detach()), score.detach())


def to_model_grid(config, token_values: torch.Tensor) -> torch.Tensor:
    """(batch, tokens) values of the active patches -> (batch, *config.grid) on the model's grid.

    Scatter onto the padded patch grid (0 elsewhere), trilinear upsampling by the patch size with
    align_corners=False (each patch's value lands on its centre), then the padding cropped off.
    """
    patches = config.token_patches()
    if token_values.shape[-1] != len(patches):
        raise ValueError(f"expected {len(patches)} token values (the model's active patches), "
                         f"got {token_values.shape[-1]}")  # fmt: skip
    batch = token_values.shape[0]
    full = token_values.new_zeros((batch, config.num_patches_total))
    full[:, torch.tensor(patches, device=token_values.device)] = token_values.float()
    grid = full.view(batch, 1, *config.patch_grid)
    up = F.interpolate(grid, scale_factor=config.patch_size, mode="trilinear", align_corners=False)[:, 0]
    x, y, z = config.grid
    return up[:, :x, :y, :z]


def to_subject_grid(volumes: torch.Tensor, brain: np.ndarray) -> np.ndarray:
    """(batch, *model grid) -> (batch, *brain.shape) float32 on the subject's grid, trilinear, 0 outside `brain`."""
    resized = resize_to_grid(volumes.float(), brain.shape).cpu().numpy()
    return np.where(brain[None], resized, 0.0).astype(np.float32)


def scaled(maps: np.ndarray) -> np.ndarray:
    """Each (X, Y, Z) map of a (n, X, Y, Z) stack divided by its largest magnitude (all-zero maps stay 0)."""
    peak = np.abs(maps.reshape(len(maps), -1)).max(axis=1)
    return (maps / np.where(peak > 0, peak, 1.0)[:, None, None, None]).astype(np.float32)


def ensemble_maps(per_model: Sequence[np.ndarray]) -> np.ndarray:
    """The mean of several models' (n, X, Y, Z) maps of the same samples, each sample's map scaled to max |.| 1."""
    return np.mean([scaled(m) for m in per_model], axis=0).astype(np.float32)


def top_voxels(volume: np.ndarray, affine: np.ndarray, count: int) -> list[dict]:
    """The `count` voxels of a map with the largest magnitude (value != 0): voxel index (i, j, k), scanner mm and
    the (signed) value, strongest first."""
    flat = volume.ravel()
    order = np.argsort(-np.abs(flat), kind="stable")[:count]
    order = order[flat[order] != 0]
    ijk = np.stack(np.unravel_index(order, volume.shape), axis=1)
    mm = (affine[:3, :3] @ ijk.T + affine[:3, 3:4]).T
    return [{"voxel": [int(v) for v in index], "mm": [round(float(v), 2) for v in xyz], "value": float(flat[o])}
            for index, xyz, o in zip(ijk, mm, order, strict=True)]  # fmt: skip


def roi_shares(volume: np.ndarray, rois: dict[str, np.ndarray]) -> dict[str, float]:
    """Share of the map's total magnitude (sum of |value| over the brain) inside each ROI mask; "other" = outside
    all of them."""
    volume = np.abs(volume)
    total = float(volume.sum())
    if total <= 0:
        return {**{name: 0.0 for name in rois}, "other": 0.0}
    shares = {name: float(volume[mask].sum()) / total for name, mask in rois.items()}
    covered = np.zeros(volume.shape, dtype=bool)
    for mask in rois.values():
        covered |= mask
    shares["other"] = float(volume[~covered].sum()) / total
    return shares


def top_mask(volume: np.ndarray, region: np.ndarray, count: int) -> np.ndarray:
    """bool mask of the `count` voxels of largest |volume| inside `region` (ties broken by voxel order)."""
    inside = np.flatnonzero(region.ravel())
    chosen = inside[np.argsort(-np.abs(volume.ravel()[inside]), kind="stable")[:count]]
    mask = np.zeros(volume.size, dtype=bool)
    mask[chosen] = True
    return mask.reshape(volume.shape)


def random_mask(region: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """bool mask of `count` voxels of `region` drawn uniformly without replacement."""
    inside = np.flatnonzero(region.ravel())
    mask = np.zeros(region.size, dtype=bool)
    mask[rng.choice(inside, size=count, replace=False)] = True
    return mask.reshape(region.shape)


def ablation_drops(score, volumes: np.ndarray, maps: np.ndarray, region: np.ndarray, *, fraction: float,
                   repeats: int = 4, seed: int = 0) -> dict:  # fmt: skip
    """The paper's Fig. 8 experiment as numbers: how much zeroing the located voxels lowers the concept score.

    score: (volumes (m, X, Y, Z) on the subject's grid, sample number) -> (m,) that sample's concept scores
        (the ViT3D run again; the sample number picks its concept embedding).
    volumes, maps: (n, X, Y, Z) the samples' subject-grid volumes and their located maps.
    region: bool (X, Y, Z), where voxels are zeroed (the area the model's tokens cover); fraction: share of
    its voxels zeroed; repeats: random draws per sample for the control (their mean drop is its drop).
    Returns per-sample drops (score before - after) for the located and the random voxels, their means, and a
    one-sided Wilcoxon signed-rank test of located > random over the samples.
    """
    from scipy.stats import wilcoxon

    if not 0 < fraction < 1:
        raise ValueError(f"the zeroed fraction must be in (0, 1), got {fraction}")
    count = max(1, round(fraction * int(region.sum())))
    rng = np.random.default_rng(seed)
    located, control = [], []
    for i, (volume, located_map) in enumerate(zip(volumes, maps, strict=True)):
        variants = [volume, np.where(top_mask(located_map, region, count), 0.0, volume)]
        variants += [np.where(random_mask(region, count, rng), 0.0, volume) for _ in range(repeats)]
        scores = np.asarray(score(np.stack(variants).astype(np.float32), i), dtype=np.float64)
        located.append(scores[0] - scores[1])
        control.append(float(np.mean(scores[0] - scores[2:])))
    located, control = np.asarray(located), np.asarray(control)
    diff = located - control
    p = float(wilcoxon(diff, alternative="greater").pvalue) if len(diff) > 1 and np.any(diff != 0) else 1.0
    return {
        "zeroed_voxels": count,
        "region_voxels": int(region.sum()),
        "samples": len(located),
        "random_repeats": repeats,
        "drop_located": float(located.mean()),
        "drop_random": float(control.mean()),
        "drop_located_sd": float(located.std(ddof=1)) if len(located) > 1 else 0.0,
        "drop_random_sd": float(control.std(ddof=1)) if len(control) > 1 else 0.0,
        "located_beats_random": float((diff > 0).mean()),
        "wilcoxon_p": p,
        "per_sample": {"located": located.tolist(), "random": control.tolist()},
    }


def truth_agreement(located: np.ndarray, truth: dict[str, np.ndarray], feature: str, region: np.ndarray, *,
                    top_fraction: float = 0.1, permutations: int = 200, seed: int = 0) -> dict:  # fmt: skip
    """How well a located map matches the true encoding map of `feature` (a simulator's `truth[feature]`), against
    the true maps of the other features and against random maps, over the voxels of `region`.

    Two measures: Spearman's rho between the maps, and the overlap of their top voxels (the share of the located
    map's top `top_fraction` of the region that is in the truth's top `top_fraction`; chance = top_fraction).
    The random maps are the located map's values permuted over the region (same value distribution).
    """
    from scipy.stats import spearmanr

    values = located[region].astype(np.float64)
    count = max(1, round(top_fraction * int(region.sum())))

    def top(v: np.ndarray) -> np.ndarray:
        return np.argsort(-v, kind="stable")[:count]

    def overlap(a: np.ndarray, b: np.ndarray) -> float:
        return len(np.intersect1d(top(a), top(b))) / count

    per_feature = {}
    for name, truth_map in truth.items():
        t = truth_map[region].astype(np.float64)
        per_feature[name] = {"spearman": float(spearmanr(values, t)[0]), "top_overlap": overlap(values, t)}
    rng = np.random.default_rng(seed)
    own = truth[feature][region].astype(np.float64)
    shuffled = [rng.permutation(values) for _ in range(permutations)]
    random_rho = [float(spearmanr(v, own)[0]) for v in shuffled]
    random_overlap = [overlap(v, own) for v in shuffled]
    others = {k: v for k, v in per_feature.items() if k != feature}
    return {
        "feature": feature,
        "voxels": int(region.sum()),
        "top_fraction": top_fraction,
        "own": per_feature[feature],
        "others_mean": {m: float(np.mean([v[m] for v in others.values()])) for m in ("spearman", "top_overlap")},
        "others_max": {m: float(np.max([v[m] for v in others.values()])) for m in ("spearman", "top_overlap")},
        "random": {
            "spearman": float(np.mean(random_rho)),
            "spearman_p95": float(np.percentile(random_rho, 95)),
            "top_overlap": float(np.mean(random_overlap)),
        },
        "rank": 1 + sum(v["spearman"] > per_feature[feature]["spearman"] for v in others.values()),
        "per_feature": per_feature,
    }
