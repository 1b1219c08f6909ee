"""llava_brain/tiny/ as a library: seeded builders, deterministic training, pixel values, retrieval ties, PixCorr."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llava_brain import tiny


def test_builders_are_deterministic_and_leave_the_global_rng_alone():
    state = torch.random.get_rng_state()
    first, _ = tiny.build_clip_vision(seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    second, _ = tiny.build_clip_vision(seed=3)
    third, _ = tiny.build_clip_vision(seed=4)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    assert any(not torch.equal(v, third.state_dict()[k]) for k, v in first.state_dict().items())
    vaes = [tiny.build_vae(image_size=32, seed=0) for _ in range(2)]
    images = torch.rand(8, 3, 32, 32) * 2 - 1
    for vae in vaes:
        tiny.train_vae(vae, images, steps=3, batch_size=4, seed=0)
    for key, value in vaes[0].state_dict().items():
        assert torch.equal(value, vaes[1].state_dict()[key]), key


def test_train_clip_is_deterministic_for_a_seed():
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    captions = [[f"a {c} circle.", f"one {c} shape."] for c in ("red", "green", "blue", "gray", "pink", "white")]
    state = torch.random.get_rng_state()
    runs = []
    for _ in range(2):
        vision, processor = tiny.build_clip_vision(seed=0)
        text, tokenizer = tiny.build_clip_text(seed=0)
        pixel_values = tiny.clip_pixel_values(images, processor)
        report = tiny.train_clip(vision, text, tokenizer, pixel_values, captions, steps=3, batch_size=4, seed=0)
        assert not vision.training and not text.training
        assert set(report) == {"seconds", "final_loss", "logit_scale"}
        runs.append({**vision.state_dict(), **{f"text.{k}": v for k, v in text.state_dict().items()}})
    assert torch.equal(torch.random.get_rng_state(), state)
    untrained = tiny.build_clip_vision(seed=0)[0].state_dict()
    assert any(not torch.equal(v, runs[0][k]) for k, v in untrained.items()), "training changed nothing"
    for key, value in runs[0].items():
        assert torch.equal(value, runs[1][key]), key


def test_clip_pixel_values_match_the_processor():
    _, processor = tiny.build_clip_vision(image_size=32)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    expected = processor(images=list(images), return_tensors="pt").pixel_values
    assert torch.allclose(tiny.clip_pixel_values(images, processor), expected, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        tiny.clip_pixel_values(images.astype(np.float32), processor)


def test_clip_retrieval_counts_ties_for_the_first_index():
    class Fixed(torch.nn.Module):  # embeddings looked up by the first pixel / the token after <|startoftext|>
        def __init__(self, table, key):
            super().__init__()
            self.table, self.key = table, key

        def forward(self, pixel_values=None, input_ids=None, attention_mask=None):
            index = pixel_values[:, 0, 0, 0].long() if input_ids is None else input_ids[:, 1] - 320
            return SimpleNamespace(**{self.key: self.table[index]})

    _, tokenizer = tiny.build_clip_text()
    pixel_values = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 3, 2, 2)
    captions = [["a"], ["a"], ["b"]]  # "a" = 320, "b" = 321: images 0 and 1 share a caption
    image_table = torch.eye(3)[[0, 0, 1]]  # images 0 and 1 embed alike too, image 2 elsewhere
    text_table = torch.eye(3)[[0, 1]]
    scores = tiny.clip_retrieval(
        Fixed(image_table, "image_embeds"), Fixed(text_table, "text_embeds"), tokenizer, pixel_values, captions
    )
    # image 1 ties between captions 0 and 1 (identical) -> caption 0: a miss; caption 1 ties images 0, 1 -> a miss.
    assert scores == pytest.approx({"image_to_text_top1": 2 / 3, "text_to_image_top1": 2 / 3, "chance": 1 / 3})


def test_pixcorr():
    rng = np.random.default_rng(0)
    a = rng.random((3, 8, 8, 3))
    assert tiny.pixcorr(a, a) == pytest.approx(1.0)
    assert tiny.pixcorr(a, -a) == pytest.approx(-1.0)
    assert tiny.pixcorr(torch.from_numpy(a), 2 * a + 5) == pytest.approx(1.0)  # invariant to gain and offset
    with pytest.raises(ValueError, match="one shape"):
        tiny.pixcorr(a, a[:2])


def test_clip_vocabulary_matches_open_clip_layout():
    vocab, merges = tiny.openai_clip_vocab()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["a</w>"] == 320 and vocab["!"] == 0
