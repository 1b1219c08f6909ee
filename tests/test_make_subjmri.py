"""make_subjmri: raw NSD betas -> z-scored whole-brain and area arrays, split by the shared images.

Expected values are recomputed here from the raw files (h5py, nibabel, scipy) without the
library's readers, so a reader and the extractor cannot agree on the same mistake. Reruns, kills
and bad input: tests/test_make_subjmri_reruns.py; the HDF5 chunk reader: test_betas_chunk_reader.py.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from scipy.io import loadmat

from llava_brain.layout import DatasetRoot, NsdTree
from llava_brain.nsd import extract
from llava_brain.nsd.design import ExpDesign, repeat_index

from conftest import SMALL, load_script
from stage_checks import assert_same_files

make_subjmri = load_script("prepare_datasets/make_subjmri.py")

TPS = SMALL["trials_per_session"]  # 30 trials per session in the small tree (3 sessions done)
STREAMS = ["early", "midventral", "midlateral", "midparietal", "ventral", "lateral", "parietal"]
AREAS = ["nsdgeneral", *STREAMS]  # the default --areas nsdgeneral streams
# float16 keeps 11 significant bits: relative error <= 2**-11 (plus the float32 arithmetic before it).
F16 = dict(rtol=2e-3, atol=2e-3)


def run(tree: NsdTree | Path, root: Path, *extra: str) -> int:
    """make_subjmri.main in this process (quiet); returns its exit code."""
    nsd_root = tree.root if isinstance(tree, NsdTree) else tree
    return make_subjmri.main(["--nsd-root", str(nsd_root), "--dataset-root", str(root), "--quiet", *extra])


def fmris(root: Path) -> Path:
    return DatasetRoot(root).nsd / "fmris"


def raw_sessions(tree: NsdTree, subject: int) -> dict[int, np.ndarray]:
    """session -> (T, X, Y, Z) int16, read with plain h5py from the (T, Z, Y, X) HDF5 files."""
    out = {}
    for path in sorted(tree.betas_dir(subject).glob("betas_session*.hdf5")):
        session = int(path.name[len("betas_session") : -len(".hdf5")])
        with h5py.File(path, "r") as f:
            out[session] = f["betas"][()].transpose(0, 3, 2, 1)
    return out


def raw_trials(sessions: dict[int, np.ndarray], trials) -> np.ndarray:
    """(n, X, Y, Z) int16 of 0-based global trials: session = trial // TPS + 1, trial % TPS inside it."""
    return np.stack([sessions[t // TPS + 1][t % TPS] for t in trials])


def zscore(raw: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(beta/300 - mean)/std with ddof-0 statistics of `train` (float64); 0 where std is 0."""
    psc, train = raw.astype(np.float64) / 300.0, train.astype(np.float64) / 300.0
    mean, std = train.mean(0), train.std(0)
    z = np.divide(psc - mean, std, out=np.zeros_like(psc), where=std > 0)
    return z, mean, std


def design_arrays(tree: NsdTree, subject: int) -> tuple[np.ndarray, np.ndarray]:
    """(nsdId shown to `subject` at every trial of the design, shared nsdIds), 0-based, read with scipy."""
    mat = loadmat(tree.expdesign)
    order = mat["masterordering"][0].astype(np.int64) - 1
    images = mat["subjectim"][subject - 1].astype(np.int64) - 1
    return images[order], mat["sharedix"][0].astype(np.int64) - 1


def leftovers(root: Path) -> list[str]:
    """Names under <root>/nsd/fmris/ (subject folders, .subjXX.partial staging, ...), sorted."""
    return sorted(p.name for p in fmris(root).iterdir()) if fmris(root).exists() else []


@pytest.fixture(scope="module")
def prepared(small_tree, tmp_path_factory) -> Path:
    """Dataset root prepared from the small tree with every default (both subjects, all sessions)."""
    root = tmp_path_factory.mktemp("prepared")
    assert run(small_tree, root) == 0
    return root


# --------------------------------------------------------------------------------------------
# 1. Values


@pytest.mark.parametrize("subject", [1, 5])
def test_whole_brain_rows_are_train_zscores_of_the_raw_trials(small_tree, prepared, subject):
    """Row i of nsd_betas_{tr,te} is (beta/300 - mean)/std of the trial listed at i in nsd_fmri2image.json,
    with ddof-0 statistics over all training trials (= nsd_betas_{mean,std}.npy); zero-std voxels are 0."""
    layout = DatasetRoot(prepared)
    mapping = json.loads(layout.fmri2image(subject).read_text())
    sessions = raw_sessions(small_tree, subject)
    train = raw_trials(sessions, mapping["train_trial"])
    _, mean, std = zscore(train, train)

    stored_mean = np.load(layout.whole_stats(subject, "mean"))
    stored_std = np.load(layout.whole_stats(subject, "std"))
    assert stored_mean.dtype == stored_std.dtype == np.float32
    np.testing.assert_allclose(stored_mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stored_std, std, rtol=1e-5, atol=1e-6)

    for key, split in (("train", "tr"), ("val", "te")):
        stored = np.load(layout.whole_betas(subject, split), mmap_mode="r")
        trials = mapping[f"{key}_trial"]
        assert stored.dtype == np.float16
        assert stored.shape == (len(trials), *mean.shape)
        z, _, _ = zscore(raw_trials(sessions, trials), train)
        np.testing.assert_allclose(stored.astype(np.float64), z, **F16)
        assert np.all(stored[:, std == 0] == 0)
        # Spot check row by row against the session file itself, trial picked by session/position.
        for row in (0, len(trials) // 2, len(trials) - 1):
            t = trials[row]
            with h5py.File(small_tree.betas(subject, t // TPS + 1), "r") as f:
                beta = f["betas"][t % TPS].transpose(2, 1, 0).astype(np.float64) / 300
            expected = np.divide(beta - mean, std, out=np.zeros_like(beta), where=std > 0)
            np.testing.assert_allclose(stored[row].astype(np.float64), expected, **F16)
    assert (std == 0).any() and (std > 0).any()  # the brain does not fill the grid: both cases are exercised


@pytest.mark.parametrize("subject", [1, 5])
def test_area_arrays_are_whole_brain_zscores_at_the_mask_voxels(small_tree, prepared, subject):
    """area/nsd_{area}_betas_{tr,te} (float32) hold the z-scores at the area's mask voxels, C order over
    (X, Y, Z), and nsd_{area}_betas_{mean,std} are the whole-brain statistics at those voxels."""
    layout = DatasetRoot(prepared)
    mapping = json.loads(layout.fmri2image(subject).read_text())
    sessions = raw_sessions(small_tree, subject)
    train = raw_trials(sessions, mapping["train_trial"])
    masks = np.load(layout.whole_masks(subject))
    mean = np.load(layout.whole_stats(subject, "mean"))
    std = np.load(layout.whole_stats(subject, "std"))
    for key, split in (("train", "tr"), ("val", "te")):
        z, _, _ = zscore(raw_trials(sessions, mapping[f"{key}_trial"]), train)
        whole = np.load(layout.whole_betas(subject, split)).astype(np.float64)
        for area in AREAS:
            mask = masks[area]
            x, y, zz = np.nonzero(mask)
            stored = np.load(layout.area_betas(subject, area, split))
            assert stored.dtype == np.float32
            assert stored.shape == (len(mapping[key]), int(mask.sum())) and mask.sum() > 0
            np.testing.assert_allclose(stored, z[:, x, y, zz], rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(stored, whole[:, x, y, zz], **F16)
    for area in AREAS:
        mask = masks[area]
        area_mean = np.load(layout.area_stats(subject, area, "mean"))
        area_std = np.load(layout.area_stats(subject, area, "std"))
        np.testing.assert_array_equal(area_mean, mean[mask])  # boolean indexing is C order over X, Y, Z
        np.testing.assert_array_equal(area_std, std[mask])


@pytest.mark.parametrize("subject", [1, 5])
def test_masks_follow_the_roi_volumes(small_tree, prepared, subject):
    """masks.npz: brain = brainmask > 0, nsdgeneral = its ROI > 0, one mask per streams label named by
    the label table (early ... parietal), union = OR of the areas; meta.json describes the grid."""
    layout = DatasetRoot(prepared)
    masks = np.load(layout.whole_masks(subject))
    assert sorted(masks.files) == sorted(["brain", "union", *AREAS])
    brain = np.asanyarray(nib.load(small_tree.brainmask(subject)).dataobj) > 0
    general = np.asanyarray(nib.load(small_tree.roi(subject, "nsdgeneral")).dataobj)
    streams = np.asanyarray(nib.load(small_tree.roi(subject, "streams")).dataobj)
    np.testing.assert_array_equal(masks["brain"], brain)
    np.testing.assert_array_equal(masks["nsdgeneral"], general > 0)
    for label, name in enumerate(STREAMS, start=1):
        np.testing.assert_array_equal(masks[name], streams == label)
    np.testing.assert_array_equal(masks["union"], (general > 0) | (streams > 0))
    assert all(masks[name].dtype == bool for name in masks.files)

    meta = json.loads(layout.whole_meta(subject).read_text())
    assert meta["grid"] == list(brain.shape)
    assert meta["sessions"] == [1, 2, 3] and meta["trials_per_session"] == TPS
    assert meta["areas"] == {name: int(masks[name].sum()) for name in AREAS}
    np.testing.assert_allclose(meta["affine"], nib.load(small_tree.brainmask(subject)).affine)


def test_block_size_and_prefetch_do_not_change_the_output(small_tree, prepared, tmp_path, monkeypatch):
    """Copy/z-score blocks that do not divide the sessions (7 trials) and prefetch 0 or 3 give the same bytes."""
    monkeypatch.setattr(extract, "BLOCK_TRIALS", 7)
    assert run(small_tree, tmp_path / "a", "--prefetch", "0") == 0
    assert run(small_tree, tmp_path / "b", "--prefetch", "3") == 0
    for subject in ("subj01", "subj05"):
        assert_same_files(fmris(prepared) / subject, fmris(tmp_path / "a") / subject)
        assert_same_files(fmris(prepared) / subject, fmris(tmp_path / "b") / subject)


# --------------------------------------------------------------------------------------------
# 2. Split and mapping


@pytest.mark.parametrize("subject", [1, 5])
def test_split_and_image_mapping_follow_the_design(small_tree, prepared, subject):
    """train/val hold the image of each listed trial; val = exactly the trials of shared images, train none;
    trials are chronological and together cover every trial done; counts match the arrays and meta.json."""
    layout = DatasetRoot(prepared)
    mapping = json.loads(layout.fmri2image(subject).read_text())
    n = 3 * TPS
    images, shared = design_arrays(small_tree, subject)
    design = ExpDesign.load(small_tree.expdesign)
    np.testing.assert_array_equal(design.trial_images(subject, n), images[:n])
    meta = json.loads(layout.whole_meta(subject).read_text())
    for key, split in (("train", "tr"), ("val", "te")):
        trials = np.array(mapping[f"{key}_trial"])
        assert np.all(np.diff(trials) > 0)
        np.testing.assert_array_equal(mapping[key], images[trials])
        is_shared = np.isin(mapping[key], shared)
        assert is_shared.all() if key == "val" else not is_shared.any()
        np.testing.assert_array_equal(design.is_shared(np.array(mapping[key])), key == "val")
        count = len(mapping[key])
        assert count == len(mapping[f"{key}_repeat"]) == len(trials) == meta["samples"][key]
        assert np.load(layout.whole_betas(subject, split), mmap_mode="r").shape[0] == count
        assert np.load(layout.area_betas(subject, "early", split), mmap_mode="r").shape[0] == count
    every = np.sort(np.r_[mapping["train_trial"], mapping["val_trial"]])
    np.testing.assert_array_equal(every, np.arange(n))
    assert 0 < len(mapping["val"]) < len(mapping["train"])


@pytest.mark.parametrize("subject", [1, 5])
def test_repeat_counts_earlier_presentations_of_the_image(small_tree, prepared, subject):
    """{train,val}_repeat = how often the image was shown before that trial (repeat_index over the full
    sequence), consistent with nsd_stim_info_merged.csv's subjectK_repN (1-based trial numbers)."""
    mapping = json.loads(DatasetRoot(prepared).fmri2image(subject).read_text())
    images, _ = design_arrays(small_tree, subject)
    images = images[: 3 * TPS]
    seen: dict[int, int] = {}
    expected = []
    for image in images:
        expected.append(seen.get(int(image), 0))
        seen[int(image)] = expected[-1] + 1
    np.testing.assert_array_equal(repeat_index(images), expected)
    with open(small_tree.stim_info, newline="") as f:
        header, *rows = csv.reader(f)
    reps = {r: np.array([int(row[header.index(f"subject{subject}_rep{r}")]) for row in rows]) for r in range(3)}
    for key in ("train", "val"):
        trials = np.array(mapping[f"{key}_trial"])
        repeat = np.array(mapping[f"{key}_repeat"])
        np.testing.assert_array_equal(repeat, np.array(expected)[trials])
        for image, rep, trial in zip(mapping[key], repeat, trials, strict=True):
            assert reps[int(rep)][image] == trial + 1
    assert max(max(mapping["train_repeat"]), max(mapping["val_repeat"])) >= 1  # repeats occur


# --------------------------------------------------------------------------------------------
# 3. Session selection


def test_session_subset_holds_exactly_its_trials_and_its_own_statistics(small_tree, prepared, tmp_path):
    """--sessions 2-3: rows are the trials of sessions 2 and 3 only, z-scored with their training trials;
    repeats still count the presentations of session 1."""
    root = tmp_path / "root"
    assert run(small_tree, root, "--subject", "1", "--sessions", "2-3") == 0
    layout, full = DatasetRoot(root), DatasetRoot(prepared)
    mapping = json.loads(layout.fmri2image(1).read_text())
    full_mapping = json.loads(full.fmri2image(1).read_text())
    for key in ("train", "val"):
        keep = [i for i, t in enumerate(full_mapping[f"{key}_trial"]) if t >= TPS]
        for field in ("", "_trial", "_repeat"):
            assert mapping[key + field] == [full_mapping[key + field][i] for i in keep]
    assert sorted(mapping["train_trial"] + mapping["val_trial"]) == list(range(TPS, 3 * TPS))

    sessions = raw_sessions(small_tree, 1)
    train = raw_trials(sessions, mapping["train_trial"])
    _, mean, std = zscore(train, train)
    np.testing.assert_allclose(np.load(layout.whole_stats(1, "mean")), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.load(layout.whole_stats(1, "std")), std, rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.load(full.whole_stats(1, "std")), std)  # session 1 really left out
    for key, split in (("train", "tr"), ("val", "te")):
        z, _, _ = zscore(raw_trials(sessions, mapping[f"{key}_trial"]), train)
        np.testing.assert_allclose(np.load(layout.whole_betas(1, split)).astype(np.float64), z, **F16)
    meta = json.loads(layout.whole_meta(1).read_text())
    assert meta["sessions"] == [2, 3]
    assert meta["samples"] == {"train": len(mapping["train"]), "val": len(mapping["val"])}
    assert not (fmris(root) / "subj05").exists()


def test_sessions_all_equals_the_default(small_tree, prepared, tmp_path):
    """--sessions all, '1-3' and '3,1-2' give the default output byte for byte (run.json aside)."""
    for spec in ("all", "1-3", "3,1-2"):
        root = tmp_path / spec.replace(",", "_")
        assert run(small_tree, root, "--subject", "5", "--sessions", spec) == 0
        assert_same_files(fmris(prepared) / "subj05", fmris(root) / "subj05")


# --------------------------------------------------------------------------------------------
# 4. NIfTI input


def test_nifti_betas_give_the_hdf5_output_byte_for_byte(small_tree, prepared, tmp_path):
    """--betas-format nifti reads betas_sessionNN.nii.gz (X, Y, Z, T) and writes the same bytes as HDF5;
    --subject all then means the subjects that have NIfTI betas (only subj01 in the small tree)."""
    assert run(small_tree, tmp_path, "--betas-format", "nifti") == 0
    assert leftovers(tmp_path) == ["subj01"]
    assert_same_files(fmris(prepared) / "subj01", fmris(tmp_path) / "subj01")
    settings = json.loads((fmris(tmp_path) / "subj01" / "run.json").read_text())["settings"]
    assert settings["betas_format"] == "nifti"
