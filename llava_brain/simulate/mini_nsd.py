"""mini-NSD: write a small dataset in the exact raw NSD formats, with a learnable brain signal.

`write_mini_nsd(out, MiniNsdConfig(...))` writes the same files a real NSD download has (see
`docs/mini_nsd.md` for the list and how each maps to real NSD), so every reader and stage runs on
it unchanged. The whole tree is built in the hidden sibling `.<name>.partial` (`io.staged_folder`)
and renamed into place, so an interrupted run never leaves a half-written dataset behind, and the
next run removes what a killed one left. The same config gives byte-identical files.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llava_brain.io import staged_folder, write_bytes
from llava_brain.layout import NsdTree
from llava_brain.nsd.constants import BETA_SCALE, GRID_FUNC1PT8MM, MAX_REPEATS, NUM_SUBJECTS, ROI_LABELS, VOXEL_SIZE_MM
from llava_brain.simulate import brain, scenes

log = logging.getLogger(__name__)
# The descriptive text field of a MATLAB v5 file (116 bytes). scipy writes its creation time there;
# a fixed text keeps the design file identical for identical settings.
MAT_HEADER = b"MATLAB 5.0 MAT-file, written by llava_brain mini-NSD".ljust(116)


@dataclass(frozen=True)
class MiniNsdConfig:
    subjects: tuple[int, ...] = (1, 2, 5, 7)
    sessions: int | None = None  # sessions each subject completed; None = the whole design
    seed: int = 0
    num_shared: int = 100  # shared (test) images seen by every subject; NSD: 1000
    images_per_subject: int = 500  # each subject's image list incl. the shared ones; NSD: 10000
    trials_per_session: int = 125  # NSD: 750; 3 x 500 / 125 = 12 sessions
    grid_scale: float = 0.33  # mini grid = round(NSD func1pt8mm grid x scale); ~25 voxels a side
    nifti_subjects: tuple[int, ...] = (1,)  # subjects that also get betas_sessionNN.nii.gz
    snr_range: tuple[float, float] = (0.2, 0.4)  # noise-ceiling SNR of visual voxels (measured median ~0.28)
    val_fraction: float = 0.15  # share of non-shared images that come from COCO val2017

    @property
    def num_images(self) -> int:
        """Images in the tree: the shared ones plus each subject's own."""
        return self.num_shared + (self.images_per_subject - self.num_shared) * len(self.subjects)

    @property
    def design_sessions(self) -> int:
        return MAX_REPEATS * self.images_per_subject // self.trials_per_session

    def settings(self) -> dict:
        """Every field, `sessions` resolved (None -> the design's count): what a rerun compares."""
        return {**asdict(self), "sessions": self.sessions or self.design_sessions}

    def validate(self) -> None:
        if not self.subjects or len(set(self.subjects)) != len(self.subjects):
            raise ValueError(f"subjects must be distinct, got {self.subjects}")
        if any(not 1 <= s <= NUM_SUBJECTS for s in self.subjects):
            raise ValueError(f"subjects must be in 1..{NUM_SUBJECTS}, got {self.subjects}")
        if not 0 < self.num_shared < self.images_per_subject:
            raise ValueError("need 0 < num_shared < images_per_subject")
        if (MAX_REPEATS * self.images_per_subject) % self.trials_per_session:
            raise ValueError(
                f"3 x images_per_subject ({MAX_REPEATS * self.images_per_subject}) must be a multiple of "
                f"trials_per_session ({self.trials_per_session}) so the design fills whole sessions"
            )
        if self.sessions is not None and not 1 <= self.sessions <= self.design_sessions:
            raise ValueError(f"sessions must be in 1..{self.design_sessions} for this design, got {self.sessions}")
        if not set(self.nifti_subjects) <= set(self.subjects):
            raise ValueError(f"nifti_subjects {self.nifti_subjects} must be among subjects {self.subjects}")

    def grid(self, subject: int) -> tuple[int, int, int]:
        return tuple(max(8, round(n * self.grid_scale)) for n in GRID_FUNC1PT8MM[subject])

    @classmethod
    def from_arguments(cls, args: Mapping) -> MiniNsdConfig:
        """The config of make_mini_nsd.py's arguments (its argparse namespace as a dict, or the "arguments" of
        the run.json it writes beside a tree)."""
        return cls(subjects=tuple(args["subject"]), sessions=args["sessions"], seed=args["seed"],
                   num_shared=args["num_shared"], images_per_subject=args["images_per_subject"],
                   trials_per_session=args["trials_per_session"], grid_scale=args["grid_scale"],
                   nifti_subjects=tuple(args["nifti_subjects"]), snr_range=tuple(args["snr"]))  # fmt: skip


def _rng(seed: int, *stream: int) -> np.random.Generator:
    """Independent, reproducible random stream per (seed, component, subject)."""
    return np.random.default_rng([seed, *stream])


def subject_brain(cfg: MiniNsdConfig, subject: int) -> tuple[brain.Anatomy, brain.ResponseModel]:
    """A subject's anatomy and response model. Their random streams are (seed, component, subject): the same
    subject gets the same brain whatever the tree's other subjects or settings but seed, grid and SNR."""
    anat = brain.build_anatomy(_rng(cfg.seed, 10, subject), cfg.grid(subject), VOXEL_SIZE_MM / cfg.grid_scale)
    shared = brain.template_field(_rng(cfg.seed, 13), len(scenes.FEATURE_NAMES))  # the same for every subject
    model = brain.build_response_model(_rng(cfg.seed, 11, subject), anat, len(scenes.FEATURE_NAMES), cfg.snr_range,
                                       shared_semantic=shared)  # fmt: skip
    return anat, model


@dataclass
class _Design:
    shared: np.ndarray  # (K,) 0-based nsdIds
    subject_images: dict[int, np.ndarray]  # subject -> (M,) 0-based nsdIds, shared first
    masterordering: np.ndarray  # (3M,) 0-based list index per global trial
    num_images: int


def tree_scenes(cfg: MiniNsdConfig) -> list[scenes.Scene]:
    """Every scene of the tree, in nsdId order (0-based), as `write_mini_nsd` draws them from the seed."""
    scene_rng = _rng(cfg.seed, 2)
    return [scenes.sample_scene(scene_rng) for _ in range(cfg.num_images)]


def _make_design(cfg: MiniNsdConfig) -> _Design:
    rng = _rng(cfg.seed, 1)
    unique, num_images = cfg.images_per_subject - cfg.num_shared, cfg.num_images
    # nsdIds are scattered: shared images are not 0..K-1, so index mix-ups show up in tests.
    order = rng.permutation(num_images)
    shared = order[: cfg.num_shared]
    subject_images = {
        s: np.concatenate([shared, order[cfg.num_shared + i * unique : cfg.num_shared + (i + 1) * unique]])
        for i, s in enumerate(cfg.subjects)
    }
    # Like NSD's masterordering: one trial sequence for all subjects, every list entry 3 times,
    # repeats at random distances (within and across sessions).
    masterordering = rng.permutation(np.repeat(np.arange(cfg.images_per_subject), MAX_REPEATS))
    return _Design(np.sort(shared), subject_images, masterordering, num_images)


def write_mini_nsd(
    out: str | Path,
    cfg: MiniNsdConfig,
    progress: bool = True,
    replace: bool = False,
    finish: Callable[[Path, dict], None] | None = None,
) -> dict:
    """Write a complete mini-NSD tree at `out` and return its summary.

    `out` must not exist unless `replace` (then the finished tree replaces it in one swap).
    `finish(staging, summary)` runs last inside the staging folder, before the swap (the CLI writes
    its run.json there, so the provenance arrives with the tree).
    """
    cfg.validate()
    out = Path(out)
    if out.exists() and not replace:
        raise FileExistsError(f"{out} exists; remove it or choose another folder")
    with staged_folder(out) as staging:
        summary = _write_tree(NsdTree(staging), cfg, progress)
        if finish is not None:
            finish(staging, summary)
    return summary


def _write_tree(tree: NsdTree, cfg: MiniNsdConfig, progress: bool) -> dict:
    start = time.perf_counter()
    design = _make_design(cfg)
    all_scenes = tree_scenes(cfg)
    stimuli = np.stack([scenes.render_stimulus(s) for s in tqdm(all_scenes, "render scenes", disable=not progress)])
    thumbs = scenes.thumbnails(stimuli, brain.RF_GRID)
    semantic = np.stack([scenes.semantic_features(s) for s in all_scenes])

    split_rng = _rng(cfg.seed, 3)
    is_val = split_rng.random(design.num_images) < cfg.val_fraction
    is_val[design.shared] = False  # NSD's shared-1000 all come from COCO train2017
    coco_ids = split_rng.choice(np.arange(1, 600_000), size=design.num_images, replace=False)

    num_sessions = cfg.sessions or cfg.design_sessions
    trials_done = num_sessions * cfg.trials_per_session
    subjects = {}
    for subject in cfg.subjects:
        subjects[subject] = _write_subject(tree, cfg, subject, design, thumbs, semantic, num_sessions, progress)

    _write_expdesign(tree, cfg, design)
    _write_stim_info(tree, cfg, design, all_scenes, coco_ids, is_val, trials_done)
    _write_stimuli(tree, stimuli)
    _write_coco(tree, all_scenes, coco_ids, is_val)
    _write_ctabs(tree)
    return {
        "subjects": subjects,
        "num_images": design.num_images,
        "num_shared": cfg.num_shared,
        "sessions_per_subject": num_sessions,
        "trials_per_session": cfg.trials_per_session,
        "seconds": round(time.perf_counter() - start, 1),
    }


def _write_subject(tree, cfg, subject, design, thumbs, semantic, num_sessions, progress) -> dict:
    import h5py
    import nibabel as nib

    grid = cfg.grid(subject)
    voxel_mm = VOXEL_SIZE_MM / cfg.grid_scale  # same physical head size as NSD, coarser voxels
    anat, model = subject_brain(cfg, subject)
    noise_rng = _rng(cfg.seed, 12, subject)

    def save_volume(path: Path, data: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, anat.affine), path)

    save_volume(tree.brainmask(subject), anat.brain.astype(np.int16))
    for atlas, labels in (("nsdgeneral", anat.nsdgeneral), ("streams", anat.streams)):
        save_volume(tree.roi(subject, atlas), labels)
        for hemi in ("lh", "rh"):
            save_volume(tree.roi(subject, atlas, hemi), anat.hemisphere(labels, hemi))
    ncsnr = np.zeros(grid, np.float32)
    ncsnr[anat.brain] = model.ncsnr
    save_volume(tree.ncsnr(subject), ncsnr)

    images = design.subject_images[subject]
    signal = brain.image_responses(model, thumbs[images], semantic[images])  # (M, V), row = list index
    offset_sd = 0.25 * model.noise_sd
    for session in tqdm(range(1, num_sessions + 1), f"subj{subject:02d} sessions", disable=not progress):
        first = (session - 1) * cfg.trials_per_session
        list_index = design.masterordering[first : first + cfg.trials_per_session]
        offset = noise_rng.standard_normal(model.noise_sd.shape, dtype=np.float32) * offset_sd
        psc = brain.trial_betas(noise_rng, model, signal[list_index], offset)
        raw = np.clip(np.rint(psc * BETA_SCALE), -32768, 32767).astype(np.int16)
        volume = np.zeros((cfg.trials_per_session, *grid), np.int16)  # (T, X, Y, Z); non-brain voxels stay 0
        volume[:, anat.brain] = raw
        path = tree.betas(subject, session, "hdf5")
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as f:
            # NSD's layout: (T, Z, Y, X) in h5py, uncompressed, one chunk per voxel holding all trials.
            f.create_dataset("betas", data=volume.transpose(0, 3, 2, 1), chunks=(len(volume), 1, 1, 1))
        if subject in cfg.nifti_subjects:
            save_volume(tree.betas(subject, session, "nifti"), np.ascontiguousarray(np.moveaxis(volume, 0, -1)))
    return {
        "grid": list(grid),
        "voxel_mm": round(voxel_mm, 3),
        "brain_voxels": int(anat.brain.sum()),
        "nsdgeneral_voxels": int((anat.nsdgeneral > 0).sum()),
        "streams_voxels": {name: int((anat.streams == i + 1).sum()) for i, name in enumerate(brain.STREAMS)},
        "nifti": subject in cfg.nifti_subjects,
    }


def _write_expdesign(tree: NsdTree, cfg: MiniNsdConfig, design: _Design) -> None:
    from scipy.io import savemat

    subjectim = np.zeros((NUM_SUBJECTS, cfg.images_per_subject))  # 0 = subject not in this design
    for subject, images in design.subject_images.items():
        subjectim[subject - 1] = images + 1  # 1-based 73k ids, as MATLAB wrote them
    buffer = io.BytesIO()
    savemat(
        buffer,
        {
            "masterordering": (design.masterordering + 1)[None, :].astype(np.float64),
            "subjectim": subjectim,
            "sharedix": (design.shared + 1)[None, :].astype(np.float64),
        },
    )
    write_bytes(tree.expdesign, MAT_HEADER + buffer.getvalue()[len(MAT_HEADER) :])


def _write_stim_info(tree, cfg, design, all_scenes, coco_ids, is_val, trials_done) -> None:
    reps = {s: np.zeros((design.num_images, MAX_REPEATS), np.int64) for s in range(1, NUM_SUBJECTS + 1)}
    for subject, images in design.subject_images.items():
        trial_images = images[design.masterordering[:trials_done]]
        seen = np.zeros(design.num_images, np.int64)
        for trial, nsd_id in enumerate(trial_images):
            reps[subject][nsd_id, seen[nsd_id]] = trial + 1  # 1-based global trial number; 0 = not shown
            seen[nsd_id] += 1
    shared = np.zeros(design.num_images, bool)
    shared[design.shared] = True
    header = ["", "cocoId", "cocoSplit", "cropBox", "loss", "nsdId", "flagged", "BOLD5000", "shared1000"]
    header += [f"subject{s}" for s in range(1, NUM_SUBJECTS + 1)]
    header += [f"subject{s}_rep{r}" for s in range(1, NUM_SUBJECTS + 1) for r in range(MAX_REPEATS)]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for i, scene in enumerate(all_scenes):
        row = [i, int(coco_ids[i]), "val2017" if is_val[i] else "train2017", str(tuple(scene.crop_box)), 0.0, i]
        row += [False, False, bool(shared[i])]
        row += [int(reps[s][i, 0] > 0) for s in range(1, NUM_SUBJECTS + 1)]
        row += [int(reps[s][i, r]) for s in range(1, NUM_SUBJECTS + 1) for r in range(MAX_REPEATS)]
        writer.writerow(row)
    tree.stim_info.write_text(buf.getvalue())


def _write_stimuli(tree: NsdTree, stimuli: np.ndarray) -> None:
    import h5py

    tree.stimuli.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(tree.stimuli, "w") as f:
        # Rendered scenes compress ~90x (921 MB -> 9.9 MB); real NSD's brick is ~40 GB of photographs.
        f.create_dataset("imgBrick", data=stimuli, chunks=(1, *stimuli.shape[1:]), compression="gzip",
                         compression_opts=1)  # fmt: skip


def _write_coco(tree: NsdTree, all_scenes, coco_ids, is_val) -> None:
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(scenes.SHAPES)]
    for split in ("train2017", "val2017"):
        members = [i for i in range(len(all_scenes)) if is_val[i] == (split == "val2017")]
        images, caps, insts = [], [], []
        for i in members:
            scene, coco_id = all_scenes[i], int(coco_ids[i])
            images.append({"id": coco_id, "width": scene.width, "height": scene.height,
                           "file_name": f"{coco_id:012d}.jpg", "license": 1})  # fmt: skip
            for text in scenes.captions(scene):
                caps.append({"id": 0, "image_id": coco_id, "caption": text})
            for obj in scene.objects:
                polygon = [round(float(v), 2) for xy in obj.polygon() for v in xy]
                insts.append({"id": 0, "image_id": coco_id, "category_id": scenes.SHAPES.index(obj.shape) + 1,
                              "segmentation": [polygon], "area": round(obj.area(), 2),
                              "bbox": obj.bbox(scene.width, scene.height), "iscrowd": 0})  # fmt: skip
        for n, ann in enumerate(caps, start=1):
            ann["id"] = n
        for n, ann in enumerate(insts, start=1):
            ann["id"] = n
        info = {"description": "mini-NSD simulated COCO-format annotations", "version": "1.0"}
        licenses = [{"id": 1, "name": "CC BY 4.0 (simulated data)", "url": ""}]
        base = {"info": info, "licenses": licenses, "images": images}
        for kind, payload in (
            ("captions", {"annotations": caps}),
            ("instances", {"annotations": insts, "categories": categories}),
        ):
            path = tree.coco_annotations(kind, split)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({**base, **payload}))


def _write_ctabs(tree: NsdTree) -> None:
    for atlas in ("nsdgeneral", "streams"):
        lines = ["0 Unknown 0 0 0 0"]
        rng = _rng(0, 99)
        for index, name in ROI_LABELS[atlas].items():
            r, g, b = rng.integers(0, 256, 3)
            lines.append(f"{index} {name} {r} {g} {b} 0")
        path = tree.roi_ctab(atlas)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
