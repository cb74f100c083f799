"""Contrastive model inversion (CMI) of zju-vipa/CMI and zju-vipa/Fast-Datafree
(``CMISynthesizer``, with ``MLPHead``, ``MultiTransform``, ``MemoryBank`` and
``InstanceMeanHook``).

One synthesize() call draws z ~ N(0, I) [synthesis_batch_size, nz] (leaf, optimised), re-initialises
the generator (unless ``feature_reuse``) and runs ``iterations`` steps of Adam(lr_g, betas
(0.5, 0.999)) over the generator's parameters and z, together with Adam(lr_g) over the projection
head, minimising

    bn * L_BN(teacher on g) + oh * CE(t, y) + adv * (-mean_i m_i KL(p_t,i || p_s,i))
      + cr * L_cr

with x = generator(z), g = global view of x (random crop, padding 4, + flip, normalised),
l = local view (random resized crop, scale [0.25, 1], + flip, normalised), t = teacher(g),
s = student(g) (only when adv > 0), m_i = [argmax s_i = argmax t_i], and the contrastive term
over the current batch and n_neg entries of the memory bank::

    f_g, f_l   = per-instance channel means of the hooked teacher inputs on g and on l, side by side
    (c_l, c_g) = n_neg bank rows (the [f_l, f_g] of earlier rounds' best batches)
    q = head([f_l; c_l]),  k = head([f_g; c_g]).detach()            (MLPHead: L2-normalised)
    L_cr = CE over the rows of q k^T / cr_T against the diagonal, the batch rows and the bank rows
           averaged separately and summed (one mean over the batch while the bank is empty)

The images and features of the lowest-loss step are kept; the images go to the pool, their
features [f_l, f_g] into the bank. Returns ``({"synthetic": images}, seconds)`` (zju-vipa/CMI's
harness reads a bare dict: ``fastsynth.patch`` adapts).

Hooked inputs: ``feature_layers=None`` hooks every BatchNorm2d's input (as both upstreams; their
comment says "all conv layers": the BN input is the convolution's output), else the inputs of
the given modules (the scripts pass ResNet-34's ``layer1..layer4``). A given module's input is
taken where the very same tensor enters a convolution inside it (a residual stage's first
block), so the stage itself is traced through by the fused teacher and its blocks run fused
(``_input_taps``; a hooked module stays a call, unfused inside). With ``feature_layers=None`` and
a fused teacher the means come from the fused BatchNorm passes themselves, which read exactly
those maps (``fuse.instance_means``: no second read, the gradient added inside their backward);
otherwise the hooks keep a reference to the input and all means of one forward come from one
``instance_mean_multi`` call. The global view's means are taken without a graph: only the
detached key side and the bank read them.

What changes against upstream (results equal to float rounding):
- L_BN from the fused teacher (statistics inside its BatchNorm passes, all layers in one loss
  op), only on the global forward (upstream's hooks compute it on the local forward too and
  discard it); teacher and student parameters get no gradients;
- the contrastive term is one fused op (``fastsynth.ops.contrastive_ce``: no (N+N')^2 matrix,
  the key side's head forward under no_grad since its output is detached anyway);
- CE + masked KL through the fused logit-loss op;
- the memory bank is a ring buffer on the device (upstream: on the CPU, copied to the device
  every step) with its fill count on the device too, and is sampled there with a fixed-shape
  draw (``MemoryBank``; upstream: Python ``random.sample``). When the bank has just filled
  (``n_updates == max_size``) upstream's ``get_data`` returns no rows (its pointer wrapped to 0)
  and the bank half of L_cr is the mean of nothing (NaN); here the full bank is used. A batch
  that does not divide the bank wraps around it (upstream fails on the shape);
- best-image tracking on the device (no ``.item()`` per step); the local-view augmentation is
  one batched ``grid_sample``; with ``cr == 0`` no local forward and no bank update (upstream:
  a NameError in Fast-Datafree, the term computed and multiplied by 0 in zju-vipa/CMI);
- the local view's forward stops once the last hooked input is in (its logits are discarded;
  with ``layer1..layer4`` nothing of ``layer4`` onwards runs), when every hooked module runs once
  per forward and the step is not being compiled;
- z and the Adam over the generator and z are built once and re-used: z redrawn in place, the
  Adam state zeroed in one op (exactly a fresh Adam), one parameter group (upstream: two with
  the same settings).

fastsynth keywords (keyword-only, after the upstream ones): ``augment`` (False: both views are
the normalised images, as equivalence tests use), ``pool_capacity``/``pool_eviction``,
``save_images``/``save_format``, ``fuse_teacher``, ``seed`` (private RNG for z, the generator
re-initialisation, the augmentation and the bank sampling), ``compile`` (torch.compile of the
step's forward and loss), ``cuda_graph``, ``num_workers`` (accepted and ignored).

The inner steps run on ``SynthCore._run_steps``. ``cuda_graph=True`` (CUDA, one process):
once the bank holds more than ``n_neg`` rows (or is full), the whole inner step (bank draw,
augmentation codes, both forwards, the loss, best tracking into static buffers, the backward,
both Adam steps, capturable) is captured once and replayed every step of every later call; its
random draws come from the private generator registered with the graph, so a graph run equals
an eager run with the same seed. Before that (no bank rows, then all of the at most n_neg
filled rows: the row count changes every call) the steps run eagerly. The generator's
re-initialisation, z, the labels and the bank update run between the calls, in place into the
captured step's buffers. A change of bn/oh/adv/cr/cr_T, n_neg or a learning rate captures
again.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.contrastive_loss import contrastive_ce, instance_mean_multi
from .. import fuse
from ..distributed import unwrap
from .core import SynthCore, assign_grads, make_adam, now, nvtx_range
from .validate import check_synthesizer_args

__all__ = ["CMISynthesizer", "CMISynthesizerCMI", "MLPHead", "MultiTransform", "MemoryBank", "InstanceMeanHook",
           "reset_model", "resized_crop_flip"]


class MLPHead(nn.Module):
    """Upstream's projection head: Linear(dim_in, dim_h) - ReLU - Linear(dim_h, dim_feat), output
    L2-normalised per row (the same module names, so state_dicts load either way)."""

    def __init__(self, dim_in, dim_feat, dim_h=None):
        super().__init__()
        if dim_h is None:
            dim_h = dim_in
        self.head = nn.Sequential(
            nn.Linear(dim_in, dim_h),
            nn.ReLU(inplace=True),
            nn.Linear(dim_h, dim_feat),
        )

    def forward(self, x):
        return F.normalize(self.head(x), dim=1, p=2)


class MultiTransform:
    """Applies each transform of a list to the same input: ``[t(x) for t in transform]``."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, x):
        return [t(x) for t in self.transform]

    def __repr__(self):
        return str(self.transform)


class MemoryBank:
    """A ring buffer of feature rows on ``device`` (upstream's ``MemoryBank(device, max_size,
    dim_feat)``: ``data``, ``add``, ``get_data``, ``n_updates``).

    ``add(feat)`` writes the rows at the write pointer, in place, wrapping around. The pointer
    and the fill count are Python integers advanced by the known batch sizes (nothing reads the
    device: no host sync); ``n_filled`` holds the fill count on the device too, for draws that a
    captured step replays while the bank fills further.

    ``get_data(k)`` returns ``(rows, index)``: every filled row (the first ``filled`` rows, in
    order) while at most k are filled, as upstream's ``min(k, filled)``; else k distinct filled
    rows drawn on the device (upstream: ``random.sample``) with a fixed-shape draw: ``max_size``
    uniform keys, those of unfilled rows set to +inf (against ``n_filled``), the k smallest. Its
    shapes and ops depend on k and ``max_size`` only, not on the fill level, so the rows of
    ``get_data(k)`` have their final form once ``settled(k)``. ``generator``: a private RNG for
    the sampling."""

    def __init__(self, device, max_size=4096, dim_feat=512, *, generator=None):
        for name, v in (("max_size", max_size), ("dim_feat", dim_feat)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MemoryBank: {name} must be a positive int, got {v!r}")
        self.device = torch.device(device)
        # upstream fills the bank with N(0, 1) rows; they are never read before being written
        # (drawn from the global RNG as upstream, leaving ``generator`` to the sampling)
        self.data = torch.randn(max_size, dim_feat).to(self.device)
        self.n_filled = torch.zeros((), dtype=torch.long, device=self.device)
        self._rows = None  # arange(max_size) on the device, for the draw's mask (built once)
        self._ptr = 0
        self.n_updates = 0
        self.max_size = max_size
        self.dim_feat = dim_feat
        self.generator = generator

    @property
    def filled(self) -> int:
        """Rows holding features (a Python int)."""
        return min(self.n_updates, self.max_size)

    def add(self, feat):
        if not torch.is_tensor(feat) or feat.dim() != 2:
            raise ValueError(f"MemoryBank.add: feat must be a 2-D tensor [n, dim_feat={self.dim_feat}], got "
                             f"{tuple(feat.shape) if torch.is_tensor(feat) else type(feat).__name__}")
        n, c = feat.shape
        if c != self.dim_feat:
            raise ValueError(f"MemoryBank.add: feat has {c} features per row, the bank holds dim_feat="
                             f"{self.dim_feat}")
        if n > self.max_size:
            raise ValueError(f"MemoryBank.add: {n} rows do not fit a bank of max_size={self.max_size}")
        if n == 0:
            return
        with torch.no_grad():
            feat = feat.detach().to(device=self.device, dtype=self.data.dtype)
            if self._ptr + n <= self.max_size:
                self.data[self._ptr:self._ptr + n].copy_(feat)
            else:  # wraps around the end of the buffer
                head = self.max_size - self._ptr
                self.data[self._ptr:].copy_(feat[:head])
                self.data[:n - head].copy_(feat[head:])
        self.set_position((self._ptr + n) % self.max_size, self.n_updates + n)

    def set_position(self, ptr: int, n_updates: int) -> None:
        """The write pointer and the update count (``n_filled`` follows, in place)."""
        was = self.filled
        self._ptr, self.n_updates = int(ptr), int(n_updates)
        if self.filled != was:
            self.n_filled.fill_(self.filled)

    def settled(self, k: int) -> bool:
        """Whether ``get_data(k)`` keeps its shapes and ops from now on (the bank only fills):
        more than k rows filled (the draw), or the whole bank (all of its rows)."""
        return self.filled > k or self.filled == self.max_size

    def sample_index(self, k=None):
        """The index of ``get_data(k)``: None when at most k rows are filled (every filled row is
        taken: the bank's first ``filled`` rows, a view), else k distinct filled rows."""
        if k is None:
            k = self.max_size
        if k >= self.filled:
            return None
        keys = torch.rand(self.max_size, device=self.device, generator=self.generator)
        if self.filled < self.max_size:  # a full bank stays full: no mask from then on
            if self._rows is None:
                self._rows = torch.arange(self.max_size, device=self.device)
            keys.masked_fill_(self._rows >= self.n_filled, float("inf"))
        # the k smallest keys: a uniform k-subset of the filled rows
        return keys.topk(k, largest=False, sorted=False).indices

    def get_data(self, k=None, index=None):
        if index is None:
            index = self.sample_index(k)
            if index is None:
                n = self.filled
                return self.data[:n], torch.arange(n, device=self.device)
        return self.data[index], index


class InstanceMeanHook:
    """Upstream's hook: ``instance_mean`` is the mean over H and W of the module's input of the last
    forward ([B, C]). The hook keeps only a reference to the input (``input``); the mean is taken
    when read (one reduction; the synthesizer takes all of its hooks' means in one op)."""

    def __init__(self, module):
        self.hook = module.register_forward_pre_hook(self.hook_fn)
        self.module = module
        self.input = None

    def hook_fn(self, module, input):
        self.input = input[0]

    @property
    def instance_mean(self):
        if self.input is None:
            return None
        return instance_mean_multi([self.input])

    def remove(self):
        self.hook.remove()

    def __repr__(self):
        return "<Feature Hook>: %s" % (self.module)


def reset_model(model, generator=None):
    """Upstream's re-initialisation: Conv/ConvTranspose/Linear weights N(0, 0.02), biases 0,
    BatchNorm2d weights N(1, 0.02), biases 0 (in module order; ``generator``: the RNG)."""
    zeros = []  # every bias, zeroed in one op (the draws stay in upstream's order)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.ConvTranspose2d, nn.Linear, nn.Conv2d)):
                m.weight.normal_(0.0, 0.02, generator=generator)
                if m.bias is not None:
                    zeros.append(m.bias)
            if isinstance(m, nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.02, generator=generator)
                zeros.append(m.bias)
        if zeros:
            torch._foreach_zero_(zeros)


def resized_crop_codes(batch: int, device, generator=None):
    """The random numbers of one ``resized_crop_flip`` call: [batch, 5] uniforms."""
    return torch.rand(batch, 5, device=device, generator=generator)


def resized_crop_flip(x, codes, scale=(0.25, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)):
    """Per-sample random resized crop (area fraction uniform in ``scale``, log aspect ratio
    uniform in ``log(ratio)``, position uniform where the box fits), resampled bilinearly to the
    input size, and a per-sample horizontal flip: one affine grid and one ``grid_sample`` for the
    whole batch (kornia's RandomResizedCrop + RandomHorizontalFlip draw per sample too).
    ``codes``: ``resized_crop_codes(B)``."""
    B, _, H, W = x.shape
    u = codes.to(x.dtype if x.is_floating_point() else torch.float32)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    r = torch.exp(log_r)
    # box size as fractions of the image side, clipped to the image
    fw = torch.sqrt(area * r).clamp(max=1.0)
    fh = torch.sqrt(area / r).clamp(max=1.0)
    cx = (1.0 - fw) * (2.0 * u[:, 2] - 1.0)  # box centre in [-1, 1] coordinates, box inside
    cy = (1.0 - fh) * (2.0 * u[:, 3] - 1.0)
    sign = torch.where(u[:, 4] < 0.5, -1.0, 1.0).to(fw.dtype)
    zero = torch.zeros_like(fw)
    theta = torch.stack([torch.stack([fw * sign, zero, cx], 1), torch.stack([zero, fh, cy], 1)], 1)
    grid = F.affine_grid(theta, [B, x.shape[1], H, W], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _input_taps(teacher: nn.Module, layers, img_size) -> list:
    """For each feature layer, the module to hook for its input: a convolution inside the layer
    that receives the very same tensor object as the layer itself, once per forward (a residual
    stage's input goes straight to its first block's convolution and shortcut), else the layer.

    Why: a hooked module stays a call in the fused teacher's traced forward, so hooking a stage
    keeps every block inside it unfused (separate BatchNorm, ReLU and residual-add passes, forward
    and backward); a hooked convolution is a call anyway, and the stages trace through. Among
    several such convolutions the one the CPU Winograd path would not take is preferred (a hooked
    convolution runs as a module call). Found with one probe forward of the unfused teacher; the
    hooked input is the same tensor, so the means are the same numbers."""
    p = next(teacher.parameters(), None)
    dt = p.dtype if p is not None and p.is_floating_point() else torch.float32
    dev = p.device if p is not None else torch.device("cpu")
    seen: dict = {}  # id(module) -> the input tensors of its calls
    watched = {}
    for m in layers:
        watched[id(m)] = m
        for c in m.modules():
            if type(c) is nn.Conv2d:
                watched[id(c)] = c

    def record(mod, inputs):
        seen.setdefault(id(mod), []).append(inputs[0] if inputs else None)

    handles = [m.register_forward_pre_hook(record) for m in watched.values()]
    was = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():  # a private RNG: the caller's random streams are left as they are
            g = torch.Generator(device=dev).manual_seed(0)
            teacher(torch.randn(1, *img_size, device=dev, dtype=dt, generator=g))
    except Exception:
        return list(layers)  # the later probe (_probe_dim) reports what fails, naming the layer
    finally:
        teacher.train(was)
        for h in handles:
            h.remove()
    taps = []
    for m in layers:
        calls = seen.get(id(m), [])
        tap = m
        if len(calls) == 1 and torch.is_tensor(calls[0]):
            convs = [c for c in m.modules() if type(c) is nn.Conv2d and c is not m
                     and len(seen.get(id(c), [])) == 1 and seen[id(c)][0] is calls[0]]
            convs.sort(key=lambda c: _winograd_geometry(c))  # stable: module order otherwise
            if convs:
                tap = convs[0]
        taps.append(tap)
    return taps


def _winograd_geometry(conv: nn.Conv2d) -> bool:
    """3x3, stride 1, padding 1: a geometry fastsynth's CPU Winograd path serves."""
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1)


class _FeaturesTaken(Exception):
    """Raised by the last hook of the local view's forward: every hooked input is in."""


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_feature_layers(owner: str, teacher: nn.Module, feature_layers):
    if feature_layers is None:
        return None
    if isinstance(feature_layers, nn.Module):
        feature_layers = [feature_layers]
    try:
        layers = list(feature_layers)
    except TypeError:
        raise TypeError(f"{owner}: feature_layers must be a list of submodules of the teacher or None, got "
                        f"{type(feature_layers).__name__}") from None
    if not layers:
        raise ValueError(f"{owner}: feature_layers must name at least one submodule of the teacher (None: every "
                         f"BatchNorm2d input), got an empty list")
    own = {id(m) for m in teacher.modules()}
    for i, m in enumerate(layers):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{owner}: feature_layers[{i}] must be an nn.Module (a submodule of the teacher), got "
                            f"{type(m).__name__}")
        if id(m) not in own:
            raise ValueError(f"{owner}: feature_layers[{i}] ({type(m).__name__}) is not a submodule of the teacher; "
                             f"pass modules of the teacher itself (e.g. [teacher.layer1, teacher.layer2])")
    return layers


class CMISynthesizer(SynthCore):
    """Drop-in ``CMISynthesizer`` (zju-vipa/Fast-Datafree's constructor; ``CMISynthesizerCMI`` has
    zju-vipa/CMI's, without ``feature_reuse``); see the module docstring for the loop and what
    differs.

    Raises at construction (ValueError/TypeError naming the argument) when ``feature_layers`` are
    not submodules of the teacher (or the teacher's forward does not run them on 4-D inputs),
    ``n_neg`` exceeds ``bank_size``, a given ``mem_bank``'s width is not twice the hooked
    channels (the head's input), ``iterations`` < 1, the generator does not make ``img_size``
    images from z of width ``nz``, or ``num_classes`` exceeds the teacher's outputs."""

    def __init__(self, teacher, student, generator, nz, num_classes, img_size, feature_reuse=False,
                 feature_layers=None, bank_size=40960, n_neg=4096, head_dim=128, init_dataset=None,
                 iterations=100, lr_g=0.1, progressive_scale=False,
                 synthesis_batch_size=128, sample_batch_size=128,
                 adv=0.0, bn=1, oh=1, cr=0.8, cr_T=0.1,
                 save_dir='run/cmi', transform=None,
                 autocast=None, use_fp16=False,
                 normalizer=None, device='cpu', distributed=False, *,
                 augment=True, pool_capacity=None, pool_eviction="fifo", save_images=False,
                 save_format="shard", fuse_teacher=True, seed=None, compile=False, cuda_graph=False,
                 mem_bank=None, head=None, num_workers=None, bn_stats="global", pool_device=None, pool_dir=None):
        super().__init__(teacher, student)
        generator = unwrap(generator)
        owner = type(self).__name__
        img_size = check_synthesizer_args(
            owner, teacher=teacher, num_classes=num_classes, img_size=img_size,
            steps=("iterations", iterations, 1), batch=synthesis_batch_size, generator=generator, kind="latent",
            nz=nz)
        for name, v in (("bank_size", bank_size), ("n_neg", n_neg), ("head_dim", head_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{owner}: {name} must be a positive int, got {v!r}")
        if n_neg > bank_size:
            raise ValueError(f"{owner}: n_neg={n_neg} negatives cannot be drawn from a memory bank of "
                             f"bank_size={bank_size}; n_neg must be at most bank_size")
        for name, v in (("lr_g", lr_g), ("adv", adv), ("bn", bn), ("oh", oh), ("cr", cr), ("cr_T", cr_T)):
            if not _is_number(v):
                raise TypeError(f"{owner}: {name} must be a number, got {type(v).__name__}")
        if not cr_T > 0:
            raise ValueError(f"{owner}: cr_T (the contrastive temperature) must be positive, got {cr_T}")
        if adv > 0 and student is None:
            raise ValueError(f"{owner}: adv > 0 needs a student (got student=None)")
        layers = _check_feature_layers(owner, teacher, feature_layers)
        self.iterations = iterations
        self.lr_g = lr_g
        self.progressive_scale = progressive_scale  # stored, unused (as upstream)
        self.nz = nz
        self.n_neg = n_neg
        self.adv = adv
        self.bn = bn
        self.oh = oh
        self.cr = cr
        self.cr_T = cr_T
        self.num_classes = num_classes
        self.distributed = distributed
        self.synthesis_batch_size = synthesis_batch_size
        self.sample_batch_size = sample_batch_size
        self.bank_size = bank_size
        self.init_dataset = init_dataset
        self.feature_reuse = feature_reuse
        # feature_layers: their inputs hooked (at a convolution inside each, _input_taps) before
        # the teacher is fused, so that its traced forward keeps the hooked modules as calls (a
        # module traced through would never run its hooks)
        self.cmi_hooks = [InstanceMeanHook(m) for m in _input_taps(unwrap(teacher), layers, img_size)] \
            if layers is not None else []
        self._round = {}  # z and the generator's Adam, re-used across calls (_round_state)
        self._setup_core(img_size=img_size, normalizer=normalizer, device=device, bn_mmt=0,
                         transform=transform, autocast=autocast, use_fp16=use_fp16, save_dir=save_dir,
                         save_images=save_images, save_format=save_format, pool_capacity=pool_capacity,
                         pool_eviction=pool_eviction, augment=augment, fuse_teacher=fuse_teacher, seed=seed,
                         compile=compile, cuda_graph=cuda_graph, aug_padding=4, aug_flip=True, bn_stats=bn_stats,
                         pool_device=pool_device, pool_dir=pool_dir)
        if layers is None:
            # every BatchNorm2d input, hooked on the fused layers (after fusion: the teacher's
            # forward is already traced, so its ReLU folding is kept)
            self.cmi_hooks = [InstanceMeanHook(m) for m in self.teacher.modules() if isinstance(m, nn.BatchNorm2d)]
            if not self.cmi_hooks:
                raise ValueError(f"{owner}: feature_layers=None hooks the teacher's BatchNorm2d inputs and the "
                                 f"teacher has none; pass feature_layers")
        # the BatchNorm inputs' means from the fused BatchNorm passes themselves (no second read of
        # the maps) when every hooked module is a fused layer, in the same order
        fused = fuse.fused_layers(self.teacher)
        self._fused_means = layers is None and len(fused) == len(self.cmi_hooks) and all(
            h.module is m for h, m in zip(self.cmi_hooks, fused))
        if self._fused_means:
            fuse.set_instance_means_enabled(self.teacher, True)
        self._augment_on = bool(augment)
        # rank 0's weights everywhere: with feature_reuse the generator is learned across rounds
        self.generator = self._share_generator(generator.to(self.device)).train()
        # the hooked channel count: one probe forward, as upstream
        cmi_dim = self._probe_dim(owner, layers)
        self.cmi_dim = cmi_dim
        bank_rng = self._rng
        self.mem_bank = mem_bank if mem_bank is not None else \
            MemoryBank(self.device, max_size=bank_size, dim_feat=2 * cmi_dim, generator=bank_rng)
        self.head = head if head is not None else MLPHead(cmi_dim, head_dim)
        self.head = self._share_generator(self.head.to(self.device)).train()  # learned across rounds
        self._check_bank_head(owner)
        self.optimizer_head = make_adam(self.head.parameters(), self.lr_g, (0.9, 0.999), self.device,
                                        capturable=self.cuda_graph)
        if init_dataset is not None:
            from .nayer import load_init_dataset

            self.data_pool.set_init(load_init_dataset(init_dataset, img_size))

    # ------------------------------------------------------------------ setup helpers
    def _probe_dim(self, owner, layers) -> int:
        was = self.teacher.training
        self.teacher.eval()
        for h in self.cmi_hooks:
            h.input = None
        calls = {}
        counters = [h.module.register_forward_pre_hook(lambda m, i: calls.__setitem__(id(m), calls.get(id(m), 0) + 1))
                    for h in self.cmi_hooks]
        try:
            with torch.no_grad():
                p = next(self.teacher.parameters(), None)
                dt = p.dtype if p is not None and p.is_floating_point() else torch.float32
                self.teacher(torch.randn(1, *self.img_size, device=self.device, dtype=dt))
        finally:
            self.teacher.train(was)
            for c in counters:
                c.remove()
        # the local view's forward may stop once every hooked input is in (its logits are
        # discarded): only when each hooked module runs once per forward, so the input kept is
        # the one a full forward would leave
        self._stop_local = all(calls.get(id(h.module), 0) == 1 for h in self.cmi_hooks)
        self._local_left = 0
        # the local forward stops at the last hooked input (a hook's reference), or after the last
        # fused layer's pass (which computes the mean)
        self._local_hooks = [h.module.register_forward_hook(lambda m, i, o: self._count_local(m, i))
                             if self._fused_means else h.module.register_forward_pre_hook(self._count_local)
                             for h in self.cmi_hooks]
        dim = 0
        for i, h in enumerate(self.cmi_hooks):
            what = f"feature_layers[{i}] ({type(layers[i]).__name__})" if layers is not None \
                else f"BatchNorm layer {i}"
            if h.input is None:
                raise ValueError(f"{owner}: {what} is not run by the teacher's forward (traced through without "
                                 f"its hooks when the teacher was fused before; pass feature_layers before "
                                 f"fusing or fuse_teacher=False)")
            if h.input.dim() != 4:
                raise ValueError(f"{owner}: {what} receives a {h.input.dim()}-D input of shape "
                                 f"{tuple(h.input.shape)}; CMI hooks need 4-D feature maps [B, C, H, W]")
            dim += int(h.input.shape[1])
            h.input = None
        return dim

    def _check_bank_head(self, owner):
        bank, head = self.mem_bank, self.head
        if bank.dim_feat != 2 * self.cmi_dim:
            raise ValueError(f"{owner}: the memory bank holds rows of dim_feat={bank.dim_feat}; CMI stores "
                             f"[local, global] features of the {self.cmi_dim} hooked channels, so it must be "
                             f"2 * {self.cmi_dim} = {2 * self.cmi_dim} (the head's input is {self.cmi_dim})")
        first = next((m for m in head.modules() if isinstance(m, nn.Linear)), None)
        if first is not None and first.in_features != self.cmi_dim:
            raise ValueError(f"{owner}: the head takes {first.in_features} features, the hooked channels and the "
                             f"memory bank's halves are {self.cmi_dim} wide")
        if self.n_neg > bank.max_size:
            raise ValueError(f"{owner}: n_neg={self.n_neg} exceeds the memory bank's max_size={bank.max_size}")

    # ------------------------------------------------------------------ one step
    def _take_inputs(self) -> list:
        xs = [h.input for h in self.cmi_hooks]
        for h in self.cmi_hooks:
            h.input = None
        return xs

    def _release_inputs(self):
        """Drop the references to the last forward's hooked inputs and means (they would keep its
        graph alive between calls)."""
        for h in self.cmi_hooks:
            h.input = None
        if self._fused_means:
            for m in fuse.fused_layers(self.teacher):
                m.last_inst_mean = None

    def _feature_means(self):
        """[B, sum C]: the hooked inputs' per-instance channel means of the last forward, from the
        fused BatchNorm passes (``fuse.instance_means``) or in one reduction over the hooks' inputs."""
        if self._fused_means:
            for h in self.cmi_hooks:
                h.input = None
            return torch.cat(fuse.instance_means(self.teacher), dim=1)
        return instance_mean_multi(self._take_inputs())

    def _count_local(self, module, inputs):
        """Pre-hook after each InstanceMeanHook: in the local view's forward, stop it once the
        last hooked input is in (nothing after it is read). Not while compiling: an exception is
        no graph (the compiled step runs the whole forward)."""
        if self._local_left > 0 and not torch.compiler.is_compiling():
            self._local_left -= 1
            if self._local_left == 0:
                raise _FeaturesTaken

    def _views(self, x, codes):
        g_codes, l_codes = codes if codes is not None else (None, None)
        g = self.aug(x, generator=self._rng, codes=g_codes)
        if self._augment_on and self.cr != 0:
            lx = resized_crop_flip(x, l_codes)
            l_view = self.normalizer(lx) if self.normalizer is not None else lx
        elif self.cr != 0:
            l_view = self.normalizer(x) if self.normalizer is not None else x
        else:
            l_view = None
        return g, l_view

    def _forward(self, z, targets, adv_on: bool, cr_on: bool, codes):
        """Generator, both teacher forwards, the inversion losses: (loss_inv, x, f_l, f_g), the
        features None with cr == 0 (nothing reads them). f_g is computed without a graph: it
        only feeds the detached key side and the bank. What compile=True compiles: its shapes
        are fixed for the whole run (the bank part, whose row count grows while the bank fills,
        is ``_contrastive``, kept out of it so that it causes no recompilation)."""
        with nvtx_range("generator", self._nvtx):
            x = self.generator(z)
        with nvtx_range("augment", self._nvtx):
            g_view, l_view = self._views(x, codes)
        with nvtx_range("teacher", self._nvtx):
            t_out = self.teacher(g_view)
        with nvtx_range("losses", self._nvtx):
            loss_bn = self.capture.loss(scale=self.bn) if self.bn != 0 else None
            if cr_on:
                with torch.no_grad():
                    g_feat = self._feature_means()
            if adv_on:
                with nvtx_range("student", self._nvtx):
                    s_out = self._student_fwd(g_view)
                loss = self._logit_loss(t_out, s_out, targets, self.oh, self.adv)[0]
            else:
                loss = self.oh * F.cross_entropy(t_out, targets)
            if loss_bn is not None:
                loss = loss + loss_bn
        if not cr_on:
            return loss, x, None, None
        # the local view's forward needs no BatchNorm statistics
        stats_on = self.bn != 0
        if stats_on:
            self.capture.deactivate()
        self._local_left = len(self.cmi_hooks) if self._stop_local else 0
        try:
            with nvtx_range("teacher_local", self._nvtx):
                self.teacher(l_view)
        except _FeaturesTaken:
            pass
        finally:
            self._local_left = 0
            if stats_on:
                self.capture.activate()
        return loss, x, self._feature_means(), g_feat

    def _contrastive(self, l_feat, g_feat, cached, n_split):
        """cr * L_cr over the batch's features and the ``cached`` bank rows ([f_l, f_g]; None:
        the bank is empty)."""
        d = self.cmi_dim
        with nvtx_range("contrastive", self._nvtx):
            q_in = torch.cat([l_feat, cached[:, :d].to(l_feat.dtype)]) if cached is not None else l_feat
            q = self.head(q_in)
            with torch.no_grad():  # upstream detaches the key side: no graph for it
                k = self.head(torch.cat([g_feat, cached[:, d:].to(g_feat.dtype)]) if cached is not None else g_feat)
            loss_cr = contrastive_ce(q, k.to(q.dtype), self.cr_T, n_split)
        return self.cr * loss_cr

    def _draw_codes(self, batch: int):
        if not self._augment_on:
            return None
        g = self._draw_aug(batch)
        lc = resized_crop_codes(batch, self.device, self._rng) if self.cr != 0 else None
        return g, lc

    # ------------------------------------------------------------------ state
    def _extra_state(self) -> dict:
        b = self.mem_bank
        return {"mem_bank": {"data": b.data.detach().clone(), "ptr": b._ptr, "n_updates": b.n_updates}}

    def _load_extra_state(self, state: dict) -> None:
        b, st = self.mem_bank, state["mem_bank"]
        if tuple(st["data"].shape) != tuple(b.data.shape):
            raise ValueError(f"{type(self).__name__}.load_state_dict: saved memory bank of shape "
                             f"{tuple(st['data'].shape)}, this one is {tuple(b.data.shape)}")
        with torch.no_grad():
            b.data.copy_(st["data"])
        b.set_position(st["ptr"], st["n_updates"])

    # ------------------------------------------------------------------ API
    def _round_state(self, B: int):
        """(z, Adam over the generator's parameters and z) of one synthesize() call, and the
        static buffers of its steps (labels, best loss, images and features).

        Upstream builds z and a fresh Adam every call; here both are built once and re-used: z is
        redrawn in place (the same numbers as a new ``torch.randn``) and the Adam state is zeroed
        in one op, which is exactly a fresh Adam (step 0, zero moments), without allocating and
        zero-filling 3 tensors per parameter every call. One parameter group (upstream: two with
        the same settings) is one fused update instead of two. Rebuilt (and captured steps with
        them) when the generator's parameters, the batch size or the memory bank change. Not part
        of state_dict (nothing carries over)."""
        params = list(self.generator.parameters())
        key = (B, tuple(id(p) for p in params), id(self.mem_bank))  # r holds them: no id is recycled
        r = self._round
        if r.get("key") != key:
            self._close_graphs()  # captured with the old buffers
            z = torch.empty(B, self.nz, device=self.device).requires_grad_()
            f32 = dict(dtype=torch.float32, device=self.device)
            r.clear()
            r.update(key=key, bank=self.mem_bank, z=z, params=params + [z], moments=None,
                     opt=make_adam([{"params": params + [z]}], self.lr_g, (0.5, 0.999), self.device,
                                   capturable=self.cuda_graph),
                     targets=torch.zeros(B, dtype=torch.long, device=self.device),
                     best=(torch.full((), float("inf"), **f32), torch.zeros(B, *self.img_size, **f32),
                           torch.zeros(B, self.cmi_dim, **f32), torch.zeros(B, self.cmi_dim, **f32)))
        opt = r["opt"]
        opt.param_groups[0]["lr"] = self.lr_g
        if r["moments"] is None and opt.state:
            r["moments"] = [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
        with torch.no_grad():
            r["z"].normal_(generator=self._rng)
            if r["moments"]:
                torch._foreach_zero_(r["moments"])
        return r["z"], opt, r["params"]

    # ------------------------------------------------------------------ the captured step
    _graph_coefficients = ("bn", "oh", "adv", "cr", "cr_T")

    def _graph_optimizer(self):
        return self._round.get("opt")

    def _graph_settings(self) -> tuple:
        return super()._graph_settings() + (self.n_neg, self._optimizer_settings(self.optimizer_head))

    def _step_generators(self) -> list:
        gens = super()._step_generators()
        bank_rng = self.mem_bank.generator
        return gens + [bank_rng] if bank_rng is not None and all(bank_rng is not g for g in gens) else gens

    def _step_tensors(self) -> list:
        r = self._round
        return list(self.generator.parameters()) + list(self.generator.buffers()) + \
            list(self.head.parameters()) + list(self.head.buffers()) + [r["z"], *r["best"]]

    def _step(self, adv_on: bool, cr_on: bool, first: bool | None):
        """One inner step on the round's static buffers (``_round_state``): bank rows, codes,
        forward, loss, best tracking, gradients, both Adam steps. No host read."""
        r = self._round
        z, targets, params = r["z"], r["targets"], r["params"]
        B = targets.shape[0]
        cached, n_split = None, None
        if cr_on and self.mem_bank.filled > 0:
            cached, _ = self.mem_bank.get_data(self.n_neg)
            n_split = B
        codes = self._draw_codes(B)
        fwd = self._maybe_compiled(("fwd", adv_on, cr_on), self._forward)
        with self._autocast_ctx():
            loss, x, l_feat, g_feat = fwd(z, targets, adv_on, cr_on, codes)
            if cr_on:
                loss = loss + self._contrastive(l_feat, g_feat, cached, n_split)
        best_cost, best_x, best_l, best_g = r["best"]
        with torch.no_grad():
            self._log(loss)
            # the kept images and their features: in place on the device, no .item()
            self._track_best(loss.detach().float(), x.detach(), best_cost, best_x, first,
                             more=((l_feat.detach(), best_l), (g_feat, best_g)) if cr_on else ())
        head_params = [p for g in self.optimizer_head.param_groups for p in g["params"]] if cr_on else []
        with nvtx_range("backward", self._nvtx):
            wrt = params + head_params
            assign_grads(wrt, torch.autograd.grad(loss, wrt, allow_unused=True))
        if self._dist:
            # what is learned across rounds (the head; the generator with feature_reuse) is
            # averaged across ranks in one all_reduce; z and a per-round generator stay per rank
            self._average_grads((params[:-1] if self.feature_reuse else []) + head_params)
        with nvtx_range("step", self._nvtx):
            r["opt"].step()
            if cr_on:
                self.optimizer_head.step()

    # ------------------------------------------------------------------ API
    def synthesize(self, targets=None):
        start = now()
        owner = type(self).__name__
        self._check_bank_head(owner)
        B = self.synthesis_batch_size
        _, optimizer, _ = self._round_state(B)
        r = self._round
        if targets is None:
            targets = self._randint(self.num_classes, (B,))
            targets = targets.sort()[0]
        elif not torch.is_tensor(targets) or tuple(targets.shape) != (B,) or targets.is_floating_point():
            raise ValueError(f"{owner}.synthesize: targets must be an integer tensor of shape "
                             f"[synthesis_batch_size={B}], got "
                             f"{tuple(targets.shape) if torch.is_tensor(targets) else type(targets).__name__}")
        if not self.feature_reuse:
            reset_model(self.generator, generator=self._rng)
        self.generator.train()
        adv_on = self.adv > 0
        cr_on = self.cr != 0
        best_cost, best_x, best_l, best_g = r["best"]
        with torch.no_grad():
            r["targets"].copy_(targets)
            if self._graph_mode:
                best_cost.fill_(float("inf"))  # the captured step's tracking starts from nothing kept
        # captured once the bank rows of a step have their final form (n_neg rows drawn from
        # more, or the full bank); while the bank holds at most n_neg rows (all of them taken,
        # as upstream) the steps run eagerly
        fixed = not cr_on or self.mem_bank.settled(self.n_neg)
        with self._synthesis_mode():
            if self.bn == 0:
                self.capture.deactivate()
            self._run_steps(self.iterations, lambda it: self._step(adv_on, cr_on, self._first(it)),
                            ("step", adv_on, cr_on), [optimizer, self.optimizer_head] if cr_on else optimizer,
                            stats=False, graph=fixed)
            self._release_inputs()
        if self.student is not None:
            self.student.train()
        images = best_x.clone()
        self._sync()
        end = now()
        self._add_to_pool([(images, best_cost)])
        if cr_on:
            self.mem_bank.add(torch.cat([best_l, best_g], dim=1))  # the bank's [local, global] rows
        return {"synthetic": images}, end - start

    def remove_hooks(self):
        """Remove the instance-mean hooks from the teacher (and its fused layers' means)."""
        if getattr(self, "_fused_means", False):
            fuse.set_instance_means_enabled(self.teacher, False)
            self._fused_means = False
        for h in self.cmi_hooks:
            h.remove()
        for h in getattr(self, "_local_hooks", ()):
            h.remove()
        self.cmi_hooks, self._local_hooks = [], []

    def close(self):
        self.remove_hooks()
        super().close()


def _cmi_repo_signature() -> inspect.Signature:
    """``CMISynthesizer.__init__``'s signature with ``feature_reuse`` moved to the first
    keyword-only place: zju-vipa/CMI's constructor order."""
    sig = inspect.signature(CMISynthesizer.__init__)
    params = [p for p in sig.parameters.values() if p.name != "feature_reuse"]
    kw = next(i for i, p in enumerate(params) if p.kind is inspect.Parameter.KEYWORD_ONLY)
    params.insert(kw, sig.parameters["feature_reuse"].replace(kind=inspect.Parameter.KEYWORD_ONLY))
    return sig.replace(parameters=params)


class CMISynthesizerCMI(CMISynthesizer):
    """``CMISynthesizer`` with zju-vipa/CMI's constructor order (no ``feature_reuse`` between
    ``img_size`` and ``feature_layers``; here it is keyword-only, default False as that
    repository's loop always re-initialises the generator). The signature is
    ``CMISynthesizer``'s, reordered (``inspect.signature`` and ``help`` show it)."""

    _SIGNATURE = _cmi_repo_signature()

    def __init__(self, *args, **kwargs):
        try:
            bound = CMISynthesizerCMI._SIGNATURE.bind(self, *args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{type(self).__name__}: {e}") from None
        super().__init__(**{k: v for k, v in bound.arguments.items() if k != "self"})

    __init__.__signature__ = _SIGNATURE
