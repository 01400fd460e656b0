"""Every Orbax name and keyword that public projects use (tests/data/api-gap.md) resolves from
flaxckpt, with the keywords they pass. Behaviour is what the other test modules check; this one
only guards the surface against a name being dropped or renamed."""

import inspect
import pathlib
import re

import pytest

import flaxckpt

GAP = pathlib.Path(__file__).parent / 'data' / 'api-gap.md'
# '- 6 `ocp.args.register_with_handler(for_save=)`', '- 1 `ocp.checkpoint_manager.X#restore(args=)`'
_LINE = re.compile(r'^- \d+ `ocp\.([\w.]+)(?:#(\w+))?(?:\((\w+)=\))?`$')


def _entries():
  for line in GAP.read_text().splitlines():
    match = _LINE.match(line)
    if line.startswith('- ') and not match:
      raise AssertionError(f'Unparsed line in {GAP.name}: {line!r}')
    if match:
      yield pytest.param(*match.groups(), id=line[line.index('`') + 1:-1])


def _resolve(dotted: str):
  obj = flaxckpt
  for i, part in enumerate(dotted.split('.')):
    assert hasattr(obj, part), f'flaxckpt.{".".join(dotted.split(".")[:i + 1])} is missing'
    obj = getattr(obj, part)
  return obj


def _accepts(fn, keyword: str) -> bool:
  parameters = inspect.signature(fn).parameters
  return keyword in parameters or any(
      p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def test_the_gap_list_is_parsed():
  assert len(list(_entries())) > 150


@pytest.mark.parametrize('dotted, method, keyword', list(_entries()))
def test_orbax_name_resolves(dotted, method, keyword):
  obj = _resolve(dotted)
  if method is not None:
    assert hasattr(obj, method), f'{dotted} has no method {method}'
    obj = getattr(obj, method)
  if keyword is not None:
    assert callable(obj), f'{dotted} is not callable'
    assert _accepts(obj, keyword), (
        f'{dotted}{"#" + method if method else ""} does not accept {keyword}=; its signature is '
        f'{inspect.signature(obj)}')
