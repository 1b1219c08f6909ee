"""Path spelling of the raw NSD tree and of the prepared dataset root (llava_brain/layout.py)."""

from pathlib import Path

import pytest

from llava_brain.layout import DATA_ROOT_ENV, DatasetRoot, NsdTree, default_data_root, subject_name


def rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


@pytest.mark.parametrize(("subject", "name"), [(1, "subj01"), (8, "subj08"), (12, "subj12"), ("3", "subj03")])
def test_subject_name(subject, name):
    assert subject_name(subject) == name


@pytest.mark.parametrize("subject", [0, -1, 100])
def test_subject_name_out_of_range(subject):
    with pytest.raises(ValueError, match="subject"):
        subject_name(subject)


def test_default_data_root(monkeypatch, tmp_path):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    assert default_data_root() is None
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    assert default_data_root() == tmp_path


# ----------------------------------------------------------------------------------------------
# NsdTree: the real NSD download layout


def test_nsd_tree_root_is_a_path(tmp_path):
    assert NsdTree(str(tmp_path)).root == tmp_path


def test_nsd_tree_paths_match_nsd(tmp_path):
    tree = NsdTree(tmp_path)
    b3 = "betas_fithrf_GLMdenoise_RR"
    cases = {
        tree.betas(1, 3): f"nsddata_betas/ppdata/subj01/func1pt8mm/{b3}/betas_session03.hdf5",
        tree.betas(1, 3, fmt="hdf5"): f"nsddata_betas/ppdata/subj01/func1pt8mm/{b3}/betas_session03.hdf5",
        tree.betas(7, 40, fmt="nifti"): f"nsddata_betas/ppdata/subj07/func1pt8mm/{b3}/betas_session40.nii.gz",
        tree.betas(2, 1, space="func1mm", beta_type="betas_fithrf"): (
            "nsddata_betas/ppdata/subj02/func1mm/betas_fithrf/betas_session01.hdf5"
        ),
        tree.betas_dir(5): f"nsddata_betas/ppdata/subj05/func1pt8mm/{b3}",
        tree.ncsnr(1): f"nsddata_betas/ppdata/subj01/func1pt8mm/{b3}/ncsnr.nii.gz",
        tree.expdesign: "nsddata/experiments/nsd/nsd_expdesign.mat",
        tree.stim_info: "nsddata/experiments/nsd/nsd_stim_info_merged.csv",
        tree.stimuli: "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5",
        tree.coco_annotations("captions", "train2017"): (
            "nsddata_stimuli/stimuli/nsd/annotations/captions_train2017.json"
        ),
        tree.coco_annotations("instances", "val2017"): "nsddata_stimuli/stimuli/nsd/annotations/instances_val2017.json",
        tree.roi(1, "nsdgeneral"): "nsddata/ppdata/subj01/func1pt8mm/roi/nsdgeneral.nii.gz",
        tree.roi(5, "streams", hemi="lh"): "nsddata/ppdata/subj05/func1pt8mm/roi/lh.streams.nii.gz",
        tree.roi(5, "prf-visualrois", hemi="rh"): "nsddata/ppdata/subj05/func1pt8mm/roi/rh.prf-visualrois.nii.gz",
        tree.roi_dir(2): "nsddata/ppdata/subj02/func1pt8mm/roi",
        tree.roi_ctab("streams"): "nsddata/freesurfer/fsaverage/label/streams.mgz.ctab",
        tree.brainmask(1): "nsddata/ppdata/subj01/func1pt8mm/brainmask.nii.gz",
        tree.ppdata(3): "nsddata/ppdata/subj03/func1pt8mm",
    }
    for path, expected in cases.items():
        assert rel(path, tmp_path) == expected


@pytest.mark.parametrize("hemi", ["left", "LH", ""])
def test_nsd_tree_bad_hemi(tmp_path, hemi):
    with pytest.raises(ValueError, match="hemi"):
        NsdTree(tmp_path).roi(1, "streams", hemi=hemi)


@pytest.mark.parametrize("fmt", ["nii", "h5", "mgh"])
def test_nsd_tree_bad_betas_format(tmp_path, fmt):
    with pytest.raises(ValueError, match="format"):
        NsdTree(tmp_path).betas(1, 1, fmt=fmt)


def test_nsd_tree_sessions_bad_format_raises_value_error(tmp_path):
    # Same contract as NsdTree.betas: an unknown format is a ValueError naming the choices.
    with pytest.raises(ValueError, match="format"):
        NsdTree(tmp_path).sessions(1, fmt="nii")


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_nsd_tree_sessions_lists_existing_files_sorted(tmp_path):
    tree = NsdTree(tmp_path)
    assert tree.sessions(1) == []  # no folder at all
    for session in (10, 2, 1, 37):
        _touch(tree.betas(1, session, fmt="hdf5"))
    for session in (3, 4):
        _touch(tree.betas(1, session, fmt="nifti"))
    folder = tree.betas_dir(1)
    _touch(folder / "betas_sessionXY.hdf5")  # not a session number
    _touch(folder / ".betas_session05.hdf5.abc.tmp.hdf5")  # an unfinished atomic write
    _touch(folder / "ncsnr.nii.gz")
    assert tree.sessions(1) == [1, 2, 10, 37]
    assert tree.sessions(1, fmt="hdf5") == [1, 2, 10, 37]
    assert tree.sessions(1, fmt="nifti") == [3, 4]
    assert tree.sessions(2) == []
    _touch(tree.betas(1, 6, space="func1mm"))
    assert tree.sessions(1, space="func1mm") == [6]


def test_nsd_tree_subjects(tmp_path):
    tree = NsdTree(tmp_path)
    assert tree.subjects() == []
    for subject in (7, 1, 2):
        tree.betas_dir(subject).mkdir(parents=True)
    (tmp_path / "nsddata_betas" / "ppdata" / "subjXY").mkdir()
    assert tree.subjects() == [1, 2, 7]


# ----------------------------------------------------------------------------------------------
# DatasetRoot: the prepared dataset root


def test_dataset_root_paths(tmp_path):
    root = DatasetRoot(str(tmp_path))
    assert root.root == tmp_path
    cases = {
        root.nsd: "nsd",
        root.fmri_dir(1): "nsd/fmris/subj01",
        root.area_betas(1, "nsdgeneral", "tr"): "nsd/fmris/subj01/area/nsd_nsdgeneral_betas_tr.npy",
        root.area_betas(7, "early", "te"): "nsd/fmris/subj07/area/nsd_early_betas_te.npy",
        root.area_stats(2, "nsdgeneral", "mean"): "nsd/fmris/subj02/area/nsd_nsdgeneral_betas_mean.npy",
        root.area_stats(2, "nsdgeneral", "std"): "nsd/fmris/subj02/area/nsd_nsdgeneral_betas_std.npy",
        root.whole_betas(5, "tr"): "nsd/fmris/subj05/whole/nsd_betas_tr.npy",
        root.whole_meta(5): "nsd/fmris/subj05/whole/meta.json",
        root.fmri2image(1): "nsd/fmris/subj01/nsd_fmri2image.json",
        root.images_dir: "nsd/images",
        root.image(42): "nsd/images/nsd_image_000042.png",
        root.image(72999): "nsd/images/nsd_image_072999.png",
        root.captions: "nsd/nsd_captions.json",
        root.instances: "nsd/nsd_instances.json",
        root.coco_captions: "nsd/nsd_coco_captions.json",
        root.coco_instances: "nsd/nsd_coco_instances.json",
        root.gpt_conversation("detail_description"): "nsd/nsd_gpt_conversation/detail_description.jsonl",
        root.sft_data("tr"): "nsd/sft_data_tr.json",
        root.sft_data("te"): "nsd/sft_data_te.json",
        root.vision_embeds_dir: "nsd/vision_embeds",
        root.vae_embeds_dir: "nsd/vae_embeds",
    }
    for path, expected in cases.items():
        assert rel(path, tmp_path) == expected


@pytest.mark.parametrize("split", ["train", "test", "val", "TR", ""])
def test_dataset_root_bad_split(tmp_path, split):
    root = DatasetRoot(tmp_path)
    for method in (lambda: root.area_betas(1, "nsdgeneral", split), lambda: root.whole_betas(1, split)):
        with pytest.raises(ValueError, match="split"):
            method()
    with pytest.raises(ValueError, match="split"):
        root.sft_data(split)


def test_dataset_root_bad_stat(tmp_path):
    with pytest.raises(ValueError, match="stat"):
        DatasetRoot(tmp_path).area_stats(1, "nsdgeneral", "var")
