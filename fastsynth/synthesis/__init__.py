"""Drop-in accelerated synthesizers for data-free knowledge distillation.

The upstream scripts switch with one line after ``import datafree``::

    import fastsynth; fastsynth.patch(datafree)

or import the classes directly::

    from fastsynth.synthesis import FastMetaSynthesizer, NAYER, DeepInvSyntheiszer, Normalizer
"""
from .augment import Augment, crop_flip, jitter_flip
from .base import BaseSynthesis, Normalizer, normalize
from .cmi import CMISynthesizer, CMISynthesizerCMI, InstanceMeanHook, MemoryBank, MLPHead, MultiTransform
from .core import BNCapture
from .deepinversion import DeepInversionSynthesizer, DeepInvSyntheiszer
from .fast_meta import FastMetaSynthesizer, FastSynthesizer
from .fast_meta_imagenet import FastMetaSynthesizerForImageNet
from .generative import GENERATIVE_METHODS, GenerativeSynthesizer
from .nayer import NAYER, NayerSynthesizer
from .pool import DataPool

__all__ = [
    "Augment", "BNCapture", "BaseSynthesis", "CMISynthesizer", "CMISynthesizerCMI", "DataPool", "DeepInvSyntheiszer",
    "DeepInversionSynthesizer", "FastMetaSynthesizer", "FastMetaSynthesizerForImageNet", "FastSynthesizer", "GENERATIVE_METHODS", "GenerativeSynthesizer",
    "InstanceMeanHook", "MLPHead", "MemoryBank", "MultiTransform", "NAYER", "NayerSynthesizer", "Normalizer",
    "crop_flip", "jitter_flip", "normalize",
]
