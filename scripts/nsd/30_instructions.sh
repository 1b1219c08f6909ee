#!/usr/bin/env bash
# Instruction data for Brain-LLaVA: GPT conversations, detailed descriptions and complex reasoning
# about every prepared NSD image (any OpenAI-compatible endpoint; key from $OPENAI_API_KEY only),
# then the LLaVA SFT files with the LLM-free types (brief description, instruction reconstruction,
# concept localization). Reruns continue where a killed or budget-stopped run ended.
# Without an API budget, set BACKEND=template (offline, deterministic).
set -euo pipefail

DATASET_ROOT=${DATASET_ROOT:-/data/brain}
BACKEND=${BACKEND:-openai}
MODEL=${MODEL:-gpt-3.5-turbo-0125}    # the paper's model
CONCURRENCY=${CONCURRENCY:-16}

for TYPE in conversation detail_description complex_reasoning; do
  python prepare_datasets/generate_conversation.py \
    --dataset-root "$DATASET_ROOT" \
    --prompt-type "$TYPE" \
    --backend "$BACKEND" \
    --model "$MODEL" \
    --subject all \
    --concurrency "$CONCURRENCY" \
    --timeout 60 \
    --max-retries 6
done

python prepare_datasets/generate_sft_data.py \
  --dataset-root "$DATASET_ROOT" \
  --subject all \
  --types brief_description instruction_reconstruction concept_localization conversation detail_description complex_reasoning \
  --caption-sources coco blip2 \
  --instance-source detr \
  --per-sample
