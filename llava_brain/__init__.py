"""Neuro-Vision to Language: fMRI -> ViT3D -> LLaVA-style LLM and Stable unCLIP reconstruction.

The library holds the nouns (dataset layout, NSD readers, models, datasets, metrics); the stage
scripts in `prepare_datasets/`, `tools/` and the repository root are the verbs.
"""

__version__ = "0.1.0"
