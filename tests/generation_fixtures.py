"""The tiny Brain-LLaVA and hand-made root of the generation and chat tests (test_generate_from_llava.py,
test_chat.py): a tiny ViT3D (5 tokens) + the tiny Llama with an untrained, scaled-up projector, and subj01's test
split with six samples showing nsdIds 10, 11, 12, 10, 11, 12."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import llava_brain.model  # noqa: F401  (registers vit3d and BrainLlavaProcessor)
from llava_brain import tiny
from llava_brain.annotations import write_captions
from llava_brain.layout import DatasetRoot
from llava_brain.model import ViT3D, ViT3DConfig, build_brain_llava, save_brain_llava

TOWER = dict(grid=(12, 13, 11), patch_size=6, hidden_size=16, num_layers=3, num_heads=2, head_hidden=16,
             clip_dim=8, vae_shape=(2, 2, 2), active_patches=[1, 4, 7, 10])  # fmt: skip
VAL = [10, 11, 12, 10, 11, 12]
AVG = ["subj01/te/0+3", "subj01/te/1+4", "subj01/te/2+5"]
# A short chat template (no system prompt, no role names): in a random tiny Llama the last few prompt tokens decide
# the answer, and the fMRI moves it only when the prompt is short (measured: Vicuna's template hides it).
TEMPLATE = (
    "{%- for message in messages -%}{%- for part in message['content'] -%}"
    "{%- if message['role'] == 'assistant' -%}{%- generation -%}{{ part['text'] }}</s>{%- endgeneration -%}"
    "{%- elif part['type'] == 'image' -%}<image>\n{%- else -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{{ '\n' }}{%- endfor -%}"
)
REFS = {10: ["A brown dog runs across the grass."], 11: ["A cat is sleeping on a sofa."],
        12: ["A slice of pizza on a white plate."]}  # fmt: skip


def make_setup(base: Path) -> dict[str, Path]:
    """The tiny Brain-LLaVA folder (model/) and the hand-made root (root/) under `base` (test_chat.py too)."""
    with tiny.seeded(1):
        ViT3D(ViT3DConfig(**TOWER)).save_pretrained(base / "vit" / "final")
    tokenizer = tiny.build_llm_tokenizer(tiny.train_byte_bpe(tiny.INSTRUCTION_SENTENCES, vocab_size=400))
    tiny.build_llm(tokenizer=tokenizer, hidden_size=32, num_layers=2).save_pretrained(base / "llm")
    tokenizer.save_pretrained(base / "llm")
    model, processor = build_brain_llava(base / "vit", base / "llm", chat_template=TEMPLATE)
    with torch.no_grad():  # larger projector and attention values than at init: the fMRI moves the answers more
        for name, p in model.named_parameters():
            if "multi_modal_projector" in name or "v_proj" in name or "o_proj" in name:
                p.mul_(30)
    save_brain_llava(model, processor, base / "model")
    layout = DatasetRoot(base / "root")
    layout.fmri2image(1).parent.mkdir(parents=True)
    mapping = {"train": [1, 2], "val": VAL, "train_repeat": [0, 0], "val_repeat": [0, 0, 0, 1, 1, 1]}
    layout.fmri2image(1).write_text(json.dumps(mapping))
    layout.whole_betas(1, "te").parent.mkdir(parents=True)
    np.save(layout.whole_betas(1, "te"), np.random.default_rng(0).normal(size=(6, 10, 11, 9)).astype(np.float16))
    write_captions(layout.coco_captions, REFS, {"source": "hand-made"})
    return {"base": base, "model": base / "model", "root": layout.root}
