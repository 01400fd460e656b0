"""The object-store backend: ``gs://bucket/key`` and ``s3://bucket/key`` through tensorstore's
own ``gcs`` and ``s3`` kvstores (no other client library).

An object store has objects under keys and no directories: a "directory" ``gs://b/run/1`` is
the prefix ``run/1/``, which exists while some object lies under it. Configuration comes from
settings a program registered (``_settings``, public as ``flaxckpt.object_store``), else from the
standard environment, read each time a spec is built (tensorstore 0.1.86 does not read
``AWS_ENDPOINT_URL`` itself, and an S3 spec without an endpoint goes to AWS):

- S3: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (an S3-compatible server, addressed
  path-style), ``AWS_REGION`` or ``AWS_DEFAULT_REGION``, credentials from ``AWS_ACCESS_KEY_ID``/
  ``AWS_SECRET_ACCESS_KEY`` when set, else a profile (``AWS_PROFILE``, the profile files
  ``AWS_SHARED_CREDENTIALS_FILE``/``AWS_CONFIG_FILE``), else the metadata services.
- GCS: Google application default credentials; another server from ``TENSORSTORE_GCS_HTTP_URL``
  or ``STORAGE_EMULATOR_HOST`` (fixed for the process on first use: tensorstore reads it once).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import re
from collections.abc import Callable
from typing import Any

from flaxckpt import _errors
from flaxckpt._storage import _settings

SCHEMES = ('gs', 's3')
# How long one request (a small object's read or write, a listing) may take before it fails
# with a TimeoutError naming the URL; tensorstore retries transient failures meanwhile.
REQUEST_TIMEOUT_SECS = 300.0
# A request moving (almost) no bytes for this long is dropped and retried (see
# _drop_stalled_requests).
STALLED_REQUEST_SECS = 60
# OCDBT data files on object stores: each is one object, written by one request and read by
# ranged requests; small ones go out and come back in parallel, and none nears S3's 5 GiB limit
# on a single upload. Measured on both loopback servers (256 MiB in 30 leaves): 4 MiB files
# restore 2-10x faster than tensorstore's default (one file of up to 2 GiB).
DATA_FILE_BYTES = 4 << 20
# A restore reads large values in ranged requests of up to READ_PART_BYTES, with up to
# READ_AHEAD_BYTES of them in flight: it then holds its arrays and about that much besides,
# instead of every byte read until the last array is complete (2.2-2.8x the state, measured).
# On fake-gcs-server, 8-32 MiB parts with 128-256 MiB ahead restore 1 GiB in 0.6-0.7x the
# time of all objects read at once. (moto reads a whole object for any range: parts of a
# large value each cost the whole value there; Settings.read_part_size is for such servers.)
READ_PART_BYTES = 16 << 20
READ_AHEAD_BYTES = 128 << 20
_DEFAULT_S3_REGION = 'us-east-1'  # Used with a custom endpoint when no region is set.
_BUCKET = re.compile(r'[A-Za-z0-9][A-Za-z0-9._-]*')
_NO_VALUE = b'\x02'  # tensorstore's storage generation of a missing key: "must not exist yet".
# How tensorstore's errors begin where a request failed for good (retries spent, the server
# gone or silent), as opposed to what it read being damaged.
_IO_FAILURE = ('ABORTED: ', 'UNAVAILABLE: ', 'DEADLINE_EXCEEDED: ', 'RESOURCE_EXHAUSTED: ',
               'CANCELLED: ')
_ANNOTATIONS = re.compile(r" \[[a-z_ ]+='")  # Where tensorstore's annotations of an error begin.


@dataclasses.dataclass(frozen=True)
class RemotePath(os.PathLike):
  """An immutable ``gs://bucket/key`` or ``s3://bucket/key`` path, used where a local
  ``pathlib.Path`` is used: ``/``, ``.name``, ``.parent``, ``.with_name``, ``str()``/
  ``os.fspath`` give the URL. ``key`` has no leading or trailing '/'; '' is the bucket itself.

  Raises:
    ValueError: an unknown scheme, an empty or malformed bucket, a '..' or NUL in the key.
  """
  scheme: str
  bucket: str
  key: str = ''

  def __post_init__(self) -> None:
    if self.scheme not in SCHEMES:
      raise ValueError(f'{self.scheme}://: not an object-store scheme; expected gs:// or s3://.')
    if not _BUCKET.fullmatch(self.bucket or ''):
      raise ValueError(f'{self.scheme}://{self.bucket}: the bucket name is empty or malformed; '
                       f'expected {self.scheme}://BUCKET/KEY.')
    object.__setattr__(self, 'key', _clean_key(self.key, f'{self.scheme}://{self.bucket}'))

  @classmethod
  def parse(cls, url: str) -> RemotePath:
    """``RemotePath`` of ``gs://bucket/key`` or ``s3://bucket/key``."""
    scheme, sep, rest = url.partition('://')
    if not sep:
      raise ValueError(f'{url}: not a URL; expected gs://BUCKET/KEY or s3://BUCKET/KEY.')
    bucket, _, key = rest.partition('/')
    return cls(scheme, bucket, key)

  def __truediv__(self, name: str | os.PathLike) -> RemotePath:
    text = os.fspath(name)
    if not isinstance(text, str) or text.startswith('/'):
      raise ValueError(f'{self}: cannot join {text!r}, which is not a relative name.')
    return RemotePath(self.scheme, self.bucket, f'{self.key}/{text}' if self.key else text)

  @property
  def name(self) -> str:
    return self.key.rpartition('/')[2]

  @property
  def parent(self) -> RemotePath:
    return RemotePath(self.scheme, self.bucket, self.key.rpartition('/')[0])

  def with_name(self, name: str) -> RemotePath:
    if not self.key:
      raise ValueError(f'{self} has an empty name.')
    if not name or '/' in name or name in ('.', '..'):
      raise ValueError(f'Invalid name {name!r}')
    return self.parent / name

  def relative_to(self, other: RemotePath) -> pathlib.PurePosixPath:
    """The key below ``other`` as a relative path (as ``pathlib``'s ``relative_to``)."""
    if (other.scheme, other.bucket) != (self.scheme, self.bucket) or not (
        not other.key or self.key == other.key or self.key.startswith(other.key + '/')):
      raise ValueError(f'{self} is not below {other}.')
    return pathlib.PurePosixPath(self.key[len(other.key):].lstrip('/') or '.')

  def __str__(self) -> str:
    return f'{self.scheme}://{self.bucket}/{self.key}' if self.key else \
        f'{self.scheme}://{self.bucket}'

  def __fspath__(self) -> str:
    return str(self)

  def __repr__(self) -> str:
    return f'RemotePath({str(self)!r})'


def _clean_key(key: str, where: str) -> str:
  parts = [part for part in key.split('/') if part not in ('', '.')]
  if any(part == '..' for part in parts) or '\x00' in key:
    raise ValueError(f'{where}/{key}: refusing a key with a NUL or a \'..\' component; object '
                     'keys are plain relative paths.')
  return '/'.join(parts)


def kvstore_spec(path: RemotePath) -> dict[str, Any]:
  """The tensorstore kvstore spec of the "directory" ``path`` (its ``path`` ends with '/', or
  is '' for the bucket), with the S3 endpoint, region and credentials from the environment."""
  spec = _bucket_spec(path.scheme, path.bucket)
  spec['path'] = path.key + '/' if path.key else ''
  return spec


def _bucket_spec(scheme: str, bucket: str) -> dict[str, Any]:
  _drop_stalled_requests()
  if scheme == 'gs':
    _settings.gcs_endpoint()  # Fixes this process's GCS server before tensorstore reads it.
    return {'driver': 'gcs', 'bucket': bucket}
  return _s3_spec(bucket, _settings.for_bucket(scheme, bucket))


def _drop_stalled_requests() -> None:
  """Has curl drop a request that moves fewer than 256 bytes a second for 60 s (tensorstore
  then retries it), unless the environment says otherwise: without this, a server that takes a
  connection and never answers holds a save or restore for ever. JAX sets the same values on
  TPU VMs. tensorstore reads them when it starts its HTTP transport, so before the first request.
  """
  os.environ.setdefault('TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS', str(STALLED_REQUEST_SECS))
  os.environ.setdefault('TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES', '256')


def _s3_spec(bucket: str, settings: _settings.Settings) -> dict[str, Any]:
  spec: dict[str, Any] = {'driver': 's3', 'bucket': bucket}
  endpoint = settings.endpoint or os.environ.get('AWS_ENDPOINT_URL_S3') or \
      os.environ.get('AWS_ENDPOINT_URL')
  region = settings.region or os.environ.get('AWS_REGION') or \
      os.environ.get('AWS_DEFAULT_REGION')
  if endpoint:  # tensorstore addresses a custom endpoint path-style: ENDPOINT/BUCKET/KEY.
    spec['endpoint'] = endpoint.rstrip('/')
    region = region or _DEFAULT_S3_REGION
  if region:  # Without it (and without an endpoint) tensorstore asks AWS for the bucket's.
    spec['aws_region'] = region
  if settings.requester_pays:
    spec['requester_pays'] = True
  spec['aws_credentials'] = _aws_credentials(settings)
  return spec


def _aws_credentials(settings: _settings.Settings) -> dict[str, Any]:
  """The AWS credential chain as the AWS tools follow it: keys in the environment, else the
  named profile (``profile``, ``AWS_PROFILE``, else ``default`` if the credentials file has it)
  from the profile files, else the container/instance metadata services.

  tensorstore's own ``default`` chain reads neither ``AWS_SHARED_CREDENTIALS_FILE`` nor
  ``AWS_CONFIG_FILE``, and its profile provider fails unless both paths are given, so they are
  resolved here.
  """
  profile = settings.profile or os.environ.get('AWS_PROFILE')
  if os.environ.get('AWS_ACCESS_KEY_ID') and not settings.profile:
    return {'type': 'environment'}
  credentials_file = os.path.expanduser(
      os.environ.get('AWS_SHARED_CREDENTIALS_FILE') or '~/.aws/credentials')
  config_file = os.path.expanduser(os.environ.get('AWS_CONFIG_FILE') or '~/.aws/config')
  if profile is None and _has_default_profile(credentials_file):
    profile = 'default'
  if profile is None:
    return {'type': 'default'}
  return {'type': 'profile', 'profile': profile, 'credentials_file': credentials_file,
          'config_file': config_file if os.path.isfile(config_file) else os.devnull}


def _has_default_profile(credentials_file: str) -> bool:
  try:
    with open(credentials_file, encoding='utf-8', errors='replace') as f:
      return any(line.strip() == '[default]' for line in f)
  except OSError:
    return False


def context_resources(path: RemotePath) -> dict[str, Any]:
  """The tensorstore context resources the settings ask for on ``path``'s bucket (none by
  default). They go into the context a save or restore opens its stores with, not into the
  kvstore spec: stores opened from specs with their own context members count as different
  stores, and OCDBT cannot copy between those (a multi-process save's merge does)."""
  scheme, bucket = path.scheme, path.bucket
  settings = _settings.for_bucket(scheme, bucket)
  prefix = 's3' if scheme == 's3' else 'gcs'
  context: dict[str, Any] = {}
  if settings.request_concurrency is not None:
    context[f'{prefix}_request_concurrency'] = {'limit': settings.request_concurrency}
  if settings.max_retries is not None:
    context[f'{prefix}_request_retries'] = {'max_retries': settings.max_retries}
  if scheme == 'gs' and (settings.billing_project or settings.requester_pays):
    project = settings.billing_project or os.environ.get('GOOGLE_CLOUD_PROJECT')
    if not project:
      raise ValueError(f'gs://{bucket}: requester_pays needs the project to bill; set '
                       'billing_project in flaxckpt.object_store.configure, or '
                       'GOOGLE_CLOUD_PROJECT.')
    context['gcs_user_project'] = {'project_id': project}
  context.update(settings.context or {})
  return context


def request_timeout(path: RemotePath) -> float:
  """Seconds to wait for one request on ``path``'s bucket."""
  return _settings.for_bucket(path.scheme, path.bucket).timeout_secs or REQUEST_TIMEOUT_SECS


def data_file_size(path: RemotePath) -> int:
  """The size OCDBT aims data files at when saving under ``path``."""
  size = _settings.for_bucket(path.scheme, path.bucket).data_file_size
  return DATA_FILE_BYTES if size is None else size


def read_part_sizes(path: RemotePath) -> tuple[int, int]:
  """How a restore under ``path`` reads large values: the bytes of one ranged request, and
  the bytes of requests it keeps in flight."""
  settings = _settings.for_bucket(path.scheme, path.bucket)
  return (settings.read_part_size or READ_PART_BYTES, settings.read_ahead or READ_AHEAD_BYTES)


@functools.lru_cache(maxsize=32)
def _open_cached(spec_json: str, context_json: str) -> Any:
  import tensorstore as ts
  return ts.KvStore.open(json.loads(spec_json),
                         context=ts.Context(json.loads(context_json))).result()


def _store(path: RemotePath) -> Any:
  """The bucket's kvstore (keys are full object keys), reused while the settings are the same."""
  spec = _bucket_spec(path.scheme, path.bucket)
  try:
    return _open_cached(json.dumps(spec, sort_keys=True),
                        json.dumps(context_resources(path), sort_keys=True))
  except ValueError as e:
    if 'credentials provider' not in str(e):
      raise
    source = spec.get('aws_credentials', {})
    where = (f"the profile {source['profile']!r} of {source['credentials_file']}"
             if source.get('type') == 'profile' else 'the environment')
    raise PermissionError(f'{path}: no AWS credentials could be loaded from {where}; '
                          f'{_credentials_hint(path)}.') from e


def _endpoint(path: RemotePath) -> str:
  if path.scheme == 'gs':
    return _settings.gcs_endpoint()
  return _bucket_spec(path.scheme, path.bucket).get('endpoint', 'AWS S3')


def _wait(future: Any, path: RemotePath, what: str) -> Any:
  """``future``'s result, with tensorstore's errors turned into ones that name the URL and
  what to set."""
  try:
    timeout = request_timeout(path)
    return future.result(timeout=timeout)
  except TimeoutError as e:
    raise TimeoutError(
        f'{path}: no answer from {_endpoint(path)} in {timeout:g} s while {what}.') from e
  except ValueError as e:
    message = str(e)
    detail = error_detail(message)
    if message.startswith('NOT_FOUND'):
      raise FileNotFoundError(
          f'{path}: the bucket {path.bucket!r} does not exist on {_endpoint(path)} ({detail}) '
          f'while {what}; create it, or check the URL and {_where_set(path)}.') from e
    if message.startswith(('PERMISSION_DENIED', 'UNAUTHENTICATED')):
      raise PermissionError(
          f'{path}: access denied by {_endpoint(path)} ({detail}) while {what}; '
          f'{_credentials_hint(path)}.') from e
    raise OSError(f'{path}: {what} failed: {detail}') from e


def error_detail(message: str) -> str:
  """tensorstore's error message without the HTTP body and other annotations it appends."""
  return _ANNOTATIONS.split(message, 1)[0]


def request_failure(path: RemotePath, what: str, error: BaseException) -> OSError | None:
  """An ``OSError`` naming ``path`` for a tensorstore ``error`` where a request failed for
  good (tensorstore names a key without its bucket, or nothing); None for any other error, such
  as damaged data, which callers report as damage."""
  if not (isinstance(error, ValueError) and str(error).startswith(_IO_FAILURE)):
    return None
  return OSError(f'{path}: {what} failed: {error_detail(str(error))}')


def _where_set(path: RemotePath) -> str:
  if path.scheme == 's3':
    return 'AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (the server) and AWS_REGION'
  return ('TENSORSTORE_GCS_HTTP_URL or STORAGE_EMULATOR_HOST (the server, when not Google '
          'Cloud Storage)')


def _credentials_hint(path: RemotePath) -> str:
  if path.scheme == 's3':
    return ('set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for '
            'temporary keys), or AWS_PROFILE (with AWS_SHARED_CREDENTIALS_FILE), to credentials '
            'allowed to use this bucket')
  return ('set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or run '
          '`gcloud auth application-default login`, with an account allowed to use this bucket')


def _key_range(prefix: str) -> Any:
  """All keys that start with ``prefix`` (which ends with '/')."""
  import tensorstore as ts
  return ts.KvStore.KeyRange(prefix.encode(), prefix[:-1].encode() + b'0')  # '0' follows '/'.


def _prefix(path: RemotePath) -> str:
  return path.key + '/' if path.key else ''


def _object_key(path: RemotePath) -> bytes:
  if not path.key:
    raise IsADirectoryError(f'{path}: a bucket, not an object.')
  return path.key.encode()


def is_file(path: RemotePath) -> bool:
  """Whether an object is stored under ``path``'s key."""
  if not path.key:
    return False
  found = _wait(_store(path).read(_object_key(path), byte_range=slice(0, 0)), path,
                'checking whether the object exists')
  return found.state == 'value'


def is_dir(path: RemotePath) -> bool:
  """Whether objects are stored under the prefix ``key/`` (the bucket itself: always)."""
  if not path.key:
    return True
  return bool(_list(path))


def exists(path: RemotePath) -> bool:
  return is_file(path) or is_dir(path)


def _list(path: RemotePath) -> list[bytes]:
  """The keys under ``path``'s prefix, the prefix stripped."""
  prefix = _prefix(path)
  store = _store(path)
  future = (store.list(_key_range(prefix), strip_prefix_length=len(prefix.encode())) if prefix
            else store.list())
  return _wait(future, path, 'listing the objects under it')


def list_names(path: RemotePath) -> list[str]:
  """The sorted names of the objects and "directories" right under ``path``.

  Raises:
    FileNotFoundError: nothing lies under ``path`` (a bucket may be empty).
  """
  keys = _list(path)
  if not keys and path.key:
    raise FileNotFoundError(f'{path}: no objects under this prefix.')
  return sorted({key.decode('utf-8', 'surrogateescape').split('/', 1)[0] for key in keys})


def read_bytes(path: RemotePath, max_bytes: int | None) -> bytes:
  """An object's bytes; one larger than ``max_bytes`` is refused after reading one byte past
  the limit, never whole.

  Raises:
    FileNotFoundError: no object is stored under ``path``.
    LimitExceededError: it holds more than ``max_bytes``.
  """
  store, key = _store(path), _object_key(path)
  if max_bytes is not None:
    try:
      past = _wait(store.read(key, byte_range=slice(max_bytes, max_bytes + 1)), path,
                   'reading it')
    except OSError as e:
      if not _out_of_range(e):
        raise
      past = None  # No byte past the limit: it is small enough.
    if past is not None and past.state == 'value':
      _refuse_size(path, max_bytes)
  found = _wait(store.read(key), path, 'reading it')
  if found.state != 'value':
    raise FileNotFoundError(f'{path}: no such object.')
  value = found.value  # Each access to .value copies the bytes.
  if max_bytes is not None and len(value) > max_bytes:  # Replaced meanwhile.
    _refuse_size(path, max_bytes)
  return value


def read_head(path: RemotePath, size: int) -> bytes:
  """The first ``size`` bytes of an object (fewer if it is shorter).

  Raises:
    FileNotFoundError: no object is stored under ``path``.
  """
  found = _wait(_store(path).read(_object_key(path), byte_range=slice(0, size)), path,
                'reading its first bytes')
  if found.state != 'value':
    raise FileNotFoundError(f'{path}: no such object.')
  return found.value


def start_read_range(path: RemotePath, start: int, stop: int) -> Callable[[], bytes]:
  """Starts reading bytes ``start`` to ``stop`` of an object; returns the function that waits
  for them.

  The function raises:
    FileNotFoundError: no object is stored under ``path``.
    EOFError: the object ends before ``stop``.
  """
  future = _store(path).read(_object_key(path), byte_range=slice(start, stop))

  def wait() -> bytes:
    what = f'reading its bytes {start} to {stop}'
    try:
      found = _wait(future, path, what)
    except OSError as e:
      if not _out_of_range(e):
        raise
      raise EOFError(f'{path}: the object ends before byte {stop}.') from None
    if found.state != 'value':
      raise FileNotFoundError(f'{path}: no such object.')
    value = found.value  # Each access to .value copies the bytes.
    if len(value) != stop - start:
      raise EOFError(f'{path}: the object ends before byte {stop}.')
    return value

  return wait


def _out_of_range(error: OSError) -> bool:
  """Whether ``_wait``'s ``error`` is tensorstore's answer to a byte range past an object's
  end."""
  return str(error.__cause__).startswith('OUT_OF_RANGE')


def _refuse_size(path: RemotePath, max_bytes: int) -> None:
  raise _errors.LimitExceededError(
      f'{path}: more than the {max_bytes} bytes this object may hold when read as metadata; '
      'the checkpoint is damaged or hostile.')


def write_bytes(path: RemotePath, data: bytes, exclusive: bool = False) -> None:
  """Stores ``data`` as the object ``path`` (durable once this returns); with ``exclusive``,
  only if no object is stored there yet.

  Raises:
    UnsafeCheckpointError: ``exclusive`` and an object is already stored at ``path``.
  """
  store, key = _store(path), _object_key(path)
  # The write is conditional on no object being there (S3 If-None-Match, GCS
  # ifGenerationMatch=0); the look first also catches it where a server ignores the condition
  # (fake-gcs-server does).
  if exclusive and is_file(path):
    _refuse_existing(path)
  stamp = _wait(store.write(key, data, if_equal=_NO_VALUE if exclusive else None), path,
                'writing it')
  if exclusive and stamp.generation == b'':  # The condition did not hold.
    _refuse_existing(path)


def _refuse_existing(path: RemotePath) -> None:
  raise _errors.UnsafeCheckpointError(
      f'{path}: an object already exists there, where this save was about to create a new '
      'one; another writer may be saving to the same path.')


def write_text(path: RemotePath, text: str) -> None:
  write_bytes(path, text.encode('utf-8'))


def remove_tree(path: RemotePath) -> None:
  """Deletes the object ``path`` and every object under the prefix ``key/``; missing ones are
  fine. Refuses the bucket itself."""
  import tensorstore as ts
  if not path.key:
    raise ValueError(f'{path}: refusing to delete everything in a bucket.')
  store = _store(path)
  _wait(store.delete_range(_key_range(_prefix(path))), path, 'deleting the objects under it')
  key = _object_key(path)
  _wait(store.delete_range(ts.KvStore.KeyRange(key, key + b'\x00')), path, 'deleting it')
