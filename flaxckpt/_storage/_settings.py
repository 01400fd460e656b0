"""Explicit object-store settings: what the environment cannot say, or what a program wants to
say in code (``flaxckpt.object_store`` is the public face of this module).

Settings are registered for a scope, a scheme (``'s3://'``, ``'gs://'``) or one bucket
(``'s3://my-bucket'``). For a URL, the bucket's settings win over its scheme's, field by field;
fields left ``None`` fall back to the standard environment (``_remote`` reads it).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any

SCHEMES = ('gs', 's3')
_GOOGLE = 'https://storage.googleapis.com'


@dataclasses.dataclass(frozen=True)
class Settings:
  """How to reach an object store; every field is optional (``None``: the environment's
  value, or tensorstore's default).

  Attributes:
    endpoint: the server's URL. S3: an S3-compatible server (MinIO, Ceph, R2...), addressed
      path-style; overrides ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``. GCS: another server
      than Google's (overrides ``STORAGE_EMULATOR_HOST``); tensorstore takes one GCS server per
      process, so it must be set on the ``'gs://'`` scope before the first ``gs://`` access.
    region: the S3 region (overrides ``AWS_REGION``/``AWS_DEFAULT_REGION``).
    profile: the AWS profile whose keys sign S3 requests (overrides ``AWS_PROFILE``).
    requester_pays: access a requester-pays bucket (billed to the caller). On GCS it needs
      ``billing_project`` (or ``GOOGLE_CLOUD_PROJECT``).
    billing_project: the Google Cloud project GCS requests are billed to.
    request_concurrency: how many requests may be in flight at once (tensorstore's
      ``s3_request_concurrency``/``gcs_request_concurrency``).
    max_retries: how often a request failing with a transient error (HTTP 429 or 5xx, a
      dropped connection) is retried, with exponential backoff, before the save or restore
      fails (tensorstore's ``*_request_retries``; its default is 32).
    timeout_secs: how long flaxckpt waits for one request on a small object or a listing
      before raising a ``TimeoutError`` naming the URL (default 300).
    data_file_size: the bytes OCDBT aims each data file at when saving here (default 4 MiB on
      object stores: each file is one object written by one request, so smaller files go out
      and come back in parallel; a value larger than this gets a file of its own).
    read_part_size: a restore reads a large value in ranged requests of at most this many
      bytes (default 16 MiB). Some S3-compatible servers read the whole object to answer
      any range (moto does): keep parts large there; on GCS and AWS, small parts spread one
      large value over more connections.
    read_ahead: the bytes of those requests a restore keeps in flight (default 128 MiB): it
      holds the arrays it returns plus about this much besides, whatever the checkpoint's size.
    context: more tensorstore context resources, as JSON (e.g.
      ``{'s3_request_retries': {'max_delay': '10s'}}``); they override the ones above.
  """
  endpoint: str | None = None
  region: str | None = None
  profile: str | None = None
  requester_pays: bool | None = None
  billing_project: str | None = None
  request_concurrency: int | None = None
  max_retries: int | None = None
  timeout_secs: float | None = None
  data_file_size: int | None = None
  read_part_size: int | None = None
  read_ahead: int | None = None
  context: dict[str, Any] | None = None

  def __post_init__(self) -> None:
    positive = ('request_concurrency', 'read_part_size', 'read_ahead')
    for name in (*positive, 'max_retries', 'data_file_size'):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or isinstance(value, bool) or
                                value < (1 if name in positive else 0)):
        raise ValueError(f'Settings.{name}={value!r}: expected a '
                         f'{"positive" if name in positive else "non-negative"} '
                         'int or None.')
    if self.timeout_secs is not None and not self.timeout_secs > 0:
      raise ValueError(f'Settings.timeout_secs={self.timeout_secs!r}: expected seconds > 0.')
    if self.context is not None and not isinstance(self.context, dict):
      raise ValueError(f'Settings.context: expected a dict of tensorstore context resources, '
                       f'got {type(self.context).__name__}.')
    for name in ('endpoint', 'region', 'profile', 'billing_project'):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f'Settings.{name}={value!r}: expected a non-empty string or None.')

  def merged_over(self, base: Settings) -> Settings:
    """These settings, with ``base``'s values where these are ``None``."""
    return Settings(**{field.name: base_value if (value := getattr(self, field.name)) is None
                       else value
                       for field in dataclasses.fields(self)
                       for base_value in [getattr(base, field.name)]})


_lock = threading.Lock()
_registered: dict[str, Settings] = {}
_gcs_endpoint_in_use: str | None = None


def parse_scope(scope: str) -> str:
  """``'s3://'`` or ``'s3://bucket'`` (a trailing '/' dropped) from a scope a caller gave."""
  if not isinstance(scope, str):
    raise TypeError(f'scope: expected "s3://", "gs://" or a bucket URL, got {scope!r}.')
  scheme, sep, rest = scope.partition('://')
  bucket = rest.strip('/')
  if not sep or scheme not in SCHEMES or '/' in bucket:
    raise ValueError(f'{scope!r}: expected a scope "s3://", "gs://", "s3://BUCKET" or '
                     '"gs://BUCKET" (settings apply to whole buckets).')
  return f'{scheme}://{bucket}'


def configure(scope: str, settings: Settings | None) -> None:
  """Registers ``settings`` for ``scope`` (replacing what was there), or removes them (None)."""
  key = parse_scope(scope)
  if settings is not None and key.startswith('gs://') and settings.endpoint is not None:
    if key != 'gs://':
      raise ValueError(f'{scope}: a GCS endpoint applies to the whole process (tensorstore '
                       'reads it once); set it on the scope "gs://".')
    claim_gcs_endpoint(settings.endpoint)
  with _lock:
    if settings is None:
      _registered.pop(key, None)
    else:
      _registered[key] = settings


def clear() -> None:
  """Forgets every registered setting (a GCS endpoint already in use stays)."""
  with _lock:
    _registered.clear()


def for_bucket(scheme: str, bucket: str) -> Settings:
  """The registered settings that apply to ``scheme://bucket`` (all ``None`` if none)."""
  with _lock:
    on_bucket = _registered.get(f'{scheme}://{bucket}')
    on_scheme = _registered.get(f'{scheme}://')
  found = Settings()
  for settings in (on_scheme, on_bucket):
    if settings is not None:
      found = settings.merged_over(found)
  return found


def gcs_endpoint() -> str:
  """The GCS server this process talks to: the configured endpoint, else
  ``TENSORSTORE_GCS_HTTP_URL``, else ``STORAGE_EMULATOR_HOST`` (fixed once one of them is
  used), else Google's.

  tensorstore reads ``TENSORSTORE_GCS_HTTP_URL`` once, on its first GCS request, so the choice
  is written there before that request and cannot change later in the process.
  """
  global _gcs_endpoint_in_use
  with _lock:
    if _gcs_endpoint_in_use is None:
      configured = _registered.get('gs://')
      endpoint = (configured.endpoint if configured and configured.endpoint else None) or \
          os.environ.get('TENSORSTORE_GCS_HTTP_URL') or _emulator_url()
      if not endpoint:  # Google's, unless a server is named before tensorstore's first request.
        return _GOOGLE
      os.environ['TENSORSTORE_GCS_HTTP_URL'] = endpoint
      _gcs_endpoint_in_use = endpoint
    return _gcs_endpoint_in_use


def claim_gcs_endpoint(endpoint: str) -> None:
  """Makes ``endpoint`` this process's GCS server, or refuses if another is already in use."""
  global _gcs_endpoint_in_use
  endpoint = endpoint.rstrip('/')
  with _lock:
    if _gcs_endpoint_in_use is not None and _gcs_endpoint_in_use.rstrip('/') != endpoint:
      raise ValueError(
          f'GCS endpoint {endpoint}: this process already talks to {_gcs_endpoint_in_use} '
          '(tensorstore reads the GCS server once per process); configure the endpoint '
          'before the first gs:// access.')
    os.environ['TENSORSTORE_GCS_HTTP_URL'] = endpoint
    _gcs_endpoint_in_use = endpoint


def _emulator_url() -> str | None:
  """``STORAGE_EMULATOR_HOST`` (``host:port`` or a URL, as Google's clients take it) as a URL."""
  host = os.environ.get('STORAGE_EMULATOR_HOST', '').strip().rstrip('/')
  if not host:
    return None
  return host if '://' in host else f'http://{host}'
