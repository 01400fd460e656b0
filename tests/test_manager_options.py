"""CheckpointManager keywords each do what they say (Orbax's options, logger=, handler_registry=),
checked on real files and, where it can be, against Orbax's CheckpointManager."""

import datetime
import os
import stat
import threading

import numpy as np
import orbax.checkpoint as orbax
import pytest

import flaxckpt as ocp
from flaxckpt import checkpoint_manager as cm
from trees import assert_trees_equal


def _save_args(lib, step):
  return lib.args.StandardSave({'x': np.full(3, step)})


def test_checkpoint_manager_module_ports_orbax_imports(tmp_path):
  for name in ('DEFAULT_ITEM_NAME', 'METADATA_ITEM_NAME', 'METRIC_ITEM_NAME'):
    assert getattr(cm, name) == getattr(orbax.checkpoint_manager, name)
  assert cm.CheckpointManager is ocp.CheckpointManager
  assert cm.AsyncOptions is ocp.options.AsyncOptions and cm.FileOptions is ocp.FileOptions
  assert issubclass(cm.StepAlreadyExistsError, ValueError)
  info = cm.CheckpointInfo(step=np.int64(3), time=datetime.datetime.now(), metrics=None)
  assert type(info.step) is int
  mngr = cm.CheckpointManager(tmp_path, options=cm.CheckpointManagerOptions(
      create=True, enable_async_checkpointing=False, save_interval_steps=2))
  assert not cm.is_async_checkpointer(mngr._checkpointer)  # noqa: SLF001
  assert cm.is_async_checkpointer(ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler()))
  assert [mngr.save(s, args=_save_args(ocp, s)) for s in range(4)] == [True, False, True, False]
  (tmp_path / cm.METADATA_ITEM_NAME).mkdir()  # The run-metadata folder is never a step.
  assert cm.CheckpointManager(tmp_path).all_steps() == [0, 2]


def test_async_options_timeout_fires(tmp_path):
  release = threading.Event()
  options = ocp.CheckpointManagerOptions(async_options=ocp.options.AsyncOptions(
      timeout_secs=1, post_finalization_callback=release.wait))
  mngr = ocp.CheckpointManager(tmp_path, options=options)
  mngr.save(0, args=_save_args(ocp, 0))
  with pytest.raises(TimeoutError, match='did not finish within'):
    mngr.wait_until_finished()
  release.set()
  mngr.wait_until_finished()
  assert mngr.all_steps() == [0]
  mngr.close()


def test_file_options_set_the_permissions_of_what_is_created(tmp_path):
  root = tmp_path / 'run'
  options = ocp.CheckpointManagerOptions(
      enable_async_checkpointing=False,
      file_options=cm.FileOptions(path_permission_mode=0o750))
  mngr = ocp.CheckpointManager(root, options=options)
  mngr.save(1, args=_save_args(ocp, 1))
  assert stat.S_IMODE(os.stat(root).st_mode) == 0o750
  assert stat.S_IMODE(os.stat(root / '1').st_mode) == 0o750
  assert_trees_equal(mngr.restore(1), {'x': np.full(3, 1)})


def test_create_false_leaves_a_missing_root_alone(tmp_path):
  ocp.CheckpointManager(tmp_path / 'none', options=ocp.CheckpointManagerOptions(create=False))
  assert not (tmp_path / 'none').exists()


def test_step_name_format_names_and_finds_steps_as_orbax(tmp_path):
  def options(lib):
    return lib.CheckpointManagerOptions(
        enable_async_checkpointing=False, max_to_keep=2,
        step_name_format=lib.step.standard_name_format(step_prefix='ckpt',
                                                       step_format_fixed_length=4))
  mngr = ocp.CheckpointManager(tmp_path, options=options(ocp))
  for step in (1, 5, 12):
    mngr.save(step, args=_save_args(ocp, step))
  (tmp_path / '77').mkdir()  # Not of the format: never a step.
  assert sorted(os.listdir(tmp_path)) == ['77', 'ckpt_0005', 'ckpt_0012']
  theirs = orbax.CheckpointManager(tmp_path, options=options(orbax))
  assert theirs.all_steps() == ocp.CheckpointManager(tmp_path, options=options(ocp)).all_steps()
  assert_trees_equal(theirs.restore(12, args=orbax.args.StandardRestore()),
                     {'x': np.full(3, 12)})


def test_commit_file_temporary_path_steps_count_once_committed(tmp_path):
  """gemma: temporary_path_class=CommitFileTemporaryPath writes a step in place and commits it
  with commit_success.txt; a step directory without it is not a step."""
  def options(lib):
    return lib.CheckpointManagerOptions(
        temporary_path_class=lib.path.atomicity.CommitFileTemporaryPath,
        preservation_policy=lib.checkpoint_managers.LatestN(1))
  with ocp.CheckpointManager(tmp_path, options=options(ocp)) as mngr:
    mngr.save(2, args=_save_args(ocp, 2))
    mngr.save(3, args=_save_args(ocp, 3))
  assert sorted(os.listdir(tmp_path)) == ['3']
  assert (tmp_path / '3' / 'commit_success.txt').is_file()
  (tmp_path / '9' / 'default').mkdir(parents=True)  # Cut off before its commit file.
  assert ocp.CheckpointManager(tmp_path, options=options(ocp)).all_steps() == [3]
  theirs = orbax.CheckpointManager(tmp_path, options=options(orbax))
  assert theirs.all_steps() == [3]
  assert_trees_equal(theirs.restore(3, args=orbax.args.StandardRestore()), {'x': np.full(3, 3)})


def test_background_delete_deletes_on_its_own_thread_and_close_waits(tmp_path, monkeypatch):
  from flaxckpt import _steps
  threads = []
  delete = _steps.delete

  def recorded_delete(path):
    threads.append(threading.current_thread().name)
    delete(path)

  monkeypatch.setattr(_steps, 'delete', recorded_delete)
  options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_background_delete=True,
                                         enable_async_checkpointing=False)
  with ocp.CheckpointManager(tmp_path, options=options) as mngr:
    for step in range(3):
      mngr.save(step, args=_save_args(ocp, step))
    assert mngr.all_steps() == [2]  # Forgotten at once; the directories go in the background.
    mngr.wait_until_finished()
    assert sorted(os.listdir(tmp_path)) == ['2']
    mngr.save(3, args=_save_args(ocp, 3))
  assert sorted(os.listdir(tmp_path)) == ['3']  # close() waited.
  assert len(threads) == 3 and all(t.startswith('flaxckpt-delete') for t in threads)


def test_lightweight_initialize_reads_no_metrics_as_orbax(tmp_path):
  """Orbax's meaning: at construction, steps are listed but their metrics and times are not
  read, so retention by best_fn sees the earlier steps as having no metrics."""
  def options(lib, light):
    return lib.CheckpointManagerOptions(best_fn=lambda m: m['loss'], best_mode='min',
                                        max_to_keep=1, keep_checkpoints_without_metrics=False,
                                        enable_async_checkpointing=False,
                                        lightweight_initialize=light)
  results = []
  for lib in (ocp, orbax):
    for light in (False, True):
      root = tmp_path / f'{lib.__name__}-{light}'
      first = lib.CheckpointManager(root, options=options(lib, light))
      for step, loss in ((0, .1), (1, .5)):
        first.save(step, args=_save_args(lib, step), metrics={'loss': loss}, force=True)
      first.close()
      second = lib.CheckpointManager(root, options=options(lib, light))
      assert second.all_steps() == [0]
      second.save(2, args=_save_args(lib, 2), metrics={'loss': .9})
      results.append((light, second.all_steps()))
      second.close()
  assert results[:2] == results[2:] == [(False, [0]), (True, [2])]


def test_keep_time_interval_keeps_a_step_per_interval(tmp_path):
  options = ocp.CheckpointManagerOptions(keep_time_interval=datetime.timedelta(hours=1),
                                         max_to_keep=1, enable_async_checkpointing=False)
  mngr = ocp.CheckpointManager(tmp_path, options=options)
  for step in range(4):
    mngr.save(step, args=_save_args(ocp, step))
  assert mngr.all_steps() == [0, 3]  # The first (an hour has not passed since) and the newest.
  with pytest.raises(TypeError, match='keep_time_interval must be a datetime.timedelta'):
    ocp.CheckpointManagerOptions(keep_time_interval=3600)


def test_should_save_fn_decides(tmp_path):
  seen = []

  def should_save(step, latest):
    seen.append((step, latest))
    return step in (0, 4, 5)

  mngr = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(
      should_save_fn=should_save, save_interval_steps=1, enable_async_checkpointing=False))
  assert [mngr.save(s, args=_save_args(ocp, s)) for s in range(6)] == [
      True, False, False, False, True, True]
  assert seen == [(0, None), (1, 0), (2, 0), (3, 0), (4, 0), (5, 4)]


class _Entries(ocp.logging.AbstractLogger):
  def __init__(self):
    self.entries = []

  def log_entry(self, entry):
    self.entries.append(entry)


def test_logger_gets_an_entry_per_save_and_restore_with_orbax_keys(tmp_path):
  import dataclasses

  from orbax.checkpoint.logging import step_statistics
  log = _Entries()
  mngr = ocp.CheckpointManager(tmp_path, logger=log, options=ocp.CheckpointManagerOptions(
      save_interval_steps=2))
  for step in range(3):
    mngr.save(step, args=_save_args(ocp, step))
  mngr.restore(2)
  assert [(e['event_type'], e['step']) for e in log.entries] == [
      ('save', 0), ('save', 2), ('restore', 2)]
  save_keys = {f.name for f in dataclasses.fields(step_statistics.SaveStepStatistics)}
  restore_keys = {f.name for f in dataclasses.fields(step_statistics.RestoreStepStatistics)}
  assert set(log.entries[0]) == save_keys and set(log.entries[2]) == restore_keys
  assert log.entries[1]['synchronous'] is False and log.entries[1]['directory'] == str(tmp_path)
  assert log.entries[1]['time_between_consecutive_saves_sec'] >= 0
  with pytest.raises(TypeError, match='logger must be a flaxckpt.logging.AbstractLogger'):
    ocp.CheckpointManager(tmp_path, logger=print)


def test_multiprocessing_options_and_enable_async_checkpointing(tmp_path):
  options = ocp.CheckpointManagerOptions(
      enable_async_checkpointing=False,
      multiprocessing_options=ocp.options.MultiprocessingOptions(
          primary_host=0, barrier_sync_key_prefix='trainer'))
  mngr = ocp.CheckpointManager(tmp_path, options=options)
  assert mngr.save(0, args=_save_args(ocp, 0))
  assert (tmp_path / '0' / 'commit_success.txt').is_file()  # Synchronous: already committed.
  with pytest.raises(TypeError, match='multiprocessing_options must be a flaxckpt.options'):
    ocp.CheckpointManagerOptions(multiprocessing_options={'primary_host': 0})


def test_handler_registry_gives_the_items_handlers(tmp_path):
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add('state', ocp.args.StandardSave, ocp.StandardCheckpointHandler)
  registry.add('state', ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
  registry.add('meta', ocp.args.JsonSave, ocp.JsonCheckpointHandler)
  registry.add('meta', ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
  options = ocp.CheckpointManagerOptions(best_fn=lambda m: m['acc'], max_to_keep=1,
                                         enable_async_checkpointing=False)
  mngr = ocp.CheckpointManager(tmp_path, options=options, handler_registry=registry)
  for step, acc in ((0, .9), (1, .2)):
    mngr.save(step, args=ocp.args.Composite(state=_save_args(ocp, step),
                                            meta=ocp.args.JsonSave({'step': step})),
              metrics={'acc': acc})
  assert mngr.all_steps() == [0]
  restored = ocp.CheckpointManager(tmp_path, handler_registry=registry).restore(0)
  assert_trees_equal(restored.state, {'x': np.full(3, 0)})
  assert restored.meta == {'step': 0}
  with pytest.raises(ValueError, match='handler_registry replaces'):
    ocp.CheckpointManager(tmp_path, item_names=('state',), handler_registry=registry)


def test_restore_gives_none_for_a_known_item_the_step_lacks(tmp_path):
  mngr = ocp.CheckpointManager(tmp_path, item_names=('state', 'dataset'))
  mngr.save(0, args=ocp.args.Composite(state=_save_args(ocp, 0)))
  restored = mngr.restore(0)
  assert_trees_equal(restored.state, {'x': np.full(3, 0)})
  assert restored.dataset is None and restored.get('dataset') is None
  theirs = orbax.CheckpointManager(tmp_path / 'orbax', item_names=('state', 'dataset'))
  theirs.save(0, args=orbax.args.Composite(state=_save_args(orbax, 0)))
  assert theirs.restore(0).get('dataset') is None  # Orbax leaves it out; .get gives None.
  theirs.close()


@pytest.mark.parametrize('lib', [ocp, orbax], ids=['flaxckpt', 'orbax'])
def test_todelete_subdir_keeps_deleted_steps_aside_as_orbax(tmp_path, lib):
  """Retention moves old steps into <root>/<todelete_subdir>/ instead of deleting them; the
  moved steps still restore, and neither library lists them as steps."""
  options = lib.CheckpointManagerOptions(max_to_keep=1, todelete_subdir='trash',
                                         enable_async_checkpointing=False)
  with lib.CheckpointManager(tmp_path, options=options) as mngr:
    for step in range(3):
      mngr.save(step, args=lib.args.StandardSave({'w': np.full(2, float(step))}))
    assert mngr.all_steps() == [2]
  assert sorted(os.listdir(tmp_path / 'trash')) == ['0', '1']
  restored = ocp.StandardCheckpointer().restore(tmp_path / 'trash' / '1' / 'default')
  np.testing.assert_array_equal(restored['w'], np.full(2, 1.0))
  for reader in (ocp, orbax):
    assert reader.CheckpointManager(tmp_path).all_steps() == [2]


def test_todelete_options_refuse_what_is_not_supported():
  with pytest.raises(ValueError, match='cannot both be set'):
    ocp.CheckpointManagerOptions(todelete_subdir='a', todelete_full_path='b')
  with pytest.raises(NotImplementedError, match='GCS'):
    ocp.CheckpointManagerOptions(todelete_full_path='trash/')
  with pytest.raises(ValueError, match="todelete_subdir '../outside' is not a plain name"):
    ocp.CheckpointManagerOptions(todelete_subdir='../outside')


class _Recording(ocp.StandardCheckpointHandler):
  """Records the directory each save writes into."""
  written: list = []

  def save(self, directory, args):
    self.written.append(directory)
    return super().save(directory, args)

  def async_save(self, directory, args):
    self.written.append(directory)
    return super().async_save(directory, args)


@pytest.mark.parametrize('mode, in_place', [('commit_file', True), ('atomic_rename', False)])
def test_atomicity_options_pick_the_commit_protocol_as_orbax(tmp_path, mode, in_place):
  """AtomicityOptions(mode=...) chooses what temporary_path_class would, for the manager and
  for a Checkpointer (in place, or in a temporary directory renamed at the commit); Orbax
  restores the result."""
  _Recording.written.clear()
  atomicity_options = ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode(mode))
  options = ocp.CheckpointManagerOptions(atomicity_options=atomicity_options)
  with ocp.CheckpointManager(tmp_path / 'run', options=options,
                             item_handlers=_Recording()) as mngr:
    mngr.save(1, args=ocp.args.StandardSave({'w': np.ones(2)}))
  ckptr = ocp.Checkpointer(_Recording(), atomicity_options=atomicity_options)
  ckptr.save(tmp_path / 'single', args=ocp.args.StandardSave({'w': np.ones(2)}))
  step_dir, single_dir = (d if d.name != 'default' else d.parent for d in _Recording.written)
  # The one-handler checkpointers take the option too.
  ocp.PyTreeCheckpointer(atomicity_options=atomicity_options).save(
      tmp_path / 'pytree', args=ocp.args.PyTreeSave({'w': np.ones(2)}))
  assert (tmp_path / 'pytree' / 'commit_success.txt').exists()
  assert (step_dir == tmp_path / 'run' / '1') == in_place, step_dir
  assert (single_dir == tmp_path / 'single') == in_place, single_dir
  assert orbax.options.AtomicityMode(mode).value == mode  # The same spelling as Orbax's.
  np.testing.assert_array_equal(
      orbax.CheckpointManager(tmp_path / 'run').restore(1, args=orbax.args.StandardRestore())['w'],
      np.ones(2))
