"""``python -m fastsynth ...`` is the ``fastsynth`` command (see fastsynth/cli.py)."""
import sys

from .cli import main

sys.exit(main())
