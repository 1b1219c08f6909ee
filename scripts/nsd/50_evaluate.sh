#!/usr/bin/env bash
# Evaluation of what exists so far, at full scale (subjects 1, 2, 5, 7; NSD's shared test images, 3 repeats
# averaged and first presentation only), after scripts/nsd/40_pretrain_vit3d.sh:
#   1. prediction files of the ViT3D and of the ridge baseline (runs/predictions/<run>/subjXX_<kind>/)
#   2. retrieval from them: top-1 among all test images and MindEye's 300-image pools, shuffled-fMRI control
#   3. low-level reconstructions: the ViT3D's predicted VAE latents through SD 2.1 unCLIP's VAE (512² PNGs)
#   4. the eight image metrics under the paper's Brain-Diffuser protocol and MindEye's 256² protocol
#   5. captions by retrieval (the COCO caption of the nearest training image; a baseline until the LLM
#      exists) against COCO and BLIP-2 references
#   6. one report: runs/eval/report/report.md (the paper's Table 1 and 2 layouts, published rows, controls)
# Needs, offline: the unCLIP pipeline, CLIP ViT-L/14 and ViT-B/32 (folders or cached hub ids), torchvision's
# AlexNet/InceptionV3/EfficientNet-B1 weights in $TORCH_HOME/hub/checkpoints and SwAV's ResNet-50 state dict
# (docs/image_metrics.md says where each comes from). --require-all stops at a missing network instead of
# writing a table with holes; drop it to score what is there. SPICE needs the CoreNLP jars
# (docs/caption_metrics.md); without them it is reported as unavailable. Every step skips finished work.
# Disk: ~0.5 GB of prediction files, ~2.4 GB of PNGs (estimated); time not measured (no GPU was available).
set -euo pipefail

DATASET_ROOT=${DATASET_ROOT:-/data/brain}
VIT3D=${VIT3D:-$DATASET_ROOT/runs/vit3d}
UNCLIP=${UNCLIP:-stabilityai/stable-diffusion-2-1-unclip-small}
CLIP_L=${CLIP_L:-openai/clip-vit-large-patch14}
CLIP_B=${CLIP_B:-openai/clip-vit-base-patch32}
SWAV=${SWAV:-$HOME/.cache/torch/hub/checkpoints/swav_800ep_pretrain.pth.tar}
EVAL=$DATASET_ROOT/runs/eval

python tools/evaluate/fmri2embeds.py \
  --encoder vit3d \
  --model "$VIT3D" \
  --dataset-root "$DATASET_ROOT" \
  --subject 1 2 5 7 \
  --device cuda
python tools/evaluate/fmri2embeds.py \
  --encoder ridge \
  --model "$DATASET_ROOT/runs/ridge/ridge_nsdgeneral" \
  --dataset-root "$DATASET_ROOT" \
  --subject 1 2 5 7

for RUN in vit3d ridge_nsdgeneral; do
  python tools/evaluate/eval_retrieval.py \
    --predictions "$DATASET_ROOT/runs/predictions/$RUN" \
    --json "$EVAL/retrieval_$RUN.json"
done
python tools/evaluate/retrieval_table.py \
  --run ridge="$EVAL/retrieval_ridge_nsdgeneral.json" \
  --run vit3d="$EVAL/retrieval_vit3d.json" \
  --json "$DATASET_ROOT/runs/retrieval_table.json"

python tools/evaluate/embeds2images.py \
  --dataset-root "$DATASET_ROOT" \
  --predictions "$DATASET_ROOT/runs/predictions/vit3d" \
  --decoder vae \
  --model "$UNCLIP" \
  --device cuda \
  --precision fp16

for PROTOCOL in braindiffuser mindeye; do
  RECONS=() STIMULI=() SCORES=()
  for SUBJ in subj01 subj02 subj05 subj07; do
    for KIND in avg single; do
      RECONS+=("$DATASET_ROOT/runs/recons/vit3d_vae/${SUBJ}_$KIND/recons")
      STIMULI+=("$DATASET_ROOT/runs/recons/vit3d_vae/${SUBJ}_$KIND/stimuli")
      SCORES+=("$EVAL/recon_vit3d_vae_${SUBJ}_${KIND}_$PROTOCOL.json")
    done
  done
  python tools/evaluate/eval_recon.py \
    --recons "${RECONS[@]}" \
    --stimuli "${STIMULI[@]}" \
    --json "${SCORES[@]}" \
    --protocol "$PROTOCOL" \
    --clip-model "$CLIP_L" \
    --swav-weights "$SWAV" \
    --require-all \
    --device cuda
done

for KIND in avg single; do
  python tools/evaluate/retrieve_captions.py \
    --predictions "$DATASET_ROOT/runs/predictions/vit3d" \
    --dataset-root "$DATASET_ROOT" \
    --kind "$KIND"
  for REFS in coco blip2; do
    python tools/evaluate/eval_captions.py \
      --captions "$DATASET_ROOT/runs/captions/vit3d_retrieval_$KIND.jsonl" \
      --dataset-root "$DATASET_ROOT" \
      --refs "$REFS" \
      --clip-model "$CLIP_B" \
      --device cuda \
      --json "$EVAL/captions_vit3d_retrieval_${KIND}_$REFS.json"
  done
done

python tools/evaluate/make_report.py \
  --evals "$EVAL" \
  --out "$EVAL/report" \
  --title "NSD evaluation: ViT3D and ridge baseline, subjects 1, 2, 5, 7"
