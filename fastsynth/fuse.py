"""Fuse the BatchNorm-statistics loss into a teacher's own BatchNorm layers.

``fuse_teacher(teacher)`` replaces, IN PLACE in the module tree, every ``nn.BatchNorm2d`` (exact
type; subclasses are left alone) by a ``FusedBatchNorm2d`` that shares the original's parameters,
buffers and hooks (the very same tensors and dicts; state_dict keys are unchanged). In eval mode
a fused layer computes, in ONE pass over its input, the BatchNorm output and the per-channel
batch mean/biased variance of the input (fastsynth.ops.fused_bn), and its backward adds the
gradient of a loss computed from those statistics in the same single pass. It returns the
teacher itself (only a bare BatchNorm2d passed as ``teacher`` comes back as a new module).

ReLU fusion: where the teacher traces with ``torch.fx``, a ReLU (``nn.ReLU``, ``F.relu``,
``torch.relu``, ``.relu()``) that directly and solely consumes a BatchNorm output is folded into
that BatchNorm's pass (a residual ``relu(a + b)`` runs as the model writes it): the rewritten
graph becomes the teacher's eval-mode ``forward`` (an instance attribute; in train mode the class
forward runs unchanged). Modules carrying hooks are kept as leaves so their hooks still fire.

Call forms: the upstream DFKD classifiers define ``forward(self, x, return_features=False)`` with
an ``if return_features:`` branch, and their KD loops call the same teacher as ``model(x)`` and
``model(x, return_features=True)``. Both rewrites (``fuse_teacher``, ``fused_eval_view``) trace
each call form separately: tensor arguments are graph inputs, every other argument (defaults
included) is bound into the trace as a constant (``concrete_args``), so Python control flow on
those arguments is decided per form. Control flow on shapes (``if x.size(2) == 64``,
``int(x.size(1) * 0.5)``) is decided with the first input of each shape, and that form is traced
once per input shape. Control flow on tensor VALUES cannot be traced: that call form warns once
(the reason, with the model's file and line) and runs the model's own forward -- for a fused
teacher with its BatchNorm layers still fused (statistics in the same pass), for the view
unfused; the other forms keep their full fusion (``fusion_stats`` lists what each form reached).

Loss: after a forward, ``bn_statistics(teacher)`` returns the differentiable batch means and
variances of the last forward plus the running buffers, in module order, ready for
``fastsynth.ops.bn_stat_loss.loss_from_stats`` -- a plain tensor computation, so the whole step
can be compiled or captured in a CUDA graph (nothing is collected by a Python hook at replay).
``set_stats_enabled(teacher, False)`` turns the statistics off (e.g. for no-grad forwards while
training the student): then no statistics work is done. ``unfuse_teacher`` undoes everything.

Instance means: after ``set_instance_means_enabled(teacher, True)`` every fused layer also emits,
from the same pass, the per-sample channel means of its input (``x.mean(dim=(2, 3))``, [N, C],
differentiable) -- what CMI's ``InstanceMeanHook`` collects on each BatchNorm2d's input -- and
``instance_means(teacher)`` returns those of the last forward in module order.

A fused teacher deep-copies; with folded ReLUs its forward is generated code, so save its
state_dict (identical keys) rather than pickling the whole module.

A fused layer in train() mode behaves exactly like nn.BatchNorm2d in train mode (F.batch_norm,
running-stat updates); fusion targets eval-mode teachers.
"""
from __future__ import annotations

import inspect
import operator
import sys
import types
import warnings
import weakref

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .ops.fused_bn import fused_bn

__all__ = ["FusedBatchNorm2d", "fuse_teacher", "unfuse_teacher", "bn_statistics", "set_stats_enabled",
           "set_instance_means_enabled", "instance_means",
           "fused_layers", "fused_eval_view", "FusedEvalView", "fusion_stats", "refresh_folds", "ConvBNFold"]


class FusedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose eval-mode forward also returns the batch statistics of its input.

    ``forward(x, relu=False)``: ``relu=True`` applies a ReLU in the same pass (used by the
    ReLU-fused teacher graph). The statistics of the last forward are kept in ``last_mean`` /
    ``last_var`` (differentiable) while ``stats_enabled``, the per-sample channel means of the
    input in ``last_inst_mean`` ([N, C], differentiable) while ``inst_means_enabled``.
    """

    def __init__(self, *args, backend: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._fs_init(backend, original=None)

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, backend: str | None = None) -> "FusedBatchNorm2d":
        """A fused layer sharing ``bn``'s parameters, buffers and hooks (same objects)."""
        new = cls.__new__(cls)
        new.__dict__.update(bn.__dict__)  # the same _parameters/_buffers/hook dicts, not copies
        new._fs_init(backend, original=bn)
        return new

    def _fs_init(self, backend, original):
        self.backend = backend
        self.stats_enabled = True
        self.last_mean = None
        self.last_var = None
        self.inst_means_enabled = False
        self.last_inst_mean = None
        # the replaced module, kept out of the module tree (not a submodule, not in state_dict)
        self.__dict__["_fs_original"] = original

    def forward(self, input: torch.Tensor, relu: bool = False) -> torch.Tensor:
        if self.training or not self.track_running_stats or self.running_mean is None:
            # exactly nn.BatchNorm2d (train mode / batch statistics); stats computed separately
            out = super().forward(input)
            if self.stats_enabled:
                var, mean = torch.var_mean(input.to(torch.float64 if input.dtype == torch.float64 else torch.float32),
                                           dim=(0, 2, 3), correction=0)
                self.last_mean, self.last_var = mean, var
            if self.inst_means_enabled:
                self.last_inst_mean = input.to(torch.float64 if input.dtype == torch.float64
                                               else torch.float32).mean(dim=(2, 3))
            return F.relu(out) if relu else out
        self._check_input_dim(input)
        weight, bias = self.weight, self.bias
        if input.numel() == 0:
            # an empty batch runs as nn.BatchNorm2d runs it (an empty output); its statistics are
            # undefined, so none are recorded and bn_statistics() says so
            self.__dict__["_fs_empty_shape"] = tuple(input.shape)
            if self.stats_enabled:
                self.last_mean = self.last_var = None
            if self.inst_means_enabled:
                self.last_inst_mean = None
            out = F.batch_norm(input, self.running_mean, self.running_var, weight, bias, False, 0.0, self.eps)
            return F.relu(out) if relu else out
        self.__dict__["_fs_empty_shape"] = None
        if weight is None:
            weight = torch.ones_like(self.running_var)
            bias = torch.zeros_like(self.running_var)
        out = fused_bn(input, weight, bias, self.running_mean, self.running_var, self.eps, apply_relu=relu,
                       with_stats=self.stats_enabled, backend=self.backend,
                       with_instance_means=self.inst_means_enabled)
        if self.stats_enabled:
            self.last_mean, self.last_var = out[1], out[2]
        if self.inst_means_enabled:
            self.last_inst_mean = out[3]
        return out[0]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fused=True, stats_enabled={self.stats_enabled}"


# ---------------------------------------------------------------------------------------------
# eval BatchNorm folded into the convolution before it (student view)


def _stamp(t: torch.Tensor | None):
    """What identifies a source tensor's current values: the tensor itself by a weak reference
    (an ``id()`` is reused by the next tensor allocated at a freed one's address, and a strong
    reference would keep replaced weights alive), its version counter (in-place updates) and its
    storage (``t.data = ...``)."""
    return None if t is None else (weakref.ref(t), t._version, t.data_ptr())


def _stamp_matches(stamp, t: torch.Tensor | None) -> bool:
    if stamp is None or t is None:
        return stamp is None and t is None
    return stamp[0]() is t and stamp[1] == t._version and stamp[2] == t.data_ptr()


class ConvBNFold(nn.Module):
    """A convolution followed by an eval-mode BatchNorm as ONE convolution:

        scale = gamma / sqrt(running_var + eps)
        W'    = W * scale[o],   b' = (b - running_mean) * scale + beta      (b = 0 without a conv bias)

    so the BatchNorm's forward pass and its backward pass over the map disappear. The folded
    weight and bias are computed in float64 and kept in buffers of the conv weight's dtype; they
    are recomputed in place whenever a source tensor (conv weight/bias, gamma, beta, running
    statistics) was changed in place or replaced since the last fold (checked on every eager
    forward and by ``refresh()``; a compiled or captured forward reads the buffers as they are,
    so call ``refresh()`` before it). ``relu=True`` applies a ReLU in place on the conv output.
    The conv and BatchNorm are referenced, not owned (not submodules)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        super().__init__()
        self.__dict__["conv"] = conv
        self.__dict__["bn"] = bn
        self._key = None
        self.register_buffer("weight", None, persistent=False)
        self.register_buffer("bias", None, persistent=False)
        self.refresh()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_key"] = None  # weak references do not pickle: a copy re-folds at its first use
        return state

    def _sources(self):
        c, b = self.conv, self.bn
        return (c.weight, c.bias, b.weight, b.bias, b.running_mean, b.running_var)

    def refresh(self) -> bool:
        """Re-fold if any source changed; returns whether it did."""
        sources = self._sources()
        if self._key is not None and self._key[-1] == self.bn.eps and all(
                _stamp_matches(k, t) for k, t in zip(self._key, sources)):
            return False
        key = tuple(_stamp(t) for t in sources) + (self.bn.eps,)
        conv, bn = self.conv, self.bn
        with torch.no_grad():
            rv = bn.running_var.to(torch.float64)
            scale = torch.rsqrt(rv + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight.to(torch.float64)
            shift = -bn.running_mean.to(torch.float64)
            if conv.bias is not None:
                shift = shift + conv.bias.to(torch.float64)
            shift = shift * scale
            if bn.bias is not None:
                shift = shift + bn.bias.to(torch.float64)
            w = conv.weight.to(torch.float64) * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
            w, shift = w.to(conv.weight.dtype), shift.to(conv.weight.dtype)
            if self.weight is not None and self.weight.shape == w.shape and self.weight.dtype == w.dtype \
                    and self.weight.device == w.device:
                self.weight.copy_(w)  # in place: a captured graph keeps reading these buffers
                self.bias.copy_(shift)
            else:
                self.weight, self.bias = w.contiguous(), shift.contiguous()
        self._key = key
        return True

    def forward(self, input: torch.Tensor, relu: bool = False) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            self.refresh()
        y = self.conv._conv_forward(input, self.weight, self.bias)
        # in place: the convolution's backward needs its input and weight, not its output
        return torch.relu_(y) if relu else y


def _fold_conv_bns(graph: fx.Graph, modules: dict, root: dict, cache: dict | None = None) -> int:
    """Rewrite ``bn(conv(x))`` (exact nn.Conv2d / nn.BatchNorm2d, no hooks, the conv output used
    only by the BatchNorm) as one ``ConvBNFold`` call; the new modules go into ``root``.
    ``cache`` ((conv target, bn target) -> (target, fold)) shares one fold per pair between the
    graphs of several call forms."""
    folded = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or type(modules.get(node.target)) is not nn.BatchNorm2d:
            continue
        bn = modules[node.target]
        if bn._forward_hooks or bn._forward_pre_hooks or not bn.track_running_stats or bn.running_mean is None:
            continue
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            continue
        conv_node = node.args[0]
        conv = modules.get(conv_node.target) if conv_node.op == "call_module" else None
        if type(conv) is not nn.Conv2d or conv._forward_hooks or conv._forward_pre_hooks or len(conv_node.users) != 1:
            continue
        if conv.out_channels != bn.num_features:
            continue
        pair = (conv_node.target, node.target)
        if cache is not None and pair in cache:
            target, fold = cache[pair]
        else:
            target = f"{conv_node.target}__bn_folded"
            while target in root or target in modules:
                target += "_"
            fold = ConvBNFold(conv, bn)
            if cache is not None:
                cache[pair] = (target, fold)
        root[target] = fold
        with graph.inserting_before(node):
            new = graph.call_module(target, conv_node.args, conv_node.kwargs)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        graph.erase_node(conv_node)
        folded += 1
    return folded


# ---------------------------------------------------------------------------------------------
# which convolution runs: asked of the CPU room for CPU models only


def _lives_on_cpu(model: nn.Module) -> bool:
    """Whether ``model``'s parameters (or, without any, its buffers) are on the CPU."""
    t = next(model.parameters(), None)
    if t is None:
        t = next(model.buffers(), None)
    return t is None or t.device.type == "cpu"


def _cpu_min_hw(model: nn.Module, channels_last_min_hw) -> int | None:
    """The layout threshold of a CPU model (``fastsynth.cpu.resolve_min_hw``: "auto" is read
    now), or None for a model on another device, whose graphs never ask the CPU room."""
    if not _lives_on_cpu(model):
        return None
    from . import cpu

    return cpu.resolve_min_hw(channels_last_min_hw)


def _route_convs(graph: fx.Graph, module_of: dict, min_hw: int | None) -> tuple[int, int]:
    """(convolutions given layouts, convolutions routed): ``fastsynth.cpu.rewrite_convs`` on the
    graph of a CPU model; nothing for a model built on another device (``min_hw`` None)."""
    if min_hw is None:
        return 0, 0
    from . import cpu

    return cpu.rewrite_convs(graph, module_of, min_hw)


# ---------------------------------------------------------------------------------------------
# ReLU fusion through torch.fx

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, torch.nn.functional.relu)
_RELU_METHODS = ("relu", "relu_")


def _is_relu(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    if node.op == "call_method":
        return node.target in _RELU_METHODS
    return False


def _fold_bn_relus(graph: fx.Graph, module_of: dict, modules: dict) -> int:
    """Fold every ReLU that directly and solely consumes a FusedBatchNorm2d (or ConvBNFold) call of
    ``graph`` into that call (``relu=True``); returns how many were folded. ``module_of`` maps the graph's
    module targets to the modules it runs, ``modules`` the traced model's own (to recognise
    ``nn.ReLU``). A BatchNorm with forward hooks keeps its ReLU separate: the hook sees the BN
    output."""
    folded = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(module_of.get(node.target), (FusedBatchNorm2d, ConvBNFold)):
            continue
        bn = module_of[node.target]
        if node.kwargs.get("relu", False) or bn._forward_hooks or bn._forward_pre_hooks or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if not _is_relu(user, modules) or len(user.args) < 1 or user.args[0] is not node:
            continue
        if any(isinstance(a, fx.Node) for a in list(user.args[1:]) + list(user.kwargs.values())):
            continue
        node.kwargs = {**node.kwargs, "relu": True}
        user.replace_all_uses_with(node)
        graph.erase_node(user)
        folded += 1
    return folded


class _NeedsExample(Exception):
    """The trace needs a concrete value (a shape read by Python control flow) but no input was
    given yet: the call form is traced at its first call instead."""


class _DataDependent(fx.proxy.TraceError):
    """Python control flow (or an int()) on a value computed from tensor data."""


# reading these never looks at a tensor's values (only at its metadata)
_META_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement", "get_device", "is_contiguous",
                           "is_floating_point", "is_complex", "element_size"})
_META_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad", "is_sparse"})
# ops whose output SHAPE depends on the input values
_VALUE_SHAPED = frozenset({"nonzero", "masked_select", "unique", "unique_consecutive", "argwhere",
                           "repeat_interleave", "bincount"})


def _data_dependence(node: fx.Node) -> str | None:
    """Why a Python-level value computed by ``node`` depends on tensor values, or None when it
    depends only on tensor metadata (shapes, dtypes, devices) and constants. Walks the node's
    inputs: a metadata read switches to shape mode, in which only ops with value-dependent output
    shapes (nonzero, boolean/tensor indexing, ...) count."""
    stack, seen = [(node, False)], set()
    while stack:
        n, shape_only = stack.pop()
        if (n, shape_only) in seen:
            continue
        seen.add((n, shape_only))
        if n.op == "placeholder":
            if not shape_only:
                return f"the values of the input '{n.target}'"
            continue
        if n.op == "get_attr":
            if not shape_only:
                return f"the values of '{n.target}'"
            continue
        if n.op == "call_module":
            if not shape_only:
                return f"the output of module '{n.target}'"
            stack += [(a, True) for a in n.all_input_nodes]
            continue
        name = n.target if n.op == "call_method" else getattr(n.target, "__name__", str(n.target))
        meta = (n.op == "call_method" and n.target in _META_METHODS) or (
            n.op == "call_function" and n.target is getattr and len(n.args) > 1 and n.args[1] in _META_ATTRS)
        if meta:
            stack.append((n.args[0], True))
            for a in n.args[1:]:  # e.g. the dim of size(dim): its value matters
                if isinstance(a, fx.Node):
                    stack.append((a, False))
            continue
        if shape_only and name in _VALUE_SHAPED:
            return f"a shape that depends on tensor values ({name})"
        if shape_only and n.op == "call_function" and n.target is operator.getitem and len(n.args) > 1:
            index = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
            if any(isinstance(i, fx.Node) for i in index):
                return "a shape that depends on tensor values (indexing with a tensor)"
        stack += [(a, shape_only) for a in n.all_input_nodes]
    return None


def _user_frame() -> str:
    """``file:line`` of the innermost frame outside torch.fx and this module (the model's code)."""
    import traceback

    for f in reversed(traceback.extract_stack()):
        name = f.filename.replace("\\", "/")
        if "/torch/" not in name and not name.endswith("fastsynth/fuse.py"):
            return f"{f.filename}:{f.lineno} ({(f.line or '').strip()})"
    return "?"


class _ValueProxy(fx.Proxy):
    """A proxy that becomes a concrete Python number when ``int()``/``float()``/an index needs one
    (allowed only for values computed from shapes; see ``_FormTracer._concrete``)."""

    def __int__(self):
        return int(self.tracer._concrete(self, "int()"))

    def __index__(self):
        return operator.index(self.tracer._concrete(self, "an index"))

    def __float__(self):
        return float(self.tracer._concrete(self, "float()"))


class _FormTracer(fx.Tracer):
    """torch.fx tracer of one call form of a model (extra arguments bound to constants through
    ``concrete_args``). FusedBatchNorm2d layers and modules carrying hooks stay leaf calls (the
    hooks still fire). Python control flow on a value computed from shapes only (``if
    x.shape[2] == 64``, ``int(x.size(1) * ratio)``) is decided with the shapes of the example
    input: the graph is then specialised (``specialized``) and valid for inputs of those shapes,
    dtypes and devices only. Control flow on tensor values raises ``_DataDependent``."""

    def __init__(self, params: list, example: dict | None):
        super().__init__()
        self.params = params          # the forward's parameter names, in order (without self)
        self.example = example        # name -> value of the call being traced, or None
        self.specialized = False
        self._evaluating = False
        self._env: dict = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, FusedBatchNorm2d):
            return True
        if qualname and (m._forward_hooks or m._forward_pre_hooks):
            return True  # keep hooked modules as calls so their hooks still fire
        return super().is_leaf_module(m, qualname)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self._concrete(obj, "a Python branch (if/while/and/or)"))

    # while evaluating a partial graph on the example input, modules and attributes run for real
    def call_module(self, m, forward, args, kwargs):
        if self._evaluating:
            return m.forward(*args, **kwargs)  # no hooks: this run is not the user's forward
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def _concrete(self, proxy: fx.Proxy, what: str):
        reason = _data_dependence(proxy.node)
        if reason is not None:
            raise _DataDependent(f"{what} on {reason} at {_user_frame()}")
        if self.example is None:
            raise _NeedsExample()
        self.specialized = True
        return self._evaluate(proxy.node)

    def _evaluate(self, target: fx.Node):
        """The value of ``target`` on the example input: the graph traced so far runs once, for
        real and without gradients, on a copy of the input (values already computed are kept)."""
        env = self._env
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]

        def load(a):
            return fx.node.map_arg(a, lambda n: env[n])

        self._evaluating = True
        try:
            with torch.no_grad():
                for node in self.graph.nodes:
                    if node not in env:
                        if node.op == "placeholder":
                            v = self.example[self.params[placeholders.index(node)]]
                            env[node] = v.detach().clone() if isinstance(v, torch.Tensor) else v
                        elif node.op == "get_attr":
                            env[node] = _attr(self.root, node.target)
                        elif node.op == "call_function":
                            env[node] = node.target(*load(node.args), **load(node.kwargs))
                        elif node.op == "call_method":
                            obj, *rest = load(node.args)
                            env[node] = getattr(obj, node.target)(*rest, **load(node.kwargs))
                        elif node.op == "call_module":
                            env[node] = self.root.get_submodule(node.target).forward(*load(node.args),
                                                                                   **load(node.kwargs))
                        else:
                            continue
                    if node is target:
                        break
        finally:
            self._evaluating = False
        return env[target]


def _is_constant(v) -> bool:
    """Arguments a call form binds into its trace (hashable Python constants)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    return isinstance(v, tuple) and all(_is_constant(e) for e in v)


_DECLINED = object()


class _FormDispatch:
    """Runs a rewritten graph per call form of ``model``'s forward.

    A call form is what the extra arguments are bound to: ``model(x)`` and
    ``model(x, return_features=True)`` are two forms; tensors are graph inputs, every other
    argument (bool/int/float/str/None, tuples of them; defaults where not passed) is bound into
    the trace through ``concrete_args``, so ``if return_features:`` is decided at trace time.
    Each form is traced once, at ``prime()`` for the default form or at its first call; a form
    whose trace read input shapes (``_FormTracer.specialized``) is traced once per input
    shape/dtype/device. ``build(graph, label)`` rewrites a traced graph and returns
    ``(callable(*arguments in signature order), stats)``; a form that cannot be traced warns once
    (``who`` names the caller, ``fallback`` says what still runs fused) and runs ``eager``."""

    MAX_SPECIALIZED = 16

    def __init__(self, model: nn.Module, build, eager, who: str, fallback: str):
        self.model = model
        self.build, self.eager, self.who, self.fallback = build, eager, who, fallback
        params = list(inspect.signature(type(model).forward).parameters.values())[1:]
        self.params = params
        self.names = [p.name for p in params]
        self.forms: dict = {}   # form key -> (fn, stats) | {shape key: (fn, stats)} | _DECLINED
        self.labels: dict = {}  # form key -> readable call form
        self.warned: set = set()
        # model(x): the common call, resolved without inspect
        self._default = None
        if params and params[0].kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) \
                and all(p.default is not inspect.Parameter.empty and _is_constant(p.default)
                        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params[1:]):
            consts = tuple((p.name, type(p.default), p.default) for p in params[1:])
            self._default = ((params[0].name,), consts)

    # -- call forms
    def _bind(self, args, kwargs):
        """(form key, values in signature order, example dict) or (None, reason, None)."""
        if self._default is not None and not kwargs and len(args) == 1 and isinstance(args[0], torch.Tensor):
            values = (args[0],) + tuple(c[2] for c in self._default[1])
            return self._default, values, None
        try:
            bound = inspect.signature(type(self.model).forward).bind(self.model, *args, **kwargs)
        except TypeError:
            return None, None, None  # the model's own forward raises its own TypeError
        tensors, consts, values = [], [], []
        for p in self.params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                if bound.arguments.get(p.name):
                    return None, f"*{p.name} arguments are not traced", None
                continue
            v = bound.arguments.get(p.name, p.default)
            if v is inspect.Parameter.empty:
                return None, f"argument '{p.name}' is missing", None
            if isinstance(v, torch.Tensor):
                tensors.append(p.name)
            elif _is_constant(v):
                consts.append((p.name, type(v), v))
            else:
                return None, f"argument '{p.name}' is a {type(v).__name__} (tensors and constants are traced)", None
            values.append(v)
        return (tuple(tensors), tuple(consts)), tuple(values), None

    @staticmethod
    def _label(key) -> str:
        return ", ".join(list(key[0]) + [f"{n}={v!r}" for n, _, v in key[1]])

    def _warn(self, key, reason: str) -> None:
        if key in self.warned:
            return
        self.warned.add(key)
        name = type(self.model).__name__
        form = self._label(key) if isinstance(key[0], tuple) else key[0]
        warnings.warn(f"{self.who}: {name}.forward({form}) cannot be traced by torch.fx ({reason}); this call "
                      f"form runs {self.fallback}", RuntimeWarning, stacklevel=4)

    def _trace(self, key, values, example: bool):
        consts = {n: v for n, _, v in key[1]}
        ex = dict(zip([n for n in self.names if n in key[0] or n in consts], values)) if example else None
        tracer = _FormTracer([n for n in self.names if n in key[0] or n in consts], ex)
        was_training = self.model.training
        self.model.eval()
        try:
            graph = tracer.trace(self.model, concrete_args=consts or None)
        finally:
            self.model.train(was_training)
        return graph, tracer.specialized

    def _resolve(self, key, values, example: bool):
        """Trace and rewrite the form ``key``; returns its entry (or raises _NeedsExample)."""
        try:
            graph, specialized = self._trace(key, values, example)
        except _NeedsExample:
            raise
        except Exception as exc:  # data-dependent control flow and other untraceable code
            self.forms[key] = _DECLINED
            self._warn(key, f"{type(exc).__name__}: {exc}")
            return _DECLINED
        label = self._label(key)
        if specialized:
            label += " @ " + ", ".join(str(tuple(v.shape)) for v in values if isinstance(v, torch.Tensor))
        entry = self.build(graph, label)
        self.labels[key] = self._label(key)
        if specialized:
            shapes = self.forms.setdefault(key, {})
            if not isinstance(shapes, dict):
                shapes = self.forms[key] = {}
            if len(shapes) >= self.MAX_SPECIALIZED:
                shapes.pop(next(iter(shapes)))
            shapes[self._shape_key(values)] = entry
        else:
            self.forms[key] = entry
        return entry

    @staticmethod
    def _shape_key(values):
        return tuple((v.shape, v.dtype, v.device) for v in values if isinstance(v, torch.Tensor))

    def prime(self) -> None:
        """Trace the default form ``model(x)`` now when it needs no example input."""
        if self._default is None:
            return
        values = (None,) + tuple(c[2] for c in self._default[1])
        try:
            self._resolve(self._default, values, example=False)
        except _NeedsExample:
            pass  # traced at the first call, with that call's shapes

    def __call__(self, args, kwargs):
        key, values, _ = self._bind(args, kwargs)
        if key is None:  # ``values`` holds the reason (None: a call the signature rejects, no warning)
            if values is not None:
                self._warn(("unsupported arguments", values), values)
            return self.eager(*args, **kwargs)
        entry = self.forms.get(key)
        if isinstance(entry, dict):
            entry = entry.get(self._shape_key(values))
            if entry is None:
                entry = self._resolve(key, values, example=True)
        elif entry is None:
            try:
                entry = self._resolve(key, values, example=False)
            except _NeedsExample:
                entry = self._resolve(key, values, example=True)
        if entry is _DECLINED:
            return self.eager(*args, **kwargs)
        return entry[0](*values)

    def stats(self) -> dict:
        """{call form (with input shape when specialised): fusion counts} of every traced form."""
        out = {}
        for key, entry in self.forms.items():
            label = self._label(key)
            if entry is _DECLINED:
                out[label] = None
            elif isinstance(entry, dict):
                for shape_key, e in entry.items():
                    out[label + " @ " + ", ".join(str(tuple(s[0])) for s in shape_key)] = dict(e[1])
            else:
                out[label] = dict(entry[1])
        return out


def _teacher_build(teacher: nn.Module, min_hw: int | None):
    def build(graph: fx.Graph, label: str):
        modules = dict(teacher.named_modules())
        stats = {"bn_relu": _fold_bn_relus(graph, modules, modules)}
        stats["conv_layouts"], stats["conv_routed"] = _route_convs(graph, modules, min_hw)
        stats["fused_bn"] = sum(1 for n in graph.nodes if n.op == "call_module"
                                and isinstance(modules.get(n.target), FusedBatchNorm2d))
        graph.lint()
        traced_forward = type(fx.GraphModule(teacher, graph)).forward  # generated code, resolves self.<path>
        return (lambda *values: traced_forward(teacher, *values)), stats
    return build


def _fuse_relus(teacher: nn.Module, min_hw: int | None = None) -> int:
    """Install the fused eval-mode forward on ``teacher``: per call form (``_FormDispatch``), the
    traced graph with BN->ReLU pairs folded and,
    for a CPU model (``min_hw`` not None), each convolution routed by ``fastsynth.cpu``
    (``_route_convs``). Train mode runs the class forward. Returns the number of BN ReLUs folded in the default form (0 when that form
    is traced at its first call)."""
    cls_forward = type(teacher).forward
    dispatch = _FormDispatch(teacher, _teacher_build(teacher, min_hw),
                             eager=lambda *a, **k: cls_forward(teacher, *a, **k), who="fuse_teacher",
                             fallback="the model's own forward with its BatchNorm layers fused (statistics in "
                                      "the same pass), without ReLU folding or convolution layouts")
    dispatch.prime()

    def forward(self, *args, **kwargs):
        if self.training:  # train mode: the model's own forward, untouched
            return type(self).forward(self, *args, **kwargs)
        return dispatch(args, kwargs)

    bound = types.MethodType(forward, teacher)
    teacher.__dict__["forward"] = bound
    teacher.__dict__["_fs_fused_forward"] = bound
    teacher.__dict__["_fs_dispatch"] = dispatch
    first = dispatch.forms.get(dispatch._default)
    stats = first[1] if isinstance(first, tuple) else {}
    teacher.__dict__["_fs_relus_folded"] = stats.get("bn_relu", 0)
    teacher.__dict__["_fs_conv_layouts"] = stats.get("conv_layouts", 0)
    teacher.__dict__["_fs_conv_routed"] = stats.get("conv_routed", 0)
    return stats.get("bn_relu", 0)


# ---------------------------------------------------------------------------------------------
# public API


def fuse_teacher(teacher: nn.Module, backend: str | None = None, fuse_relu: bool = True,
                 channels_last_min_hw: int | str | None = "auto") -> nn.Module:
    """Fuse the BatchNorm-statistics loss into ``teacher``'s BatchNorm2d layers (in place).

    ``backend``: the fused op's backend (None: chosen by device). ``fuse_relu``: fold ReLUs that
    solely consume a BatchNorm output into it, per call form (module docstring: call forms; a form that cannot be traced warns once and keeps
    BN-only fusion). ``channels_last_min_hw``: with ``fuse_relu``, for a teacher on the CPU,
    convolution inputs of at least this many pixels run channels_last, smaller ones NCHW
    (``fastsynth.cpu.conv_input_layout``; "auto": ``fastsynth.cpu.config.channels_last_min_hw``;
    None or 0: layouts as the model makes them; ignored on other devices).
    Returns ``teacher`` (a new module only when ``teacher`` itself is a bare BatchNorm2d).
    """
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
    if fused_layers(teacher):
        raise ValueError("teacher is already fused (call unfuse_teacher first)")
    if type(teacher) is nn.BatchNorm2d:
        return FusedBatchNorm2d.from_batchnorm(teacher, backend)
    replaced: dict[int, FusedBatchNorm2d] = {}  # a BatchNorm shared by several parents stays shared
    for parent in list(teacher.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                if id(child) not in replaced:
                    replaced[id(child)] = FusedBatchNorm2d.from_batchnorm(child, backend)
                setattr(parent, name, replaced[id(child)])
    if fuse_relu and replaced:
        _fuse_relus(teacher, _cpu_min_hw(teacher, channels_last_min_hw))
    return teacher


def unfuse_teacher(teacher: nn.Module) -> nn.Module:
    """Undo ``fuse_teacher``: the original BatchNorm2d objects and forward come back."""
    if isinstance(teacher, FusedBatchNorm2d):
        original = teacher.__dict__.get("_fs_original")
        if original is None:
            raise ValueError("this FusedBatchNorm2d was not made by fuse_teacher")
        original.train(teacher.training)
        return original
    if "_fs_fused_forward" in teacher.__dict__:
        if teacher.__dict__.get("forward") is teacher.__dict__["_fs_fused_forward"]:
            del teacher.__dict__["forward"]
        del teacher.__dict__["_fs_fused_forward"]
        teacher.__dict__.pop("_fs_dispatch", None)
        teacher.__dict__.pop("_fs_relus_folded", None)
        teacher.__dict__.pop("_fs_conv_layouts", None)
        teacher.__dict__.pop("_fs_conv_routed", None)
    cpu = sys.modules.get("fastsynth.cpu")  # never imported: it cached nothing
    if cpu is not None:
        cpu.forget(teacher)  # its per-convolution copies of the weights (Winograd transforms)
    for parent in list(teacher.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FusedBatchNorm2d) and child.__dict__.get("_fs_original") is not None:
                original = child.__dict__["_fs_original"]
                original.training = child.training
                setattr(parent, name, original)
    return teacher


def fused_layers(teacher: nn.Module) -> list:
    """The FusedBatchNorm2d layers of ``teacher`` in module order."""
    return [m for m in teacher.modules() if isinstance(m, FusedBatchNorm2d)]


def set_stats_enabled(teacher: nn.Module, enabled: bool) -> None:
    """Turn the batch statistics of every fused layer on or off (off: no statistics work at all,
    and the statistics of earlier forwards are dropped)."""
    for m in fused_layers(teacher):
        m.stats_enabled = bool(enabled)
        if not enabled:
            m.last_mean = m.last_var = None


def set_instance_means_enabled(teacher: nn.Module, enabled: bool) -> None:
    """Turn the per-sample channel means of every fused layer's input on or off (on: each fused
    pass also returns them, see ``instance_means``; off: no such work, earlier ones dropped)."""
    for m in fused_layers(teacher):
        m.inst_means_enabled = bool(enabled)
        if not enabled:
            m.last_inst_mean = None


def instance_means(teacher: nn.Module) -> list:
    """The per-sample channel means ``x.mean(dim=(2, 3))`` ([N, C], fp32 for fp16/bf16 maps,
    differentiable w.r.t. the input) of every fused BatchNorm layer's input in the LAST forward,
    in module order: what an ``InstanceMeanHook`` on each BatchNorm2d collects (CMI with
    ``feature_layers=None``), computed by the BatchNorm's own pass."""
    layers = fused_layers(teacher)
    if not layers:
        raise ValueError("instance_means: teacher has no fused BatchNorm layers (call fuse_teacher first)")
    out = []
    for m in layers:
        empty = m.__dict__.get("_fs_empty_shape")
        if m.last_inst_mean is None and empty is not None:
            raise ValueError(f"instance_means: the last forward had an empty batch (input shape {empty} at a "
                             "BatchNorm layer)")
        if m.last_inst_mean is None:
            raise RuntimeError("instance_means: none recorded; run a forward after "
                               "set_instance_means_enabled(teacher, True)")
        out.append(m.last_inst_mean)
    return out


def bn_statistics(teacher: nn.Module):
    """``(means, vars, running_means, running_vars)``: lists in module order with the batch
    statistics of the LAST forward (differentiable w.r.t. the input) and the running buffers."""
    layers = fused_layers(teacher)
    if not layers:
        raise ValueError("bn_statistics: teacher has no fused BatchNorm layers (call fuse_teacher first)")
    means, variances, rms, rvs = [], [], [], []
    for m in layers:
        empty = m.__dict__.get("_fs_empty_shape")
        if m.last_mean is None and empty is not None:
            raise ValueError(f"bn_statistics: the last forward had an empty batch (input shape {empty} at a "
                             "BatchNorm layer); the BatchNorm-statistics loss needs N*H*W > 0 "
                             "(as fastsynth.ops.bn_stat_loss does)")
        if m.last_mean is None:
            raise RuntimeError("bn_statistics: no statistics recorded; run a forward with statistics enabled "
                               "(set_stats_enabled(teacher, True)) first")
        means.append(m.last_mean)
        variances.append(m.last_var)
        rms.append(m.running_mean)
        rvs.append(m.running_var)
    return means, variances, rms, rvs


def _attr(root: nn.Module, target: str):
    for part in target.split("."):
        root = getattr(root, part)
    return root


class FusedEvalView(nn.Module):
    """What ``fused_eval_view`` returns: ``view(*args, **kwargs)`` runs the rewritten graph of the
    call form (``_FormDispatch``), e.g. ``view(x)`` and ``view(x, return_features=True)``.
    ``parts`` holds every module the graphs run (the model's own modules, the ``ConvBNFold``
    folds and the statistics-free ``FusedBatchNorm2d`` copies), so ``view.modules()`` reaches
    them (``refresh_folds``, ``fastsynth.cpu.prepare_winograd``). ``graph`` is the graph of
    ``view(x)`` (None until traced when it is traced at the first call)."""

    def __init__(self, model: nn.Module, backend, fold_conv_bn: bool, min_hw: int | None):
        super().__init__()
        self.parts = nn.Module()
        self.__dict__["_fs_model"] = model
        self.__dict__["_fs_folds"] = {}   # (conv target, bn target) -> (target, ConvBNFold)
        self.__dict__["_fs_fused"] = {}   # id(bn) -> FusedBatchNorm2d copy
        self.__dict__["_fs_backend"] = backend
        self.__dict__["_fs_fold_conv_bn"] = fold_conv_bn
        self.__dict__["_fs_min_hw"] = min_hw  # None: not a CPU model, convolutions run as traced
        self.__dict__["_fs_dispatch"] = _FormDispatch(
            model, self._build, eager=model.forward, who="fused_eval_view",
            fallback="the model's own forward, unfused (no conv+BN folding or ReLU folding)")
        self.training = False

    def _register(self, module: nn.Module, target: str) -> None:
        if any(m is module for m in self.parts.children()):
            return
        name = target.replace(".", "_") or "root"
        while name in self.parts._modules:
            name += "_"
        self.parts.add_module(name, module)

    def _build(self, graph: fx.Graph, label: str):
        model = self._fs_model
        modules = dict(model.named_modules())
        root: dict = {}
        folds = _fold_conv_bns(graph, modules, root, self._fs_folds) if self._fs_fold_conv_bn else 0
        fused = self._fs_fused
        n_fused = 0
        for node in graph.nodes:
            if node.op == "call_module":
                if isinstance(root.get(node.target), ConvBNFold):  # a fold made above
                    self._register(root[node.target], node.target)
                    continue
                m = modules[node.target]
                if type(m) is nn.BatchNorm2d:
                    if id(m) not in fused:
                        f = FusedBatchNorm2d.from_batchnorm(m, self._fs_backend)
                        f.__dict__["training"] = False  # its own flag: always the eval formula
                        f.stats_enabled = False
                        fused[id(m)] = f
                    m = fused[id(m)]
                    n_fused += 1
                root[node.target] = m
                self._register(m, node.target)
            elif node.op == "get_attr":
                root[node.target] = _attr(model, node.target)
        stats = {"conv_bn_fold": folds, "fused_bn": n_fused,
                 "bn_relu": _fold_bn_relus(graph, root, modules)}
        stats["conv_layouts"], stats["conv_routed"] = _route_convs(graph, root, self._fs_min_hw)
        graph.lint()
        gm = fx.GraphModule(root, graph)
        gm.__dict__["training"] = False
        return gm, stats

    @property
    def graph(self):
        entry = self._fs_dispatch.forms.get(self._fs_dispatch._default)
        if isinstance(entry, dict) and entry:
            entry = next(reversed(entry.values()))
        return entry[0].graph if isinstance(entry, tuple) else None

    def forward(self, *args, **kwargs):
        return self._fs_dispatch(args, kwargs)


def fused_eval_view(model: nn.Module, backend: str | None = None, fold_conv_bn: bool = True,
                    channels_last_min_hw: int | str | None = "auto"):
    """A module computing ``model``'s eval-mode forward with fewer passes over the feature maps:

    - ``fold_conv_bn``: a BatchNorm2d whose input is a Conv2d used by nothing else is folded into
      that convolution (``ConvBNFold``: one convolution with folded weight and bias; its BN
      forward and backward passes disappear);
    - every other ``nn.BatchNorm2d`` runs through ``fused_bn`` without statistics -- one op per
      BN+ReLU pair forward and one backward, where eval BatchNorm + ReLU dispatch five forward
      (empty, native_batch_norm, relu, and a detach saving the ReLU output) and three backward ops;
    - a ReLU that directly and solely consumes either is folded into it;
    - on the CPU, each convolution runs as ``fastsynth.cpu`` routes it (Winograd for frozen 3x3
      weights with enough channels; ``channels_last_min_hw``: inputs of at least this many
      pixels channels_last, smaller ones NCHW; "auto": ``fastsynth.cpu.config.channels_last_min_hw``;
      None or 0: as the model makes them; ignored on other devices).

    Every call form gets these rewrites (module docstring: call forms): ``view(x)`` and
    ``view(x, return_features=True)`` on an upstream classifier are two traced graphs.

    ``model`` is not changed: the view (``FusedEvalView``) runs ``torch.fx`` graphs over the SAME
    submodules, parameters and buffers, with a ``FusedBatchNorm2d`` per unfolded BatchNorm that
    shares the original's parameter/buffer/hook dicts, and folds that re-fold when a source tensor
    changes (weights trained later are seen; ``refresh_folds(view)`` before a compiled or captured
    forward). The view is for eval-mode forwards only (its BN layers always run the eval
    formula); a module with forward hooks is neither folded nor has its ReLU folded (the hook
    sees what it saw). Returns None when ``model`` has no BatchNorm2d (nothing to fold), and,
    with a RuntimeWarning giving the reason, when ``model(x)`` cannot be traced (control flow on
    tensor values); a call form that alone cannot be traced runs the model itself, with a
    warning.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not any(type(m) is nn.BatchNorm2d for m in model.modules()):
        return None
    view = FusedEvalView(model, backend, fold_conv_bn, _cpu_min_hw(model, channels_last_min_hw))
    dispatch = view._fs_dispatch
    dispatch.prime()
    entry = dispatch.forms.get(dispatch._default)
    if entry is _DECLINED:
        return None  # warned by the dispatch, with the reason
    if isinstance(entry, tuple) and entry[1]["conv_bn_fold"] == 0 and entry[1]["fused_bn"] == 0:
        warnings.warn(f"fused_eval_view: {type(model).__name__}.forward(x) runs no BatchNorm2d outside modules "
                      "with hooks (hooked modules run as written); nothing to fold, the model runs itself",
                      RuntimeWarning, stacklevel=2)
        return None
    return view


def fusion_stats(model: nn.Module) -> dict:
    """What the fused forwards of a ``fuse_teacher``'d model or a ``fused_eval_view`` contain,
    per traced call form: ``{form: {"fused_bn": BatchNorm calls running fused_bn, "conv_bn_fold":
    convolution+BN folds (view only), "bn_relu": ReLUs folded into them, "conv_layouts",
    "conv_routed"}}``; a form that could not be traced maps to None. A form
    traced per input shape is listed once per shape (``"x @ (64, 3, 32, 32)"``)."""
    dispatch = model.__dict__.get("_fs_dispatch")
    if dispatch is None:
        raise ValueError(f"fusion_stats: {type(model).__name__} is neither a fused teacher (fuse_teacher with "
                         "fuse_relu=True) nor a fused_eval_view")
    return dispatch.stats()


def refresh_folds(view: nn.Module) -> int:
    """Re-fold every ``ConvBNFold`` of ``view`` whose sources changed; returns how many did."""
    return sum(m.refresh() for m in view.modules() if isinstance(m, ConvBNFold))
