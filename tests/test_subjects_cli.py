"""Subjects, splits and the shared flags: llava_brain.subjects, llava_brain.cli, llava_brain.runtime."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from llava_brain import cli, runtime
from llava_brain.errors import BadInputError
from llava_brain.layout import DatasetRoot
from llava_brain.subjects import (
    images_of,
    prepared_subjects,
    resolve_subjects,
    sample_index,
    split_key,
    subject_arg,
)


def _root(tmp_path: Path, subjects=(1, 5)) -> DatasetRoot:
    layout = DatasetRoot(tmp_path / "root")
    for s in subjects:
        path = layout.fmri2image(s)
        path.parent.mkdir(parents=True)
        mapping = {"train": [s, 10, 11], "train_repeat": [0, 0, 1], "val": [3, 3], "val_repeat": [0, 1]}
        path.write_text(json.dumps(mapping))
    (layout.fmris_dir / "subj07").mkdir()  # a folder without nsd_fmri2image.json is not prepared
    return layout


def test_split_keys():
    assert split_key("tr") == "train" and split_key("te") == "val"
    assert split_key("te", "repeat") == "val_repeat"
    with pytest.raises(ValueError, match="shared-1000"):
        split_key("val")


def test_subject_arg():
    assert subject_arg("3") == 3 and subject_arg("ALL") == "all"
    assert subject_arg("9") == 9  # syntax only: whether the data hold subj09 is resolve_subjects' call
    for bad in ("0", "100", "one"):
        with pytest.raises(argparse.ArgumentTypeError):
            subject_arg(bad)


def test_resolve_subjects(tmp_path):
    where = tmp_path
    assert resolve_subjects(["all"], [5, 1], where, "subjects") == [1, 5]
    assert resolve_subjects([5, 1, 5], [1, 5], where, "subjects") == [1, 5]
    with pytest.raises(BadInputError, match=r"has no subj02 .*found: subj01, subj05"):
        resolve_subjects([2], [1, 5], where, "subjects")
    with pytest.raises(BadInputError, match="holds no"):
        resolve_subjects(["all"], [], where, "subjects")
    with pytest.raises(BadInputError, match="cannot be combined"):
        resolve_subjects(["all", 1], [1], where, "subjects")


def test_prepared_subjects_and_sample_index(tmp_path):
    layout = _root(tmp_path)
    assert prepared_subjects(layout) == [1, 5]
    index = sample_index(layout, 5, "te")
    assert index.nsd_ids.tolist() == [3, 3] and index.repeats.tolist() == [0, 1] and len(index) == 2
    assert images_of(layout, [1, 5]) == [1, 3, 5, 10, 11]


def test_sample_index_rejects_mismatched_lists(tmp_path):
    layout = _root(tmp_path, subjects=(1,))
    layout.fmri2image(1).write_text(json.dumps({"train": [1, 2], "train_repeat": [0], "val": [], "val_repeat": []}))
    with pytest.raises(BadInputError, match="train_repeat"):
        sample_index(layout, 1, "tr")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    cli.add_dataset_root(p)
    cli.add_subject(p)
    cli.add_num_workers(p, default=2)
    cli.add_device(p)
    cli.add_precision(p)
    cli.add_overwrite(p)
    cli.add_quiet(p)
    return p


def test_parse_args_resolves_subjects_against_the_root(tmp_path):
    layout = _root(tmp_path)
    args = cli.parse_args(_parser(), ["--dataset-root", str(layout.root)])
    assert args.subject == [1, 5] and not hasattr(args, "_subject_source")
    assert args.device == "auto" and args.precision == "fp32" and args.num_workers == 2
    with pytest.raises(BadInputError) as err:
        cli.parse_args(_parser(), ["--dataset-root", str(layout.root), "--subject", "7"])
    assert str(layout.fmris_dir) in str(err.value) and "subj07" in str(err.value)


def test_dataset_root_defaults_to_environment(tmp_path, monkeypatch):
    layout = _root(tmp_path)
    monkeypatch.setenv("BRAIN_DATA_ROOT", str(layout.root))
    args = cli.parse_args(_parser(), ["--subject", "5"])
    assert args.dataset_root == layout.root and args.subject == [5]
    monkeypatch.delenv("BRAIN_DATA_ROOT")
    with pytest.raises(SystemExit):
        _parser().parse_args([])  # required without the variable


def test_bad_subject_exits_2_with_one_line(tmp_path, capsys):
    from llava_brain.errors import exits_on_bad_input

    layout = _root(tmp_path)

    @exits_on_bad_input
    def main(argv):
        cli.parse_args(_parser(), argv)
        raise AssertionError("work started")

    for subject in ("2", "9"):
        assert main(["--dataset-root", str(layout.root), "--subject", subject]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"subj0{subject}" in err and str(layout.fmris_dir) in err


def test_cuda_without_gpu_is_refused():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert cli.resolve_device("auto") == "cpu"
    with pytest.raises(SystemExit, match="--device cuda"):
        cli.resolve_device("cuda")


def test_cgroup_cpu_limit(tmp_path):
    path = tmp_path / "cpu.max"
    path.write_text("150000 100000\n")
    assert runtime.cgroup_cpu_limit(path) == 2  # 1.5 CPUs of quota round up
    path.write_text("max 100000\n")
    assert runtime.cgroup_cpu_limit(path) is None
    assert runtime.cgroup_cpu_limit(tmp_path / "absent") is None


def test_limit_threads_prefers_omp_num_threads(monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert runtime.limit_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(runtime, "available_cpus", lambda: 2)
        assert runtime.limit_threads() == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
