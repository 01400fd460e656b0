"""Checkpoint code from public projects, run with ``import flaxckpt as ocp`` and with
``import orbax.checkpoint as ocp``: both runs must behave alike, and each library must read what
the other wrote.

The programs follow the checkpoint code of flax's own examples: ``examples/gemma`` (NNX model and
optimizer state, a manager keeping the latest step, ``CommitFileTemporaryPath``, resuming at the
saved step) and ``examples/imagenet`` (a pmap-replicated linen ``TrainState`` turned into global
arrays with ``ocp.utils.fully_replicated_host_local_array_to_global_array`` before saving).
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as orbax_ocp
import pytest
from flax import linen as nn
from flax import nnx
from flax.training import train_state

import flaxckpt

LIBRARIES = {'flaxckpt': flaxckpt, 'orbax': orbax_ocp}


def _assert_trees_equal(a, b):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- examples/gemma: NNX state, LatestN(1), CommitFileTemporaryPath -------------------------------

class _Mlp(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.up = nnx.Linear(4, 8, rngs=rngs)
    self.down = nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, x):
    return self.down(nnx.relu(self.up(x)))


def _gemma_setup(seed: int):
  model = _Mlp(nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
  return model, optimizer


def _gemma_train_step(model, optimizer):
  def loss_fn(m):
    return jnp.mean(m(jnp.ones((3, 4))) ** 2)
  grads = nnx.grad(loss_fn)(model)
  optimizer.update(model, grads)


def _gemma_manager(ocp, path):
  return ocp.CheckpointManager(
      path,
      options=ocp.CheckpointManagerOptions(
          preservation_policy=ocp.checkpoint_managers.LatestN(1),
          temporary_path_class=ocp.path.atomicity.CommitFileTemporaryPath))


def _gemma_run(ocp, path, num_steps: int, every: int) -> tuple[int, dict]:
  """The example's loop: restore if a step exists, train, save every ``every`` steps."""
  model, optimizer = _gemma_setup(0)
  mngr = _gemma_manager(ocp, path)
  start_step = 0
  if mngr.latest_step() is not None:
    target = {'model': nnx.state(model), 'optimizer': nnx.state(optimizer), 'step': 0}
    restored = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(target))
    nnx.update(model, restored['model'])
    nnx.update(optimizer, restored['optimizer'])
    start_step = restored['step'] + 1
  for step in range(start_step, num_steps):
    _gemma_train_step(model, optimizer)
    if step % every == 0 or step == num_steps - 1:
      mngr.save(step, args=ocp.args.StandardSave(
          {'model': nnx.state(model), 'optimizer': nnx.state(optimizer), 'step': step}))
  mngr.wait_until_finished()
  steps = mngr.all_steps()
  mngr.close()
  return start_step, {'steps': steps, 'model': nnx.state(model)}


@pytest.mark.parametrize('name', LIBRARIES)
def test_gemma_example_trains_saves_and_resumes(name, tmp_path):
  ocp = LIBRARIES[name]
  path = tmp_path / 'checkpoint'
  start, first = _gemma_run(ocp, path, num_steps=5, every=2)
  assert start == 0
  assert first['steps'] == [4]  # LatestN(1) keeps the newest step only.
  # The committed step is marked by its commit file (CommitFileTemporaryPath writes in place).
  assert (path / '4' / 'commit_success.txt').exists()
  start, second = _gemma_run(ocp, path, num_steps=8, every=2)
  assert start == 5
  assert second['steps'] == [7]


def test_gemma_checkpoints_cross_read(tmp_path):
  """A run resumed by the other library continues from the same weights."""
  for writer, reader in (('flaxckpt', 'orbax'), ('orbax', 'flaxckpt')):
    path = tmp_path / f'{writer}-then-{reader}'
    _, written = _gemma_run(LIBRARIES[writer], path, num_steps=3, every=1)
    ocp = LIBRARIES[reader]
    model, optimizer = _gemma_setup(1)  # Other initial weights: the restore must replace them.
    mngr = _gemma_manager(ocp, path)
    target = {'model': nnx.state(model), 'optimizer': nnx.state(optimizer), 'step': 0}
    restored = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(target))
    mngr.close()
    assert restored['step'] == 2
    _assert_trees_equal(restored['model'], written['model'])


# --- examples/imagenet: pmap-replicated linen TrainState ------------------------------------------

class _Cnn(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.Dense(3)(x.mean(axis=(1, 2)))


class _TrainState(train_state.TrainState):
  batch_stats: flax.core.FrozenDict


def _imagenet_state(seed: int) -> _TrainState:
  model = _Cnn()
  variables = model.init(jax.random.PRNGKey(seed), jnp.ones((1, 8, 8, 3)), train=False)
  return _TrainState.create(apply_fn=model.apply, params=variables['params'],
                            tx=optax.sgd(0.1, momentum=0.9),
                            batch_stats=variables['batch_stats'])


def _imagenet_train(state: _TrainState, steps: int) -> _TrainState:
  """pmap training as the example does it: the state is replicated over the local devices."""
  def step_fn(state, images):
    def loss_fn(params):
      logits, updates = state.apply_fn({'params': params, 'batch_stats': state.batch_stats},
                                       images, mutable=['batch_stats'])
      return jnp.mean(logits ** 2), updates
    grads, updates = jax.grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, 'batch')
    stats = jax.lax.pmean(updates['batch_stats'], 'batch')
    return state.apply_gradients(grads=grads, batch_stats=stats)

  p_step = jax.pmap(step_fn, axis_name='batch')
  images = jnp.ones((jax.local_device_count(), 2, 8, 8, 3))
  for _ in range(steps):
    state = p_step(state, images)
  return state


def _imagenet_save(ocp, path, replicated: _TrainState) -> None:
  state = jax.tree.map(ocp.utils.fully_replicated_host_local_array_to_global_array, replicated)
  step = int(state.step)
  with ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(max_to_keep=3)) as mngr:
    mngr.save(step, args=ocp.args.StandardSave(state))
    mngr.wait_until_finished()


def _imagenet_restore(ocp, path, state: _TrainState) -> _TrainState:
  with ocp.CheckpointManager(path) as mngr:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    return mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(abstract))


@pytest.mark.parametrize('writer', LIBRARIES)
@pytest.mark.parametrize('reader', LIBRARIES)
def test_imagenet_example_saves_replicated_state(writer, reader, tmp_path):
  replicated = _imagenet_train(flax.jax_utils.replicate(_imagenet_state(0)), steps=2)
  global_state = jax.tree.map(LIBRARIES[writer].utils
                              .fully_replicated_host_local_array_to_global_array, replicated)
  # One global array over every device, holding the (replicated) value of one replica.
  assert global_state.params['Dense_0']['kernel'].shape == (4, 3)
  assert len(global_state.params['Dense_0']['kernel'].sharding.device_set) == jax.device_count()
  _imagenet_save(LIBRARIES[writer], tmp_path / 'ckpt', replicated)
  restored = _imagenet_restore(LIBRARIES[reader], tmp_path / 'ckpt', _imagenet_state(1))
  assert int(restored.step) == 2
  expected = jax.tree.map(lambda x: np.asarray(x[0]), replicated)
  _assert_trees_equal(restored.params, expected.params)
  _assert_trees_equal(restored.batch_stats, expected.batch_stats)
  _assert_trees_equal(restored.opt_state, expected.opt_state)
  # Training resumes from the restored state.
  resumed = _imagenet_train(flax.jax_utils.replicate(restored), steps=1)
  assert int(resumed.step[0]) == 3
