"""Parameters and GPU memory of a Brain-LLaVA before any weight exists (what `train --dry-run` prints).

The model is built on the meta device (shapes only: no memory, no initialisation), so the full configuration —
Llama-3-8B + the paper's ViT3D — is counted in a fraction of a second on any machine.

Parameters (`count_parameters`): vision tower, projector and language model (with lm_head) from the built modules;
LoRA adapters as PEFT adds them, r * (in + out) per targeted Linear (no bias), and PEFT's trainable copy of the
projector (`modules_to_save`). What each stage trains (`ParameterCounts.trainable`): stage 1 the projector; stage 2
the projector and the LLM, fully or through LoRA; the ViT3D only with `tune_vision_tower`.

Memory per GPU (`estimate_memory`), model states as in the ZeRO paper (Rajbhandari et al. 2020), which DeepSpeed's
ZeRO documentation follows, with Adam:
    precision "bf16"/"fp16" (mixed precision): weights 2 B/param; per trainable param gradients 2 B and optimizer
        12 B (fp32 master copy 4 + momentum 4 + variance 4);
    precision "fp32": weights 4 B/param; per trainable param gradients 4 B, optimizer 8 B (momentum + variance).
    Frozen parameters hold weights only. ZeRO stage 1 partitions the optimizer states over the GPUs, stage 2 also
    the gradients, stage 3 also the weights (frozen ones included); stage 0 = plain data parallel. Stage 3 also
    holds the largest layer gathered whole (its weights and gradients: 4 B/param in 16 bits, as DeepSpeed's
    `estimate_zero3_model_states_mem_needs` counts).
    Not counted: DeepSpeed's communication buckets and fp32 gradient copies, the CUDA context (~0.5-1 GB),
    allocator fragmentation. HF Trainer's --bf16 *without* DeepSpeed is autocast over fp32 weights: use "fp32".
Activations (`estimate_activations`) are a **coarse** estimate, reported on their own line: the LLM's decoder
layers with fused attention (no sequence^2 term), the tensors a Llama layer keeps for backward, about
(8 hidden + 2 kv + 4 intermediate) 16-bit values per token per layer, or only each layer's input under gradient
checkpointing (plus one layer recomputed), and the logits: 16-bit output, its fp32 upcast for the loss and the
fp32 gradient (10 B per logit). The frozen tower keeps no activations (nothing upstream needs a gradient).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlavaConfig

from llava_brain.model.brain_llava import brain_llava_config
from llava_brain.model.vit3d import DEFAULT_GRID, ViT3DConfig

GIB = 1024**3
# Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json); 8,030,261,248 parameters.
LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
)  # fmt: skip
# LLaVA's --lora_enable: every Linear of the LLM (its find_all_linear_names skips projector, tower and lm_head);
# LLaVA's recipes use r 128, alpha 256.
LORA_TARGET_MODULES = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
LORA_R, LORA_ALPHA = 128, 256
STAGES = ("stage1", "stage2", "stage2_lora")
PRECISIONS = ("fp32", "bf16", "fp16")
# bytes per parameter: (weights, gradients, optimizer states), Adam
BYTES_PER_PARAM = {"fp32": (4, 4, 8), "bf16": (2, 2, 12), "fp16": (2, 2, 12)}


def paper_vit3d_config(*, num_active_patches: int | None = None) -> ViT3DConfig:
    """The paper's ViT3D: 16 layers, 768 wide, 12 heads, patch 14, grid 81 x 104 x 83 (subj01, NSD's X, Y, Z)
    -> a padded 6 x 8 x 6 = 288-patch grid; CLIP 768, VAE 4 x 64 x 64, heads 1024 wide.

    num_active_patches: how many patches become tokens (the union mask decides; real NSD's is not counted here,
        the simulated NSD-like mask of docs/vit3d.md gives 72). None = all 288 (289 tokens: the upper bound).
        Parameters do not depend on it (position embeddings cover the full grid); the LLM's sequence does.
    """
    config = ViT3DConfig(grid=DEFAULT_GRID)
    if num_active_patches is not None:
        if not 1 <= num_active_patches <= config.num_patches_total:
            raise ValueError(f"num_active_patches must be in [1, {config.num_patches_total}]")
        # Which patches are active changes neither parameters nor token count; the first n stand for any n.
        config = ViT3DConfig(grid=DEFAULT_GRID, active_patches=list(range(num_active_patches)))
    return config


def llama3_8b_config(*, added_tokens: int = 1) -> LlamaConfig:
    """Llama-3-8B's config; `added_tokens` rows more in the embeddings and lm_head (build_brain_llava adds <image>)."""
    return LlamaConfig(**{**LLAMA3_8B, "vocab_size": LLAMA3_8B["vocab_size"] + added_tokens})


def full_scale_config(*, num_active_patches: int | None = None, added_tokens: int = 1) -> LlavaConfig:
    """The paper's Brain-LLaVA: Llama-3-8B + the paper's ViT3D; `<image>` is the first added token id."""
    return brain_llava_config(paper_vit3d_config(num_active_patches=num_active_patches),
                              llama3_8b_config(added_tokens=added_tokens),
                              image_token_id=LLAMA3_8B["vocab_size"])  # fmt: skip


def meta_model(config: LlavaConfig):
    """`LlavaForConditionalGeneration(config)` on the meta device: every module and shape, no storage."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        return LlavaForConditionalGeneration(config)


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of a Brain-LLaVA by part, and the LoRA adapters of one LoRA setting."""

    vision_tower: int
    projector: int
    language_model: int  # decoder + lm_head (tied weights counted once)
    lora: int  # adapter parameters added by LoRA (r, targets below)
    lora_r: int
    lora_alpha: int
    largest_layer: int  # parameters of the largest module's own tensors (ZeRO-3 gathers a module whole)

    @property
    def total(self) -> int:
        return self.vision_tower + self.projector + self.language_model

    def trainable(self, stage: str, *, tune_vision_tower: bool = False) -> int:
        """Parameters that get gradients in `stage` ("stage1", "stage2", "stage2_lora")."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        tower = self.vision_tower if tune_vision_tower else 0
        return tower + self.projector + {"stage1": 0, "stage2": self.language_model, "stage2_lora": self.lora}[stage]

    def total_in(self, stage: str) -> int:
        """Parameters held in memory in `stage`: a LoRA run adds the adapters and PEFT's copy of the projector."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        return self.total + (self.lora + self.projector if stage == "stage2_lora" else 0)


def lora_parameters(language_model: torch.nn.Module, *, r: int, target_modules: str, prefix: str) -> int:
    """r * (in_features + out_features) summed over the Linear layers whose full name matches `target_modules`
    (PEFT's regex rule: re.fullmatch on the module name); `prefix` = the module's name inside the full model."""
    pattern = re.compile(target_modules)
    total = 0
    for name, module in language_model.named_modules():
        full = f"{prefix}.{name}" if name else prefix
        if isinstance(module, torch.nn.Linear) and pattern.fullmatch(full):
            total += r * (module.in_features + module.out_features)
    return total


def count_parameters(model, *, lora_r: int = LORA_R, lora_alpha: int = LORA_ALPHA,
                     lora_target_modules: str = LORA_TARGET_MODULES) -> ParameterCounts:  # fmt: skip
    """Parameter counts of a (meta or real) Brain-LLaVA `LlavaForConditionalGeneration`."""
    language = model.model.language_model
    llm = {id(p): p.numel() for m in (language, model.lm_head) for p in m.parameters()}  # tied weights: once
    # DeepSpeed's estimate_zero3_model_states_mem_needs_all_live: the module with most parameters of its own.
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return ParameterCounts(
        vision_tower=_numel(model.model.vision_tower),
        projector=_numel(model.model.multi_modal_projector),
        language_model=sum(llm.values()),
        lora=lora_parameters(language, r=lora_r, target_modules=lora_target_modules, prefix="model.language_model"),
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        largest_layer=largest,
    )


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU: model states (weights, gradients, optimizer) and a coarse activation estimate."""

    weights: int
    gradients: int
    optimizer: int
    gathered: int  # ZeRO-3: the largest layer held whole while it computes
    activations: int
    precision: str
    zero_stage: int
    num_gpus: int

    @property
    def model_states(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.gathered

    @property
    def total(self) -> int:
        return self.model_states + self.activations

    def lines(self) -> list[str]:
        """Human-readable breakdown in GiB (what --dry-run prints)."""
        where = f"{self.precision}, ZeRO stage {self.zero_stage}, {self.num_gpus} GPU(s)"
        rows = [("weights", self.weights), ("gradients", self.gradients), ("optimizer (Adam)", self.optimizer)]
        if self.gathered:
            rows.append(("ZeRO-3 gathered layer", self.gathered))
        rows += [("model states", self.model_states), ("activations (coarse)", self.activations),
                 ("total per GPU", self.total)]  # fmt: skip
        return [f"memory per GPU ({where}):"] + [f"  {name:<22} {value / GIB:9.2f} GiB" for name, value in rows]


def estimate_memory(params: int, trainable: int, precision: str = "bf16", zero_stage: int = 0, num_gpus: int = 1,
                    *, largest_layer: int = 0, activations: int = 0) -> MemoryEstimate:  # fmt: skip
    """Bytes per GPU of training `params` parameters of which `trainable` get gradients (module docstring).

    largest_layer: parameters of the largest tensor (only counted under ZeRO stage 3).
    activations: bytes of activations per GPU (e.g. `estimate_activations`), added as they are.
    Partitioned quantities are divided over num_gpus rounding up (a partition holds whole parameters).
    """
    if precision not in BYTES_PER_PARAM:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    if num_gpus < 1 or not 0 <= trainable <= params:
        raise ValueError(f"need num_gpus >= 1 and 0 <= trainable <= params; got {num_gpus}, {trainable}, {params}")
    w, g, o = BYTES_PER_PARAM[precision]

    def share(nbytes: int, partitioned: bool) -> int:
        return math.ceil(nbytes / num_gpus) if partitioned else nbytes

    return MemoryEstimate(
        weights=share(w * params, zero_stage >= 3),
        gradients=share(g * trainable, zero_stage >= 2),
        optimizer=share(o * trainable, zero_stage >= 1),
        gathered=(w + g) * largest_layer if zero_stage == 3 else 0,
        activations=int(activations),
        precision=precision,
        zero_stage=zero_stage,
        num_gpus=num_gpus,
    )


def estimate_activations(text_config, *, batch_size: int, seq_len: int, gradient_checkpointing: bool,
                         bytes_per_value: int = 2) -> int:  # fmt: skip
    """Coarse activation bytes per GPU of the LLM for `batch_size` sequences of `seq_len` tokens (module docstring).

    Per token and layer about (8 h + 2 kv + 4 i) values are kept (h hidden, kv = key/value width, i intermediate);
    with gradient checkpointing each layer keeps its input (h values) and one layer is recomputed in full.
    Logits: 10 B per token and vocabulary entry.
    """
    h, i, layers = text_config.hidden_size, text_config.intermediate_size, text_config.num_hidden_layers
    heads = text_config.num_attention_heads
    kv = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or h // heads
    tokens = batch_size * seq_len
    per_layer = bytes_per_value * (8 * h + 2 * kv * head_dim + 4 * i) * tokens
    decoder = (layers * bytes_per_value * h * tokens + per_layer) if gradient_checkpointing else layers * per_layer
    return decoder + 10 * tokens * text_config.vocab_size


def config_from_parts(vision_tower, llm) -> LlavaConfig:
    """The LlavaConfig that `build_brain_llava(vision_tower, llm)` would build, from the configs and tokenizer only
    (no weights are read): the vocabulary grows by `<image>` when the tokenizer lacks it."""
    from transformers import AutoConfig, AutoTokenizer

    from llava_brain.data.chat_templates import add_image_token
    from llava_brain.model.brain_llava import vit3d_folder

    vision = ViT3DConfig.from_pretrained(vit3d_folder(vision_tower))
    text = AutoConfig.from_pretrained(str(llm))
    tokenizer = AutoTokenizer.from_pretrained(str(llm))
    image_token_id = add_image_token(tokenizer)
    text.vocab_size = max(int(text.vocab_size), len(tokenizer))
    return brain_llava_config(vision, text, image_token_id=image_token_id)


@dataclass(frozen=True)
class DryRun:
    """What a training run would hold: parameter counts, the stage's trainable count and the memory per GPU."""

    counts: ParameterCounts
    stage: str
    tune_vision_tower: bool
    memory: MemoryEstimate
    seq_len: int
    batch_size: int

    @property
    def total(self) -> int:
        return self.counts.total_in(self.stage)

    @property
    def trainable(self) -> int:
        return self.counts.trainable(self.stage, tune_vision_tower=self.tune_vision_tower)

    def lines(self) -> list[str]:
        c = self.counts
        parts = f"vision tower {c.vision_tower:,}, projector {c.projector:,}, language model {c.language_model:,}"
        lora = f", LoRA r={c.lora_r} alpha={c.lora_alpha} ({c.lora:,} adapter parameters)"
        share = 100 * self.trainable / self.total
        tower = "tuned" if self.tune_vision_tower else "frozen"
        return [
            f"parameters: {parts}",
            f"{self.stage}{lora if self.stage == 'stage2_lora' else ''}, vision tower {tower}: total {self.total:,}, "
            f"trainable {self.trainable:,} ({share:.2f}%)",
            *self.memory.lines(),
            f"  (activations: batch {self.batch_size} per GPU x {self.seq_len} tokens; a coarse estimate)",
        ]


def dry_run(config: LlavaConfig, *, stage: str, precision: str = "bf16", zero_stage: int = 0, num_gpus: int = 1,
            batch_size: int = 1, seq_len: int = 2048, gradient_checkpointing: bool = False,
            tune_vision_tower: bool = False, lora_r: int = LORA_R, lora_alpha: int = LORA_ALPHA,
            lora_target_modules: str = LORA_TARGET_MODULES) -> DryRun:  # fmt: skip
    """Build `config` on the meta device and estimate a training stage's parameters and memory per GPU.

    batch_size: sequences per GPU per micro-batch; seq_len: tokens per sequence (LLaVA pads to the longest in the
    batch, at most --model_max_length, 2048 by default: the worst case).
    """
    counts = count_parameters(meta_model(config), lora_r=lora_r, lora_alpha=lora_alpha,
                              lora_target_modules=lora_target_modules)  # fmt: skip
    bytes_per_value = BYTES_PER_PARAM.get(precision, (4,))[0]
    activations = estimate_activations(config.text_config, batch_size=batch_size, seq_len=seq_len,
                                       gradient_checkpointing=gradient_checkpointing,
                                       bytes_per_value=bytes_per_value)  # fmt: skip
    trainable = counts.trainable(stage, tune_vision_tower=tune_vision_tower)
    memory = estimate_memory(counts.total_in(stage), trainable, precision, zero_stage, num_gpus,
                             largest_layer=counts.largest_layer, activations=activations)  # fmt: skip
    return DryRun(counts, stage, tune_vision_tower, memory, seq_len, batch_size)
