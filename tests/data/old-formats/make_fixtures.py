"""Write one era of old-format fixtures with the old libraries themselves.

Run it with the Python of a scratch venv that holds the old stack, for example:

    python3 -m venv /tmp/era-035
    /tmp/era-035/bin/pip install 'jax[cpu]==0.4.13' jaxlib==0.4.13 orbax-checkpoint==0.3.5 \\
        flax==0.7.2 optax==0.1.7 'numpy<1.25' scipy==1.11.4 tensorstore==0.1.45 ml_dtypes==0.2.0
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        /tmp/era-035/bin/python make_fixtures.py write /tmp/out f072-ocp035

It writes /tmp/out/<era>/<case>/... and /tmp/out/<era>.json (the era's manifest part). Then, with any
Python 3 (no jax needed):

    python3 make_fixtures.py merge /tmp/out/<era>.json

copies the era into this folder and adds its entry and cases to manifest.json (replacing an earlier
run of the same era). The cases, trees and step conventions are those of the other eras (state.py);
what an era's API lacks is skipped and listed under eras.<era>.skipped. Each case is read back by the
writing release itself right after it is written (``self_read``).

orbax 0.1.0 (package ``orbax``) predates jax 0.4.13, the oldest jaxlib on PyPI for Python 3.11: it
imports jax.experimental.gda_serialization, jax.experimental.global_device_array and
jax._src.device_array, all gone by then. ``_shim_old_jax`` aliases the first to its successor
(jax.experimental.array_serialization, same functions) and gives the GDA/DeviceArray names empty
stand-in classes (no value is of those types on jax 0.4.13; jax.Array leaves go to orbax's
ArrayHandler as they did with jax_array=True). The files are still laid out by orbax 0.1.0's own code;
the shims used are recorded in eras.<era>.shims.
"""
import json
import os
import shutil
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
FILES_CAP = 60  # like the other eras: the manifest lists at most this many paths per case


def _shim_old_jax():
  """See the module docstring. Returns the list of shims applied (empty on a jax that needs none)."""
  import importlib
  import types
  import jax
  shims = []
  try:
    importlib.import_module('jax.experimental.gda_serialization.serialization')
  except ImportError:
    from jax.experimental import array_serialization
    from jax.experimental.array_serialization import serialization
    sys.modules['jax.experimental.gda_serialization'] = array_serialization
    sys.modules['jax.experimental.gda_serialization.serialization'] = serialization
    shims.append('jax.experimental.gda_serialization -> jax.experimental.array_serialization')
  try:
    importlib.import_module('jax.experimental.global_device_array')
  except ImportError:
    m = types.ModuleType('jax.experimental.global_device_array')

    class GlobalDeviceArray:  # nothing is one on this jax
      pass
    m.GlobalDeviceArray = GlobalDeviceArray
    sys.modules[m.__name__] = m
    shims.append('jax.experimental.global_device_array.GlobalDeviceArray: empty stand-in class')
  try:
    importlib.import_module('jax._src.device_array')
  except ImportError:
    m = types.ModuleType('jax._src.device_array')

    class DeviceArray:  # nothing is one on this jax
      pass
    m.DeviceArray = DeviceArray
    sys.modules[m.__name__] = m
    shims.append('jax._src.device_array.DeviceArray: empty stand-in class')
  from jax.experimental import pjit
  if not hasattr(pjit, 'PartitionSpec'):
    pjit.PartitionSpec = jax.sharding.PartitionSpec
    shims.append('jax.experimental.pjit.PartitionSpec = jax.sharding.PartitionSpec')
  try:
    maps = importlib.import_module('jax.experimental.maps')
  except ImportError:
    maps = types.ModuleType('jax.experimental.maps')
    sys.modules[maps.__name__] = maps
  if not hasattr(maps, 'Mesh'):
    maps.Mesh = jax.sharding.Mesh
    shims.append('jax.experimental.maps.Mesh = jax.sharding.Mesh')
  # jax of orbax 0.1.0's day (0.4.1, with tensorstore <= 0.1.33, which has no zstd) wrote its arrays
  # gzip-compressed; jax 0.4.13 asks for zstd. Keep what the old pair wrote.
  import tensorstore as ts
  try:
    ts.Spec({'driver': 'zarr', 'kvstore': {'driver': 'memory'}, 'metadata': {'compressor': {'id': 'zstd'}}})
  except ValueError:
    ser = sys.modules.get('jax.experimental.gda_serialization.serialization')
    if ser is not None:
      orig = ser._get_metadata

      def _get_metadata(arr):
        md = orig(arr)
        if md.get('compressor', {}).get('id') == 'zstd':
          md['compressor'] = {'id': 'gzip'}
        return md
      ser._get_metadata = _get_metadata
      shims.append("serialization._get_metadata: compressor {'id': 'gzip'} (this tensorstore has no zstd, "
                   "as jax 0.4.1 wrote)")
  return shims


def _err(e):
  return f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'[:200]


def _listing(path):
  out = []
  for root, dirs, files in os.walk(path):
    rel = os.path.relpath(root, path)
    for d in dirs:
      out.append(os.path.normpath(os.path.join(rel, d)) + '/')
    for f in files:
      out.append(os.path.normpath(os.path.join(rel, f)))
  return sorted(out)


def _empty_dirs(path):
  out = []
  for root, dirs, files in os.walk(path):
    if root != path and not dirs and not files:
      out.append(os.path.relpath(root, path))
  return sorted(out)


def _clean_tmp(parent):
  """Drop save-in-progress leftovers (a failed try) so the era folder holds only finished cases."""
  for name in os.listdir(parent):
    if '.orbax-checkpoint-tmp-' in name:
      shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


CASES = ('pytree', 'pytree_sharded', 'standard', 'ts_pytree', 'manager', 'manager_best', 'manager_default',
         'flax_msgpack', 'flax_orbax', 'ts_flax_orbax', 'pytree_ocdbt', 'pytree_no_ocdbt')


def _needs_shims():
  """Only orbax 0.1.0-era code imports the jax modules that jax 0.4.13 no longer has."""
  import importlib.util
  spec = importlib.util.find_spec('orbax.checkpoint')
  src = os.path.join(os.path.dirname(spec.origin), 'type_handlers.py')
  if not os.path.exists(src):
    return False
  with open(src) as f:
    return 'gda_serialization' in f.read()


def write(out, era):
  """Each case in a fresh process: orbax 0.2-0.4 keep OCDBT switches in global type handlers, so a
  case written after another would not show what a fresh program writes."""
  import subprocess
  root = os.path.join(out, era)
  if os.path.exists(root):
    shutil.rmtree(root)
  os.makedirs(root)
  part = None
  for case in CASES:
    subprocess.run([sys.executable, os.path.abspath(__file__), 'write-case', out, era, case], check=True)
    with open(os.path.join(out, f'{era}.{case}.json')) as f:
      one = json.load(f)
    os.remove(os.path.join(out, f'{era}.{case}.json'))
    if part is None:
      part = dict(one, cases=[], skipped=[])
    part['cases'] += one['cases']
    part['skipped'] += [x for x in one['skipped'] if x not in part['skipped'] and x.startswith(case + ':')]
  _clean_tmp(root)
  with open(os.path.join(out, f'{era}.json'), 'w') as f:
    json.dump(part, f, indent=1)
  print(json.dumps({'skipped': part['skipped'], 'cases': {c['case']: c['self_read'] for c in part['cases']}},
                   indent=1))


def write_case(out, era, only):
  shims = _shim_old_jax() if _needs_shims() else []
  import jax
  sys.path.insert(0, HERE)
  import state as S  # noqa: E402
  import orbax.checkpoint as ocp
  import flax
  from flax.training import checkpoints
  import inspect
  from importlib import metadata

  def ver(name):
    try:
      return metadata.version(name)
    except Exception:  # noqa
      return None
  versions = {k: ver(k) for k in ('orbax', 'orbax-checkpoint', 'flax', 'jax', 'jaxlib', 'tensorstore',
                                  'numpy', 'msgpack', 'optax', 'ml_dtypes')}
  if versions['orbax'] is None:
    del versions['orbax']
  if versions.get('orbax') and versions.get('orbax-checkpoint') is None:
    del versions['orbax-checkpoint']
  root = os.path.join(out, era)
  cases, skipped = [], []
  has_args = hasattr(ocp, 'args')
  handler_params = inspect.signature(ocp.PyTreeCheckpointHandler.__init__).parameters
  has_ocdbt = 'use_ocdbt' in handler_params
  ocdbt_default = handler_params['use_ocdbt'].default if has_ocdbt else False
  mngr_params = inspect.signature(ocp.CheckpointManager.__init__).parameters
  new_manager = has_args and 'item_names' in mngr_params

  def add(case, kind, fn_state, api, extra=None, self_read='ok'):
    path = os.path.join(root, case)
    c = {'era': era, 'case': case, 'kind': kind, 'path': f'{era}/{case}'}
    c.update(extra or {})
    if fn_state is not None:
      c['state'] = fn_state
    c['api'] = api
    c['files'] = _listing(path)[:FILES_CAP]
    c['self_read'] = self_read
    empties = _empty_dirs(path)
    if empties:
      c['empty_dirs'] = empties
    cases.append(c)
    print(f'[{era}] {case}: {self_read}', flush=True)

  def run(case, body):
    if case != only:
      return
    try:
      body()
    except Exception as e:  # noqa
      traceback.print_exc()
      skipped.append(f'{case}: {_err(e)}')
      shutil.rmtree(os.path.join(root, case), ignore_errors=True)
    _clean_tmp(root)

  def str_save_args(tree):
    return jax.tree_util.tree_map(
        lambda x: ocp.SaveArgs(aggregate=True) if isinstance(x, str) else ocp.SaveArgs(), tree)

  def check(expected, got):
    S.tree_eq_loose(expected, got)

  def self_read(read_plain, read_target, expected):
    """'ok' when a plain read matches; otherwise try with a target."""
    try:
      check(expected, read_plain())
      return 'ok'
    except Exception as e:  # noqa
      plain_err = _err(e)
    try:
      check(expected, read_target())
      return f'ok with target only; no-target read fails: {plain_err}'
    except Exception as e:  # noqa
      return f'fails: no-target: {plain_err}; with target: {_err(e)}'

  def restore_args_for(target):
    return ocp.checkpoint_utils.construct_restore_args(target)

  # ------------------------------------------------------------------ PyTree checkpointer cases
  def pytree_case(case, use_ocdbt):
    path = os.path.join(root, case)
    kw = {'with_str': True, 'with_empty': True, 'with_py_scalars': True}
    reduced = []
    if use_ocdbt is None:
      ckptr, api = ocp.PyTreeCheckpointer(), 'ocp.PyTreeCheckpointer()'
    else:
      pre = ''
      if use_ocdbt and hasattr(ocp.type_handlers, 'register_standard_handlers_with_options') \
          and not has_args and not hasattr(ocp.type_handlers, 'start_coordinator_server_and_create_context'):
        # orbax 0.2.x: OCDBT by re-registering the type handlers (0.3.x+: the handler's flag alone)
        ctx = ocp.type_handlers.create_coordinator_server_and_context()[0] \
            if hasattr(ocp.type_handlers, 'create_coordinator_server_and_context') else None
        ocp.type_handlers.register_standard_handlers_with_options(use_ocdbt=True, ts_context=ctx)
        pre = 'ocp.type_handlers.register_standard_handlers_with_options(use_ocdbt=True, ts_context=ctx); '
      ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt))
      api = f'{pre}ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt={use_ocdbt}))'
    tree = S.make_state(**kw)
    how = ''
    try:
      if has_args:
        ckptr.save(path, args=ocp.args.PyTreeSave(tree))
        how = '.save(path, args=ocp.args.PyTreeSave(tree))'
      else:
        ckptr.save(path, tree)
        how = '.save(path, tree)'
    except Exception as e:  # noqa
      reduced.append(_err(e))
      import time
      time.sleep(2)  # let the failed save's other writes finish before clearing its temporary dir
      shutil.rmtree(path, ignore_errors=True)
      _clean_tmp(root)
      if has_args:
        ckptr.save(path, args=ocp.args.PyTreeSave(tree, save_args=str_save_args(tree)))
        how = '.save(path, args=ocp.args.PyTreeSave(tree, save_args=<SaveArgs(aggregate=True) on str leaves>))'
      else:
        ckptr.save(path, tree, save_args=str_save_args(tree))
        how = '.save(path, tree, save_args=<SaveArgs(aggregate=True) on str leaves>)'
    exp = S.expected('make_state', **kw)
    target = S.make_state(**kw)
    sr = self_read(lambda: ckptr.restore(path),
                   lambda: ckptr.restore(path, item=target, restore_args=restore_args_for(target)), exp)
    extra = {'ocdbt': (f'default({"on" if ocdbt_default else "off"})' if use_ocdbt is None
                       else ('on' if use_ocdbt else 'off')), 'use_ocdbt': use_ocdbt}
    if reduced:
      extra['reduced'] = reduced
    add(case, 'orbax_pytree', {'fn': 'make_state', 'kw': kw}, api + how, extra, sr)
    if use_ocdbt and not has_args and hasattr(ocp.type_handlers, 'register_standard_handlers_with_options'):
      ocp.type_handlers.register_standard_handlers_with_options(use_ocdbt=False)

  run('pytree', lambda: pytree_case('pytree', None))

  def sharded_case():
    path = os.path.join(root, 'pytree_sharded')
    tree = S.make_sharded()
    ckptr = ocp.PyTreeCheckpointer()
    if has_args:
      ckptr.save(path, args=ocp.args.PyTreeSave(tree))
      api = 'ocp.PyTreeCheckpointer().save(path, args=ocp.args.PyTreeSave(tree))'
    else:
      ckptr.save(path, tree)
      api = 'ocp.PyTreeCheckpointer().save(path, tree)'
    target = S.make_sharded()
    sr = self_read(lambda: ckptr.restore(path),
                   lambda: ckptr.restore(path, item=target, restore_args=restore_args_for(target)),
                   S.expected('sharded_values'))
    add('pytree_sharded', 'orbax_pytree', {'fn': 'sharded_values', 'kw': {}}, api, {'sharded': True}, sr)
  if len(jax.devices()) >= 4:
    run('pytree_sharded', sharded_case)
  else:
    skipped.append('pytree_sharded: fewer than 4 devices (set XLA_FLAGS)')

  def standard_case():
    path = os.path.join(root, 'standard')
    tree = S.make_array_state()
    ckptr = ocp.StandardCheckpointer()
    takes_args = 'args' in inspect.signature(ckptr.save).parameters
    if has_args and takes_args:
      ckptr.save(path, args=ocp.args.StandardSave(tree))
      api = 'ocp.StandardCheckpointer().save(path, args=ocp.args.StandardSave(tree))'
    else:
      ckptr.save(path, tree)
      api = 'ocp.StandardCheckpointer().save(path, tree)'
    if hasattr(ckptr, 'wait_until_finished'):
      ckptr.wait_until_finished()
    target = S.make_array_state()
    def plain():
      return ckptr.restore(path)
    def with_target():
      if has_args and 'args' in inspect.signature(ckptr.restore).parameters:
        return ckptr.restore(path, args=ocp.args.StandardRestore(target))
      return ckptr.restore(path, target)
    sr = self_read(plain, with_target, S.expected('make_array_state'))
    add('standard', 'orbax_pytree', {'fn': 'make_array_state', 'kw': {}}, api, {'standard': True}, sr)
  if hasattr(ocp, 'StandardCheckpointer'):
    run('standard', standard_case)
  else:
    skipped.append('standard: no StandardCheckpointer')

  def ts_pytree_case():
    path = os.path.join(root, 'ts_pytree')
    ts_ = S.make_train_state()
    ckptr = ocp.PyTreeCheckpointer()
    if has_args:
      ckptr.save(path, args=ocp.args.PyTreeSave(ts_))
      api = 'ocp.PyTreeCheckpointer().save(path, args=ocp.args.PyTreeSave(train_state))'
    else:
      ckptr.save(path, ts_)
      api = 'ocp.PyTreeCheckpointer().save(path, train_state)'
    target = S.make_train_state()
    sr = self_read(lambda: ckptr.restore(path),
                   lambda: ckptr.restore(path, item=target, restore_args=restore_args_for(target)),
                   S.expected('make_train_state'))
    add('ts_pytree', 'orbax_pytree', {'fn': 'make_train_state', 'kw': {}}, api, {'trainstate': True}, sr)
  run('ts_pytree', ts_pytree_case)

  # ------------------------------------------------------------------ CheckpointManager cases
  def manager_case():
    path = os.path.join(root, 'manager')
    if new_manager:
      m = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
                                item_names=('state', 'meta'))
      for s in (1, 2, 3):
        m.save(s, args=ocp.args.Composite(state=ocp.args.PyTreeSave(S.step_state(s)),
                                          meta=ocp.args.JsonSave(S.metrics(s))))
      m.wait_until_finished()
      api = ("ocp.CheckpointManager(dir, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True), "
             "item_names=('state','meta')).save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(..), "
             "meta=ocp.args.JsonSave(..)))")
      rd = lambda s: m.restore(s)  # noqa
    else:
      m = ocp.CheckpointManager(path, {'state': ocp.Checkpointer(ocp.PyTreeCheckpointHandler()),
                                       'meta': ocp.Checkpointer(ocp.JsonCheckpointHandler())},
                                ocp.CheckpointManagerOptions(max_to_keep=2))
      for s in (1, 2, 3):
        m.save(s, {'state': S.step_state(s), 'meta': S.metrics(s)})
      if hasattr(m, 'wait_until_finished'):
        m.wait_until_finished()
      api = ("ocp.CheckpointManager(dir, {'state': ocp.Checkpointer(ocp.PyTreeCheckpointHandler()), "
             "'meta': ocp.Checkpointer(ocp.JsonCheckpointHandler())}, ocp.CheckpointManagerOptions(max_to_keep=2))"
             ".save(step, {'state': .., 'meta': ..})")
      rd = lambda s: m.restore(s)  # noqa
    steps = sorted(m.all_steps())
    try:
      for s in steps:
        r = rd(s)
        check(S.expected('step_state', step=s), r['state'])
        check(S.expected('metrics', step=s), r['meta'])
      sr = 'ok'
    except Exception as e:  # noqa
      sr = f'fails: {_err(e)}'
    add('manager', 'orbax_manager', None, api,
        {'steps': steps, 'items': {'state': {'fn': 'step_state', 'handler': 'pytree'},
                                   'meta': {'fn': 'metrics', 'handler': 'json'}}, 'max_to_keep': 2}, sr)
  run('manager', manager_case)

  def manager_best_case():
    path = os.path.join(root, 'manager_best')
    opts = ocp.CheckpointManagerOptions(max_to_keep=2, best_fn=lambda m: m['loss'], best_mode='min')
    if new_manager:
      m = ocp.CheckpointManager(path, options=opts, item_names=('state',))
      for s in (1, 2, 3):
        m.save(s, args=ocp.args.Composite(state=ocp.args.PyTreeSave(S.step_state(s))), metrics=S.metrics(s))
      m.wait_until_finished()
      api = ("ocp.CheckpointManager(dir, options=ocp.CheckpointManagerOptions(max_to_keep=2, best_fn=lambda m: "
             "m['loss'], best_mode='min'), item_names=('state',)).save(step, args=ocp.args.Composite("
             "state=ocp.args.PyTreeSave(..)), metrics=metrics(step))")
    else:
      m = ocp.CheckpointManager(path, {'state': ocp.Checkpointer(ocp.PyTreeCheckpointHandler())}, opts)
      for s in (1, 2, 3):
        m.save(s, {'state': S.step_state(s)}, metrics=S.metrics(s))
      if hasattr(m, 'wait_until_finished'):
        m.wait_until_finished()
      api = ("ocp.CheckpointManager(dir, {'state': ocp.Checkpointer(ocp.PyTreeCheckpointHandler())}, "
             "ocp.CheckpointManagerOptions(max_to_keep=2, best_fn=lambda m: m['loss'], best_mode='min'))"
             ".save(step, {'state': ..}, metrics=metrics(step))")
    steps = sorted(m.all_steps())
    try:
      for s in steps:
        check(S.expected('step_state', step=s), m.restore(s)['state'])
      sr = 'ok' if m.best_step() == 3 else f'fails: best_step {m.best_step()}'
    except Exception as e:  # noqa
      sr = f'fails: {_err(e)}'
    add('manager_best', 'orbax_manager', None, api,
        {'steps': steps, 'items': {'state': {'fn': 'step_state', 'handler': 'pytree'}},
         'metrics_item': True, 'max_to_keep': 2, 'best': 'min loss'}, sr)
  run('manager_best', manager_best_case)

  def manager_default_case():
    path = os.path.join(root, 'manager_default')
    if new_manager:
      m = ocp.CheckpointManager(path)
      for s in (1, 2):
        m.save(s, args=ocp.args.StandardSave(S.step_state(s)))
      m.wait_until_finished()
      api = 'ocp.CheckpointManager(dir).save(step, args=ocp.args.StandardSave(tree))'
    else:
      m = ocp.CheckpointManager(path, ocp.Checkpointer(ocp.PyTreeCheckpointHandler()))
      for s in (1, 2):
        m.save(s, S.step_state(s))
      if hasattr(m, 'wait_until_finished'):
        m.wait_until_finished()
      api = 'ocp.CheckpointManager(dir, ocp.Checkpointer(ocp.PyTreeCheckpointHandler())).save(step, tree)'
    steps = sorted(m.all_steps())
    try:
      for s in steps:
        check(S.expected('step_state', step=s), m.restore(s))
      sr = 'ok'
    except Exception as e:  # noqa
      sr = f'fails: {_err(e)}'
    add('manager_default', 'orbax_manager', None, api,
        {'steps': steps, 'items': {'default': {'fn': 'step_state', 'handler': 'pytree'}}}, sr)
  run('manager_default', manager_default_case)

  # ------------------------------------------------------------------ flax.training.checkpoints
  has_flag = True
  try:
    flax.config.update('flax_use_orbax_checkpointing', False)
  except Exception:  # noqa
    has_flag = False

  def set_orbax(on):
    if has_flag:
      flax.config.update('flax_use_orbax_checkpointing', on)
    elif on:
      raise RuntimeError('this flax has no flax_use_orbax_checkpointing flag (no orbax backend)')

  def flax_case(case, backend, fn, kw, steps, keep, prefix='checkpoint_', trainstate=False):
    d = os.path.join(root, case)
    set_orbax(backend == 'orbax')
    for s in steps:
      tree = S.make_train_state() if trainstate else getattr(S, fn)(**kw)
      checkpoints.save_checkpoint(d, tree, s, prefix=prefix, keep=keep)
    set_orbax(False)
    exp = S.expected(fn, **kw)
    kept = sorted(float(n[len(prefix):]) if '.' in n[len(prefix):] else int(n[len(prefix):])
                  for n in os.listdir(d) if n.startswith(prefix) and '-tmp' not in n and '_gda' not in n)
    try:
      check(exp, checkpoints.restore_checkpoint(d, None, prefix=prefix))
      sr = 'ok'
    except Exception as e:  # noqa
      try:
        target = S.make_train_state() if trainstate else getattr(S, fn)(**kw)
        check(exp, checkpoints.restore_checkpoint(d, target, prefix=prefix))
        sr = f'ok with target only; no-target read fails: {_err(e)}'
      except Exception as e2:  # noqa
        sr = f'fails: {_err(e)}; with target: {_err(e2)}'
    return d, kept, sr

  full = {'with_str': True, 'with_empty': True, 'with_py_scalars': True}
  flag_api = "flax.config.update('flax_use_orbax_checkpointing', {}); "

  def mk(case, backend, fn, kw, steps, keep, api, prefix='checkpoint_', trainstate=False):
    def body():
      d, kept, sr = flax_case(case, backend, fn, kw, steps, keep, prefix, trainstate)
      extra = {'backend': backend, 'steps': kept, 'prefix': prefix}
      if trainstate:
        extra['trainstate'] = True
      add(case, 'flax', {'fn': fn, 'kw': kw}, api, extra, sr)
    run(case, body)

  mk('flax_msgpack', 'msgpack', 'make_state', full, (1, 2, 3), 2,
     (flag_api.format(False) if has_flag else '') +
     'checkpoints.save_checkpoint(dir, tree, step, keep=2) for step in 1,2,3')
  if has_flag:
    mk('flax_orbax', 'orbax', 'make_state', full, (1, 2), 2,
       flag_api.format(True) + 'checkpoints.save_checkpoint(dir, tree, step, keep=2) for step in 1,2')
    mk('ts_flax_orbax', 'orbax', 'make_train_state', {}, (3,), 1,
       'checkpoints.save_checkpoint(dir, train_state, 3) (orbax backend)', trainstate=True)
  else:
    skipped += [f'{c}: this flax has no orbax backend (no flax_use_orbax_checkpointing)'
                for c in ('flax_orbax', 'ts_flax_orbax')]

  # The other OCDBT choice last: in orbax 0.2-0.4, turning OCDBT on changes the global type handlers.
  if has_ocdbt:
    other = 'pytree_no_ocdbt' if ocdbt_default else 'pytree_ocdbt'
    run(other, lambda: pytree_case(other, not ocdbt_default))
  else:
    skipped.append('pytree_ocdbt: PyTreeCheckpointHandler has no use_ocdbt')

  _clean_tmp(root)
  part = {'era': era, 'versions': versions, 'python': '.'.join(map(str, sys.version_info[:3])),
          'skipped': skipped, 'cases': cases}
  if shims:
    part['shims'] = shims
  with open(os.path.join(out, f'{era}.{only}.json'), 'w') as f:
    json.dump(part, f, indent=1)


def merge(part_path, known_failing=None):
  """Copy an era written by ``write`` into this folder and into manifest.json."""
  with open(part_path) as f:
    part = json.load(f)
  era = part['era']
  src = os.path.join(os.path.dirname(os.path.abspath(part_path)), era)
  dst = os.path.join(HERE, era)
  if os.path.exists(dst):
    shutil.rmtree(dst)
  shutil.copytree(src, dst)
  mpath = os.path.join(HERE, 'manifest.json')
  with open(mpath) as f:
    manifest = json.load(f)
  entry = {'versions': part['versions'], 'python': part['python'], 'skipped': part['skipped']}
  if part.get('shims'):
    entry['shims'] = part['shims']
  manifest['eras'][era] = entry
  manifest['cases'] = [c for c in manifest['cases'] if c['era'] != era] + part['cases']
  for c in manifest['cases']:
    if known_failing and c['era'] == era and c['case'] in known_failing:
      c['known_failing'] = known_failing[c['case']]
  with open(mpath, 'w') as f:
    json.dump(manifest, f, indent=1)


if __name__ == '__main__':
  if sys.argv[1] == 'write':
    write(sys.argv[2], sys.argv[3])
  elif sys.argv[1] == 'write-case':
    write_case(sys.argv[2], sys.argv[3], sys.argv[4])
  elif sys.argv[1] == 'merge':
    merge(sys.argv[2], json.loads(sys.argv[3]) if len(sys.argv) > 3 else None)
  else:
    raise SystemExit(__doc__)
