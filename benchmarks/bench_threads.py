"""How torch's CPU thread count behaves on a machine that other work also uses (why the demo runs one thread).

Times the same small training loop (a conv net, AdamW, fixed data) with 1 and with N torch threads,
first on the machine as it is, then while `--busy` processes spin on the CPU (as other jobs would on
a shared CI machine). Each timing runs in a fresh interpreter, because OpenMP reads OMP_NUM_THREADS
once at start-up. Prints the seconds and the ratios `N threads / 1 thread` for both conditions:
a ratio below 1 means the extra threads help, above 1 that they cost.

  python benchmarks/bench_threads.py                      # N = 2, 2 busy processes, 150 steps
  python benchmarks/bench_threads.py --threads 4 --busy 4 --steps 300
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import time

LOOP = """
import time, torch
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                          torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(16 * 32 * 32, 10))
opt = torch.optim.AdamW(net.parameters())
x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
start = time.perf_counter()
for _ in range({steps}):
    loss = torch.nn.functional.cross_entropy(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
print(time.perf_counter() - start)
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch threads to compare against one (default 2)")
    p.add_argument("--busy", type=int, default=2, help="CPU-spinning processes for the loaded condition (default 2)")
    p.add_argument("--steps", type=int, default=150, help="training steps per timing (default 150)")
    return p


def timed(threads: int, steps: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("OMP_WAIT_POLICY", None)  # the library default (spinning) is what the stages get
    out = subprocess.run([sys.executable, "-c", LOOP.format(steps=steps)], env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return float(out.stdout.strip())


def spin(stop) -> None:
    while not stop.is_set():
        sum(range(10_000))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    idle = {n: timed(n, args.steps) for n in (1, args.threads)}
    stop = mp.Event()
    workers = [mp.Process(target=spin, args=(stop,), daemon=True) for _ in range(args.busy)]
    for w in workers:
        w.start()
    time.sleep(0.5)  # let the spinners reach full speed; not a correctness wait
    try:
        loaded = {n: timed(n, args.steps) for n in (1, args.threads)}
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=10)
    n = args.threads
    print(f"idle:   1 thread {idle[1]:.2f} s, {n} threads {idle[n]:.2f} s, ratio={idle[n] / idle[1]:.2f}")
    print(f"loaded ({args.busy} busy): 1 thread {loaded[1]:.2f} s, {n} threads {loaded[n]:.2f} s, "
          f"ratio={loaded[n] / loaded[1]:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
