"""Host-memory settings that make XLA:CPU fast, for processes that train, evaluate or benchmark on the CPU.

XLA:CPU allocates every step's buffers (activations, gradients, the new parameters) with malloc. glibc serves
blocks over its mmap threshold (at most 32 MiB) with mmap and gives them back to the kernel when freed, so the
next step faults each page back in and the kernel zeroes it first. On the 2-core development VM a jitted
zero fill of a fresh 460 MB buffer took 580 ms, and 70 ms once freed memory stayed in the process.
`keep_freed_memory` makes glibc serve every block from its heaps and never trim them: from the second step
on, a step reuses the pages of the one before. TPU and GPU hosts keep their buffers on the device; the
launcher applies this only when JAX runs on the CPU.
"""

import ctypes
import ctypes.util
import os

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Freed memory stays with the process (no mmap for large blocks, no trimming of the heap). True when
    glibc took both settings; False where malloc is not glibc's (macOS, musl), which is left as it is."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1


def order_collectives() -> None:
    """XLA:CPU's concurrency-optimised scheduler can order the collectives of a multi-axis mesh differently on
    different simulated devices and deadlock them; this turns it off (the flag only touches the CPU backend).
    Call before JAX creates its backends (the first computation or device query)."""
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_concurrency_optimized_scheduler=false"
    )
