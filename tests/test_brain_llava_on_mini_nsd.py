"""On mini-NSD, the tiny Brain-LLaVA reads the brain: its caption loss is lower from the sample's own fMRI than
from another image's, and its greedy captions win most metrics against the shuffled-fMRI control.

On the shared small chain (tests/mini_chain.py: mini-NSD, tiny models, the ViT3D, Brain-LLaVA's two stages on the
brief captions and its greedy captions from real and from deranged (shuffled) fMRI), both caption files are
scored by eval_captions.py with the tiny CLIP. Fixed seeds, one torch thread (make test): the figures are
deterministic.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from mini_chain import brain_llava, mini_chain, run


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    chain, captions = mini_chain(tmp_path_factory), brain_llava(tmp_path_factory)
    base, tiny = tmp_path_factory.mktemp("brain_llava_scores"), chain["tiny"]
    results = {}
    for control in ("real", "shuffled"):
        scored = base / f"{control}.json"
        run("tools/evaluate/eval_captions.py", "--captions", captions[control], "--dataset-root", chain["root"],
            "--refs", "coco", "--metrics", "bleu4", "cider", "clip_s", "object_hit", "--clip-vision",
            tiny / "clip_vision", "--clip-text", tiny / "clip_text", "--device", "cpu", "--json", scored,
            "--quiet")  # fmt: skip
        results[control] = json.loads(scored.read_text())["mean"]
    return results


def test_brief_captions_from_real_fmri_win_most_metrics(scores):
    """Greedy captions are a coarse read-out of this 1-subject chain, and their margins moved with the CPU
    (x100, 50 test images, real vs shuffled fMRI): BLEU-4 45.7 vs 44.4, CIDEr 69.5 vs 54.6, CLIP-S 69.2 vs 64.2
    on one machine; 47.0 vs 46.1, 69.2 vs 66.8, 75.9 vs 75.0 on another (and, before the fused optimizer, 45.3
    vs 44.6, 66.5 vs 51.7, 59.1 vs 64.7 there). So this asks only that the captions from the sample's own fMRI
    win at least two of the three; the learning claim is the caption loss below, and the demo's 4-subject
    report shows the generated-caption margins."""
    real, shuffled = scores["real"], scores["shuffled"]
    wins = [m for m in ("bleu4", "cider", "clip_s") if real[m] > shuffled[m]]
    assert len(wins) >= 2, scores


def test_captions_cover_every_test_sample_and_vary(tmp_path_factory):
    captions = brain_llava(tmp_path_factory)
    lines = {c: [json.loads(line) for line in captions[c].read_text().splitlines()] for c in ("real", "shuffled")}
    assert [x["sample"] for x in lines["real"]] == [x["sample"] for x in lines["shuffled"]]
    texts = [x["text"] for x in lines["real"]]
    assert all(t.strip() for t in texts)
    assert len(set(texts)) >= 5, texts  # not one caption for every brain


def test_caption_loss_is_lower_with_the_samples_own_fmri(tmp_path_factory):
    """Teacher-forced loss of the test samples' brief captions, from their own fMRI and from another image's:
    the continuous form of the caption tests above (it does not hinge on which words greedy decoding picks)."""
    import torch

    from llava_brain.data.sft_dataset import SftCollator, SftDataset
    from llava_brain.layout import DatasetRoot
    from llava_brain.model.brain_llava import load_brain_llava

    chain, built = mini_chain(tmp_path_factory), brain_llava(tmp_path_factory)
    model, processor = load_brain_llava(built["model"])
    data = SftDataset(DatasetRoot(chain["root"]).sft_data("te"), chain["root"], processor.tokenizer,
                      grid=processor.grid, num_image_tokens=processor.num_tokens, max_length=512,
                      types=["brief_description"])  # fmt: skip
    items = [data[k] for k in range(len(data))]
    ids = np.array([r["nsd_id"] for r in data.records])
    # Another image's volume for each caption: the records' order rolled by half, skipping same-image pairs.
    partner = np.roll(np.arange(len(items)), len(items) // 2)
    keep = ids != ids[partner]
    assert keep.mean() > 0.9
    collate = SftCollator(pad_token_id=processor.tokenizer.pad_token_id)
    losses = {}
    with torch.no_grad():
        for control in ("real", "shuffled"):
            total = []
            for start in range(0, len(items), 32):
                rows = [k for k in range(start, min(start + 32, len(items))) if keep[k]]
                batch = collate([items[k] for k in rows])
                if control == "shuffled":
                    batch["pixel_values"] = torch.stack([items[partner[k]]["pixel_values"].float() for k in rows])
                total.append(float(model(**batch).loss) * len(rows))
            losses[control] = sum(total) / keep.sum()
    # Measured (mean loss per caption token): 0.818 from the sample's own fMRI, 0.923 from another image's.
    assert losses["real"] < losses["shuffled"] - 0.03, losses
