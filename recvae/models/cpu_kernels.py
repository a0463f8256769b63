"""Fused CPU loops of RecVAE's training step (``cpu_kernels.c``), compiled on first use.

On CPU the elementwise work around RecVAE's matrix products costs memory passes, and eager
PyTorch makes one pass per operation. The loops of ``cpu_kernels.c`` make one per row. They
are compiled once per machine with the system's C compiler (``$CC``, else ``cc``) for this CPU
(``-march=native``), and the library is kept in a cache folder (``$RECVAE_KERNEL_CACHE``, else
``~/.cache/recvae/kernels``) under a name that hashes the source, the flags, the compiler and
the CPU's features. Without a compiler, or with ``RECVAE_CPU_KERNELS=0`` (``1``, the default,
uses them), or where compiling fails, :func:`library` returns None and the callers run their
eager PyTorch code: the same results up to bf16 rounding, slower.

A cache folder that this user does not own, or that others may write to, is not used (its
library could be anyone's): the library then goes to a private temporary folder.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from recvae.fileio import atomic_path

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC")
#: linked in a second step without -ffast-math: linked with it, gcc adds crtfastmath.o, whose
#: constructor turns on flush-to-zero for the whole process when the library loads, changing
#: every other computation's results in their smallest values
LINK_FLAGS = ("-shared", "-fopenmp")
#: "0": never compile, always the eager code; "1" (or unset): the compiled loops where they apply
SWITCH_ENV = "RECVAE_CPU_KERNELS"
CACHE_ENV = "RECVAE_KERNEL_CACHE"
COMPILE_TIMEOUT_S = 120

_state: dict = {}
_lock = threading.Lock()


def library() -> ctypes.CDLL | None:
    """The compiled loops, or None where they are switched off or cannot be built here (the
    reason is logged once, at INFO)."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                lib, why = _load()
                if why:
                    logger.info("fused CPU kernels not used (%s): RecVAE's step runs eager PyTorch code, slower", why)
                _state["lib"] = lib
    return _state["lib"]


def reset() -> None:
    """Forget the loaded library (tests: after changing the environment)."""
    with _lock:
        _state.clear()


def _load() -> tuple[ctypes.CDLL | None, str]:
    switch = os.environ.get(SWITCH_ENV, "").strip()
    if switch not in ("", "0", "1"):
        raise ValueError(f"{SWITCH_ENV} must be 0 (PyTorch code only) or 1 (the compiled loops where they "
                         f"apply, the default), got {switch!r}")
    if switch == "0":
        return None, f"{SWITCH_ENV}=0"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler or not shutil.which(compiler):
        return None, f"no C compiler found ({compiler or 'cc'})"
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"{compiler} --version failed: {e}"
    source = SOURCE.read_bytes()
    parts = [source, " ".join(FLAGS + LINK_FLAGS), version, _cpu_features(), platform.machine()]
    key = hashlib.sha256(b"\0".join(p if isinstance(p, bytes) else p.encode() for p in parts)).hexdigest()[:20]
    folder = _cache_folder()
    target = folder / f"cpu_kernels-{key}.so"
    if not target.is_file():
        try:
            with atomic_path(target, suffix=".so.tmp") as tmp, tempfile.TemporaryDirectory() as work:
                obj = os.path.join(work, "cpu_kernels.o")
                for argv in ([compiler, *FLAGS, "-c", str(SOURCE), "-o", obj],
                             [compiler, *LINK_FLAGS, obj, "-o", str(tmp), "-lm"]):
                    done = subprocess.run(argv, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
                    if done.returncode != 0:
                        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
                        raise RuntimeError(f"{compiler} exited with {done.returncode}: {last}")
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            return None, f"compiling {SOURCE.name} failed: {e}"
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as e:
        return None, f"loading {target} failed: {e}"
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.softmax_nll_bf16.argtypes = [p, i64, i64, p, p, p, p, p, p, i32]
    lib.softmax_nll_bf16.restype = None
    return lib, ""


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _cache_folder() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                     os.path.expanduser("~/.cache"), "recvae", "kernels")
    folder = Path(base)
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = os.lstat(folder)
        owner = os.getuid() if hasattr(os, "getuid") else st.st_uid  # (no owners to compare on Windows)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == owner and not st.st_mode & 0o022:
            return folder
    except OSError:
        pass
    if "private" not in _state:
        _state["private"] = Path(tempfile.mkdtemp(prefix="recvae-kernels-"))
    return _state["private"]


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    assert t.is_contiguous() and t.device.type == "cpu"
    return ctypes.c_void_p(t.data_ptr())


def softmax_nll_bf16(lib: ctypes.CDLL, logits: torch.Tensor, crow: torch.Tensor, cols: torch.Tensor,
                     values: torch.Tensor, row_sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: ``logits`` (B, I) bf16 becomes ``softmax - x / n`` per row (a row with n = 0
    keeps its softmax; a row with an infinite or NaN logit becomes NaN). Returns (lse, dot),
    each (B,) float32: ``log sum_i exp(logit_ui)`` and ``sum_i x_ui logit_ui``."""
    B, I = logits.shape
    assert logits.dtype == torch.bfloat16  # (_ptr checks that it is contiguous and on the CPU)
    crow, cols = crow.contiguous().to(torch.int64), cols.contiguous().to(torch.int64)
    values, row_sums = values.contiguous().to(torch.float32), row_sums.contiguous().to(torch.float32)
    lse, dot = torch.empty(B), torch.empty(B)
    lib.softmax_nll_bf16(_ptr(logits), B, I, _ptr(crow), _ptr(cols), _ptr(values), _ptr(row_sums), _ptr(lse),
                         _ptr(dot), torch.get_num_threads())
    return lse, dot

