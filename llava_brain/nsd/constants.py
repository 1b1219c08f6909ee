"""Named facts about the real Natural Scenes Dataset (sources: NSD Data Manual, docs/nsd_formats.md).

Readers never rely on these to size arrays (they read counts from the files, so mini-NSD and
real NSD both work); they are for documentation, defaults and sanity messages.
"""

NUM_SUBJECTS = 8
PAPER_SUBJECTS = (1, 2, 5, 7)  # the subjects who completed all 40 sessions; used by the paper
TRIALS_PER_SESSION = 750
SESSIONS_PER_SUBJECT = {1: 40, 2: 40, 3: 32, 4: 30, 5: 40, 6: 32, 7: 40, 8: 30}
# Sessions 38-40 were withheld for the Algonauts 2023 challenge; most published pipelines use 37.
SESSIONS_PUBLIC_HISTORICALLY = 37
NUM_IMAGES = 73_000
IMAGES_PER_SUBJECT = 10_000
NUM_SHARED = 1_000
MAX_REPEATS = 3
IMAGE_SIZE = 425  # stimuli are 425 x 425 RGB crops of COCO images

# Betas are stored as int16 = round(percent signal change x 300).
BETA_SCALE = 300.0

# func1pt8mm volume grids as NIfTI (X, Y, Z); HDF5 betas are (trials, Z, Y, X).
GRID_FUNC1PT8MM = {
    1: (81, 104, 83),
    2: (82, 106, 84),
    3: (81, 106, 82),
    4: (85, 99, 80),
    5: (79, 97, 78),
    6: (85, 113, 83),
    7: (78, 95, 81),
    8: (80, 103, 78),
}
VOXEL_SIZE_MM = 1.8

# ROI label names (`*.mgz.ctab`), index -> name; 0 is "cortical but unlabeled", -1 "not cortical".
ROI_LABELS = {
    "nsdgeneral": {1: "nsdgeneral"},
    "streams": {
        1: "early", 2: "midventral", 3: "midlateral", 4: "midparietal", 5: "ventral", 6: "lateral", 7: "parietal",
    },
    "prf-visualrois": {1: "V1v", 2: "V1d", 3: "V2v", 4: "V2d", 5: "V3v", 6: "V3d", 7: "hV4"},
    "floc-faces": {1: "OFA", 2: "FFA-1", 3: "FFA-2", 4: "mTL-faces", 5: "aTL-faces"},
    "floc-bodies": {1: "EBA", 2: "FBA-1", 3: "FBA-2", 4: "mTL-bodies"},
    "floc-places": {1: "OPA", 2: "PPA", 3: "RSC"},
    "floc-words": {1: "OWFA", 2: "VWFA-1", 3: "VWFA-2", 4: "mfs-words", 5: "mTL-words"},
}  # fmt: skip

# Voxels with nsdgeneral == 1 at 1.8 mm (MindEye / UMBRAE), for sanity messages.
NSDGENERAL_VOXELS = {1: 15724, 2: 14278, 3: 15226, 4: 13153, 5: 13039, 6: 17907, 7: 12682, 8: 14386}
