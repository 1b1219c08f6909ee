#!/usr/bin/env bash
# Brain-LLaVA stage 2 (instruction tuning) in the paper's configuration: the projector starts from stage 1's
# (--pretrain_mm_mlp_adapter, scripts/brain_llava/pretrain_adapter.sh's output), projector and Llama-3-8B-Instruct
# train in full, the ViT3D stays frozen; global batch 24 (8 GPUs x 3), lr 2e-5, 1 epoch, bf16, gradient
# checkpointing, DeepSpeed ZeRO-3 (docs/paper.md; docs/brain_llava_training.md). Not run at this scale here.
# LoRA instead of the full LLM: LORA="--lora_enable True --lora_r 128 --lora_alpha 256" DEEPSPEED=scripts/zero2.json
# (LLaVA's LoRA setting; merging needs whole weights, so ZeRO-2; the merged copy goes to $OUT/final, the adapter to
# $OUT/adapter). Vicuna: LLM=lmsys/vicuna-7b-v1.5
# CHAT_TEMPLATE=vicuna_v1 (and the same in stage 1). Memory first: DRY_RUN="--dry_run True"; a killed run resumes
# with RESUME="--resume True". Output: $OUT/final, the Brain-LLaVA folder (load_brain_llava).
set -euo pipefail

DATASET_ROOT=${DATASET_ROOT:-/data/brain}
LLM=${LLM:-meta-llama/Meta-Llama-3-8B-Instruct}
CHAT_TEMPLATE=${CHAT_TEMPLATE:-llama3}
VISION_TOWER=${VISION_TOWER:-$DATASET_ROOT/runs/vit3d}
STAGE1=${STAGE1:-$DATASET_ROOT/runs/brain_llava/stage1}
OUT=${OUT:-$DATASET_ROOT/runs/brain_llava/stage2}
NUM_GPUS=${NUM_GPUS:-8}
DEEPSPEED=${DEEPSPEED:-scripts/zero3.json}
LORA=${LORA:-}
DRY_RUN=${DRY_RUN:-}
RESUME=${RESUME:-}

# shellcheck disable=SC2086  # LORA, DRY_RUN and RESUME are empty or flags with their values
torchrun --nproc_per_node "$NUM_GPUS" -m llava_brain.train \
  --deepspeed "$DEEPSPEED" \
  --model_name_or_path "$LLM" \
  --chat_template "$CHAT_TEMPLATE" \
  --vision_tower "$VISION_TOWER" \
  --pretrain_mm_mlp_adapter "$STAGE1" \
  --mm_projector_type mlp2x_gelu \
  --mm_vision_select_layer -2 \
  --data_path "$DATASET_ROOT/nsd/sft_data_tr.json" \
  --dataset_root "$DATASET_ROOT" \
  --group_by_modality_length True \
  --bf16 True \
  --output_dir "$OUT" \
  --num_train_epochs 1 \
  --per_device_train_batch_size 3 \
  --gradient_accumulation_steps 1 \
  --learning_rate 2e-5 \
  --weight_decay 0. \
  --warmup_ratio 0.03 \
  --lr_scheduler_type cosine \
  --logging_steps 1 \
  --save_strategy steps \
  --save_steps 500 \
  --save_total_limit 2 \
  --model_max_length 2048 \
  --gradient_checkpointing True \
  --dataloader_num_workers 4 \
  --report_to none \
  --num_gpus "$NUM_GPUS" \
  $LORA $DRY_RUN $RESUME
