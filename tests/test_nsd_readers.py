"""NSD readers on tiny hand-written files in NSD's own formats, with known values (llava_brain/nsd/)."""

import csv
import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from scipy.io import savemat

from llava_brain.errors import BadInputError
from llava_brain.layout import NsdTree
from llava_brain.nsd import (
    BetaSession,
    CocoAnnotations,
    ExpDesign,
    NsdStimuli,
    StimInfo,
    area_masks,
    atlas_label_names,
    available_atlases,
    coco_box_to_nsd,
    crop_window,
    read_roi,
    repeat_index,
)

# Tiny session: 4 trials on an X, Y, Z = 3, 4, 5 grid (all different, so any axis swap shows).
T, X, Y, Z = 4, 3, 4, 5
GRID = (X, Y, Z)


def encoded(t, x, y, z):
    """The value stored for trial t at voxel (x, y, z): its own coordinates as decimal digits."""
    return t * 1000 + x * 100 + y * 10 + z


def hdf5_betas_array() -> np.ndarray:
    """(T, Z, Y, X) int16 as h5py sees NSD's file (MATLAB wrote X x Y x Z x T column-major)."""
    t, z, y, x = np.meshgrid(np.arange(T), np.arange(Z), np.arange(Y), np.arange(X), indexing="ij")
    return encoded(t, x, y, z).astype(np.int16)


def nifti_betas_array() -> np.ndarray:
    """(X, Y, Z, T) int16 as nibabel sees NSD's NIfTI."""
    x, y, z, t = np.meshgrid(np.arange(X), np.arange(Y), np.arange(Z), np.arange(T), indexing="ij")
    return encoded(t, x, y, z).astype(np.int16)


def write_h5(path: Path, name: str, data: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset(name, data=data, **kw)
    return path


def write_nifti(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([1.8, 1.8, 1.8, 1.0])), path)
    return path


def assert_one_line_naming(err: BadInputError, path: Path) -> str:
    message = str(err)
    assert "\n" not in message
    assert str(path) in message
    return message


def h5_is_closed(path: Path) -> bool:
    """True when no handle of this process holds the file open (opening it for writing then works)."""
    try:
        h5py.File(path, "r+").close()
    except OSError:
        return False
    return True


@pytest.fixture
def tree(tmp_path) -> NsdTree:
    return NsdTree(tmp_path / "nsd")


@pytest.fixture
def h5_session(tree) -> Path:
    return write_h5(tree.betas(1, 3, fmt="hdf5"), "betas", hdf5_betas_array(), chunks=(T, 1, 1, 1))


@pytest.fixture
def nifti_session(tree) -> Path:
    return write_nifti(tree.betas(1, 3, fmt="nifti"), nifti_betas_array())


# Mask voxels listed out of order; C order over (X, Y, Z) is lexicographic order of (x, y, z).
MASK_VOXELS = [(2, 3, 4), (0, 0, 0), (1, 2, 3), (0, 3, 1), (2, 0, 4), (1, 2, 0)]


def mask_and_expected():
    mask = np.zeros(GRID, dtype=bool)
    for v in MASK_VOXELS:
        mask[v] = True
    ordered = sorted(MASK_VOXELS)
    expected = np.array([[encoded(t, *v) / 300.0 for v in ordered] for t in range(T)])
    return mask, expected


# ----------------------------------------------------------------------------------------------
# Betas


def test_hdf5_betas_orientation_and_values(h5_session):
    with BetaSession(h5_session) as session:
        assert session.format == "hdf5"
        assert session.grid == GRID
        assert session.num_trials == T
        data = session.read()
    assert data.shape == (T, X, Y, Z)
    assert data.dtype == np.int16
    for t in range(T):
        for x in range(X):
            for y in range(Y):
                for z in range(Z):
                    assert data[t, x, y, z] == encoded(t, x, y, z)


def test_hdf5_read_voxels_scaled_in_c_order(h5_session):
    mask, expected = mask_and_expected()
    with BetaSession(h5_session, expect_grid=GRID) as session:
        voxels = session.read_voxels(mask)
    assert voxels.dtype == np.float32
    assert voxels.shape == (T, len(MASK_VOXELS))
    np.testing.assert_allclose(voxels, expected, rtol=1e-6, atol=0)
    # first masked voxel in C order is (0, 0, 0); its trial-2 value is 2000 / 300
    assert voxels[2, 0] == pytest.approx(2000 / 300, rel=1e-6)


def test_nifti_betas_match_hdf5(h5_session, nifti_session):
    mask, expected = mask_and_expected()
    with BetaSession(h5_session) as h5, BetaSession(nifti_session) as nii:
        assert nii.format == "nifti"
        assert nii.grid == h5.grid == GRID
        assert nii.num_trials == T
        np.testing.assert_array_equal(nii.read(), h5.read())
        assert nii.read().dtype == np.int16
        assert nii.read()[3, 2, 1, 4] == encoded(3, 2, 1, 4)
        nii_voxels = nii.read_voxels(mask)
        np.testing.assert_array_equal(nii_voxels, h5.read_voxels(mask))
    assert nii_voxels.dtype == np.float32
    np.testing.assert_allclose(nii_voxels, expected, rtol=1e-6, atol=0)


def test_read_voxels_mask_grid_mismatch(h5_session):
    with BetaSession(h5_session) as session, pytest.raises(BadInputError) as excinfo:
        session.read_voxels(np.ones((Z, Y, X), dtype=bool))  # the HDF5 order, not the ROI grid
    assert_one_line_naming(excinfo.value, h5_session)


@pytest.mark.parametrize("fmt", ["hdf5", "nifti"])
def test_expect_grid_mismatch_names_file(tree, fmt, h5_session, nifti_session):
    path = h5_session if fmt == "hdf5" else nifti_session
    with pytest.raises(BadInputError) as excinfo:
        BetaSession(path, expect_grid=(Z, Y, X))
    message = assert_one_line_naming(excinfo.value, path)
    assert str((X, Y, Z)) in message


def test_expect_grid_mismatch_closes_hdf5(h5_session):
    # Every other error path of BetaSession closes the HDF5 handle before raising; this one must too,
    # or the file stays open (and locked against writers) for as long as the exception is referenced.
    with pytest.raises(BadInputError) as excinfo:
        BetaSession(h5_session, expect_grid=(Z, Y, X))
    assert excinfo.value.path == h5_session
    assert h5_is_closed(h5_session)


def test_beta_session_close_releases_file(h5_session):
    with BetaSession(h5_session) as session:
        assert not h5_is_closed(h5_session)
        session.read()
    assert h5_is_closed(h5_session)


def test_hdf5_wrong_dataset_name(tmp_path):
    path = write_h5(tmp_path / "betas_session01.hdf5", "beta", hdf5_betas_array())
    with pytest.raises(BadInputError) as excinfo:
        BetaSession(path)
    message = assert_one_line_naming(excinfo.value, path)
    assert "'/betas'" in message
    assert "beta" in message.split("found")[-1]  # says what it found instead
    assert h5_is_closed(path)


def test_hdf5_float_betas_rejected(tmp_path):
    path = write_h5(tmp_path / "betas_session01.hdf5", "betas", hdf5_betas_array().astype(np.float32) / 300)
    with pytest.raises(BadInputError) as excinfo:
        BetaSession(path)
    message = assert_one_line_naming(excinfo.value, path)
    assert "int16" in message
    assert "float32" in message
    assert h5_is_closed(path)


def test_hdf5_3d_betas_rejected(tmp_path):
    path = write_h5(tmp_path / "betas_session01.hdf5", "betas", hdf5_betas_array()[0])
    with pytest.raises(BadInputError) as excinfo:
        BetaSession(path)
    message = assert_one_line_naming(excinfo.value, path)
    assert "4-D" in message
    assert str((Z, Y, X)) in message
    assert h5_is_closed(path)


def test_nifti_3d_and_float_betas_rejected(tmp_path):
    path3d = write_nifti(tmp_path / "a" / "betas_session01.nii.gz", nifti_betas_array()[..., 0])
    with pytest.raises(BadInputError) as excinfo:
        BetaSession(path3d)
    assert "4-D" in assert_one_line_naming(excinfo.value, path3d)
    path_float = write_nifti(tmp_path / "b" / "betas_session01.nii.gz", nifti_betas_array().astype(np.float32))
    with pytest.raises(BadInputError) as excinfo:
        BetaSession(path_float)
    assert "int16" in assert_one_line_naming(excinfo.value, path_float)


def test_betas_missing_corrupt_or_unknown_extension(tmp_path):
    missing = tmp_path / "betas_session01.hdf5"
    with pytest.raises(BadInputError) as excinfo:
        BetaSession(missing)
    assert "missing" in assert_one_line_naming(excinfo.value, missing)

    not_hdf5 = tmp_path / "betas_session02.hdf5"
    not_hdf5.write_text("this is not HDF5")
    with pytest.raises(BadInputError) as excinfo:
        BetaSession(not_hdf5)
    assert "HDF5" in assert_one_line_naming(excinfo.value, not_hdf5)

    odd = tmp_path / "betas_session03.mat"
    odd.write_bytes(b"")
    with pytest.raises(BadInputError) as excinfo:
        BetaSession(odd)
    assert ".hdf5" in assert_one_line_naming(excinfo.value, odd)


# ----------------------------------------------------------------------------------------------
# nsd_expdesign.mat


def write_expdesign(path: Path, **overrides) -> Path:
    """A MATLAB-like design (float64, 1-based): 6 trials over a 3-image list, subjects 1 and 2 simulated."""
    subjectim = np.zeros((8, 3))
    subjectim[0] = [11, 21, 31]
    subjectim[1] = [5, 6, 7]
    variables = {
        "masterordering": np.array([[1, 2, 3, 1, 3, 2]], dtype=np.float64),
        "subjectim": subjectim,
        "sharedix": np.array([[21]], dtype=np.float64),
    }
    variables.update(overrides)
    variables = {k: v for k, v in variables.items() if v is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, variables)
    return path


def test_expdesign_trial_images_are_zero_based(tree):
    design = ExpDesign.load(write_expdesign(tree.expdesign))
    assert design.num_trials == 6
    assert design.images_per_subject == 3
    np.testing.assert_array_equal(design.masterordering, [0, 1, 2, 0, 2, 1])
    # masterordering [1,2,3,1,3,2] into subject 1's list [11,21,31] (1-based 73k ids) -> 0-based nsdIds
    np.testing.assert_array_equal(design.trial_images(1), [10, 20, 30, 10, 30, 20])
    np.testing.assert_array_equal(design.trial_images(2), [4, 5, 6, 4, 6, 5])
    np.testing.assert_array_equal(design.trial_images(1, num_trials=3), [10, 20, 30])
    np.testing.assert_array_equal(design.subject_images(2), [4, 5, 6])
    np.testing.assert_array_equal(design.shared, [20])
    np.testing.assert_array_equal(design.is_shared(np.array([10, 20, 30, 20])), [False, True, False, True])
    assert design.trial_images(1).dtype.kind == "i"


def test_expdesign_shared_sorted_zero_based(tmp_path):
    path = write_expdesign(tmp_path / "d.mat", sharedix=np.array([[31, 11, 21]], dtype=np.float64))
    np.testing.assert_array_equal(ExpDesign.load(path).shared, [10, 20, 30])


def test_expdesign_unsimulated_subject_raises(tree):
    design = ExpDesign.load(write_expdesign(tree.expdesign))
    with pytest.raises(BadInputError) as excinfo:
        design.trial_images(3)
    message = assert_one_line_naming(excinfo.value, tree.expdesign)
    assert "subject 3" in message
    with pytest.raises(ValueError):
        design.trial_images(9)


def test_expdesign_too_many_trials_requested(tree):
    design = ExpDesign.load(write_expdesign(tree.expdesign))
    with pytest.raises(BadInputError):
        design.trial_images(1, num_trials=7)


def test_expdesign_missing_variable(tree):
    path = write_expdesign(tree.expdesign, sharedix=None)
    with pytest.raises(BadInputError) as excinfo:
        ExpDesign.load(path)
    assert "sharedix" in assert_one_line_naming(excinfo.value, path)


def test_expdesign_zero_based_masterordering_rejected(tree):
    path = write_expdesign(tree.expdesign, masterordering=np.array([[0, 1, 2, 0, 2, 1]], dtype=np.float64))
    with pytest.raises(BadInputError) as excinfo:
        ExpDesign.load(path)
    assert "1-based" in assert_one_line_naming(excinfo.value, path)


def test_expdesign_masterordering_beyond_list_rejected(tree):
    path = write_expdesign(tree.expdesign, masterordering=np.array([[1, 2, 4]], dtype=np.float64))
    with pytest.raises(BadInputError):
        ExpDesign.load(path)


def test_expdesign_fractional_values_rejected(tree):
    path = write_expdesign(tree.expdesign, masterordering=np.array([[1, 2.5, 3]]))
    with pytest.raises(BadInputError) as excinfo:
        ExpDesign.load(path)
    assert "integers" in assert_one_line_naming(excinfo.value, path)


def test_expdesign_not_a_mat_file(tmp_path):
    path = tmp_path / "nsd_expdesign.mat"
    path.write_text("hello")
    with pytest.raises(BadInputError) as excinfo:
        ExpDesign.load(path)
    assert_one_line_naming(excinfo.value, path)


def test_repeat_index():
    np.testing.assert_array_equal(repeat_index([5, 7, 5, 9, 7, 5]), [0, 0, 1, 0, 1, 2])
    np.testing.assert_array_equal(repeat_index([3, 3, 3]), [0, 1, 2])
    np.testing.assert_array_equal(repeat_index([9, 1]), [0, 0])
    assert repeat_index(np.array([], dtype=np.int64)).size == 0


# ----------------------------------------------------------------------------------------------
# nsd_stim_info_merged.csv


def stim_info_header() -> list[str]:
    subjects = range(1, 9)
    reps = [f"subject{s}_rep{r}" for s in subjects for r in range(3)]
    base = ["", "cocoId", "cocoSplit", "cropBox", "loss", "nsdId", "flagged", "BOLD5000", "shared1000"]
    return base + [f"subject{s}" for s in subjects] + reps


def stim_info_row(nsd_id, coco_id, split, crop, shared, subject1_reps):
    seen = [1 if any(subject1_reps) else 0] + [0] * 7
    reps = list(subject1_reps) + [0] * 21
    return [nsd_id, coco_id, split, crop, 0.0, nsd_id, False, False, shared, *seen, *reps]


STIM_ROWS = [
    stim_info_row(0, 532481, "val2017", "(0, 0, 0.1671875, 0.1671875)", True, (1, 4, 0)),
    stim_info_row(1, 245340, "train2017", "(0.125, 0.125, 0, 0)", False, (2, 0, 0)),
    stim_info_row(2, 71, "train2017", "(0, 0, 0, 0)", False, (0, 0, 0)),
]


def write_csv(path: Path, header, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_stim_info_load(tree):
    path = write_csv(tree.stim_info, stim_info_header(), STIM_ROWS)
    assert '"(0, 0, 0.1671875, 0.1671875)"' in path.read_text()  # quoted like pandas writes it
    info = StimInfo.load(path)
    assert len(info) == 3
    np.testing.assert_array_equal(info.coco_id, [532481, 245340, 71])
    assert list(info.coco_split) == ["val2017", "train2017", "train2017"]
    np.testing.assert_allclose(info.crop_box, [[0, 0, 0.1671875, 0.1671875], [0.125, 0.125, 0, 0], [0, 0, 0, 0]])
    assert info.shared1000.dtype == bool
    np.testing.assert_array_equal(info.shared1000, [True, False, False])
    assert sorted(info.trials) == list(range(1, 9))
    # 1-based trial numbers, 0 = not shown -> 0-based, -1
    np.testing.assert_array_equal(info.trials[1], [[0, 3, -1], [1, -1, -1], [-1, -1, -1]])
    assert info.trials[1].shape == (3, 3)
    np.testing.assert_array_equal(info.trials[8], np.full((3, 3), -1))


def test_stim_info_float_rep_columns(tmp_path):
    rows = [[*row[:-24], *(f"{float(v)}" for v in row[-24:])] for row in STIM_ROWS]
    info = StimInfo.load(write_csv(tmp_path / "s.csv", stim_info_header(), rows))
    np.testing.assert_array_equal(info.trials[1][0], [0, 3, -1])


def test_stim_info_missing_coco_id(tmp_path):
    header = stim_info_header()
    drop = header.index("cocoId")
    rows = [[v for i, v in enumerate(row) if i != drop] for row in STIM_ROWS]
    path = write_csv(tmp_path / "nsd_stim_info_merged.csv", [h for h in header if h != "cocoId"], rows)
    with pytest.raises(BadInputError) as excinfo:
        StimInfo.load(path)
    assert "cocoId" in assert_one_line_naming(excinfo.value, path)


def test_stim_info_nsd_id_out_of_row_order(tmp_path):
    rows = [STIM_ROWS[0], STIM_ROWS[2], STIM_ROWS[1]]
    path = write_csv(tmp_path / "nsd_stim_info_merged.csv", stim_info_header(), rows)
    with pytest.raises(BadInputError) as excinfo:
        StimInfo.load(path)
    assert "nsdId" in assert_one_line_naming(excinfo.value, path)


@pytest.mark.parametrize("crop_box", ["(0, 0, 0.1)", "0", "0.25", "oops", ""])
def test_stim_info_bad_crop_box(tmp_path, crop_box):
    rows = [[*STIM_ROWS[0][:3], crop_box, *STIM_ROWS[0][4:]]]
    path = write_csv(tmp_path / "bad.csv", stim_info_header(), rows)
    with pytest.raises(BadInputError) as excinfo:
        StimInfo.load(path)
    assert_one_line_naming(excinfo.value, path)


def test_stim_info_empty_file(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(BadInputError):
        StimInfo.load(empty)


# ----------------------------------------------------------------------------------------------
# ROI volumes

STREAMS_VOXELS = {  # label -> voxels of the (3, 4, 5) grid
    1: [(0, 0, 0), (0, 0, 1)],
    2: [(1, 1, 1)],
    3: [(2, 3, 4)],
    4: [(0, 3, 2)],
    5: [(2, 0, 0), (2, 0, 1), (1, 3, 4)],
    6: [(1, 2, 3)],
    7: [(0, 1, 4)],
}
STREAMS_NAMES = ["early", "midventral", "midlateral", "midparietal", "ventral", "lateral", "parietal"]
NSDGENERAL_VOXELS = [(0, 0, 0), (2, 3, 4), (1, 1, 0)]


def streams_volume() -> np.ndarray:
    vol = np.full(GRID, -1, dtype=np.int16)
    vol[:, :2, :] = 0  # cortical but unlabeled
    for label, voxels in STREAMS_VOXELS.items():
        for v in voxels:
            vol[v] = label
    return vol


def nsdgeneral_volume() -> np.ndarray:
    vol = np.full(GRID, -1, dtype=np.int16)
    vol[1:, :, :] = 0
    for v in NSDGENERAL_VOXELS:
        vol[v] = 1
    return vol


def voxels_of(mask: np.ndarray) -> list[tuple]:
    return [tuple(int(i) for i in v) for v in np.argwhere(mask)]


@pytest.fixture
def roi_tree(tree) -> NsdTree:
    write_nifti(tree.roi(1, "streams"), streams_volume())
    write_nifti(tree.roi(1, "nsdgeneral"), nsdgeneral_volume())
    write_nifti(tree.roi(1, "streams", hemi="lh"), streams_volume())
    return tree


def test_read_roi_values(roi_tree):
    roi = read_roi(roi_tree.roi(1, "streams"), expect_grid=GRID)
    assert roi.data.dtype == np.int16
    assert roi.grid == GRID
    np.testing.assert_array_equal(roi.data, streams_volume())
    assert set(np.unique(roi.data)) == {-1, 0, 1, 2, 3, 4, 5, 6, 7}
    np.testing.assert_allclose(roi.affine, np.diag([1.8, 1.8, 1.8, 1.0]))


def test_read_roi_int32_and_float_integral_volumes(tmp_path):
    for dtype in (np.int32, np.float32):
        path = write_nifti(tmp_path / f"{np.dtype(dtype).name}.nii.gz", streams_volume().astype(dtype))
        roi = read_roi(path)
        assert roi.data.dtype == np.int16
        np.testing.assert_array_equal(roi.data, streams_volume())


def test_area_masks_builtin_names(roi_tree):
    masks = area_masks(roi_tree, 1, ["nsdgeneral", "streams"], expect_grid=GRID)
    assert list(masks) == ["nsdgeneral", *STREAMS_NAMES]
    for mask in masks.values():
        assert mask.dtype == bool and mask.shape == GRID
    assert voxels_of(masks["nsdgeneral"]) == sorted(NSDGENERAL_VOXELS)
    assert voxels_of(masks["early"]) == sorted(STREAMS_VOXELS[1])  # label 1
    assert voxels_of(masks["ventral"]) == sorted(STREAMS_VOXELS[5])  # label 5
    for label, name in enumerate(STREAMS_NAMES, start=1):
        assert voxels_of(masks[name]) == sorted(STREAMS_VOXELS[label])
    # -1 (non-cortical) and 0 (unlabeled) voxels are in no area
    union = np.zeros(GRID, dtype=bool)
    for name in STREAMS_NAMES:
        union |= masks[name]
    assert not np.any(union & (streams_volume() <= 0))
    assert int(union.sum()) == sum(len(v) for v in STREAMS_VOXELS.values())
    assert not np.any(masks["nsdgeneral"] & (nsdgeneral_volume() <= 0))


def test_ctab_overrides_builtin_names(roi_tree):
    ctab = roi_tree.roi_ctab("streams")
    ctab.parent.mkdir(parents=True)
    names = ["EarlyVis", "MidV", "MidL", "MidP", "Ventral", "Lateral", "Parietal"]
    lines = ["0 Unknown 0 0 0 0"] + [f"{i} {n} {10 * i} 0 0 0" for i, n in enumerate(names, start=1)]
    ctab.write_text("\n".join(lines) + "\n")
    assert atlas_label_names(roi_tree, "streams") == dict(enumerate(names, start=1))
    masks = area_masks(roi_tree, 1, ["streams"])
    assert list(masks) == names
    assert voxels_of(masks["EarlyVis"]) == sorted(STREAMS_VOXELS[1])
    assert voxels_of(masks["Ventral"]) == sorted(STREAMS_VOXELS[5])


def test_atlas_without_names_raises(roi_tree):
    write_nifti(roi_tree.roi(1, "myatlas"), streams_volume())
    with pytest.raises(BadInputError) as excinfo:
        area_masks(roi_tree, 1, ["myatlas"])
    assert_one_line_naming(excinfo.value, roi_tree.roi_ctab("myatlas"))


def test_available_atlases_skips_hemisphere_files(roi_tree):
    assert available_atlases(roi_tree, 1) == ["nsdgeneral", "streams"]
    assert available_atlases(roi_tree, 2) == []


def test_roi_fractional_values_rejected(tmp_path):
    vol = streams_volume().astype(np.float32)
    vol[1, 1, 1] = 0.5
    path = write_nifti(tmp_path / "streams.nii.gz", vol)
    with pytest.raises(BadInputError) as excinfo:
        read_roi(path)
    assert "integer" in assert_one_line_naming(excinfo.value, path)


def test_roi_values_below_minus_one_rejected(tmp_path):
    vol = streams_volume()
    vol[0, 0, 0] = -2
    path = write_nifti(tmp_path / "streams.nii.gz", vol)
    with pytest.raises(BadInputError):
        read_roi(path)


def test_roi_expect_grid_mismatch(roi_tree):
    path = roi_tree.roi(1, "streams")
    with pytest.raises(BadInputError) as excinfo:
        read_roi(path, expect_grid=(Z, Y, X))
    assert_one_line_naming(excinfo.value, path)
    with pytest.raises(BadInputError):
        area_masks(roi_tree, 1, ["nsdgeneral"], expect_grid=(X, Y, Z + 1))


def test_roi_missing_file(tree):
    with pytest.raises(BadInputError) as excinfo:
        area_masks(tree, 1, ["nsdgeneral"])
    assert "missing" in assert_one_line_naming(excinfo.value, tree.roi(1, "nsdgeneral"))


# ----------------------------------------------------------------------------------------------
# nsd_stimuli.hdf5

NUM_IMAGES = 4


def image_brick() -> np.ndarray:
    """(4, 6, 6, 3) uint8, image i filled with value i."""
    return np.broadcast_to(np.arange(NUM_IMAGES, dtype=np.uint8)[:, None, None, None], (NUM_IMAGES, 6, 6, 3)).copy()


def test_stimuli_random_access(tree):
    path = write_h5(tree.stimuli, "imgBrick", image_brick())
    with NsdStimuli(path) as stimuli:
        assert len(stimuli) == NUM_IMAGES
        assert stimuli.image_size == (6, 6)
        for i in range(NUM_IMAGES):
            image = stimuli[i]
            assert image.shape == (6, 6, 3) and image.dtype == np.uint8
            assert np.all(image == i)
        batch = stimuli.read([2, 0, 2])
        assert batch.shape == (3, 6, 6, 3) and batch.dtype == np.uint8
        assert [int(v) for v in batch[:, 0, 0, 0]] == [2, 0, 2]
        np.testing.assert_array_equal(batch, image_brick()[[2, 0, 2]])
        assert stimuli.read([]).shape == (0, 6, 6, 3)
        with pytest.raises(IndexError):
            stimuli[NUM_IMAGES]
        with pytest.raises(IndexError):
            stimuli.read([0, NUM_IMAGES])
    assert h5_is_closed(path)


def test_stimuli_wrong_dataset_name(tmp_path):
    path = write_h5(tmp_path / "nsd_stimuli.hdf5", "images", image_brick())
    with pytest.raises(BadInputError) as excinfo:
        NsdStimuli(path)
    assert "'/imgBrick'" in assert_one_line_naming(excinfo.value, path)
    assert h5_is_closed(path)


def test_stimuli_float_dtype_rejected(tmp_path):
    path = write_h5(tmp_path / "nsd_stimuli.hdf5", "imgBrick", image_brick().astype(np.float32) / 255)
    with pytest.raises(BadInputError) as excinfo:
        NsdStimuli(path)
    message = assert_one_line_naming(excinfo.value, path)
    assert "uint8" in message and "float32" in message
    assert h5_is_closed(path)


# ----------------------------------------------------------------------------------------------
# COCO annotations

CAPTIONS = {
    "info": {},
    "images": [{"id": 5, "width": 640, "height": 480}, {"id": 9, "width": 500, "height": 500}],
    "annotations": [
        {"id": 1, "image_id": 5, "caption": "A cat on a mat."},
        {"id": 2, "image_id": 9, "caption": "A dog."},
        {"id": 3, "image_id": 5, "caption": "A cat sleeping."},
    ],
}
INSTANCES = {
    "images": [{"id": 5, "width": 640, "height": 480}],
    "categories": [{"id": 17, "name": "cat", "supercategory": "animal"}, {"id": 1, "name": "person"}],
    "annotations": [
        {"id": 10, "image_id": 5, "category_id": 17, "bbox": [100, 50, 60, 40], "area": 2400.0, "iscrowd": 0},
        {"id": 11, "image_id": 5, "category_id": 1, "bbox": [0, 0, 10, 20], "area": 200.0, "iscrowd": 0},
    ],
}


def write_json_file(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def test_coco_captions(tree):
    path = write_json_file(tree.coco_annotations("captions", "train2017"), CAPTIONS)
    coco = CocoAnnotations.load(path, "captions")
    assert coco.kind == "captions"
    assert [a["caption"] for a in coco.annotations(5)] == ["A cat on a mat.", "A cat sleeping."]
    assert [a["caption"] for a in coco.annotations(9)] == ["A dog."]
    assert coco.annotations(123) == []
    assert coco.images[5]["width"] == 640 and coco.images[9]["height"] == 500
    assert coco.categories == {}


def test_coco_instances(tree):
    path = write_json_file(tree.coco_annotations("instances", "val2017"), INSTANCES)
    coco = CocoAnnotations.load(path, "instances")
    assert coco.categories == {17: "cat", 1: "person"}
    anns = coco.annotations(5)
    assert [(a["category_id"], a["bbox"]) for a in anns] == [(17, [100, 50, 60, 40]), (1, [0, 0, 10, 20])]


def test_coco_captions_without_annotations(tmp_path):
    path = write_json_file(tmp_path / "captions_train2017.json", {"images": []})
    with pytest.raises(BadInputError) as excinfo:
        CocoAnnotations.load(path, "captions")
    assert "annotations" in assert_one_line_naming(excinfo.value, path)


def test_coco_instances_need_categories(tmp_path):
    data = {k: v for k, v in INSTANCES.items() if k != "categories"}
    path = write_json_file(tmp_path / "instances_train2017.json", data)
    with pytest.raises(BadInputError) as excinfo:
        CocoAnnotations.load(path, "instances")
    assert "categories" in assert_one_line_naming(excinfo.value, path)


def test_coco_instance_bad_bbox(tmp_path):
    data = json.loads(json.dumps(INSTANCES))
    data["annotations"][1]["bbox"] = [0, 0, 10]
    path = write_json_file(tmp_path / "instances_train2017.json", data)
    with pytest.raises(BadInputError) as excinfo:
        CocoAnnotations.load(path, "instances")
    message = assert_one_line_naming(excinfo.value, path)
    assert "annotation 1" in message and "bbox" in message


def test_coco_caption_missing_field_and_bad_kind(tmp_path):
    data = json.loads(json.dumps(CAPTIONS))
    del data["annotations"][2]["caption"]
    path = write_json_file(tmp_path / "captions_train2017.json", data)
    with pytest.raises(BadInputError) as excinfo:
        CocoAnnotations.load(path, "captions")
    assert "annotation 2" in assert_one_line_naming(excinfo.value, path)
    with pytest.raises(ValueError):
        CocoAnnotations.load(path, "keypoints")


def test_coco_invalid_json(tmp_path):
    path = tmp_path / "captions_train2017.json"
    path.write_text('{"images": [')
    with pytest.raises(BadInputError) as excinfo:
        CocoAnnotations.load(path, "captions")
    assert_one_line_naming(excinfo.value, path)


# ----------------------------------------------------------------------------------------------
# COCO boxes on NSD's 425 x 425 crops

IMAGE_SIZE = (640, 480)  # (width, height)
CROP_BOX = (0, 0, 0.125, 0.125)  # (top, bottom, left, right): cut 80 px from the left and the right
SCALE = 425 / 480  # the 480 x 480 window x 80..560, y 0..480 becomes 425 x 425


def test_crop_window():
    assert crop_window(IMAGE_SIZE, CROP_BOX) == pytest.approx((80, 0, 560, 480))
    # (top, bottom, left, right) order: a portrait image cropped at top and bottom
    assert crop_window((480, 640), (0.125, 0.125, 0, 0)) == pytest.approx((0, 80, 480, 560))


def test_coco_box_inside_the_crop():
    box = coco_box_to_nsd([100, 50, 60, 40], IMAGE_SIZE, CROP_BOX)
    assert box == pytest.approx(((100 - 80) * SCALE, 50 * SCALE, (160 - 80) * SCALE, 90 * SCALE))


def test_coco_box_cropped_away_is_none():
    assert coco_box_to_nsd([0, 0, 50, 50], IMAGE_SIZE, CROP_BOX) is None  # inside the cut-away left strip
    assert coco_box_to_nsd([570, 100, 60, 60], IMAGE_SIZE, CROP_BOX) is None  # right strip
    assert coco_box_to_nsd([30, 0, 50, 50], IMAGE_SIZE, CROP_BOX) is None  # touches the edge, zero width


def test_coco_box_straddling_edge_is_clipped():
    box = coco_box_to_nsd([60, 10, 40, 20], IMAGE_SIZE, CROP_BOX)  # x 60..100, crop starts at 80
    assert box == pytest.approx((0.0, 10 * SCALE, 20 * SCALE, 30 * SCALE))
    box = coco_box_to_nsd([540, 400, 100, 100], IMAGE_SIZE, CROP_BOX)  # clipped at right and bottom
    assert box == pytest.approx(((540 - 80) * SCALE, 400 * SCALE, 425.0, 425.0))


def test_coco_box_min_visible():
    box = [40, 10, 50, 20]  # x 40..90: only 10 of 50 px (20 %) remain inside the crop
    assert coco_box_to_nsd(box, IMAGE_SIZE, CROP_BOX, min_visible=0.5) is None
    kept = coco_box_to_nsd(box, IMAGE_SIZE, CROP_BOX, min_visible=0.1)
    assert kept == pytest.approx((0.0, 10 * SCALE, 10 * SCALE, 30 * SCALE))
    assert coco_box_to_nsd([100, 50, 60, 40], IMAGE_SIZE, CROP_BOX, min_visible=1.0) is not None


def test_coco_box_other_output_size():
    box = coco_box_to_nsd([100, 50, 60, 40], IMAGE_SIZE, CROP_BOX, out_size=240)
    assert box == pytest.approx((10.0, 25.0, 40.0, 45.0))
