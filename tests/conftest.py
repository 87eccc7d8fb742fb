"""Eight emulated CPU devices for every test, set before JAX initialises its backend."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from jaxdp.config import load_preset  # noqa: E402


@pytest.fixture
def tiny_config():
  """A fresh, mutable tiny_cpu config (each test may change fields)."""
  return load_preset("tiny_cpu")
