"""Tiny stand-ins for every full-scale model of the pipeline, built from configs (nothing is downloaded).

Each builder returns the model, plus its processor or tokenizer, in the class the full-scale stage
loads, so `save_pretrained` gives a folder that `from_pretrained` reads exactly like real weights.
`tools/make_tiny_models.py` builds them all into one folder; docs/design.md ("Stages and their
models") says which stage uses which. The package, by concern:

- `tokenizers`: the byte-level BPE (LLM and BLIP-2's OPT tokenizer, trained here on captions plus
  `INSTRUCTION_SENTENCES`) and OpenAI's real CLIP vocabulary (read from the open-clip-torch wheel);
- `builders`: one `build_*` per model, each seeding its own random stream;
- `clip_training`, `vae_training`, `llm_training`, `unclip_training`: the four models that are trained (CLIP
  contrastively on image-caption pairs, the VAE on stimuli, the Llama on captions and chat-formatted instruction
  conversations, Stable unCLIP's UNet as a latent diffusion model conditioned on the CLIP image embeddings);
  all others keep their random weights;
- `inputs`: what they are trained on, read from the raw NSD tree before anything is built (captions,
  instances, resized stimuli, the train / held-out splits: `plan_inputs`; imported from its module);
- `metrics`: their held-out scores (CLIP retrieval, the VAE's reconstruction PixCorr; `pixcorr` is
  `llava_brain.evaluation.image_metrics.pixcorr`, re-exported); the LLM's perplexity is in `llm_training`.

`from llava_brain import tiny` then `tiny.<name>` reaches every public name below.
"""

from llava_brain.tiny.builders import (
    DEFAULT_SEED,
    build_blip2,
    build_clip_text,
    build_clip_vision,
    build_detr,
    build_llm,
    build_unclip,
    build_vae,
    detr_id2label,
    num_parameters,
    seeded,
)
from llava_brain.tiny.clip_training import clip_pixel_values, train_clip
from llava_brain.tiny.llm_training import (
    CONVERSATION_TYPES,
    Corpus,
    build_corpus,
    image_conversations,
    image_texts,
    perplexity,
    pretrain_llm,
    render_conversations,
    tokenize_documents,
    train_llm,
    tree_contexts,
    unigram_perplexity,
    without_specials,
)
from llava_brain.tiny.metrics import clip_retrieval, pixcorr, reconstruct, reconstruction_pixcorr
from llava_brain.tiny.tokenizers import (
    CHAT_TEMPLATE,
    IMAGE_TOKEN,
    INSTRUCTION_SENTENCES,
    SPECIAL_TOKENS,
    VICUNA_SYSTEM,
    build_clip_tokenizer,
    build_llm_tokenizer,
    build_opt_tokenizer,
    openai_clip_bpe_path,
    openai_clip_vocab,
    train_byte_bpe,
)
from llava_brain.tiny.unclip_training import train_unclip, unclip_check
from llava_brain.tiny.vae_training import images_to_tensor, train_vae

__all__ = [
    "CHAT_TEMPLATE",
    "CONVERSATION_TYPES",
    "DEFAULT_SEED",
    "IMAGE_TOKEN",
    "INSTRUCTION_SENTENCES",
    "SPECIAL_TOKENS",
    "VICUNA_SYSTEM",
    "Corpus",
    "build_blip2",
    "build_clip_text",
    "build_clip_tokenizer",
    "build_clip_vision",
    "build_corpus",
    "build_detr",
    "build_llm",
    "build_llm_tokenizer",
    "build_opt_tokenizer",
    "build_unclip",
    "build_vae",
    "clip_pixel_values",
    "clip_retrieval",
    "detr_id2label",
    "image_conversations",
    "image_texts",
    "images_to_tensor",
    "num_parameters",
    "openai_clip_bpe_path",
    "openai_clip_vocab",
    "perplexity",
    "pixcorr",
    "pretrain_llm",
    "reconstruct",
    "reconstruction_pixcorr",
    "render_conversations",
    "seeded",
    "tokenize_documents",
    "train_byte_bpe",
    "train_clip",
    "train_llm",
    "train_unclip",
    "train_vae",
    "tree_contexts",
    "unclip_check",
    "unigram_perplexity",
    "without_specials",
]
