#!/usr/bin/env bash
# Raw NSD -> the prepared dataset root: z-scored fMRI arrays (whole brain + areas) per subject,
# lossless PNG stimuli, and COCO captions/boxes mapped to the 425x425 NSD crops.
# Disk and time: docs/prepare.md (~158 GB of float16 whole-brain volumes for 4 subjects x 40 sessions).
set -euo pipefail

NSD_ROOT=${NSD_ROOT:-/data/nsd}            # raw download: nsddata/, nsddata_betas/, nsddata_stimuli/
DATASET_ROOT=${DATASET_ROOT:-/data/brain}  # prepared root; everything goes under $DATASET_ROOT/nsd/
SUBJECTS=${SUBJECTS:-"1 2 5 7"}
NUM_WORKERS=${NUM_WORKERS:-8}

# shellcheck disable=SC2086  # SUBJECTS is a list
python prepare_datasets/make_subjmri.py \
  --nsd-root "$NSD_ROOT" \
  --dataset-root "$DATASET_ROOT" \
  --subject $SUBJECTS \
  --sessions all \
  --areas nsdgeneral streams \
  --betas-format hdf5

# shellcheck disable=SC2086
python prepare_datasets/make_images.py \
  --nsd-root "$NSD_ROOT" \
  --dataset-root "$DATASET_ROOT" \
  --subject $SUBJECTS \
  --num-workers "$NUM_WORKERS"

# shellcheck disable=SC2086
python prepare_datasets/make_coco_annotations.py \
  --nsd-root "$NSD_ROOT" \
  --dataset-root "$DATASET_ROOT" \
  --subject $SUBJECTS
