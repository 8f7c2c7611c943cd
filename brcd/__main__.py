"""``python -m brcd`` entry point."""

import sys

from .cli import main

sys.exit(main())
