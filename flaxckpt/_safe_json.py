"""JSON from untrusted files, parsed in bounded time, memory and stack.

Python's parser recurses once per nesting level, so a file of a few KB nested thousands deep
raises RecursionError (or, in code that walks the result, a later one). Every JSON file of a
checkpoint is parsed here: nesting is measured first, without recursion, and refused above
``MAX_DEPTH``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from flaxckpt import _errors, _storage

# The deepest nesting accepted. Orbax's JSON files nest a few levels (a tree's own depth at most,
# in _strings.json and custom metadata); 200 leaves room for deep user trees and stays far below
# Python's recursion limit of 1000, so no reader of the parsed value can hit it either.
MAX_DEPTH = 200

_KEEP = b'[]{}"\\'
_DROP = bytes(sorted(set(range(256)) - set(_KEEP)))
_STEP = np.zeros(256, np.int8)
_STEP[[ord('['), ord('{')]] = 1
_STEP[[ord(']'), ord('}')]] = -1


def depth(data: bytes) -> int:
  """The deepest nesting of arrays and objects in the JSON text ``data`` (brackets inside
  strings do not count); at most ``MAX_DEPTH`` when the text has too few brackets to say more."""
  if data.count(b'[') + data.count(b'{') <= MAX_DEPTH:
    return min(MAX_DEPTH, data.count(b'[') + data.count(b'{'))
  # Only brackets, quotes and backslashes matter: drop the rest (C speed), then the strings.
  skeleton = data.translate(None, _DROP)
  if b'\\' in skeleton:  # Escapes: a backslash pair, an escaped quote, then lone backslashes.
    skeleton = skeleton.replace(b'\\\\', b'').replace(b'\\"', b'').replace(b'\\', b'')
  skeleton = b''.join(skeleton.split(b'"')[::2])  # Outside strings only.
  steps = _STEP[np.frombuffer(skeleton, np.uint8)]
  return int(np.cumsum(steps, dtype=np.int32).max(initial=0))


def loads(data: bytes | str, where: str | os.PathLike) -> Any:
  """Parses JSON read from ``where`` (named in errors).

  Raises:
    LimitExceededError: it nests deeper than ``MAX_DEPTH``.
    ValueError (json.JSONDecodeError, UnicodeDecodeError): it is not JSON.
  """
  raw = data.encode('utf-8') if isinstance(data, str) else data
  if depth(raw) > MAX_DEPTH:
    raise _errors.LimitExceededError(
        f'{os.fspath(where)}: JSON nested more than {MAX_DEPTH} levels deep; no checkpoint '
        'file nests that deep, so the file is damaged or hostile.')
  return json.loads(raw)


def read(path: os.PathLike) -> Any:
  """The JSON value in the file at ``path`` (a regular file of metadata size; see
  ``_storage.read_bytes``), parsed by ``loads``."""
  return loads(_storage.read_bytes(path), path)
