"""`python -m qmoe` runs the `qmoe` command."""

import sys

from .cli import main

sys.exit(main())
