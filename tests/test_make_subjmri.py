"""make_subjmri: raw NSD betas -> z-scored whole-brain and area arrays, split by the shared images.

Expected values are recomputed here from the raw files (h5py, nibabel, scipy) without the
library's readers, so a reader and the extractor cannot agree on the same mistake.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from scipy.io import loadmat, savemat

from llava_brain.layout import DatasetRoot, NsdTree
from llava_brain.nsd import extract
from llava_brain.nsd.betas import BetaSession
from llava_brain.nsd.design import ExpDesign, repeat_index
from llava_brain.simulate import MiniNsdConfig, write_mini_nsd

from conftest import REPO, SMALL, load_script

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


def output_bytes(subject_dir: Path) -> dict[str, bytes]:
    """Every file of a subject folder except run.json (which records argv, time and host), by relative path."""
    return {
        str(p.relative_to(subject_dir)): p.read_bytes()
        for p in sorted(subject_dir.rglob("*"))
        if p.is_file() and p.name != "run.json"
    }


def assert_same_outputs(a: Path, b: Path) -> None:
    left, right = output_bytes(a), output_bytes(b)
    assert sorted(left) == sorted(right)
    different = [name for name in left if left[name] != right[name]]
    assert not different, f"files differ between {a} and {b}: {different}"


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


def error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


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
        assert_same_outputs(fmris(prepared) / subject, fmris(tmp_path / "a") / subject)
        assert_same_outputs(fmris(prepared) / subject, fmris(tmp_path / "b") / subject)


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
        assert_same_outputs(fmris(prepared) / "subj05", fmris(root) / "subj05")


# --------------------------------------------------------------------------------------------
# 4. NIfTI input


def test_nifti_betas_give_the_hdf5_output_byte_for_byte(small_tree, prepared, tmp_path):
    """--betas-format nifti reads betas_sessionNN.nii.gz (X, Y, Z, T) and writes the same bytes as HDF5;
    --subject all then means the subjects that have NIfTI betas (only subj01 in the small tree)."""
    assert run(small_tree, tmp_path, "--betas-format", "nifti") == 0
    assert leftovers(tmp_path) == ["subj01"]
    assert_same_outputs(fmris(prepared) / "subj01", fmris(tmp_path) / "subj01")
    settings = json.loads((fmris(tmp_path) / "subj01" / "run.json").read_text())["settings"]
    assert settings["betas_format"] == "nifti"


# --------------------------------------------------------------------------------------------
# 5. Reruns


def test_rerun_skips_refuses_other_settings_and_overwrite_redoes(small_tree, tmp_path, capsys):
    """Same settings: nothing is rewritten. Other --sessions: exit 2 naming run.json and --overwrite,
    nothing touched. --overwrite: the subject is redone with the new settings."""
    root = tmp_path / "root"
    assert run(small_tree, root, "--subject", "1") == 0
    subject_dir = fmris(root) / "subj01"
    before = {p: p.stat().st_mtime_ns for p in subject_dir.rglob("*")}
    content = output_bytes(subject_dir)
    time.sleep(0.02)  # so a rewrite would show in the nanosecond mtimes

    assert run(small_tree, root, "--subject", "1") == 0
    assert {p: p.stat().st_mtime_ns for p in subject_dir.rglob("*")} == before
    capsys.readouterr()

    assert run(small_tree, root, "--subject", "1", "--sessions", "1-2") == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {subject_dir / 'run.json'}: ")
    assert "--overwrite" in line
    assert {p: p.stat().st_mtime_ns for p in subject_dir.rglob("*")} == before

    assert run(small_tree, root, "--subject", "1", "--sessions", "1-2", "--overwrite") == 0
    assert json.loads(DatasetRoot(root).whole_meta(1).read_text())["sessions"] == [1, 2]
    assert json.loads((subject_dir / "run.json").read_text())["settings"]["sessions"] == [1, 2]
    assert output_bytes(subject_dir) != content
    assert run(small_tree, tmp_path / "fresh", "--subject", "1", "--sessions", "1-2") == 0
    assert_same_outputs(fmris(tmp_path / "fresh") / "subj01", subject_dir)
    assert leftovers(root) == ["subj01"]  # no .partial / .old left


# --------------------------------------------------------------------------------------------
# 6. Kill and resume


KILL_TREE = dict(subjects=(1, 2), grid_scale=0.33, images_per_subject=100, num_shared=20, trials_per_session=75,
                 nifti_subjects=())  # fmt: skip


def _start(tree: Path, root: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "prepare_datasets/make_subjmri.py", "--nsd-root", str(tree), "--dataset-root", str(root),
           "--quiet"]  # fmt: skip
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"run ended (rc {proc.returncode}) before the kill point: {proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("kill point not reached in time")
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def _assert_no_incomplete_subject(root: Path, reference: Path) -> None:
    for folder in fmris(root).glob("subj*"):
        assert_same_outputs(fmris(reference) / folder.name, folder)
        assert (folder / "run.json").is_file()


def test_killed_run_resumes_to_the_uninterrupted_output(tmp_path):
    """SIGKILL mid-subject, then again just after subj01 is finished: no subjXX folder is ever incomplete,
    a rerun finishes, and every file equals an uninterrupted run's; no staging folder remains."""
    tree = tmp_path / "nsd"
    write_mini_nsd(tree, MiniNsdConfig(**KILL_TREE), progress=False)
    reference = tmp_path / "reference"
    assert run(tree, reference) == 0

    root = tmp_path / "root"
    staging = fmris(root) / ".subj01.partial"
    # Kill 1: subj01 is half-written (its whole-brain arrays exist inside the staging folder).
    proc = _start(tree, root)
    _kill_when(proc, lambda: (staging / "whole" / "nsd_betas_te.npy").exists())
    assert staging.is_dir() and not (fmris(root) / "subj01").exists()
    _assert_no_incomplete_subject(root, reference)

    # Kill 2: the rerun cleans the staging folder, finishes subj01 and is killed right after.
    proc = _start(tree, root)
    _kill_when(proc, lambda: (fmris(root) / "subj01").is_dir())
    _assert_no_incomplete_subject(root, reference)
    assert not (fmris(root) / "subj02").exists()
    mtimes = {p: p.stat().st_mtime_ns for p in (fmris(root) / "subj01").rglob("*")}

    assert run(tree, root) == 0
    assert leftovers(root) == ["subj01", "subj02"]  # no .partial left
    assert {p: p.stat().st_mtime_ns for p in (fmris(root) / "subj01").rglob("*")} == mtimes  # skipped
    for subject in ("subj01", "subj02"):
        assert_same_outputs(fmris(reference) / subject, fmris(root) / subject)


@pytest.mark.parametrize("leftover", [".subj01.partial", ".subj01.old"])
def test_rerun_leaves_no_staging_of_a_killed_overwrite(small_tree, tmp_path, leftover):
    """A run killed during --overwrite leaves subj01/ (old, finished) plus .subj01.partial, or, killed
    between the two renames of the swap, .subj01.old plus .subj01.partial. The next run must not keep
    these hidden copies (at NSD scale ~40 GB each) forever."""
    root = tmp_path / "root"
    assert run(small_tree, root, "--subject", "1") == 0
    subject_dir = fmris(root) / "subj01"
    if leftover == ".subj01.partial":  # killed while the redo was being staged
        shutil.copytree(subject_dir, fmris(root) / leftover)
    else:  # killed after `final.rename(old)`, before `staging.rename(final)`
        shutil.copytree(subject_dir, fmris(root) / ".subj01.partial")
        subject_dir.rename(fmris(root) / leftover)
    assert run(small_tree, root, "--subject", "1") == 0
    assert leftovers(root) == ["subj01"]


# --------------------------------------------------------------------------------------------
# 7. Bad input


def _rewrite_betas(path: Path, data: np.ndarray, **kw) -> None:
    path.unlink()
    with h5py.File(path, "w") as f:
        f.create_dataset("betas", data=data, **kw)


def _session(tree: NsdTree, session: int) -> np.ndarray:
    with h5py.File(tree.betas(1, session), "r") as f:
        return f["betas"][()]


def damage_missing_session(tree: NsdTree) -> Path:
    tree.betas(1, 2).unlink()
    return tree.betas(1, 2)


def damage_trial_count(tree: NsdTree) -> Path:
    _rewrite_betas(tree.betas(1, 2), _session(tree, 2)[:20], chunks=(20, 1, 1, 1))
    return tree.betas(1, 2)


def damage_dtype(tree: NsdTree) -> Path:
    _rewrite_betas(tree.betas(1, 3), _session(tree, 3).astype(np.float32))
    return tree.betas(1, 3)


def damage_rank(tree: NsdTree) -> Path:
    _rewrite_betas(tree.betas(1, 2), _session(tree, 2)[:, 0])
    return tree.betas(1, 2)


def damage_session_grid(tree: NsdTree) -> Path:
    _rewrite_betas(tree.betas(1, 3), _session(tree, 3)[:, :, :, :-1])
    return tree.betas(1, 3)


def damage_roi_grid(tree: NsdTree) -> Path:
    path = tree.roi(1, "nsdgeneral")
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)[:-1, :, 1:]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), img.affine), path)
    return path


def damage_brainmask_grid(tree: NsdTree) -> Path:
    path = tree.brainmask(1)
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 7), np.int16), img.affine), path)
    return path


def damage_design(tree: NsdTree) -> Path:
    tree.expdesign.unlink()
    return tree.expdesign


def damage_not_hdf5(tree: NsdTree) -> Path:
    tree.betas(1, 1).write_bytes(b"not an hdf5 file\n" * 100)
    return tree.betas(1, 1)


@pytest.mark.parametrize(
    "damage",
    [
        damage_missing_session,
        damage_trial_count,
        damage_dtype,
        damage_rank,
        damage_session_grid,
        damage_roi_grid,
        damage_brainmask_grid,
        damage_design,
        damage_not_hdf5,
    ],
)
def test_bad_input_exits_2_naming_the_file_and_leaves_nothing(small_tree, tmp_path, capsys, damage):
    """Each damaged input: exit 2, one stderr line 'error: <that file>: ...', no subj01 nor staging folder."""
    tree = NsdTree(tmp_path / "nsd")
    shutil.copytree(small_tree.root, tree.root)
    offending = damage(tree)
    root = tmp_path / "root"
    assert run(tree, root, "--subject", "1") == 2
    assert error_line(capsys).startswith(f"error: {offending}: ")
    assert leftovers(root) == []


def test_unselectable_sessions_and_subjects_exit_2(small_tree, tmp_path, capsys):
    """--sessions past the last file names the missing file; a subject without betas names its folder."""
    root = tmp_path / "root"
    assert run(small_tree, root, "--subject", "1", "--sessions", "3-4") == 2
    assert error_line(capsys).startswith(f"error: {small_tree.betas(1, 4)}: ")
    assert run(small_tree, root, "--subject", "3") == 2
    assert error_line(capsys).startswith(f"error: {small_tree.betas_dir(3)}: ")
    assert leftovers(root) == []


def test_grid_error_names_the_odd_session_out(small_tree, tmp_path, capsys):
    """Session 1 has a grid unlike sessions 2, 3 and the ROI volumes: the error must name session 1,
    not the first healthy session compared against it."""
    tree = NsdTree(tmp_path / "nsd")
    shutil.copytree(small_tree.root, tree.root)
    _rewrite_betas(tree.betas(1, 1), _session(tree, 1)[:, :, :, :-1])
    root = tmp_path / "root"
    assert run(tree, root, "--subject", "1") == 2
    assert error_line(capsys).startswith(f"error: {tree.betas(1, 1)}: ")
    assert leftovers(root) == []


def test_no_training_trials_exit_2_and_leave_no_staging(small_tree, tmp_path, capsys):
    """Selected sessions that show only shared images have no training trials: exit 2 with one line, and
    (like every other bad input) no subj01 nor .subj01.partial left behind."""
    tree = NsdTree(tmp_path / "nsd")
    shutil.copytree(small_tree.root, tree.root)
    mat = loadmat(tree.expdesign)
    order = mat["masterordering"].copy()
    num_shared = mat["sharedix"].shape[1]  # mini-NSD lists the shared images first in every subject's list
    order[0, 2 * TPS : 3 * TPS] = np.arange(2 * TPS, 3 * TPS) % num_shared + 1  # session 3: shared only
    savemat(tree.expdesign, {**{k: v for k, v in mat.items() if not k.startswith("__")}, "masterordering": order})
    root = tmp_path / "root"
    assert run(tree, root, "--subject", "1", "--sessions", "3") == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {tree.betas_dir(1)}: ") and "training" in line
    assert leftovers(root) == []


def test_truncated_nifti_betas_exit_2_and_leave_no_staging(small_tree, tmp_path, capsys):
    """A .nii.gz cut short (interrupted download) has a valid header, so it passes planning; reading its
    data must still end in exit 2 naming the file, not a traceback, and leave no .subj01.partial."""
    tree = NsdTree(tmp_path / "nsd")
    shutil.copytree(small_tree.root, tree.root)
    path = tree.betas(1, 2, "nifti")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 4])
    root = tmp_path / "root"
    try:
        code = run(tree, root, "--subject", "1", "--betas-format", "nifti")
    except Exception as err:  # the bug: a raw decompression error escapes main()
        pytest.fail(f"main raised {type(err).__name__}: {err} instead of exiting 2")
    assert code == 2
    assert error_line(capsys).startswith(f"error: {path}: ")
    assert leftovers(root) == []


# --------------------------------------------------------------------------------------------
# 8. The HDF5 chunk reader


GRID_TZYX = (9, 11, 5, 6)  # trials, Z, Y, X: Z not a multiple of the slab reader's 8 planes


def _betas(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-32768, 32767, GRID_TZYX, dtype=np.int16, endpoint=True)


def _h5py_read(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["betas"][()].transpose(0, 3, 2, 1)


def _check_reader(path: Path, fast: bool) -> np.ndarray:
    """BetaSession.read() equals h5py's read (as T, X, Y, Z); `fast` says whether the chunk path applies."""
    expected = _h5py_read(path)
    with BetaSession(path) as f:
        assert (f._read_hdf5_chunks() is not None) == fast
        got = f.read()
        assert f.grid == expected.shape[1:] and f.num_trials == expected.shape[0]
    assert got.dtype == np.int16 and got.dtype.isnative
    np.testing.assert_array_equal(got, expected)
    return got


def _chunk_offsets(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        dset = f["betas"]
        _, _, y, x = dset.shape
        found = []
        dset.id.chunk_iter(lambda info: found.append(((info.chunk_offset[1] * y + info.chunk_offset[2]) * x
                                                      + info.chunk_offset[3], info.byte_offset)))  # fmt: skip
    return np.array([offset for _, offset in sorted(found)])


def test_chunk_reader_nsd_layout(tmp_path):
    """NSD's layout (one uncompressed chunk per voxel holding all trials) is read by the fast path exactly."""
    path = tmp_path / "nsd.hdf5"
    data = _betas()
    with h5py.File(path, "w") as f:
        f.create_dataset("betas", data=data, chunks=(GRID_TZYX[0], 1, 1, 1))
    got = _check_reader(path, fast=True)
    np.testing.assert_array_equal(got, data.transpose(0, 3, 2, 1))


@pytest.mark.parametrize("how", ["direct_chunks", "voxel_writes"])
def test_chunk_reader_shuffled_chunk_allocation(tmp_path, how):
    """Chunks allocated in random voxel order (file offsets not monotonic in voxel order) read exactly."""
    path = tmp_path / "shuffled.hdf5"
    data = _betas(1)
    t, z, y, x = data.shape
    order = np.random.default_rng(2).permutation(z * y * x)
    with h5py.File(path, "w") as f:
        dset = f.create_dataset("betas", shape=data.shape, dtype=np.int16, chunks=(t, 1, 1, 1))
        for voxel in order:
            k, j, i = np.unravel_index(voxel, (z, y, x))
            if how == "direct_chunks":
                dset.id.write_direct_chunk((0, k, j, i), np.ascontiguousarray(data[:, k, j, i]).tobytes())
            else:
                dset[:, k, j, i] = data[:, k, j, i]
    offsets = _chunk_offsets(path)
    assert len(offsets) == z * y * x and np.any(np.diff(offsets) < 0)  # really out of order
    _check_reader(path, fast=True)


@pytest.mark.parametrize("fillvalue", [None, -7])
def test_chunk_reader_unwritten_chunks_hold_the_fill_value(tmp_path, fillvalue):
    """Chunks never written (some in runs, some isolated) read as the dataset's fill value (default 0)."""
    path = tmp_path / "sparse.hdf5"
    data = _betas(3)
    t, z, y, x = data.shape
    rng = np.random.default_rng(4)
    written = np.flatnonzero(rng.random(z * y * x) < 0.6)
    written = np.setdiff1d(written, np.arange(40, 60))  # a long gap of unallocated chunks too
    kw = {} if fillvalue is None else {"fillvalue": fillvalue}
    with h5py.File(path, "w") as f:
        dset = f.create_dataset("betas", shape=data.shape, dtype=np.int16, chunks=(t, 1, 1, 1), **kw)
        for voxel in np.concatenate([written[: len(written) // 2], rng.permutation(written[len(written) // 2 :])]):
            k, j, i = np.unravel_index(voxel, (z, y, x))
            dset[:, k, j, i] = data[:, k, j, i]
    assert len(_chunk_offsets(path)) == len(written) < z * y * x
    got = _check_reader(path, fast=True)
    unwritten = np.ones(z * y * x, bool)
    unwritten[written] = False
    missing = unwritten.reshape(z, y, x).transpose(2, 1, 0)  # (X, Y, Z)
    assert np.all(got[:, missing] == (fillvalue or 0))


@pytest.mark.parametrize(
    "layout",
    [
        dict(chunks=None),  # contiguous
        dict(chunks=(GRID_TZYX[0], 1, 1, 1), compression="gzip"),
        dict(chunks=(GRID_TZYX[0], 1, 1, 1), shuffle=True),
        dict(chunks=(3, 2, 2, 2)),  # chunks that do not hold whole voxels
    ],
    ids=["contiguous", "gzip", "shuffle-filter", "other-chunks"],
)
def test_chunk_reader_falls_back_to_slabs(tmp_path, layout):
    """Layouts the chunk path cannot read byte-for-byte (unchunked, filtered, other chunk shapes) fall back
    to h5py slab reads and still give the same array."""
    path = tmp_path / "other.hdf5"
    data = _betas(5)
    with h5py.File(path, "w") as f:
        f.create_dataset("betas", data=data, **layout)
    got = _check_reader(path, fast=False)
    np.testing.assert_array_equal(got, data.transpose(0, 3, 2, 1))
