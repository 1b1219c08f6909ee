#!/usr/bin/env bash
# Brain-LLaVA stage 1 (feature alignment) in the paper's configuration: only the 2-layer GELU projector trains,
# Llama-3-8B-Instruct and the pretrained ViT3D are frozen; global batch 32 (8 GPUs x 4), 1 epoch, bf16, gradient
# checkpointing, DeepSpeed ZeRO-2 (docs/brain_llava_training.md). The paper does not give stage 1's learning rate:
# 1e-3 is LLaVA's (its pretrain recipe), with LLaVA's warmup 3% and cosine schedule. Not run at this scale here.
# LLM: a hub id or a local folder (LLM=/models/Meta-Llama-3-8B-Instruct); a Vicuna variant: LLM=lmsys/vicuna-7b-v1.5
# CHAT_TEMPLATE=vicuna_v1 (docs/brain_llava_training.md). Check memory first with DRY_RUN="--dry_run True" (no
# weights are loaded); resume a killed run with RESUME="--resume True". Output: $OUT/final (stage 2 reads $OUT).
set -euo pipefail

DATASET_ROOT=${DATASET_ROOT:-/data/brain}
LLM=${LLM:-meta-llama/Meta-Llama-3-8B-Instruct}
CHAT_TEMPLATE=${CHAT_TEMPLATE:-llama3}
VISION_TOWER=${VISION_TOWER:-$DATASET_ROOT/runs/vit3d}
OUT=${OUT:-$DATASET_ROOT/runs/brain_llava/stage1}
NUM_GPUS=${NUM_GPUS:-8}
DRY_RUN=${DRY_RUN:-}
RESUME=${RESUME:-}

# shellcheck disable=SC2086  # DRY_RUN and RESUME are empty or one flag with its value
torchrun --nproc_per_node "$NUM_GPUS" -m llava_brain.train \
  --deepspeed scripts/zero2.json \
  --model_name_or_path "$LLM" \
  --chat_template "$CHAT_TEMPLATE" \
  --vision_tower "$VISION_TOWER" \
  --mm_projector_type mlp2x_gelu \
  --mm_vision_select_layer -2 \
  --tune_mm_mlp_adapter True \
  --data_path "$DATASET_ROOT/nsd/sft_data_tr.json" \
  --dataset_root "$DATASET_ROOT" \
  --group_by_modality_length True \
  --bf16 True \
  --output_dir "$OUT" \
  --num_train_epochs 1 \
  --per_device_train_batch_size 4 \
  --gradient_accumulation_steps 1 \
  --learning_rate 1e-3 \
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
  $DRY_RUN $RESUME
