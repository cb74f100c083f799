"""fastsynth.nn."""
from .generators import DeepGenerator, Generator, NLDeepGenerator, NLGenerator, NoisyLayers  # noqa: F401
from .upsample_conv import UpsampleConvSequential, upsample2x_conv3x3  # noqa: F401
