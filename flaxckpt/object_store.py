"""Explicit settings for checkpoints on ``s3://`` and ``gs://``.

Most programs need none: the standard environment is read (``AWS_ENDPOINT_URL_S3``,
``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_DEFAULT_REGION``, ``AWS_PROFILE``, the AWS key
variables and profile files; Google application default credentials, ``STORAGE_EMULATOR_HOST``).
Settings given here win over the environment, for every call that touches the scope: the
checkpointers, the manager, ``checkpoint_utils``, the legacy functions and the CLI alike::

  import flaxckpt as ocp

  ocp.object_store.configure('s3://my-bucket', endpoint='https://minio.internal:9000',
                             region='eu-west-1', request_concurrency=64)
  ocp.object_store.configure('gs://', endpoint='http://127.0.0.1:4443')   # an emulator
  ocp.object_store.configure('gs://public-data', requester_pays=True,
                             billing_project='my-project')
"""

from __future__ import annotations

from typing import Any

from flaxckpt._storage import _remote, _settings
from flaxckpt._storage._settings import Settings

__all__ = ['Settings', 'configure', 'settings_for', 'clear']


def configure(scope: str, settings: Settings | None = None, **fields: Any) -> None:
  """Sets how to reach the buckets of ``scope`` (``'s3://'``, ``'gs://'``, or one bucket such
  as ``'s3://my-bucket'``), replacing what was set for that scope before.

  Pass a ``Settings`` or its fields as keywords (not both). A bucket's settings win over its
  scheme's, field by field. ``configure(scope, None)`` with no fields removes the scope's
  settings.

  Raises:
    ValueError: a malformed scope or field value, or a GCS endpoint set after this process
      already talked to another GCS server (tensorstore reads it once per process).
  """
  if settings is not None and fields:
    raise TypeError('configure: pass a Settings or keyword fields, not both.')
  if fields:
    settings = Settings(**fields)
  _settings.configure(scope, settings)


def settings_for(url: str) -> Settings:
  """The settings registered for ``url``'s bucket (its own, over its scheme's); fields still
  ``None`` come from the environment when a request is made."""
  path = _remote.RemotePath.parse(url)
  return _settings.for_bucket(path.scheme, path.bucket)


def clear() -> None:
  """Removes every setting made with ``configure``."""
  _settings.clear()
