"""Where and in what precision the neural models compute: device choice and the bf16 policy."""

from __future__ import annotations

from recvae.errors import ParameterError

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


class CUDAUnavailableError(ParameterError):
    """CUDA was asked for explicitly, but this torch has no CUDA device."""


def resolve_device(device) -> torch.device:
    """"auto" -> CUDA when available, else CPU; anything else goes to ``torch.device``.
    Asking for CUDA where torch has none raises :class:`CUDAUnavailableError` (a ValueError)."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ParameterError("device", f"expected 'auto', 'cpu', 'cuda' or a torch.device, got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "no usable CUDA device"
        raise CUDAUnavailableError(
            "device", f"{str(device)!r} asks for CUDA, but this torch ({torch.__version__}) has {build}; use 'cpu' or 'auto'"
        )
    return dev


def stored_device(stored, where) -> torch.device:
    """The device saved with a model is a preference: CUDA where this torch has none means CPU."""
    try:
        return resolve_device(stored)
    except CUDAUnavailableError:
        logger.info("%s: trained on %s; this machine has no CUDA, loading on the CPU", where, stored)
        return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "bf16" where bf16 matrix products are fast (CUDA with bf16 support; a CPU with
    AVX-512 BF16 or AMX), else "fp32". bf16 matched fp32 within the seed spread on ML-100K
    (benchmarks/results/ml-100k.md), and elsewhere it would be emulated and slower."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (Linux: /proc/cpuinfo flags)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})
