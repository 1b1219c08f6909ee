"""Builders of the tiny models: each returns a randomly initialised model of the class its full-scale stage loads.

Each builder takes keyword-only arguments, seeds its own random stream (`seeded`: the global torch RNG
is left as it was) and returns the model, plus its processor or tokenizer where the stage needs one:
`save_pretrained` then gives a folder that `from_pretrained` reads exactly like real weights. Sizes are
chosen so that a forward pass takes milliseconds on a CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from llava_brain.tiny.tokenizers import IMAGE_TOKEN, build_clip_tokenizer

DEFAULT_SEED = 0


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's CPU RNG seeded, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Vision-language models --------------------------------------------------------------------------


def build_blip2(*, tokenizer, image_size: int = 32, num_query_tokens: int = 4, seed: int = DEFAULT_SEED):
    """Tiny `Blip2ForConditionalGeneration` (ViT 32-d, Q-Former 32-d, OPT 32-d) + `Blip2Processor`.

    tokenizer: from `build_opt_tokenizer`; the processor adds `num_query_tokens` `<image>` placeholders.
    """
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
    )

    vision = Blip2VisionConfig(
        image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4,
    )  # fmt: skip
    qformer = Blip2QFormerConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, encoder_hidden_size=32,
        vocab_size=tokenizer.vocab_size,
    )  # fmt: skip
    text = OPTConfig(
        vocab_size=len(tokenizer), hidden_size=32, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    config = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    with seeded(seed):
        model = Blip2ForConditionalGeneration(config).eval()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(text, key))
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=num_query_tokens)
    return model, processor


def detr_id2label(categories: Sequence[str]) -> dict[int, str]:
    """DETR's label convention: a class id is the COCO category id and indexes `id2label`; id 0 (unused
    by COCO) is "N/A". The extra "no object" logit is not in `id2label` (it is logit index num_labels)."""
    return {0: "N/A", **{i: name for i, name in enumerate(categories, start=1)}}


def build_detr(*, categories: Sequence[str], image_size: int = 128, num_queries: int = 10, seed: int = DEFAULT_SEED):
    """Tiny `DetrForObjectDetection` on a tiny ResNet (no timm, no pretrained backbone) + `DetrImageProcessor`.

    categories: names of COCO category ids 1..N, e.g. mini-NSD's `simulate.scenes.SHAPES`.
    image_size: the processor's shortest edge in pixels (the longest is capped at DETR's 1333/800 ratio).
    """
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

    backbone = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], layer_type="basic",
        out_features=["stage4"],
    )  # fmt: skip
    id2label = detr_id2label(categories)
    # use_timm_backbone/use_pretrained_backbone are transformers 4.x flags; 5.x infers both from a
    # backbone_config of model_type "resnet" (transformers' ResNetBackbone, randomly initialised).
    config = DetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone.to_dict(),
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=num_queries,
        id2label=id2label, label2id={v: k for k, v in id2label.items()},
    )  # fmt: skip
    with seeded(seed):
        model = DetrForObjectDetection(config).eval()
    longest = round(image_size * 1333 / 800)
    processor = DetrImageProcessor(size={"shortest_edge": image_size, "longest_edge": longest})
    return model, processor


def build_clip_vision(*, image_size: int = 32, projection_dim: int = 32, seed: int = DEFAULT_SEED):
    """Tiny `CLIPVisionModelWithProjection` (patch 8, 2 layers, 32-d) + `CLIPImageProcessor` (OpenAI's
    normalisation). `image_embeds` has `projection_dim` values: the vector Stable unCLIP is conditioned on."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, projection_dim=projection_dim,
    )  # fmt: skip
    with seeded(seed):
        model = CLIPVisionModelWithProjection(config).eval()
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return model, processor


def _clip_text_config(tokenizer, projection_dim: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, projection_dim=projection_dim,
        # With the real eos id (not the legacy 2), pooling takes the hidden state at <|endoftext|>.
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip


def build_clip_text(*, tokenizer=None, projection_dim: int = 32, seed: int = DEFAULT_SEED):
    """Tiny `CLIPTextModelWithProjection` (2 layers, 32-d, 77 positions) + the real CLIP tokenizer.

    `text_embeds` has `projection_dim` values and lives in the space of `build_clip_vision`'s image_embeds
    once both towers are trained together with `train_clip` (as built, both are random).
    tokenizer: default `build_clip_tokenizer()`.
    """
    from transformers import CLIPTextModelWithProjection

    tokenizer = tokenizer if tokenizer is not None else build_clip_tokenizer()
    with seeded(seed):
        model = CLIPTextModelWithProjection(_clip_text_config(tokenizer, projection_dim)).eval()
    return model, tokenizer


# Language model ----------------------------------------------------------------------------------


def build_llm(*, tokenizer, hidden_size: int = 64, num_layers: int = 2, seed: int = DEFAULT_SEED):
    """Tiny `LlamaForCausalLM` (4 heads, 2 KV heads as in Llama-3's grouped-query attention) over `tokenizer`
    (from `build_llm_tokenizer`); generation stops at `</s>`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=tokenizer.model_max_length, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    with seeded(seed):
        model = LlamaForCausalLM(config).eval()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(config, key))
    return model


# VAE ----------------------------------------------------------------------------------------------


def build_vae(*, image_size: int = 64, seed: int = DEFAULT_SEED):
    """Tiny `AutoencoderKL`: 3 blocks (16, 32, 64 channels), 4 latent channels, latents image_size/4 a side.

    No mid-block attention (it halves the training speed here and adds nothing at 16 x 16 latents).
    Random weights: train with `train_vae`, which also sets `scaling_factor`.
    """
    from diffusers import AutoencoderKL

    with seeded(seed):
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64),
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            layers_per_block=1, norm_num_groups=8, sample_size=image_size, mid_block_add_attention=False,
        )  # fmt: skip
    return vae.eval()


# Stable unCLIP ------------------------------------------------------------------------------------


def build_unclip(*, clip_vision, feature_extractor, clip_tokenizer, clip_text, vae, seed: int = DEFAULT_SEED):
    """A tiny `StableUnCLIPImg2ImgPipeline` (SD 2.1 unCLIP layout) around the given CLIP and VAE.

    image_encoder/feature_extractor: `build_clip_vision`'s; text_encoder: a `CLIPTextModel` (the class the
    pipeline requires) holding the text tower of `clip_text`; vae: the trained VAE. The UNet takes the
    noised image embedding concatenated with its noise-level embedding (2 x projection_dim) as class
    embedding, and the text tower's hidden states (32-d) through cross-attention; v-prediction DDIM.
    """
    from diffusers import DDIMScheduler, DDPMScheduler, StableUnCLIPImg2ImgPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import CLIPTextModel

    embed_dim = clip_vision.config.projection_dim
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    with seeded(seed):
        text_encoder = CLIPTextModel(clip_text.config).eval()
        text_encoder.load_state_dict(clip_text.text_model.state_dict())  # the same tower, without projection
        unet = UNet2DConditionModel(
            sample_size=vae.config.sample_size // factor, in_channels=vae.config.latent_channels,
            out_channels=vae.config.latent_channels, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=clip_text.config.hidden_size, attention_head_dim=8, norm_num_groups=8,
            use_linear_projection=True, class_embed_type="projection",
            projection_class_embeddings_input_dim=2 * embed_dim,
        )  # fmt: skip
    # Scheduler settings of stabilityai/stable-diffusion-2-1-unclip(-small).
    image_noising_scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", clip_sample=True
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    return StableUnCLIPImg2ImgPipeline(
        feature_extractor=feature_extractor,
        image_encoder=clip_vision,
        image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=embed_dim),
        image_noising_scheduler=image_noising_scheduler,
        tokenizer=clip_tokenizer,
        text_encoder=text_encoder,
        unet=unet.eval(),
        scheduler=scheduler,
        vae=vae,
    )
