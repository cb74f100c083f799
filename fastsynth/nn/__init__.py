"""fastsynth.nn."""
from .generators import DeepGenerator, Generator, NLDeepGenerator, NLGenerator, NoisyLayers  # noqa: F401
