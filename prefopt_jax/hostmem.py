"""Host-memory allocator setting for JAX on the CPU: keep freed memory for the next step.

XLA:CPU takes each step's activations and temporaries from malloc and frees them when the step
ends. glibc serves large blocks with mmap and returns them (and the top of its heaps) to the
kernel on free, so every step page-faults its whole working set in again, zero-filled: a
SmolLM2-135M DPO step with LoRA on this project's 2-core machine took 1.9 million page faults
and 10 s of system time in 19 s of wall time (benchmarks/README.md). `keep_freed_memory()`
tells glibc (mallopt) to serve every block from one heap, never with mmap, and never to trim
it, so the working set is faulted in once and reused; the same step then takes no page faults.

The costs: the process keeps its high-water mark of host memory until it exits, and one arena
serialises malloc across threads, which made the compile-bound test suite (many small programs,
little compute) about 9% slower, so the tests leave it off. It applies to glibc Linux processes
whose JAX can only run on the CPU (no CUDA, ROCm or TPU plugin installed: on accelerator hosts
the step's tensors live in device memory). Set PREFOPT_HOST_MALLOC=keep or =default to force
either choice. It must run before JAX creates
its CPU client (XLA's worker threads pick a malloc arena on their first allocation), so
`prefopt` and the experiment scripts call it first thing; notebooks may call it before their
first JAX computation.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys

ENV = "PREFOPT_HOST_MALLOC"
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                       "jax_rocm7_plugin", "libtpu")
# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def wanted() -> bool:
    """Whether this process should keep freed memory: PREFOPT_HOST_MALLOC, else CPU-only JAX."""
    choice = os.environ.get(ENV, "").strip().lower()
    if choice not in ("", "keep", "default"):
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: use 'keep', 'default' or leave it unset")
    if choice:
        return choice == "keep"
    return not any(importlib.util.find_spec(name) for name in ACCELERATOR_PLUGINS)


def jax_backend_started() -> bool:
    """True once JAX has created a backend (too late to move its threads to one arena)."""
    bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(getattr(bridge, "_backends", None))


def keep_freed_memory() -> bool:
    """Set glibc malloc to one untrimmed heap without mmap, when `wanted()`; True if it did.

    Returns False (and changes nothing) off glibc, when not wanted, or when JAX has already
    started its backend.
    """
    if not sys.platform.startswith("linux") or not wanted() or jax_backend_started():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # -1 as glibc's size_t threshold: never trim. mallopt returns 1 on success.
    return all(mallopt(param, value) == 1 for param, value in
               ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
