"""make_images: lossless PNGs of exactly the images the selected subjects saw; resumable; reruns; bad input exits 2."""

from __future__ import annotations

import csv
import json
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from llava_brain.layout import DatasetRoot, NsdTree
from llava_brain.nsd import NsdStimuli, StimInfo

from conftest import load_script
from stage_checks import error_line


@pytest.fixture(scope="module")
def script():
    return load_script("prepare_datasets/make_images.py")


def _run(script, tree: NsdTree, root: Path, *flags: str) -> int:
    return script.main(["--nsd-root", str(tree.root), "--dataset-root", str(root), "--quiet", *flags])


def _pngs(root: Path) -> dict[int, Path]:
    paths = sorted(DatasetRoot(root).images_dir.glob("nsd_image_*.png"))
    return {int(p.stem.rsplit("_", 1)[1]): p for p in paths}


def _seen(tree: NsdTree, *subjects: int) -> list[int]:
    info = StimInfo.load(tree.stim_info)
    return sorted(set().union(*(np.flatnonzero(info.trials[s][:, 0] >= 0).tolist() for s in subjects)))


def _tiny_tree(tmp_path: Path, num_images: int = 6, seen: dict | None = None) -> NsdTree:
    """A raw tree of random-noise stimuli (the hardest case for a lossy codec) and a CSV in NSD's columns.

    seen: subject -> nsdIds shown to it; subject 1's columns exist but it saw nothing.
    """
    seen = {1: [], 2: [1, 3], 4: [3, 4]} if seen is None else seen
    tree = NsdTree(tmp_path / "raw")
    tree.stimuli.parent.mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 256, (num_images, 425, 425, 3), dtype=np.uint8)
    with h5py.File(tree.stimuli, "w") as f:
        f.create_dataset("imgBrick", data=pixels, chunks=(1, 425, 425, 3))
    tree.stim_info.parent.mkdir(parents=True)
    reps = [f"subject{s}_rep{r}" for s in sorted(seen) for r in range(3)]
    with open(tree.stim_info, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["", "cocoId", "cocoSplit", "cropBox", "nsdId", "shared1000", *reps])
        for i in range(num_images):
            trials = [[10 + i, 0, 0] if i in seen[s] else [0, 0, 0] for s in sorted(seen)]  # 1-based; 0 = not shown
            writer.writerow([i, 1000 + i, "train2017", "(0, 0, 0, 0)", i, False, *np.ravel(trials).tolist()])
    return tree


def _assert_lossless(tree: NsdTree, pngs: dict[int, Path]) -> None:
    with NsdStimuli(tree.stimuli) as stimuli:
        for nsd_id, path in pngs.items():
            with Image.open(path) as image:
                assert image.format == "PNG" and image.mode == "RGB" and image.size == (425, 425)
                np.testing.assert_array_equal(np.asarray(image), stimuli[nsd_id], err_msg=str(path))


def test_selected_subject_images_are_written_losslessly(script, small_tree, tmp_path):
    assert _run(script, small_tree, tmp_path, "--subject", "5", "--num-workers", "2") == 0
    pngs = _pngs(tmp_path)
    assert sorted(pngs) == _seen(small_tree, 5)
    _assert_lossless(small_tree, pngs)
    images_dir = DatasetRoot(tmp_path).images_dir
    assert {p.name for p in images_dir.iterdir()} == {p.name for p in pngs.values()} | {"run.json"}
    run = json.loads((images_dir / "run.json").read_text())
    assert run["settings"] == {"compress_level": 6} and run["selection"] == {"subjects": [5]}
    assert run["num_written"] == run["num_selected"] == len(pngs)


def test_subject_all_means_subjects_who_saw_something_and_all_images_means_the_brick(script, tmp_path):
    tree = _tiny_tree(tmp_path)
    assert _run(script, tree, tmp_path / "a", "--subject", "all", "--compress-level", "0") == 0
    assert sorted(_pngs(tmp_path / "a")) == [1, 3, 4]  # union of subjects 2 and 4; nobody saw 0, 2, 5
    assert _run(script, tree, tmp_path / "b", "--subject", "2", "--num-workers", "0") == 0  # main thread
    assert sorted(_pngs(tmp_path / "b")) == [1, 3]
    assert _run(script, tree, tmp_path / "c", "--all-images", "--compress-level", "9") == 0
    pngs = _pngs(tmp_path / "c")
    assert sorted(pngs) == list(range(6))
    _assert_lossless(tree, pngs)  # noise survives at every compression level


def test_rerun_skips_done_images_and_redoes_partial_ones(script, small_tree, tmp_path):
    assert _run(script, small_tree, tmp_path, "--subject", "1") == 0
    pngs = _pngs(tmp_path)
    stamps = {i: p.stat().st_mtime_ns for i, p in pngs.items()}
    manifest = DatasetRoot(tmp_path).images_dir / "run.json"
    manifest_stamp = manifest.stat().st_mtime_ns
    assert _run(script, small_tree, tmp_path, "--subject", "1") == 0  # every PNG there and current: skipped
    assert manifest.stat().st_mtime_ns == manifest_stamp
    truncated, deleted = sorted(pngs)[3], sorted(pngs)[7]
    pngs[truncated].write_bytes(pngs[truncated].read_bytes()[:1000])  # e.g. copied from a full disk
    pngs[deleted].unlink()
    # What a kill during encoding leaves: a temporary file beside the final name, never the final name.
    stale = pngs[deleted].parent / f".{pngs[deleted].name}.k1ll3d.tmp.png"
    stale.write_bytes(b"\x89PNG\r\n\x1a\n half")

    assert _run(script, small_tree, tmp_path, "--subject", "1") == 0
    after = _pngs(tmp_path)
    assert sorted(after) == sorted(pngs) and not stale.exists()
    _assert_lossless(small_tree, {i: after[i] for i in (truncated, deleted)})
    unchanged = {i for i in after if after[i].stat().st_mtime_ns == stamps[i]}
    assert unchanged == set(after) - {truncated, deleted}
    run = json.loads((DatasetRoot(tmp_path).images_dir / "run.json").read_text())
    assert (run["num_written"], run["num_skipped"], run["num_truncated_rewritten"]) == (2, len(pngs) - 2, 1)

    assert _run(script, small_tree, tmp_path, "--subject", "1", "--overwrite") == 0
    assert all(after[i].stat().st_mtime_ns != stamps[i] for i in unchanged)


def test_interrupted_run_resumes_to_the_identical_set(script, small_tree, tmp_path, monkeypatch):
    assert _run(script, small_tree, tmp_path / "reference", "--subject", "all", "--num-workers", "2") == 0
    reference = {i: p.read_bytes() for i, p in _pngs(tmp_path / "reference").items()}

    encode, lock, calls = script.write_png, threading.Lock(), [0]

    def dies_after_ten(path, pixels, compress_level):
        with lock:
            calls[0] += 1
            if calls[0] > 10:
                raise RuntimeError("simulated kill")
        encode(path, pixels, compress_level)

    monkeypatch.setattr(script, "write_png", dies_after_ten)
    with pytest.raises(RuntimeError, match="simulated kill"):
        _run(script, small_tree, tmp_path / "resumed", "--subject", "all", "--num-workers", "2")
    images_dir = DatasetRoot(tmp_path / "resumed").images_dir
    assert [p.name for p in images_dir.iterdir() if not p.name.startswith("nsd_image_")] == []  # no temporaries
    assert len(_pngs(tmp_path / "resumed")) == 10
    monkeypatch.undo()

    assert _run(script, small_tree, tmp_path / "resumed", "--subject", "all", "--num-workers", "2") == 0
    resumed = {i: p.read_bytes() for i, p in _pngs(tmp_path / "resumed").items()}
    assert resumed == reference


@pytest.mark.parametrize(
    "breakage", ["missing_stimuli", "missing_csv", "subject_without_trials", "subject_not_in_csv", "csv_longer"]
)
def test_bad_input_exits_2_naming_the_file(script, tmp_path, capsys, breakage):
    tree = _tiny_tree(tmp_path)
    flags = ["--subject", "2"]
    if breakage == "missing_stimuli":
        tree.stimuli.unlink()
        culprit = tree.stimuli
    elif breakage == "missing_csv":
        tree.stim_info.unlink()
        culprit = tree.stim_info
    elif breakage == "subject_without_trials":
        flags, culprit = ["--subject", "1"], tree.stim_info
    elif breakage == "subject_not_in_csv":
        flags, culprit = ["--subject", "3"], tree.stim_info
    else:
        _tiny_tree(tmp_path / "longer", num_images=6, seen={2: [5]}).stim_info.replace(tree.stim_info)
        with h5py.File(tree.stimuli, "w") as f:
            f.create_dataset("imgBrick", data=np.zeros((4, 425, 425, 3), np.uint8))
        culprit = tree.stimuli
    assert _run(script, tree, tmp_path / "out", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and str(culprit) in err
    assert not DatasetRoot(tmp_path / "out").images_dir.exists()


def test_more_subjects_add_pngs_and_changed_brick_or_level_refuse(script, tmp_path, capsys):
    """The folder is a per-image cache: a second subject adds its PNGs without --overwrite; a rewritten
    stimulus brick or another --compress-level refuses (exit 2 naming run.json and what changed) until
    --overwrite re-encodes."""
    tree = _tiny_tree(tmp_path)
    out = tmp_path / "out"
    assert _run(script, tree, out, "--subject", "2") == 0
    assert _run(script, tree, out, "--subject", "4") == 0
    assert sorted(_pngs(out)) == [1, 3, 4]
    manifest = DatasetRoot(out).images_dir / "run.json"
    assert json.loads(manifest.read_text())["selection"] == {"subjects": [4]}
    capsys.readouterr()

    assert _run(script, tree, out, "--subject", "4", "--compress-level", "1") == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {manifest}: ") and "compress_level" in line and "--overwrite" in line

    with h5py.File(tree.stimuli, "r+") as f:
        f["imgBrick"][3] = 255 - f["imgBrick"][3]
    assert _run(script, tree, out, "--subject", "4") == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {manifest}: ") and "input stimuli changed" in line
    assert _run(script, tree, out, "--subject", "4", "--overwrite") == 0
    _assert_lossless(tree, {i: p for i, p in _pngs(out).items() if i in (3, 4)})


def test_unwritable_dataset_root_exits_2_in_one_line(script, tmp_path, capsys):
    tree = _tiny_tree(tmp_path)
    (tmp_path / "file").write_text("")  # a regular file cannot hold a folder, even for root
    assert _run(script, tree, tmp_path / "file" / "root", "--subject", "2") == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {DatasetRoot(tmp_path / 'file' / 'root').images_dir}: ")
    assert "--dataset-root" in line


def test_flags(script):
    parser = script.build_parser()
    args = parser.parse_args(["--nsd-root", "/data/nsd", "--dataset-root", "/data/brain", "--subject", "1", "2", "5"])
    assert args.subject == [1, 2, 5] and args.compress_level == 6 and not args.all_images
    assert parser.parse_args(["--nsd-root", "n", "--dataset-root", "r", "--subject", "all"]).subject == ["all"]
    for bad in (["--subject", "one"], ["--subject", "100"], ["--subject", "1", "--all-images"], [], ["--all"]):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(["--nsd-root", "n", "--dataset-root", "r", *bad])
        assert exc.value.code == 2
    for bad in (["--all-images", "--compress-level", "10"], ["--all-images", "--num-workers", "-1"]):
        with pytest.raises(SystemExit) as exc:
            script.main(["--nsd-root", "n", "--dataset-root", "r", *bad])
        assert exc.value.code == 2


def test_subject_all_with_numbers_exits_2(script, tmp_path, capsys):
    tree = _tiny_tree(tmp_path)
    assert _run(script, tree, tmp_path / "out", "--subject", "all", "2") == 2
    assert "cannot be combined" in error_line(capsys)
