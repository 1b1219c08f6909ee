"""Evaluation metrics shared by the evaluation scripts (retrieval of predicted embeddings)."""

from llava_brain.evaluation.retrieval import (
    embedding_metrics,
    mindeye_retrieval,
    retrieval_report,
    top1_retrieval,
)

__all__ = ["embedding_metrics", "mindeye_retrieval", "retrieval_report", "top1_retrieval"]
