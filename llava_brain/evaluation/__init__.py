"""Evaluation metrics shared by the evaluation scripts (retrieval of predicted embeddings).

`report` reads both writers' results into one shape; `inputs` loads `.npy` inputs with one-line errors.
"""

from llava_brain.evaluation.retrieval import (
    embedding_metrics,
    mindeye_retrieval,
    retrieval_report,
    top1_retrieval,
)

__all__ = ["embedding_metrics", "mindeye_retrieval", "retrieval_report", "top1_retrieval"]
