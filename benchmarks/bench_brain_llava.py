"""Two ratios of Brain-LLaVA, each against a baseline timed in the same run on the same machine.

speedup: greedy generation of --num-samples answers in batches of --batch-size (left padding, KV cache,
  `model.generate`) against the same answers generated one sample at a time. The outputs must be identical
  token for token (checked: a speed-up that changes the answers would be no speed-up); speedup = time one at
  a time / time batched.
tower_overhead: one training step (forward + backward + AdamW) of the whole Brain-LLaVA (stage 2: projector +
  LLM trainable, ViT3D frozen) against one step of the bare LLM on the same number of tokens (the fMRI
  placeholders replaced by ordinary tokens); tower_overhead = step time with tower and projector / bare LLM
  step time - 1, the share the frozen tower and the projector add.

Both models are built from configs with random weights (what is timed does not depend on the weights) and
the same seed: a ViT3D on NSD's subj01 grid at patch 14 with --tower-layers layers, and a Llama of
--llm-hidden / --llm-layers over a 32k vocabulary. Timed runs alternate between the two sides after a warm-up,
and the median is taken, so load or clock drift hits both alike.

  python benchmarks/bench_brain_llava.py                       # CPU-sized (~1 min on 2 cores)
  python benchmarks/bench_brain_llava.py --device cuda --llm-hidden 4096 --llm-layers 32 --tower-layers 16 \\
      --tower-hidden 768 --batch-size 16 --num-samples 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llava_brain.model import ViT3D, ViT3DConfig
from llava_brain.model.brain_llava import brain_llava_config

GRID = (81, 104, 83)  # NSD subj01, 1.8 mm
VOCAB = 32000
IMAGE_TOKEN_ID = VOCAB - 1
PROMPT_TOKENS = 24  # text tokens around the placeholders (a question of ~20 words)


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both sides run (default cpu)")
    p.add_argument("--tower-hidden", type=int, default=128, help="ViT3D width (paper: 768; default 128)")
    p.add_argument("--tower-layers", type=int, default=4, help="ViT3D layers (paper: 16; default 4)")
    p.add_argument("--active-fraction", type=float, default=0.35,
                   help="share of the grid's patches that are tokens (NSD's nsdgeneral union: ~a third)")  # fmt: skip
    p.add_argument("--llm-hidden", type=int, default=256, help="LLM width (Llama-3-8B: 4096; default 256)")
    p.add_argument("--llm-layers", type=int, default=4, help="LLM layers (Llama-3-8B: 32; default 4)")
    p.add_argument("--batch-size", type=int, default=16, help="generation batch and training batch (default 16)")
    p.add_argument("--num-samples", type=int, default=32, help="answers generated per side (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens per answer (default 16)")
    p.add_argument("--train-batch", type=int, default=4, help="records per training step (default 4)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per side (default 5)")
    p.add_argument("--seed", type=int, default=0, help="weights and inputs (default 0)")
    return p


def build(args):
    torch.manual_seed(args.seed)
    patches = [(n + 13) // 14 for n in GRID]
    total = patches[0] * patches[1] * patches[2]
    # A random share of the patches: which ones are tokens does not change the cost, how many does.
    active = sorted(torch.randperm(total)[: max(1, round(args.active_fraction * total))].tolist())
    heads = max(1, args.tower_hidden // 64)
    tower = ViT3DConfig(grid=GRID, patch_size=14, hidden_size=args.tower_hidden, num_layers=args.tower_layers,
                        num_heads=heads, clip_dim=64, head_hidden=128, active_patches=active)  # fmt: skip
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=args.llm_hidden, intermediate_size=4 * args.llm_hidden,
                       num_hidden_layers=args.llm_layers, num_attention_heads=max(1, args.llm_hidden // 64),
                       num_key_value_heads=max(1, args.llm_hidden // 256), pad_token_id=0, eos_token_id=1,
                       bos_token_id=2)  # fmt: skip
    from transformers import LlavaForConditionalGeneration

    config = brain_llava_config(tower, text, image_token_id=IMAGE_TOKEN_ID)
    model = LlavaForConditionalGeneration(config).to(args.device).eval()
    num_tokens = ViT3D(tower).num_tokens
    return model, num_tokens


def prompts(args, n: int, num_tokens: int, seed: int):
    """(input_ids, attention_mask) of n prompts of different lengths, left-padded: a few text tokens, the
    placeholders, a question of PROMPT_TOKENS - k tokens."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        text = torch.randint(3, VOCAB - 2, (PROMPT_TOKENS - i % 5,), generator=g)
        rows.append(torch.cat([text[:3], torch.full((num_tokens,), IMAGE_TOKEN_ID), text[3:]]))
    width = max(len(r) for r in rows)
    ids = torch.zeros((n, width), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    return ids, mask


@torch.no_grad()
def generate(model, ids, mask, volumes, args) -> tuple[list[list[int]], float]:
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=volumes, max_new_tokens=args.max_new_tokens,
                         do_sample=False, min_new_tokens=args.max_new_tokens, pad_token_id=0)  # fmt: skip
    return out[:, ids.shape[1] :].tolist(), time.perf_counter() - start


def bench_generation(model, num_tokens: int, args) -> tuple[float, bool]:
    ids, mask = prompts(args, args.num_samples, num_tokens, args.seed)
    volumes = torch.randn((args.num_samples, *GRID), generator=torch.Generator().manual_seed(args.seed))
    ids, mask, volumes = ids.to(args.device), mask.to(args.device), volumes.to(args.device)
    batched, one = [], []
    t_batched = t_one = 0.0
    for start in range(0, args.num_samples, args.batch_size):
        part = slice(start, start + args.batch_size)
        answers, seconds = generate(model, ids[part], mask[part], volumes[part], args)
        batched += answers
        t_batched += seconds
    for i in range(args.num_samples):
        keep = mask[i].bool()  # the prompt without its padding
        answers, seconds = generate(model, ids[i : i + 1, keep], mask[i : i + 1, keep], volumes[i : i + 1], args)
        one += answers
        t_one += seconds
    return t_one / t_batched, batched == one


def step_time(model, batch: dict, optimizer) -> float:
    start = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def bench_training(model, num_tokens: int, args) -> float:
    llm = LlamaForCausalLM(model.config.text_config).to(args.device)
    llm.model.load_state_dict(model.model.language_model.state_dict())
    model.train(), llm.train()
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)  # stage 2: the tower is frozen
    ids, mask = prompts(args, args.train_batch, num_tokens, args.seed + 1)
    volumes = torch.randn((args.train_batch, *GRID), generator=torch.Generator().manual_seed(args.seed + 1))
    text_ids = torch.where(ids == IMAGE_TOKEN_ID, torch.full_like(ids, 5), ids)  # same length, text only
    full = {"input_ids": ids, "attention_mask": mask, "pixel_values": volumes, "labels": ids.clone()}
    bare = {"input_ids": text_ids, "attention_mask": mask, "labels": text_ids.clone()}
    full["labels"][ids == IMAGE_TOKEN_ID] = -100
    full = {k: v.to(args.device) for k, v in full.items()}
    bare = {k: v.to(args.device) for k, v in bare.items()}
    opt_full = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    opt_bare = torch.optim.AdamW(llm.parameters(), lr=1e-5)
    step_time(model, full, opt_full), step_time(llm, bare, opt_bare)  # warm-up
    times_full, times_bare = [], []
    for _ in range(args.steps):
        times_full.append(step_time(model, full, opt_full))
        times_bare.append(step_time(llm, bare, opt_bare))
    return statistics.median(times_full) / statistics.median(times_bare) - 1.0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model, num_tokens = build(args)
    print(f"Brain-LLaVA: ViT3D {args.tower_layers}x{args.tower_hidden} on {GRID} ({num_tokens} tokens), "
          f"LLM {args.llm_layers}x{args.llm_hidden}, device {args.device}")  # fmt: skip
    speedup, identical = bench_generation(model, num_tokens, args)
    print(f"speedup={speedup:.2f} (batch {args.batch_size} vs one at a time, {args.num_samples} greedy answers of "
          f"{args.max_new_tokens} tokens; identical outputs: {identical})")  # fmt: skip
    overhead = bench_training(model, num_tokens, args)
    print(f"tower_overhead={overhead:.2f} (training step with frozen ViT3D + projector vs the bare LLM on the same "
          f"{args.train_batch} x {PROMPT_TOKENS + num_tokens} tokens)")  # fmt: skip
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
