#!/usr/bin/env bash
# Per-image annotations of the prepared NSD images: BLIP-2 captions (8 per image), DETR objects,
# CLIP ViT-L/14 image embeddings (+ tokens) and Stable unCLIP VAE latents, sharded over the GPUs of
# one node with accelerate. Each stage resumes where a killed run stopped. Details: docs/annotate.md.
set -euo pipefail

DATASET_ROOT=${DATASET_ROOT:-/data/brain}   # written by scripts/nsd/10_prepare.sh
NUM_GPUS=${NUM_GPUS:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
LAUNCH=(accelerate launch --multi_gpu --num_processes "$NUM_GPUS" --num_machines 1 --mixed_precision no --dynamo_backend no)
if [ "$NUM_GPUS" -eq 1 ]; then LAUNCH=(python); fi

"${LAUNCH[@]}" prepare_datasets/generate_captions.py \
  --dataset-root "$DATASET_ROOT" \
  --subject all \
  --model Salesforce/blip2-opt-2.7b \
  --num-captions 8 \
  --max-new-tokens 30 \
  --top-p 0.9 \
  --temperature 1.0 \
  --precision fp16 \
  --batch-size 32

"${LAUNCH[@]}" prepare_datasets/object_detection.py \
  --dataset-root "$DATASET_ROOT" \
  --subject all \
  --model facebook/detr-resnet-101 \
  --threshold 0.9 \
  --precision fp16 \
  --batch-size 32

"${LAUNCH[@]}" prepare_datasets/generate_clip_embeds.py \
  --dataset-root "$DATASET_ROOT" \
  --subject all \
  --clip-model openai/clip-vit-large-patch14 \
  --tokens \
  --vae-model stabilityai/stable-diffusion-2-1-unclip-small \
  --vae-size 512 \
  --precision fp16 \
  --batch-size 64
