"""The NSD design readers on tiny hand-written files: nsd_expdesign.mat (1-based, MATLAB) and
nsd_stim_info_merged.csv (0-based nsdId, 1-based trial numbers), both returned 0-based."""

import csv
from pathlib import Path

import numpy as np
import pytest
from scipy.io import savemat

from llava_brain.errors import BadInputError
from llava_brain.layout import NsdTree
from llava_brain.nsd import ExpDesign, StimInfo, repeat_index
from llava_brain.nsd.design import stim_info_subjects

from stage_checks import assert_one_line_naming


@pytest.fixture
def tree(tmp_path) -> NsdTree:
    return NsdTree(tmp_path / "nsd")


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


def test_stim_info_subjects_seen_and_their_images(tree):
    """Subject 1 saw images 0 and 1 (rep0 > 0), nobody else saw anything: only subject 1 is a source
    subject, its images are [0, 1], and asking for subject 2 is an error naming the CSV."""
    path = write_csv(tree.stim_info, stim_info_header(), STIM_ROWS)
    info = StimInfo.load(path)
    assert info.shown_subjects() == [1]
    np.testing.assert_array_equal(info.images_seen_by([1]), [0, 1])
    assert stim_info_subjects(tree.root) == ([1], path, "subjects with a shown trial (subjectK_rep0 > 0)")
    with pytest.raises(BadInputError) as excinfo:
        info.images_seen_by([1, 2])
    assert "subject 2" in assert_one_line_naming(excinfo.value, path)
    assert info.images_seen_by([]).size == 0
