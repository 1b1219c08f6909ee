"""mini-NSD: the raw-format tree is complete, consumed by the NSD readers, NSD-like and decodable."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy.io import loadmat

from llava_brain.layout import NsdTree
from llava_brain.nsd import (
    BetaSession,
    CocoAnnotations,
    ExpDesign,
    NsdStimuli,
    StimInfo,
    area_masks,
    coco_box_to_nsd,
    read_roi,
    read_volume,
    repeat_index,
)
from llava_brain.simulate import MiniNsdConfig, mini_nsd, write_mini_nsd
from llava_brain.simulate.calibration import ridge_retrieval_check
from llava_brain.simulate.scenes import COLOURS, SHAPES

from conftest import REPO, SMALL, load_script
from stage_checks import error_line, hidden_leftovers, run_killed_at, tree_bytes


@pytest.fixture(scope="session")
def default_tree(tmp_path_factory) -> NsdTree:
    """The default mini-NSD (4 subjects), generated once."""
    out = tmp_path_factory.mktemp("mini") / "nsd"
    write_mini_nsd(out, MiniNsdConfig(), progress=False)
    return NsdTree(out)


def test_default_size_on_disk(default_tree):
    """Deterministic for the default seed (~380 MB); how long generation takes is benchmarked, not tested."""
    tree = default_tree
    size = sum(p.stat().st_size for p in tree.root.rglob("*") if p.is_file())
    assert size < 500e6, f"default mini-NSD is {size / 1e6:.0f} MB"


def test_subjects_have_different_scaled_nsd_grids(default_tree):
    tree = default_tree
    grids = {}
    for subject in (1, 2, 5, 7):
        with BetaSession(tree.betas(subject, 1)) as f:
            grids[subject] = f.grid
            assert f.num_trials == 125
        assert all(20 <= n <= 40 for n in f.grid)
        # Same grid as the subject's ROI volumes and an affine with the simulated voxel size.
        roi = read_roi(tree.roi(subject, "nsdgeneral"), expect_grid=f.grid)
        assert np.allclose(np.abs(np.diag(roi.affine)[:3]), 1.8 / 0.33, atol=1e-3)
    assert len(set(grids.values())) == 4
    # NSD's proportions survive the scaling: subj01 is larger than subj05 on every axis.
    assert all(a > b for a, b in zip(grids[1], grids[5], strict=True))


def test_betas_in_nsd_hdf5_layout_and_nifti_agrees(default_tree):
    tree = default_tree
    with h5py.File(tree.betas(1, 2), "r") as f:
        dset = f["betas"]
        t, z, y, x = dset.shape
        assert dset.dtype == np.int16
        assert dset.chunks == (t, 1, 1, 1)  # one chunk per voxel holding all its trials, like NSD
        assert dset.compression is None
    with BetaSession(tree.betas(1, 2, "hdf5")) as h5, BetaSession(tree.betas(1, 2, "nifti")) as nii:
        assert h5.grid == nii.grid == (x, y, z)
        np.testing.assert_array_equal(h5.read(), nii.read())
    brain = read_volume(tree.brainmask(1)).data > 0
    with BetaSession(tree.betas(1, 1)) as f:
        volumes = f.read()
    assert np.all(volumes[:, ~brain] == 0)  # NSD zeroes voxels outside the brain mask
    psc = volumes[:, brain] / 300.0
    assert 0.5 < psc.std() < 4.0  # percent signal change of NSD-like magnitude


def test_roi_conventions(default_tree):
    tree = default_tree
    general = read_roi(tree.roi(2, "nsdgeneral")).data
    streams = read_roi(tree.roi(2, "streams")).data
    assert set(np.unique(general)) == {-1, 0, 1}
    assert set(np.unique(streams)) == set(range(-1, 8))
    assert np.array_equal(general >= 0, streams >= 0)  # both: -1 exactly where not cortical
    lh = read_roi(tree.roi(2, "streams", "lh")).data
    rh = read_roi(tree.roi(2, "streams", "rh")).data
    assert not np.any((lh >= 0) & (rh >= 0))
    assert np.array_equal(np.maximum(lh, rh), streams)
    masks = area_masks(tree, 2, ["nsdgeneral", "streams"])
    assert {"nsdgeneral", "early", "ventral", "parietal"} <= set(masks)
    assert all(mask.sum() > 50 for mask in masks.values())


def test_design_split_repeats_and_stim_info_agree(default_tree):
    tree = default_tree
    design = ExpDesign.load(tree.expdesign)
    info = StimInfo.load(tree.stim_info)
    assert design.shared.size == 100
    assert np.array_equal(np.flatnonzero(info.shared1000), design.shared)
    for subject in (1, 7):
        ids = design.trial_images(subject, 1500)
        test = design.is_shared(ids)
        # The split from sharedix equals the split "list index <= num_shared" (Brain-Diffuser's rule).
        assert np.array_equal(test, design.masterordering[:1500] < 100)
        assert np.unique(ids[test]).size == 100 and test.sum() == 300
        assert repeat_index(ids).max() == 2
        # Every trial appears in the CSV's 1-based rep columns (read back 0-based) for its image.
        trials = info.trials[subject]
        for trial in range(0, 1500, 37):
            assert trial in trials[ids[trial]]
        assert np.all((trials >= 0).sum(1)[np.unique(ids)] == 3)
    # Non-shared images belong to exactly one subject, like NSD's 9000 per-subject images.
    other = set(design.trial_images(1, 1500)) & set(design.trial_images(2, 1500))
    assert other == set(design.shared.tolist())
    raw = loadmat(tree.expdesign)
    assert raw["masterordering"].min() == 1 and raw["sharedix"].min() >= 1  # 1-based on disk


def test_fewer_sessions_leave_images_unrepeated(small_tree):
    design = ExpDesign.load(small_tree.expdesign)
    info = StimInfo.load(small_tree.stim_info)
    assert small_tree.sessions(1) == [1, 2, 3]  # of a 4-session design
    ids = design.trial_images(1, 90)
    shown = (info.trials[1] >= 0).sum(1)
    np.testing.assert_array_equal(shown[np.unique(ids)], np.bincount(ids)[np.unique(ids)])
    assert shown.max() == 3 and shown[np.unique(ids)].min() < 3
    assert np.all(info.trials[1] < 90)


def test_stimuli_captions_and_boxes_match(default_tree):
    tree = default_tree
    info = StimInfo.load(tree.stim_info)
    coco = {
        (kind, split): CocoAnnotations.load(tree.coco_annotations(kind, split), kind)
        for kind in ("captions", "instances")
        for split in ("train2017", "val2017")
    }
    checked = matched = 0
    with NsdStimuli(tree.stimuli) as stimuli:
        assert len(stimuli) == len(info) == 1700 and stimuli.image_size == (425, 425)
        for nsd_id in range(0, 1300, 7):
            split, coco_id = str(info.coco_split[nsd_id]), int(info.coco_id[nsd_id])
            assert len(coco[("captions", split)].annotations(coco_id)) == 5
            image = coco[("instances", split)].images[coco_id]
            pixels = stimuli[nsd_id]
            anns = coco[("instances", split)].annotations(coco_id)
            for ann in anns:
                name = coco[("instances", split)].categories[ann["category_id"]]
                if name not in ("circle", "square") or len(anns) > 1:
                    continue  # ring/cross/triangle centres or overlaps may not show the object's colour
                box = coco_box_to_nsd(ann["bbox"], (image["width"], image["height"]), info.crop_box[nsd_id])
                if box is None or min(box[2] - box[0], box[3] - box[1]) < 20:
                    continue
                cx, cy = int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2)
                colour = pixels[cy, cx].astype(int)
                checked += 1
                matched += min(np.abs(colour - np.array(c)).max() for c in COLOURS.values()) <= 12
    assert checked >= 20
    assert matched / checked > 0.9, f"only {matched}/{checked} boxes land on an object colour"
    assert len(SHAPES) == len(coco[("instances", "train2017")].categories)


def test_decodable_but_not_trivial(default_tree):
    """Ridge from nsdgeneral to a pixel embedding retrieves test images far above chance, far from perfect."""
    tree = default_tree
    check = ridge_retrieval_check(tree, 1)
    assert check.num_test_images == 100
    assert 0.20 <= check.top1_averaged <= 0.60, check  # the band the simulator is calibrated to
    assert check.top1_averaged >= 10 * check.chance
    assert 0.1 <= check.median_voxel_snr <= 0.32, check  # NSD-like noise-ceiling SNR of visual voxels


def test_ncsnr_file_matches_betas(default_tree):
    """The written ncsnr.nii.gz is the true SNR: voxels it ranks high are reliable across repeats."""
    tree = default_tree
    from llava_brain.simulate.calibration import empirical_ncsnr

    mask = read_roi(tree.roi(1, "nsdgeneral")).data > 0
    design = ExpDesign.load(tree.expdesign)
    betas = []
    for session in tree.sessions(1):
        with BetaSession(tree.betas(1, session)) as f:
            betas.append(f.read_voxels(mask))
    betas = np.concatenate(betas)
    measured = empirical_ncsnr(betas, design.trial_images(1, len(betas)))
    true = read_volume(tree.ncsnr(1)).data[mask]
    assert np.corrcoef(measured, true)[0, 1] > 0.3


def test_deterministic_for_a_seed(tmp_path):
    """The same config gives byte-identical files (the design file's header holds no creation time)."""
    cfg = MiniNsdConfig(**SMALL, seed=3)
    write_mini_nsd(tmp_path / "a", cfg, progress=False)
    write_mini_nsd(tmp_path / "b", cfg, progress=False)
    write_mini_nsd(tmp_path / "c", MiniNsdConfig(**SMALL, seed=4), progress=False)
    a, b, c = (NsdTree(tmp_path / n) for n in "abc")
    assert tree_bytes(a.root) == tree_bytes(b.root)
    for subject in (1, 5):
        with BetaSession(a.betas(subject, 2)) as fa, BetaSession(c.betas(subject, 2)) as fc:
            assert not np.array_equal(fa.read(), fc.read())
    assert loadmat(a.expdesign)["masterordering"].shape == (1, 120)  # the fixed header still reads as MATLAB v5


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mini_nsd, "_write_stimuli", fail)
    with pytest.raises(KeyboardInterrupt):
        write_mini_nsd(tmp_path / "nsd", MiniNsdConfig(**SMALL), progress=False)
    assert list(tmp_path.iterdir()) == []


CLI_FLAGS = ["--subject", "1", "--num-shared", "12", "--images-per-subject", "40", "--trials-per-session", "30",
             "--grid-scale", "0.2", "--quiet"]  # fmt: skip


def test_cli_reruns_skip_and_conflicts_exit_2(tmp_path, capsys):
    script = load_script("prepare_datasets/make_mini_nsd.py")
    out = tmp_path / "nsd"
    flags = ["--out", str(out), *CLI_FLAGS]
    assert script.main(flags) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["subjects"] == [1] and run["settings"]["sessions"] == 4  # resolved: the whole design
    stamp = (out / "run.json").stat().st_mtime_ns
    assert script.main(flags) == 0  # finished: nothing redone
    assert (out / "run.json").stat().st_mtime_ns == stamp
    capsys.readouterr()
    assert script.main([*flags, "--seed", "9"]) == 2  # other settings need --overwrite
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(out / "run.json") in err and "seed" in err and "--overwrite" in err
    assert script.main([*flags, "--seed", "9", "--overwrite"]) == 0
    assert json.loads((out / "run.json").read_text())["settings"]["seed"] == 9
    assert hidden_leftovers(tmp_path) == []  # the swap of --overwrite left no .nsd.old / .nsd.partial
    with pytest.raises(SystemExit) as exc:
        script.main([*flags, "--trials-per-session", "7"])  # 120 trials do not fill whole sessions
    assert exc.value.code == 2
    capsys.readouterr()
    assert script.main([*flags, "--subject", "9"]) == 2  # NSD has 8 subjects
    assert "subj09" in capsys.readouterr().err


def test_cli_refuses_a_folder_it_did_not_write_and_an_unwritable_out(tmp_path, capsys):
    script = load_script("prepare_datasets/make_mini_nsd.py")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert script.main(["--out", str(tmp_path / "mine"), *CLI_FLAGS]) == 2
    assert "not a finished mini-NSD" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("")  # a parent that is a regular file cannot hold a folder (even for root)
    assert script.main(["--out", str(tmp_path / "file" / "nsd"), *CLI_FLAGS]) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {tmp_path / 'file' / 'nsd'}: ") and "--out" in line


@pytest.mark.parametrize(
    "module, function, after",
    [
        ("llava_brain.simulate.mini_nsd", "_write_stimuli", True),  # betas, design, CSV and stimuli written
        ("llava_brain.io.files", "swap_in", False),  # the tree and its run.json complete, not yet swapped in
    ],
    ids=["mid-tree", "before-swap"],
)
def test_sigkill_then_rerun_gives_the_uninterrupted_files(tmp_path, module, function, after):
    """A real SIGKILL at a fixed point, then a plain rerun: no .partial/.tmp left, files as an uninterrupted run's."""
    script = load_script("prepare_datasets/make_mini_nsd.py")
    assert script.main(["--out", str(tmp_path / "reference" / "nsd"), *CLI_FLAGS]) == 0
    out = tmp_path / "killed" / "nsd"
    proc = run_killed_at("prepare_datasets/make_mini_nsd.py", ["--out", str(out), *CLI_FLAGS], module, function,
                         after=after)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists() and (out.parent / ".nsd.partial").is_dir()
    assert script.main(["--out", str(out), *CLI_FLAGS]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["nsd"] and hidden_leftovers(out) == []
    assert tree_bytes(out) == tree_bytes(tmp_path / "reference" / "nsd")


def _broken_copy(small_tree: NsdTree, tmp_path: Path) -> NsdTree:
    import shutil

    shutil.copytree(small_tree.root, tmp_path / "nsd")
    return NsdTree(tmp_path / "nsd")


@pytest.mark.parametrize("breakage", ["csv_without_cocoId", "wrong_dataset_name", "wrong_shape", "missing_design"])
def test_describe_reports_bad_files_in_one_line(small_tree, tmp_path, breakage):
    tree = _broken_copy(small_tree, tmp_path)
    if breakage == "csv_without_cocoId":
        text = tree.stim_info.read_text().replace("cocoId", "coco_id", 1)
        tree.stim_info.write_text(text)
        culprit, expected = tree.stim_info, "cocoId"
    elif breakage == "wrong_dataset_name":
        culprit, expected = tree.betas(5, 2), "'/betas'"
        with h5py.File(culprit, "a") as f:
            f.move("betas", "beta")
    elif breakage == "wrong_shape":
        culprit, expected = tree.betas(5, 3), "must be"
        with h5py.File(culprit, "w") as f:
            f.create_dataset("betas", data=np.zeros((30, 5, 5, 5), np.int16))  # grid differs from session 1
    else:
        culprit, expected = tree.expdesign, "missing"
        culprit.unlink()
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "describe_nsd.py"), "--nsd-root", str(tree.root)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert str(culprit) in lines[0] and expected in lines[0]


def test_describe_summary(small_tree, capsys):
    script = load_script("tools/describe_nsd.py")
    assert script.main(["--nsd-root", str(small_tree.root)]) == 0
    out = capsys.readouterr().out
    assert "subj01" in out and "subj05" in out and "12 shared (test) images" in out
    assert "3 sessions, 90 trials" in out
