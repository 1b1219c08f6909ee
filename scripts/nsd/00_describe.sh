#!/usr/bin/env bash
# Check a real NSD download before preparing it: every file the pipeline needs opens with the
# expected format (exit code 2 and one line naming the file otherwise), and print its summary.
set -euo pipefail

NSD_ROOT=${NSD_ROOT:-/data/nsd}   # holds nsddata/, nsddata_betas/, nsddata_stimuli/
OUT=${OUT:-runs/nsd}

mkdir -p "$OUT"
python tools/describe_nsd.py \
  --nsd-root "$NSD_ROOT" \
  --subject 1 2 5 7 \
  --json "$OUT/nsd_summary.json"
