"""User checkpoint handlers (written as grain writes its iterator-state handler), handler
registries, ArrayCheckpointHandler, BasePyTreeCheckpointHandler and MsgpackHandler, each run
through flaxckpt and Orbax on the same calls, with files cross-read."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as orbax
import pytest
from etils import epath

import flaxckpt as ocp

LIBS = {'flaxckpt': ocp, 'orbax': orbax}


class DataIterator:
  """Stands for a grain DataLoader iterator: state in, state out."""

  def __init__(self, position: int = 0, seed: int = 0):
    self.position, self.seed = position, seed

  def get_state(self) -> dict[str, int]:
    return {'position': self.position, 'seed': self.seed}

  def set_state(self, state: dict[str, int]) -> None:
    self.position, self.seed = state['position'], state['seed']


def grain_style_handler(lib: Any) -> types.SimpleNamespace:
  """grain's PyGrainCheckpointHandler and its args, defined on ``lib``'s base classes."""

  class IteratorHandler(lib.CheckpointHandler):

    def save(self, directory, item=None, args=None):
      item = item or args.item
      name = f'process_{jax.process_index()}-of-{jax.process_count()}.json'
      (directory / name).write_text(json.dumps(item.get_state(), indent=4))

    def restore(self, directory, item=None, args=None):
      item = item or args.item
      name = f'process_{jax.process_index()}-of-{jax.process_count()}.json'
      item.set_state(json.loads((directory / name).read_text()))
      return item

    def metadata(self, directory):
      return None

    def finalize(self, directory):
      pass

    def close(self):
      pass

  @lib.args.register_with_handler(IteratorHandler, for_save=True)
  @dataclasses.dataclass
  class IteratorSave(lib.args.CheckpointArgs):
    item: Any

  @lib.args.register_with_handler(IteratorHandler, for_restore=True)
  @dataclasses.dataclass
  class IteratorRestore(lib.args.CheckpointArgs):
    item: Any

  return types.SimpleNamespace(Handler=IteratorHandler, Save=IteratorSave,
                               Restore=IteratorRestore)


GRAIN = {name: grain_style_handler(lib) for name, lib in LIBS.items()}
STATE = {'w': np.arange(6, dtype=np.float32).reshape(2, 3), 'step': np.int32(7)}


def _state_equal(restored: Any) -> None:
  np.testing.assert_array_equal(restored['w'], STATE['w'])
  assert int(restored['step']) == 7


@pytest.mark.parametrize('writer', LIBS)
@pytest.mark.parametrize('reader', LIBS)
def test_grain_handler_checkpointer_round_trip_and_cross_read(tmp_path, writer, reader):
  w, r = GRAIN[writer], GRAIN[reader]
  LIBS[writer].Checkpointer(w.Handler()).save(tmp_path / 'it', args=w.Save(DataIterator(12, 3)))
  assert json.loads((tmp_path / 'it' / 'process_0-of-1.json').read_text()) == {
      'position': 12, 'seed': 3}
  restored = LIBS[reader].Checkpointer(r.Handler()).restore(
      tmp_path / 'it', args=r.Restore(DataIterator()))
  assert restored.get_state() == {'position': 12, 'seed': 3}


@pytest.mark.parametrize('lib', LIBS)
def test_grain_handler_older_positional_form(tmp_path, lib):
  """``Checkpointer(MyHandler()).save(path, item)``: the item goes into the handler's
  registered args class, as Orbax builds it."""
  g = GRAIN[lib]
  ckptr = LIBS[lib].Checkpointer(g.Handler())
  ckptr.save(tmp_path / 'it', DataIterator(5, 1))
  assert ckptr.restore(tmp_path / 'it', DataIterator()).get_state() == {'position': 5, 'seed': 1}
  ckptr.save(tmp_path / 'kw', item=DataIterator(6, 2))
  assert ckptr.restore(tmp_path / 'kw', item=DataIterator()).get_state() == {
      'position': 6, 'seed': 2}


def test_grain_handler_async_checkpointer(tmp_path):
  """A plain (not async) handler writes on the caller's thread; the commit runs behind.
  (Orbax's AsyncCheckpointer needs an AsyncCheckpointHandler; its managers wrap one.)"""
  g = GRAIN['flaxckpt']
  with ocp.AsyncCheckpointer(g.Handler()) as ckptr:
    ckptr.save(tmp_path / 'it', args=g.Save(DataIterator(9)))
    ckptr.wait_until_finished()
    assert (tmp_path / 'it' / 'commit_success.txt').exists()
    assert ckptr.restore(tmp_path / 'it', args=g.Restore(DataIterator())).position == 9


@pytest.mark.parametrize('writer', LIBS)
@pytest.mark.parametrize('reader', LIBS)
def test_grain_handler_inside_composite(tmp_path, writer, reader):
  """Handlers inferred from the args types, in a composite beside a pytree."""
  w, r = GRAIN[writer], GRAIN[reader]
  wl, rl = LIBS[writer], LIBS[reader]
  wl.Checkpointer(wl.CompositeCheckpointHandler()).save(
      tmp_path / 'c', args=wl.args.Composite(state=wl.args.StandardSave(STATE),
                                             data_iter=w.Save(DataIterator(4, 8))))
  restored = rl.Checkpointer(rl.CompositeCheckpointHandler()).restore(
      tmp_path / 'c', args=rl.args.Composite(state=rl.args.StandardRestore(),
                                             data_iter=r.Restore(DataIterator())))
  _state_equal(restored.state)
  assert restored.data_iter.get_state() == {'position': 4, 'seed': 8}


@pytest.mark.parametrize('lib', LIBS)
@pytest.mark.parametrize('how', ['item_handlers', 'inferred', 'handler_registry'])
def test_grain_handler_through_checkpoint_manager(tmp_path, lib, how):
  """MaxText's form: a manager of a state and a data iterator, saved and restored by step."""
  ocp_ = LIBS[lib]
  g = GRAIN[lib]
  kwargs: dict[str, Any] = {}
  if how == 'item_handlers':
    kwargs['item_handlers'] = {'state': ocp_.StandardCheckpointHandler(), 'iter': g.Handler()}
  elif how == 'handler_registry':
    registry = ocp_.handlers.DefaultCheckpointHandlerRegistry()
    registry.add('state', ocp_.args.StandardSave)
    registry.add('state', ocp_.args.StandardRestore)
    registry.add('iter', g.Save, g.Handler)
    registry.add('iter', g.Restore, g.Handler)
    kwargs['handler_registry'] = registry
  options = ocp_.CheckpointManagerOptions(enable_async_checkpointing=True)
  with ocp_.CheckpointManager(tmp_path / 'ckpts', options=options, **kwargs) as mngr:
    for step in (1, 2):
      mngr.save(step, args=ocp_.args.Composite(state=ocp_.args.StandardSave(STATE),
                                               iter=g.Save(DataIterator(step * 10))))
    mngr.wait_until_finished()
  with ocp_.CheckpointManager(tmp_path / 'ckpts', **kwargs) as mngr:
    assert mngr.all_steps() == [1, 2]
    restored = mngr.restore(2, args=ocp_.args.Composite(
        state=ocp_.args.StandardRestore(), iter=g.Restore(DataIterator())))
  _state_equal(restored.state)
  assert restored.iter.position == 20


def test_orbax_manager_reads_flaxckpt_manager_with_user_handler(tmp_path):
  g_ours, g_theirs = GRAIN['flaxckpt'], GRAIN['orbax']
  with ocp.CheckpointManager(tmp_path) as mngr:
    mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(STATE),
                                         iter=g_ours.Save(DataIterator(33))))
  with orbax.CheckpointManager(tmp_path) as mngr:
    restored = mngr.restore(3, args=orbax.args.Composite(
        state=orbax.args.StandardRestore(), iter=g_theirs.Restore(DataIterator())))
  _state_equal(restored.state)
  assert restored.iter.position == 33


@pytest.mark.parametrize('lib', LIBS)
def test_handler_registry_entries_and_errors(lib):
  ocp_, g = LIBS[lib], GRAIN[lib]
  registry = ocp_.handlers.DefaultCheckpointHandlerRegistry()
  registry.add('iter', g.Save, g.Handler)
  registry.add(None, g.Restore, g.Handler())
  registry.add('state', ocp_.args.StandardSave)
  assert registry.has('iter', g.Save) and registry.has('iter', g.Save(DataIterator()))
  assert not registry.has('iter', g.Restore) and registry.has(None, g.Restore)
  assert isinstance(registry.get('iter', g.Save), g.Handler)
  assert isinstance(registry.get('state', ocp_.args.StandardSave),
                    ocp_.StandardCheckpointHandler)
  assert sorted(registry.get_all_entries(), key=str) == sorted(
      [('iter', g.Save), (None, g.Restore), ('state', ocp_.args.StandardSave)], key=str)
  with pytest.raises(ValueError, match="Entry for item=iter and args_type=.* already exists"):
    registry.add('iter', g.Save, g.Handler)
  with pytest.raises(KeyError, match='No entry for item=iter'):
    registry.get('iter', g.Restore)
  copy = ocp_.handlers.DefaultCheckpointHandlerRegistry(registry)
  assert copy.get_all_entries() == registry.get_all_entries()
  assert ocp_.handlers.CheckpointHandlerRegistry in type(registry).__mro__


def test_registry_error_classes_and_unregistered_args():
  from flaxckpt._registry import AlreadyExistsError, NoEntryError

  @dataclasses.dataclass
  class Unregistered(ocp.args.CheckpointArgs):
    item: Any = None

  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add('a', ocp.args.JsonSave)
  with pytest.raises(AlreadyExistsError):
    registry.add('a', ocp.args.JsonSave)
  with pytest.raises(NoEntryError):
    registry.get('b', ocp.args.JsonSave)
  with pytest.raises(ValueError, match='none is registered for that args type'):
    registry.add('a', Unregistered)


def test_composite_prefers_registry_entry_over_global_registration(tmp_path):
  """A registry entry for an item wins over the handler the args class is registered with."""
  g = GRAIN['flaxckpt']
  seen = []

  class CountingHandler(g.Handler):
    def save(self, directory, item=None, args=None):
      seen.append(directory.name)
      super().save(directory, item, args)

  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add('iter', g.Save, CountingHandler())
  ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=registry))
  ckptr.save(tmp_path / 'c', args=ocp.args.Composite(iter=g.Save(DataIterator(1)),
                                                     other=g.Save(DataIterator(2))))
  assert seen == ['iter']  # 'other' has no entry: the globally registered handler saved it.
  assert json.loads((tmp_path / 'c' / 'other' / 'process_0-of-1.json').read_text())[
      'position'] == 2
  with pytest.raises(ValueError, match='Please specify only one of the two'):
    ocp.CompositeCheckpointHandler('iter', handler_registry=registry)


@pytest.mark.parametrize('lib', LIBS)
def test_unregistered_handler_gets_the_call_arguments_as_given(tmp_path, lib):
  """A handler without args classes is called as ``save(directory, *args, **kwargs)``."""
  ocp_ = LIBS[lib]

  class TextHandler(ocp_.CheckpointHandler):
    def save(self, directory, text, suffix=''):
      (directory / 'text.txt').write_text(text + suffix)

    def restore(self, directory, upper=False):
      text = (directory / 'text.txt').read_text()
      return text.upper() if upper else text

  ckptr = ocp_.Checkpointer(TextHandler())
  ckptr.save(tmp_path / 't', 'hello', suffix='!')
  assert ckptr.restore(tmp_path / 't') == 'hello!'
  assert ckptr.restore(tmp_path / 't', upper=True) == 'HELLO!'


@pytest.mark.parametrize('lib', LIBS)
def test_abstract_checkpointer_isinstance(lib):
  ocp_ = LIBS[lib]
  for ckptr in (ocp_.Checkpointer(ocp_.PyTreeCheckpointHandler()),
                ocp_.AsyncCheckpointer(ocp_.PyTreeCheckpointHandler()),
                ocp_.StandardCheckpointer()):
    assert isinstance(ckptr, ocp_.AbstractCheckpointer)
    assert isinstance(ckptr, ocp_.checkpointers.AbstractCheckpointer)
    ckptr.close()
  assert not isinstance(ocp_.PyTreeCheckpointHandler(), ocp_.AbstractCheckpointer)


def test_register_with_handler_refuses_what_orbax_refuses():
  g = GRAIN['flaxckpt']
  with pytest.raises(ValueError, match='cannot both be False'):
    ocp.args.register_with_handler(g.Handler)
  with pytest.raises(TypeError, match='must subclass `CheckpointArgs`'):
    ocp.args.register_with_handler(g.Handler, for_save=True)(dict)
  assert ocp.args.get_registered_handler_cls(g.Save) is g.Handler
  assert ocp.args.get_registered_args_cls(g.Handler()) == (g.Save, g.Restore)
  assert ocp.args.has_registered_args(g.Handler)


ARRAYS = {'matrix': np.arange(12, dtype=np.float32).reshape(3, 4),
          'jax': jnp.arange(5, dtype=jnp.int32), 'int': 7, 'float': 2.5,
          'np_scalar': np.float32(1.5)}
# What both libraries restore each as (Orbax restores numpy scalars as Python numbers).
RESTORED_TYPES = {'matrix': np.ndarray, 'jax': jax.Array, 'int': int, 'float': float,
                  'np_scalar': float}


@pytest.mark.filterwarnings('ignore:Sharding info not provided')  # Orbax restoring a jax.Array.
@pytest.mark.parametrize('writer', LIBS)
@pytest.mark.parametrize('reader', LIBS)
@pytest.mark.parametrize('name', ARRAYS)
def test_array_checkpoint_handler_cross_reads(tmp_path, writer, reader, name):
  value = ARRAYS[name]
  LIBS[writer].Checkpointer(LIBS[writer].ArrayCheckpointHandler()).save(
      tmp_path / 'a', args=LIBS[writer].args.ArraySave(value))
  assert (tmp_path / 'a' / 'checkpoint').is_dir()  # Orbax's layout: one zarr array, no OCDBT.
  assert not (tmp_path / 'a' / 'manifest.ocdbt').exists()
  restored = LIBS[reader].Checkpointer(LIBS[reader].ArrayCheckpointHandler()).restore(
      tmp_path / 'a', args=LIBS[reader].args.ArrayRestore())
  np.testing.assert_array_equal(np.asarray(restored), np.asarray(value))
  assert isinstance(restored, RESTORED_TYPES[name])
  if not np.isscalar(value):
    assert restored.dtype == value.dtype


def test_array_checkpoint_handler_refuses_trees_and_names_its_array(tmp_path):
  ckptr = ocp.Checkpointer(ocp.ArrayCheckpointHandler('weights'))
  with pytest.raises(TypeError, match='expected an array or a scalar, got dict'):
    ckptr.save(tmp_path / 'bad', args=ocp.args.ArraySave({'a': 1}))
  ckptr.save(tmp_path / 'a', np.ones(3))  # The older form: ArraySave(item).
  assert (tmp_path / 'a' / 'weights').is_dir()
  restored = orbax.Checkpointer(orbax.ArrayCheckpointHandler('weights')).restore(tmp_path / 'a')
  np.testing.assert_array_equal(restored, np.ones(3))


@pytest.mark.parametrize('reader', LIBS)
def test_base_pytree_handler_round_trip(tmp_path, reader):
  tree = {'a': np.arange(4.0), 'b': {'c': np.int32(3)}}
  ocp.Checkpointer(ocp.BasePyTreeCheckpointHandler()).save(
      tmp_path / 'p', args=ocp.handlers.BasePyTreeSaveArgs(tree))
  rl = LIBS[reader]
  handler = (rl.BasePyTreeCheckpointHandler() if reader == 'flaxckpt'
             else orbax.PyTreeCheckpointHandler())
  args = (ocp.handlers.BasePyTreeRestoreArgs() if reader == 'flaxckpt'
          else orbax.args.PyTreeRestore())
  restored = rl.Checkpointer(handler).restore(tmp_path / 'p', args=args)
  np.testing.assert_array_equal(restored['a'], tree['a'])
  assert int(restored['b']['c']) == 3
  with pytest.raises(NotImplementedError, match='partial_save_mode'):
    ocp.Checkpointer(ocp.BasePyTreeCheckpointHandler()).save(
        tmp_path / 'q', args=ocp.handlers.BasePyTreeSaveArgs(tree, partial_save_mode=True))


@pytest.mark.parametrize('writer', LIBS)
@pytest.mark.parametrize('reader', LIBS)
def test_msgpack_aggregate_handler_cross_reads(tmp_path, writer, reader):
  tree = {'a': np.arange(3), 'b': [1, 2.5, 'x'], 'c': (np.float32(1),), 'e': {}}
  path = epath.Path(tmp_path / 'tree.msgpack')

  async def write():
    future = await LIBS[writer].aggregate_handlers.MsgpackHandler().serialize(path, tree)
    future.result()

  asyncio.run(write())
  restored = LIBS[reader].aggregate_handlers.MsgpackHandler().deserialize(path)
  np.testing.assert_array_equal(restored['a'], tree['a'])
  assert restored['b'] == [1, 2.5, 'x'] and restored['e'] == {}
  assert restored['c'] == [np.float32(1)]  # Tuples become lists, as Orbax writes them.
  with pytest.raises(FileNotFoundError, match='Checkpoint does not exist'):
    LIBS[reader].aggregate_handlers.MsgpackHandler().deserialize(epath.Path(tmp_path / 'none'))
