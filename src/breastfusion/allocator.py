"""The CPU memory allocator: keep freed blocks for reuse instead of returning them to the OS.

A convolutional network on a CPU allocates and frees activations of tens of megabytes at
every layer. glibc's malloc serves blocks above its mmap threshold (dynamic, at most
32 MiB) with fresh ``mmap`` calls and unmaps them on free, so every layer of every batch
page-faults its output in again: on the reference 2-core machine the kernel time of
EfficientNet-Lite0 inference at 128 px was 73% of the wall time (2,330 minor page faults
per image). Raising the mmap and trim thresholds makes malloc keep those
blocks in its heap and hand them out again: the same forward passes ran 1.8x faster, a bare
fine-tune step 1.06x (`bench/allocator.py`; docs/performance.md). PyTorch's CPU tuning guide
reaches the same end by preloading jemalloc or tcmalloc; this needs no extra library.

The price: memory freed below the threshold stays with the process until it exits (the
peak resident size of `bench/scale.py`'s CV runs was within 3% of glibc's defaults). The command line applies
this at start; Python users call `reuse_freed_memory()` themselves. Set
``BREASTFUSION_MALLOC=default`` to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h> mallopt parameters
REUSE_BELOW = 1 << 30  # blocks up to 1 GiB come from (and go back to) the heap
ENV = "BREASTFUSION_MALLOC"
_applied = False


def applied() -> bool:
    """Whether this process raised the thresholds (fold workers follow their parent)."""
    return _applied


def reuse_freed_memory(limit: int = REUSE_BELOW) -> bool:
    """Ask glibc's malloc to serve blocks below `limit` from its heap and to keep up to `limit`
    of freed memory at the heap's top; True when applied (Linux with glibc, not disabled)."""
    global _applied
    if os.environ.get(ENV, "") == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, limit) == 1 and mallopt(M_TRIM_THRESHOLD, limit) == 1
    log.debug("malloc thresholds %s", f"raised to {limit} bytes" if done else "left as they were")
    _applied = _applied or done
    return done
