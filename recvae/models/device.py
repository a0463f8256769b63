"""Where and in what precision the neural models compute: device choice and the bf16 policy."""

from __future__ import annotations

from recvae.errors import ParameterError

import logging
import os
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


#: What emulated bf16 cost on an AVX2-only CPU (issue 27), quoted by the warning.
EMULATED_BF16_SLOWDOWN = "a Mult-VAE epoch on a 6,000 x 3,500 matrix took 16.2 s in bf16 against 0.9 s in fp32, ~18x slower"

_warned_emulated_bf16 = False


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "bf16" where bf16 matrix products are fast (CUDA with bf16 support; a CPU with
    AVX-512 BF16 or AMX), else "fp32". bf16 matched fp32 within the seed spread on ML-100K
    (benchmarks/results/ml-100k.md), and elsewhere it would be emulated and slower: an explicit
    "bf16" on such a CPU is kept, with one warning per process saying how much slower."""
    if precision == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
        _warn_emulated_bf16()
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"


def _warn_emulated_bf16() -> None:
    global _warned_emulated_bf16
    if not _warned_emulated_bf16:
        _warned_emulated_bf16 = True
        logger.warning(
            "precision 'bf16' on a CPU without native bf16 (no AVX-512 BF16 or AMX): it is emulated "
            "and slow (measured: %s); use precision 'auto' or 'fp32'", EMULATED_BF16_SLOWDOWN,
        )


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (Linux: /proc/cpuinfo flags).

    ``RECVAE_CPU_BF16=0`` (or ``1``) in the environment overrides the answer: with 0 a bf16 CPU
    behaves as an AVX2-only one ("auto" trains in fp32), so results of such machines can be
    reproduced and the test suite run as it runs there; any other value is refused."""
    forced = os.environ.get("RECVAE_CPU_BF16", "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise ValueError(f"RECVAE_CPU_BF16 must be 0 (no fast bf16) or 1 (fast bf16), got {forced!r}")
        return forced == "1"
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})
