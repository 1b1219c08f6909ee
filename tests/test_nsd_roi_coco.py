"""ROI volumes (-1 non-cortical, 0 unlabeled, 1..N labels) and COCO annotation files, read on tiny
hand-written files with known values, and COCO boxes mapped onto NSD's 425 x 425 crops."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from llava_brain.errors import BadInputError
from llava_brain.layout import NsdTree
from llava_brain.nsd import (
    CocoAnnotations,
    area_masks,
    atlas_label_names,
    available_atlases,
    coco_box_to_nsd,
    crop_window,
    read_roi,
)

from stage_checks import assert_one_line_naming

X, Y, Z = 3, 4, 5  # all different, so any axis swap shows
GRID = (X, Y, Z)


def write_nifti(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([1.8, 1.8, 1.8, 1.0])), path)
    return path


@pytest.fixture
def tree(tmp_path) -> NsdTree:
    return NsdTree(tmp_path / "nsd")


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
