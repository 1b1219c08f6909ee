"""NSD readers of betas and stimuli on tiny hand-written files in NSD's own formats, with known values.

The design and stimulus table: test_nsd_design.py; ROI volumes and COCO files: test_nsd_roi_coco.py.
"""

from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from llava_brain.errors import BadInputError
from llava_brain.layout import NsdTree
from llava_brain.nsd import (
    BetaSession,
    NsdStimuli,
)

from stage_checks import assert_one_line_naming

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
