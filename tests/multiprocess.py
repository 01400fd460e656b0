"""Runs a script in several real JAX processes joined by ``jax.distributed`` on localhost.

The script gets its process id, the coordinator port, the process count and the caller's extra
arguments in ``sys.argv[1:]`` and must print one line ``RESULT <json>``; ``run`` returns the
parsed results by process id. A preamble sets the device count and joins the runtime before the
script body runs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import Any

_PREAMBLE = r'''
import os, sys
os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={sys.argv[4]}'
os.environ['JAX_PLATFORMS'] = 'cpu'
import jax
PROCESS_ID, PORT, PROCESS_COUNT = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
ARGS = sys.argv[5:]
jax.distributed.initialize(f'127.0.0.1:{PORT}', num_processes=PROCESS_COUNT,
                           process_id=PROCESS_ID)
import json as _json
def report(result):
  print('RESULT', _json.dumps(result), flush=True)
'''


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def run(script: str, processes: int, devices_per_process: int, *args: str,
        timeout: float = 150) -> list[Any]:
  """Runs ``script`` in ``processes`` processes; returns each one's ``report``ed result."""
  port = str(_free_port())
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  code = _PREAMBLE + script
  procs = [subprocess.Popen(
      [sys.executable, '-c', code, str(i), port, str(processes), str(devices_per_process),
       *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
      for i in range(processes)]
  outputs = []
  try:
    for i, proc in enumerate(procs):
      out, err = proc.communicate(timeout=timeout)
      assert proc.returncode == 0, f'process {i} failed:\n{err[-4000:]}'
      outputs.append(out)
  finally:
    for proc in procs:
      proc.kill()
  results = []
  for i, out in enumerate(outputs):
    lines = [line for line in out.splitlines() if line.startswith('RESULT ')]
    assert len(lines) == 1, f'process {i} printed no single RESULT line:\n{out[-2000:]}'
    results.append(json.loads(lines[0][len('RESULT '):]))
  return results


# Script lines that build ``w`` (8x4, split across every device of every process) and ``b``
# (replicated) from ``values``, with flax's msgpack backend chosen; for the legacy tests'
# scripts, which import flax, numpy, Mesh, NamedSharding and PartitionSpec first.
SHARDED_ACROSS_PROCESSES = r'''
flax.config.update('flax_use_orbax_checkpointing', False)
mesh = Mesh(np.array(jax.devices()), ('x',))
values = {'w': np.arange(32, dtype=np.float32).reshape(8, 4),
          'b': np.linspace(0, 1, 4, dtype=np.float32)}
w = jax.make_array_from_callback((8, 4), NamedSharding(mesh, PartitionSpec('x')),
                                 lambda index: values['w'][index])
b = jax.make_array_from_callback((4,), NamedSharding(mesh, PartitionSpec()),
                                 lambda index: values['b'][index])
'''
