"""hostmem: with freed memory kept, a re-allocated block costs no page faults; the env choice."""

import os
import subprocess
import sys

import pytest

from prefopt_jax import hostmem

# malloc, touch and free a 256 MiB block, then do it again and count the minor page faults of
# the second round: glibc serves such a block with mmap and unmaps it on free unless
# keep_freed_memory() is in force. (Plain malloc: numpy would ask for huge pages.)
_PROBE = """
import ctypes, resource
from prefopt_jax import hostmem
applied = hostmem.keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
def round_trip():
    block = libc.malloc(1 << 28)
    ctypes.memset(block, 1, 1 << 28)
    libc.free(block)
round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_trip()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(choice: str) -> tuple[bool, int]:
    env = dict(os.environ, **{hostmem.ENV: choice})
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_kept_memory_is_not_faulted_in_again():
    applied, faults = _probe("keep")
    default_applied, default_faults = _probe("default")
    assert applied and not default_applied
    pages = (1 << 28) // 4096
    assert default_faults > pages // 2  # the default allocator faults the block in again
    assert faults < pages // 20


def test_env_choice(monkeypatch):
    monkeypatch.setenv(hostmem.ENV, "default")
    assert not hostmem.wanted() and not hostmem.keep_freed_memory()
    monkeypatch.setenv(hostmem.ENV, "keep")
    assert hostmem.wanted()
    monkeypatch.setenv(hostmem.ENV, "sometimes")
    with pytest.raises(ValueError, match="PREFOPT_HOST_MALLOC='sometimes'"):
        hostmem.wanted()


def test_not_applied_after_the_backend_started(monkeypatch):
    import jax
    jax.numpy.zeros(1).block_until_ready()
    monkeypatch.setenv(hostmem.ENV, "keep")
    assert hostmem.jax_backend_started() and not hostmem.keep_freed_memory()
