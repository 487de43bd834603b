"""Run the command line as ``python -m edgeembed``."""

import sys

from edgeembed.cli import main

sys.exit(main())
