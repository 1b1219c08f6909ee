"""generate_captions_from_llava.py on a tiny Brain-LLaVA and a hand-made root: batched greedy = one at a time,
the shuffled control's pairing, resume after a kill, provenance, one-line errors, eval_captions.py reads it.

The root holds subj01's test split only: six samples showing nsdIds 10, 11, 12, 10, 11, 12 (so avg gives three
samples of two rows each, single three of one), random betas, COCO captions for eval_captions.py. The model is a
tiny ViT3D (5 tokens) + the tiny Llama, with an untrained projector: its answers differ per volume, which is all
these checks need. Independent references: the processor + `model.generate` called one sample at a time, the
sample index written here by hand, `controls.derangement`.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from transformers.utils import logging as hf_logging

import llava_brain.model  # noqa: F401  (registers vit3d and BrainLlavaProcessor)
from llava_brain.evaluation import generation as gen
from llava_brain.evaluation.controls import derangement
from llava_brain.model.brain_llava import load_brain_llava

from conftest import load_script
from generation_fixtures import AVG, make_setup
from stage_checks import error_line, hidden_leftovers, run_killed_at

hf_logging.disable_progress_bar()
SCRIPT = "tools/evaluate/generate_captions_from_llava.py"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    return make_setup(tmp_path_factory.mktemp("llava_generation"))


@pytest.fixture(scope="module")
def script():
    return load_script(SCRIPT)


def argv(setup, out: Path, *extra: str) -> list[str]:
    return ["--model", str(setup["model"]), "--dataset-root", str(setup["root"]), "--out", str(out),
            "--max-new-tokens", "6", "--device", "cpu", "--quiet", *extra]  # fmt: skip


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def alone(setup, question: str, fmri: str) -> str:
    """The greedy answer of one question about one sample, with the processor and generate() called directly."""
    model, processor = load_brain_llava(setup["model"])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt], samples=[fmri], dataset_root=setup["root"], return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    return processor.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_batched_greedy_equals_one_at_a_time(script, setup, tmp_path):
    out = tmp_path / "avg.jsonl"
    tasks = ["brief_description", "instruction_reconstruction"]
    assert script.main(argv(setup, out, "--batch-size", "4", "--tasks", *tasks)) == 0
    got = lines(out)
    first = "Describe the image concisely."
    sd = "Provide the corresponding Stable Diffusion prompts for the image."
    assert [(r["task"], r["sample"], r["fmri_sample"], r["prompt"]) for r in got] == [
        *(("brief_description", s, s, first) for s in AVG),
        *(("instruction_reconstruction", s, s, sd) for s in AVG),
    ]
    for record in got:
        assert record["text"] == alone(setup, record["prompt"], record["fmri_sample"])
    _, processor = load_brain_llava(setup["model"])
    lengths = {len(processor.tokenizer(gen.chat_prompt(processor, q))["input_ids"]) for q in (first, sd)}
    assert len(lengths) == 2  # the batches mix prompt lengths: left padding was needed
    assert len({r["text"] for r in got[:3]}) > 1  # the answers depend on the fMRI: a mix-up would show
    assert Path(f"{out}.run.json").is_file() and not Path(f"{out}.partial").exists()
    assert not hidden_leftovers(tmp_path)


def test_single_trials_and_prompt_index(script, setup, tmp_path):
    out = tmp_path / "single.jsonl"
    assert script.main(argv(setup, out, "--kind", "single", "--prompt-index", "2", "--batch-size", "2")) == 0
    got = lines(out)
    assert [r["sample"] for r in got] == ["subj01/te/0", "subj01/te/1", "subj01/te/2"]
    assert {r["prompt"] for r in got} == {"Offer a succinct explanation of the picture presented."}


def test_shuffled_fmri_is_a_derangement_and_changes_the_fmri(script, setup, tmp_path):
    real, shuffled = tmp_path / "real.jsonl", tmp_path / "shuffled.jsonl"
    assert script.main(argv(setup, real, "--batch-size", "3")) == 0
    read = []
    original = gen.generate_texts
    with pytest.MonkeyPatch.context() as mp:  # what the model is given to read
        mp.setattr(gen, "generate_texts", lambda m, p, prompts, fmri, *a, **k: read.extend(fmri) or
                   original(m, p, prompts, fmri, *a, **k))  # fmt: skip
        assert script.main(argv(setup, shuffled, "--batch-size", "3", "--shuffle-fmri", "--seed", "4")) == 0
    control = lines(shuffled)
    perm = derangement(3, gen.SHUFFLE_FMRI_SEED_OFFSET + 4)
    assert [r["sample"] for r in control] == AVG  # the question's sample id stays
    assert [r["fmri_sample"] for r in control] == [AVG[j] for j in perm]
    assert all(r["fmri_sample"] != r["sample"] for r in control)
    assert read == [AVG[j] for j in perm]  # the model read the other image's fMRI
    by_fmri = {r["fmri_sample"]: r["text"] for r in lines(real)}
    assert [r["text"] for r in control] == [by_fmri[r["fmri_sample"]] for r in control]
    assert len(set(by_fmri.values())) == 3  # three distinct answers, so every shuffled answer changed:
    assert all(c["text"] != r["text"] for c, r in zip(control, lines(real), strict=True))


def test_shuffled_fmri_is_not_undone_by_the_shuffled_references_of_eval_captions():
    # eval_captions.py scores text i against image shuffled_images(...)[i]; were that the image whose fMRI the
    # shuffled answer i read, the control's own shuffled row would score like real fMRI.
    from llava_brain.evaluation.captions import shuffled_images

    images = list(range(100, 200))
    read = gen.shuffled_pairing(images, seed=0)
    scored_against = shuffled_images(images, seed=0)
    assert all(r != i for r, i in zip(read, images, strict=True))
    assert sum(r == s for r, s in zip(read, scored_against, strict=True)) <= 5


def test_resume_after_kill_gives_the_uninterrupted_file(script, setup, tmp_path):
    whole, resumed = tmp_path / "whole.jsonl", tmp_path / "resumed.jsonl"
    extra = ["--batch-size", "1", "--tasks", "brief_description", "detail_description"]
    assert script.main(argv(setup, whole, *extra)) == 0
    killed = run_killed_at(SCRIPT, argv(setup, resumed, *extra), "llava_brain.evaluation.generation",
                           "append_batch", call=2, after=True)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not resumed.exists()
    partial = [json.loads(line) for line in Path(f"{resumed}.partial").read_text().splitlines()]
    assert [r.get("batch") for r in partial] == [None, 0, 1]  # the settings header, then two finished batches
    calls = []
    original = gen.generate_texts
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gen, "generate_texts", lambda *a, **k: calls.append(1) or original(*a, **k))
        assert script.main(argv(setup, resumed, *extra)) == 0
    assert len(calls) == 4  # 6 batches, 2 were done
    assert resumed.read_bytes() == whole.read_bytes()
    assert not Path(f"{resumed}.partial").exists()


def test_sampling_is_seeded(script, setup, tmp_path):
    a, b, c = (tmp_path / f"{n}.jsonl" for n in "abc")
    sample = ["--do-sample", "--temperature", "1.5", "--batch-size", "2"]
    assert script.main(argv(setup, a, *sample, "--seed", "3")) == 0
    assert script.main(argv(setup, b, *sample, "--seed", "3")) == 0
    assert script.main(argv(setup, c, *sample, "--seed", "5", "--max-new-tokens", "12")) == 0
    assert a.read_bytes() == b.read_bytes()
    assert [r["text"] for r in lines(a)] != [r["text"] for r in lines(c)]


def test_rerun_is_current_other_settings_need_overwrite(script, setup, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert script.main(argv(setup, out)) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert script.main(argv(setup, out)) == 0
    assert "is current" in capsys.readouterr().out
    assert script.main(argv(setup, out, "--prompt-index", "1")) == 2
    assert "--overwrite" in error_line(capsys)
    assert out.read_bytes() == before
    assert script.main(argv(setup, out, "--prompt-index", "1", "--overwrite")) == 0
    assert {r["prompt"] for r in lines(out)} == {"Provide a brief description of the given image."}


def test_partial_run_with_other_settings_is_refused(script, setup, tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    partial = Path(f"{out}.partial")
    partial.write_text(json.dumps({"settings": {"model": "another"}}) + "\n")
    assert script.main(argv(setup, out)) == 2
    assert str(partial) in error_line(capsys)
    assert script.main(argv(setup, out, "--overwrite")) == 0 and len(lines(out)) == 3


def test_bad_input_is_one_line(script, setup, tmp_path, capsys):
    out = tmp_path / "x.jsonl"
    bad = ["--model", str(setup["base"] / "llm"), "--dataset-root", str(setup["root"]), "--out", str(out)]
    assert script.main(bad) == 2
    assert "processor_config.json" in error_line(capsys)
    for extra, what in ((["--tasks", "poetry"], "unknown task 'poetry'"),
                        (["--tasks", "concept_localization"], "needs --concept"),
                        (["--prompt-index", "99"], "prompt index 99")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            script.main(argv(setup, out, *extra))
        assert exit_.value.code == 2 and what in error_line(capsys)
    assert not out.exists()


def test_concept_question_and_task_prompts():
    assert gen.task_question("concept_localization", concept="dog") == 'Locating the concept of "dog"'
    assert len(gen.task_prompts("brief_description")) == 14
    assert gen.task_question("detail_description") == "Describe the following image in detail."


def test_output_is_scored_by_eval_captions(script, setup, tmp_path):
    out, scores = tmp_path / "gen.jsonl", tmp_path / "scores.json"
    assert script.main(argv(setup, out)) == 0
    evaluate = load_script("tools/evaluate/eval_captions.py")
    code = evaluate.main(["--captions", str(out), "--dataset-root", str(setup["root"]), "--metrics", "bleu1",
                          "cider", "--json", str(scores), "--quiet"])  # fmt: skip
    assert code == 0
    result = json.loads(scores.read_text())
    assert result["evaluation"] == "captions" and result["n"] == 3


def test_killed_overwrite_resumes_without_overwrite(script, setup, tmp_path):
    out, reference = tmp_path / "o.jsonl", tmp_path / "reference.jsonl"
    assert script.main(argv(setup, out, "--batch-size", "1")) == 0
    other = ["--batch-size", "1", "--prompt-index", "1"]
    assert script.main(argv(setup, reference, *other)) == 0
    killed = run_killed_at(SCRIPT, argv(setup, out, *other, "--overwrite"), "llava_brain.evaluation.generation",
                           "append_batch", call=1, after=True)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not Path(f"{out}.run.json").exists()  # the old provenance is gone: the partial run is what counts
    assert script.main(argv(setup, out, *other)) == 0
    assert out.read_bytes() == reference.read_bytes()
