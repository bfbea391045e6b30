"""Reduced-precision inference: the one autocast helper of the model wrappers.

A model's ``precision`` knob is ``fp32`` (no autocast) or ``bf16``/``fp16`` (`torch.autocast` around the forward
passes; weights stay float32). Outputs are cast back to float32 by the callers before they leave the models layer.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    """`torch.autocast` on `device`'s type for ``bf16``/``fp16``; a no-op context for ``fp32``.

    Raises:
        ValueError: `precision` is none of ``fp32``, ``bf16``, ``fp16``.
    """
    if precision == "fp32":
        return nullcontext()
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])
