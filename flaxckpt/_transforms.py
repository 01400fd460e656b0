"""Restore-time transforms: build a result tree that differs from the checkpoint's.

Keys are '/'-joined result paths (``params/dense/kernel``) matched as regular expressions;
``original_key`` may use the match's groups (``r'params/\\1'``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from flaxckpt import _errors, _tree


@dataclasses.dataclass(frozen=True)
class Transform:
  """How one result key (or regex of keys) gets its value; at most one way per transform.

  Attributes:
    original_key: the checkpoint key to take the value from (may reference regex groups of
      the result key); defaults to the result key itself.
    use_fallback: take the value from the target tree instead of the checkpoint.
    value_fn: applied to the checkpoint value before it is returned.
    multi_value_fn: ``fn(result_key, original_tree)`` computes the value from the whole original
      tree (``apply_transformations``); restore needs a ``RestoreTransform`` naming its inputs.
  """
  original_key: str | None = None
  use_fallback: bool = False
  value_fn: Callable[..., Any] | None = None
  multi_value_fn: Callable[..., Any] | None = None

  def __post_init__(self) -> None:
    given = [name for name, on in (
        ('original_key', self.original_key is not None), ('use_fallback', self.use_fallback),
        ('multi_value_fn', self.multi_value_fn is not None)) if on]
    if self.value_fn is not None and (self.use_fallback or self.multi_value_fn is not None):
      given.append('value_fn')
    if len(given) > 1:
      raise ValueError(f'A Transform takes one of original_key (with an optional value_fn), '
                       f'use_fallback, value_fn or multi_value_fn; got {", ".join(given)}.')


@dataclasses.dataclass(frozen=True)
class RestoreTransform(Transform):
  """A ``Transform`` for restore whose ``multi_value_fn(result_key, original_tree,
  restore_args)`` reads the checkpoint keys named in ``multi_value_fn_input_args``.

  Attributes:
    multi_value_fn_input_args: maps checkpoint keys (regexes over '/'-joined paths) to the
      ``RestoreArgs`` to read them with; only those keys are read into ``original_tree`` (the
      others are ``PLACEHOLDER`` there).
  """
  multi_value_fn_input_args: Mapping[str, Any] | None = None

  def __post_init__(self) -> None:
    super().__post_init__()
    if self.multi_value_fn_input_args is not None and self.multi_value_fn is None:
      raise ValueError('multi_value_fn_input_args is given without a multi_value_fn.')


class Source(NamedTuple):
  """Where one result leaf comes from: a checkpoint path, or the target's own value."""
  checkpoint_path: _tree.Path | None
  value_fn: Callable[[Any], Any] | None = None


FROM_TARGET = Source(None)


def resolve(result_paths: list[_tree.Path], checkpoint_paths: list[_tree.Path],
            transforms: Mapping[str, Transform] | None,
            default_to_original: bool = True) -> list[Source]:
  """Finds the source of every result leaf.

  Without transforms every result path must exist in the checkpoint; with transforms (even an
  empty dict) a path the checkpoint lacks keeps the target's value, and with
  ``default_to_original=False`` so does every path no transform matches.

  Raises:
    MissingKeysError: naming every result path the checkpoint does not hold.
  """
  by_key = {_tree.path_str(p): p for p in checkpoint_paths}
  compiled = [(re.compile(k), t) for k, t in (transforms or {}).items()]
  sources, missing = [], []
  for path in result_paths:
    key = _tree.path_str(path)
    source = None
    for pattern, transform in compiled:
      match = pattern.fullmatch(key)
      if match is None:
        continue
      if transform.use_fallback and transform.value_fn is None:
        source = FROM_TARGET
        break
      original = match.expand(transform.original_key) if transform.original_key else key
      if original not in by_key:
        raise _errors.MissingKeysError(
            f'Transform for {key!r} refers to checkpoint key {original!r}, which the checkpoint '
            f'does not hold. Checkpoint keys include: {sorted(by_key)[:10]}')
      source = Source(by_key[original], transform.value_fn)
      break
    if source is None:
      if key in by_key and (default_to_original or transforms is None):
        source = Source(by_key[key])
      elif transforms is not None:
        source = FROM_TARGET
      else:
        missing.append(key)
        continue
    sources.append(source)
  if missing:
    raise _errors.MissingKeysError(
        f'The target asks for {len(missing)} entr{"y" if len(missing) == 1 else "ies"} the '
        f'checkpoint does not hold: {missing}. Pass transforms={{}} (or Transform(use_fallback='
        'True)) to keep the target values for them.')
  return sources
