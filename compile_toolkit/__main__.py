"""``python -m compile_toolkit``: the same as the ``ctk`` command."""

import sys

from .cli import main

sys.exit(main())
