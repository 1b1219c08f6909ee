#!/usr/bin/env bash
# Concept localization (paper Sec. 4.4, Fig. 8), after scripts/nsd/40_pretrain_vit3d.sh (the patch-14 ViT3D):
#   1. two more ViT3Ds in the paper's configuration with patch sizes 12 and 10 (PATCHES), CLIP head only,
#      runs/vit3d_p12 and runs/vit3d_p10: the ensemble that refines the maps;
#   2. locate_concepts.py for CONCEPTS on SUBJECTS: Grad-CAM of the patch-14 model's CLIP head towards each
#      concept's CLIP text embedding (penultimate layer), averaged with the other two models' maps, over the test
#      images whose COCO captions name the concept; NIfTI maps, slice montages, top voxels and streams-ROI
#      shares per sample and on average, and the zeroing check (top 10% of nsdgeneral vs random voxels);
#   3. with LLAVA=<Brain-LLaVA folder>, the concept texts are its answers to `Locating the concept of "<concept>"`.
# Outputs: $DATASET_ROOT/runs/concepts/ensemble/subjXX_avg/<concept>/ (or $OUT; docs/concepts.md), then
# eval_concepts.py's zeroing-check table in $DATASET_ROOT/runs/eval/concepts_ensemble.json. A rerun skips what is
# current. Time not measured (no GPU was available): two more ViT3D trainings (~8 h each on one A100 in the
# paper's setting), then minutes per concept; disk: at most 2.8 MB per NIfTI map (81 x 104 x 83 float32 before gzip).
#
# METHOD=pattern maps the concept score's signed encoding pattern instead of Grad-CAM (docs/concepts.md), over
# each subject's train and test samples (on NSD ~10,000 images: the training betas are read once per concept).
# On mini-NSD after `make demo` (CPU: 131 s on 2 cores, 41 s for a second METHOD that reuses the two models;
# docs/concepts.md gives what it measured), the concept models trained on subject 1 alone, with the demo's tiny
# configuration (OUT apart per METHOD):
#   DATASET_ROOT=demo_out/root NSD_ROOT=demo_out/mini_nsd CLIP_TEXT=demo_out/tiny_models/clip_text \
#   MAIN=demo_out/root/runs/vit3d OUT=demo_out/root/runs/concepts/ensemble_gradcam \
#   TRAIN_SUBJECTS=1 SUBJECTS=1 CONCEPTS="blue red" PATCHES="5 4" NUM_LAYERS=2 HIDDEN_SIZE=128 NUM_HEADS=8 \
#   HEAD_HIDDEN=256 EPOCHS=10 BATCH_SIZE=32 LR=2e-3 DEVICE=cpu PRECISION=fp32 bash scripts/nsd/70_concepts.sh
set -euo pipefail

DATASET_ROOT=${DATASET_ROOT:-/data/brain}
CLIP_TEXT=${CLIP_TEXT:-openai/clip-vit-large-patch14}
MAIN=${MAIN:-$DATASET_ROOT/runs/vit3d}
TRAIN_SUBJECTS=${TRAIN_SUBJECTS:-all}
SUBJECTS=${SUBJECTS:-"1 2 5 7"}
CONCEPTS=${CONCEPTS:-"person dog surfboard"}
PATCHES=${PATCHES:-"12 10"}
NUM_LAYERS=${NUM_LAYERS:-16}
HIDDEN_SIZE=${HIDDEN_SIZE:-768}
NUM_HEADS=${NUM_HEADS:-12}
HEAD_HIDDEN=${HEAD_HIDDEN:-1024}
EPOCHS=${EPOCHS:-30}
BATCH_SIZE=${BATCH_SIZE:-32}
LR=${LR:-5e-4}
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-bf16}
LLAVA=${LLAVA:-}
METHOD=${METHOD:-gradcam}
OUT=${OUT:-$DATASET_ROOT/runs/concepts/ensemble}
NSD_ROOT=${NSD_ROOT:-}  # a mini-NSD tree: the maps are also scored against its ground truth

ENSEMBLE=()
for PATCH in $PATCHES; do
  ENSEMBLE+=("$DATASET_ROOT/runs/vit3d_p$PATCH")
  # shellcheck disable=SC2086  # TRAIN_SUBJECTS is a list
  python pretrain_vit3d.py \
    --dataset-root "$DATASET_ROOT" \
    --out "$DATASET_ROOT/runs/vit3d_p$PATCH" \
    --subject $TRAIN_SUBJECTS \
    --area nsdgeneral \
    --num-layers "$NUM_LAYERS" \
    --hidden-size "$HIDDEN_SIZE" \
    --num-heads "$NUM_HEADS" \
    --head-hidden "$HEAD_HIDDEN" \
    --patch-size "$PATCH" \
    --no-vae \
    --epochs "$EPOCHS" \
    --batch-size "$BATCH_SIZE" \
    --lr "$LR" \
    --precision "$PRECISION" \
    --device "$DEVICE"
done

# shellcheck disable=SC2086  # SUBJECTS and CONCEPTS are lists
python tools/evaluate/locate_concepts.py \
  --model "$MAIN" \
  --ensemble "${ENSEMBLE[@]}" \
  --clip-text "$CLIP_TEXT" \
  --dataset-root "$DATASET_ROOT" \
  --subject $SUBJECTS \
  --concept $CONCEPTS \
  --layers -2 \
  --method "$METHOD" \
  --device "$DEVICE" \
  --out "$OUT" \
  --from-llava="$LLAVA"

python tools/evaluate/eval_concepts.py \
  --concepts "$OUT" \
  --dataset-root "$DATASET_ROOT" \
  --nsd-root="$NSD_ROOT" \
  --json "$DATASET_ROOT/runs/eval/concepts_$(basename "$OUT").json"
