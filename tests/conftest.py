"""Test configuration: 8 fake CPU devices so sharded arrays can be tested on any machine, and
fixtures shared by the test modules."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import flax  # noqa: E402  (imports jax, which must see the environment above)
import pytest  # noqa: E402


@pytest.fixture
def set_flag():
  """Sets flax's ``flax_use_orbax_checkpointing`` for one test and restores the old value."""
  old = flax.config.flax_use_orbax_checkpointing
  yield lambda value: flax.config.update('flax_use_orbax_checkpointing', value)
  flax.config.update('flax_use_orbax_checkpointing', old)
