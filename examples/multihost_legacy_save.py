"""A 2-process job that saves a sharded TrainState-like tree with the legacy
``save_checkpoint_multiprocess`` (msgpack + ``_gda`` arrays), as multi-host Flax jobs do.

Run: ``python examples/multihost_legacy_save.py OUT_DIR`` starts both processes on localhost
(2 CPU devices each) and returns when both have finished.
"""

import os
import socket
import subprocess
import sys


def worker(process_id: int, port: int, out_dir: str) -> None:
  os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
  os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax
  jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=process_id)
  import flax
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  from flaxckpt.legacy import checkpoints

  flax.config.update('flax_use_orbax_checkpointing', False)
  mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ('data', 'model'))
  kernel = np.arange(32, dtype=np.float32).reshape(8, 4)
  tree = {
      'params': {
          'kernel': jax.make_array_from_callback(
              kernel.shape, NamedSharding(mesh, PartitionSpec('data', 'model')),
              lambda index: kernel[index]),
          'bias': jax.make_array_from_callback(
              (4,), NamedSharding(mesh, PartitionSpec()), lambda index: np.ones(4, np.float32)[index]),
      },
      'step': 100,
  }
  path = checkpoints.save_checkpoint_multiprocess(out_dir, tree, step=100)
  print(f'process {process_id} saved {path}', flush=True)


def main(out_dir: str) -> None:
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    port = sock.getsockname()[1]
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  procs = [subprocess.Popen([sys.executable, __file__, '--worker', str(i), str(port), out_dir],
                            env=env) for i in range(2)]
  codes = [proc.wait(timeout=300) for proc in procs]
  if any(codes):
    raise SystemExit(f'worker exit codes: {codes}')


if __name__ == '__main__':
  if sys.argv[1] == '--worker':
    worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
  else:
    main(sys.argv[1])
