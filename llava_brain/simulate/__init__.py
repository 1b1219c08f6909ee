"""mini-NSD: a simulator that writes raw-NSD-format files with a learnable brain signal."""

from llava_brain.simulate.mini_nsd import MiniNsdConfig, write_mini_nsd

__all__ = ["MiniNsdConfig", "write_mini_nsd"]
