"""Precision: the dtypes a run can ask for and the autocast context each means."""

from __future__ import annotations

import contextlib

import torch

# Autocast dtypes; fp32 runs without autocast.
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def amp_autocast(device: str | torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """Autocast to fp16 / bf16 on ``device``'s type; a no-op context for fp32."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=AMP_DTYPES[dtype])
