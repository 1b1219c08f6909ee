"""How many CPU threads this process may really use, so that torch does not oversubscribe a shared machine.

torch sizes its intra-op thread pool from the cores it can see. In a container or a CI job with a
CPU quota (cgroup `cpu.max`), that can be many more than the job may use: 64 threads time-sliced
onto 2 CPUs run far slower than 2 (measured on a loaded CI machine: the tiny VAE's 500 steps took
1875 s instead of ~45 s), and the float results then depend on the host. `limit_threads()` caps the
pool at the quota. `OMP_NUM_THREADS`, when set, wins (it is what `accelerate launch` sets per process).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cgroup_cpu_limit(path: Path = CGROUP_CPU_MAX) -> int | None:
    """CPUs allowed by a cgroup v2 quota ("<quota> <period>" in µs), rounded up; None without a quota."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return min(cpus, limit) if limit else cpus


def limit_threads() -> int:
    """Set torch's intra-op threads to OMP_NUM_THREADS if given, else to `available_cpus()`; return it."""
    import torch

    value = os.environ.get("OMP_NUM_THREADS", "")
    threads = int(value) if value.isdigit() and int(value) > 0 else available_cpus()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
