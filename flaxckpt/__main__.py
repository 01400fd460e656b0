"""``python -m flaxckpt``: the ``flaxckpt`` command (see ``flaxckpt._cli``)."""

import sys

from flaxckpt._cli import main

sys.exit(main())
