"""Hand-made Brain-LLaVA inputs shared by the SFT-data and training tests: LLaVA turns, a prepared root with
the files SftDataset reads (nsd_fmri2image.json and the whole-brain betas of two subjects), SFT records as
generate_sft_data.py builds them, and tiny model parts (a saved ViT3D, the tiny Llama and its tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llava_brain import tiny
from llava_brain.io import write_json
from llava_brain.layout import DatasetRoot
from llava_brain.sft import make_record
from llava_brain.subjects import Sample

QA = [
    ("Describe the image concisely.", "A red circle on a gray background."),
    ('Locating the concept of "circle"', "circle"),
    ("How many objects are there in this image?", "There is one object, a small red circle."),
]
TURNS = [{"from": role, "value": text} for pair in QA for role, text in zip(("human", "gpt"), pair, strict=True)]
TURNS[0] = {"from": "human", "value": "<image>\n" + TURNS[0]["value"]}
# subject -> (nsd_fmri2image.json lists, whole-brain grid): image 20 shown three times to subj01.
SUBJECTS = {
    1: ({"train": [10, 11, 10, 12], "val": [20, 21, 20, 21, 20]}, (5, 6, 7)),
    2: ({"train": [13, 10], "val": [21, 20]}, (4, 6, 5)),
}
# A tiny ViT3D: grid 12 x 13 x 11, patch 6 -> 2 x 3 x 2 patches, 4 active -> 5 tokens.
TOWER = dict(grid=(12, 13, 11), patch_size=6, hidden_size=16, num_layers=3, num_heads=2, head_hidden=16,
             clip_dim=8, vae_shape=(2, 2, 2), active_patches=[1, 4, 7, 10])  # fmt: skip


def write_root(folder: Path, seed: int = 0) -> DatasetRoot:
    """A prepared root with what SftDataset reads: nsd_fmri2image.json and the whole-brain betas (float16)."""
    layout = DatasetRoot(folder)
    rng = np.random.default_rng(seed)
    for subject, (lists, grid) in SUBJECTS.items():
        repeats = {f"{k}_repeat": [v[:i].count(x) for i, x in enumerate(v)] for k, v in lists.items()}
        write_json(layout.fmri2image(subject), {**lists, **repeats}, indent=None)
        for split, key in (("tr", "train"), ("te", "val")):
            layout.whole_betas(subject, split).parent.mkdir(parents=True, exist_ok=True)
            betas = rng.normal(size=(len(lists[key]), *grid)).astype(np.float16)
            np.save(layout.whole_betas(subject, split), betas)
    return layout


def good_records() -> list[dict]:
    """Records as generate_sft_data.py builds them (llava_brain.sft.make_record), single and averaged samples."""
    plain = [dict(t, value=t["value"].replace("<image>\n", "")) for t in TURNS]
    samples = [
        Sample(1, "te", 20, (0, 2, 4), per_image=True),
        Sample(1, "tr", 11, (1,)),
        Sample(2, "te", 21, (0,)),
        Sample(2, "tr", 10, (1,)),
    ]
    return [make_record(s, t, plain[:n]) for s in samples for t, n in (("brief_description", 2), ("conversation", 6))]


def write_records(layout: DatasetRoot, records: list[dict]) -> Path:
    path = layout.sft_data("tr")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def write_model_parts(base: Path, *, llm_hidden: int = 32, llm_layers: int = 2) -> dict[str, Path]:
    """vit (a pretrain_vit3d.py-like --out with final/) and llm (the tiny Llama + its Vicuna-template tokenizer)."""
    from llava_brain.model import ViT3D, ViT3DConfig

    with tiny.seeded(1):
        ViT3D(ViT3DConfig(**TOWER)).save_pretrained(base / "vit" / "final")
    sentences = [*tiny.INSTRUCTION_SENTENCES, *(a for _, a in QA), *(q for q, _ in QA)]
    tokenizer = tiny.build_llm_tokenizer(tiny.train_byte_bpe(sentences, vocab_size=400))
    tiny.build_llm(tokenizer=tokenizer, hidden_size=llm_hidden, num_layers=llm_layers).save_pretrained(base / "llm")
    tokenizer.save_pretrained(base / "llm")
    return {"vit": base / "vit", "llm": base / "llm"}
