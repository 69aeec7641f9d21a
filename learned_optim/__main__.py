"""``python -m learned_optim`` runs the ``learned-optim`` command line."""

import sys

from .cli import main

sys.exit(main())
