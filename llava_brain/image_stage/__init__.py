"""What the per-image model stages share (captions, detections, embeddings): one driver, selection, model
loading, sharding across processes, resumable storage and a deterministic merge.

A stage runs a model over NSD images in **fixed batches**: the selected nsdIds, sorted, cut into
batches of `--batch-size`. Batches are the unit of everything:

- sharding: under `accelerate launch`, process r of w takes the unfinished batches r, r + w, ...;
- storage: each process appends finished batches to its own part files in a work folder beside
  the output (`.<output>.parts/`), records for JSON outputs and rows for arrays, so a kill loses
  at most the batch in flight and a rerun (with any number of processes) skips what is stored;
- determinism: a batch always holds the same images whatever the number of processes or
  restarts, so results (even batched floating point and seeded sampling) are identical; the merge
  orders by nsdId and writes the output atomically, then removes the work folder.

Whether an output is current is `io.StageRun`'s rule: `<output>.run.json` (a file output) or
`<folder>/run.json` (a folder output) records the resolved settings and the model files' fingerprints.

Modules: `driver` (ImageStage, run_image_stage, the shared flags and selection), `batches` (planning,
seeding, background decoding), `parts` (resumable storage), `models` (model folders).
"""

from llava_brain.image_stage.batches import Batch, Plan, batch_seed, iterate_batches, plan_batches, run_batches
from llava_brain.image_stage.driver import (
    Context,
    ImageStage,
    Model,
    add_run_arguments,
    add_selection_arguments,
    require_images,
    run_image_stage,
    select_images,
    selection_settings,
)
from llava_brain.image_stage.models import (
    check_model_folder,
    is_hub_id,
    loading_model,
    model_files,
    model_setting,
    quiet_transformers,
    vae_source,
)
from llava_brain.image_stage.parts import ArrayParts, RecordParts, open_work_folder, parts_folder, remove_parts

__all__ = [
    "ArrayParts",
    "Batch",
    "Context",
    "ImageStage",
    "Model",
    "Plan",
    "RecordParts",
    "add_run_arguments",
    "add_selection_arguments",
    "batch_seed",
    "check_model_folder",
    "is_hub_id",
    "iterate_batches",
    "loading_model",
    "model_files",
    "model_setting",
    "open_work_folder",
    "parts_folder",
    "plan_batches",
    "quiet_transformers",
    "remove_parts",
    "require_images",
    "run_batches",
    "run_image_stage",
    "select_images",
    "selection_settings",
    "vae_source",
]
