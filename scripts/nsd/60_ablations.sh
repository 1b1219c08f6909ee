#!/usr/bin/env bash
# The paper's reconstruction ablations at full scale (Table 2's decoder rows, Table 7, the β sweep of Fig. 5),
# after scripts/nsd/50_evaluate.sh (prediction files) and scripts/brain_llava/llava_adapter.sh (the stage-2 model):
#   1. Brain-LLaVA's prompts for every repeat-averaged test sample: the Stable Diffusion prompt
#      (instruction_reconstruction, the paper's) and the brief caption (Table 7's other row)
#   2. Stable unCLIP reconstructions (docs/reconstruction.md), each a folder runs/recons/vit3d_<label>/:
#      unclip (the full decoder), unclip_brief (brief-caption prompts), unclip_notext (w/o LLM),
#      unclip_novae (w/o VAE feature: pure noise start), unclip_b<β> for β in 0.6 0.75 0.9 0.98 1.0
#   3. eval_recon.py on each (Brain-Diffuser protocol), then one report with every row beside its control
# Not built yet: the plot of PixCorr and CLIP against β (read runs/eval/recon_vit3d_unclip_b*_*.json).
# Needs, offline: the unCLIP pipeline, CLIP ViT-L/14, the metric networks (docs/image_metrics.md).
# Every step skips finished work; a killed decode resumes where it stopped. Time and disk not measured (no GPU
# was available): 9 decoder runs x 4 subjects x 982 images at 512², ~0.3 MB a PNG (estimated ~10 GB).
set -euo pipefail

DATASET_ROOT=${DATASET_ROOT:-/data/brain}
BRAIN_LLAVA=${BRAIN_LLAVA:-$DATASET_ROOT/runs/brain_llava/stage2/final}
UNCLIP=${UNCLIP:-stabilityai/stable-diffusion-2-1-unclip-small}
CLIP_L=${CLIP_L:-openai/clip-vit-large-patch14}
PREDICTIONS=$DATASET_ROOT/runs/predictions/vit3d
PROMPTS=$DATASET_ROOT/runs/captions/brain_llava_avg_prompts.jsonl
EVAL=$DATASET_ROOT/runs/eval

python tools/evaluate/generate_captions_from_llava.py \
  --model "$BRAIN_LLAVA" \
  --dataset-root "$DATASET_ROOT" \
  --subject 1 2 5 7 \
  --kind avg \
  --tasks instruction_reconstruction brief_description \
  --batch-size 16 \
  --max-new-tokens 77 \
  --precision bf16 \
  --device cuda \
  --out "$PROMPTS"

# The full decoder and Table 7's prompt ablation, w/o LLM, w/o VAE feature, then the β sweep.
python tools/evaluate/embeds2images.py \
  --dataset-root "$DATASET_ROOT" \
  --predictions "$PREDICTIONS" \
  --decoder unclip \
  --model "$UNCLIP" \
  --kinds avg \
  --steps 50 \
  --device cuda \
  --precision fp16 \
  --label unclip \
  --prompts "$PROMPTS"
python tools/evaluate/embeds2images.py \
  --dataset-root "$DATASET_ROOT" \
  --predictions "$PREDICTIONS" \
  --decoder unclip \
  --model "$UNCLIP" \
  --kinds avg \
  --steps 50 \
  --device cuda \
  --precision fp16 \
  --label unclip_brief \
  --prompts "$PROMPTS" \
  --prompt-task brief_description
python tools/evaluate/embeds2images.py \
  --dataset-root "$DATASET_ROOT" \
  --predictions "$PREDICTIONS" \
  --decoder unclip \
  --model "$UNCLIP" \
  --kinds avg \
  --steps 50 \
  --device cuda \
  --precision fp16 \
  --label unclip_notext \
  --no-text
python tools/evaluate/embeds2images.py \
  --dataset-root "$DATASET_ROOT" \
  --predictions "$PREDICTIONS" \
  --decoder unclip \
  --model "$UNCLIP" \
  --kinds avg \
  --steps 50 \
  --device cuda \
  --precision fp16 \
  --label unclip_novae \
  --prompts "$PROMPTS" \
  --no-vae-init
for BETA in 0.6 0.75 0.9 0.98 1.0; do
  python tools/evaluate/embeds2images.py \
    --dataset-root "$DATASET_ROOT" \
    --predictions "$PREDICTIONS" \
    --decoder unclip \
    --model "$UNCLIP" \
    --kinds avg \
    --steps 50 \
    --device cuda \
    --precision fp16 \
    --label "unclip_b$BETA" \
    --prompts "$PROMPTS" \
    --beta "$BETA"
done

for LABEL in unclip unclip_brief unclip_notext unclip_novae unclip_b0.6 unclip_b0.75 unclip_b0.9 unclip_b0.98 unclip_b1.0; do
  for SUBJ in subj01 subj02 subj05 subj07; do
    python tools/evaluate/eval_recon.py \
      --recons "$DATASET_ROOT/runs/recons/vit3d_$LABEL/${SUBJ}_avg/recons" \
      --stimuli "$DATASET_ROOT/runs/recons/vit3d_$LABEL/${SUBJ}_avg/stimuli" \
      --json "$EVAL/recon_vit3d_${LABEL}_${SUBJ}_avg_braindiffuser.json" \
      --protocol braindiffuser \
      --clip-model "$CLIP_L" \
      --device cuda
  done
done

python tools/evaluate/make_report.py \
  --evals "$EVAL" \
  --out "$EVAL/report" \
  --title "Neuro-Vision to Language: reconstruction ablations, subjects 1 2 5 7"
