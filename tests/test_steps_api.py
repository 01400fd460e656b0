"""ocp.step / ocp.path.step and the step helpers of ocp.utils, beside Orbax's on the same
directories (written by our CheckpointManager and by Orbax's)."""

from __future__ import annotations

import pathlib

import numpy as np
import orbax.checkpoint as orbax
import pytest

import flaxckpt as ocp

TMP = '.orbax-checkpoint-tmp'


def _root(tmp_path: pathlib.Path) -> pathlib.Path:
  """A root with committed steps of several namings, an unfinished save, and other entries."""
  root = tmp_path / 'root'
  for name in ['1', '0002', '12', 'ckpt_3', 'ckpt_0004', '5' + TMP + '-1700000000',
               'ckpt_6' + TMP, 'other', '_SNAPSHOTS', '007x']:
    (root / name).mkdir(parents=True)
  (root / '8').write_text('a file, not a step')
  return root


FORMATS = [{}, {'step_prefix': 'ckpt'}, {'step_format_fixed_length': 4},
           {'step_prefix': 'ckpt', 'step_format_fixed_length': 4}]


@pytest.mark.parametrize('kwargs', FORMATS)
def test_standard_name_format_finds_what_orbax_finds(tmp_path, kwargs):
  root = _root(tmp_path)
  ours = ocp.step.standard_name_format(**kwargs)
  theirs = orbax.step.standard_name_format(**kwargs)
  for step in (0, 7, 12345):
    assert ours.build_name(step) == theirs.build_name(step)
    assert (str(ocp.step.build_step_path(root, ours, step))
            == str(orbax.step.build_step_path(root, theirs, step)))
  found = sorted((m.step, m.path.name) for m in ours.find_all(root))
  assert found == sorted((m.step, m.path.name) for m in theirs.find_all(root))
  assert found  # Every format finds something in this root.
  for step, name in found:
    assert ours.find_step(root, step) == ocp.step.Metadata(step=step, path=root / name)
    assert theirs.find_step(root, step).path.name == name
  assert ocp.step.latest_step_metadata(root, ours).step == max(s for s, _ in found)
  assert orbax.step.latest_step_metadata(root, theirs).step == max(s for s, _ in found)
  assert str(ours).startswith('StandardNameFormat(')


def test_find_step_of_a_missing_or_unfinished_step_raises_value_error(tmp_path):
  root = _root(tmp_path)
  fmt = ocp.step.standard_name_format()
  for step in (5, 99):  # 5 is only an unfinished save.
    with pytest.raises(ValueError, match=f"'{step}'.*step={step}"):
      fmt.find_step(root, step)
    with pytest.raises(ValueError):
      orbax.step.standard_name_format().find_step(root, step)
    assert ocp.step.maybe_find_step_metadata(root, fmt, step=step) is None
  with pytest.raises(ValueError, match='does not exist'):
    fmt.find_step(tmp_path / 'nowhere', 1)
  assert list(fmt.find_all(tmp_path / 'nowhere')) == []
  assert ocp.step.latest_step_metadata(tmp_path / 'nowhere', fmt) is None


def test_find_step_path_includes_a_save_in_flight_on_request(tmp_path):
  root = _root(tmp_path)
  fmt = ocp.step.standard_name_format()
  with pytest.raises(ValueError):
    ocp.step.find_step_path(root, fmt, step=5)
  found = ocp.step.find_step_path(root, fmt, step=5, include_uncommitted=True)
  assert found == root / ('5' + TMP + '-1700000000')
  assert found.name == orbax.step.find_step_path(root, orbax.step.standard_name_format(),
                                                 step=5, include_uncommitted=True).name
  assert ocp.step.find_step_path(root, fmt, step=1, include_uncommitted=True) == root / '1'


def test_is_path_finalized_and_temporary_agree_with_orbax(tmp_path):
  root = _root(tmp_path)
  committed = root / 'commit_file_step'
  committed.mkdir()
  (committed / 'commit_success.txt').write_text('ok')
  for name in ['1', 'ckpt_3', '5' + TMP + '-1700000000', 'ckpt_6' + TMP, 'other', '8',
               'missing', 'commit_file_step']:
    path = root / name
    for cls_name in (None, 'AtomicRenameTemporaryPath', 'CommitFileTemporaryPath'):
      ours_cls = cls_name and getattr(ocp.path.atomicity, cls_name)
      theirs_cls = cls_name and getattr(orbax.path.atomicity, cls_name)
      assert (ocp.step.is_path_finalized(path, temporary_path_cls=ours_cls)
              == orbax.step.is_path_finalized(path, temporary_path_cls=theirs_cls)), (name,
                                                                                     cls_name)
      assert (ocp.step.is_path_temporary(path, temporary_path_cls=ours_cls)
              == orbax.step.is_path_temporary(path, temporary_path_cls=theirs_cls)), (name,
                                                                                     cls_name)
    assert ocp.utils.is_checkpoint_finalized(path) == orbax.utils.is_checkpoint_finalized(path)
    assert ocp.utils.is_tmp_checkpoint(path) == orbax.utils.is_tmp_checkpoint(path)


def test_legacy_step_helpers_match_orbax(tmp_path):
  root = _root(tmp_path)
  assert sorted(ocp.utils.checkpoint_steps(root)) == sorted(orbax.utils.checkpoint_steps(root))
  assert (sorted(p.name for p in ocp.utils.checkpoint_steps_paths(root))
          == sorted(p.name for p in orbax.utils.checkpoint_steps_paths(root)))
  assert (sorted(p.get().name for p in ocp.utils.tmp_checkpoints(root))
          == sorted(p.get().name for p in orbax.utils.tmp_checkpoints(root))
          == sorted(ocp.step.tmp_checkpoints(root)) == sorted(orbax.step.tmp_checkpoints(root))
          == ['5' + TMP + '-1700000000', 'ckpt_6' + TMP])
  assert {p.get_final().name for p in ocp.utils.tmp_checkpoints(root)} == {'5', 'ckpt_6'}
  assert ocp.utils.any_checkpoint_step(root) in ocp.utils.checkpoint_steps(root)
  empty = tmp_path / 'empty'
  empty.mkdir()
  assert ocp.utils.any_checkpoint_step(empty) is orbax.utils.any_checkpoint_step(empty) is None
  assert ocp.utils.checkpoint_steps(tmp_path / 'nowhere') == []
  assert ocp.utils.TMP_DIR_SUFFIX == orbax.utils.TMP_DIR_SUFFIX


@pytest.mark.parametrize('name', ['12', 'ckpt_12', 'a_b_0012', '12' + TMP,
                                  'ckpt_12' + TMP + '-1700000000', 'x', 'ckpt', ''])
def test_step_from_checkpoint_name_matches_orbax(name):
  try:
    expected = orbax.utils.step_from_checkpoint_name(name)
  except ValueError:
    with pytest.raises(ValueError, match='Unrecognized name format'):
      ocp.utils.step_from_checkpoint_name(name)
  else:
    assert ocp.utils.step_from_checkpoint_name(name) == expected == 12


@pytest.mark.parametrize('kwargs', [{}, {'name': 'params'}, {'step_prefix': 'ckpt'},
                                    {'name': 'state', 'step_prefix': 'ckpt',
                                     'step_format_fixed_length': 6},
                                    {'override_directory': '/elsewhere', 'name': 'x'}])
def test_get_save_directory_matches_orbax(tmp_path, kwargs):
  assert (str(ocp.utils.get_save_directory(42, tmp_path, **kwargs))
          == str(orbax.utils.get_save_directory(42, tmp_path, **kwargs)))


def test_get_save_directory_takes_a_name_format_and_refuses_escaping_names(tmp_path):
  fmt = ocp.step.standard_name_format(step_prefix='s', step_format_fixed_length=3)
  assert ocp.utils.get_save_directory(7, tmp_path, step_name_format=fmt) == tmp_path / 's_007'
  with pytest.raises(ValueError, match='name'):
    ocp.utils.get_save_directory(7, tmp_path, name='../outside')
  with pytest.raises(ValueError, match='cannot be None'):
    ocp.utils.get_save_directory(7, None)


def test_manager_steps_are_found_by_both_libraries(tmp_path):
  # Steps written by each library's manager, found by both libraries' name formats.
  state = {'w': np.arange(4)}
  for lib, sub in ((ocp, 'ours'), (orbax, 'theirs')):
    options = lib.CheckpointManagerOptions(step_prefix='run', step_format_fixed_length=3)
    with lib.CheckpointManager(tmp_path / sub, options=options) as mngr:
      for step in (1, 2, 10):
        mngr.save(step, args=lib.args.StandardSave(state))
      mngr.wait_until_finished()
  for sub in ('ours', 'theirs'):
    for lib in (ocp, orbax):
      fmt = lib.step.standard_name_format(step_prefix='run', step_format_fixed_length=3)
      assert sorted(m.step for m in fmt.find_all(tmp_path / sub)) == [1, 2, 10]
      assert fmt.find_step(tmp_path / sub, 10).path.name == 'run_010'
    meta = ocp.step.standard_name_format(step_prefix='run', step_format_fixed_length=3
                                         ).find_step(tmp_path / sub, 2)
    # Commit times come from _CHECKPOINT_METADATA, as Orbax reads them.
    theirs = orbax.step.standard_name_format(step_prefix='run', step_format_fixed_length=3
                                             ).find_step(tmp_path / sub, 2)
    assert meta.commit_timestamp_nsecs == theirs.commit_timestamp_nsecs is not None
    assert meta.init_timestamp_nsecs == theirs.init_timestamp_nsecs
    assert meta.commit_timestamp == theirs.commit_timestamp


def test_metadata_timestamps_of_a_step_without_metadata_fall_back(tmp_path):
  (tmp_path / '3').mkdir()
  (tmp_path / '4').mkdir()
  (tmp_path / '4' / '_CHECKPOINT_METADATA').write_text('{"commit_timestamp_nsecs": "x"')
  for step in (3, 4):
    meta = ocp.step.standard_name_format().find_step(tmp_path, step)
    assert meta.commit_timestamp_nsecs is None and meta.init_timestamp_nsecs is None
    assert meta.commit_timestamp.timestamp() == pytest.approx(
        (tmp_path / str(step)).stat().st_mtime)


def test_commit_file_format_counts_only_steps_with_commit_success(tmp_path):
  for name in ('1', '2'):
    (tmp_path / name).mkdir()
  (tmp_path / '2' / 'commit_success.txt').write_text('ok')
  for lib in (ocp, orbax):
    fmt = lib.step.standard_name_format(
        temporary_path_cls=lib.path.atomicity.CommitFileTemporaryPath)
    assert [m.step for m in fmt.find_all(tmp_path)] == [2]
    with pytest.raises(ValueError):
      fmt.find_step(tmp_path, 1)


class _EvenStepsOnly:
  """A user's NameFormat, as projects write them: 'step-<n>' directories of even steps."""

  def build_name(self, step: int) -> str:
    return f'step-{step}'

  def find_all(self, base_path):
    base = pathlib.Path(base_path)
    return iter(ocp.step.build_step_metadatas(
        sorted(base.iterdir()),
        lambda p: ocp.step.Metadata(step=int(p.name[5:]), path=p)
        if p.name.startswith('step-') and int(p.name[5:]) % 2 == 0 else None))

  def find_step(self, base_path, step):
    for meta in self.find_all(base_path):
      if meta.step == step:
        return meta
    raise ValueError(f'no step {step}')


def test_user_name_format_and_composite_formats(tmp_path):
  for name in ('step-2', 'step-3', 'step-4', '7'):
    (tmp_path / name).mkdir()
  custom: ocp.step.NameFormat[ocp.step.Metadata] = _EvenStepsOnly()
  assert [m.step for m in custom.find_all(tmp_path)] == [2, 4]
  assert ocp.step.build_step_path(tmp_path, custom, 6) == tmp_path / 'step-6'
  assert ocp.step.latest_step_metadata(tmp_path, custom).step == 4
  assert ocp.step.step_metadata_of_checkpoint_path(tmp_path / 'step-4', custom).step == 4
  with pytest.raises(ValueError, match='not a committed step'):
    ocp.step.step_metadata_of_checkpoint_path(tmp_path / 'step-3', custom)
  standard = ocp.step.standard_name_format()
  both = ocp.step.composite_name_format(custom, [custom, standard])
  assert both.build_name(8) == 'step-8'
  assert sorted(m.step for m in both.find_all(tmp_path)) == [2, 4, 7]
  assert both.find_step(tmp_path, 7).path == tmp_path / '7'
  with pytest.raises(ValueError, match='no step 9'):
    both.find_step(tmp_path, 9)
  with pytest.raises(ValueError, match='must be one of'):
    ocp.step.composite_name_format(custom, [standard])
  assert ocp.step.is_standard_name_format(standard)
  assert not ocp.step.is_standard_name_format(custom)
  shared = ocp.step.single_host_load_and_broadcast_name_format(standard)
  assert [m.step for m in shared.find_all(tmp_path)] == [7]  # One process: a plain listing.
  with pytest.raises(ValueError, match='only supported for standard'):
    ocp.step.single_host_load_and_broadcast_name_format(custom)


def test_path_step_and_step_are_one_module():
  assert ocp.path.step.standard_name_format is ocp.step.standard_name_format
  assert ocp.path.step.Metadata is ocp.step.Metadata
  assert ocp.step.step_prefix_with_underscore('a') == 'a_'
  assert ocp.step.step_prefix_with_underscore(None) == ''
