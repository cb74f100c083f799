"""The eager reference of upstream's ImageNet FastMeta loop lives in the package
(fastsynth/bench/reference_loops.py); test modules may import it by this name."""
from fastsynth.bench.reference_loops import RefFastMetaImageNet  # noqa: F401
