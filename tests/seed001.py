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


def check_params(params: Any, state: train_state.TrainState) -> None:
  """{'bias': [-0.001] * 3, 'kernel': the saved (5, 3) kernel}, float32, as on the page (bias
  starts at zero; one SGD step with gradient 1 and lr 0.001 gives -0.001)."""
  assert sorted(params) == ['bias', 'kernel']
  expected = {'bias': np.full(3, -0.001, np.float32), 'kernel': np.asarray(state.params['kernel'])}
  for name, value in expected.items():
    actual = params[name]
    assert isinstance(actual, (np.ndarray, jax.Array)), (name, type(actual))
    assert actual.dtype == np.float32, (name, actual.dtype)
    assert actual.shape == value.shape, (name, actual.shape)
    np.testing.assert_array_equal(np.asarray(actual), value)
  assert params['kernel'].shape == (5, 3)


def check_train_state(model: Any, guide: dict[str, Any], cls: type = train_state.TrainState,
                      step: int = 1) -> None:
  """A restored guide TrainState: its type, step, apply_fn, tx, empty SGD state and params."""
  state = guide['state']
  assert type(model) is cls
  assert model.step == step
  assert model.apply_fn == state.apply_fn
  assert model.tx is state.tx
  assert model.opt_state == (optax.EmptyState(), optax.EmptyState())
  check_params(model.params, state)
