"""What every synthesizer runs on: BatchNorm-input capture, the one objective, on-device
best-image tracking, the resumable state, and the inner-step driver (``SynthCore._run_steps``:
eager, compiled or captured CUDA-graph steps). Small helpers that are not part of this
machinery live in ``util``; transform parsing and augmentation in ``augment``.

What the upstream loops waste and this module avoids:
- teacher and student parameters are switched to ``requires_grad=False`` for the duration of a
  synthesize() call (restored afterwards), so the synthesis backward computes no weight grads;
- the BN-statistics loss is computed only in synthesis forwards: the capture hooks exist only
  inside synthesize() (or the fused teacher's statistics are enabled only there), and all layers
  go through one multi-layer loss call per step;
- the best-loss image is tracked with ``torch.where`` on device tensors, no ``.item()``;
- the pool lives on the device and sampling never builds a DataLoader.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed as _dist
from .. import fuse as _fuse
from ..ops.bn_stat_loss import bn_stat_loss_multi, loss_from_stats
from ..ops.logit_losses import synthesis_logit_loss
from .augment import Augment, parse_transform, sample_augment  # noqa: F401 (parse_transform: public name)
from .base import BaseSynthesis
from .pool import DataPool, save_options
# helpers the synthesizers (and tests) have imported from here; they live in util
from .util import (_WARNED, _clone_state, _nonpersistent_buffers, _plain, frozen, make_adam,  # noqa: F401
                   now, nvtx_range, reset_optimizer_state_, warn_once)


def global_stats_hook(means, variances, sizes, counts):
    """``BNCapture.stats_hook`` of ``bn_stats='global'``: statistics over every rank's batch."""
    return _dist.global_bn_stats(means, variances, counts, sizes)


_UNIT_SEEDS: dict = {}


def _unit_seed(loss: torch.Tensor) -> torch.Tensor:
    """A cached 0-dim 1 matching ``loss`` (the backward seed; backward() builds it every call)."""
    key = (loss.dtype, loss.device)
    one = _UNIT_SEEDS.get(key)
    if one is None:
        one = _UNIT_SEEDS[key] = torch.ones((), dtype=loss.dtype, device=loss.device)
    return one


class BNCapture:
    """Collects the teacher's BatchNorm statistics during synthesis forwards.

    With the fused teacher (``fastsynth.fuse``), the fused BN layers compute the statistics in
    their own forward and ``bn_statistics`` returns them; otherwise light forward hooks stash
    the BN inputs, and ``loss()`` passes all of them to one ``bn_stat_loss_multi`` call.
    Either way statistics are produced only between ``activate()`` and ``deactivate()``.

    ``stats_hook`` (None, or e.g. the synthesizers' global-statistics hook under
    torch.distributed; see ``bn_stat_loss_multi``): maps the flat batch statistics of all layers
    to the ones the loss uses. With the fused teacher the element count of every layer is given
    as the batch rows N (recorded by a forward pre-hook on the teacher while active): the merge
    weighs ranks by count ratios, and H*W of a layer is the same on every rank.

    Momentum (``mmt_rate`` = bn_mmt): ``update_mmt()`` folds the detached statistics of the last
    forward into (mu_bar, var_bar) as upstream's ``DeepInversionHook.update_mmt`` does; the
    buffers are created on the first call and updated in place afterwards.
    """

    def __init__(self, teacher: nn.Module, mmt_rate: float = 0.0, fuse: bool = True, weights=None):
        self.mmt_rate = float(mmt_rate)
        self.weights = weights
        self.fuse = None
        if fuse and any(type(m) is nn.BatchNorm2d for m in teacher.modules()):
            if not _fuse.fused_layers(teacher):  # a teacher shared by two synthesizers is fused once
                teacher = _fuse.fuse_teacher(teacher)
            _fuse.set_stats_enabled(teacher, False)
            self.fuse = _fuse
        self.teacher = teacher
        self.bns = [m for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] \
            if self.fuse is None else []
        if self.fuse is None and not self.bns:
            raise ValueError("teacher must contain at least one BatchNorm layer for the BN-statistics loss")
        self._features: list = []
        self._handles: list = []
        self.mmt_means: list | None = None
        self.mmt_vars: list | None = None
        self.last_means: list | None = None
        self.last_vars: list | None = None
        self._op = bn_stat_loss_multi
        self.stats_hook = None
        self._rows = None  # batch rows of the last teacher forward (fused path with stats_hook)
        self._row_handle = None

    def _record_rows(self, module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()), None)
        if torch.is_tensor(x):
            self._rows = int(x.shape[0])

    # -- activation
    def _hook(self, module, inputs, output):
        self._features.append(inputs[0])

    def activate(self):
        self._features = []
        if self.fuse is not None:
            self.fuse.set_stats_enabled(self.teacher, True)
            if self.stats_hook is not None and self._row_handle is None:
                self._row_handle = self.teacher.register_forward_pre_hook(self._record_rows, with_kwargs=True)
        elif not self._handles:
            self._handles = [m.register_forward_hook(self._hook) for m in self.bns]

    def deactivate(self):
        if self.fuse is not None:
            self.fuse.set_stats_enabled(self.teacher, False)
        for h in self._handles:
            h.remove()
        self._handles = []
        self._features = []
        if self._row_handle is not None:
            self._row_handle.remove()
            self._row_handle = None

    # -- loss
    @property
    def mmt_active(self) -> bool:
        return self.mmt_means is not None

    def loss(self, scale: float = 1.0) -> torch.Tensor:
        """``scale * sum_l w_l R_l`` (``scale``: the synthesizer's ``bn`` coefficient, folded into
        the fused loss instead of a separate multiply)."""
        mm, mv = (self.mmt_means, self.mmt_vars) if self.mmt_active else (None, None)
        rate = self.mmt_rate if self.mmt_active else 0.0
        if self.fuse is not None:
            means, variances, rms, rvs = self.fuse.bn_statistics(self.teacher)
            if self.stats_hook is not None:
                if self._rows is None:
                    raise RuntimeError("BNCapture: no teacher forward recorded its batch size since activate()")
                sizes = [int(m.numel()) for m in means]
                mu, var = self.stats_hook(torch.cat([m.reshape(-1) for m in means]),
                                          torch.cat([v.reshape(-1) for v in variances]), sizes,
                                          [self._rows] * len(sizes))
                means, variances = mu.split(sizes), var.split(sizes)
            loss = loss_from_stats(means, variances, rms, rvs, mm, mv, rate, self.weights, scale=scale)
        else:
            feats, self._features = self._features, []
            if len(feats) != len(self.bns):
                raise RuntimeError(f"BNCapture: expected {len(self.bns)} BatchNorm inputs in one teacher "
                                   f"forward, got {len(feats)}")
            rms, rvs = [m.running_mean for m in self.bns], [m.running_var for m in self.bns]
            if self.stats_hook is None:  # the single-process call, unchanged
                loss, means, variances = self._op(feats, rms, rvs, mm, mv, rate, self.weights)
            else:
                loss, means, variances = self._op(feats, rms, rvs, mm, mv, rate, self.weights,
                                                  stats_hook=self.stats_hook)
            if scale != 1.0:
                loss = loss * scale
        self.last_means, self.last_vars = list(means), list(variances)
        return loss

    def stat_buffers(self) -> list:
        """Zeroed fp32 buffers shaped like [means..., vars...] (static outputs of a captured step)."""
        bns = self.bns if self.fuse is None else self.fuse.fused_layers(self.teacher)
        z = [torch.zeros(m.running_mean.shape, dtype=torch.float32, device=m.running_mean.device) for m in bns]
        return z + [t.clone() for t in z]

    def update_mmt(self):
        if self.last_means is None:
            return
        means = [m.detach().float() for m in self.last_means]
        variances = [v.detach().float() for v in self.last_vars]
        if self.mmt_means is None:
            self.mmt_means = [m.clone() for m in means]
            self.mmt_vars = [v.clone() for v in variances]
        else:
            r = self.mmt_rate
            with torch.no_grad():
                torch._foreach_mul_(self.mmt_means, r)
                torch._foreach_add_(self.mmt_means, means, alpha=1 - r)
                torch._foreach_mul_(self.mmt_vars, r)
                torch._foreach_add_(self.mmt_vars, variances, alpha=1 - r)

    def remove(self):
        self.deactivate()
        if self.fuse is not None:
            self.fuse.unfuse_teacher(self.teacher)
            self.fuse = None


def assign_grads(params, grads) -> list:
    """Set ``p.grad = g`` with each gradient in its parameter's strides (see
    ``SynthCore._backward``); returns the gradients as set."""
    out = []
    for p, g in zip(params, grads):
        if g is not None and g.stride() != p.stride():
            g = torch.empty_strided(p.shape, p.stride(), dtype=g.dtype, device=g.device).copy_(g)
        p.grad = g
        out.append(g)
    return out


STATE_FORMAT = "fastsynth-synth/1"


class SynthCore(BaseSynthesis):
    """Shared state and helpers of the fastsynth synthesizers (not an upstream class).

    ``state_dict()`` / ``load_state_dict()``: everything a later synthesize()/sample() reads,
    so that a synthesizer built again with the same keywords and loaded continues exactly as the
    saved one would have (bit-identical on the same device). Found generically among the
    instance attributes: modules (the generator(s), heads; never the teacher's or the student's),
    optimizers with their state, tensors and lists/tuples of tensors (z, meta buffers), private
    ``torch.Generator`` states, counters (plain values that are not keyword options), the BN
    momentum buffers, plus the pool (``DataPool.state_dict``), the default generators' states
    (the synthesizers draw from them when no ``seed`` is given) and the keyword options, which
    ``load_state_dict`` checks. Compiled functions and captured CUDA graphs are not state:
    loading drops them and they are rebuilt on first use. All of it loads with
    ``torch.load(weights_only=True)``. The state records the rank and world size it was saved
    with: loading it under another world size raises ValueError naming both (each rank saves
    and loads its own state; another rank's state warns once, its random streams being that
    rank's).

    torch.distributed (``fastsynth.distributed``): when the default process group is initialised
    with more than one process (torchrun; upstream's ``distributed=True`` without such a group
    warns once and runs as one process), each rank synthesizes its own batch (the batch sizes
    given are per rank) from its own random stream (``seed + rank``; without a seed, a seed
    drawn from the default generator plus the rank). ``bn_stats="global"`` (default): the
    BN-statistics loss uses the statistics of the global batch (one all_gather of all layers'
    statistics per step, merged exactly; ``fastsynth.distributed.global_bn_stats``), and the
    BN momentum state is the same on every rank; ``"per_rank"``: each rank's own statistics. The
    generator(s) start from rank 0's weights (one broadcast at construction) and, where the
    method learns them jointly across rounds (FastMeta's meta-generator, Fast's and NAYER's
    generator, the generative family, CMI's head and its generator with feature_reuse), their
    gradients are averaged in one flat all_reduce before each optimizer step. Teacher, student
    and generator may be given wrapped in DDP: synthesis runs the modules inside the wrappers (a
    DDP forward with frozen parameters would leave its reducer waiting for a backward).
    ``cuda_graph=True`` runs the steps eagerly under torch.distributed (collectives are not
    captured), as ``compile=True`` does with ``bn_stats="global"`` (one warning each). The
    generators' own BatchNorm layers normalise with each rank's batch (as DDP without
    SyncBatchNorm). One process: no collective, no extra op, results unchanged.
    ``pool_device`` / ``pool_dir``: the pool's ``storage`` / ``directory`` (``DataPool``)."""

    # keyword options that may differ on resume (where and how the run executes, not what it computes)
    _OPTION_SKIP = frozenset({"device", "num_workers", "distributed", "pool_device", "pool_dir"})
    # attributes that are handles, caches or settings of this process, never state
    _STATE_SKIP = frozenset({"teacher", "student", "data_pool", "_student_fwd", "_student_view", "_compiled",
                             "_graphs", "_graph_values", "loss_log", "log_losses", "last_dropped", "compile",
                             "cuda_graph", "_graph_mode", "_nvtx", "use_fp16", "_options", "_compile_options",
                             "data_iter", "_fuse_student", "_dist", "_rank", "_world", "_global_stats"})

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_records_options", False):
            return
        sig = inspect.signature(init)

        @functools.wraps(init)
        def __init__(self, *args, **kw):
            if "_options" not in self.__dict__:  # the outermost constructor records them
                try:
                    bound = sig.bind(self, *args, **kw)
                except TypeError:  # the constructor itself says what is wrong
                    return init(self, *args, **kw)
                bound.apply_defaults()
                opts = {}
                for name, v in list(bound.arguments.items())[1:]:
                    if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                        items = v.items()
                    elif sig.parameters[name].kind is inspect.Parameter.VAR_POSITIONAL:
                        continue
                    else:
                        items = [(name, v)]
                    for k, x in items:
                        if k not in cls._OPTION_SKIP and _plain(x):
                            opts[k] = list(x) if isinstance(x, tuple) else x
                self._options = opts
            init(self, *args, **kw)

        __init__._records_options = True
        cls.__init__ = __init__

    # ---------------------------------------------------------------- resumable state

    def _extra_state(self) -> dict:
        """Per-class state the generic walk does not find (plain objects holding tensors)."""
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    def _prepare_load(self, state: dict) -> None:
        """Per-class: build what the saved state has and a fresh object does not yet (after the
        modules are loaded, before the optimizers are)."""

    def state_dict(self) -> dict:
        """The synthesizer's state (see the class docstring); waits for the pool's counts and
        its writer thread, so images saved to disk are numbered and written before it returns."""
        skip, options = self._STATE_SKIP, self._options
        frozen_ids = {id(m) for root in (self.teacher, self.student) if isinstance(root, nn.Module)
                      for m in root.modules()}
        modules, buffers, optims, tensors, values, rngs, captures = {}, {}, {}, {}, {}, {}, {}
        for name, v in vars(self).items():
            if name in skip:
                continue
            if isinstance(v, nn.Module):
                if id(v) not in frozen_ids:
                    modules[name] = _clone_state(v.state_dict())
                    extra_buffers = _nonpersistent_buffers(v)
                    if extra_buffers:
                        buffers[name] = _clone_state(extra_buffers)
            elif isinstance(v, torch.optim.Optimizer):
                optims[name] = _clone_state(v.state_dict())
            elif torch.is_tensor(v):
                tensors[name] = v.detach().clone()
            elif isinstance(v, (list, tuple)) and v and all(torch.is_tensor(t) for t in v):
                tensors[name] = _clone_state(v)
            elif isinstance(v, torch.Generator):
                rngs[name] = v.get_state()
            elif isinstance(v, BNCapture):
                captures[name] = {"mmt_means": _clone_state(v.mmt_means), "mmt_vars": _clone_state(v.mmt_vars)}
            elif _plain(v) and not isinstance(v, (list, tuple)) and name not in options:
                values[name] = v  # counters; a setting named like an option is that option
        default_rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            default_rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"format": STATE_FORMAT, "class": type(self).__name__, "options": dict(self._options),
                "modules": modules, "buffers": buffers, "optimizers": optims, "tensors": tensors, "values": values,
                "rngs": rngs, "captures": captures, "default_rng": default_rng, "pool": self.data_pool.state_dict(),
                "extra": self._extra_state(), "dist": {"rank": self._rank, "world_size": self._world}}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s state into a synthesizer built with the same keyword options
        (a different one raises ValueError naming it). Sets the default generators' states too."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"{type(self).__name__}.load_state_dict: state must be a dict from state_dict() "
                             f"(format {STATE_FORMAT!r}), got "
                             f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r}")
        if state["class"] != type(self).__name__:
            raise ValueError(f"{type(self).__name__}.load_state_dict: the state is of a {state['class']}")
        saved_dist = state.get("dist", {"rank": 0, "world_size": 1})
        if saved_dist["world_size"] != self._world:
            raise ValueError(f"{type(self).__name__}.load_state_dict: the state was saved with world size "
                             f"{saved_dist['world_size']} (rank {saved_dist['rank']}), this process group has world "
                             f"size {self._world}; resume with the same number of processes")
        if saved_dist["rank"] != self._rank:
            warn_once("load_rank", f"fastsynth: {type(self).__name__}.load_state_dict: loading rank "
                                   f"{saved_dist['rank']}'s state on rank {self._rank}; its random streams are rank "
                                   f"{saved_dist['rank']}'s (save and load each rank's own state)")
        saved, now_opts = state["options"], self._options
        for k in sorted(set(saved) | set(now_opts)):
            a, b = saved.get(k, "<absent>"), now_opts.get(k, "<absent>")
            if a != b:
                raise ValueError(f"{type(self).__name__}.load_state_dict: option {k}={b!r} differs from the "
                                 f"saved synthesizer's {k}={a!r}")
        # compiled functions and captured graphs hold the old tensors: rebuilt on first use
        self._close_graphs()
        self._compiled = {}
        for name, sd in state["modules"].items():
            m = getattr(self, name, None)
            if not isinstance(m, nn.Module):
                raise ValueError(f"{type(self).__name__}.load_state_dict: saved module {name!r} has no "
                                 f"counterpart here")
            m.load_state_dict(sd)
            own = _nonpersistent_buffers(m)
            for key, t in state["buffers"].get(name, {}).items():
                if key not in own or own[key].shape != t.shape:
                    raise ValueError(f"{type(self).__name__}.load_state_dict: saved buffer {name}.{key} of shape "
                                     f"{tuple(t.shape)} does not fit this {type(m).__name__}")
                with torch.no_grad():
                    own[key].copy_(t)
        self._prepare_load(state)
        for name, t in state["tensors"].items():
            self._load_tensor_attr(name, t)
        for name, sd in state["optimizers"].items():
            opt = getattr(self, name, None)
            if not isinstance(opt, torch.optim.Optimizer):
                raise ValueError(f"{type(self).__name__}.load_state_dict: saved optimizer {name!r} has no "
                                 f"counterpart here")
            opt.load_state_dict(sd)
        for name, v in state["values"].items():
            setattr(self, name, v)
        for name, st in state["rngs"].items():
            getattr(self, name).set_state(st)
        for name, st in state["captures"].items():
            cap = getattr(self, name)
            for key in ("mmt_means", "mmt_vars"):
                v = st[key]
                setattr(cap, key, None if v is None else [t.to(self.device) for t in v])
        self.data_pool.load_state_dict(state["pool"])
        self._load_extra_state(state["extra"])
        torch.set_rng_state(state["default_rng"]["cpu"])
        if self.device.type == "cuda" and "cuda" in state["default_rng"]:
            torch.cuda.set_rng_state(state["default_rng"]["cuda"], self.device)

    def _load_tensor_attr(self, name: str, saved) -> None:
        """In place where this object has a tensor of the same kind (optimizers and captured
        steps hold it by address), else a new attribute."""
        cur = getattr(self, name, None)
        if torch.is_tensor(saved):
            if torch.is_tensor(cur) and cur.shape == saved.shape and cur.dtype == saved.dtype:
                with torch.no_grad():
                    cur.copy_(saved)
            else:
                setattr(self, name, saved.to(self.device))
            return
        if isinstance(cur, (list, tuple)) and len(cur) == len(saved) and all(
                torch.is_tensor(c) and c.shape == s.shape and c.dtype == s.dtype for c, s in zip(cur, saved)):
            with torch.no_grad():
                for c, s in zip(cur, saved):
                    c.copy_(s)
            return
        setattr(self, name, type(saved)(s.to(self.device) for s in saved))

    # ---------------------------------------------------------------- setup
    def _setup_core(self, *, img_size, normalizer, device, bn_mmt, transform, autocast, use_fp16,
                    save_dir, save_images, save_format, pool_capacity, pool_eviction, augment,
                    fuse_teacher, seed, compile, cuda_graph, aug_padding=4, aug_flip=True, bn_weights=None,
                    bn_stats="global", pool_device=None, pool_dir=None):
        if bn_stats not in ("global", "per_rank"):
            raise ValueError(f"{type(self).__name__}: bn_stats must be 'global' (BN statistics over every rank's "
                             f"batch) or 'per_rank', got {bn_stats!r}")
        self.bn_stats = bn_stats
        # the user's modules inside DDP wrappers: synthesis never runs a wrapper's forward (a
        # DDP forward with frozen parameters would leave its reducer expecting a backward)
        self.teacher = _dist.unwrap(self.teacher)
        self._dist = _dist.is_distributed()
        self._rank, self._world = _dist.rank(), _dist.world_size()
        if getattr(self, "distributed", False) and not self._dist:
            warn_once("distributed_no_group", "fastsynth: distributed=True, but no torch.distributed process group "
                                              "with more than one process is initialised; synthesizing as one "
                                              "process")
        if self._dist:
            # every rank its own random stream (z, labels, augmentation): seed + rank; without a
            # seed, a seed drawn from the default generator (which the user may have seeded alike
            # on every rank) plus the rank
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,)).item())
            seed = _dist.rank_seed(int(seed))
        if device is None:  # upstream harnesses pass args.gpu, which may be None: follow the teacher
            p = next(self.teacher.parameters(), None)
            device = p.device if p is not None else "cpu"
        self.device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        self.img_size = img_size
        self.normalizer = normalizer
        self.transform = transform
        self.autocast = autocast
        self.use_fp16 = bool(use_fp16)
        self.save_dir = save_dir
        self.bn_mmt = bn_mmt
        self._nvtx = self.device.type == "cuda"
        self._rng = None
        if seed is not None:
            self._rng = torch.Generator(device=self.device).manual_seed(int(seed))
            self._cpu_rng = torch.Generator().manual_seed(int(seed) + 1) if self.device.type != "cpu" else self._rng
        save_images, save_format = save_options(save_images, save_format)  # save_images="png" too
        self.data_pool = DataPool(capacity=pool_capacity, eviction=pool_eviction, device=self.device,
                                  save_dir=save_dir if save_images else None, save_format=save_format,
                                  storage=pool_device, directory=pool_dir)
        hw = tuple(img_size[-2:]) if img_size is not None else None
        self.aug = Augment(normalizer, padding=aug_padding, flip=aug_flip, size=hw, enabled=augment)
        # sample(): the upstream harness applies the dataset's train transform to pool images;
        # here its crop (padded or RandomResizedCrop), flip and Normalize run batched on the device
        self.sample_aug = sample_augment(transform, normalizer, padding=aug_padding, flip=aug_flip, size=hw,
                                         enabled=augment)
        self.capture = BNCapture(self.teacher, mmt_rate=bn_mmt, fuse=fuse_teacher, weights=bn_weights)
        self._global_stats = self._dist and bn_stats == "global"
        if self._global_stats:
            self.capture.stats_hook = global_stats_hook
        # the student's eval-mode forward with conv+BN folded, other BN+ReLU through fused_bn (no
        # statistics) and add+ReLU joined, built on first use; the student module itself is not
        # changed (fuse.fused_eval_view)
        self._fuse_student = bool(fuse_teacher)
        self._student_view = None  # (student, view or None)
        self._student_fwd = self.student
        self.teacher = self.capture.teacher
        # compile: True (inductor) or a dict of torch.compile keywords, e.g. {"backend": "aot_eager"}
        self._compile_options = dict(compile) if isinstance(compile, dict) else {}
        self.compile = bool(compile)
        self.cuda_graph = bool(cuda_graph)
        if self.cuda_graph and self.device.type != "cuda":
            warn_once("cuda_graph_cpu", "fastsynth: cuda_graph=True needs a CUDA device; running the inner "
                                        "steps eagerly on " + str(self.device))
            self.cuda_graph = False
        if self._dist and self.cuda_graph:
            # the gathers of global statistics and the gradient all_reduces run inside the steps;
            # capturing collectives is not safe on every backend and version
            warn_once("cuda_graph_dist", "fastsynth: cuda_graph=True under torch.distributed runs the inner steps "
                                         "eagerly (collectives are not captured)")
            self.cuda_graph = False
        if self._global_stats and self.compile:
            warn_once("compile_dist", "fastsynth: compile=True with bn_stats='global' under torch.distributed runs "
                                      "the inner steps eagerly (the statistics gather is not traced)")
            self.compile = False
        self._graph_mode = self.cuda_graph  # the inner steps are captured (_run_steps)
        self._compiled: dict = {}
        self._graphs: dict = {}
        self._graph_values: dict = {}  # key -> the settings its graph was captured with
        self.last_dropped = 0  # images the last synthesize() call reported dropped (_add_to_pool)
        self._logit_loss = synthesis_logit_loss
        self.data_iter = None  # upstream attribute; sample() uses the pool
        # per-step losses as device tensors (no sync), for curves and tests; eager/compile modes
        self.log_losses = False
        self.loss_log: list = []

    # ---------------------------------------------------------------- torch.distributed
    def _share_generator(self, generator: nn.Module) -> nn.Module:
        """The user's generator (unwrapped from DDP) with rank 0's parameters and buffers on
        every rank (one broadcast per dtype; nothing on one process)."""
        generator = _dist.unwrap(generator)
        if self._dist:
            _dist.broadcast_module_(generator)
        return generator

    def _average_grads(self, params_or_grads) -> None:
        """Under torch.distributed: gradients (of ``params``' ``.grad`` or the given buffers)
        averaged across ranks in one flat all_reduce, before a step of an optimizer of what
        every rank learns jointly. Nothing on one process."""
        if self._dist:
            _dist.average_gradients_(params_or_grads)

    # ---------------------------------------------------------------- helpers
    def _autocast_ctx(self):
        if not self.use_fp16:
            return contextlib.nullcontext()
        if self.autocast is not None:
            return self.autocast()
        dt = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dt)

    def _randn(self, *shape):
        return torch.randn(*shape, device=self.device, generator=self._rng)

    def _randint(self, high, shape):
        # upstream draws labels on the CPU and moves them
        g = None if self._rng is None else self._cpu_rng
        return torch.randint(low=0, high=high, size=shape, generator=g).to(self.device)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def _synthesis_mode(self):
        """eval() teacher and student, freeze their parameters, activate the BN capture."""
        s_mode = self.student.training if self.student is not None else None
        self.teacher.eval()
        if self.student is not None:
            self.student.eval()
        self._student_fwd = self._student_eval_forward()
        self.capture.activate()
        try:
            with frozen(self.teacher, self.student):
                if self.compile and self.device.type == "cpu":
                    # transformed 3x3 weights for the Winograd path, made here because a compiled
                    # step cannot check whether they changed (the student trains between rounds);
                    # the CPU room is imported only on the CPU
                    from .. import cpu as _cpu

                    _cpu.prepare_winograd(self.teacher)
                    if self._student_fwd is not None:
                        _cpu.prepare_winograd(self._student_fwd)
                yield
        finally:
            self.capture.deactivate()
            if self.student is not None:
                self.student.train(s_mode)

    def _student_eval_forward(self):
        """What computes the student's logits in synthesis: its fused eval view, or the student
        itself when fusion is off, impossible (no BatchNorm2d, untraceable) or when any of its
        modules carries hooks (checked on every synthesize() call; they run as written)."""
        st = _dist.unwrap(self.student)
        if st is None or not self._fuse_student:
            return st
        if any(m._forward_hooks or m._forward_pre_hooks for m in st.modules()):
            return st
        if self._student_view is None or self._student_view[0] is not st:
            self._student_view = (st, _fuse.fused_eval_view(st))
        view = self._student_view[1]
        if view is None:
            return st
        # the student trained since the last round: re-fold its conv+BN weights now, in place,
        # so compiled and captured steps (which do not check) read this round's weights
        _fuse.refresh_folds(view)
        return view

    def _draw_aug(self, batch: int):
        """The augmentation's random codes for one step on generated images of ``img_size``,
        drawn here, outside the compiled forward (torch.compile cannot trace a random op given a
        generator) and inside a captured step (so every replay draws fresh ones)."""
        with nvtx_range("augment", self._nvtx):
            return self.aug.draw(batch, self.img_size[-2:], self.device, self._rng)

    def objective(self, x: torch.Tensor, targets: torch.Tensor, adv_on: bool, aug_codes=None, *,
                  parts: bool = False, report_bn: bool = False):
        """bn * L_BN + oh * CE(t, y) + adv * L_adv on the augmented batch (the upstream loops' loss;
        ``fastsynth/bench/reference_loops.py``);
        ``aug_codes``: the augmentation's random codes (``_draw_aug``).

        ``parts=True`` returns ``(loss, bn term, CE)`` instead of the loss, for the synthesizers
        that report or track the terms (NAYER's best one-hot loss, FastMeta-ImageNet's returned
        losses). The bn term is None unless ``report_bn``; then it is ``bn * L_BN`` detached, or
        when bn == 0 the unweighted L_BN, detached (computed for reporting only, as upstream
        computes it in every forward). CE is the unweighted cross-entropy (detached when the
        fused adversarial loss computed it, else the tensor the loss uses)."""
        with nvtx_range("augment", self._nvtx):
            x_aug = self.aug(x, generator=self._rng, codes=aug_codes)
        with nvtx_range("teacher", self._nvtx):
            t_out = self.teacher(x_aug)
        with nvtx_range("losses", self._nvtx):
            if self.bn != 0:
                loss_bn = self.capture.loss(scale=self.bn)  # bn * L_BN
            elif report_bn:
                loss_bn = self.capture.loss().detach()
            else:
                loss_bn = None
            if adv_on:
                with nvtx_range("student", self._nvtx):
                    s_out = self._student_fwd(x_aug)
                loss, terms = self._logit_loss(t_out, s_out, targets, self.oh, self.adv)
                loss_oh = terms["oh"]  # detached
            else:
                loss_oh = F.cross_entropy(t_out, targets)
                loss = self.oh * loss_oh
            if self.bn != 0:
                loss = loss + loss_bn
                if report_bn:
                    loss_bn = loss_bn.detach()
        return (loss, loss_bn if report_bn else None, loss_oh) if parts else loss

    def _log(self, loss):
        if self.log_losses:
            self.loss_log.append(loss.detach().clone())

    @staticmethod
    def _track_best(loss, x, best_cost, best_x, first: bool | None = False, *, more=()):
        """In place, under no_grad: keep the images x of the lowest loss, on the device.

        ``first=True`` (the first step of a round, known to the Python loop): take x
        unconditionally, as upstream's ``best_inputs is None`` branch does. ``first=False``: take
        x where loss < best (strictly; upstream's ``best_cost > loss``). ``first=None`` (a
        captured step, which the same graph replays for every step): the generic form, which
        also takes x while nothing is kept yet (best = inf). ``more``: further (value, kept)
        pairs taken together with x (CMI's features of the kept images)."""
        ld = loss if loss.dim() == 0 else loss.reshape(())
        pairs = ((x, best_x),) + tuple(more)
        if first:
            best_cost.copy_(ld)
            for v, kept in pairs:
                kept.copy_(v)
            return
        better = ld < best_cost
        if first is None:
            better = better | (best_cost == float("inf"))
        torch.where(better, ld, best_cost, out=best_cost)
        for v, kept in pairs:
            torch.where(better, v, kept, out=kept)

    @staticmethod
    def _backward(loss, optimizer: torch.optim.Optimizer) -> list:
        """``optimizer.zero_grad(set_to_none=True); loss.backward()`` for the optimizer's
        parameters, as ``torch.autograd.grad``: the same gradients, set as ``.grad``, without
        an AccumulateGrad node (one detach op) per leaf or zero_grad's profiling ops. Returns
        the gradients (None for a parameter the loss does not use).

        Each gradient is given its parameter's strides (``.backward()`` does this in
        AccumulateGrad; ``autograd.grad`` does not): torch's fused Adam pairs parameter and
        gradient elements by memory position, so a channels_last weight gradient of a
        contiguous weight (the upsample+conv layers return some) would update the wrong
        elements. A Python stride comparison per parameter; a copy only where they differ."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = torch.autograd.grad(loss, params, grad_outputs=_unit_seed(loss), allow_unused=True)
        return assign_grads(params, grads)

    def _compiled_fn(self, key, fn):
        c = self._compiled.get(key)
        if c is None:
            opts = dict(self._compile_options)
            opts.setdefault("fullgraph", True)
            opts.setdefault("dynamic", False)
            if self.device.type == "cpu" and opts.get("backend", "inductor") == "inductor" and "mode" not in opts:
                # Inductor's layout optimisation turns the CPU convolutions channels_last; oneDNN's
                # channels_last fp32 kernels are slower at 8x8 / 4x4 maps (ResNet-34 -> ResNet-18
                # step: 4130 ms with it, 3345 ms without, eager 3375-3417 ms; docs/PERFORMANCE.md).
                # A user's own inductor options win.
                opts["options"] = {"layout_optimization": False, **(opts.get("options") or {})}
            c = torch.compile(fn, **opts)
            self._compiled[key] = c
        return c

    # ---------------------------------------------------------------- the inner-step driver
    def _maybe_compiled(self, key, fn):
        """``fn`` compiled once per ``key`` when ``compile`` is on, else ``fn`` itself."""
        return self._compiled_fn(key, fn) if self.compile else fn

    @staticmethod
    def _first(it: int | None) -> bool | None:
        """``_track_best``'s ``first`` for the step ``it`` of ``_run_steps`` (None: captured)."""
        return None if it is None else it == 0

    def _tracked_step(self, fwd: Callable, adv_on: bool, first: bool | None, shared=None,
                      on_grads: Callable | None = None):
        """One inner step of the synthesizers that keep their best images (FastMeta/Fast, NAYER):
        the augmentation codes are drawn, ``fwd(adv_on, codes)`` returns ``(loss, x, *extra)``
        (run under autocast), the loss is logged and the pre-step images of the lowest loss kept
        in ``_best_cost`` / ``_best_x`` (``first``: ``_track_best``'s), ``_optimizer``'s
        gradients computed, the gradients of ``shared`` (what every rank learns jointly)
        averaged across ranks, ``on_grads(grads)`` run (FastMeta's MAML sum) and the optimizer
        stepped. Returns ``extra`` (read under no_grad by the caller)."""
        aug_codes = self._draw_aug(self._targets.shape[0])
        with self._autocast_ctx():
            loss, x, *extra = fwd(adv_on, aug_codes)
        if self._best_x is None:
            self._best_x = torch.zeros(x.shape, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            self._log(loss)
            self._track_best(loss, x, self._best_cost, self._best_x, first)
        with nvtx_range("backward", self._nvtx):
            grads = self._backward(loss, self._optimizer)
        if shared is not None:
            self._average_grads(shared)
        with nvtx_range("step", self._nvtx):
            if on_grads is not None:
                on_grads(grads)
            self._optimizer.step()
        return extra

    def _step_generators(self) -> list:
        """The private generators a captured step draws from (registered with the graph, their
        states restored after the warm-up); the default generators are always included."""
        return [] if self._rng is None else [self._rng]

    def _step_tensors(self) -> list:
        """Per synthesizer: the persistent tensors one inner step writes, besides its optimizer's
        state and the BN-statistics buffers (the driver adds those): module parameters and
        buffers, z, best-image tracking, static outputs. A captured step's warm-up restores them
        (``CudaGraphStep``); None entries are skipped."""
        return []

    def _run_steps(self, n: int, step: Callable, key=None, optimizer=None,
                   after: Callable | None = None, stats: bool = True, graph: bool = True):
        """The inner-step driver of every synthesizer: runs ``n`` steps of ``step``.

        Eager (``cuda_graph`` off or not possible, or ``graph=False``: this call's step cannot
        be captured yet, e.g. CMI's while its bank fills): ``step(it)`` for it = 0 .. n-1;
        ``after(it, out)`` gets each step's return value; returns the last one. ``key`` and
        ``optimizer`` are needed only for captured steps.

        Captured (``cuda_graph``): ``step(None)`` must read and write persistent tensors only
        (``_step_tensors``, the state of ``optimizer``: one optimizer or a list of those the
        step runs). It is captured once per ``key`` and the settings it bakes in
        (``_graph_for``), after a warm-up that is undone, and replayed ``n`` times;
        ``after(it, None)`` runs after each replay; returns None. With ``stats`` each step also
        copies the BN statistics of its forward into static buffers, handed to the capture after
        the last replay (``update_mmt`` reads them as after an eager step)."""
        if not (self._graph_mode and graph):
            out = None
            for it in range(n):
                out = step(it)
                if after is not None:
                    after(it, out)
            return out
        if optimizer is None:
            raise ValueError(f"{type(self).__name__}._run_steps: a captured step needs its optimizer")
        optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
        if stats and getattr(self, "_last_stats", None) is None:
            self._last_stats = self.capture.stat_buffers()

        def captured():
            step(None)
            if stats:
                with torch.no_grad():
                    torch._foreach_copy_(self._last_stats, self.capture.last_means + self.capture.last_vars)

        def mutable():
            ts = [t for t in self._step_tensors() if t is not None]
            if stats:
                ts += self._last_stats
            # the optimizer state a warm-up creates is zeroed like a fresh one's
            for opt in optimizers:
                for st in opt.state.values():
                    ts += [v for v in st.values() if torch.is_tensor(v)]
            return ts

        g = self._graph_for(key, lambda: CudaGraphStep(captured, mutable, rng=self._step_generators(),
                                                       device=self.device, before_capture=self._pool_idle))
        for it in range(n):
            g()
            if after is not None:
                after(it, None)
        if stats:
            k = len(self._last_stats) // 2
            self.capture.last_means, self.capture.last_vars = self._last_stats[:k], self._last_stats[k:]
        return None

    # ---------------------------------------------------------------- pool / sample
    def sample(self):
        """One normalised, augmented batch of ``sample_batch_size`` images drawn uniformly (without
        replacement until exhausted) from everything kept in the pool."""
        x = self.data_pool.sample(self.sample_batch_size, generator=self._rng)
        return self.sample_aug(x, generator=self._rng)

    def _graph_settings(self) -> tuple:
        """The Python values a captured step bakes in: the loss coefficients, the BN momentum
        and the inner optimizer's hyper-parameters (capturable Adam reads float lr/betas at
        capture). A graph captured with other values is replaced (``_graph_for``)."""
        coefs = tuple(float(getattr(self, name)) for name in self._graph_coefficients)
        return coefs + (float(self.capture.mmt_rate), self._optimizer_settings(self._graph_optimizer()))

    @staticmethod
    def _optimizer_settings(opt) -> tuple:
        """The plain hyper-parameters of ``opt``'s groups (() for None), as a comparable tuple."""
        return () if opt is None else tuple(
            tuple((k, v if not isinstance(v, (list, tuple)) else tuple(v)) for k, v in sorted(g.items())
                  if k != "params" and isinstance(v, (int, float, bool, list, tuple)))
            for g in opt.param_groups)

    # the loss coefficients a captured step bakes in (a subclass with more lists them all)
    _graph_coefficients: tuple = ("bn", "oh", "adv")

    def _graph_optimizer(self):
        """The optimizer a captured step runs (its hyper-parameters are part of the key)."""
        return getattr(self, "_optimizer", None)

    def _graph_for(self, key, make: Callable[[], "CudaGraphStep"]) -> "CudaGraphStep":
        """The captured step of ``key`` for the current settings: a graph captured with other
        bn/oh/adv/mmt/learning-rate values is closed (its memory pool freed) and replaced."""
        settings = self._graph_settings()
        g = self._graphs.get(key)
        if g is not None and self._graph_values.get(key) != settings:
            g.close()
            del self._graphs[key]
            g = None
        if g is None:
            g = self._graphs[key] = make()
            self._graph_values[key] = settings
        return g

    def _close_graphs(self) -> None:
        """Free every captured step and its memory pool."""
        for g in self._graphs.values():
            close = getattr(g, "close", None)
            if close is not None:
                close()
        self._graphs = {}
        self._graph_values = {}

    def _add_to_pool(self, batches) -> int:
        """The call's batches to the pool, each with the loss that picked it (or None): rows with
        NaN/Inf and whole batches of a non-finite loss are dropped on the device, without a host
        sync (``DataPool.add``). The student trains only on pool samples, so it never sees them.
        Drops are reported once per synthesize() call, as soon as their counts reach the host
        without waiting (CPU: this call; CUDA: usually the next one; ``close()`` reports the
        rest). Returns the number reported now (also ``last_dropped``)."""
        for images, cost in batches:
            self.data_pool.add(images, valid=None if cost is None else torch.isfinite(cost).reshape(()))
        return self._report_dropped(wait=False)

    def _report_dropped(self, wait: bool) -> int:
        dropped = self.data_pool.take_dropped(wait)
        self.last_dropped = dropped
        if dropped:
            warnings.warn(f"fastsynth: {type(self).__name__}.synthesize() dropped {dropped} synthesized images "
                          f"with non-finite values or from a non-finite loss; they did not enter the pool "
                          f"({self.data_pool.dropped} dropped so far)", RuntimeWarning, stacklevel=4)
        return dropped

    def _pool_idle(self) -> None:
        """Before a capture: the pool's writer thread finishes what it was given (a one-time
        wait per capture, not per step), so no other CUDA work of ours overlaps the capture."""
        self.data_pool.wait_idle()

    def close(self):
        self._close_graphs()
        self._report_dropped(wait=True)
        self.data_pool.close()
        self.capture.remove()


class CudaGraphStep:
    """Captures ``step()`` (which reads and writes only persistent tensors) into a CUDA graph.

    ``warm_up()`` runs the warm-up iterations (lazy optimizer state, cuDNN/Triton selection) on
    a side stream and then undoes them: every tensor in ``mutable()`` gets its value back, state
    the warm-up created (optimizer moments) is zeroed like a fresh one, and the random generators
    get their states back (``rng``: one private generator or a list of them, and the device's
    default generator), so capture leaves the computation unchanged and a graph run draws the
    numbers of an eager run with the same seed. Random ops inside use the generators' graph-safe
    Philox state (private ones are registered with the graph), so each replay draws fresh
    numbers. The values are restored by tensor identity: state the warm-up creates may appear
    anywhere in ``mutable()``'s list (a step running two optimizers). ``before_capture()`` runs
    just before the capture (the synthesizers let their pool's writer thread go idle there); the
    capture uses ``capture_error_mode="thread_local"`` so other
    threads may use CUDA meanwhile. ``close()`` frees the graph and its private memory pool.

    On a device other than CUDA nothing is captured: the first call warms up as above and every
    call runs ``step()`` eagerly. The synthesizers never build it there (cuda_graph=True falls
    back to eager steps on the CPU); tests use it to run the warm-up and key logic on the CPU.
    """

    def __init__(self, step: Callable[[], None], mutable: Callable[[], list], warmup: int = 2,
                 rng=None, device=None, before_capture: Callable[[], None] | None = None):
        self.step = step
        self.mutable = mutable
        self.warmup = warmup
        self.rngs = [g for g in (rng if isinstance(rng, (list, tuple)) else [rng]) if g is not None]
        if device is None:
            device = self.rngs[0].device if self.rngs else torch.device("cuda", torch.cuda.current_device())
        self.device = torch.device(device)
        self.before_capture = before_capture
        self.graph = None
        self._warmed = False

    def _generators(self) -> list:
        """The generators a step may draw from: the private one and the device's default."""
        if self.device.type == "cuda":
            idx = self.device.index if self.device.index is not None else torch.cuda.current_device()
            gens = [torch.cuda.default_generators[idx]]
        else:
            gens = [torch.default_generator]
        for rng in self.rngs:
            if all(rng is not g for g in gens):
                gens.append(rng)
        return gens

    def warm_up(self) -> None:
        saved = {id(t): (t, t.detach().clone()) for t in self.mutable() if t is not None}
        rng_states = [(g, g.get_state()) for g in self._generators()]
        if self.device.type == "cuda":
            s = torch.cuda.Stream(self.device)
            s.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(s):
                for _ in range(self.warmup):
                    self.step()
            torch.cuda.current_stream(self.device).wait_stream(s)
        else:
            for _ in range(self.warmup):
                self.step()
        with torch.no_grad():
            for t, v in saved.values():
                t.copy_(v)
            # state created by the warm-up (optimizer moments) starts from zero like a fresh one
            for t in self.mutable():
                if t is not None and id(t) not in saved:
                    t.zero_()
        # the warm-up's random draws are undone too: the first replay draws what the first
        # eager step would have drawn
        for g, st in rng_states:
            g.set_state(st)
        self._warmed = True

    def capture(self) -> None:
        if not self._warmed:
            self.warm_up()
        if self.device.type != "cuda":
            return
        if self.before_capture is not None:
            self.before_capture()
        self.graph = torch.cuda.CUDAGraph()
        for rng in self._generators()[1:]:
            if rng.device.type == "cuda":  # a private generator advances its offset on every replay too
                self.graph.register_generator_state(rng)
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.step()

    def __call__(self):
        if not self._warmed:
            self.capture()
        if self.graph is None:
            self.step()  # not a CUDA device: eager (see the class docstring)
        else:
            self.graph.replay()

    def close(self) -> None:
        """Free the graph and its private memory pool (a later call captures again)."""
        if self.graph is not None:
            self.graph.reset()
            self.graph = None
        self._warmed = False
