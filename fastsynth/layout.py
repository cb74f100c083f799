"""Former home of the CPU convolution layout rule, now ``fastsynth.cpu.layout``: these names
forward there, importing ``fastsynth.cpu`` only when one is used. ``CPU_CHANNELS_LAST_MIN_HW``
reads and sets ``fastsynth.cpu.config.channels_last_min_hw``."""
from __future__ import annotations

import sys
import types


def __getattr__(name: str):
    if name.startswith("__"):  # the import system probes __path__ and such: not forwarded
        raise AttributeError(name)
    from .cpu import _config, layout

    for where in (layout, _config):
        if hasattr(where, name):
            return getattr(where, name)
    raise AttributeError(f"module 'fastsynth.layout' has no attribute {name!r}")


class _Module(types.ModuleType):
    @property
    def CPU_CHANNELS_LAST_MIN_HW(self) -> int:  # noqa: N802 (the old constant's name)
        from .cpu import config

        return config.channels_last_min_hw

    @CPU_CHANNELS_LAST_MIN_HW.setter
    def CPU_CHANNELS_LAST_MIN_HW(self, value: int) -> None:  # noqa: N802
        from .cpu import config

        config.channels_last_min_hw = value


sys.modules[__name__].__class__ = _Module
