"""``tests/hostile_peers.py`` (``make peers``) on two cheap cases, one Orbax and one flax: the
script classifies each run and survives a peer that hangs or fails."""

import hostile_peers

# Enough for flaxckpt to import and refuse; a peer that blocks on the FIFO is cut off by it.
_TIMEOUT = 8.0


def test_the_script_classifies_an_orbax_case_and_a_flax_case():
  rows = hostile_peers.run_cases(['strings-dev-zero', 'flax-fifo-restore'], timeout=_TIMEOUT)
  assert [(row['case'], row['library']) for row in rows] == [
      ('strings-dev-zero', 'orbax'), ('strings-dev-zero', 'flaxckpt'),
      ('flax-fifo-restore', 'flax'), ('flax-fifo-restore', 'flaxckpt')]
  by = {(row['case'], row['library']): row for row in rows}
  for case in ('strings-dev-zero', 'flax-fifo-restore'):
    ours = by[case, 'flaxckpt']
    assert ours['kind'] == 'raised' and 'UnsafeCheckpointError' in ours['mro'], ours
    assert ours['outcome'].startswith('raised UnsafeCheckpointError: box/'), ours
  for row in (by['strings-dev-zero', 'orbax'], by['flax-fifo-restore', 'flax']):
    assert row['kind'] in ('raised', 'hung'), row
    assert row['outcome'].startswith('raised ' if row['kind'] == 'raised' else 'hung'), row
  assert {row['canary'] for row in rows} == {'untouched'}
  table = hostile_peers.format_table(rows).splitlines()
  assert table[0] == '| case | library | outcome | canary |' and len(table) == 2 + len(rows)
