"""Runtime settings: precision, compilation, wrapped modules, and the CPU allocator.

PyTorch on a CPU allocates a fresh buffer for nearly every activation. glibc serves blocks above
its mmap threshold (128 KB to 32 MB) with new memory maps and unmaps them on free, so every
forward pass of the paper-size denoiser at batch 25 touches about 270,000 new pages (measured with
``resource.getrusage``). :func:`keep_freed_memory` asks glibc to serve every block from the heap and
keep freed memory for reuse: the same pass then costs about 7,500 page faults and 16-18% less time
(docs/performance.md, ``bench/paper_speed.py``); the peak memory is unchanged, but the
process keeps it until it exits.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

import torch

logger = logging.getLogger(__name__)

#: glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
#: heap growth per request when memory runs short
TOP_PAD_BYTES = 256 << 20

_applied = False


def keep_freed_memory() -> bool:
    """Serve all allocations from the heap and never return freed memory to the system.

    Returns True when applied (Linux with glibc), False where the C library has no ``mallopt``.
    Idempotent.
    """
    global _applied
    if _applied:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    ok = all(mallopt(param, value) == 1 for param, value in
             ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2 ** 31 - 1), (M_TOP_PAD, TOP_PAD_BYTES)))
    _applied = ok
    if ok:
        logger.debug("glibc keeps freed memory for reuse (mallopt)")
    return ok


def default_device() -> torch.device:
    """The first CUDA device when there is one, else the CPU (trainers use ignite.distributed's
    per-process device instead)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(precision: str, device: torch.device):
    """bf16 autocast context for ``precision`` 'bf16' (CPU and CUDA), else a no-op ('fp32')."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def maybe_compile(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """``torch.compile(model)`` when ``enabled``, else the model itself."""
    return torch.compile(model) if enabled else model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP / DataParallel / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
