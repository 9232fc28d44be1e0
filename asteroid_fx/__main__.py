"""``python -m asteroid_fx``: the ``asteroid-fx`` command."""

import sys

from asteroid_fx.cli import main

sys.exit(main())
