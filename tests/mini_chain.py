"""The demo's chain, small, built once per test session: a 1-subject mini-NSD (SNR 0.6-0.9, stronger than the
demo's, so that 300 training images suffice), the tiny models trained on it (CLIP, VAE, the unCLIP UNet, the Llama
pretrained on its text), the tiny CLIP's embeddings and the VAE's latents as the ViT3D's targets, and the ViT3D
(CLIP + VAE heads) with its prediction files. Every piece is the demo's own script, with fixed seeds; under one
torch thread (make test) the figures are deterministic. Tests read it and write elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_brain.layout import DatasetRoot
from llava_brain.simulate import MiniNsdConfig, write_mini_nsd

from conftest import load_script
from vit3d_data import TINY

BRIEF = "brief_description"
_BUILT: dict[str, dict[str, Path]] = {}


def run(script: str, *argv) -> None:
    assert load_script(script).main([str(a) for a in argv]) == 0, script


# The chain's mini-NSD (make_mini_nsd.py's defaults otherwise): its seed rebuilds the ground truth.
CONFIG = MiniNsdConfig(subjects=(1,), num_shared=50, images_per_subject=350, trials_per_session=150,
                       grid_scale=0.25, snr_range=(0.6, 0.9), nifti_subjects=())  # fmt: skip


def _prepare(base: Path, config: MiniNsdConfig, steps: dict[str, int], vae: bool) -> dict[str, Path]:
    """mini-NSD of `config`, the prepared root, the tiny models trained `steps` ({"clip": n, ...}) and the
    ViT3D's targets: the tiny CLIP's embeddings, and with `vae` the tiny unCLIP VAE's 64-pixel latents."""
    nsd, root, tiny, vit3d = base / "nsd", base / "root", base / "tiny", base / "vit3d"
    write_mini_nsd(nsd, config, progress=False)
    common = ["--nsd-root", nsd, "--dataset-root", root]
    run("prepare_datasets/make_subjmri.py", *common, "--areas", "nsdgeneral", "--quiet")
    run("prepare_datasets/make_images.py", *common, "--subject", "all", "--quiet")
    run("prepare_datasets/make_coco_annotations.py", *common, "--subject", "all")
    run("tools/make_tiny_models.py", "--out", tiny, "--nsd-root", nsd, "--quiet",
        *(f for name, n in steps.items() for f in (f"--{name}-steps", n)))  # fmt: skip
    run("prepare_datasets/generate_clip_embeds.py", "--dataset-root", root, "--subject", "all", "--clip-model",
        tiny / "clip_vision", *(["--vae-model", tiny / "unclip", "--vae-size", "64"] if vae else ["--no-vae"]),
        "--device", "cpu", "--quiet")  # fmt: skip
    return {"base": base, "nsd": nsd, "root": root, "tiny": tiny, "vit3d": vit3d}


def _build(base: Path) -> dict[str, Path]:
    chain = _prepare(base, CONFIG, {"clip": 400, "vae": 150, "llm": 200, "unet": 150}, vae=True)
    root, vit3d = chain["root"], chain["vit3d"]
    run("prepare_datasets/generate_sft_data.py", "--dataset-root", root, "--subject", "all", "--types", BRIEF,
        "--caption-sources", "coco", "--instance-source", "coco", "--per-sample")  # fmt: skip
    # 12 epochs (~1.3 s each here): after 8, the VAE head's test predictions were shrunk (sd 0.54 against the
    # latents' 0.97, per-image r 0.58) and the unCLIP decodes from them barely beat shuffled pairs; after 12,
    # sd 0.78, r 0.70 (16 epochs: no better).
    run("pretrain_vit3d.py", "--dataset-root", root, "--out", vit3d, "--subject", "1", *TINY, "--vae",
        "--epochs", "12", "--batch-size", "16", "--lr", "1e-3", "--warmup-steps", "20", "--num-workers", "0",
        "--device", "cpu", "--precision", "fp32", "--seed", "0")  # fmt: skip
    predictions = DatasetRoot(root).predictions("vit3d")
    run("tools/evaluate/fmri2embeds.py", "--encoder", "vit3d", "--model", vit3d, "--dataset-root", root,
        "--kinds", "avg", "--out", predictions, "--device", "cpu", "--quiet")  # fmt: skip
    return {**chain, "predictions": predictions}


def mini_chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    key = str(tmp_path_factory.getbasetemp())
    if key not in _BUILT:
        _BUILT[key] = _build(tmp_path_factory.mktemp("mini_chain"))
    return _BUILT[key]


# The concept chain: the same kind of 1-subject mini-NSD with 600 images, a tiny CLIP trained 1000 steps (the others
# 1 step: unused) and a CLIP-only ViT3D trained 24 epochs at batch 32. On the main chain (350 images, CLIP 400 steps,
# ViT3D 12 epochs at batch 16: top-1 0.06) the encoding pattern of "red" ranked red's true map 16th of 19 (its score
# followed purple); with this one the ViT3D reaches top-1 0.24 (chance 0.02) and both demo concepts rank 1st.
CONCEPT_CONFIG = MiniNsdConfig(subjects=(1,), num_shared=50, images_per_subject=600, trials_per_session=150,
                               grid_scale=0.25, snr_range=(0.6, 0.9), nifti_subjects=())  # fmt: skip


def _build_concepts(base: Path) -> dict[str, Path]:
    chain = _prepare(base, CONCEPT_CONFIG, {"clip": 1000, "vae": 1, "llm": 1, "unet": 1}, vae=False)
    run("pretrain_vit3d.py", "--dataset-root", chain["root"], "--out", chain["vit3d"], "--subject", "1", *TINY,
        "--no-vae", "--epochs", "24", "--batch-size", "32", "--lr", "2e-3", "--warmup-steps", "20",
        "--num-workers", "0", "--device", "cpu", "--precision", "fp32", "--seed", "0")  # fmt: skip
    return chain


def concept_chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The concept chain ({"nsd", "root", "tiny", "vit3d"}), built once per session."""
    key = str(tmp_path_factory.getbasetemp()) + "/concepts"
    if key not in _BUILT:
        _BUILT[key] = _build_concepts(tmp_path_factory.mktemp("concept_chain"))
    return _BUILT[key]


def _train_brain_llava(chain: dict[str, Path], base: Path) -> dict[str, Path]:
    """Brain-LLaVA's two stages on the brief captions (the demo's settings, with more steps: one subject's
    records instead of four), and its greedy captions of the test samples from real and from shuffled fMRI.

    Stage 1 runs 300 steps at lr 3e-2 (the demo: 50 at 3e-3), stage 2 500 steps (the demo: 400). With 100 steps
    at 3e-3 the projector learned nothing (test caption loss 0.912 from real, 0.913 from shuffled fMRI), and
    whether stage 2 then learned to read the tokens hung on the draw of the brain: 0.820 vs 0.887 on one
    mini-NSD, 0.820 vs 0.826 on another with the same decodability (ridge top-1 0.22 on both). With this
    stage 1: 0.811 vs 0.912, 0.798 vs 0.872, and 0.810 vs 0.893 with another training seed."""
    from llava_brain.train.__main__ import main as train

    root, tiny, layout = chain["root"], chain["tiny"], DatasetRoot(chain["root"])
    stage1, stage2 = base / "stage1", base / "stage2"
    shared = ["--model_name_or_path", tiny / "llm", "--vision_tower", chain["vit3d"], "--mm_vision_select_layer",
              "-1", "--data_path", layout.sft_data("tr"), "--data_types", BRIEF, "--dataset_root", root,
              "--per_device_train_batch_size", "16", "--save_strategy", "no",
              "--disable_tqdm", "True", "--use_cpu", "True", "--report_to", "none", "--seed", "0"]  # fmt: skip
    assert train([str(a) for a in [*shared, "--tune_mm_mlp_adapter", "True", "--max_steps", "300",
                                   "--learning_rate", "3e-2", "--output_dir", stage1]]) == 0  # fmt: skip
    assert train([str(a) for a in [*shared, "--pretrain_mm_mlp_adapter", stage1, "--learning_rate", "3e-3",
                                   "--mm_projector_lr", "3e-2", "--max_steps", "500",
                                   "--output_dir", stage2]]) == 0  # fmt: skip
    captions = {}
    for control in ("real", "shuffled"):
        captions[control] = base / f"{control}.jsonl"
        run("tools/evaluate/generate_captions_from_llava.py", "--model", stage2 / "final", "--dataset-root", root,
            "--batch-size", "50", "--max-new-tokens", "24", "--device", "cpu", "--out", captions[control], "--quiet",
            *(["--shuffle-fmri"] if control == "shuffled" else []))  # fmt: skip
    return {"model": stage2 / "final", **captions}


def brain_llava(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """mini_chain's Brain-LLaVA: {"model", "real", "shuffled"} (the caption files), built once per session."""
    key = str(tmp_path_factory.getbasetemp()) + "/brain_llava"
    if key not in _BUILT:
        _BUILT[key] = _train_brain_llava(mini_chain(tmp_path_factory), tmp_path_factory.mktemp("brain_llava"))
    return _BUILT[key]
