"""What the web demo shows, computed by the project's own pieces (no logic of its own beyond wiring).

`DemoBackend` loads the models once: a Brain-LLaVA (chat and the brief caption), the ViT3D whose CLIP and VAE heads
predict the embeddings (the decoder's inputs, and the model the concept maps are computed on), the Stable unCLIP
decoder and the CLIP text tower the ViT3D's targets come from (concept embeddings). Every method takes a sample
reference (`subj01/te/3+9+12`, the repeat-averaged test trials of one image) and returns plain values: images as
uint8 arrays or PIL images, text. The gradio page (`llava_brain.web.app`) only wires them to components.

Reconstructions use the decoder of `llava_brain.recon.unclip` with the sample's own seed (`sample_seed`), so the
page shows what `embeds2images.py --decoder unclip` writes for the same sample, settings and seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from llava_brain.errors import BadInputError, require_file
from llava_brain.evaluation import generation as gen
from llava_brain.evaluation.predictions import prediction_samples
from llava_brain.layout import DatasetRoot, subject_name
from llava_brain.recon.unclip import (
    UnclipSettings,
    check_pipeline_folder,
    decode,
    load_pipeline,
    sample_seed,
    vae_images,
)
from llava_brain.subjects import Sample, prepared_subjects, sample_index

SPLIT = "te"
KIND = "avg"  # the demo talks about repeat-averaged test samples, as the paper's tables do

# The instruction presets of the paper's tasks (Tab. 3-6): label -> task of `generation.task_question`.
PRESETS = {
    "Brief caption": "brief_description",
    "Detailed description": "detail_description",
    "Complex reasoning": "complex_reasoning",
    "Stable Diffusion prompt": "instruction_reconstruction",
    'Locating the concept of "..."': "concept_localization",
}


def preset_question(label: str, concept: str = "") -> str:
    """The question of a preset; the concept-localization preset needs the concept (the page's concept box)."""
    if label not in PRESETS:
        raise ValueError(f"unknown preset {label!r}; expected one of {', '.join(PRESETS)}")
    return gen.task_question(PRESETS[label], concept=concept.strip() or None)


@dataclass(frozen=True)
class DemoPaths:
    """The folders the demo reads; `check` names the first one that is missing, before anything loads."""

    model: Path  # Brain-LLaVA (llava_brain.train's output)
    vision_tower: Path  # pretrain_vit3d.py --out folder (CLIP + VAE heads)
    decoder: str  # StableUnCLIPImg2ImgPipeline folder or hub id
    clip_text: str  # CLIPTextModelWithProjection folder or hub id
    dataset_root: Path

    def check(self) -> None:
        """BadInputError (one line naming the path) for the first folder that is missing or of the wrong kind."""
        from llava_brain.image_stage import check_model_folder, is_hub_id

        require_file(self.model / "config.json", "a Brain-LLaVA folder (llava_brain.train's --output_dir/final)")
        require_file(self.vision_tower / "final" / "config.json", "a pretrain_vit3d.py --out folder (final/)")
        if not Path(self.decoder).exists() and not is_hub_id(self.decoder):
            raise BadInputError(Path(self.decoder), "missing; expected a Stable unCLIP pipeline folder or hub id")
        check_pipeline_folder(self.decoder)
        check_model_folder(self.clip_text, ("clip", "clip_text_model"), "a CLIPTextModelWithProjection")
        layout = DatasetRoot(self.dataset_root)
        if not layout.root.is_dir():
            raise BadInputError(layout.root, "missing; expected a prepared dataset root (prepare_datasets/)")
        if not prepared_subjects(layout):
            raise BadInputError(layout.fmris_dir, "holds no prepared subject; expected make_subjmri.py's output")


class DemoBackend:
    """The loaded models and the dataset root; thread-safe for one call per model at a time (the page's queue
    gives each model its own concurrency group)."""

    def __init__(self, paths: DemoPaths, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 settings: UnclipSettings | None = None, prompt_task: str = "brief_description",
                 max_new_tokens: int = 128, seed: int = 0, progress: Callable[[str], None] = print):  # fmt: skip
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        from llava_brain.evaluation.concepts import load_clip_vit3d
        from llava_brain.model.brain_llava import load_brain_llava

        paths.check()
        self.paths, self.device, self.seed = paths, device, seed
        self.layout = DatasetRoot(paths.dataset_root)
        self.settings = settings or UnclipSettings()
        self.settings.check()
        self.prompt_task = prompt_task
        self.generate_kwargs = gen.generation_kwargs(max_new_tokens, do_sample=False)
        progress(f"loading Brain-LLaVA from {paths.model}")
        self.llava, self.processor = load_brain_llava(paths.model, torch_dtype=dtype, device=device)
        progress(f"loading the ViT3D from {paths.vision_tower}")
        self.vit3d_run, self.vit3d = load_clip_vit3d(paths.vision_tower, device)
        progress(f"loading the decoder from {paths.decoder}")
        self.pipe = load_pipeline(paths.decoder, device, dtype)
        progress(f"loading the CLIP text tower from {paths.clip_text}")
        self.text_model = CLIPTextModelWithProjection.from_pretrained(paths.clip_text).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(paths.clip_text)
        self.samples = self._test_samples()
        self._anatomy: dict[int, dict] = {}

    # Samples ---------------------------------------------------------------------------------------

    def _test_samples(self) -> dict[str, Sample]:
        subjects = [s for s in prepared_subjects(self.layout) if s in self.vit3d_run.subjects]
        if not subjects:
            raise BadInputError(self.layout.fmris_dir, f"has none of the ViT3D's subjects {self.vit3d_run.subjects}")
        found = {}
        for subject in subjects:
            for sample in prediction_samples(sample_index(self.layout, subject, SPLIT), KIND):
                found[sample.reference] = sample
        return found

    def subjects(self) -> list[str]:
        return sorted({subject_name(s.subject) for s in self.samples.values()})

    def sample_choices(self, subject: str) -> list[tuple[str, str]]:
        """(label, reference) of the subject's test samples, in nsdId order."""
        chosen = [s for s in self.samples.values() if subject_name(s.subject) == subject]
        return [(f"nsd {s.nsd_id} ({len(s.rows)} trials)", s.reference) for s in sorted(chosen, key=lambda s: s.nsd_id)]

    def random_sample(self, subject: str, rng: random.Random | None = None) -> str:
        return (rng or random).choice(self.sample_choices(subject))[1]

    def sample(self, reference: str) -> Sample:
        if reference not in self.samples:
            raise ValueError(f"unknown sample {reference!r}; expected a repeat-averaged test sample such as "
                             f"{next(iter(self.samples))}")  # fmt: skip
        return self.samples[reference]

    def stimulus(self, reference: str) -> Image.Image:
        """The image the subject saw (ground truth)."""
        path = require_file(self.layout.image(self.sample(reference).nsd_id), "a stimulus PNG of make_images.py")
        return Image.open(path).convert("RGB")

    # Predictions and images ------------------------------------------------------------------------

    def volumes(self, reference: str) -> torch.Tensor:
        """(1, *grid) float32: the sample's fMRI on the ViT3D's grid, as its training data."""
        from llava_brain.model.processor import sample_volumes

        grid = tuple(self.vit3d.config.grid)
        return torch.from_numpy(sample_volumes([reference], self.layout, grid)).to(self.device)

    @torch.no_grad()
    def embeddings(self, reference: str) -> tuple[np.ndarray, np.ndarray]:
        """(clip (1, D), vae latents (1, C, h, w)) predicted by the ViT3D's heads."""
        output = self.vit3d(self.volumes(reference))
        if output.vae is None:
            raise BadInputError(self.vit3d_run.final / "config.json", "has no VAE head; train it with --vae")
        return output.clip.float().cpu().numpy(), output.vae.float().cpu().numpy()

    def low_level(self, reference: str) -> np.ndarray:
        """(H, W, 3) uint8: the predicted VAE latent through the decoder's VAE (the low-level reconstruction)."""
        return vae_images(self.pipe.vae, self.embeddings(reference)[1])[0]

    def reconstruct(self, reference: str, prompt: str, on_step: Callable[[int, int], None] | None = None) -> np.ndarray:
        """(H, W, 3) uint8: the full decoder from the predicted CLIP and VAE embeddings and `prompt`."""
        clip, vae = self.embeddings(reference)
        seeds = [sample_seed(self.seed, self.sample(reference).nsd_id)]
        return decode(self.pipe, clip, vae, [prompt], seeds, self.settings, on_step=on_step)[0]

    # Language --------------------------------------------------------------------------------------

    def session(self, reference: str, messages: list | None = None) -> gen.ChatSession:
        """A chat session about the sample with the conversation so far (`ChatSession.messages`)."""
        session = gen.ChatSession(self.llava, self.processor, reference, self.layout.root, seed=self.seed,
                                  **self.generate_kwargs)  # fmt: skip
        session.messages = list(messages or [])
        return session

    def caption(self, reference: str) -> str:
        """Brain-LLaVA's greedy answer to the decoder's prompt task (default the brief caption)."""
        return self.session(reference).ask(gen.task_question(self.prompt_task))

    def chat(self, reference: str, messages: list, question: str) -> Iterator[tuple[str, list]]:
        """(answer so far, messages) while the answer streams; the last item is the finished turn."""
        return gen.stream_answer(self.session(reference, messages), question)

    # Concepts --------------------------------------------------------------------------------------

    def concept_map(self, reference: str, concept: str) -> tuple[Image.Image, dict]:
        """(slice montage of the concept's Grad-CAM map over the subject's mean volume, {"score", "roi_share"})."""
        from llava_brain.evaluation import concepts
        from llava_brain.evaluation.montage import montage

        concept = concept.strip()
        if not concept:
            raise ValueError("name a concept to locate (a word or a short phrase, e.g. red)")
        subject = self.sample(reference).subject
        if subject not in self._anatomy:
            self._anatomy[subject] = concepts.subject_data(self.layout, subject, self.vit3d_run.area)
        anatomy = self._anatomy[subject]
        target = concepts.concept_embeddings(self.text_model, self.tokenizer, [concept])
        result = concepts.gradcam_tokens(self.vit3d, self.volumes(reference), target)
        volume = concepts.to_subject_grid(concepts.to_model_grid(self.vit3d.config, result.cam), anatomy["brain"])[0]
        summary = {"score": float(result.score[0]), "roi_share": concepts.roi_shares(volume, anatomy["rois"])}
        return montage(anatomy["mean"], volume, anatomy["brain"]), summary


__all__ = ["PRESETS", "DemoBackend", "DemoPaths", "preset_question"]
