"""make_coco_annotations and llava_brain.annotations: COCO captions and boxes land on the right NSD image and pixels."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from llava_brain.annotations import (
    BOX_FORMAT,
    load_instances,
    read_captions,
    read_info,
    read_instances,
    write_captions,
    write_instances,
)
from llava_brain.errors import BadInputError
from llava_brain.io import manifest_of
from llava_brain.layout import DatasetRoot, NsdTree
from llava_brain.nsd import StimInfo

from conftest import load_script
from stage_checks import error_line

# nsdId -> (cocoSplit, cocoId, (width, height), cropBox (top, bottom, left, right), subjects who saw it)
ROWS = {
    # 640 x 480 landscape, 1/8 cut left and right: crop x in [80, 560], y in [0, 480], scale 425/480.
    0: ("val2017", 100, (640, 480), (0, 0, 0.125, 0.125), {1}),
    # 480 x 640 portrait, 1/8 cut top and bottom: crop x in [0, 480], y in [80, 560], scale 425/480.
    1: ("train2017", 200, (480, 640), (0.125, 0.125, 0, 0), {1}),
    2: ("train2017", 300, (500, 500), (0, 0, 0, 0), {2}),  # square, uncropped: scale 425/500
    3: ("train2017", 400, (500, 500), (0, 0, 0, 0), set()),  # seen by nobody, no annotations
}
S = 425 / 480
CATEGORIES = [{"id": 1, "name": "person", "supercategory": "person"}, {"id": 2, "name": "dog", "supercategory": "ani"}]
CAPTIONS = {  # (cocoSplit, cocoId) -> [(annotation id, caption)], ids deliberately out of order
    ("val2017", 100): [(7, " A dog runs. "), (3, "A brown dog.\n"), (5, "Dog on grass.")],
    ("val2017", 200): [(1, "WRONG SPLIT")],  # decoy: nsdId 1 is train2017 image 200
    ("train2017", 200): [(12, "A tower at dusk."), (11, "A tall tower.")],
    ("train2017", 300): [(20, "A plate.")],
}
INSTANCES = {  # (cocoSplit, cocoId) -> [(annotation id, category, COCO bbox [x, y, w, h], iscrowd)]
    ("val2017", 100): [
        (4, 2, [40, 0, 80, 80], 0),  # half inside the crop (x 80..120 of 40..120)
        (1, 2, [80, 0, 240, 240], 0),  # fully inside, touching the crop's top-left corner
        (2, 1, [0, 100, 60, 50], 0),  # left of the crop (x < 80): dropped
        (3, 1, [500, 400, 100, 100], 1),  # 48 % inside (x 500..560, y 400..480)
    ],
    ("val2017", 200): [(5, 1, [0, 0, 10, 10], 0)],  # decoy
    ("train2017", 200): [(10, 1, [0, 80, 480, 480], 0), (9, 2, [240, 0, 100, 40], 0)],  # the crop itself; above it
    ("train2017", 300): [(30, 2, [50, 50, 100, 100], 0)],
}
# Worked out by hand: (x - crop_x1) * scale, (y - crop_y1) * scale, clipped to the crop.
EXPECTED_BOXES = {
    0: [
        ("dog", [0, 0, 240 * S, 240 * S], 0),  # annotation 1
        ("person", [420 * S, 400 * S, 425, 425], 1),  # annotation 3: clipped at x = 560, y = 480
        ("dog", [0, 0, 40 * S, 80 * S], 0),  # annotation 4: clipped at x = 80
    ],
    1: [("person", [0, 0, 425, 425], 0)],
    2: [("dog", [42.5, 42.5, 127.5, 127.5], 0)],
    3: [],
}


@pytest.fixture(scope="module")
def script():
    return load_script("prepare_datasets/make_coco_annotations.py")


@pytest.fixture
def tree(tmp_path) -> NsdTree:
    """A raw tree with only what the script reads: the CSV and the four COCO files."""
    tree = NsdTree(tmp_path / "raw")
    tree.stim_info.parent.mkdir(parents=True)
    reps = [f"subject{s}_rep{r}" for s in (1, 2) for r in range(3)]
    with open(tree.stim_info, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["", "cocoId", "cocoSplit", "cropBox", "nsdId", "shared1000", *reps])
        for nsd_id, (split, coco_id, _, crop, seen) in ROWS.items():
            trials = [[nsd_id + 1 if s in seen else 0, 0, 0] for s in (1, 2)]  # 1-based trial; 0 = not shown
            writer.writerow([nsd_id, coco_id, split, str(crop), nsd_id, False, *np.ravel(trials).tolist()])
    for split in ("train2017", "val2017"):
        ids = {coco_id for s, coco_id, *_ in ROWS.values() if s == split} | {i for s, i in CAPTIONS if s == split}
        sizes = {coco_id: size for _, coco_id, size, *_ in ROWS.values()}
        images = [{"id": i, "width": sizes[i][0], "height": sizes[i][1], "file_name": f"{i:012d}.jpg"} for i in ids]
        captions = [
            {"id": ann_id, "image_id": coco_id, "caption": text}
            for (s, coco_id), anns in CAPTIONS.items()
            if s == split
            for ann_id, text in anns
        ]
        instances = [
            {"id": ann_id, "image_id": coco_id, "category_id": cat, "bbox": bbox, "iscrowd": crowd, "area": 1.0}
            for (s, coco_id), anns in INSTANCES.items()
            if s == split
            for ann_id, cat, bbox, crowd in anns
        ]
        path = tree.coco_annotations("captions", split)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"images": images, "annotations": captions}))
        payload = {"images": images, "annotations": instances, "categories": CATEGORIES}
        tree.coco_annotations("instances", split).write_text(json.dumps(payload))
    return tree


def _run(script, tree: NsdTree, root: Path, *flags: str) -> int:
    return script.main(["--nsd-root", str(tree.root), "--dataset-root", str(root), *flags])


def _provenance(path: Path) -> dict:
    return json.loads(manifest_of(path).read_text())


def test_boxes_land_where_computed_by_hand(script, tree, tmp_path):
    assert _run(script, tree, tmp_path / "out", "--all-images") == 0
    instances = load_instances(DatasetRoot(tmp_path / "out").coco_instances)
    assert instances.categories == {1: "person", 2: "dog"}
    assert instances.info["box_format"] == BOX_FORMAT
    assert sorted(instances.images) == [0, 1, 2, 3]  # the unseen, unannotated image still has an entry
    for nsd_id, expected in EXPECTED_BOXES.items():
        got = instances.images[nsd_id]
        assert [(o["category"], o["iscrowd"]) for o in got] == [(name, crowd) for name, _, crowd in expected]
        for obj, (_, box, _) in zip(got, expected, strict=True):
            assert obj["box"] == pytest.approx(box, abs=0.005 + 1e-9)  # rounded to 2 decimals
            assert obj["category_id"] == {"person": 1, "dog": 2}[obj["category"]]
    assert _provenance(DatasetRoot(tmp_path / "out").coco_instances)["num_dropped_cropped_away"] == 2


def test_captions_follow_the_split_column_and_annotation_order(script, tree, tmp_path):
    assert _run(script, tree, tmp_path / "out", "--subject", "1") == 0
    captions = read_captions(DatasetRoot(tmp_path / "out").coco_captions)
    assert captions == {
        0: ["A brown dog.", "Dog on grass.", "A dog runs."],
        1: ["A tall tower.", "A tower at dusk."],  # train2017 image 200, not val2017's decoy with the same id
    }
    assert sorted(read_instances(DatasetRoot(tmp_path / "out").coco_instances)) == [0, 1]


def test_subject_selection(script, tree, tmp_path):
    for flags, expected in (
        (["--subject", "2"], [2]),
        (["--subject", "all"], [0, 1, 2]),
        (["--all-images"], [0, 1, 2, 3]),
    ):
        root = DatasetRoot(tmp_path / "_".join(flags))
        assert _run(script, tree, root.root, *flags) == 0
        assert sorted(read_captions(root.coco_captions)) == sorted(read_instances(root.coco_instances)) == expected


def test_min_visible_drops_mostly_cropped_objects(script, tree, tmp_path):
    kept = {}
    for fraction in ("0.5", "0.6"):
        assert _run(script, tree, tmp_path / fraction, "--subject", "1", "--min-visible", fraction) == 0
        boxes = read_instances(DatasetRoot(tmp_path / fraction).coco_instances)[0]
        kept[fraction] = [obj["box"][2] for obj in boxes]
    assert kept["0.5"] == pytest.approx([240 * S, 40 * S], abs=0.005)  # 50 % visible stays, 48 % goes
    assert kept["0.6"] == pytest.approx([240 * S], abs=0.005)


def test_rerun_skips_and_other_settings_need_overwrite(script, tree, tmp_path, capsys):
    root = DatasetRoot(tmp_path / "out")
    outputs = (root.coco_captions, root.coco_instances)
    assert _run(script, tree, root.root, "--subject", "all") == 0
    assert _provenance(root.coco_captions)["settings"]["selection"] == {"subjects": [1, 2]}  # 'all' resolved
    assert read_info(root.coco_captions) == {"description": script.CAPTIONS_INFO}  # provenance is beside it
    stamps = [p.stat().st_mtime_ns for p in (*outputs, *map(manifest_of, outputs))]
    assert _run(script, tree, root.root, "--subject", "2", "1") == 0  # the same selection: nothing redone
    assert [p.stat().st_mtime_ns for p in (*outputs, *map(manifest_of, outputs))] == stamps

    capsys.readouterr()
    for other in (["--subject", "1"], ["--subject", "all", "--min-visible", "0.5"]):
        assert _run(script, tree, root.root, *other) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "--overwrite" in err and str(root.coco_captions) in err
    assert [p.stat().st_mtime_ns for p in (*outputs, *map(manifest_of, outputs))] == stamps
    assert _run(script, tree, root.root, "--subject", "all", "--min-visible", "0.5", "--overwrite") == 0
    assert _provenance(root.coco_instances)["settings"]["min_visible"] == 0.5

    root.coco_captions.unlink()  # as if killed between the two writes: the rerun completes the pair
    assert _run(script, tree, root.root, "--subject", "all", "--min-visible", "0.5") == 0
    assert sorted(read_captions(root.coco_captions)) == [0, 1, 2]


@pytest.mark.parametrize("breakage", ["coco_id_not_in_file", "missing_coco_file", "subject_without_trials"])
def test_bad_input_exits_2_naming_the_file(script, tree, tmp_path, capsys, breakage):
    flags = ["--subject", "1"]
    if breakage == "coco_id_not_in_file":
        tree.stim_info.write_text(tree.stim_info.read_text().replace(",200,train2017,", ",999,train2017,"))
        culprit, expected = tree.coco_annotations("captions", "train2017"), "999"
    elif breakage == "missing_coco_file":
        tree.coco_annotations("instances", "val2017").unlink()
        culprit, expected = tree.coco_annotations("instances", "val2017"), "missing"
    else:
        flags, culprit, expected = ["--subject", "3"], tree.stim_info, "subj03"
    assert _run(script, tree, tmp_path / "out", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and str(culprit) in err and expected in err
    assert not (tmp_path / "out").exists()


def test_changed_stimulus_table_refuses_until_overwrite(script, tree, tmp_path, capsys):
    """The CSV decides crops and COCO ids, so a rewritten CSV makes both files stale: exit 2 naming the
    input, nothing rewritten; --overwrite redoes them from the new table."""
    root = DatasetRoot(tmp_path / "out")
    assert _run(script, tree, root.root, "--subject", "2") == 0
    before = read_instances(root.coco_instances)[2][0]["box"]
    tree.stim_info.write_text(tree.stim_info.read_text().replace('"(0, 0, 0, 0)"', '"(0, 0.5, 0, 0.5)"', 1))
    capsys.readouterr()
    assert _run(script, tree, root.root, "--subject", "2") == 2
    line = error_line(capsys)
    assert str(root.coco_captions) in line and "input stim_info changed" in line and "--overwrite" in line
    assert read_instances(root.coco_instances)[2][0]["box"] == before
    assert _run(script, tree, root.root, "--subject", "2", "--overwrite") == 0
    assert read_instances(root.coco_instances)[2][0]["box"] != before


def test_unwritable_dataset_root_exits_2_in_one_line(script, tree, tmp_path, capsys):
    (tmp_path / "file").write_text("")  # a regular file cannot hold a folder, even for root
    assert _run(script, tree, tmp_path / "file" / "root", "--subject", "1") == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {DatasetRoot(tmp_path / 'file' / 'root').coco_captions}: ")


def test_mini_nsd_every_seen_image_has_captions_and_boxes_in_the_image(script, small_tree, tmp_path):
    root = DatasetRoot(tmp_path)
    assert _run(script, small_tree, tmp_path, "--subject", "all") == 0
    info = StimInfo.load(small_tree.stim_info)
    seen = set(np.flatnonzero(info.trials[1][:, 0] >= 0)) | set(np.flatnonzero(info.trials[5][:, 0] >= 0))
    captions, instances = read_captions(root.coco_captions), read_instances(root.coco_instances)
    assert set(captions) == set(instances) == {int(i) for i in seen}
    assert min(len(c) for c in captions.values()) >= 5
    boxes = np.array([obj["box"] for objects in instances.values() for obj in objects])
    assert len(boxes) >= len(seen)
    assert np.all((boxes >= 0) & (boxes <= 425))
    assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
    assert set(load_instances(root.coco_instances).categories.values()) == {
        "circle",
        "square",
        "triangle",
        "cross",
        "ring",
    }


# The format module


def test_round_trip_with_detector_scores_one_line_per_image(tmp_path):
    categories = {1: "person", 18: "dog"}
    instances = {
        10: [{"category_id": 18, "box": [1.234, 2, 300.006, 425], "score": 0.912345}],
        2: [],
        7: [{"category_id": 1, "box": [0, 0, 1, 1], "iscrowd": 1}],
    }
    write_instances(tmp_path / "i.json", instances, categories, {"model": "detr"})
    got = load_instances(tmp_path / "i.json")
    assert list(got.images) == [2, 7, 10] and got.categories == categories and got.info["model"] == "detr"
    assert got.images[10] == [
        {"category_id": 18, "category": "dog", "box": [1.23, 2.0, 300.01, 425.0], "iscrowd": 0, "score": 0.9123}
    ]
    assert "score" not in got.images[7][0]
    text = (tmp_path / "i.json").read_text()
    assert text.count("\n") == 6 + len(instances)  # {, info, categories, "images": {, rows, }, }
    assert text.index('"2":') < text.index('"7":') < text.index('"10":')  # numeric, not string, order

    write_captions(tmp_path / "c.json", {3: [" a cat \n", "a dog"], 1: []}, {"model": "blip2"})
    assert read_captions(tmp_path / "c.json") == {1: [], 3: ["a cat", "a dog"]}
    write_captions(tmp_path / "empty.json", {}, {})
    assert read_captions(tmp_path / "empty.json") == {}


DROP = object()  # marks a key to leave out of an otherwise valid file
GOOD_INSTANCE = {"category_id": 1, "category": "person", "box": [0, 0, 10, 10], "iscrowd": 0}


@pytest.mark.parametrize(
    "kind, data",
    [
        ("captions", ["not", "an", "object"]),
        ("captions", {"info": {}}),
        ("captions", {"info": {}, "images": {"007": ["a"]}}),
        ("captions", {"info": {}, "images": {"-1": ["a"]}}),
        ("captions", {"info": {}, "images": {"1": "a caption, not a list"}}),
        ("captions", {"info": {}, "images": {"1": ["a", 3]}}),
        ("instances", {"categories": DROP}),
        ("instances", {"categories": [{"id": "1", "name": "person"}]}),
        ("instances", {"categories": [{"id": 1, "name": "person"}, {"id": 1, "name": "dog"}]}),
        ("instances", {"images": {"1": [{**GOOD_INSTANCE, "box": [0, 0, 10]}]}}),
        ("instances", {"images": {"1": [{**GOOD_INSTANCE, "box": [10, 0, 5, 10]}]}}),
        ("instances", {"images": {"1": [{**GOOD_INSTANCE, "box": [0, 0, "10", 10]}]}}),
        ("instances", {"images": {"1": [{**GOOD_INSTANCE, "category": "dog"}]}}),
        ("instances", {"images": {"1": [{**GOOD_INSTANCE, "category_id": 2}]}}),
        ("instances", {"images": {"1": [{**GOOD_INSTANCE, "iscrowd": 2}]}}),
        ("instances", {"images": {"1": [{**GOOD_INSTANCE, "score": 1.5}]}}),
        ("instances", {"images": {"1": [{k: v for k, v in GOOD_INSTANCE.items() if k != "iscrowd"}]}}),
        ("instances", {"images": {"1": {"0": GOOD_INSTANCE}}}),
    ],
)
def test_readers_reject_malformed_files(tmp_path, kind, data):
    if kind == "instances" and isinstance(data, dict):
        data = {"info": {}, "categories": [{"id": 1, "name": "person"}], "images": {}, **data}
        data = {k: v for k, v in data.items() if v is not DROP}
    path = tmp_path / f"{kind}.json"
    path.write_text(json.dumps(data))
    reader = read_captions if kind == "captions" else read_instances
    with pytest.raises(BadInputError) as exc:
        reader(path)
    assert str(exc.value).startswith(str(path)) and "\n" not in str(exc.value)


def test_readers_accept_what_the_writers_write_and_nothing_truncated(tmp_path):
    path = write_instances(tmp_path / "i.json", {0: [GOOD_INSTANCE]}, {1: "person"}, {})
    assert read_instances(path)[0][0]["box"] == [0, 0, 10, 10]
    path.write_text(path.read_text()[:-20])
    with pytest.raises(BadInputError, match="not valid JSON"):
        read_instances(path)
    with pytest.raises(ValueError, match="category_id 2"):
        write_instances(tmp_path / "j.json", {0: [{**GOOD_INSTANCE, "category_id": 2}]}, {1: "person"}, {})
    assert not (tmp_path / "j.json").exists()
