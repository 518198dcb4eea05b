"""Host memory on CPUs: keep freed blocks for the next step instead of returning them to the OS (`train.malloc`).

glibc serves every allocation above its mmap threshold (32 MiB at most, its cap) with a fresh mmap and unmaps it
on free. A CPU training step allocates and frees many tensors that size (at the paper's shapes one (tokens, 768)
fp32 activation is 76 MB), so each one pays its page faults again on every step: ~30 ms per tensor on the 2-core
CPU here, more than the copy that fills it. An MoE layer makes more such tensors than the dense MLP it replaces
(slot buffers, gathered outputs and their gradients), so there this cost was most of the MoE's extra time
(bench/RESULTS.md). `reuse_freed_memory` tells glibc to serve large blocks from its heap too and to keep up to
`trim_bytes` of free memory at the heap's top; the next step then reuses the same pages. It is what PyTorch's
performance guide gets from swapping in jemalloc or tcmalloc, done inside glibc with no preload. Process-wide and
for the rest of the process; loader workers forked later inherit it. CUDA devices keep glibc's defaults: their
large buffers are device memory (PyTorch's caching allocator already reuses it).
"""
from __future__ import annotations

import ctypes
import logging
import platform

import torch

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_BYTES = 1 << 30


def reuse_freed_memory(trim_bytes: int = TRIM_BYTES) -> bool:
    """No mmap for large blocks, and free memory at the heap's top returned to the OS only past `trim_bytes`.
    True when glibc took both settings; False where the C library is not glibc (macOS, musl): nothing changed."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, min(trim_bytes, 2 ** 31 - 1)) == 1


def apply(mode: str, device: torch.device) -> bool:
    """train.malloc's rule: "reuse", "default" (glibc's own behaviour) or "auto" (reuse when `device` is a CPU).
    Returns whether reuse is now on."""
    if mode not in ("auto", "reuse", "default"):
        raise ValueError(f"train.malloc={mode!r}: expected 'auto', 'reuse' or 'default'")
    if mode == "default" or (mode == "auto" and device.type != "cpu"):
        return False
    if reuse_freed_memory():
        log.debug("train.malloc=%s: freed host memory is kept for reuse (glibc mallopt)", mode)
        return True
    if mode == "reuse":
        log.warning("train.malloc=reuse needs glibc (this is %s %s); host memory is left as it is",
                    platform.system(), platform.libc_ver()[0] or "without glibc")
    return False
