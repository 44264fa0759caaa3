"""Device, precision and CPU-thread policy, resolved once and passed to the other modules."""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch

from charlm.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU; anything else must exist here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name!r} requested but only {torch.cuda.device_count()} GPU(s) exist"
            )
    elif device.type != "cpu":
        raise ConfigError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


def cpu_has_fast_bf16() -> bool:
    """True when oneDNN has native bf16 kernels (AVX512-BF16 or AMX). Without them bf16
    matmuls are emulated and run hundreds of times slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 where the hardware runs it natively, fp16 on older GPUs, else fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
        # oneDNN has no bf16 LSTM/GRU/RNN kernels without these instructions: it fails
        # ("could not create a primitive descriptor"), and bf16 matmuls run ~300x slower.
        raise ConfigError(
            "precision bf16 needs a CPU with AVX512-BF16 or AMX, which this one lacks; "
            "use --precision fp32 (or auto)"
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU does not support bf16; use --precision fp16 or fp32")
    return precision


def autocast(device: torch.device, precision: str):
    """The autocast context for a resolved precision (master weights stay fp32)."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def set_threads(threads: int = 0) -> int:
    """Use ``threads`` CPU threads for torch (0: every CPU this process may run on); never
    more than those CPUs, as extra threads only wait for each other."""
    n = min(threads, cpu_count()) if threads else cpu_count()
    torch.set_num_threads(n)
    return n
