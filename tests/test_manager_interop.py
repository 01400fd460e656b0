"""CheckpointManager directories shared with the real Orbax CheckpointManager, both ways."""

import json
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as orbax
import pytest

import flaxckpt as ocp
from trees import assert_trees_equal


def _state(i):
  return {'w': jnp.arange(4.0) + i, 'b': {'c': jnp.full((2, 2), i, jnp.int32)}}


def _options(lib, **kw):
  return lib.CheckpointManagerOptions(
      max_to_keep=2, best_fn=lambda m: m['loss'], best_mode='min', step_prefix='ckpt',
      step_format_fixed_length=5, **kw)


def _abstract(lib, i):
  return jax.tree.map(lib.utils.to_shape_dtype_struct, _state(i))


LOSSES = {0: .5, 10: .1, 20: .9, 30: .3}


@pytest.mark.parametrize('writer, reader', [(ocp, orbax), (orbax, ocp)],
                         ids=['flaxckpt->orbax', 'orbax->flaxckpt'])
def test_manager_directories_are_shared(tmp_path, writer, reader):
  mngr = writer.CheckpointManager(tmp_path, options=_options(writer),
                                  item_names=('state', 'extra'), metadata={'run': 'r1'})
  for step, loss in LOSSES.items():
    mngr.save(step, args=writer.args.Composite(state=writer.args.StandardSave(_state(step)),
                                               extra=writer.args.JsonSave({'step': step})),
              metrics={'loss': loss}, custom_metadata={'step_level': step})
  mngr.wait_until_finished()
  mngr.close()
  assert sorted(n for n in os.listdir(tmp_path) if n.startswith('ckpt')) == [
      'ckpt_00010', 'ckpt_00030']
  step_dir = tmp_path / 'ckpt_00030'
  assert {'state', 'extra', 'metrics', '_CHECKPOINT_METADATA'} <= set(os.listdir(step_dir))
  assert json.loads((step_dir / 'metrics' / 'metrics').read_text()) == {'loss': .3}
  step_meta = json.loads((step_dir / '_CHECKPOINT_METADATA').read_text())
  assert step_meta['custom_metadata'] == {'step_level': 30}
  assert step_meta['item_handlers']['state'].endswith('StandardCheckpointHandler')

  other = reader.CheckpointManager(tmp_path, options=_options(reader),
                                   item_names=('state', 'extra'))
  assert list(other.all_steps()) == [10, 30]
  assert other.latest_step() == 30 and other.best_step() == 10
  assert other.metadata() == {'run': 'r1'} or other.metadata().custom_metadata == {'run': 'r1'}
  restored = other.restore(30, args=reader.args.Composite(
      state=reader.args.StandardRestore(_abstract(reader, 30)),
      extra=reader.args.JsonRestore()))
  assert_trees_equal(restored.state, _state(30))
  assert restored.extra == {'step': 30}
  # Retention keeps working across the libraries: a better step evicts the worse one.
  other.save(40, args=reader.args.Composite(state=reader.args.StandardSave(_state(40)),
                                            extra=reader.args.JsonSave({'step': 40})),
             metrics={'loss': .01})
  other.wait_until_finished()
  other.close()
  assert list(other.all_steps()) == [10, 40]


@pytest.mark.parametrize('writer, reader', [(ocp, orbax), (orbax, ocp)],
                         ids=['flaxckpt->orbax', 'orbax->flaxckpt'])
def test_single_item_default_layout_is_shared(tmp_path, writer, reader):
  mngr = writer.CheckpointManager(tmp_path, options=writer.CheckpointManagerOptions(
      max_to_keep=2, save_interval_steps=2))
  for step in range(5):
    mngr.save(step, args=writer.args.StandardSave(_state(step)))
  mngr.wait_until_finished()
  mngr.close()
  assert sorted(os.listdir(tmp_path)) == ['2', '4']
  assert 'default' in os.listdir(tmp_path / '4')
  other = reader.CheckpointManager(tmp_path)
  assert list(other.all_steps()) == [2, 4]
  assert_trees_equal(other.restore(4, args=reader.args.StandardRestore(_abstract(reader, 4))),
                _state(4))
  other.close()
