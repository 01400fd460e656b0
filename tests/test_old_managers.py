"""CheckpointManager directories written by old Orbax releases list and restore exactly.

Every ``orbax_manager`` case of ``tests/data/old-formats/manifest.json`` (orbax 0.1.8, 0.2.7, 0.5.9
and 0.10.2) is read through the calls users make: the current API (``CheckpointManager(path)``,
``restore(step)`` with and without args) and the older one of the seed docs (a dict of
checkpointers, ``restore(step, items=..., restore_kwargs=...)``). Each test reads a scratch copy.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import msgpack
import numpy as np
import pytest

import flaxckpt as ocp
from flaxckpt import _composite_handler
import old_formats

_CASES = old_formats.cases('orbax_manager')
_MULTI = [c for c in _CASES if c['case'] != 'manager_default']
_OLD_TMP = '.orbax-checkpoint-tmp-1795457646680668'  # How every era named a save in progress.
_STATE = old_formats.state
_copy = old_formats.copy_case


def _ids(cases: list[dict[str, Any]]) -> list[str]:
  return [c['path'] for c in cases]


def _expected(case: dict[str, Any], item: str, step: int) -> Any:
  return _STATE.expected(case['items'][item]['fn'], step=step)


def _check_items(case: dict[str, Any], restored: Any, step: int,
                 metrics: bool = False) -> None:
  """``restored`` holds exactly the case's items (and its metrics) of ``step``, bit for bit."""
  names = set(case['items']) | ({'metrics'} if metrics else set())
  assert isinstance(restored, ocp.args.Composite) and set(restored) == names
  for name in case['items']:
    _STATE.tree_eq_loose(_expected(case, name, step), restored[name])
  if metrics:
    assert restored['metrics'] == _STATE.expected('metrics', step=step)


def _old_checkpointers(case: dict[str, Any]) -> dict[str, ocp.Checkpointer]:
  """The dict of checkpointers the case was written with (orbax < 0.5's API)."""
  handlers = {'pytree': ocp.PyTreeCheckpointHandler, 'json': ocp.JsonCheckpointHandler}
  return {name: ocp.Checkpointer(handlers[item['handler']]())
          for name, item in case['items'].items()}


@pytest.mark.parametrize('case', _CASES, ids=_ids(_CASES))
def test_steps_are_listed_and_saves_in_progress_are_not(case, tmp_path):
  directory = _copy(case, tmp_path)
  last = case['steps'][-1]
  shutil.copytree(directory / str(last), directory / f'{last + 1}{_OLD_TMP}')
  mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
  assert mngr.all_steps() == case['steps']
  assert mngr.latest_step() == last
  assert ocp.CheckpointManager(directory).all_steps() == case['steps']


@pytest.mark.parametrize('case', [c for c in _CASES if c.get('best')],
                         ids=_ids([c for c in _CASES if c.get('best')]))
def test_best_step_comes_from_the_stored_metrics(case, tmp_path):
  directory = _copy(case, tmp_path)
  losses = {s: _STATE.expected('metrics', step=s)['loss'] for s in case['steps']}
  mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      best_fn=lambda m: m['loss'], best_mode='min', max_to_keep=case['max_to_keep']))
  assert mngr.best_step() == min(losses, key=losses.get)
  for step in case['steps']:
    assert mngr.metrics(step) == _STATE.expected('metrics', step=step)
  highest = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      best_fn=lambda m: m['loss'], best_mode='max'))
  assert highest.best_step() == max(losses, key=losses.get)
  restored = mngr.restore(mngr.best_step(),
                          args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))
  _STATE.tree_eq_loose(_expected(case, 'state', mngr.best_step()), restored['state'])


@pytest.mark.parametrize('case', _MULTI, ids=_ids(_MULTI))
def test_restore_without_args_gives_every_item(case, tmp_path):
  directory = _copy(case, tmp_path)
  for step in case['steps']:
    restored = ocp.CheckpointManager(directory).restore(step)
    _check_items(case, restored, step, metrics=case.get('metrics_item', False))
  assert set(ocp.CheckpointManager(directory).item_metadata(case['steps'][-1])) == set(
      case['items'])


@pytest.mark.parametrize('case', _MULTI, ids=_ids(_MULTI))
def test_restore_with_composite_args(case, tmp_path):
  directory = _copy(case, tmp_path)
  restore_args = {'pytree': ocp.args.PyTreeRestore, 'json': ocp.args.JsonRestore}
  args = ocp.args.Composite(**{name: restore_args[item['handler']]()
                               for name, item in case['items'].items()})
  step = case['steps'][0]
  _check_items(case, ocp.CheckpointManager(directory).restore(step, args=args), step)
  named = ocp.CheckpointManager(directory, item_names=tuple(case['items']))
  _check_items(case, named.restore(step, args=args), step)
  target = _expected(case, 'state', step)
  only_state = ocp.CheckpointManager(directory).restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  assert set(only_state) == {'state'}
  _STATE.tree_eq_loose(target, only_state['state'])
  assert isinstance(only_state['state']['params']['w'], type(target['params']['w']))


@pytest.mark.parametrize('case', _MULTI, ids=_ids(_MULTI))
def test_older_api_dict_of_checkpointers(case, tmp_path):
  directory = _copy(case, tmp_path)
  options = ocp.CheckpointManagerOptions(max_to_keep=case['max_to_keep'])
  mngr = ocp.CheckpointManager(directory, _old_checkpointers(case), options)
  assert mngr.all_steps() == case['steps']
  for step in case['steps']:
    restored = mngr.restore(step)
    _check_items(case, restored, step, metrics=case.get('metrics_item', False))
  step = case['steps'][0]
  targets = {name: _expected(case, name, step) for name in case['items']}
  restored = mngr.restore(step, items=targets)
  _check_items(case, restored, step)
  assert isinstance(restored['state']['step'], np.ndarray)
  restore_args = ocp.checkpoint_utils.construct_restore_args(targets['state'])
  restored = mngr.restore(step, items={'state': targets['state']},
                          restore_kwargs={'state': {'restore_args': restore_args}})
  assert set(restored) == {'state'}
  _STATE.tree_eq_loose(targets['state'], restored['state'])


_DEFAULTS = [c for c in _CASES if c['case'] == 'manager_default']


@pytest.mark.parametrize('case', _DEFAULTS, ids=_ids(_DEFAULTS))
def test_single_default_item(case, tmp_path):
  directory = _copy(case, tmp_path)
  for step in case['steps']:
    _STATE.tree_eq_loose(_expected(case, 'default', step),
                         ocp.CheckpointManager(directory).restore(step))
  step = case['steps'][-1]
  expected = _expected(case, 'default', step)
  _STATE.tree_eq_loose(expected, ocp.CheckpointManager(directory).restore(
      step, args=ocp.args.StandardRestore(expected)))
  assert set(ocp.CheckpointManager(directory).item_metadata(step)) == set(expected)
  older = ocp.CheckpointManager(directory, ocp.Checkpointer(ocp.PyTreeCheckpointHandler()))
  assert older.all_steps() == case['steps']
  _STATE.tree_eq_loose(expected, older.restore(step))
  restored = older.restore(step, items=expected)
  _STATE.tree_eq_loose(expected, restored)
  assert isinstance(restored['params']['w'], np.ndarray)


def test_handler_inference_tells_a_lone_aggregate_file_from_a_json_file(tmp_path):
  """Orbax < 0.5 wrote a tree whose leaves were all aggregated as nothing but the msgpack
  ``checkpoint`` file; a JSON item is one JSON file, whatever its name."""
  pytree, json_item, other = tmp_path / 'pytree', tmp_path / 'json', tmp_path / 'other'
  for directory in (pytree, json_item, other):
    directory.mkdir()
  (pytree / 'checkpoint').write_bytes(msgpack.packb({'a': 1, 'b': {'c': 2.5}}))
  (json_item / 'checkpoint').write_text(json.dumps({'a': 1}))
  (other / 'notes').mkdir()
  (other / 'more').mkdir()
  assert isinstance(_composite_handler._infer_handler(pytree, None),
                    ocp.PyTreeCheckpointHandler)
  assert isinstance(_composite_handler._infer_handler(json_item, None),
                    ocp.JsonCheckpointHandler)
  with pytest.raises(ocp.NotACheckpointError, match='cannot tell which handler'):
    _composite_handler._infer_handler(other, None)
  restored = ocp.CompositeCheckpointHandler().restore(tmp_path, ocp.args.Composite(
      pytree=None, json=None))
  assert restored['json'] == {'a': 1}
  assert dict(restored['pytree']) == {'a': 1, 'b': {'c': 2.5}}
