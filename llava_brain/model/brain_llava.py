"""Brain-LLaVA: transformers' `LlavaForConditionalGeneration` with the pretrained ViT3D as its vision tower.

The paper's coupling (docs/paper.md, "LLM coupling"): the frozen ViT3D's **penultimate layer**, all of its tokens
(CLS + one per active patch), goes through a 2-layer GELU MLP into the LLM's embedding space at the image
placeholder. In transformers' terms that is a `LlavaConfig` with `vision_config` = the ViT3D's config (model_type
"vit3d", registered with the Auto classes by `llava_brain.model`), `vision_feature_layer=-2`,
`vision_feature_select_strategy="full"` (keep CLS) and transformers' own `LlavaMultiModalProjector`
(linear, GELU, linear). Nothing is subclassed, so `generate()`, chat templates, PEFT, the HF Trainer,
accelerate and DeepSpeed see a stock LLaVA model; one folder holds weights, configs, tokenizer, chat template
and processor, and loads with `AutoModelForImageTextToText` / `AutoProcessor` once `llava_brain.model` is
imported. The ViT3D keeps its CLIP and VAE heads inside the model (`vision_tower_of(model).clip_head`): the LLM
path never runs them (`ViT3D.forward` stops after the requested layer), Grad-CAM on the CLIP head needs them.

Module layout of a Brain-LLaVA (names as in `state_dict`):
    model.vision_tower           the ViT3D (patch_embed, pos_embed, cls_token, blocks, norm, clip_head, vae_head)
    model.multi_modal_projector  linear_1 (vit hidden -> llm hidden), GELU, linear_2 (llm hidden -> llm hidden)
    model.language_model         the LLM's base model (e.g. LlamaModel)
    lm_head                      the LLM's output layer
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlavaConfig
from transformers.models.llava.modeling_llava import LlavaForConditionalGeneration, LlavaMultiModalProjector

from llava_brain.data.chat_templates import IMAGE_TOKEN, LLAMA3_END_OF_TURN, prepare_tokenizer
from llava_brain.errors import BadInputError
from llava_brain.io import staged_folder
from llava_brain.model.processor import BrainLlavaProcessor
from llava_brain.model.vit3d import ViT3D, ViT3DConfig

VISION_FEATURE_LAYER = -2  # the penultimate layer, as LLaVA takes CLIP's
VISION_FEATURE_STRATEGY = "full"  # all tokens, CLS included ("default" would drop CLS)
DEFAULT_SEED = 0
VIT3D_FINAL = "final"  # pretrain_vit3d.py writes the finished model to <out>/final/


def vit3d_folder(path: str | Path) -> Path:
    """The folder holding a ViT3D's config.json and weights: `path` itself, or `path/final` for the --out
    folder of pretrain_vit3d.py. Anything else is a BadInputError naming `path`."""
    path = Path(path)
    for folder in (path / VIT3D_FINAL, path):
        config = folder / "config.json"
        if not config.is_file():
            continue
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            model_type = None
        if model_type != ViT3DConfig.model_type:
            raise BadInputError(config, f"expected a ViT3D config (model_type 'vit3d'); found {model_type!r}")
        if not (folder / "model.safetensors").is_file():
            raise BadInputError(folder / "model.safetensors", "missing; expected the ViT3D's weights")
        return folder
    raise BadInputError(path, "expected a ViT3D folder: pretrain_vit3d.py's --out (with final/) or a folder with "
                              "the ViT3D's config.json and model.safetensors")  # fmt: skip


def brain_llava_config(vision_config: ViT3DConfig, text_config, *, image_token_id: int,
                       projector_hidden_act: str = "gelu") -> LlavaConfig:  # fmt: skip
    """The `LlavaConfig` of a Brain-LLaVA: ViT3D tower, the LLM's config, penultimate layer, all tokens.

    `image_seq_length` records the tower's token count (one placeholder per token); transformers' own
    LlavaProcessor is the only reader of that field, BrainLlavaProcessor keeps its own `num_tokens`.
    """
    num_tokens = 1 + len(vision_config.token_patches())
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=int(image_token_id),
        image_seq_length=num_tokens,
        projector_hidden_act=projector_hidden_act,
        vision_feature_layer=VISION_FEATURE_LAYER,
        vision_feature_select_strategy=VISION_FEATURE_STRATEGY,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )


def _load_llm(llm: str | Path, torch_dtype):
    what = "a causal LM: a folder (config.json, weights, tokenizer) or a hub id"
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(llm))
        model = AutoModelForCausalLM.from_pretrained(str(llm), dtype=torch_dtype)
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BadInputError(llm, f"expected {what} ({reason})") from None
    return model, tokenizer


def _generation_config(llm_config: GenerationConfig, tokenizer) -> GenerationConfig:
    """The LLM's generation config, stopping also at the end of an assistant turn of the chat template (the
    tokenizer's eos, and Llama-3's `<|eot_id|>` when the template ends turns with it: a base Llama-3 lists
    only `<|end_of_text|>`), padding with the tokenizer's pad token."""
    config = GenerationConfig.from_dict(llm_config.to_dict())
    eos = config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    ends = [tokenizer.eos_token_id]
    if LLAMA3_END_OF_TURN in (tokenizer.chat_template or ""):
        ends.append(tokenizer.convert_tokens_to_ids(LLAMA3_END_OF_TURN))
    eos += [int(i) for i in ends if i is not None and i not in eos]
    config.eos_token_id = eos[0] if len(eos) == 1 else eos
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    return config


def build_brain_llava(
    vision_tower: str | Path,
    llm: str | Path,
    *,
    projector_hidden_act: str = "gelu",
    torch_dtype: torch.dtype | None = None,
    chat_template: str | None = None,
    seed: int = DEFAULT_SEED,
) -> tuple[LlavaForConditionalGeneration, BrainLlavaProcessor]:
    """A Brain-LLaVA from parts: (model in eval mode, processor).

    vision_tower: a ViT3D folder (pretrain_vit3d.py's --out or its final/); its weights, heads included.
    llm: folder or hub id of a causal LM with its tokenizer; its weights become the language model.
    projector_hidden_act: the projector's activation (LLaVA's mlp2x_gelu = "gelu").
    torch_dtype: dtype of every weight (None: the LLM's stored dtype, for tower and projector too: the tower's
        output feeds the projector, which feeds the LLM, so one dtype runs through).
    chat_template: a name of `llava_brain.data.CHAT_TEMPLATES` ("llama3", "vicuna_v1") or a Jinja string with
        `{% generation %}` blocks; None keeps the tokenizer's own, which must mark the assistant turns (hub
        templates do not: a BadInputError naming `llm` says so). See `llava_brain.data.prepare_tokenizer`, which
        also adds `<image>` and a pad token.
    seed: seeds the projector's initialisation (transformers' normal(0, initializer_range), zero biases) and the
        new embedding rows when `<image>` is added (transformers' mean resizing); the global RNG is left as it was.
    """
    from llava_brain.tiny.builders import seeded

    tower = ViT3D.from_pretrained(vit3d_folder(vision_tower)).eval()
    language, tokenizer = _load_llm(llm, torch_dtype)
    try:  # <image> as one special token, a chat template that marks assistant turns, a pad token
        prepare_tokenizer(tokenizer, chat_template=chat_template)
    except ValueError as err:
        raise BadInputError(llm, str(err)) from None
    if len(tokenizer) > language.get_input_embeddings().num_embeddings:  # else a spare row serves the new id
        with seeded(seed):
            language.resize_token_embeddings(len(tokenizer))
    config = brain_llava_config(tower.config, language.config,
                                image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                                projector_hidden_act=projector_hidden_act)  # fmt: skip
    # The shell is built on the meta device (no memory, no init), then the loaded parts are put in place: an 8B LLM
    # is neither initialised randomly nor held twice.
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = tower
    model.model.language_model = language.get_decoder()
    model.lm_head = language.get_output_embeddings()
    with seeded(seed):
        projector = LlavaMultiModalProjector(config)
        projector.apply(model._init_weights)
    model.model.multi_modal_projector = projector
    model.generation_config = _generation_config(language.generation_config, tokenizer)
    model.to(torch_dtype or language.dtype)
    processor = BrainLlavaProcessor(tokenizer, chat_template=tokenizer.chat_template, grid=list(tower.config.grid),
                                    num_tokens=tower.num_tokens)  # fmt: skip
    return model.eval(), processor


def save_brain_llava(model, processor: BrainLlavaProcessor, folder: str | Path) -> Path:
    """Write model and processor into one folder, atomically (built beside it, then swapped in whole):
    config.json, generation_config.json, model.safetensors, tokenizer files, chat_template.jinja and
    processor_config.json. An existing folder is replaced."""
    with staged_folder(folder) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
    return Path(folder)


def load_brain_llava(folder: str | Path, *, torch_dtype: torch.dtype | None = None,
                     device: str | torch.device | None = None):  # fmt: skip
    """(model in eval mode, processor) from a folder written by `save_brain_llava` (or any save_pretrained of
    both); a BadInputError naming the folder when it is not one."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = Path(folder)
    for name in ("config.json", "processor_config.json"):
        if not (folder / name).is_file():
            raise BadInputError(folder / name, "missing; expected a Brain-LLaVA folder (save_brain_llava)")
    model = AutoModelForImageTextToText.from_pretrained(
        folder, **({} if torch_dtype is None else {"dtype": torch_dtype})
    )
    if not isinstance(getattr(model.model, "vision_tower", None), ViT3D):
        raise BadInputError(folder / "config.json", "expected a LLaVA model whose vision tower is a ViT3D")
    if device is not None:
        model.to(device)
    return model.eval(), AutoProcessor.from_pretrained(folder)


def vision_tower_of(model) -> ViT3D:
    """The ViT3D inside a Brain-LLaVA (also through a PEFT wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.vision_tower


def projector_of(model) -> LlavaMultiModalProjector:
    """The multimodal projector inside a Brain-LLaVA (also through a PEFT wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.multi_modal_projector
