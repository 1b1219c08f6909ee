"""The published rows of the paper's Tables 1 and 2, as reference rows of a report, and the tables' layouts.

Transcribed from the paper (Shen et al., NeurIPS 2024, arXiv 2404.19438; docs/paper.md holds the same
tables, and tests/test_make_report.py checks the two agree). Values are on the paper's scale: Table 1 in
percent (BLEU ... CLIP-S x 100); Table 2 PixCorr, SSIM, EffNet-B and SwAV as fractions, the four two-way
identification scores in percent. A report prints measured values on the same scale.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    key: str  # the metric's name in the evaluators' JSON
    header: str
    higher_is_better: bool
    percent: bool  # shown x 100 (the evaluators store fractions)
    digits: int

    @property
    def title(self) -> str:
        return f"{self.header} {'↑' if self.higher_is_better else '↓'}"

    def format(self, value) -> str:
        if value is None:
            return "-"
        if isinstance(value, str):
            return "n/a"  # "unavailable": the report's notes say why
        value = 100.0 * value if self.percent else value
        text = f"{value:.{self.digits}f}"
        return text[1:] if not self.percent and text.startswith("0.") else text.replace("-0.", "-.")


# Table 1: captioning. Columns in the paper's order, then the two extra scores the evaluator adds.
TABLE1 = (
    Column("bleu1", "BLEU-1", True, True, 2), Column("bleu2", "BLEU-2", True, True, 2),
    Column("bleu3", "BLEU-3", True, True, 2), Column("bleu4", "BLEU-4", True, True, 2),
    Column("meteor", "METEOR", True, True, 2), Column("rouge_l", "ROUGE-L", True, True, 2),
    Column("cider", "CIDEr", True, True, 2), Column("spice", "SPICE", True, True, 2),
    Column("clip_s", "CLIP-S", True, True, 2), Column("refclip_s", "RefCLIP-S", True, True, 2),
    Column("sentence_sim", "MiniLM sim", True, True, 2), Column("object_hit", "Objects named", True, True, 1),
)  # fmt: skip
# Table 2: reconstruction.
TABLE2 = (
    Column("pixcorr", "PixCorr", True, False, 3), Column("ssim", "SSIM", True, False, 3),
    Column("alexnet2", "AlexNet(2)", True, True, 1), Column("alexnet5", "AlexNet(5)", True, True, 1),
    Column("inceptionv3", "Inception", True, True, 1), Column("clip", "CLIP", True, True, 1),
    Column("effnet", "EffNet-B", False, False, 3), Column("swav", "SwAV", False, False, 3),
)  # fmt: skip


def _row(values: tuple, columns: tuple[Column, ...]) -> dict[str, float]:
    """Paper-scale numbers -> the evaluators' scale (fractions), so a reference row formats like a measured one."""
    return {c.key: (v / 100.0 if c.percent else v) for c, v in zip(columns, values, strict=True)}


# (method, #models: 1 = one model for all four subjects, 4 = one per subject, values on the paper's scale)
_TABLE1_PUBLISHED = (
    ("SDRecon", 4, (36.21, 17.11, 7.72, 3.43, 10.03, 25.13, 13.83, 5.02, 61.07)),
    ("OneLLM", 4, (47.04, 26.97, 15.49, 9.51, 13.55, 35.05, 22.99, 6.26, 54.80)),
    ("BrainCap", 4, (55.96, 36.21, 22.70, 14.51, 16.68, 40.69, 41.30, 9.06, 64.31)),
    ("UMBRAE", 1, (57.84, 38.43, 25.41, 17.17, 18.70, 42.14, 53.87, 12.27, 66.10)),
    ("the paper", 1, (57.19, 37.17, 23.78, 15.85, 18.60, 36.67, 49.51, 12.39, 65.49)),
    ("the paper, BLIP-2 captions as references", 1, (64.26, 51.44, 47.70, 32.17, 20.41, 52.61, 83.94, 18.27, 68.72)),
)
_TABLE2_PUBLISHED = (
    ("Brain-Diffuser", 4, (0.254, 0.356, 94.2, 96.2, 87.2, 91.5, 0.775, 0.423)),
    ("MindEye", 4, (0.309, 0.323, 94.7, 97.8, 93.8, 94.1, 0.645, 0.367)),
    ("UMBRAE", 1, (0.283, 0.328, 93.9, 96.7, 93.4, 94.1, 0.700, 0.393)),
    ("the paper", 1, (0.265, 0.357, 93.1, 97.1, 96.8, 97.5, 0.633, 0.321)),
    ("the paper, single trial", 1, (0.257, 0.336, 91.2, 96.3, 94.6, 95.3, 0.671, 0.324)),
    ("MindEye2 (1,000 images, 40 sessions)", 4, (0.322, 0.431, 96.1, 98.6, 95.4, 93.0, 0.619, 0.344)),
)

PUBLISHED_TABLE1 = [(m, n, _row(v, TABLE1[:9])) for m, n, v in _TABLE1_PUBLISHED]
PUBLISHED_TABLE2 = [(m, n, _row(v, TABLE2)) for m, n, v in _TABLE2_PUBLISHED]
