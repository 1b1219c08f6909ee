"""Locate concepts in the brain (paper Sec. 4.4, Fig. 8): Grad-CAM of the ViT3D's CLIP head towards a concept's
CLIP text embedding, mapped onto each subject's own voxel grid, with the zeroing check of Fig. 8.

For every --subject, --kind and --concept, over the test samples whose COCO captions name the concept
(--samples containing, the default) or all of them: the concept's text embedding (--clip-text, the text tower
of the CLIP whose image embeddings the ViT3D predicts; --template) is the target of the CLIP head, and
Grad-CAM over the patch tokens of --layers (default -2, the penultimate layer) gives a map per sample,
taken back through the token gather, the padding and the trilinear resize onto the subject's grid, 0 outside
its brain mask (llava_brain/evaluation/concepts.py). --ensemble adds ViT3Ds of other patch sizes: each
sample's maps are scaled to a maximum of 1 and averaged. --from-llava asks a Brain-LLaVA, per sample,
`Locating the concept of "<concept>"` and locates its answer instead of the concept itself.

--method pattern replaces Grad-CAM by the concept's encoding pattern (Haufe et al., 2014): over the subject's
samples of --kind (--pattern-samples: train and test, the default, or test only), the signed correlation of each
voxel's beta with the concept score, one map per subject and concept on the subject's own grid (no per-sample
maps; docs/concepts.md says why it exists). The pattern describes the model, so its training samples count too;
the zeroing check runs on test samples only.
--versus makes the score contrastive: the target becomes t_concept - mean(t_versus), so the map shows what
sets the concept apart from a vocabulary of related ones (for either method).

Ablation (unless --no-ablation): the top --ablate-fraction of the region's voxels (--region, default the
area the model's tokens cover) in each sample's map are set to 0 and the --model is run again; the drop of
the concept's cosine similarity is compared with zeroing as many random voxels of the region
(--ablate-repeats draws per sample), as means and a one-sided Wilcoxon signed-rank test over the samples.

Writes <out>/subjXX_<kind>/<concept>/ (default <root>/runs/concepts/<model folder name>/), built under a
hidden name and swapped in whole, run.json last:
  maps/<sample>.nii.gz   the map on the subject's grid with its affine (float32), one per sample
  maps/<sample>.png      axial-slice montage of the map over the subject's mean volume
  maps/<sample>.json     concept text, score, top voxels (voxel index, mm, value), share per streams ROI
  mean.nii.gz / .png / .json   the same for the mean of the samples' scaled maps
  ablation.json          the zeroing check; index.json: the samples, their concept texts and scores
A rerun skips finished folders; other settings are refused unless --overwrite.

Full scale (ViT3Ds of patch 14, 12, 10 from scripts/nsd/70_concepts.sh; one GPU, minutes per concept):
  python tools/evaluate/locate_concepts.py --model /data/brain/runs/vit3d \\
      --ensemble /data/brain/runs/vit3d_p12 /data/brain/runs/vit3d_p10 \\
      --clip-text openai/clip-vit-large-patch14 --dataset-root /data/brain --subject 1 \\
      --concept dog surfboard --device cuda
Tiny (demo root, CPU, seconds):
  python tools/evaluate/locate_concepts.py --model demo_out/root/runs/vit3d \\
      --clip-text demo_out/tiny_models/clip_text --dataset-root demo_out/root --subject 1 --concept red blue \\
      --method pattern --versus red green blue yellow purple white --device cpu
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llava_brain import cli, runtime
from llava_brain.errors import BadInputError, exits_on_bad_input, require_file
from llava_brain.evaluation import concept_files, concepts
from llava_brain.evaluation.predictions import KINDS, prediction_samples
from llava_brain.io import StageRun, require_writable, staged_folder, write_json
from llava_brain.layout import DatasetRoot, subject_name
from llava_brain.subjects import sample_index

SPLIT = "te"


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    # Models
    p.add_argument("--model", type=Path, required=True,
                   help="a pretrain_vit3d.py --out folder: its CLIP head is scored, mapped and ablated")  # fmt: skip
    p.add_argument("--ensemble", type=Path, nargs="+", default=[],
                   help="more pretrain_vit3d.py folders (other patch sizes) whose maps are averaged with "
                   "--model's (paper: patch 14, 12, 10)")  # fmt: skip
    p.add_argument(
        "--clip-text",
        required=True,
        help="CLIPTextModelWithProjection folder (or hub id) of the CLIP the ViT3D's targets come from",
    )
    p.add_argument("--from-llava", type=lambda v: Path(v) if v else None, default=None,
                   help="a Brain-LLaVA folder: per sample, its greedy answer to 'Locating the concept of "
                   "\"<concept>\"' is the text located (default, or empty: the concept itself)")  # fmt: skip
    # Data
    cli.add_dataset_root(p, "prepared dataset root (nsd/fmris/: the test betas and masks; COCO captions)")
    cli.add_subject(p, default=None, help="subject numbers, or 'all' (default: the model's subjects)")
    p.add_argument("--kind", choices=KINDS, default="avg", help="avg = repeats averaged (default), single = first")
    p.add_argument("--concept", nargs="+", required=True,
                   help="concepts to locate (words or short phrases, e.g. red circle dog)")  # fmt: skip
    p.add_argument(
        "--samples",
        choices=["containing", "all"],
        default="containing",
        help="containing = test samples whose COCO captions name the concept (default); all",
    )
    p.add_argument("--nsd-ids", type=int, nargs="+", default=None,
                   help="only these test images (nsdId), e.g. to map one picture")  # fmt: skip
    p.add_argument("--max-samples", type=int, default=None, help="at most this many samples per concept")
    # Method
    p.add_argument("--method", choices=["gradcam", "pattern"], default="gradcam",
                   help="gradcam = the paper's Grad-CAM per sample (default); pattern = the concept score's "
                   "signed encoding pattern over the samples of --kind (--pattern-samples)")  # fmt: skip
    p.add_argument("--pattern-samples", choices=["all", "test"], default="all",
                   help="the samples --method pattern correlates over: all = the subject's train and test samples "
                   "(default; 5x the test set on mini-NSD, less noise), test = test samples only")  # fmt: skip
    p.add_argument("--versus", nargs="+", default=[],
                   help="a vocabulary the concept is contrasted with: the target becomes t_concept - mean(t_versus) "
                   "(e.g. red green blue yellow; default none)")  # fmt: skip
    p.add_argument(
        "--template",
        default="{}",
        help="text around the concept for the CLIP text tower ({} = the concept; default '{}')",
    )
    p.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=[-2],
        help="hidden states Grad-CAM reads (0 = patch embeddings, -1 = last block; default -2)",
    )
    p.add_argument("--top-voxels", type=int, default=20, help="voxels listed per map JSON (default 20)")
    p.add_argument(
        "--region", default=None, help="mask of whole/masks.npz where voxels are zeroed (default: the model's --area)"
    )
    p.add_argument(
        "--ablate-fraction",
        type=float,
        default=0.1,
        help="share of the region's voxels zeroed in the ablation (default 0.1)",
    )
    p.add_argument("--ablate-repeats", type=int, default=4, help="random draws per sample in the control (4)")
    p.add_argument("--no-ablation", action="store_true", help="skip the zeroing check")
    p.add_argument("--no-sample-files", action="store_true", help="write the mean map only, not one per sample")
    p.add_argument("--batch-size", type=int, default=16, help="volumes per Grad-CAM pass (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the ablation's random voxels (default 0)")
    cli.add_device(p)
    p.add_argument("--out", type=Path, default=None, help="output folder (default <root>/runs/concepts/<model>)")
    cli.add_overwrite(p, "redo concept folders that exist, even ones made with other settings")
    cli.add_quiet(p)
    return p


class Locator:
    """The loaded models (the scored ViT3D, the ensemble, the CLIP text tower, optionally a Brain-LLaVA)."""

    def __init__(self, args: argparse.Namespace):
        from transformers import AutoTokenizer, CLIPTextModelWithProjection
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.args, self.device = args, cli.resolve_device(args.device)
        self.runs = [concepts.load_clip_vit3d(folder, self.device) for folder in [args.model, *args.ensemble]]
        self.run, self.model = self.runs[0]
        self.text_model = CLIPTextModelWithProjection.from_pretrained(args.clip_text).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(args.clip_text)
        width = self.text_model.config.projection_dim
        for run, model in self.runs:
            if model.config.clip_dim != width:
                raise BadInputError(run.final / "config.json",
                                    f"predicts {model.config.clip_dim}-d CLIP embeddings, but --clip-text "
                                    f"{args.clip_text} embeds text in {width} dimensions")  # fmt: skip
        self.llava = None
        if args.from_llava is not None:
            from llava_brain.model import load_brain_llava

            require_file(Path(args.from_llava) / "config.json", "a Brain-LLaVA folder (train's final/)")
            self.llava = load_brain_llava(args.from_llava, device=self.device)

    def concept_texts(self, concept: str, samples: list, layout: DatasetRoot) -> list[str]:
        """The text located for each sample: the concept, or Brain-LLaVA's answer about that sample's fMRI."""
        if self.llava is None:
            return [concept] * len(samples)
        from llava_brain.evaluation import generation as gen

        model, processor = self.llava
        prompt = gen.chat_prompt(processor, gen.task_question("concept_localization", concept=concept))
        kwargs = gen.generation_kwargs(16, do_sample=False)
        texts = []
        for start in range(0, len(samples), self.args.batch_size):
            batch = samples[start : start + self.args.batch_size]
            texts += gen.generate_texts(model, processor, [prompt] * len(batch), batch, layout.root, **kwargs)
        return [t or concept for t in texts]  # an empty answer falls back to the concept asked about

    def maps(self, betas, samples, path: Path, targets, brain: np.ndarray, bar) -> tuple[np.ndarray, np.ndarray]:
        """(maps (n, *brain.shape) on the subject's grid, each model's map scaled to max 1 and averaged;
        scores (n,) of the scored model)."""
        import torch

        from llava_brain.evaluation.encoders import prepared_volumes

        per_model, scores = [], None
        for k, (_, model) in enumerate(self.runs):
            grid, maps, found = tuple(model.config.grid), [], []
            for start in range(0, len(samples), self.args.batch_size):
                batch = samples[start : start + self.args.batch_size]
                volumes = torch.from_numpy(prepared_volumes(betas, grid, batch, path)).to(self.device, torch.float32)
                result = concepts.gradcam_tokens(model, volumes, targets[start : start + len(batch)],
                                                 self.args.layers)  # fmt: skip
                maps.append(concepts.to_subject_grid(concepts.to_model_grid(model.config, result.cam), brain))
                found.append(result.score.cpu().numpy())
                bar.update(len(batch))
            per_model.append(np.concatenate(maps))
            scores = np.concatenate(found) if k == 0 else scores
        return concepts.ensemble_maps(per_model), scores

    def pattern(self, sources, target, brain: np.ndarray, bar) -> tuple[np.ndarray, np.ndarray]:
        """(the signed encoding pattern (*brain.shape) of each model, scaled to max |.| 1 and averaged, 0 outside
        `brain`; scores (n,) of the scored model, in source order) over the samples of `sources`, a list of
        (betas, betas path, samples) of one split each, one (D,) target for all."""
        import torch

        from llava_brain.evaluation.encoders import prepared_volumes

        per_model, scores = [], None
        for k, (_, model) in enumerate(self.runs):
            grid, pattern, found = tuple(model.config.grid), concepts.EncodingPattern(), []
            for betas, path, samples in sources:
                for start in range(0, len(samples), self.args.batch_size):
                    batch = samples[start : start + self.args.batch_size]
                    volumes = prepared_volumes(betas, grid, batch, path)
                    with torch.no_grad():
                        tensor = torch.from_numpy(volumes).to(self.device, torch.float32)
                        found.append(concepts.concept_scores(model, tensor, target).cpu().numpy())
                    pattern.add(concept_files.subject_volumes(betas, batch), found[-1])
                    bar.update(len(batch))
            per_model.append(np.where(brain, pattern.result(), 0.0)[None])
            scores = np.concatenate(found) if k == 0 else scores
        return concepts.ensemble_maps(per_model)[0], scores

    def ablation(self, betas, samples, targets, maps: np.ndarray, region: np.ndarray) -> dict:
        """The zeroing check on the scored model, with subject-grid volumes (each sample's rows averaged)."""
        import torch

        from llava_brain.model.processor import resize_volumes

        grid = tuple(self.model.config.grid)
        volumes = concept_files.subject_volumes(betas, samples)

        def score(batch: np.ndarray, i: int) -> np.ndarray:
            resized = torch.from_numpy(resize_volumes(batch, grid)).to(self.device)
            with torch.no_grad():
                return concepts.concept_scores(self.model, resized, targets[i]).cpu().numpy()

        return concepts.ablation_drops(score, volumes, maps, region, fraction=self.args.ablate_fraction,
                                       repeats=self.args.ablate_repeats, seed=self.args.seed)  # fmt: skip


def select_samples(args, layout: DatasetRoot, subject: int, concept: str, captions: dict) -> list:
    """The subject's test samples of --kind that the concept applies to (--samples, --nsd-ids, --max-samples)."""
    from llava_brain.evaluation.concepts import mentions

    samples = prediction_samples(sample_index(layout, subject, SPLIT), args.kind)
    if args.nsd_ids:
        have = {s.nsd_id for s in samples}
        missing = [n for n in args.nsd_ids if n not in have]
        if missing:
            raise BadInputError(layout.fmri2image(subject), f"has no {SPLIT} fMRI of nsdId {missing[:5]} for "
                                f"{subject_name(subject)}; choose --nsd-ids among its test images")  # fmt: skip
        samples = [s for s in samples if s.nsd_id in set(args.nsd_ids)]
    if args.samples == "containing":
        samples = [s for s in samples if mentions(captions.get(s.nsd_id, []), concept)]
        if not samples:
            raise BadInputError(layout.coco_captions, f"no {subject_name(subject)} test sample's captions name "
                                f"{concept!r}; pass --samples all to map it on every sample")  # fmt: skip
    return samples[: args.max_samples] if args.max_samples else samples


def pattern_sources(args, layout: DatasetRoot, subject: int, test: tuple) -> list[tuple]:
    """(betas, betas path, samples of --kind) of each split --pattern-samples names; `test` = the open test betas."""
    from llava_brain.data.fmri import open_betas, read_split

    splits = [(*test, SPLIT)]
    if args.pattern_samples == "all":
        train = open_betas(layout, subject, "tr")
        read_split(layout, subject, "tr", len(train))
        splits.append((train, layout.whole_betas(subject, "tr"), "tr"))
    return [(betas, path, prediction_samples(sample_index(layout, subject, split), args.kind))
            for betas, path, split in splits]  # fmt: skip


def settings_of(args, locator: Locator, subject: int, concept: str) -> dict:
    return {"model": str(locator.run.folder.resolve()), "ensemble": [str(Path(e).resolve()) for e in args.ensemble],
            "clip_text": str(args.clip_text), "from_llava": str(args.from_llava) if args.from_llava else None,
            "subject": subject, "kind": args.kind, "concept": concept, "samples": args.samples,
            "nsd_ids": args.nsd_ids, "max_samples": args.max_samples, "template": args.template,
            "layers": args.layers, "method": args.method, "versus": args.versus,
            "pattern_samples": args.pattern_samples if args.method == "pattern" else None,
            "region": args.region or locator.run.area, "top_voxels": args.top_voxels,
            "ablation": None if args.no_ablation else [args.ablate_fraction, args.ablate_repeats, args.seed],
            "sample_files": not args.no_sample_files}  # fmt: skip


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    runtime.limit_threads()
    parser = build_parser()
    args = cli.parse_args(parser, argv)
    if args.batch_size < 1 or args.top_voxels < 1 or args.ablate_repeats < 1:
        parser.error("--batch-size, --top-voxels and --ablate-repeats must be at least 1")
    if not 0 < args.ablate_fraction < 1:
        parser.error("--ablate-fraction must be in (0, 1)")
    if "{}" not in args.template:
        parser.error("--template needs {} where the concept goes")
    if args.method == "pattern" and args.from_llava is not None:
        parser.error("--method pattern scores one concept text on every test sample; --from-llava gives one per sample")
    lonely = [c for c in args.concept if args.versus and set(args.versus) <= {c}]
    if lonely:
        parser.error(f"--versus needs concepts other than the one located ({lonely[0]!r})")
    from llava_brain.annotations import read_captions
    from llava_brain.data.fmri import open_betas, read_split
    from llava_brain.evaluation.concepts import concept_embeddings

    layout = DatasetRoot(args.dataset_root)
    locator = Locator(args)
    region_name = args.region or locator.run.area
    subjects = args.subject if args.subject is not None else locator.run.subjects
    out = args.out if args.out is not None else layout.concepts(locator.run.folder.name)
    require_writable(out, "--out folder")
    captions = read_captions(require_file(layout.coco_captions, "the COCO captions of make_coco_annotations.py"))
    versus = (concept_embeddings(locator.text_model, locator.tokenizer, args.versus, args.template)
              if args.versus else None)  # fmt: skip
    for subject in subjects:
        betas, path = open_betas(layout, subject, SPLIT), layout.whole_betas(subject, SPLIT)
        read_split(layout, subject, SPLIT, len(betas))
        data = concepts.subject_data(layout, subject, region_name)
        sources = pattern_sources(args, layout, subject, (betas, path)) if args.method == "pattern" else []
        for concept in args.concept:
            stage = StageRun(out / f"{subject_name(subject)}_{args.kind}" / concept_files.slug(concept),
                             settings=settings_of(args, locator, subject, concept),
                             inputs={**locator.run.files, "betas_te": path, "fmri2image": layout.fmri2image(subject),
                                     "masks": layout.whole_masks(subject), "captions": layout.coco_captions,
                                     **({"betas_tr": layout.whole_betas(subject, "tr")} if args.method == "pattern"
                                        and args.pattern_samples == "all" else {})},
                             folder=True)  # fmt: skip
            if not stage.needed(args.overwrite, (stage.output / "mean.nii.gz").is_file()):
                print(f"{subject_name(subject)} {args.kind} {concept!r}: current, kept -> {stage.output}")
                continue
            samples = select_samples(args, layout, subject, concept, captions)
            texts = locator.concept_texts(concept, samples, layout)
            targets = concept_embeddings(locator.text_model, locator.tokenizer, texts, args.template)
            if versus is not None:
                targets = concepts.contrast_targets(targets, versus)
            desc = f"{subject_name(subject)} {concept}"
            if args.method == "pattern":  # one map over every test sample; `samples` get the zeroing check
                population = [s for _, _, split_samples in sources for s in split_samples]
                with tqdm(total=len(population) * len(locator.runs), desc=desc, unit="volume",
                          disable=args.quiet) as bar:  # fmt: skip
                    pattern, found = locator.pattern(sources, targets[0], data["brain"], bar)
                by_key = dict(zip([p.key for p in population], found, strict=True))
                maps, scores = (
                    np.broadcast_to(pattern, (len(samples), *pattern.shape)),
                    np.array([by_key[x.key] for x in samples]),
                )
            else:
                with tqdm(total=len(samples) * len(locator.runs), desc=desc, unit="map", disable=args.quiet) as bar:
                    maps, scores = locator.maps(betas, samples, path, targets, data["brain"], bar)
            ablation = None if args.no_ablation else locator.ablation(betas, samples, targets, maps, data["region"])
            with staged_folder(stage.output) as staging:
                if not args.no_sample_files and args.method == "gradcam":
                    (staging / "maps").mkdir()
                    for s, text, score, volume in zip(samples, texts, scores, maps, strict=True):
                        info = {"sample": s.key, "nsd_id": s.nsd_id, "concept": concept, "text": text,
                                "score": float(score)}  # fmt: skip
                        concept_files.write_map(staging / "maps", s.key, volume, info, data, args.top_voxels)
                mean_info = {"concept": concept, "method": args.method, "versus": args.versus,
                             "samples": len(samples), "mean_score": float(scores.mean())}  # fmt: skip
                if args.method == "pattern":
                    mean_info["pattern_samples"] = len(population)
                mean_map = pattern if args.method == "pattern" else maps.mean(axis=0)
                concept_files.write_map(staging, "mean", mean_map, mean_info, data, args.top_voxels)
                if ablation is not None:
                    write_json(staging / "ablation.json", {"concept": concept, "region": region_name, **ablation})
                write_json(staging / "index.json", {
                    "subject": subject, "kind": args.kind, "concept": concept, "template": args.template,
                    "layers": args.layers, "method": args.method, "versus": args.versus,
                    "signed": args.method == "pattern", "models": [str(r.folder) for r, _ in locator.runs],
                    "patch_sizes": [m.config.patch_size for _, m in locator.runs],
                    "samples": [{"sample": s.key, "nsd_id": s.nsd_id, "text": t, "score": float(v)}
                                for s, t, v in zip(samples, texts, scores, strict=True)],
                    **({"pattern_scores": [{"sample": p.key, "nsd_id": p.nsd_id, "score": float(by_key[p.key])}
                                           for p in population]} if args.method == "pattern" else {})})  # fmt: skip
                stage.finish(args, into=staging, dataset_root=layout.root)
            note = "" if ablation is None else (
                f"; zeroing the top {args.ablate_fraction:.0%} of {region_name}: score drop "
                f"{ablation['drop_located']:.4f} vs {ablation['drop_random']:.4f} for random voxels "
                f"(Wilcoxon p = {ablation['wilcoxon_p']:.2g})")  # fmt: skip
            print(
                f"{desc} ({args.kind}): {len(samples)} samples, mean score {scores.mean():.3f}{note} -> {stage.output}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
