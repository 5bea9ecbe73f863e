"""`python -m segproxy`: the same as the `segproxy` command."""

import sys

from .cli import main

sys.exit(main())
