"""Former home of the CPU Winograd path, now ``fastsynth.cpu.winograd``: these names forward
there, importing ``fastsynth.cpu`` only when one is used (``fastsynth.synthesis.core`` imports
``prepare_winograd`` from here). ``CPU_WINOGRAD_MIN_CHANNELS`` reads and sets
``fastsynth.cpu.config.winograd_min_channels``."""
from __future__ import annotations

import sys
import types


def prepare_winograd(model):
    """``fastsynth.cpu.prepare_winograd``."""
    from .cpu.winograd import prepare_winograd as prepare

    return prepare(model)


def __getattr__(name: str):
    if name.startswith("__"):  # the import system probes __path__ and such: not forwarded
        raise AttributeError(name)
    from .cpu import winograd

    try:
        return getattr(winograd, name)
    except AttributeError:
        raise AttributeError(f"module 'fastsynth.winograd' has no attribute {name!r}") from None


class _Module(types.ModuleType):
    @property
    def CPU_WINOGRAD_MIN_CHANNELS(self) -> int:  # noqa: N802 (the old constant's name)
        from .cpu import config

        return config.winograd_min_channels

    @CPU_WINOGRAD_MIN_CHANNELS.setter
    def CPU_WINOGRAD_MIN_CHANNELS(self, value: int) -> None:  # noqa: N802
        from .cpu import config

        config.winograd_min_channels = value


sys.modules[__name__].__class__ = _Module
