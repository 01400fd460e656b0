"""Drop-in replacements for ``flax.training.checkpoints`` and ``flax.training.orbax_utils``.

``from flaxckpt.legacy import checkpoints`` in place of ``from flax.training import checkpoints``
keeps call sites and files on disk unchanged; see ``checkpoints`` for the few deliberate
differences.
"""

from flaxckpt.legacy import checkpoints, orbax_utils

__all__ = ['checkpoints', 'orbax_utils']
