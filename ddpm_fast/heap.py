"""The process's heap: keep the memory a step frees for the next step's tensors.

glibc's malloc gives every block of 32 MiB or more (and smaller ones until its threshold has
adapted) a fresh anonymous mapping and unmaps it again on free, and it trims the top of its heap
back to the kernel. A training or sampling step on the CPU allocates and frees its large
activations every step, so each step faults every page of them in again: the kernel zeroes them,
one 4 KiB page a fault. With every block served from the heap (M_MMAP_MAX 0) and nothing trimmed
(M_TRIM_THRESHOLD at its largest), the freed blocks are reused as they are, the way
`PYTORCH_CUDA_ALLOC_CONF`'s caching allocator keeps GPU memory. The price is resident memory:
the process keeps its peak. Which CPUs get it is the execution plan's decision (plan.KEEP_HEAP);
this module only knows how to do it, and when it must not (another malloc, or one the user set)."""
from __future__ import annotations

import ctypes
import os
import platform

# mallopt(3)'s parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_NEVER = 2 ** 31 - 1  # mallopt takes an int: the largest is "never" for any heap this process has

# The environment through which a user sets glibc's malloc themselves (mallopt(3), "ENVIRONMENT";
# the tunables of ld.so(8)): such a setting is theirs, and this module leaves malloc alone.
USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def user_set_malloc(environ: dict[str, str] | None = None) -> bool:
    """Whether the environment configures malloc: one of USER_SETTINGS, a glibc.malloc tunable, or
    another allocator preloaded (jemalloc, tcmalloc, mimalloc: each has "malloc" in its name)."""
    env = os.environ if environ is None else environ
    return (any(k in env for k in USER_SETTINGS) or "glibc.malloc." in env.get("GLIBC_TUNABLES", "")
            or "malloc" in env.get("LD_PRELOAD", ""))


def can_keep_freed_memory(environ: dict[str, str] | None = None) -> bool:
    """Whether keep_freed_memory may act here: glibc's malloc, not configured by the user."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and not user_set_malloc(environ)


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap and never trim it (module docstring). Affects the
    allocations after it, this process's and the data loader's forked workers'. True if glibc took
    both settings; False, changing nothing, where can_keep_freed_memory says no."""
    if not can_keep_freed_memory():
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_NEVER))
