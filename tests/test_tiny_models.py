"""tools/make_tiny_models.py and llava_brain/tiny/: every folder reloads with its full-scale class and runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llava_brain import tiny
from llava_brain.layout import NsdTree
from llava_brain.simulate import MiniNsdConfig, write_mini_nsd
from llava_brain.simulate.scenes import SHAPES
from llava_brain.tiny.inputs import clip_split, coco_captions, plan_inputs, read_stimuli

from conftest import SMALL, load_script

# SMALL with more images (~2 s to write): CLIP retrieval among SMALL's 12 held-out images is too coarse to
# tell learning from luck; here CLIP trains on 220 images and is scored on 40 (chance 0.025).
TREE = dict(SMALL, num_shared=40, images_per_subject=150, sessions=3)
# Enough VAE steps to beat shuffled pairs clearly on the tree's held-out images (~13 s of the build).
TEST_VAE_STEPS = 150
# Enough CLIP steps for held-out top-1 of 0.10-0.20 both ways over seeds 0-5 (~5 s of the build).
TEST_CLIP_STEPS = 200
# Enough LLM steps for held-out caption perplexity far below the untrained model's and a unigram model's (~3 s).
TEST_LLM_STEPS = 60
# Enough unCLIP UNet steps for images from the true CLIP embeddings to beat shuffled pairs clearly (~10 s).
TEST_UNET_STEPS = 60
FOLDERS = ("blip2", "detr", "clip_vision", "clip_text", "vae", "unclip", "llm")


@pytest.fixture(scope="module")
def script():
    return load_script("tools/make_tiny_models.py")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> NsdTree:
    out = tmp_path_factory.mktemp("clip_nsd") / "nsd"
    write_mini_nsd(out, MiniNsdConfig(**TREE), progress=False)
    return NsdTree(out)


def _args(tree: NsdTree, out: Path, *flags: str) -> list[str]:
    return ["--out", str(out), "--nsd-root", str(tree.root), "--vae-steps", str(TEST_VAE_STEPS),
            "--clip-steps", str(TEST_CLIP_STEPS), "--llm-steps", str(TEST_LLM_STEPS), "--unet-steps",
            str(TEST_UNET_STEPS), "--quiet", *flags]  # fmt: skip


@pytest.fixture(scope="module")
def built(script, tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "models"
    assert script.main(_args(tree, out)) == 0
    return out


@pytest.fixture(scope="module")
def manifest(built) -> dict:
    return json.loads((built / "tiny_models.json").read_text())


def _image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (425, 425, 3), dtype=np.uint8))


# The tool ------------------------------------------------------------------------------------------


def test_writes_every_folder_and_a_manifest(built, manifest):
    assert sorted(p.name for p in built.iterdir()) == sorted([*FOLDERS, "run.json", "tiny_models.json"])
    assert sorted(p.name for p in built.parent.iterdir()) == ["models"], "no staging folder or temp file left"
    assert set(manifest["models"]) == set(FOLDERS) and manifest["seed"] == 0
    for name, entry in manifest["models"].items():
        assert entry["class"], name
        assert entry.get("parameters", entry.get("unet_parameters", 0)) > 0, name
    run = json.loads((built / "run.json").read_text())
    settings = run["settings"]
    assert (settings["vae_steps"], settings["clip_steps"], settings["llm_steps"]) == (
        TEST_VAE_STEPS, TEST_CLIP_STEPS, TEST_LLM_STEPS)  # fmt: skip
    assert set(run["inputs"]) == {"stimuli", "stim_info", "captions", "instances", "instructions"}
    # The prompt lists the LLM's conversations are worded with: data/instructions/ (3) and the detail questions.
    assert len(run["inputs"]["instructions"]) == 4 and all("sha256" in f for f in run["inputs"]["instructions"])
    # Timings live in run.json only, so tiny_models.json is the same in every run with the same settings.
    assert {"clip_train", "vae_train", "llm_corpus", "llm_train", "total"} <= set(run["timings"])
    assert "seconds" not in json.dumps(manifest)
    assert run["torch_threads"] == torch.get_num_threads()  # runtime.limit_threads() ran first


def test_rerun_with_the_same_settings_skips(script, tree, built, caplog):
    before = {p: p.stat().st_mtime_ns for p in built.rglob("*")}
    with caplog.at_level("INFO", logger="make_tiny_models"):
        assert script.main(_args(tree, built)) == 0
    assert {p: p.stat().st_mtime_ns for p in built.rglob("*")} == before
    assert "CLIP on 40 held-out shared1000 images" in caplog.text  # the stored scores are repeated
    assert "LLM perplexity on the texts of 40 held-out shared1000 images" in caplog.text


@pytest.mark.parametrize("flags", [("--seed", "1"), ("--clip-steps", "1"), ("--llm-steps", "1")])
def test_other_settings_need_overwrite(script, tree, built, capsys, flags):
    assert script.main(_args(tree, built, *flags)) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_overwrite_rebuilds_atomically(script, small_tree, tmp_path):
    out = tmp_path / "models"
    out.mkdir()
    (out / "stale.txt").write_text("left by an interrupted run")
    assert script.main(_args(small_tree, out)) == 2  # not a finished folder: refuse to touch it
    assert script.main(["--out", str(out), "--nsd-root", str(small_tree.root), "--vae-steps", "1", "--clip-steps",
                        "1", "--llm-steps", "1", "--unet-steps", "1", "--quiet", "--overwrite"]) == 0  # fmt: skip
    assert not (out / "stale.txt").exists() and (out / "tiny_models.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_steps_0_keep_the_random_clip_and_llm(script, small_tree, tmp_path):
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPVisionModelWithProjection, LlamaForCausalLM

    out = tmp_path / "models"
    flags = ["--vae-steps", "1", "--clip-steps", "0", "--llm-steps", "0", "--unet-steps", "0", "--quiet"]
    assert script.main(["--out", str(out), "--nsd-root", str(small_tree.root), *flags]) == 0
    report = json.loads((out / "tiny_models.json").read_text())["clip_training"]
    assert report["steps"] == 0 and "seconds" not in report and report["chance"] == pytest.approx(1 / 12, abs=1e-4)
    untrained = {"clip_vision": tiny.build_clip_vision(projection_dim=32, seed=0)[0],
                 "clip_text": tiny.build_clip_text(projection_dim=32, seed=0)[0]}  # fmt: skip
    for folder, cls in (("clip_vision", CLIPVisionModelWithProjection), ("clip_text", CLIPTextModelWithProjection)):
        fresh, saved = untrained[folder], cls.from_pretrained(out / folder)
        for key, value in fresh.state_dict().items():
            assert torch.equal(saved.state_dict()[key], value), key
    llm = json.loads((out / "tiny_models.json").read_text())["llm_training"]
    assert llm["steps"] == 0 and "final_loss" not in llm and llm["perplexity"] == llm["untrained_perplexity"]
    unclip = json.loads((out / "tiny_models.json").read_text())["unclip_training"]
    assert unclip["steps"] == 0 and "final_loss" not in unclip and "pixcorr" not in unclip
    fresh = tiny.build_llm(tokenizer=AutoTokenizer.from_pretrained(out / "llm"), seed=0)
    saved = LlamaForCausalLM.from_pretrained(out / "llm").state_dict()
    for key, value in fresh.state_dict().items():
        assert torch.equal(saved[key], value), key


def test_missing_nsd_input_exits_2(script, tmp_path, capsys):
    assert script.main(["--out", str(tmp_path / "models"), "--nsd-root", str(tmp_path / "nowhere"), "--quiet"]) == 2
    assert "captions" in capsys.readouterr().err
    assert not list(tmp_path.iterdir()), "nothing half-written, no staging folder left"


# Each folder loads with the full-scale class and runs -----------------------------------------------


@pytest.mark.parametrize(
    ("folder", "model_type"),
    [("blip2", "blip-2"), ("detr", "detr"), ("clip_vision", "clip_vision_model"), ("clip_text", "clip_text_model"),
     ("llm", "llama")],
)  # fmt: skip
def test_auto_config_model_type(built, folder, model_type):
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(built / folder).model_type == model_type


def test_blip2_generates_captions(built):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    model = Blip2ForConditionalGeneration.from_pretrained(built / "blip2").eval()
    processor = Blip2Processor.from_pretrained(built / "blip2")
    inputs = processor(images=[_image(0), _image(1)], text=["", ""], return_tensors="pt")
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert image_token == model.config.image_token_index
    num_query = model.config.num_query_tokens
    assert (inputs["input_ids"] == image_token).sum(1).tolist() == [num_query] * 2
    assert inputs["input_ids"][0, num_query] == processor.tokenizer.bos_token_id == 2  # OPT: "</s>" leads the text
    generated = model.generate(**inputs, do_sample=True, num_return_sequences=2, max_new_tokens=6)
    assert generated.shape[0] == 4 and generated.shape[1] > inputs["input_ids"].shape[1]
    texts = processor.tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)


def test_detr_detects_with_mini_nsd_categories(built):
    from transformers import DetrForObjectDetection, DetrImageProcessor

    model = DetrForObjectDetection.from_pretrained(built / "detr").eval()
    processor = DetrImageProcessor.from_pretrained(built / "detr")
    assert model.config.id2label == {0: "N/A", **{i + 1: name for i, name in enumerate(SHAPES)}}
    assert model.config.backbone_config.model_type == "resnet"  # transformers' ResNet: no timm, no download
    with torch.no_grad():
        outputs = model(**processor(images=[_image(0), _image(1)], return_tensors="pt"))
    assert outputs.logits.shape == (2, model.config.num_queries, len(SHAPES) + 2)  # + "N/A" + no-object
    results = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[(425, 425)] * 2)
    boxes, labels = results[0]["boxes"], results[0]["labels"]
    assert boxes.shape == (model.config.num_queries, 4) and int(labels.max()) < len(model.config.id2label)


def test_clip_vision_embeds_have_projection_dim(built, manifest):
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(built / "clip_vision").eval()
    processor = CLIPImageProcessor.from_pretrained(built / "clip_vision")
    with torch.no_grad():
        out = model(**processor(images=[_image(0)], return_tensors="pt"), output_hidden_states=True)
    assert out.image_embeds.shape == (1, manifest["models"]["clip_vision"]["projection_dim"])
    grid = model.config.image_size // model.config.patch_size
    assert out.hidden_states[-2].shape == (1, grid * grid + 1, model.config.hidden_size)


def test_clip_tokenizer_is_openai_vocabulary(built):
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(built / "clip_text")
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    model = CLIPTextModelWithProjection.from_pretrained(built / "clip_text").eval()
    with torch.no_grad():
        out = model(**tokenizer(["a red circle", "two shapes"], padding="max_length", return_tensors="pt"))
    assert out.text_embeds.shape == (2, model.config.projection_dim)


def test_unclip_pipeline_runs_from_image_embeds(built):
    from diffusers import AutoencoderKL, StableUnCLIPImg2ImgPipeline
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    pipe = StableUnCLIPImg2ImgPipeline.from_pretrained(built / "unclip")
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert pipe.unet.config.class_embed_type == "projection"
    assert pipe.unet.config.projection_class_embeddings_input_dim == 2 * pipe.image_encoder.config.projection_dim
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    clip = CLIPVisionModelWithProjection.from_pretrained(built / "clip_vision")
    text = CLIPTextModelWithProjection.from_pretrained(built / "clip_text")
    vae = AutoencoderKL.from_pretrained(built / "vae")
    # The same (trained) weights as the stand-alone folders.
    for ours, theirs in ((pipe.image_encoder, clip), (pipe.text_encoder, text.text_model), (pipe.vae, vae)):
        for key, value in theirs.state_dict().items():
            assert torch.equal(ours.state_dict()[key], value), key
    embeds = torch.randn(2, clip.config.projection_dim, generator=torch.Generator().manual_seed(0))
    images = pipe(image_embeds=embeds, prompt=["a red circle", "a blue square"], num_inference_steps=2,
                  output_type="np", generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    assert images.shape == (2, size, size, 3) and np.isfinite(images).all()


def test_llm_generates_from_chat_template(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(built / "llm")
    model = AutoModelForCausalLM.from_pretrained(built / "llm").eval()
    assert isinstance(model, LlamaForCausalLM) and len(tokenizer) == model.config.vocab_size
    messages = [{"role": "user", "content": "<image>\nDescribe the image concisely."}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<s>A chat between") and prompt.endswith("USER: <image>\nDescribe the image concisely. "
                                                                       "ASSISTANT:")  # fmt: skip
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert int(inputs["input_ids"][0, 0]) == tokenizer.bos_token_id  # once: the template, not the tokenizer too
    assert int((inputs["input_ids"][0] == tokenizer.bos_token_id).sum()) == 1
    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


def test_llm_chat_template_marks_assistant_tokens(built):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built / "llm")
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is there?"}]},
        {"role": "assistant", "content": "A red circle."},
    ]
    out = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    answer = [t for t, m in zip(ids, mask, strict=True) if m]
    # Byte-level BPE joins a word to the space before it, so the answer's first token is " A": the space the
    # template writes after "ASSISTANT:" is learned with it, which is what generation needs, as its prompt ends
    # at "ASSISTANT:". The unmasked prefix is exactly the generation prompt's tokens.
    assert tokenizer.decode(answer) == " A red circle.</s>" and mask[-len(answer) :] == [1] * len(answer)
    prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids[: len(ids) - len(answer)] == prompt
    assert "USER: <image>\nWhat is there? ASSISTANT: A red circle.</s>" in tokenizer.decode(ids)


def test_llm_tokenizer_round_trips_and_keeps_image_whole(built, manifest):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built / "llm")
    text = "A small green triangle on a sandy background.\nÜnïcode, digits 1234 and émojis 🙂 survive."
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(tokenizer.tokenize(" triangle")) == 1  # a caption word (with its space) is one token
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert tokenizer.image_token == "<image>" and tokenizer.image_token_id == image_id
    assert tokenizer("<image>\nHi", add_special_tokens=False).input_ids[0] == image_id
    assert tokenizer.tokenize("x<image>y").count("<image>") == 1
    for name in ("bos", "eos", "pad", "unk"):
        assert getattr(tokenizer, f"{name}_token_id") is not None, name
    assert len(tokenizer) == manifest["models"]["llm"]["vocab_size"]


def test_unclip_unet_learns_to_draw_from_clip_embeddings(manifest):
    report = manifest["unclip_training"]
    assert report["steps"] == TEST_UNET_STEPS and report["heldout_images"] >= 2
    assert report["pixcorr"] > report["shuffled_pixcorr"] + 0.1, report
    assert report["two_way"] > report["shuffled_two_way"] + 0.1, report


def test_vae_learns_coarse_images(built, manifest):
    report = manifest["vae_training"]
    assert report["steps"] == TEST_VAE_STEPS and report["heldout_images"] >= 2
    assert report["pixcorr"] > report["shuffled_pixcorr"] + 0.2, report
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(built / "vae")
    assert vae.config.scaling_factor == pytest.approx(report["scaling_factor"], rel=1e-3)
    x = torch.zeros(1, 3, 64, 64)
    assert vae.encode(x).latent_dist.mean.shape == (1, 4, 16, 16)


def test_clip_learns_to_match_held_out_images_and_captions(script, tree, built, manifest):
    from transformers import (
        CLIPImageProcessor,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionModelWithProjection,
    )

    report = manifest["clip_training"]
    assert report["steps"] == TEST_CLIP_STEPS and report["image_size"] == 32
    assert (report["train_images"], report["heldout_images"]) == (220, 40)
    assert report["chance"] == pytest.approx(1 / 40, abs=1e-4)
    # 4x chance averaged over both directions: 8 hits of 80 where chance expects 2 (seeds 0-5 gave 10-15).
    assert report["image_to_text_top1"] + report["text_to_image_top1"] >= 8 * report["chance"], report
    assert np.isfinite(report["final_loss"]) and 1.0 < report["logit_scale"] <= 100.0
    # The saved folders hold the trained towers: they reproduce the manifest's scores.
    _, heldout, captions = clip_split(tree, coco_captions(tree), 10_000)
    processor = CLIPImageProcessor.from_pretrained(built / "clip_vision")
    pixel_values = tiny.clip_pixel_values(read_stimuli(tree, heldout, 32), processor)
    scores = tiny.clip_retrieval(
        CLIPVisionModelWithProjection.from_pretrained(built / "clip_vision").eval(),
        CLIPTextModelWithProjection.from_pretrained(built / "clip_text").eval(),
        CLIPTokenizer.from_pretrained(built / "clip_text"),
        pixel_values,
        [captions[i] for i in heldout],
    )
    assert scores == pytest.approx({k: report[k] for k in scores}, abs=1e-4)


def test_llm_is_a_language_model_of_the_held_out_texts(script, tree, built, manifest):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = manifest["llm_training"]
    assert report["steps"] == TEST_LLM_STEPS and (report["train_images"], report["heldout_images"]) == (220, 40)
    assert report["heldout_documents"]["captions"] == 5 * 40  # mini-NSD: 5 COCO captions per image
    assert report["train_documents"]["conversations"] >= 5 * 220  # >= 5 instruction types per image
    for kind in ("captions", "conversations"):
        trained, untrained = report["perplexity"][kind], report["untrained_perplexity"][kind]
        # An untrained model is about as good as uniform over the vocabulary; a unigram model knows word
        # frequencies; the trained one must have learned the texts' structure, not only their words.
        assert untrained > 0.5 * manifest["models"]["llm"]["vocab_size"], report
        assert trained < 0.5 * untrained and trained < 0.5 * report["unigram_perplexity"][kind], report
    # Held out: every test (shared1000) image's text, none of the training images'.
    args = script.build_parser().parse_args(_args(tree, built))
    plan = plan_inputs(tree, args.vae_images, args.clip_images, args.llm_images)
    from llava_brain.nsd import StimInfo

    shared = StimInfo.load(tree.stim_info).shared1000
    assert all(shared[c.nsd_id] for c in plan.llm_heldout) and not any(shared[c.nsd_id] for c in plan.llm_train)
    # The saved folder holds the trained model: transformers' own loss on the held-out captions gives the
    # manifest's perplexity.
    tokenizer = AutoTokenizer.from_pretrained(built / "llm")
    model = AutoModelForCausalLM.from_pretrained(built / "llm").eval()
    total = count = 0
    with torch.no_grad():
        for caption in (c for ctx in plan.llm_heldout for c in ctx.captions):
            ids = torch.tensor([[*tokenizer(caption).input_ids, tokenizer.eos_token_id]])
            total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert count == report["heldout_tokens"]["captions"]
    assert np.exp(total / count) == pytest.approx(report["perplexity"]["captions"], rel=1e-3)


def test_built_weights_are_identical_for_the_same_seed(built):
    from transformers import DetrForObjectDetection

    bpe = tiny.train_byte_bpe(["a red circle on a gray background.", *tiny.INSTRUCTION_SENTENCES])
    model = tiny.build_llm(tokenizer=tiny.build_llm_tokenizer(bpe), seed=0)
    again = tiny.build_llm(tokenizer=tiny.build_llm_tokenizer(bpe), seed=0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    detr, _ = tiny.build_detr(categories=SHAPES, seed=0)
    stored = DetrForObjectDetection.from_pretrained(built / "detr").state_dict()
    for key, value in detr.state_dict().items():
        assert torch.equal(value, stored[key]), key
