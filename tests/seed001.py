"""The objects seed 001 (Flax's "Save and load checkpoints" guide) builds, shared by the tests
that run its Orbax examples and its legacy ``flax.training.checkpoints`` examples."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.training import train_state


class CustomTrainState(train_state.TrainState):
  batch_stats: Any = None


def guide_objects() -> dict[str, Any]:
  """x1, state, ckpt, target, custom_state, custom_ckpt and custom_target, as the guide makes
  them."""
  # A simple model with one linear layer.
  key1, key2 = jax.random.split(jax.random.key(0))
  x1 = jax.random.normal(key1, (5,))      # A simple JAX array.
  model = nn.Dense(features=3)
  variables = model.init(key2, x1)

  # Flax's TrainState is a pytree dataclass and is supported in checkpointing.
  tx = optax.sgd(learning_rate=0.001)      # An Optax SGD optimizer.
  state = train_state.TrainState.create(
      apply_fn=model.apply,
      params=variables['params'],
      tx=tx)
  # Perform a simple gradient update similar to the one during a normal training workflow.
  state = state.apply_gradients(grads=jax.tree_util.tree_map(jnp.ones_like, state.params))

  # Some arbitrary nested pytree with a dictionary and a NumPy array.
  config = {'dimensions': np.array([5, 3])}

  # Bundle everything together.
  ckpt = {'model': state, 'config': config, 'data': [x1]}

  empty_state = train_state.TrainState.create(
      apply_fn=model.apply,
      params=jax.tree_util.tree_map(np.zeros_like, variables['params']),
      tx=tx,
  )
  empty_config = {'dimensions': np.array([0, 0])}
  target = {'model': empty_state, 'config': empty_config, 'data': [jnp.zeros_like(x1)]}

  custom_state = CustomTrainState.create(
      apply_fn=state.apply_fn,
      params=state.params,
      tx=state.tx,
      batch_stats=np.arange(10),
  )
  custom_ckpt = {'model': custom_state, 'config': config, 'data': [x1]}
  # Use a custom state to read the old `TrainState` checkpoint.
  custom_target = {'model': custom_state, 'config': None, 'data': [jnp.zeros_like(x1)]}
  return dict(x1=x1, state=state, ckpt=ckpt, target=target, custom_state=custom_state,
              custom_ckpt=custom_ckpt, custom_target=custom_target)
