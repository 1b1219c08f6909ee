"""The flags of Brain-LLaVA training (`python -m llava_brain.train`), in LLaVA's spelling.

Three dataclasses parsed by transformers' `HfArgumentParser`, as LLaVA's `train.py` does, so that a LLaVA
user's command line works unchanged: every flag is accepted as `--snake_case` and as `--kebab-case`, and
every `TrainingArguments` flag (`--learning_rate`, `--per_device_train_batch_size`, `--bf16`, `--deepspeed`,
`--gradient_checkpointing`, `--save_steps`, `--report_to`, ...) is there because `BrainLlavaTrainingArguments`
is a `TrainingArguments`.

Stages (the paper's two):
  1. `--tune_mm_mlp_adapter True`: only the projector trains (LLM and ViT3D frozen);
  2. `--pretrain_mm_mlp_adapter <stage-1 output>`: the projector starts from stage 1's weights, the projector
     and the LLM train (fully, or LoRA with `--lora_enable True`); the ViT3D stays frozen unless
     `--tune_vision_tower True`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "the LLM: a local folder or hub id of a causal LM and its tokenizer"}
    )
    vision_tower: str | None = field(
        default=None, metadata={"help": "the pretrained ViT3D: a pretrain_vit3d.py --out folder (or its final/)"}
    )
    chat_template: str | None = field(
        default=None,
        metadata={
            "help": "chat template: llama3, vicuna_v1 or a Jinja string with {% generation %} blocks "
            "(default: the tokenizer's own, which must mark assistant turns)"
        },
    )
    version: str | None = field(
        default=None,
        metadata={
            "help": "LLaVA's conversation version, mapped to a chat template: v1 / vicuna_v1 -> vicuna_v1, "
            "llava_llama_3 / llama3 -> llama3 (--chat_template wins)"
        },
    )
    mm_projector_type: str = field(
        default="mlp2x_gelu", metadata={"help": "projector: mlp2x_gelu (2 linear layers, GELU; the only choice)"}
    )
    mm_vision_select_layer: int = field(
        default=-2, metadata={"help": "tower layer whose tokens the LLM reads (-2 = the penultimate, as the paper)"}
    )
    tune_mm_mlp_adapter: bool = field(
        default=False, metadata={"help": "stage 1: train only the projector (LLM and tower frozen)"}
    )
    pretrain_mm_mlp_adapter: str | None = field(
        default=None,
        metadata={"help": "stage 2: start the projector from this stage-1 output folder (or its projector file)"},
    )
    tune_vision_tower: bool = field(default=False, metadata={"help": "also train the ViT3D (frozen in the paper)"})
    freeze_backbone: bool = field(default=False, metadata={"help": "keep the LLM frozen in stage 2 (LLaVA's flag)"})


@dataclass
class DataArguments:
    data_path: str | None = field(
        default=None, metadata={"help": "SFT file of generate_sft_data.py (LLaVA custom-data JSON, sample refs)"}
    )
    dataset_root: str | None = field(
        default=None, metadata={"help": "prepared dataset root the sample references point into"}
    )
    eval_data_path: str | None = field(default=None, metadata={"help": "optional SFT file scored at --eval_steps"})
    data_types: list[str] | None = field(
        default=None,
        metadata={"help": "train (and evaluate) on the records of these types only, e.g. brief_description "
                  "(the `type` field generate_sft_data.py writes); default every record"},
    )  # fmt: skip


@dataclass
class BrainLlavaTrainingArguments(TrainingArguments):
    model_max_length: int = field(default=2048, metadata={"help": "longest tokenized record (tokens)"})
    group_by_modality_length: bool = field(
        default=False, metadata={"help": "batch records of similar length together (LLaVA's flag)"}
    )
    lora_enable: bool = field(default=False, metadata={"help": "stage 2 with LoRA adapters on the LLM"})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    mm_projector_lr: float | None = field(
        default=None, metadata={"help": "learning rate of the projector (default: --learning_rate)"}
    )
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint in --output_dir"})
    overwrite: bool = field(
        default=False, metadata={"help": "train again over a finished --output_dir (default: a rerun with the same "
                                 "settings skips; other settings are refused)"},
    )  # fmt: skip
    dry_run: bool = field(
        default=False, metadata={"help": "build on the meta device, print parameters and memory per GPU, exit"}
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "DDP's unused-parameter search (off: every trainable part runs each step)"}
    )
    warmup_ratio: float | None = field(
        default=None,
        metadata={"help": "LLaVA's warmup share of the training steps (transformers 5 spells it --warmup_steps 0.03)"},
    )
    num_gpus: int = field(default=1, metadata={"help": "--dry_run: GPUs the memory estimate assumes"})

    def __post_init__(self):
        if self.warmup_ratio is not None:  # LLaVA's recipes pass --warmup_ratio; transformers 5 removed the flag
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            self.warmup_steps = self.warmup_ratio
        super().__post_init__()
