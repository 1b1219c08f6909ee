"""tools/chat.py through --questions on the tiny Brain-LLaVA of test_generate_from_llava.py: the streamed answers
equal model.generate() over the conversation written out by hand (fMRI only in the first user turn), /reset,
/sample and /save, one-line errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llava_brain.model.brain_llava import load_brain_llava

from conftest import load_script
from generation_fixtures import make_setup
from stage_checks import error_line

QUESTIONS = ["Describe the image concisely.", "What else is in it?"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("chat"))


@pytest.fixture(scope="module")
def chat():
    return load_script("tools/chat.py")


def by_hand(setup, sample: str, questions: list[str]) -> list[str]:
    """Greedy answers of a conversation, each over all earlier turns, the sample an image of turn one only."""
    model, processor = load_brain_llava(setup["model"])
    messages, answers = [], []
    for k, question in enumerate(questions):
        content = [{"type": "text", "text": question}]
        messages.append({"role": "user", "content": ([{"type": "image"}] if k == 0 else []) + content})
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        assert text.count(processor.image_token) == 1
        inputs = processor(text=[text], samples=[sample], dataset_root=setup["root"], return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        answer = processor.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        answers.append(answer)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return answers


def run(chat, setup, tmp_path, lines: list[str], capsys, sample: str = "subj01/te/0+3") -> tuple[int, str]:
    questions = tmp_path / "questions.txt"
    questions.write_text("\n".join(lines) + "\n")
    code = chat.main(["--model", str(setup["model"]), "--dataset-root", str(setup["root"]), "--sample", sample,
                      "--questions", str(questions), "--max-new-tokens", "5", "--device", "cpu"])  # fmt: skip
    return code, capsys.readouterr().out


def answers_in(out: str) -> list[str]:
    return [line.removeprefix("ASSISTANT: ").strip() for line in out.splitlines() if line.startswith("ASSISTANT: ")]


def test_streamed_multi_turn_answers_equal_generate(chat, setup, tmp_path, capsys):
    code, out = run(chat, setup, tmp_path, QUESTIONS, capsys)
    assert code == 0
    assert [line for line in out.splitlines() if line.startswith("USER: ")] == [f"USER: {q}" for q in QUESTIONS]
    assert answers_in(out) == by_hand(setup, "subj01/te/0+3", QUESTIONS)


def test_reset_sample_and_save(chat, setup, tmp_path, capsys):
    saved, second = tmp_path / "t1.json", tmp_path / "t2.json"
    lines = [QUESTIONS[0], QUESTIONS[1], f"/save {saved}", "/reset", QUESTIONS[1], "/sample subj01/te/2",
             QUESTIONS[0], f"/save {second}", "/quit", "never asked"]  # fmt: skip
    code, out = run(chat, setup, tmp_path, lines, capsys)
    assert code == 0
    answers = answers_in(out)
    assert len(answers) == 4 and "never asked" not in out
    first = by_hand(setup, "subj01/te/0+3", QUESTIONS)
    assert answers[:2] == first
    assert answers[2] == by_hand(setup, "subj01/te/0+3", [QUESTIONS[1]])[0]  # /reset: a first turn again
    assert answers[3] == by_hand(setup, "subj01/te/2", [QUESTIONS[0]])[0]
    transcript = json.loads(saved.read_text())
    assert transcript["sample"] == "subj01/te/0+3" and transcript["model"] == str(setup["model"].resolve())
    assert transcript["turns"] == [{"role": r, "text": t} for q, a in zip(QUESTIONS, first, strict=True)
                                   for r, t in (("user", q), ("assistant", a))]  # fmt: skip
    other = json.loads(second.read_text())
    assert other["sample"] == "subj01/te/2" and [t["text"] for t in other["turns"]] == [QUESTIONS[0], answers[3]]


def test_bad_sample_command_keeps_the_session(chat, setup, tmp_path, capsys):
    questions = tmp_path / "q.txt"
    questions.write_text(f"/sample subj01/te/99\n/bogus\n{QUESTIONS[0]}\n")
    code = chat.main(["--model", str(setup["model"]), "--dataset-root", str(setup["root"]), "--sample",
                      "subj01/te/0+3", "--questions", str(questions), "--max-new-tokens", "5"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0
    assert "asks for row 99" in captured.err and "unknown command /bogus" in captured.err
    assert answers_in(captured.out) == by_hand(setup, "subj01/te/0+3", QUESTIONS[:1])


def test_bad_start_is_one_line(chat, setup, tmp_path, capsys):
    base = ["--model", str(setup["model"]), "--dataset-root", str(setup["root"])]
    assert chat.main([*base, "--sample", "subj01/te/6", "--questions", str(tmp_path / "q.txt")]) == 2
    assert "q.txt" in error_line(capsys)
    (tmp_path / "q.txt").write_text("hello\n")
    assert chat.main([*base, "--sample", "subj01/te/6", "--questions", str(tmp_path / "q.txt")]) == 2
    assert "asks for row 6" in error_line(capsys)
    with pytest.raises(SystemExit) as exit_:
        chat.main([*base, "--sample", "subj01/val/1"])
    assert exit_.value.code == 2 and "not a sample reference" in error_line(capsys)
    assert chat.main(["--model", str(tmp_path), "--dataset-root", str(setup["root"]), "--sample", "subj01/te/0"]) == 2
    assert str(Path(tmp_path) / "config.json") in error_line(capsys)
