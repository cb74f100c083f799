"""``python -m fastsynth.bench [kernel...] [--device ...] [--quick] ...``: same as ``fastsynth bench``
(handy under profilers: ``ncu ... python -m fastsynth.bench bn_stat_loss --device cuda --quick``).
Runs ``runner.main`` directly: the CLI module (and the distillation code it reaches) stays unimported."""
import sys

from fastsynth.bench.runner import main

sys.exit(main(sys.argv[1:], prog="python -m fastsynth.bench"))
