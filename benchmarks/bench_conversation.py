"""How close does generate_conversation.py's openai backend come to its concurrency limit?

Starts a local OpenAI-compatible server (llava_brain/testing/fake_openai.py) in which every request
takes --latency seconds and nothing fails, writes a synthetic dataset root of --images images
(COCO-style captions and boxes), and runs the stage in this process against it with --concurrency
requests in flight. A perfect client keeps `concurrency` requests in flight all the time, i.e.
concurrency / latency requests per second; prints

  efficiency=<achieved requests/s / (concurrency / latency)>   (target >= 0.8)

plus requests/s and the stage's wall time. The time covers the whole `main()` (reading the
annotation files, the requests, appending and compacting the JSONL), not interpreter start-up.

  python benchmarks/bench_conversation.py                                   # 200 images, 16 in flight, 200 ms
  python benchmarks/bench_conversation.py --images 1000 --concurrency 64 --latency 0.5
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from llava_brain.annotations import write_captions, write_instances
from llava_brain.io import write_json
from llava_brain.layout import DatasetRoot
from llava_brain.testing.fake_openai import FakeOpenAI

REPO = Path(__file__).resolve().parent.parent
CATEGORIES = {1: "person", 3: "car", 18: "dog", 62: "chair", 67: "dining table"}


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=200, help="images (= requests, no faults) per run")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (the stage's --concurrency)")
    p.add_argument("--latency", type=float, default=0.2, help="seconds the server takes per request")
    p.add_argument("--repeats", type=int, default=2, help="timed runs; the best is reported")
    return p


def write_root(root: Path, num_images: int) -> None:
    """A dataset root with COCO-like context per image: 5 captions, 4 boxes, one prepared subject."""
    layout = DatasetRoot(root)
    ids = list(range(num_images))
    captions = {
        i: [f"A person and a dog next to a car on street number {i}, variant {k}." for k in range(5)] for i in ids
    }
    boxes = {
        i: [{"category_id": c, "box": [10.0 * k, 20.0 + k, 200.0 + 10 * k, 300.0], "iscrowd": 0} for k, c in
            enumerate((1, 3, 18, 62))]
        for i in ids
    }  # fmt: skip
    write_captions(layout.coco_captions, captions, {"description": "benchmark"})
    write_instances(layout.coco_instances, boxes, CATEGORIES, {"description": "benchmark"})
    write_json(layout.fmri2image(1), {"train": ids, "val": []})


def load_stage():
    path = REPO / "prepare_datasets" / "generate_conversation.py"
    spec = importlib.util.spec_from_file_location("generate_conversation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stage = load_stage()
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench-not-a-real-key")
    best = None
    with tempfile.TemporaryDirectory() as tmp, FakeOpenAI(latency=args.latency) as server:
        write_root(Path(tmp), args.images)
        for _ in range(args.repeats):
            before = server.requests
            start = time.perf_counter()
            code = stage.main([
                "--dataset-root", tmp, "--prompt-type", "conversation", "--backend", "openai",
                "--base-url", server.base_url, "--concurrency", str(args.concurrency), "--overwrite", "--quiet",
            ])  # fmt: skip
            seconds = time.perf_counter() - start
            if code != 0:
                print(f"the stage exited with {code}", file=sys.stderr)
                return 1
            requests = server.requests - before
            if best is None or requests / seconds > best[0] / best[1]:
                best = (requests, seconds)
    requests, seconds = best
    rate = requests / seconds
    ideal = args.concurrency / args.latency
    result = {"images": args.images, "concurrency": args.concurrency, "latency_s": args.latency,
              "requests": requests, "seconds": round(seconds, 3), "requests_per_s": round(rate, 1),
              "ideal_requests_per_s": round(ideal, 1), "efficiency": round(rate / ideal, 3)}  # fmt: skip
    print(json.dumps(result))
    print(f"efficiency={rate / ideal:.3f} requests/s={rate:.1f} (ideal {ideal:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
