"""Train Brain-LLaVA on the HF Trainer: `python -m llava_brain.train` with LLaVA's flags (docs/brain_llava_training.md).

Stage 1 (projector only) then stage 2 (projector + LLM, starting from stage 1's projector). Every flag is accepted
in LLaVA's spelling and in kebab-case, and every TrainingArguments flag works (`llava_brain.train.llava_args`).

Full scale (8 GPUs, the paper's settings; scripts/brain_llava/pretrain_adapter.sh and llava_adapter.sh):
    torchrun --nproc_per_node 8 -m llava_brain.train --deepspeed scripts/zero2.json \\
        --model_name_or_path meta-llama/Meta-Llama-3-8B-Instruct --chat_template llama3 \\
        --vision_tower $DATASET_ROOT/runs/vit3d --data_path $DATASET_ROOT/sft/sft_data_tr.json \\
        --dataset_root $DATASET_ROOT --tune_mm_mlp_adapter True --mm_projector_type mlp2x_gelu \\
        --per_device_train_batch_size 4 --learning_rate 1e-3 --num_train_epochs 1 --bf16 True \\
        --gradient_checkpointing True --output_dir $DATASET_ROOT/runs/brain_llava/stage1
    (add --dry_run True to print parameters and memory per GPU without loading any weight)
Tiny (demo root, CPU; scripts/demo.sh step 19 runs both stages this way):
    python -m llava_brain.train --model_name_or_path demo_out/tiny_models/llm --vision_tower demo_out/root/runs/vit3d \\
        --mm_vision_select_layer -1 --data_path demo_out/root/nsd/sft_data_tr.json --data_types brief_description \\
        --dataset_root demo_out/root --tune_mm_mlp_adapter True --per_device_train_batch_size 16 \\
        --learning_rate 3e-3 --max_steps 100 --use_cpu True --report_to none --output_dir /tmp/brain_llava/stage1

Several CPU processes (gloo): `torchrun --nproc_per_node 2 -m llava_brain.train ... --use_cpu True` (or
`accelerate launch --multi_gpu --num_processes 2 -m llava_brain.train ...` with ACCELERATE_USE_CPU=true).
Outputs: <output_dir>/checkpoint-*/ (resume a killed run with --resume True), <output_dir>/final/ (the model),
<output_dir>/adapter/ (LoRA runs) and <output_dir>/run.json. A rerun over a finished run with the same settings
skips (other settings are refused; --overwrite True trains again). Bad input exits 2 with one line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from transformers import HfArgumentParser

from llava_brain.errors import BadInputError, exits_on_bad_input, require_file
from llava_brain.train.llava_args import BrainLlavaTrainingArguments, DataArguments, ModelArguments

CHAT_TEMPLATE_OF_VERSION = {"v1": "vicuna_v1", "vicuna_v1": "vicuna_v1", "llava_llama_3": "llama3", "llama3": "llama3"}


def build_parser(add_help: bool = True) -> HfArgumentParser:
    """LLaVA's three argument groups; `--snake_case` and `--kebab-case` spellings both parse."""
    return HfArgumentParser((ModelArguments, DataArguments, BrainLlavaTrainingArguments), add_help=add_help)


def zero_stage_of(deepspeed) -> int:
    """zero_optimization.stage of a --deepspeed config (a JSON file or an already-parsed dict); 0 without one."""
    if not deepspeed:
        return 0
    if isinstance(deepspeed, dict):
        config = deepspeed
    else:
        path = require_file(deepspeed, "a DeepSpeed JSON config (scripts/zero2.json, scripts/zero3.json)")
        try:
            config = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadInputError(path, f"expected a DeepSpeed JSON config ({err})") from None
    stage = config.get("zero_optimization", {}).get("stage", 0) if isinstance(config, dict) else None
    if stage not in (0, 1, 2, 3):
        raise BadInputError(deepspeed, f"zero_optimization.stage must be 0, 1, 2 or 3; found {stage!r}")
    return int(stage)


def precision_of(ns) -> str:
    """The weights' precision as the memory estimate counts it: 16-bit only under DeepSpeed (which keeps fp32
    master weights in its optimizer); the Trainer's plain --bf16/--fp16 is autocast over fp32 weights."""
    if ns.deepspeed and (ns.bf16 or ns.fp16):
        return "bf16" if ns.bf16 else "fp16"
    return "fp32"


def _stage_name(ns) -> str:
    if ns.tune_mm_mlp_adapter:
        return "stage1"
    return "stage2_lora" if ns.lora_enable else "stage2"


def print_dry_run(ns) -> None:
    """Build the configured model on the meta device from its config files (no weight is read) and print its
    parameters and the memory per GPU of the configured stage, precision, ZeRO stage and GPU count."""
    from llava_brain.model import memory

    config = memory.config_from_parts(ns.vision_tower, ns.model_name_or_path)
    report = memory.dry_run(config, stage=_stage_name(ns), precision=precision_of(ns),
                            zero_stage=zero_stage_of(ns.deepspeed), num_gpus=ns.num_gpus,
                            batch_size=ns.per_device_train_batch_size, seq_len=ns.model_max_length,
                            gradient_checkpointing=bool(ns.gradient_checkpointing),
                            tune_vision_tower=bool(ns.tune_vision_tower), lora_r=ns.lora_r,
                            lora_alpha=ns.lora_alpha)  # fmt: skip
    print(f"dry run: {ns.model_name_or_path} + {ns.vision_tower} (meta device, no weights loaded)")
    print("\n".join(report.lines()))


def _check(parser, ns) -> None:
    for flag in ("model_name_or_path", "vision_tower"):
        if not getattr(ns, flag):
            parser.error(f"--{flag} is required")
    if ns.mm_projector_type != "mlp2x_gelu":
        parser.error(f"--mm_projector_type {ns.mm_projector_type}: only mlp2x_gelu (transformers' LLaVA projector)")
    if ns.tune_mm_mlp_adapter and (ns.lora_enable or ns.pretrain_mm_mlp_adapter):
        parser.error("--tune_mm_mlp_adapter (stage 1) goes with neither --lora_enable nor --pretrain_mm_mlp_adapter")
    if ns.lora_enable and zero_stage_of(ns.deepspeed) == 3:
        parser.error("--lora_enable with ZeRO-3: merging the adapters needs whole weights; use scripts/zero2.json")
    if ns.version and ns.version not in CHAT_TEMPLATE_OF_VERSION:
        parser.error(f"--version {ns.version}: one of {sorted(CHAT_TEMPLATE_OF_VERSION)}")
    if not ns.dry_run:
        for flag in ("data_path", "dataset_root"):
            if not getattr(ns, flag):
                parser.error(f"--{flag} is required (except with --dry_run)")


def last_checkpoint(output_dir: str | Path, resume: bool) -> str | None:
    """The checkpoint to continue from: the last one with --resume; refuses to start over checkpoints without it."""
    from transformers.trainer_utils import get_last_checkpoint

    found = get_last_checkpoint(str(output_dir)) if Path(output_dir).is_dir() else None
    if found and not resume:
        raise BadInputError(output_dir, f"holds checkpoints (last: {Path(found).name}); pass --resume True to "
                                        "continue, or choose another --output_dir")  # fmt: skip
    return found


# Settings whose change makes a finished --output_dir stale (logging, saving and the like do not).
RERUN_KEYS = ("learning_rate", "mm_projector_lr", "max_steps", "num_train_epochs", "per_device_train_batch_size",
              "gradient_accumulation_steps", "weight_decay", "warmup_ratio", "lr_scheduler_type", "seed", "bf16",
              "fp16", "lora_enable", "lora_r", "lora_alpha", "lora_dropout", "model_max_length")  # fmt: skip


def finished_run(model_args, data_args, training_args) -> Path | None:
    """<output_dir>/final when a finished run there has these settings (a rerun skips it); None when there is none
    or --overwrite. A finished run with other settings is refused (BadInputError naming the first difference)."""
    from llava_brain.train import brain_llava_trainer as bt

    out = Path(training_args.output_dir)
    manifest, final = out / "run.json", out / bt.FINAL / "config.json"
    if training_args.overwrite or not (manifest.is_file() and final.is_file()):
        return None
    stored = json.loads(manifest.read_text()).get("arguments", {})
    wanted = {**vars(model_args), **vars(data_args)}
    wanted.update({k: getattr(training_args, k) for k in RERUN_KEYS})
    for key, value in wanted.items():
        if key in stored and stored[key] != value and not (key == "warmup_ratio" and stored[key] in (None, 0.0)):
            raise BadInputError(manifest, f"records a finished run with {key}={stored[key]!r}, not {value!r}; "
                                          "pass --overwrite True to train again, or another --output_dir")  # fmt: skip
    return final.parent


def train(model_args, data_args, training_args) -> Path:
    import torch

    from llava_brain.data.sft_dataset import SftCollator, SftDataset
    from llava_brain.io import write_run_json
    from llava_brain.model.brain_llava import build_brain_llava
    from llava_brain.train import brain_llava_trainer as bt

    resume_from = training_args.resume_from_checkpoint or last_checkpoint(
        training_args.output_dir, training_args.resume
    )
    dtype = torch.float32
    if training_args.deepspeed and (training_args.bf16 or training_args.fp16):
        dtype = torch.bfloat16 if training_args.bf16 else torch.float16
    template = model_args.chat_template or CHAT_TEMPLATE_OF_VERSION.get(model_args.version or "")
    model, processor = build_brain_llava(
        model_args.vision_tower,
        model_args.model_name_or_path,
        chat_template=template,
        seed=training_args.seed,
        torch_dtype=dtype,
    )
    model.config.vision_feature_layer = model_args.mm_vision_select_layer
    use_cache = model.config.text_config.use_cache  # off while training (no KV cache to build), back for generation
    model.config.text_config.use_cache = False
    datasets = {}
    for name, path in (("train", data_args.data_path), ("eval", data_args.eval_data_path)):
        if path:
            require_file(path, "an SFT file of generate_sft_data.py (LLaVA JSON records)")
            datasets[name] = SftDataset(path, data_args.dataset_root, processor.tokenizer, grid=processor.grid,
                                        num_image_tokens=processor.num_tokens,
                                        max_length=training_args.model_max_length,
                                        types=data_args.data_types)  # fmt: skip
    model = bt.prepare_model(model, model_args, training_args)
    trainer = bt.BrainLlavaTrainer(model=model, args=training_args, train_dataset=datasets["train"],
                                   eval_dataset=datasets.get("eval"),
                                   data_collator=SftCollator(pad_token_id=processor.tokenizer.pad_token_id),
                                   callbacks=[bt.AnnounceCheckpoints()])  # fmt: skip
    trainer.train(resume_from_checkpoint=resume_from)
    trainer.accelerator.wait_for_everyone()
    final = Path(training_args.output_dir) / bt.FINAL
    state_dict = None
    if trainer.is_deepspeed_enabled and zero_stage_of(training_args.deepspeed) == 3:
        # Collective (every rank): gathers the partitioned 16-bit weights (stage3_gather_16bit_weights_on_model_save).
        state_dict = trainer.accelerator.get_state_dict(trainer.deepspeed)
    if trainer.is_world_process_zero():
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        model.config.text_config.use_cache = use_cache
        final = bt.save_final(unwrapped, processor, training_args.output_dir, state_dict=state_dict)
        arguments = {**vars(model_args), **vars(data_args), **training_args.to_dict()}
        write_run_json(training_args.output_dir, arguments, stage=bt.stage_of(model_args, training_args),
                       world_size=trainer.args.world_size, global_step=trainer.state.global_step,
                       resumed_from=resume_from, trainable=bt.trainable_names(model))  # fmt: skip
        print(f"wrote {final}")
    trainer.accelerator.wait_for_everyone()
    return final


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = sys.argv[1:] if argv is None else list(argv)
    ns = parser.parse_args(args)  # argparse only: no TrainingArguments (nor deepspeed import) for --dry_run
    _check(parser, ns)
    from llava_brain.model.brain_llava import vit3d_folder

    vit3d_folder(ns.vision_tower)  # a missing or wrong tower folder stops here, with one line
    if ns.dry_run:
        print_dry_run(ns)
        return 0
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args)
    done = finished_run(model_args, data_args, training_args)
    if done is not None:
        print(f"already trained with these settings: {done} (pass --overwrite True to train again)")
        return 0
    train(model_args, data_args, training_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
