"""The ``fastsynth`` command.

    fastsynth demo [args...]                 data-free distillation demo (fastsynth.demo)
    fastsynth distill [--method M] [--dataset D] [--teacher A --teacher-ckpt P --student A] [--config F] [--out DIR] ...
                                             a whole data-free run (fastsynth distill --help)
    torchrun --standalone --nproc_per_node N -m fastsynth distill ...
                                             the same run on N processes (docs/DISTILL.md)
    fastsynth bench [kernel...] [--device cpu|cuda] [--quick] [--out DIR] [--plot] [--report MD] [--model]
    fastsynth plot CSV [--out DIR] [--report MD]   PNG charts (and a markdown report) of a benchmark CSV
    fastsynth profile [--steps N] [--out DIR] [--device ...]
    fastsynth info                           build info and versions
"""
from __future__ import annotations

import argparse
import importlib
import platform
import sys

USAGE = __doc__


def _demo(argv: list[str]) -> int:
    try:
        demo = importlib.import_module("fastsynth.demo")
    except ModuleNotFoundError as exc:
        if exc.name == "fastsynth.demo":
            print("fastsynth demo: the demo module fastsynth.demo is not in this installation", file=sys.stderr)
            return 2
        raise
    rc = demo.main(argv)
    return int(rc or 0)


def _distill(argv: list[str]) -> int:
    from . import distill_run

    return int(distill_run.main(argv) or 0)


def _bench(argv: list[str]) -> int:
    from .bench import runner

    return runner.main(argv)


def _plot(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fastsynth plot", description="PNG charts of a benchmark CSV.")
    p.add_argument("csv")
    p.add_argument("--out", default=None, help="output folder (default: the CSV's folder)")
    p.add_argument("--report", metavar="MD", default=None, help="also write a markdown report with the PNGs")
    a = p.parse_args(argv)
    from .bench.plot import plot_csv

    try:
        paths = plot_csv(a.csv, a.out)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 2
    for path in paths:
        print(f"png: {path}")
    if a.report:
        from .bench import report

        print(f"report: {report.write(a.csv, a.report, paths)}")
    return 0


def _profile(argv: list[str]) -> int:
    from .bench import profile

    return profile.main(argv)


def _info(argv: list[str]) -> int:
    import numpy
    import torch

    import fastsynth

    print(f"fastsynth {fastsynth.__version__}")
    for k, v in fastsynth.build_info().items():
        print(f"  {k:18s} {v}")
    print(f"python {platform.python_version()} ({platform.machine()})")
    print(f"torch {torch.__version__} (cuda {torch.version.cuda}, cuda available: {torch.cuda.is_available()})")
    if torch.cuda.is_available():
        print(f"gpu {torch.cuda.get_device_name()}")
    print(f"numpy {numpy.__version__}")
    for mod in ("triton", "matplotlib", "sklearn"):
        try:
            print(f"{mod} {importlib.import_module(mod).__version__}")
        except ImportError:
            print(f"{mod} not installed")
    from .bench.harness import git_commit

    print(f"commit {git_commit()}")
    return 0


COMMANDS = {"demo": _demo, "distill": _distill, "bench": _bench, "plot": _plot, "profile": _profile, "info": _info}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"fastsynth: unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
        return 2
    return COMMANDS[cmd](rest)


if __name__ == "__main__":
    sys.exit(main())
