"""The shared machinery of the per-image stages: selection, errors, sharding, resumable parts, merge."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from llava_brain.errors import BadInputError
from llava_brain.image_stage import (
    ArrayParts,
    RecordParts,
    batch_seed,
    check_model_folder,
    iterate_batches,
    plan_batches,
    require_images,
    select_images,
)
from llava_brain.io import write_json
from llava_brain.layout import DatasetRoot


def _root_with_images(tmp_path, ids, subjects=None) -> DatasetRoot:
    layout = DatasetRoot(tmp_path / "root")
    layout.images_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in ids:
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(layout.image(i))
    for subject, (train, val) in (subjects or {}).items():
        write_json(layout.fmri2image(subject), {"train": train, "val": val})
    return layout


def test_selection_from_prepared_subjects_or_pngs(tmp_path):
    layout = _root_with_images(tmp_path, [3, 7, 9, 20], {1: ([9, 3, 9], [7]), 5: ([20, 3], [7])})
    assert select_images(layout, ["all"], False) == [3, 7, 9, 20]
    assert select_images(layout, ["1"], False) == [3, 7, 9]  # repeats and both splits, sorted, unique
    assert select_images(layout, None, True) == [3, 7, 9, 20]


def test_missing_png_and_missing_subject_are_one_line_errors(tmp_path):
    layout = _root_with_images(tmp_path, [3], {1: ([3, 4], [])})
    with pytest.raises(BadInputError) as err:
        require_images(layout, select_images(layout, ["1"], False))
    assert str(err.value).startswith(str(layout.image(4))) and "\n" not in str(err.value)
    with pytest.raises(BadInputError, match=r"nsd_fmri2image\.json"):
        select_images(layout, ["2"], False)


def test_unreadable_png_names_the_file(tmp_path):
    layout = _root_with_images(tmp_path, [1, 2])
    layout.image(2).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    batches = [(0, [1, 2], [layout.image(1), layout.image(2)])]
    with pytest.raises(BadInputError) as err:
        list(iterate_batches(batches, num_workers=0))
    assert str(layout.image(2)) in str(err.value) and "unreadable PNG" in str(err.value)


def test_loader_pads_short_batches_and_keeps_order(tmp_path):
    layout = _root_with_images(tmp_path, range(5))
    paths = [layout.image(i) for i in range(5)]
    plan = plan_batches(list(range(5)), paths, 2, set(), 0, 1)
    got = list(iterate_batches(plan.mine, transform=len, num_workers=2, pad_to=2))
    assert [b.nsd_ids for b in got] == [[0, 1], [2, 3], [4]]
    assert [b.inputs for b in got] == [2, 2, 2]  # the last batch is padded to the full size


def test_model_folder_class_is_checked(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "detr"}))
    check_model_folder(str(folder), ("detr",), "a DETR model")
    with pytest.raises(BadInputError) as err:
        check_model_folder(str(folder), ("blip-2",), "a BLIP-2 model")
    assert str(folder / "config.json") in str(err.value) and "'detr'" in str(err.value)
    with pytest.raises(BadInputError, match="missing"):
        check_model_folder(str(tmp_path / "nothing"), ("detr",), "a DETR model")
    check_model_folder("facebook/detr-resnet-101", ("detr",), "a DETR model")  # hub ids are not checked


def test_sharding_is_disjoint_and_complete_and_skips_done_batches():
    ids = list(range(10))
    paths = [None] * 10
    plans = [plan_batches(ids, paths, 3, {0, 1, 2, 4}, rank, 3) for rank in range(3)]
    mine = [b[0] for p in plans for b in p.mine]
    assert sorted(mine) == [1, 2, 3]  # batch 0 done; batch 1 only partly done -> redone whole
    assert len(mine) == len(set(mine))
    assert plans[0].batches[1][1] == [3, 4, 5]  # fixed batches, whatever is done


def test_batch_seed_depends_on_batch_only():
    assert batch_seed(0, 3) == batch_seed(0, 3) != batch_seed(0, 4) != batch_seed(1, 3)


def test_record_parts_resume_and_merge(tmp_path):
    folder = tmp_path / "parts"
    a, b = RecordParts(folder, 0), RecordParts(folder, 1)
    a.add([{"nsd_id": 5, "x": 1}, {"nsd_id": 2, "x": 2}])
    b.add([{"nsd_id": 9, "x": 3}])
    with open(folder / "part-001.jsonl", "a") as f:
        f.write('{"nsd_id": 11, "x"')  # a kill mid-write tears the last line
    again = RecordParts(folder, 0)
    assert again.done() == {2, 5, 9}
    assert list(again.merged()) == [2, 5, 9]


def test_array_parts_truncate_rows_of_an_unfinished_batch(tmp_path):
    folder = tmp_path / "parts"
    kinds = {"emb": ((3,), np.float32)}
    parts = ArrayParts(folder, 0, kinds)
    parts.add([4, 1], {"emb": np.array([[4, 4, 4], [1, 1, 1]], np.float32)})
    with open(folder / "part-000.emb.bin", "ab") as f:
        f.write(np.ones(3, np.float32).tobytes() + b"\x00\x01")  # rows written, ids never recorded
    other = ArrayParts(folder, 1, kinds)
    other.add([2], {"emb": np.array([[2, 2, 2]], np.float32)})
    reopened = ArrayParts(folder, 0, kinds)
    assert (folder / "part-000.emb.bin").stat().st_size == 2 * 3 * 4
    assert reopened.done() == {1, 2, 4}
    order = reopened.write_merged("emb", tmp_path / "emb.npy", block_rows=2)
    assert order == [1, 2, 4]
    np.testing.assert_array_equal(np.load(tmp_path / "emb.npy"), [[1, 1, 1], [2, 2, 2], [4, 4, 4]])
    with pytest.raises(ValueError, match="rows of shape"):
        reopened.add([7], {"emb": np.zeros((1, 4), np.float32)})
