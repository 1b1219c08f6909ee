#!/usr/bin/env bash
# The whole pipeline on mini-NSD with tiny models, on CPU. Each stage the project gains joins here;
# the same scripts run at full scale (scripts/nsd/*.sh) with other flags.
set -euo pipefail

DEMO_DIR=${DEMO_DIR:-demo_out}
NSD_ROOT=$DEMO_DIR/mini_nsd
SEED=0

echo "== 1. mini-NSD: a raw NSD tree (betas, ROIs, design, stimuli, COCO annotations)"
python prepare_datasets/make_mini_nsd.py \
  --out "$NSD_ROOT" \
  --subjects 1 2 5 7 \
  --seed "$SEED" \
  --quiet

echo "== 2. what the NSD readers see, and how decodable it is (ridge retrieval vs chance)"
python tools/describe_nsd.py \
  --nsd-root "$NSD_ROOT" \
  --ridge-check \
  --json "$DEMO_DIR/mini_nsd_summary.json"
