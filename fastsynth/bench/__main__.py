"""``python -m fastsynth.bench [kernel...] [--device ...] [--quick] ...``: same as ``fastsynth bench``
(handy under profilers: ``ncu ... python -m fastsynth.bench bn_stat_loss --device cuda --quick``)."""
import sys

from fastsynth.cli import main

sys.exit(main(["bench"] + sys.argv[1:]))
