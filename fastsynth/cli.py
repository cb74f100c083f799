"""``fastsynth`` command line (minimal): ``fastsynth demo [options]`` runs the data-free digits
demo (fastsynth.demo.main)."""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fastsynth demo [--method {nayer,fast}] [--seed N] [--epochs N] [--out DIR]")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    print(f"fastsynth: unknown command {cmd!r} (known: demo)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
