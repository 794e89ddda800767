"""``python -m pertpy_contrastive``: the ``pertpy-contrastive`` command line."""

import sys

from ._cli import main

sys.exit(main())
