"""Test-wide set-up: 8 fake CPU devices before jax is imported anywhere."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Identical programs (the same step built by several tests or config files) compile once per
# run: a fresh persistent cache per session, so timings never depend on an earlier run.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("PREFOPT_TEST_JAX_CACHE") or tempfile.mkdtemp(prefix="jaxc-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "real_model: slow realistic test on the real SmolLM2-135M-Instruct GGUF")


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct through our GGUF path, once per session."""
    from prefopt_jax.models import from_pretrained

    return from_pretrained("smollm2-135m-instruct")
