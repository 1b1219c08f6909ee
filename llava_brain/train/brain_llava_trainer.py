"""Brain-LLaVA on the HF Trainer: what each stage trains, stage 1's projector in stage 2, LoRA, the final folder.

Stages (the paper's, in LLaVA's flags; `llava_brain.train.llava_args`):
  1. `--tune_mm_mlp_adapter True`: only the projector trains; the LLM and the ViT3D are frozen.
  2. `--pretrain_mm_mlp_adapter <stage-1 output>`: the projector starts from stage 1's weights (copied exactly),
     the projector and the LLM train, fully or through LoRA (`--lora_enable True`: PEFT adapters on every Linear
     of the LLM, the projector trained whole as a `modules_to_save` copy).
The ViT3D stays frozen in both unless `--tune_vision_tower True`.

Outputs under `--output_dir`: the Trainer's `checkpoint-<step>/` folders (what `--resume` continues from),
`final/` (the Brain-LLaVA folder of `save_brain_llava`: loads with `load_brain_llava` or
`AutoModelForImageTextToText`; for a LoRA run the adapters merged into the LLM), `adapter/` for a LoRA run
(PEFT's adapter files and the processor) and `run.json`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from llava_brain.errors import BadInputError
from llava_brain.model.brain_llava import VIT3D_FINAL, projector_of, save_brain_llava, vision_tower_of

FINAL = VIT3D_FINAL  # the finished model: <output_dir>/final, as pretrain_vit3d.py's
ADAPTER = "adapter"  # a LoRA run's PEFT adapter: <output_dir>/adapter
# The projector's keys in a saved Brain-LLaVA: "multi_modal_projector.linear_1.weight" (transformers writes LLaVA's
# original checkpoint names) or "model.multi_modal_projector...." (the module names).
PROJECTOR_KEY = "multi_modal_projector."
STAGES = ("stage1", "stage2", "stage2_lora")


def stage_of(model_args, training_args) -> str:
    """ "stage1" (projector only), "stage2" (projector + LLM) or "stage2_lora" (projector + LoRA adapters)."""
    if model_args.tune_mm_mlp_adapter:
        return "stage1"
    return "stage2_lora" if training_args.lora_enable else "stage2"


# Stage 1's projector ------------------------------------------------------------------------------


def projector_file(path: str | Path) -> Path:
    """The safetensors file holding a stage-1 projector: `path` itself (a .safetensors file), or the
    model.safetensors of a Brain-LLaVA folder (`path`, or `path/final` for a stage-1 --output_dir)."""
    path = Path(path)
    if path.is_file():
        return path
    for folder in (path / FINAL, path):
        if (folder / "model.safetensors").is_file():
            return folder / "model.safetensors"
    raise BadInputError(path, "expected a stage-1 output: its --output_dir (with final/), a Brain-LLaVA folder or "
                              "its model.safetensors")  # fmt: skip


def load_projector(model, path: str | Path) -> Path:
    """Copy the projector weights of a stage-1 output (`projector_file`) into `model`'s projector, exactly.
    A file without every projector tensor, or with other shapes, is a BadInputError naming it."""
    file = projector_file(path)
    projector = projector_of(model)
    try:
        with safe_open(str(file), framework="pt") as f:
            state = {k.split(PROJECTOR_KEY, 1)[1]: f.get_tensor(k) for k in f.keys() if PROJECTOR_KEY in k}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own error types for a broken file
        raise BadInputError(file, f"expected a safetensors file of a Brain-LLaVA ({type(err).__name__})") from None
    expected = projector.state_dict()
    if sorted(state) != sorted(expected):
        raise BadInputError(file, f"expected the projector tensors {sorted(expected)} named *{PROJECTOR_KEY}*; "
                                  f"found {sorted(state) or 'none'}")  # fmt: skip
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise BadInputError(file, f"projector tensor {name} is {tuple(tensor.shape)}; this model's is "
                                      f"{tuple(expected[name].shape)} (another vision tower or LLM?)")  # fmt: skip
    projector.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    return file


# Freezing and LoRA --------------------------------------------------------------------------------


def prepare_model(model, model_args, training_args):
    """Set what trains in this stage (module docstring); returns the model to train (a PEFT model with LoRA).

    Stage 2 loads `--pretrain_mm_mlp_adapter` first, so the projector (and PEFT's copy of it) starts from stage 1.
    """
    stage = stage_of(model_args, training_args)
    if model_args.pretrain_mm_mlp_adapter:
        load_projector(model, model_args.pretrain_mm_mlp_adapter)
    model.requires_grad_(False)
    if stage == "stage2_lora":
        from peft import LoraConfig, get_peft_model

        from llava_brain.model.memory import LORA_TARGET_MODULES

        config = LoraConfig(r=training_args.lora_r, lora_alpha=training_args.lora_alpha,
                            lora_dropout=training_args.lora_dropout, target_modules=LORA_TARGET_MODULES,
                            modules_to_save=["multi_modal_projector"], bias="none")  # fmt: skip
        model = get_peft_model(model, config)  # adapters and the projector copy train, the rest is frozen
    else:
        projector_of(model).requires_grad_(True)
        if stage == "stage2" and not model_args.freeze_backbone:
            model.model.language_model.requires_grad_(True)
            model.lm_head.requires_grad_(True)
    if model_args.tune_vision_tower:
        vision_tower_of(model).requires_grad_(True)
    if training_args.gradient_checkpointing:
        # LLaVA's step: with frozen embeddings no input of a checkpointed layer asks for a gradient.
        model.enable_input_require_grads()
    return model


def trainable_names(model) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


# The Trainer --------------------------------------------------------------------------------------


def announce_checkpoint(folder: str | Path, step: int) -> None:
    """Say that a checkpoint is complete on disk (what `--resume` would continue from)."""
    print(f"checkpoint saved: {folder} (step {step})", flush=True)


class AnnounceCheckpoints(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            announce_checkpoint(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step)


class EpochLengthGroupedSampler(LengthGroupedSampler):
    """LengthGroupedSampler whose order is a function of (seed, epoch) only: every process draws the same order,
    and a resumed run redraws the order of the epoch it resumes in (the Trainer calls `set_epoch`), where the
    stock sampler's generator would start over at epoch 0's order."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()


class BrainLlavaTrainer(Trainer):
    """The HF Trainer with LLaVA's two additions: `--group_by_modality_length` batches records of similar length
    (the dataset's `modality_lengths`: the SFT records are no `datasets.Dataset`, so the stock
    `group_by_length` strategy would tokenize every record to measure it), and `--mm_projector_lr`."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if getattr(self.args, "group_by_modality_length", False) and hasattr(dataset, "modality_lengths"):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return EpochLengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                             lengths=list(dataset.modality_lengths), seed=seed)  # fmt: skip
        return super()._get_train_sampler(train_dataset)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Resume a full (non-PEFT, non-DeepSpeed) model through `from_pretrained`: transformers 5.24 saves LLaVA
        under its original checkpoint names (`multi_modal_projector.*`, `language_model.model.*`), which the stock
        `load_state_dict(strict=False)` here does not map back, so it would silently resume from the initial
        weights. `from_pretrained` applies the mapping; the strict copy fails loudly on any name left over."""
        model = self.model if model is None else model
        folder = Path(resume_from_checkpoint)
        if hasattr(model, "peft_config") or self.is_fsdp_enabled or not (folder / "config.json").is_file():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        saved = type(model).from_pretrained(folder, dtype=model.dtype)
        model.load_state_dict(saved.state_dict(), strict=True)
        del saved

    def create_optimizer(self, model=None):
        if self.optimizer is not None or self.args.mm_projector_lr is None:
            return super().create_optimizer(model)
        model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(model))
        groups: dict[tuple[bool, bool], list] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                groups.setdefault(("multi_modal_projector" in name, name in decay), []).append(p)
        params = [{"params": ps, "weight_decay": self.args.weight_decay if wd else 0.0,
                   **({"lr": self.args.mm_projector_lr} if proj else {})}
                  for (proj, wd), ps in groups.items()]  # fmt: skip
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_cls(params, **optimizer_kwargs)
        return self.optimizer


# The final folder ---------------------------------------------------------------------------------


def save_final(model, processor, output_dir: str | Path, *, state_dict: dict | None = None) -> Path:
    """Write `<output_dir>/final` (a Brain-LLaVA folder; LoRA merged in) and, for a PEFT model,
    `<output_dir>/adapter`. Returns the final folder. Each folder is written atomically.

    state_dict: the whole weights when the model's own are partitioned (DeepSpeed ZeRO-3: the gathered state dict
    of `accelerator.get_state_dict`); None saves the model's parameters (`save_brain_llava`)."""
    from llava_brain.io import staged_folder

    output_dir = Path(output_dir)
    if hasattr(model, "merge_and_unload"):
        with staged_folder(output_dir / ADAPTER) as staging:
            model.save_pretrained(staging)
            processor.save_pretrained(staging)
        model = model.merge_and_unload()
    model.requires_grad_(False)
    if state_dict is None:
        return save_brain_llava(model, processor, output_dir / FINAL)
    with staged_folder(output_dir / FINAL) as staging:  # save_brain_llava's two steps, with the gathered weights
        model.save_pretrained(staging, state_dict=state_dict)
        processor.save_pretrained(staging)
    return output_dir / FINAL
