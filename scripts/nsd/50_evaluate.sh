#!/usr/bin/env bash
# The paper's evaluation at full scale (subjects 1, 2, 5, 7; NSD's shared test images, 3 repeats averaged and
# first presentation only), after scripts/nsd/40_pretrain_vit3d.sh (the ViT3D, the ridge baseline) and
# scripts/brain_llava/llava_adapter.sh (the stage-2 Brain-LLaVA):
#   1. prediction files of the ViT3D and of the ridge baseline (runs/predictions/<run>/subjXX_<kind>/)
#   2. retrieval from them: top-1 among all test images and MindEye's 300-image pools, shuffled-fMRI control
#   3. Brain-LLaVA's answers for every test sample and task (brief, detailed, complex reasoning, the Stable
#      Diffusion prompt), from real and from shuffled fMRI; and captions by retrieval (a baseline: the COCO
#      caption of the nearest training image)
#   4. reconstructions: the low-level VAE decode and the full Stable unCLIP decoder (predicted CLIP + VAE +
#      Brain-LLaVA's prompt, β 0.93; 512² PNGs)
#   5. the eight image metrics under the paper's Brain-Diffuser protocol and MindEye's 256² protocol; the
#      caption metrics against COCO and BLIP-2 references
#   6. one report: runs/eval/report/report.md (the paper's Tables 1 and 2 layouts, published rows, controls)
# The ablations (w/o LLM, w/o VAE, prompts, the β sweep) are scripts/nsd/60_ablations.sh.
# Needs, offline: the unCLIP pipeline, CLIP ViT-L/14 and ViT-B/32 (folders or cached hub ids), torchvision's
# AlexNet/InceptionV3/EfficientNet-B1 weights in $TORCH_HOME/hub/checkpoints and SwAV's ResNet-50 state dict
# (docs/image_metrics.md says where each comes from). --require-all stops at a missing network instead of
# writing a table with holes; drop it to score what is there. SPICE needs the CoreNLP jars
# (docs/caption_metrics.md); without them it is reported as unavailable. Every step skips finished work.
# Disk: ~0.5 GB of prediction files, ~4.8 GB of PNGs (7,856 per decoder at an estimated 0.3 MB); time not
# measured (no GPU was available).
set -euo pipefail

DATASET_ROOT=${DATASET_ROOT:-/data/brain}
VIT3D=${VIT3D:-$DATASET_ROOT/runs/vit3d}
BRAIN_LLAVA=${BRAIN_LLAVA:-$DATASET_ROOT/runs/brain_llava/stage2/final}
UNCLIP=${UNCLIP:-stabilityai/stable-diffusion-2-1-unclip-small}
CLIP_L=${CLIP_L:-openai/clip-vit-large-patch14}
CLIP_B=${CLIP_B:-openai/clip-vit-base-patch32}
SWAV=${SWAV:-$HOME/.cache/torch/hub/checkpoints/swav_800ep_pretrain.pth.tar}
EVAL=$DATASET_ROOT/runs/eval
CAPTIONS=$DATASET_ROOT/runs/captions

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

# Brain-LLaVA's answers (every task but concept localization, which needs a concept: 70_concepts.sh) from the
# sample's own fMRI and from another test image's (--shuffle-fmri, the control of every caption row).
for KIND in avg single; do
  python tools/evaluate/generate_captions_from_llava.py \
    --model "$BRAIN_LLAVA" \
    --dataset-root "$DATASET_ROOT" \
    --subject 1 2 5 7 \
    --kind "$KIND" \
    --tasks brief_description detail_description complex_reasoning instruction_reconstruction \
    --batch-size 16 \
    --max-new-tokens 256 \
    --precision bf16 \
    --device cuda \
    --out "$CAPTIONS/brain_llava_$KIND.jsonl"
  python tools/evaluate/generate_captions_from_llava.py \
    --model "$BRAIN_LLAVA" \
    --dataset-root "$DATASET_ROOT" \
    --subject 1 2 5 7 \
    --kind "$KIND" \
    --tasks brief_description detail_description complex_reasoning \
    --batch-size 16 \
    --max-new-tokens 256 \
    --precision bf16 \
    --device cuda \
    --shuffle-fmri \
    --out "$CAPTIONS/brain_llava_${KIND}_shuffled.jsonl"
  # The full decoder: predicted CLIP and VAE latents, Brain-LLaVA's Stable Diffusion prompt, β 0.93.
  python tools/evaluate/embeds2images.py \
    --dataset-root "$DATASET_ROOT" \
    --predictions "$DATASET_ROOT/runs/predictions/vit3d" \
    --decoder unclip \
    --model "$UNCLIP" \
    --kinds "$KIND" \
    --prompts "$CAPTIONS/brain_llava_$KIND.jsonl" \
    --steps 50 \
    --device cuda \
    --precision fp16 \
    --label unclip
done

for PROTOCOL in braindiffuser mindeye; do
  RECONS=() STIMULI=() SCORES=()
  for SUBJ in subj01 subj02 subj05 subj07; do
    for KIND in avg single; do
      for DECODER in vae unclip; do
        RECONS+=("$DATASET_ROOT/runs/recons/vit3d_$DECODER/${SUBJ}_$KIND/recons")
        STIMULI+=("$DATASET_ROOT/runs/recons/vit3d_$DECODER/${SUBJ}_$KIND/stimuli")
        SCORES+=("$EVAL/recon_vit3d_${DECODER}_${SUBJ}_${KIND}_$PROTOCOL.json")
      done
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
      --captions "$CAPTIONS/vit3d_retrieval_$KIND.jsonl" \
      --dataset-root "$DATASET_ROOT" \
      --refs "$REFS" \
      --clip-model "$CLIP_B" \
      --device cuda \
      --json "$EVAL/captions_vit3d_retrieval_${KIND}_$REFS.json"
    for CONTROL in real shuffled; do
      FILE=$CAPTIONS/brain_llava_$KIND.jsonl
      if [ "$CONTROL" = shuffled ]; then FILE=$CAPTIONS/brain_llava_${KIND}_shuffled.jsonl; fi
      python tools/evaluate/eval_captions.py \
        --captions "$FILE" \
        --dataset-root "$DATASET_ROOT" \
        --refs "$REFS" \
        --task brief_description detail_description complex_reasoning \
        --run "brain_llava_$KIND ($CONTROL fMRI)" \
        --clip-model "$CLIP_B" \
        --device cuda \
        --json "$EVAL/captions_brain_llava_${KIND}_${CONTROL}_$REFS.json"
    done
  done
done

python tools/evaluate/make_report.py \
  --evals "$EVAL" \
  --out "$EVAL/report" \
  --title "NSD evaluation: ViT3D, ridge baseline and Brain-LLaVA, subjects 1, 2, 5, 7"
