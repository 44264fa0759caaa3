"""Device, precision and CPU-thread policy, resolved once and passed to the other modules."""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from charlm.errors import ConfigError

# nn.GRU gives NaNs on MPS (pytorch/pytorch#94691, open), so ``auto`` keeps it on the CPU.
MPS_CELLS = ("lstm", "rnn")
DEVICE_NAMES = "auto, cpu, cuda, cuda:N or mps"


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str = "auto", cell: str | None = None) -> torch.device:
    """``auto`` is CUDA when available, else MPS (Apple GPUs) when the model's ``cell`` runs
    there, else CPU; anything else must exist here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available() and (cell is None or cell in MPS_CELLS):
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use {DEVICE_NAMES}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name!r} requested but only {torch.cuda.device_count()} GPU(s) exist"
            )
    elif device.type == "mps":
        if not mps_available():
            raise ConfigError(
                f"device {name!r} requested but PyTorch has no MPS (Apple GPU) support here; "
                "use --device cpu (or auto)"
            )
    elif device.type != "cpu":
        raise ConfigError(f"unsupported device {name!r}; use {DEVICE_NAMES}")
    return device


def cpu_has_fast_bf16() -> bool:
    """True when oneDNN has native bf16 kernels (AVX512-BF16 or AMX). Without them bf16
    matmuls are emulated and run hundreds of times slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: fp16 with loss scaling on CUDA (see :func:`amp_plan`), bf16 on CPUs that run
    it natively, else fp32; fp32 on MPS."""
    from charlm.config import PRECISIONS

    if precision not in PRECISIONS:  # before oneDNN or CUDA sees it
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if device.type == "mps":
        # Autocast of RNN kernels on MPS is untested here: keep the weights' fp32.
        if precision not in ("auto", "fp32"):
            raise ConfigError(f"precision {precision} is not supported on mps; use fp32 (or auto)")
        return "fp32"
    if precision == "auto":
        if device.type == "cuda":
            return "fp16"
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


@dataclass(frozen=True)
class AmpPlan:
    """What a resolved precision means on a device, for the whole model and for its
    recurrent layers, which autocast treats apart."""

    precision: str  # fp32, bf16 or fp16, as resolved
    autocast_dtype: torch.dtype | None  # None: no autocast
    rnn_dtype: torch.dtype  # what nn.RNN/LSTM/GRU compute in
    loss_scaling: bool  # whether a GradScaler scales the loss

    def describe(self) -> str:
        if self.autocast_dtype is None:
            return self.precision
        rnn = str(self.rnn_dtype).removeprefix("torch.")
        scaled = ", loss scaling" if self.loss_scaling else ""
        return f"{self.precision} (recurrent layers {rnn}{scaled})"


def amp_plan(precision: str, device: torch.device, cell: str = "lstm") -> AmpPlan:
    """The mixed-precision plan for an already resolved ``precision``.

    On CUDA, autocast sends cuDNN RNNs through a wrapper of their own
    (aten/src/ATen/cudnn/AutocastRNN.cpp, registered for ``_cudnn_rnn``) that casts input,
    weights and states to fp16 whatever dtype autocast was given: under bf16 autocast the
    recurrent layers still run in fp16 (checked on an H100 with torch 2.11: an LSTM's output
    is float16 under ``torch.autocast("cuda", torch.bfloat16)``). fp16 gradients underflow
    without loss scaling, so on CUDA every autocast precision scales the loss. On the CPU,
    autocast runs LSTM and RNN in bf16 and leaves GRU in fp32; bf16's range needs no scaling.
    """
    if precision == "fp32":
        return AmpPlan("fp32", None, torch.float32, False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cuda":
        return AmpPlan(precision, dtype, torch.float16, True)
    rnn = torch.float32 if cell == "gru" else dtype
    return AmpPlan(precision, dtype, rnn, False)


def allow_tf32(device: torch.device) -> None:
    """fp32 on CUDA uses TF32 tensor cores for matmuls and cuDNN (10 mantissa bits in the
    products, fp32 accumulation), as nanoGPT does: several times faster than strict fp32."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device, precision: str):
    """The autocast context for a resolved precision (master weights stay fp32)."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA or MPS) to finish, so that a timer read
    next counts it; the CPU computes in order, so there it returns at once."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


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
