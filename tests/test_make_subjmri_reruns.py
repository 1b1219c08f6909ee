"""make_subjmri reruns, kills and bad input: skip when current, refuse with the reason, never half a subject.

- A rerun skips a subject whose settings and input files (betas, ROIs, label tables, design) are
  unchanged; other settings or a rewritten input refuse with one line naming run.json and what
  changed; --overwrite redoes the subject.
- A SIGKILL at a fixed point (tests/stage_checks.py) never leaves an incomplete subjXX/, and a
  rerun reproduces the uninterrupted output and leaves no staging folder.
- Bad input and unwritable outputs exit 2 with one line naming the file, before any output exists.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from scipy.io import loadmat, savemat

from llava_brain.layout import DatasetRoot, NsdTree

from conftest import SMALL, load_script
from stage_checks import assert_same_files, error_line, hidden_leftovers, run_killed_at, tree_bytes

make_subjmri = load_script("prepare_datasets/make_subjmri.py")
SCRIPT = "prepare_datasets/make_subjmri.py"
TPS = SMALL["trials_per_session"]  # 30 trials per session in the small tree (3 sessions done)


def flags(tree: NsdTree | Path, root: Path, *extra: str) -> list[str]:
    nsd_root = tree.root if isinstance(tree, NsdTree) else tree
    return ["--nsd-root", str(nsd_root), "--dataset-root", str(root), "--quiet", *extra]


def run(tree: NsdTree | Path, root: Path, *extra: str) -> int:
    """make_subjmri.main in this process (quiet); returns its exit code."""
    return make_subjmri.main(flags(tree, root, *extra))


def fmris(root: Path) -> Path:
    return DatasetRoot(root).nsd / "fmris"


def leftovers(root: Path) -> list[str]:
    """Names under <root>/nsd/fmris/ (subject folders, .subjXX.partial staging, ...), sorted."""
    return sorted(p.name for p in fmris(root).iterdir()) if fmris(root).exists() else []


def identity(folder: Path) -> dict[Path, tuple[int, int]]:
    """(inode, mtime) of a folder and everything in it: any rewrite or swap changes some of them."""
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in [folder, *folder.rglob("*")]}


def copy_tree(small_tree: NsdTree, tmp_path: Path) -> NsdTree:
    tree = NsdTree(tmp_path / "nsd")
    shutil.copytree(small_tree.root, tree.root)
    return tree


# --------------------------------------------------------------------------------------------
# Reruns


def test_rerun_skips_refuses_other_settings_and_overwrite_redoes(small_tree, tmp_path, capsys):
    """Same settings: nothing is rewritten. Other --sessions: exit 2 naming run.json, the setting and
    --overwrite, nothing touched. --overwrite: the subject is redone with the new settings."""
    root = tmp_path / "root"
    assert run(small_tree, root, "--subject", "1") == 0
    subject_dir = fmris(root) / "subj01"
    before = identity(subject_dir)
    content = tree_bytes(subject_dir)
    settings = json.loads((subject_dir / "run.json").read_text())["settings"]
    assert settings == {
        "subject": 1,
        "sessions": [1, 2, 3],
        "atlases": ["nsdgeneral", "streams"],
        "betas_format": "hdf5",
    }

    assert run(small_tree, root, "--subject", "1") == 0
    assert identity(subject_dir) == before
    capsys.readouterr()

    assert run(small_tree, root, "--subject", "1", "--sessions", "1-2") == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {subject_dir / 'run.json'}: ")
    assert "setting sessions" in line and "--overwrite" in line
    assert identity(subject_dir) == before

    assert run(small_tree, root, "--subject", "1", "--sessions", "1-2", "--overwrite") == 0
    assert json.loads(DatasetRoot(root).whole_meta(1).read_text())["sessions"] == [1, 2]
    assert json.loads((subject_dir / "run.json").read_text())["settings"]["sessions"] == [1, 2]
    assert tree_bytes(subject_dir) != content
    assert run(small_tree, tmp_path / "fresh", "--subject", "1", "--sessions", "1-2") == 0
    assert_same_files(fmris(tmp_path / "fresh") / "subj01", subject_dir)
    assert leftovers(root) == ["subj01"]  # no .partial / .old left


def test_rerun_after_a_changed_input_refuses_with_the_reason(small_tree, tmp_path, capsys):
    """A betas file rewritten with other values: the finished subject is not silently kept (exit 2 naming
    the input); --overwrite redoes it from the new file. Touching a file without changing it is no change."""
    tree = copy_tree(small_tree, tmp_path)
    root = tmp_path / "root"
    assert run(tree, root, "--subject", "1") == 0
    subject_dir = fmris(root) / "subj01"
    os.utime(tree.betas(1, 2))  # new mtime, same bytes: small inputs are fingerprinted by content
    before = identity(subject_dir)
    assert run(tree, root, "--subject", "1") == 0
    assert identity(subject_dir) == before

    with h5py.File(tree.betas(1, 2), "r+") as f:
        f["betas"][...] = f["betas"][()] + 3  # every beta of the session up by 0.01 %
    capsys.readouterr()
    assert run(tree, root, "--subject", "1") == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {subject_dir / 'run.json'}: ") and "input betas changed" in line
    assert "--overwrite" in line and identity(subject_dir) == before

    stats = DatasetRoot(root).whole_stats(1, "mean")
    old_mean = np.load(stats)
    assert run(tree, root, "--subject", "1", "--overwrite") == 0
    assert not np.array_equal(np.load(stats), old_mean)
    again = identity(subject_dir)
    assert run(tree, root, "--subject", "1") == 0  # current again: skipped
    assert identity(subject_dir) == again


# --------------------------------------------------------------------------------------------
# Kill and resume


def test_killed_run_resumes_to_the_uninterrupted_output(small_tree, tmp_path):
    """SIGKILL mid-subject (before pass 2 of subj01), then again right after subj01 is finished (when subj05
    is planned): no subjXX folder is ever incomplete, a rerun finishes, and every file equals an
    uninterrupted run's; no staging folder remains."""
    reference = tmp_path / "reference"
    assert run(small_tree, reference) == 0
    root = tmp_path / "root"
    staging = fmris(root) / ".subj01.partial"

    # Kill 1: subj01 is half-written (its whole-brain arrays exist, not yet z-scored, inside the staging folder).
    proc = run_killed_at(SCRIPT, flags(small_tree, root), "llava_brain.nsd.extract", "_normalise")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (staging / "whole" / "nsd_betas_te.npy").is_file() and leftovers(root) == [".subj01.partial"]

    # Kill 2: the rerun drops the staging folder, finishes subj01 and is killed as subj05 is planned.
    proc = run_killed_at(SCRIPT, flags(small_tree, root), "llava_brain.nsd.extract", "plan_subject", call=2)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert leftovers(root) == ["subj01"]
    assert_same_files(fmris(reference) / "subj01", fmris(root) / "subj01")
    finished = identity(fmris(root) / "subj01")

    assert run(small_tree, root) == 0
    assert leftovers(root) == ["subj01", "subj05"] and hidden_leftovers(root) == []
    assert identity(fmris(root) / "subj01") == finished  # skipped
    for subject in ("subj01", "subj05"):
        assert_same_files(fmris(reference) / subject, fmris(root) / subject)


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
# Bad input


def test_unwritable_dataset_root_exits_2_before_any_work(small_tree, tmp_path, capsys):
    """A --dataset-root below a regular file cannot be created (even as root): one line, exit 2."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert run(small_tree, blocker / "root", "--subject", "1") == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {blocker / 'root' / 'nsd' / 'fmris'}: ") and "--dataset-root" in line
    assert blocker.read_text() == ""


def test_non_finite_nifti_betas_are_refused_naming_the_file(small_tree, tmp_path, capsys):
    """NaN betas cannot reach the arrays: NSD's betas are int16 (no NaN), and the reader refuses any other
    dtype on opening, so a float NIfTI holding NaN stops the run at planning with one line naming it."""
    tree = copy_tree(small_tree, tmp_path)
    path = tree.betas(1, 2, "nifti")
    image = nib.load(path)
    data = np.asanyarray(image.dataobj).astype(np.float32)
    data[0, 0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine), path)
    root = tmp_path / "root"
    assert run(tree, root, "--subject", "1", "--betas-format", "nifti") == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {path}: ") and "int16" in line
    assert leftovers(root) == []


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
    assert leftovers(root) == []


def test_a_subject_the_tree_lacks_fails_in_one_line_before_any_work(small_tree, tmp_path, capsys):
    """--subject 3 on a tree with subj01 and subj05 only: one line naming where the subjects are looked
    up and which exist, nothing created; the same for --subject 9, which no NSD tree has."""
    root = tmp_path / "root"
    assert run(small_tree, root, "--subject", "3") == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {small_tree.root / 'nsddata_betas' / 'ppdata'}: ") and "subj03" in line
    assert "subj01, subj05" in line and not root.exists()
    assert run(small_tree, root, "--subject", "9") == 2
    assert "subj09" in error_line(capsys) and not root.exists()


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
