"""The shared machinery of the per-image stages: selection, errors, sharding, resumable parts, merge, and the
driver itself (run_image_stage) on a stage with a trivial model (no network, no weights: fast)."""

from __future__ import annotations

import argparse
import json
import logging

import numpy as np
import pytest
from PIL import Image

from llava_brain import cli
from llava_brain.errors import BadInputError
from llava_brain.image_stage import (
    ArrayParts,
    ImageStage,
    Model,
    RecordParts,
    add_run_arguments,
    add_selection_arguments,
    batch_seed,
    check_model_folder,
    is_hub_id,
    iterate_batches,
    parts_folder,
    plan_batches,
    require_images,
    run_image_stage,
    select_images,
)
from llava_brain.io import manifest_of, write_json
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


# A stage with a trivial "model": the mean pixel value of each image times --scale ------------------


class MeanStage:
    """An ImageStage whose outputs and hooks the tests can watch (loads, batches stored, a crash)."""

    def __init__(self, layout: DatasetRoot, output=None):
        self.layout = layout
        self.output = output or layout.nsd / "means.json"
        self.model_file = layout.root.parent / "model.json"  # the "model": an input that is fingerprinted
        self.model_file.write_text('{"kind": "mean"}')
        self.loads = 0
        self.steps: list[int] = []  # indices of the batches computed
        self.crash_after: int | None = None

    def parser(self) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser()
        add_selection_arguments(p, "average")
        p.add_argument("--scale", type=float, default=1.0)
        add_run_arguments(p, batch_size=2, output="means.json")
        return p

    def run(self, *flags: str) -> int:
        argv = ["--dataset-root", str(self.layout.root), "--num-workers", "0", "--device", "cpu", "--quiet", *flags]
        args = cli.parse_args(self.parser(), argv)
        self.args = args
        return run_image_stage(self.stage(), args)

    def stage(self) -> ImageStage:
        return ImageStage(
            what="means",
            description="means",
            outputs=lambda layout, args: {self.output: self.output},
            settings=lambda args: {"scale": args.scale},
            inputs=lambda args: {"model": [self.model_file]},
            load=self.load,
        )

    def load(self, ctx) -> Model:
        self.loads += 1

        def step(batch):
            if self.crash_after is not None and len(self.steps) >= self.crash_after:
                raise KeyboardInterrupt("killed")
            self.steps.append(batch.index)
            means = [float(np.asarray(im).mean()) * ctx.args.scale for im in batch.inputs]
            return [{"nsd_id": i, "mean": m} for i, m in zip(batch.nsd_ids, means, strict=False)]

        def write(parts, nsd_ids):
            merged = parts.merged()
            write_json(self.output, {"settings": ctx.settings, "means": {i: merged[i]["mean"] for i in nsd_ids}})
            return f"wrote {len(nsd_ids)} means"

        return Model(step=step, write=write)

    def means(self) -> dict:
        return json.loads(self.output.read_text())["means"]


@pytest.fixture
def mean_stage(tmp_path) -> MeanStage:
    # Subject 1 saw 0-4, subject 2 saw 3-6; image 9 is a PNG nobody saw (only --all-images takes it).
    layout = _root_with_images(tmp_path, [0, 1, 2, 3, 4, 5, 6, 9], {1: ([0, 1, 2, 4], [3]), 2: ([5, 6, 3], [3])})
    return MeanStage(layout)


def test_driver_runs_then_skips_refuses_with_the_reason_and_overwrites(mean_stage, caplog):
    caplog.set_level(logging.INFO)
    assert mean_stage.run() == 0
    assert list(mean_stage.means()) == [str(i) for i in range(7)] and mean_stage.args.subject == [1, 2]
    manifest = json.loads(manifest_of(mean_stage.output).read_text())
    assert manifest["settings"]["subject"] == [1, 2] and manifest["settings"]["num_images"] == 7
    assert manifest["settings"]["scale"] == 1.0 and manifest["settings"]["batch_size"] == 2
    assert set(manifest["inputs"]) == {"model"} and "argv" in manifest
    assert not parts_folder(mean_stage.output).exists()

    assert mean_stage.run() == 0 and mean_stage.loads == 1 and "nothing to do" in caplog.text
    with pytest.raises(BadInputError, match=r"setting scale 1\.0 -> 2\.0.*--overwrite"):
        mean_stage.run("--scale", "2")
    with pytest.raises(BadInputError, match=r"setting subject \[1, 2\] -> \[1\]"):
        mean_stage.run("--subject", "1")
    mean_stage.model_file.write_text('{"kind": "mean", "version": 2}')
    with pytest.raises(BadInputError, match="input model changed"):
        mean_stage.run()
    before = mean_stage.means()
    assert mean_stage.run("--scale", "2", "--overwrite") == 0 and mean_stage.loads == 2
    assert mean_stage.means() == {k: 2 * v for k, v in before.items()}
    assert mean_stage.run("--scale", "2") == 0 and mean_stage.loads == 2  # current again


def test_driver_resumes_a_killed_run_and_cleans_up(mean_stage, tmp_path):
    mean_stage.crash_after = 2
    stale_temp = mean_stage.output.parent / f".{mean_stage.output.name}.x1y2.tmp.json"  # a kill mid-write left it
    stale_temp.write_text("{")
    with pytest.raises(KeyboardInterrupt):
        mean_stage.run()
    assert not mean_stage.output.exists() and mean_stage.steps == [0, 1]
    mean_stage.crash_after = None
    assert mean_stage.run() == 0
    assert mean_stage.steps == [0, 1, 2, 3]  # 7 images = 4 batches; the 2 stored ones are not recomputed
    assert not stale_temp.exists() and not parts_folder(mean_stage.output).exists()
    clean = MeanStage(mean_stage.layout, output=tmp_path / "root" / "nsd" / "clean.json")
    assert clean.run() == 0 and clean.means() == mean_stage.means()


def test_a_killed_overwrite_run_resumes_without_overwrite(mean_stage):
    assert mean_stage.run() == 0
    mean_stage.crash_after, mean_stage.steps = 1, []
    with pytest.raises(KeyboardInterrupt):
        mean_stage.run("--scale", "2", "--overwrite")
    mean_stage.crash_after = None
    assert mean_stage.run("--scale", "2") == 0  # the old provenance is gone: no refusal, the stored batch is kept
    assert mean_stage.steps == [0, 1, 2, 3]
    assert json.loads(manifest_of(mean_stage.output).read_text())["settings"]["scale"] == 2.0


def test_driver_all_images_has_no_subject(mean_stage):
    assert mean_stage.run("--all-images") == 0
    assert mean_stage.args.subject is None and list(mean_stage.means()) == [str(i) for i in (0, 1, 2, 3, 4, 5, 6, 9)]
    assert json.loads(manifest_of(mean_stage.output).read_text())["settings"]["subject"] is None
    with pytest.raises(SystemExit):  # argparse: not both
        mean_stage.run("--all-images", "--subject", "1")


@pytest.mark.parametrize("subject", ["3", "9"])  # an NSD subject not prepared here; one NSD does not have
def test_unknown_subject_fails_while_parsing(mean_stage, subject):
    with pytest.raises(BadInputError, match=f"has no subj0{subject}") as err:
        mean_stage.run("--subject", subject)
    assert str(err.value).startswith(str(mean_stage.layout.fmris_dir)) and "\n" not in str(err.value)
    assert mean_stage.loads == 0


def test_output_that_cannot_be_written_fails_before_the_model_loads(mean_stage):
    blocker = mean_stage.layout.nsd / "blocked"
    blocker.write_text("a regular file where the output's folder should be")
    stage = MeanStage(mean_stage.layout, output=blocker / "means.json")
    with pytest.raises(BadInputError, match="is a file, not a folder") as err:
        stage.run()
    assert str(err.value).startswith(str(blocker / "means.json")) and stage.loads == 0


# The parts ------------------------------------------------------------------------------------------


def test_selection_from_prepared_subjects_or_pngs(tmp_path):
    layout = _root_with_images(tmp_path, [3, 7, 9, 20], {1: ([9, 3, 9], [7]), 5: ([20, 3], [7])})
    assert select_images(layout, argparse.Namespace(subject=None, all_images=False)) == [3, 7, 9, 20]
    assert select_images(layout, argparse.Namespace(subject=[1], all_images=False)) == [3, 7, 9]  # sorted, unique
    assert select_images(layout, argparse.Namespace(subject=None, all_images=True)) == [3, 7, 9, 20]


def test_missing_png_and_no_prepared_subject_are_one_line_errors(tmp_path):
    layout = _root_with_images(tmp_path, [3], {1: ([3, 4], [])})
    with pytest.raises(BadInputError) as err:
        require_images(layout, select_images(layout, argparse.Namespace(subject=[1], all_images=False)))
    assert str(err.value).startswith(str(layout.image(4))) and "\n" not in str(err.value)
    empty = _root_with_images(tmp_path / "empty", [3])
    with pytest.raises(BadInputError, match="holds no prepared subjects"):
        select_images(empty, argparse.Namespace(subject=None, all_images=False))


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
    # A missing local path is refused, not taken for a hub id: "~" is not expanded by from_pretrained.
    with pytest.raises(BadInputError, match="missing"):
        check_model_folder("~/detr", ("detr",), "a DETR model")


@pytest.mark.parametrize("name", ["facebook/detr-resnet-101", "openai/clip-vit-large-patch14"])
def test_owner_slash_name_is_a_hub_id(name):
    assert is_hub_id(name)


@pytest.mark.parametrize("name", ["~/detr", "./models/detr", "/models/detr", "models/a/detr", "detr"])
def test_paths_are_not_hub_ids(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not is_hub_id(name)
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name").mkdir()
    assert not is_hub_id("owner/name")  # an existing local folder wins over the hub


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
