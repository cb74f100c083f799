"""The knobs of fastsynth's CPU-only tuning, in one object: ``fastsynth.cpu.config``.

Every field is read when it is used (a fused graph reads ``channels_last_min_hw`` once, when it
is built; the others are read per call), so assigning a field changes what runs from then on::

    import fastsynth.cpu
    fastsynth.cpu.config.winograd_min_channels = 0      # Winograd path off
    with fastsynth.cpu.configured(channels_last_min_hw=0):
        view = fastsynth.fuse.fused_eval_view(model)    # built without the layout rule

Values are checked on assignment (``ValueError`` naming the field and what it takes).
"""
from __future__ import annotations

import contextlib
import dataclasses

from .. import _ext

__all__ = ["CPUConfig", "config", "configured", "resolve_min_hw"]


@dataclasses.dataclass
class CPUConfig:
    """What the CPU-only mechanisms do (docs/PERFORMANCE.md has the measurements behind each
    default).

    ``channels_last_min_hw``: convolution inputs of at least this many pixels (H*W) run
    channels_last, smaller ones NCHW, and a convolution output below it goes back to NCHW, in
    the fused teacher graph, the student's eval view and the generators' convolution stacks
    (what ``channels_last_min_hw="auto"`` means on their constructors); 0 turns the rule off.
    oneDNN's fp32 convolutions, forward + input gradient, channels_last over NCHW on the 2-core
    machine: 0.70-0.77 at 64 ch x 32 x 32, 0.31-0.42 for the 1x1 stride-2 shortcut from 32 x 32,
    0.80-0.95 at 16 x 16, but 1.05-1.08 at 8 x 8 and 1.4 at 4 x 4 (docs/PERFORMANCE.md, "Fifth
    pass").

    ``winograd_min_channels``: frozen 3x3 stride-1 convolutions whose input and output channel
    counts are both at least this run by Winograd F(2x2, 3x3) (``fastsynth.cpu.winograd``); 0
    turns the path off. oneDNN's direct convolution against it, b64, forward: 64 ch x 32 x 32
    24 vs 23 ms, 128 x 16 x 16 30 vs 18.6, 256 x 8 x 8 24 vs 17.4, 512 x 4 x 4 25 vs 15.5.

    ``winograd_blas``: the Winograd kernel calls the BLAS's ``sgemm_``/``dgemm_`` directly
    (looked up at run time in the library holding ATen's kernels); False runs the same products
    through ``at::mm`` (the path taken anyway where no such BLAS is found).

    ``upsample_fuse_min_macs``: a generator's nearest-2x upsample + 3x3 convolution
    (``fastsynth.nn.UpsampleConvSequential`` with ``fuse=None``) runs fused on CPU tensors where
    the convolution has at least this many multiply-adds. Set for the earlier four-phase form,
    which dispatched ~20 small ops more (2 threads, forward + backward: 0.81x at 38 M MACs,
    1.43x at 75 M, 1.21-1.39x at 151-604 M, 1.35-1.91x from 2.4 G up); the transposed-convolution
    form dispatches as few ops as the unfused pair, and the 32px generators measured the same
    with every size fused (docs/PERFORMANCE.md), so the threshold now costs nothing either way.

    ``large_blocks``: the C++ CPU kernels take output buffers of 4 MB and more from recycled
    2 MB-aligned blocks (csrc/cpu/large_alloc.h) instead of fresh memory, whose page faults cost
    more than the kernels writing it (a 51 MB gradient: 38 ms into fresh memory, 7 ms into
    mapped memory); ``fastsynth.empty_cache()`` frees the cached blocks.
    """

    channels_last_min_hw: int = 256
    winograd_min_channels: int = 128
    winograd_blas: bool = True
    upsample_fuse_min_macs: int = 2 ** 27
    large_blocks: bool = True

    def __setattr__(self, name: str, value) -> None:
        fields = {f.name: f for f in dataclasses.fields(self)}
        if name not in fields:
            raise AttributeError(f"fastsynth.cpu.config has no field {name!r} (fields: {', '.join(fields)})")
        if fields[name].type == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"fastsynth.cpu.config.{name} must be a bool, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"fastsynth.cpu.config.{name} must be an int >= 0, got {value!r}")
        object.__setattr__(self, name, value)
        if name in ("large_blocks", "winograd_blas") and "winograd_blas" in self.__dict__ \
                and "large_blocks" in self.__dict__:
            _push_to_extension(self)


def _push_to_extension(cfg: CPUConfig) -> None:
    """Hand the C++ switches (csrc/cpu/tuning.h) their values."""
    c = _ext._C
    if c is None:
        return  # no C++ kernels: nothing to switch
    setter = getattr(c, "set_cpu_tuning", None)
    if setter is None:
        if cfg.large_blocks and cfg.winograd_blas:
            return  # the built-in defaults of an older build
        raise RuntimeError("fastsynth.cpu.config: this build of fastsynth._C predates the C++ switches "
                           "(large_blocks, winograd_blas); rebuild the extension")
    setter(large_blocks=cfg.large_blocks, winograd_blas=cfg.winograd_blas)


config = CPUConfig()


@contextlib.contextmanager
def configured(**fields):
    """``fastsynth.cpu.config`` with ``fields`` set inside the ``with`` block, restored after."""
    old = {name: getattr(config, name) for name in fields}
    try:
        for name, value in fields.items():
            setattr(config, name, value)
        yield config
    finally:
        for name, value in old.items():
            setattr(config, name, value)


def resolve_min_hw(value) -> int:
    """A ``channels_last_min_hw`` argument as fastsynth's modules take it: ``"auto"`` reads
    ``config.channels_last_min_hw`` now, None or 0 is off, an int is the threshold in pixels."""
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"channels_last_min_hw must be 'auto', None or an int, got {value!r}")
        return config.channels_last_min_hw
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"channels_last_min_hw must be 'auto', None or an int >= 0, got {value!r}")
    return value
