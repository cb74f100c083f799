"""fastsynth.nn."""
from .generators import (DCGAN_Generator, DeepGenerator, Generator, LargeGenerator, NLDeepGenerator,  # noqa: F401
                         NLGenerator, NoisyLayers)
from .upsample_conv import UpsampleConvSequential, upsample2x_conv3x3  # noqa: F401
