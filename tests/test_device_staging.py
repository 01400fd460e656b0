"""Saves of arrays that live off the host (GPU, TPU) stage them through a host-memory budget.

CI has no accelerator, so these tests route CPU arrays through the same path: with the CPU
left out of ``_staging.HOST_PLATFORMS``, every jax.Array is copied to host by ``HostCopies``
exactly as a GPU array is (on the CPU the copy happens to be free). benchmarks/gpu.py measures
the host memory this bounds on a real GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as orbax
import pytest

import flaxckpt as ocp
from flaxckpt import _arrays, _staging
from trees import assert_trees_equal

MIB = 1 << 20


@pytest.fixture
def off_host(monkeypatch):
  """Treats CPU arrays as if they lived on an accelerator; records what is copied and written.

  Events are ('copy', bytes) when a batch's device-to-host copies start and ('write', bytes,
  block types) when a batch is handed to the storage layer."""
  monkeypatch.setattr(_staging, 'HOST_PLATFORMS', frozenset())
  events = []
  real_copies, real_start = _staging.HostCopies.__init__, _arrays.start_write

  def copies(self, arrays):
    events.append(('copy', sum(_staging.nbytes(a) for a in arrays)))
    real_copies(self, arrays)

  def start_write(directory, arrays, options):
    events.append(('write', sum(_staging.nbytes(a) for a in arrays),
                   {type(block) for a in arrays for _, block in a.blocks}))
    return real_start(directory, arrays, options)

  monkeypatch.setattr(_staging.HostCopies, '__init__', copies)
  monkeypatch.setattr(_arrays, 'start_write', start_write)
  return events


def _state():
  keys = jax.random.split(jax.random.key(0), 10)
  return {
      'layers': [{'w': jax.random.normal(k, (512, 512)), 'b': jnp.full((512,), i, jnp.float32)}
                 for i, k in enumerate(keys[:8])],  # 8 x 1 MiB + small
      'embed': jax.random.normal(keys[8], (1024, 256), jnp.bfloat16),  # 0.5 MiB
      'step': jnp.asarray(7, jnp.int32),
      'rng': keys[9],  # a typed PRNG key: its key data is what is copied
      'host': np.arange(6.0),
  }


def _comparable(tree):
  """Key arrays as their key data (numpy cannot compare typed keys)."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _is_key(x):
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def test_sync_save_copies_device_arrays_in_batches_within_the_budget(tmp_path, off_host):
  budget = 3 * MIB
  state = _state()
  handler = ocp.StandardCheckpointHandler(save_device_host_concurrent_gb=budget / 2**30)
  with ocp.Checkpointer(handler) as ckptr:
    ckptr.save(tmp_path / 'ckpt', args=ocp.args.StandardSave(state))
  writes = [event for event in off_host if event[0] == 'write']
  assert len(writes) >= 4, off_host  # ~8.6 MiB in batches of at most 1.5 MiB
  held = 0  # Bytes copied to host and not yet written (the batch written and the next one).
  for event in off_host:
    if event[0] == 'copy':
      held += event[1]
      assert held <= budget, off_host
    else:
      assert event[1] <= budget // 2, off_host
      assert all(issubclass(t, np.ndarray) for t in event[2]), event  # never a device array
      held -= event[1]
  with ocp.StandardCheckpointer() as ckptr:
    assert_trees_equal(_comparable(ckptr.restore(tmp_path / 'ckpt')), _comparable(state))
  assert_trees_equal(_comparable(orbax.StandardCheckpointer().restore(tmp_path / 'ckpt')),
                     _comparable(state))


def test_without_a_budget_one_batch_holds_everything(tmp_path, off_host):
  state = _state()
  handler = ocp.StandardCheckpointHandler(save_device_host_concurrent_gb=None)
  with ocp.Checkpointer(handler) as ckptr:
    ckptr.save(tmp_path / 'ckpt', args=ocp.args.StandardSave(state))
  assert [event[0] for event in off_host] == ['copy', 'write'], off_host
  with ocp.StandardCheckpointer() as ckptr:
    assert_trees_equal(_comparable(ckptr.restore(tmp_path / 'ckpt')), _comparable(state))


def test_async_save_copies_every_device_array_before_returning(tmp_path, off_host):
  state = _state()
  expected = jax.tree.map(np.asarray, _comparable(state))
  handler = ocp.StandardCheckpointHandler(save_device_host_concurrent_gb=2 * MIB / 2**30)
  with ocp.AsyncCheckpointer(handler) as ckptr:
    ckptr.save(tmp_path / 'ckpt', args=ocp.args.StandardSave(state))
    assert off_host[0][0] == 'copy', off_host  # all of it, at once, before save returned
    for leaf in jax.tree.leaves(state):  # As a donating train step would.
      if isinstance(leaf, jax.Array) and not _is_key(leaf):
        leaf.delete()
    ckptr.wait_until_finished()
  assert [event[0] for event in off_host] == ['copy', 'write'], off_host
  assert off_host[1][2] == {np.ndarray}, off_host
  with ocp.StandardCheckpointer() as ckptr:
    assert_trees_equal(_comparable(ckptr.restore(tmp_path / 'ckpt')), expected)


def test_saves_with_and_without_staging_write_the_same_checkpoint(tmp_path, monkeypatch):
  state = _state()
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / 'direct', args=ocp.args.StandardSave(state))
    monkeypatch.setattr(_staging, 'HOST_PLATFORMS', frozenset())
    handler = ocp.StandardCheckpointHandler(save_device_host_concurrent_gb=MIB / 2**30)
    with ocp.Checkpointer(handler) as staged:
      staged.save(tmp_path / 'staged', args=ocp.args.StandardSave(state))
    direct, staged_tree = (ckptr.restore(tmp_path / name) for name in ('direct', 'staged'))
  assert_trees_equal(_comparable(direct), _comparable(staged_tree))
  for name in ('_METADATA', 'array_metadatas/process_0', '_sharding'):
    assert (tmp_path / 'direct' / name).read_bytes() == (tmp_path / 'staged' / name).read_bytes()


@pytest.mark.parametrize('value', [0, -1, 'lots', True])
def test_bad_budget_is_refused(value):
  with pytest.raises(ValueError, match='save_device_host_concurrent_gb'):
    ocp.PyTreeCheckpointHandler(save_device_host_concurrent_gb=value)


def test_budget_defaults_and_orbax_spellings():
  default = _arrays.DEFAULT_DEVICE_HOST_BUDGET
  assert default == 1 << 30
  assert ocp.PyTreeCheckpointHandler()._options.device_host_budget == default
  assert ocp.PyTreeCheckpointHandler(
      save_device_host_concurrent_gb='auto')._options.device_host_budget == default
  assert ocp.PyTreeCheckpointHandler(
      save_device_host_concurrent_gb=None)._options.device_host_budget is None
  base = ocp.BasePyTreeCheckpointHandler(save_device_host_concurrent_bytes=64 * MIB)
  assert base._options.device_host_budget == 64 * MIB
  assert ocp.BasePyTreeCheckpointHandler()._options.device_host_budget == default


@pytest.fixture
def restore_events(monkeypatch):
  """Records ('read', bytes) for every batch of array reads and ('placed', bytes) whenever a
  restore waits for a batch to reach its devices."""
  events = []
  real_read, real_wait = _arrays.read_arrays, _staging.wait_placed

  def read_arrays(*args, **kwargs):
    values = real_read(*args, **kwargs)
    events.append(('read', sum(getattr(v, 'nbytes', 0) for v in values)))
    return values

  def wait_placed(values):
    real_wait(values)
    events.append(('placed', sum(v.nbytes for v in values if isinstance(v, jax.Array))))

  monkeypatch.setattr(_arrays, 'read_arrays', read_arrays)
  monkeypatch.setattr(_staging, 'wait_placed', wait_placed)
  return events


def _saved(path):
  state = _comparable(_state())
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, args=ocp.args.StandardSave(state))
  return state, jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def test_restore_to_devices_reads_and_places_in_batches_within_the_budget(
    tmp_path, monkeypatch, restore_events):
  state, abstract = _saved(tmp_path / 'ckpt')
  monkeypatch.setattr(_staging, 'HOST_PLATFORMS', frozenset())
  budget = 3 * MIB
  handler = ocp.StandardCheckpointHandler(restore_concurrent_gb=budget / 2**30)
  with ocp.Checkpointer(handler) as ckptr:
    restored = ckptr.restore(tmp_path / 'ckpt', args=ocp.args.StandardRestore(abstract))
  assert_trees_equal(restored, state)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored['layers']))
  reads = [event for event in restore_events if event[0] == 'read']
  assert len(reads) >= 4, restore_events  # ~8.6 MiB in batches of at most 1.5 MiB
  held = 0  # Bytes read and not yet known to be on their devices.
  for kind, size in restore_events:
    if kind == 'read':
      assert size <= budget // 2, restore_events
      held += size
      assert held <= budget, restore_events
    else:
      held -= size


def test_restore_without_accelerators_reads_everything_at_once(tmp_path, restore_events):
  state, abstract = _saved(tmp_path / 'ckpt')
  handler = ocp.StandardCheckpointHandler(restore_concurrent_gb=MIB / 2**30)
  with ocp.Checkpointer(handler) as ckptr:  # CPU arrays are host memory: nothing to batch.
    assert_trees_equal(ckptr.restore(tmp_path / 'ckpt', args=ocp.args.StandardRestore(abstract)),
                       state)
  assert [kind for kind, _ in restore_events] == ['read', 'placed'], restore_events


def test_restore_budget_none_reads_everything_at_once(tmp_path, monkeypatch, restore_events):
  state, abstract = _saved(tmp_path / 'ckpt')
  monkeypatch.setattr(_staging, 'HOST_PLATFORMS', frozenset())
  handler = ocp.StandardCheckpointHandler(restore_concurrent_gb=None)
  with ocp.Checkpointer(handler) as ckptr:
    assert_trees_equal(ckptr.restore(tmp_path / 'ckpt', args=ocp.args.StandardRestore(abstract)),
                       state)
  assert [kind for kind, _ in restore_events] == ['read', 'placed'], restore_events


def test_restore_budget_spellings():
  default = _arrays.DEFAULT_DEVICE_HOST_BUDGET
  assert ocp.PyTreeCheckpointHandler()._restore_budget == default
  assert ocp.PyTreeCheckpointHandler(restore_concurrent_gb=None)._restore_budget is None
  assert ocp.PyTreeCheckpointHandler(restore_concurrent_gb=2)._restore_budget == 2 << 30
  assert ocp.BasePyTreeCheckpointHandler(
      restore_concurrent_bytes=5 * MIB)._restore_budget == 5 * MIB
  with pytest.raises(ValueError, match='restore_concurrent_gb'):
    ocp.PyTreeCheckpointHandler(restore_concurrent_gb=0)
