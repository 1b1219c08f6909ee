#!/usr/bin/env bash
# ViT3D pretraining in the paper's configuration: one model for every prepared subject (1, 2, 5, 7 after
# scripts/nsd/10_prepare.sh; nsdgeneral), 16 layers, width 768, patch 14, CLIP + VAE heads (loss MSE + 1/64
# MSE), lr 5e-4, 30 epochs, batch 32, bf16 mixed precision on one GPU (docs/paper.md; ~8 h on one A100-80GB
# there, not measured here), then the ridge baseline on the same test sets (saved as model.safetensors);
# scripts/nsd/50_evaluate.sh turns both into prediction files and scores them side by side. Position
# embeddings start at std 1.0 (our default; the paper does not say; ViT's 0.02 with --pos-init-std 0.02).
# Outputs: $DATASET_ROOT/runs/vit3d (or $OUT) and $DATASET_ROOT/runs/ridge. A rerun skips what is current;
# resume a killed run with RESUME=--resume. Status: docs/vit3d.md.
set -euo pipefail

DATASET_ROOT=${DATASET_ROOT:-/data/brain}
OUT=${OUT:-$DATASET_ROOT/runs/vit3d}
RESUME=${RESUME:-}

# shellcheck disable=SC2086  # RESUME is empty or one flag
python pretrain_vit3d.py \
  --dataset-root "$DATASET_ROOT" \
  --out "$OUT" \
  --subject all \
  --area nsdgeneral \
  --num-layers 16 \
  --hidden-size 768 \
  --num-heads 12 \
  --patch-size 14 \
  --vae \
  --vae-weight 0.015625 \
  --epochs 30 \
  --batch-size 32 \
  --lr 5e-4 \
  --precision bf16 \
  --device cuda \
  $RESUME

python tools/evaluate/ridge_baseline.py \
  --dataset-root "$DATASET_ROOT" \
  --subject all \
  --area nsdgeneral \
  --target clip
