"""Evaluation metrics shared by the evaluation scripts (retrieval of predicted embeddings).

`report` reads eval_retrieval.py's JSON and lays out tables; `encoders` holds the ViT3D and ridge prediction code.
"""

from llava_brain.evaluation.retrieval import (
    embedding_metrics,
    mindeye_retrieval,
    retrieval_report,
    top1_retrieval,
)

__all__ = ["embedding_metrics", "mindeye_retrieval", "retrieval_report", "top1_retrieval"]
