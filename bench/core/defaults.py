"""What every layer may read without a heavy import: the choices of a run's settings, the
timing defaults and the one cache root."""

from __future__ import annotations

import os
from pathlib import Path

DTYPES = ("fp32", "fp16", "bf16")
# "default", "reduce-overhead", "max-autotune": torch.compile modes; "cudagraph": the eager
# forward captured in a CUDA graph (no compilation, no Python launch overhead).
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "cudagraph")
# Forwards before timing (per model), forwards per timed round, and timed rounds: 6 or more
# rounds give a median its 95% interval.
DEFAULT_WARMUP, DEFAULT_ITERS, DEFAULT_ROUNDS = 10, 10, 7


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/ppt-bench`` (``~/.cache/ppt-bench`` when the variable is unset): the
    folder of everything ppt-bench caches (the image cache, the trained digits model)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "ppt-bench"
