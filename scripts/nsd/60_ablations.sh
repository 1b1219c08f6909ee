#!/usr/bin/env bash
# The paper's reconstruction ablations (Table 2's decoder rows, Table 7, the β sweep of Fig. 5), after
# scripts/nsd/50_evaluate.sh (prediction files, Brain-LLaVA's answers and the full decoder's folder):
#   1. Stable unCLIP reconstructions of the repeat-averaged test samples (docs/reconstruction.md), each a folder
#      runs/recons/vit3d_<label>/: unclip (the full decoder, β 0.93, made by 50_evaluate.sh and kept),
#      unclip_brief (Brain-LLaVA's brief captions as prompts: Table 7), unclip_notext (w/o LLM), unclip_novae
#      (w/o VAE feature: pure noise start), unclip_b<β> for β in 0.6 0.75 0.9 0.98 1.0
#   2. eval_recon.py on every folder (Brain-Diffuser protocol, one process), then one report with every row
#      beside its control and the β sweep drawn (PixCorr and CLIP two-way against β): $OUT/report.md
# Every step skips finished work; a killed decode resumes where it stopped.
#
# Full scale needs, offline: the unCLIP pipeline, CLIP ViT-L/14, the metric networks (docs/image_metrics.md).
# Time and disk not measured (no GPU was available): 8 more decoder runs x 4 subjects x 982 images at 512²,
# ~0.3 MB a PNG (estimated ~9.4 GB).
#
# The same recipe on the demo's root after make demo, with the tiny models (CPU; docs/reconstruction.md gives
# what it measured). The demo's Brain-LLaVA learned brief captions only, so they are the prompts, and the
# unclip_brief row is then the full decoder itself (not decoded twice); the demo decodes subject 1 (its folders
# are reused), this decodes subject 2 as well:
#   DATASET_ROOT=demo_out/root UNCLIP=demo_out/tiny_models/unclip CLIP_L=demo_out/tiny_models/clip_vision \
#   PROMPTS=demo_out/root/runs/captions/brain_llava_avg_real.jsonl PROMPT_TASK=brief_description \
#   SUBJECTS="1 2" DEVICE=cpu PRECISION=fp32 STEPS=8 bash scripts/nsd/60_ablations.sh
# (its report and plot: demo_out/root/runs/eval_ablations/report/)
set -euo pipefail

DATASET_ROOT=${DATASET_ROOT:-/data/brain}
UNCLIP=${UNCLIP:-stabilityai/stable-diffusion-2-1-unclip-small}
CLIP_L=${CLIP_L:-openai/clip-vit-large-patch14}
SUBJECTS=${SUBJECTS:-"1 2 5 7"}
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-fp16}
STEPS=${STEPS:-50}
# Brain-LLaVA's answers, instruction_reconstruction and brief_description among them (50_evaluate.sh)
PROMPTS=${PROMPTS:-$DATASET_ROOT/runs/captions/brain_llava_avg.jsonl}
PROMPT_TASK=${PROMPT_TASK:-instruction_reconstruction}
OUT=${OUT:-$DATASET_ROOT/runs/eval_ablations/report}
PREDICTIONS=$DATASET_ROOT/runs/predictions/vit3d
EVAL=$DATASET_ROOT/runs/eval_ablations

# unclip: the full decoder (50_evaluate.sh's folder, kept); the sweep reads it as its 0.93 point.
LABELS=(unclip unclip_notext unclip_novae)
# shellcheck disable=SC2086
python tools/evaluate/embeds2images.py \
  --dataset-root "$DATASET_ROOT" \
  --predictions "$PREDICTIONS" \
  --subject $SUBJECTS \
  --decoder unclip \
  --model "$UNCLIP" \
  --kinds avg \
  --steps "$STEPS" \
  --device "$DEVICE" \
  --precision "$PRECISION" \
  --label unclip \
  --prompts "$PROMPTS" \
  --prompt-task "$PROMPT_TASK"
if [ "$PROMPT_TASK" != brief_description ]; then
  LABELS+=(unclip_brief)
  # shellcheck disable=SC2086
  python tools/evaluate/embeds2images.py \
    --dataset-root "$DATASET_ROOT" \
    --predictions "$PREDICTIONS" \
    --subject $SUBJECTS \
    --decoder unclip \
    --model "$UNCLIP" \
    --kinds avg \
    --steps "$STEPS" \
    --device "$DEVICE" \
    --precision "$PRECISION" \
    --label unclip_brief \
    --prompts "$PROMPTS" \
    --prompt-task brief_description
fi
# shellcheck disable=SC2086
python tools/evaluate/embeds2images.py \
  --dataset-root "$DATASET_ROOT" \
  --predictions "$PREDICTIONS" \
  --subject $SUBJECTS \
  --decoder unclip \
  --model "$UNCLIP" \
  --kinds avg \
  --steps "$STEPS" \
  --device "$DEVICE" \
  --precision "$PRECISION" \
  --label unclip_notext \
  --no-text
# shellcheck disable=SC2086
python tools/evaluate/embeds2images.py \
  --dataset-root "$DATASET_ROOT" \
  --predictions "$PREDICTIONS" \
  --subject $SUBJECTS \
  --decoder unclip \
  --model "$UNCLIP" \
  --kinds avg \
  --steps "$STEPS" \
  --device "$DEVICE" \
  --precision "$PRECISION" \
  --label unclip_novae \
  --prompts "$PROMPTS" \
  --prompt-task "$PROMPT_TASK" \
  --no-vae-init
for BETA in 0.6 0.75 0.9 0.98 1.0; do
  LABELS+=("unclip_b$BETA")
  # shellcheck disable=SC2086
  python tools/evaluate/embeds2images.py \
    --dataset-root "$DATASET_ROOT" \
    --predictions "$PREDICTIONS" \
    --subject $SUBJECTS \
    --decoder unclip \
    --model "$UNCLIP" \
    --kinds avg \
    --steps "$STEPS" \
    --device "$DEVICE" \
    --precision "$PRECISION" \
    --label "unclip_b$BETA" \
    --prompts "$PROMPTS" \
    --prompt-task "$PROMPT_TASK" \
    --beta "$BETA"
done

RECONS=() STIMULI=() SCORES=()
for LABEL in "${LABELS[@]}"; do
  for S in $SUBJECTS; do
    SUBJ=$(printf "subj%02d" "$S")
    RECONS+=("$DATASET_ROOT/runs/recons/vit3d_$LABEL/${SUBJ}_avg/recons")
    STIMULI+=("$DATASET_ROOT/runs/recons/vit3d_$LABEL/${SUBJ}_avg/stimuli")
    SCORES+=("$EVAL/recon_vit3d_${LABEL}_${SUBJ}_avg_braindiffuser.json")
  done
done
python tools/evaluate/eval_recon.py \
  --recons "${RECONS[@]}" \
  --stimuli "${STIMULI[@]}" \
  --json "${SCORES[@]}" \
  --protocol braindiffuser \
  --clip-model "$CLIP_L" \
  --device "$DEVICE"

python tools/evaluate/make_report.py \
  --evals "$EVAL" \
  --out "$OUT" \
  --title "Neuro-Vision to Language: reconstruction ablations, subjects $SUBJECTS" \
  --note "Every row: tools/evaluate/eval_recon.py on one folder of tools/evaluate/embeds2images.py --decoder unclip."
