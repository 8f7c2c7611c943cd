"""Helpers shared by the Triton kernel files (imports triton: load lazily).

* ``interpreting()``: whether kernels run in the Triton interpreter (``TRITON_INTERPRET=1``).
* ``dot_precision()``: ``tl.dot`` precision for fp32 operands on the GPU; TF32 by default (the
  tolerances of KERNELS.md), ``FASTHASH_DOT_PRECISION=ieee|tf32|tf32x3`` overrides it. The
  interpreter always computes in full fp32.
* ``num_sms(device)``: streaming multiprocessors, used to split column loops when there are
  too few row tiles to fill the GPU.
"""

from __future__ import annotations

import functools
import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision() -> str:
    p = os.environ.get("FASTHASH_DOT_PRECISION", "tf32")
    if p not in ("ieee", "tf32", "tf32x3"):
        raise ValueError(f"FASTHASH_DOT_PRECISION must be ieee, tf32 or tf32x3, got {p!r}")
    return p


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """SM count of a CUDA device; 1 elsewhere (the interpreter runs programs one by one)."""
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def next_pow2(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum) (GPU tiles must be >= 16)."""
    p = minimum
    while p < n:
        p *= 2
    return p


def check_device(*ts: torch.Tensor | None) -> None:
    """Triton launchers need CUDA tensors, or CPU tensors under the interpreter."""
    for t in ts:
        if t is None:
            continue
        if t.device.type == "cpu" and not interpreting():
            raise ValueError(
                "Triton launchers need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), "
                f"got a {t.device} tensor"
            )
