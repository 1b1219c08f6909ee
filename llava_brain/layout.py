"""Every path under a raw NSD tree and under a prepared dataset root is spelled here, and only here.

Two trees:
- `NsdTree`: the raw Natural Scenes Dataset as downloaded (or as written by mini-NSD), see
  `docs/mini_nsd.md` and docs/nsd_formats.md §1.
- `DatasetRoot`: the prepared dataset root every later stage reads and writes (docs/design.md,
  "The dataset root").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# NSD's default preparation used throughout the paper: 1.8-mm functional space, GLMsingle
# betas with HRF fitting, GLMdenoise and ridge regression ("b3").
DEFAULT_SPACE = "func1pt8mm"
DEFAULT_BETA_TYPE = "betas_fithrf_GLMdenoise_RR"
BETA_FORMATS = ("hdf5", "nifti")
_BETA_SUFFIX = {"hdf5": ".hdf5", "nifti": ".nii.gz"}
DATA_ROOT_ENV = "BRAIN_DATA_ROOT"


def subject_name(subject: int) -> str:
    """NSD's subject folder name, e.g. 1 -> 'subj01'."""
    if not 1 <= int(subject) <= 99:
        raise ValueError(f"subject must be a positive number below 100, got {subject!r}")
    return f"subj{int(subject):02d}"


def default_data_root() -> Path | None:
    """Default of every `--dataset-root` flag: $BRAIN_DATA_ROOT when set."""
    value = os.environ.get(DATA_ROOT_ENV)
    return Path(value) if value else None


@dataclass(frozen=True)
class NsdTree:
    """The raw NSD download (s3://natural-scenes-dataset layout)."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    # Experiment design and stimuli
    @property
    def expdesign(self) -> Path:
        return self.root / "nsddata" / "experiments" / "nsd" / "nsd_expdesign.mat"

    @property
    def stim_info(self) -> Path:
        return self.root / "nsddata" / "experiments" / "nsd" / "nsd_stim_info_merged.csv"

    @property
    def stimuli(self) -> Path:
        return self.root / "nsddata_stimuli" / "stimuli" / "nsd" / "nsd_stimuli.hdf5"

    def coco_annotations(self, kind: str, coco_split: str) -> Path:
        """COCO 2017 annotation file, e.g. kind='captions', coco_split='train2017' (where nsd_access keeps it)."""
        return self.root / "nsddata_stimuli" / "stimuli" / "nsd" / "annotations" / f"{kind}_{coco_split}.json"

    def roi_ctab(self, atlas: str) -> Path:
        """Label table of a surface atlas, e.g. 'streams' -> .../fsaverage/label/streams.mgz.ctab."""
        return self.root / "nsddata" / "freesurfer" / "fsaverage" / "label" / f"{atlas}.mgz.ctab"

    # Per-subject anatomy
    def ppdata(self, subject: int, space: str = DEFAULT_SPACE) -> Path:
        return self.root / "nsddata" / "ppdata" / subject_name(subject) / space

    def roi(self, subject: int, atlas: str, hemi: str | None = None, space: str = DEFAULT_SPACE) -> Path:
        """ROI volume `roi/[lh.|rh.]<atlas>.nii.gz` (X, Y, Z): -1 non-cortical, 0 unlabeled, 1..N labels."""
        if hemi not in (None, "lh", "rh"):
            raise ValueError(f"hemi must be None, 'lh' or 'rh', got {hemi!r}")
        prefix = f"{hemi}." if hemi else ""
        return self.ppdata(subject, space) / "roi" / f"{prefix}{atlas}.nii.gz"

    def roi_dir(self, subject: int, space: str = DEFAULT_SPACE) -> Path:
        return self.ppdata(subject, space) / "roi"

    def brainmask(self, subject: int, space: str = DEFAULT_SPACE) -> Path:
        return self.ppdata(subject, space) / "brainmask.nii.gz"

    # Betas
    def betas_dir(self, subject: int, space: str = DEFAULT_SPACE, beta_type: str = DEFAULT_BETA_TYPE) -> Path:
        return self.root / "nsddata_betas" / "ppdata" / subject_name(subject) / space / beta_type

    def betas(
        self,
        subject: int,
        session: int,
        fmt: str = "hdf5",
        space: str = DEFAULT_SPACE,
        beta_type: str = DEFAULT_BETA_TYPE,
    ) -> Path:
        """Single-trial betas of one session (1-based), `betas_sessionNN.hdf5` or `.nii.gz`."""
        if fmt not in _BETA_SUFFIX:
            raise ValueError(f"betas format must be one of {BETA_FORMATS}, got {fmt!r}")
        return self.betas_dir(subject, space, beta_type) / f"betas_session{int(session):02d}{_BETA_SUFFIX[fmt]}"

    def ncsnr(self, subject: int, space: str = DEFAULT_SPACE, beta_type: str = DEFAULT_BETA_TYPE) -> Path:
        """Noise-ceiling signal-to-noise ratio per voxel (X, Y, Z) float."""
        return self.betas_dir(subject, space, beta_type) / "ncsnr.nii.gz"

    def sessions(self, subject: int, fmt: str = "hdf5", **kw) -> list[int]:
        """1-based session numbers whose beta file exists, ascending."""
        if fmt not in _BETA_SUFFIX:
            raise ValueError(f"betas format must be one of {BETA_FORMATS}, got {fmt!r}")
        suffix = _BETA_SUFFIX[fmt]
        folder = self.betas_dir(subject, **kw)
        found = []
        for path in folder.glob(f"betas_session*{suffix}") if folder.is_dir() else ():
            digits = path.name[len("betas_session") : -len(suffix)]
            if digits.isdigit():
                found.append(int(digits))
        return sorted(found)

    def subjects(self) -> list[int]:
        """Subjects that have a betas folder, ascending."""
        folder = self.root / "nsddata_betas" / "ppdata"
        names = [p.name for p in folder.glob("subj[0-9][0-9]")] if folder.is_dir() else []
        return sorted(int(n[4:]) for n in names)


@dataclass(frozen=True)
class DatasetRoot:
    """The prepared dataset root (`<root>/nsd/...`) shared by every stage after preparation."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def nsd(self) -> Path:
        return self.root / "nsd"

    # fMRI
    @property
    def fmris_dir(self) -> Path:
        """Holds one `subjXX/` folder per prepared subject."""
        return self.nsd / "fmris"

    def fmri_dir(self, subject: int) -> Path:
        return self.fmris_dir / subject_name(subject)

    def area_betas(self, subject: int, area: str, split: str) -> Path:
        """(samples, voxels) float32 z-scored betas of one area; split 'tr' or 'te'."""
        _check_split(split)
        return self.fmri_dir(subject) / "area" / f"nsd_{area}_betas_{split}.npy"

    def area_stats(self, subject: int, area: str, stat: str) -> Path:
        """(voxels,) training statistic of one area; stat 'mean' or 'std'."""
        if stat not in ("mean", "std"):
            raise ValueError(f"stat must be 'mean' or 'std', got {stat!r}")
        return self.fmri_dir(subject) / "area" / f"nsd_{area}_betas_{stat}.npy"

    def whole_betas(self, subject: int, split: str) -> Path:
        """(samples, X, Y, Z) float16 whole-brain volumes, one memory-mappable array per split."""
        _check_split(split)
        return self.fmri_dir(subject) / "whole" / f"nsd_betas_{split}.npy"

    def whole_stats(self, subject: int, stat: str) -> Path:
        """(X, Y, Z) float32 training statistic of the whole-brain volumes; stat 'mean' or 'std'."""
        if stat not in ("mean", "std"):
            raise ValueError(f"stat must be 'mean' or 'std', got {stat!r}")
        return self.fmri_dir(subject) / "whole" / f"nsd_betas_{stat}.npy"

    def whole_meta(self, subject: int) -> Path:
        """Grid, affine, sample counts and normalisation of the whole-brain volumes (JSON)."""
        return self.fmri_dir(subject) / "whole" / "meta.json"

    def whole_masks(self, subject: int) -> Path:
        """Boolean (X, Y, Z) masks (`brain`, `union` of the areas, one per area) in the subject's grid (npz)."""
        return self.fmri_dir(subject) / "whole" / "masks.npz"

    def fmri2image(self, subject: int) -> Path:
        """{"train": [nsdId per sample], "val": [...], ...}: the image of every sample, in sample order."""
        return self.fmri_dir(subject) / "nsd_fmri2image.json"

    # Images and their annotations
    @property
    def images_dir(self) -> Path:
        return self.nsd / "images"

    def image(self, nsd_id: int) -> Path:
        """Lossless PNG of one stimulus; nsd_id is NSD's 0-based 73k index."""
        return self.images_dir / f"nsd_image_{int(nsd_id):06d}.png"

    @property
    def captions(self) -> Path:
        return self.nsd / "nsd_captions.json"

    @property
    def instances(self) -> Path:
        return self.nsd / "nsd_instances.json"

    @property
    def coco_captions(self) -> Path:
        return self.nsd / "nsd_coco_captions.json"

    @property
    def coco_instances(self) -> Path:
        return self.nsd / "nsd_coco_instances.json"

    def gpt_conversation(self, prompt_type: str) -> Path:
        """One JSON line per image (generate_conversation.py); provenance: `io.manifest_of` of it."""
        return self.nsd / "nsd_gpt_conversation" / f"{prompt_type}.jsonl"

    def gpt_conversation_lock(self, prompt_type: str) -> Path:
        """Held while a run appends to the conversation file, so two runs never write it at once."""
        return self.nsd / "nsd_gpt_conversation" / f".{prompt_type}.jsonl.lock"

    def sft_data(self, split: str) -> Path:
        """LLaVA SFT records of one split; one provenance for both splits: `io.manifest_of(sft_data("tr"))`."""
        _check_split(split)
        return self.nsd / f"sft_data_{split}.json"

    # Per-image embeddings (generate_clip_embeds.py): rows in the order of the folder's index.json
    @property
    def vision_embeds_dir(self) -> Path:
        return self.nsd / "vision_embeds"

    @property
    def clip_embeds(self) -> Path:
        """(images, D) float32 CLIP image embeddings (the projected, pooled output)."""
        return self.vision_embeds_dir / "clip_image_embeds.npy"

    @property
    def clip_tokens(self) -> Path:
        """(images, tokens, width) float16 penultimate-layer hidden states of the CLIP vision tower (--tokens)."""
        return self.vision_embeds_dir / "clip_tokens.npy"

    @property
    def clip_index(self) -> Path:
        """{"nsd_ids": [...], ...}: the nsdId of every row of the CLIP arrays, and how they were made."""
        return self.vision_embeds_dir / "index.json"

    @property
    def vae_embeds_dir(self) -> Path:
        return self.nsd / "vae_embeds"

    @property
    def vae_latents(self) -> Path:
        """(images, C, H, W) float32 VAE latent means, scaled by the VAE's scaling_factor."""
        return self.vae_embeds_dir / "vae_latents.npy"

    @property
    def vae_index(self) -> Path:
        return self.vae_embeds_dir / "index.json"

    # Runs (trained models, baselines, predictions): <root>/runs/<stage>/<name>
    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def run_dir(self, stage: str, name: str | None = None) -> Path:
        """Default output folder of a training or evaluation stage, e.g. run_dir("vit3d") -> <root>/runs/vit3d."""
        folder = self.runs_dir / stage
        return folder / name if name else folder

    # Evaluation (tools/evaluate/): predictions of an encoder run, decoded images, scores.
    def predictions(self, run: str, subject: int | None = None, kind: str | None = None) -> Path:
        """Prediction files of encoder run `run` (fmri2embeds.py): <root>/runs/predictions/<run>[/subjXX_<kind>]."""
        folder = self.run_dir("predictions", run)
        return folder if subject is None else folder / f"{subject_name(subject)}_{kind}"

    def reconstructions(self, run: str, decoder: str, subject: int | None = None, kind: str | None = None) -> Path:
        """Images decoded from run `run`'s predictions (embeds2images.py): <root>/runs/recons/<run>_<decoder>[/...]."""
        folder = self.run_dir("recons", f"{run}_{decoder}")
        return folder if subject is None else folder / f"{subject_name(subject)}_{kind}"

    def concepts(self, run: str) -> Path:
        """Concept maps located with ViT3D run `run` (locate_concepts.py): <root>/runs/concepts/<run>."""
        return self.run_dir("concepts", run)

    def generated_texts(self, run: str) -> Path:
        """Texts generated for test samples (retrieve_captions.py, later the LLM): <root>/runs/captions/<run>.jsonl."""
        return self.run_dir("captions") / f"{run}.jsonl"

    @property
    def eval_dir(self) -> Path:
        """Scores (eval_retrieval.py, eval_recon.py, eval_captions.py) and the report: <root>/runs/eval."""
        return self.run_dir("eval")

    # Ridge baseline (tools/evaluate/ridge_baseline.py) under <out> (default run_dir("ridge")):
    # ridge_<area>[_<target>]_subjXX per subject and ridge_<area>[_<target>] the run's summary; that
    # name is also the prefix retrieval_table.py reads. Target "clip" adds no suffix.
    def ridge_run(self, area: str, target: str = "clip", subject: int | None = None, out: Path | None = None) -> Path:
        folder = self.run_dir("ridge") if out is None else Path(out)
        name = f"ridge_{area}" if target == "clip" else f"ridge_{area}_{target}"
        return folder / (name if subject is None else f"{name}_{subject_name(subject)}")

    @staticmethod
    def ridge_subject_runs(prefix: str | Path) -> dict[int, Path]:
        """{subject: folder} of the per-subject folders `<prefix>_subjXX` of a ridge run, ascending."""
        prefix = Path(prefix)
        folders = prefix.parent.glob(f"{prefix.name}_subj[0-9][0-9]") if prefix.parent.is_dir() else ()
        return dict(sorted((int(p.name[-2:]), p) for p in folders if p.is_dir()))


def _check_split(split: str) -> None:
    # The split names and their meaning live in llava_brain.subjects (which imports this module).
    if split not in ("tr", "te"):
        raise ValueError(f"split must be 'tr' (train) or 'te' (test, NSD's shared-1000), got {split!r}")
