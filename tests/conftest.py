"""Test-wide set-up: 8 fake CPU devices before jax is imported anywhere."""

import os

# The test programs are small and each is compiled once or twice: LLVM's optimisation passes
# cost more than they save there (the suite ran 19:43 with them, 15:09 without, on this 2-core
# machine, every result within the tests' tolerances), and XLA:CPU's MLIR fusion emitters take
# about twice the compile time of its classic ones (a step's backend compilation 17 s -> 8 s).
# Subprocess tests pass the same flags.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


import tempfile  # noqa: E402

# Identical programs (the same step built by several tests, config files, or `prefopt`
# processes the tests start) compile once per run: one fresh persistent cache per session, made
# by the first process that loads this file (pytest-xdist's controller) and inherited through
# the environment by its workers and every subprocess, so timings never depend on an earlier
# run. No size limit: with one, every write takes a file lock and sums the sizes of all entries,
# which made the suite slower than no sharing at all. A reader that meets an entry still being
# written gets an error that JAX turns into a warning and a fresh compilation.
_OWN_CACHE = "PREFOPT_TEST_JAX_CACHE" not in os.environ  # made here: removed at the end
if _OWN_CACHE:
    os.environ["PREFOPT_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="jaxc-")
for _name, _value in (("JAX_COMPILATION_CACHE_DIR", os.environ["PREFOPT_TEST_JAX_CACHE"]),
                      ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0"),
                      ("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")):
    os.environ.setdefault(_name, _value)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "real_model: slow realistic test on the real SmolLM2-135M-Instruct GGUF")


def pytest_unconfigure(config):
    if _OWN_CACHE and not hasattr(config, "workerinput"):  # the process that made the cache
        import shutil
        shutil.rmtree(os.environ["PREFOPT_TEST_JAX_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct through our GGUF path, once per session."""
    from prefopt_jax.models import from_pretrained

    return from_pretrained("smollm2-135m-instruct")
