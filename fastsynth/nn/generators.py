"""Generators of FastDFKD and NAYER, drop-in for the upstream modules.

``Generator`` (FastDFKD, 32px) and ``DeepGenerator`` (its 224px ImageNet variant) take a noise
batch z; ``NLGenerator`` (NAYER) and ``NLDeepGenerator`` take class targets and map their
label-text embeddings through the noisy layers. Parameter names (state_dict keys) follow the
upstream modules, except that NAYER's K noisy layers ``le1.{i}.weight`` / ``le1.{i}.bias`` are held
as ONE weight [K, le_size, le_emb_size] and ONE bias [K, le_emb_size] (``le1_weight``,
``le1_bias``): the forward is one op over the K row blocks (``fastsynth.ops.noisy_linear``), and
``re_init_le()`` is one call of the fused ``fastsynth.ops.reinit_`` keyed by an int64 seed buffer
advanced in place (so it is CUDA-graph friendly). Upstream state_dicts (``le1.{i}.*``) load directly.

No module here hard-codes a device: ``clone()`` and ``reinit()`` return modules on the device
(and dtype) of the original.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn as nn

from ..ops.noisy_linear import noisy_linear
from ..ops.reinit import advance_seed_, make_seed, reinit_
from .upsample_conv import UpsampleConvSequential

__all__ = ["Generator", "DeepGenerator", "NLGenerator", "NLDeepGenerator", "NoisyLayers", "LargeGenerator",
           "DCGAN_Generator"]


# ---------------------------------------------------------------------------------------------
# argument checks: a wrong configuration or input raises here, naming the argument, instead of
# failing later inside a matmul, a view or an index (issue 18). Forward checks read only shapes,
# dtypes and devices (no host sync); the class-index range of NAYER targets is checked where the
# targets already are on the host (CPU, eager).


def _check_dim(owner: str, name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be an int >= {minimum}, got {value}")
    return int(value)


def _check_like(owner: str, name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    """``t`` (a floating input) on the device of the parameter ``ref``, in its dtype unless
    autocast is on (autocast casts the operands of the first layer itself)."""
    if not t.is_floating_point():
        raise TypeError(f"{owner}: {name} must be a floating tensor, got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{owner}: {name} must be on the generator's device {ref.device}, got {t.device}")
    if t.dtype != ref.dtype and not (t.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(t.device.type)):
        raise TypeError(f"{owner}: {name} must have the generator's dtype {ref.dtype}, got {t.dtype} "
                        f"(convert the generator with .to({t.dtype}) or the input with .to({ref.dtype}))")


def _check_latent(owner: str, z, ref: torch.Tensor, nz: int, spatial_ok: bool = False) -> None:
    """``z``: [B, nz] with B >= 1 (``spatial_ok``: also [B, nz, h, w])."""
    want = f"[B, nz={nz}]" + (f" or [B, nz={nz}, h, w]" if spatial_ok else "")
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{owner}: z must be a torch.Tensor {want}, got {type(z).__name__}")
    if z.dim() not in ((2, 4) if spatial_ok else (2,)) or z.shape[1] != nz:
        raise ValueError(f"{owner}: z must be {want}, got shape {tuple(z.shape)}")
    if z.shape[0] == 0:
        raise ValueError(f"{owner}: z must hold at least one sample (B >= 1), got shape {tuple(z.shape)}")
    _check_like(owner, "z", z, ref)


def _conv_blocks_32(ngf: int, nc: int, c_in: int | None = None) -> nn.Sequential:
    """BN, up x2, conv(c_in->2ngf), BN, LReLU, up x2, conv(2ngf->ngf), BN, LReLU, conv(ngf->nc), sigmoid
    (``c_in``: 2ngf by default, 4ngf in ``LargeGenerator``).

    Each (up x2, conv) pair runs as one fused upsample2x_conv3x3 (nn/upsample_conv.py)."""
    c_in = ngf * 2 if c_in is None else c_in
    return UpsampleConvSequential(
        nn.BatchNorm2d(c_in),
        nn.Upsample(scale_factor=2),
        nn.Conv2d(c_in, ngf * 2, 3, stride=1, padding=1, bias=False),
        nn.BatchNorm2d(ngf * 2),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Upsample(scale_factor=2),
        nn.Conv2d(ngf * 2, ngf, 3, stride=1, padding=1, bias=False),
        nn.BatchNorm2d(ngf),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ngf, nc, 3, stride=1, padding=1),
        nn.Sigmoid(),
    )


def _conv_blocks_deep(c_in: int, ngf: int, nc: int) -> nn.Sequential:
    """conv(c_in->2ngf) at s/16, then four (up x2, conv, BN, LReLU) stages to full size, conv(ngf->nc), sigmoid."""
    def stage(ci, co, up=True):
        layers = [nn.Upsample(scale_factor=2)] if up else []
        return layers + [nn.Conv2d(ci, co, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(co),
                         nn.LeakyReLU(0.2, inplace=True)]

    return UpsampleConvSequential(  # (up x2, conv) pairs fused as in _conv_blocks_32
        *stage(c_in, 2 * ngf, up=False),
        *stage(2 * ngf, 2 * ngf),
        *stage(2 * ngf, ngf),
        *stage(ngf, ngf),
        *stage(ngf, ngf),
        nn.Conv2d(ngf, nc, 3, stride=1, padding=1),
        nn.Sigmoid(),
    )


def _like(module: nn.Module, reference: nn.Module) -> nn.Module:
    """Move ``module`` to the device/dtype of ``reference``'s parameters, copy its train/eval mode."""
    p = next(reference.parameters(), None)
    if p is not None:
        module = module.to(device=p.device, dtype=p.dtype)
    return module.train(reference.training)


class _LinearGenerator(nn.Module):
    """z [B, nz] -> Linear(nz -> width ngf (s/4)^2) -> view (B, width ngf, s/4, s/4) -> the 32px
    blocks (``_conv_blocks_32``): ``Generator`` (width 2) and ``LargeGenerator`` (width 4)."""

    _width = 2

    def __init__(self, nz: int, ngf: int, img_size: int, nc: int):
        super().__init__()
        owner = type(self).__name__
        if not isinstance(img_size, int) or img_size <= 0 or img_size % 4:
            raise ValueError(f"{owner}: img_size must be a positive multiple of 4, got {img_size!r}")
        nz, ngf, nc = (_check_dim(owner, n, v) for n, v in (("nz", nz), ("ngf", ngf), ("nc", nc)))
        self.params = (nz, ngf, img_size, nc)
        self.init_size = img_size // 4
        self.l1 = nn.Sequential(nn.Linear(nz, ngf * self._width * self.init_size ** 2))
        self.conv_blocks = _conv_blocks_32(ngf, nc, c_in=ngf * self._width)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lin = self.l1[0]
        _check_latent(type(self).__name__, z, lin.weight, lin.in_features)
        out = self.l1(z)
        out = out.view(out.shape[0], -1, self.init_size, self.init_size)
        return self.conv_blocks(out)

    def clone(self):
        """A copy with the same weights and buffers, on the same device and dtype."""
        twin = type(self)(*self.params)
        twin.load_state_dict(self.state_dict())
        return _like(twin, self)


class Generator(_LinearGenerator):
    """FastDFKD generator: z [B, nz] -> image [B, nc, img_size, img_size] in [0, 1].

    Linear(nz -> 2ngf (s/4)^2) -> view (B, 2ngf, s/4, s/4) -> BN, up, conv, BN, LReLU, up, conv, BN,
    LReLU, conv, sigmoid. ``img_size`` must be a multiple of 4.
    """

    def __init__(self, nz: int = 100, ngf: int = 64, img_size: int = 32, nc: int = 3, nl: int | None = None):
        super().__init__(nz, ngf, img_size, nc)
        # nl: NAYER's 5-argument form Generator(nz, ngf, img_size, nc, nl) keeps nl in params
        # (its clone() passes it on) and never uses it; Fast-Datafree's form has 4 params
        if nl is not None:
            self.params = self.params + (nl,)

    def forward(self, z: torch.Tensor, y=None) -> torch.Tensor:
        # y: accepted and ignored, as NAYER's Generator.forward(z, y=None)
        return super().forward(z)


class DeepGenerator(nn.Module):
    """FastDFKD's ImageNet-size generator (224px by default), upstream ``DeepGenerator``.

    As upstream, it maps a spatial noise map z [B, nz, s/16, s/16] through conv(nz->2ngf), BN,
    LReLU and four (up x2, conv, BN, LReLU) stages to [B, nc, s, s]; a flat z [B, nz] is spread
    over the s/16 x s/16 grid. ``l1`` is kept (unused by forward, as upstream) so upstream
    checkpoints load with the same keys.
    """

    def __init__(self, nz: int = 100, ngf: int = 64, img_size: int = 224, nc: int = 3):
        super().__init__()
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0 or img_size % 32:
            raise ValueError(f"DeepGenerator: img_size must be a positive multiple of 32, got {img_size!r}")
        nz, ngf, nc = (_check_dim("DeepGenerator", n, v) for n, v in (("nz", nz), ("ngf", ngf), ("nc", nc)))
        self.params = (nz, ngf, img_size, nc)
        self.init_size = img_size // 32
        self.z_size = img_size // 16
        self.l1 = nn.Sequential(nn.Linear(nz, ngf * self.init_size ** 2))
        self.conv_blocks = _conv_blocks_deep(nz, ngf, nc)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        conv = self.conv_blocks[0]
        _check_latent(type(self).__name__, z, conv.weight, conv.in_channels, spatial_ok=True)
        if z.dim() == 2:
            z = z[:, :, None, None].expand(-1, -1, self.z_size, self.z_size)
        return self.conv_blocks(z)

    def clone(self, copy_params: bool = True) -> "DeepGenerator":
        twin = type(self)(*self.params)
        if copy_params:
            twin.load_state_dict(self.state_dict())
        return _like(twin, self)


class NoisyLayers(nn.Module):
    """K noisy Linear(in -> out) layers as one weight [K, in, out] and one bias [K, out].

    Row block k (rows k*nl .. (k+1)*nl - 1 of the input) goes through layer k, all layers in one
    op, ``fastsynth.ops.noisy_linear``: on CPU (float32/64) a fused kernel that streams the
    weight once in the forward and once in the backward (grad_input and grad_weight from the same
    sweep); on CUDA one ``torch.baddbmm(bias, x.view(K, nl, in), weight)``, cuBLAS's batched GEMM
    being the right kernel there. A batch that is not a multiple of nl ends in a partial block; a
    batch smaller than K*nl uses only the first ceil(B/nl) layers (the others get zero gradients).
    """

    def __init__(self, k: int, in_features: int, out_features: int, nl: int):
        super().__init__()
        k, in_features, out_features, nl = (_check_dim("NoisyLayers", n, v) for n, v in (
            ("k", k), ("in_features", in_features), ("out_features", out_features), ("nl", nl)))
        self.k, self.nl = k, nl
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(k, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(k, out_features))
        self.register_buffer("seed", make_seed(), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default: weight and bias ~ U(-1/sqrt(in), 1/sqrt(in))
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            nn.init.uniform_(self.weight, -bound, bound)
            nn.init.uniform_(self.bias, -bound, bound)

    def re_init(self) -> None:
        """weight ~ N(0, 1), bias = 0: one fused launch, then the seed buffer advances in place."""
        reinit_([self.weight, self.bias], self.seed, ["normal", "constant"], [0.0, 0.0], [1.0, 0.0])
        advance_seed_(self.seed)

    # upstream checkpoints hold K nn.Linear layers: {prefix}{i}.weight [out, in], {prefix}{i}.bias [out]
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if prefix + "weight" not in state_dict and prefix + "0.weight" in state_dict:
            ws, bs, i = [], [], 0
            while prefix + f"{i}.weight" in state_dict:
                ws.append(state_dict.pop(prefix + f"{i}.weight").t())
                bs.append(state_dict.pop(prefix + f"{i}.bias"))
                i += 1
            state_dict[prefix + "weight"] = torch.stack(ws)
            state_dict[prefix + "bias"] = torch.stack(bs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if b > self.k * self.nl:
            raise ValueError(f"NoisyLayers: batch {b} exceeds the {self.k} noisy layers x nl={self.nl} rows "
                             f"({self.k * self.nl}); build the generator with sbz >= batch")
        return noisy_linear(x, self.weight, self.bias, self.nl)


class _NoisyGeneratorBase(nn.Module):
    """Shared by NLGenerator and NLDeepGenerator: label embedding -> BN1d -> noisy layers -> l1
    -> view (B, 2ngf, s/stride, s/stride) -> the conv blocks (32px blocks at stride 4, the deep
    stack at stride 16)."""

    def _build(self, stride, ngf, img_size, nc, nl, label_emb, le_emb_size, le_size, sbz):
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0 or img_size % stride:
            raise ValueError(f"{type(self).__name__}: img_size must be a positive multiple of {stride}, "
                             f"got {img_size!r}")
        self._init_noisy(ngf, img_size, nc, nl, label_emb, le_emb_size, le_size, sbz)
        self.init_size = img_size // stride
        self.l1 = nn.Sequential(nn.Linear(le_emb_size, ngf * 2 * self.init_size ** 2))
        self.conv_blocks = _conv_blocks_32(ngf, nc) if stride == 4 else _conv_blocks_deep(2 * ngf, ngf, nc)

    def forward(self, targets: torch.Tensor | None = None) -> torch.Tensor:
        out = self._noisy_features(targets)
        out = out.view(out.shape[0], -1, self.init_size, self.init_size)
        return self.conv_blocks(out)

    def _init_noisy(self, ngf, img_size, nc, nl, label_emb, le_emb_size, le_size, sbz):
        owner = type(self).__name__
        self.params = (ngf, img_size, nc, nl, label_emb, le_emb_size, le_size, sbz)
        for n, v in (("ngf", ngf), ("nc", nc), ("nl", nl), ("le_emb_size", le_emb_size), ("le_size", le_size),
                     ("sbz", sbz)):
            _check_dim(owner, n, v)
        self.le_emb_size, self.le_size, self.nl, self.sbz = le_emb_size, le_size, nl, sbz
        self.nle = int(math.ceil(sbz / nl))
        if label_emb is not None:
            label_emb = torch.as_tensor(label_emb)
            if label_emb.dim() != 2 or label_emb.shape[1] != le_size or label_emb.shape[0] == 0:
                raise ValueError(f"{type(self).__name__}: label_emb must be [num_classes, le_size={le_size}], "
                                 f"got shape {tuple(label_emb.shape)}")
            if label_emb.dtype not in (torch.float32, torch.float64):
                label_emb = label_emb.float()  # e.g. upstream's fp16 pickles
        # not in the state_dict (upstream keeps it as a plain attribute) but moves with .to()
        self.register_buffer("label_emb", label_emb, persistent=False)
        self.n1 = nn.BatchNorm1d(le_size)
        self.le1 = NoisyLayers(self.nle, le_size, le_emb_size, nl)

    def re_init_le(self) -> None:
        """Every noisy layer: weight ~ N(0, 1), bias = 0 (one fused launch)."""
        self.le1.re_init()

    def reinit(self):
        """A freshly initialised generator of the same configuration, on the same device/dtype."""
        return _like(type(self)(*self.params), self)

    def _noisy_features(self, targets: torch.Tensor | None) -> torch.Tensor:
        if targets is None:  # upstream's forward(targets=None) signature; a batch of labels is needed
            raise ValueError(f"{type(self).__name__}: targets must be a tensor of class indices [B], got None")
        if self.label_emb is None:
            raise ValueError(f"{type(self).__name__}: label_emb was not given; pass label_emb=[num_classes, le_size] "
                             "(see fastsynth.lte)")
        targets = self._check_targets(targets)
        le = self.n1(self.label_emb[targets])
        return self.l1(self.le1(le))

    def _check_targets(self, targets) -> torch.Tensor:
        """targets: class indices [B], 1 <= B <= sbz-sized noisy rows, on label_emb's device (a
        list of ints is taken as a tensor, as upstream's indexing takes it)."""
        owner, emb = type(self).__name__, self.label_emb
        n = emb.shape[0]
        if not isinstance(targets, torch.Tensor):
            try:
                targets = torch.as_tensor(targets, device=emb.device)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"{owner}: targets must be a tensor of class indices [B], got "
                                f"{type(targets).__name__}") from None
        if targets.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{owner}: targets must be int64 (or int32) class indices [B], got dtype {targets.dtype}")
        if targets.dim() != 1 or targets.shape[0] == 0:
            raise ValueError(f"{owner}: targets must be class indices of shape [B] with B >= 1, "
                             f"got shape {tuple(targets.shape)}")
        if targets.device != emb.device:
            raise ValueError(f"{owner}: targets must be on the generator's device {emb.device}, got {targets.device}")
        if targets.device.type == "cpu" and not torch.compiler.is_compiling():
            # CPU memory is read in place (no device, nothing to wait for; and no aten op, so the
            # synthesizers' no-host-read accounting stays about real device reads)
            vals = targets.detach().numpy()
            lo, hi = int(vals.min()), int(vals.max())
            if lo < 0 or hi >= n:
                raise ValueError(f"{owner}: targets must be class indices in [0, {n}) (label_emb has {n} rows), "
                                 f"got values in [{lo}, {hi}]")
        return targets

    def upstream_state_dict(self) -> dict:
        """The state_dict with the upstream key layout (le1.{i}.weight [out, in], le1.{i}.bias)."""
        sd = self.state_dict()
        w, b = sd.pop("le1.weight"), sd.pop("le1.bias")
        for i in range(w.shape[0]):
            sd[f"le1.{i}.weight"] = w[i].t().contiguous()
            sd[f"le1.{i}.bias"] = b[i].clone()
        return sd


class NLGenerator(_NoisyGeneratorBase):
    """NAYER's generator: targets [B] -> image [B, nc, img_size, img_size] in [0, 1].

    le = label_emb[targets] -> BatchNorm1d -> noisy layer k on row block k (K = ceil(sbz/nl)
    layers of Linear(le_size -> le_emb_size), batched) -> Linear(le_emb_size -> 2ngf (s/4)^2)
    -> the FastDFKD conv blocks. The batch may be smaller than sbz, and need not be a multiple of nl.
    """

    def __init__(self, ngf: int = 64, img_size: int = 32, nc: int = 3, nl: int = 100, label_emb=None,
                 le_emb_size: int = 256, le_size: int = 512, sbz: int = 200):
        super().__init__()
        self._build(4, ngf, img_size, nc, nl, label_emb, le_emb_size, le_size, sbz)


class NLDeepGenerator(_NoisyGeneratorBase):
    """NAYER's ImageNet-size generator (224px): as NLGenerator, with l1 to 2ngf (s/16)^2 and the
    deep conv stack (conv at s/16, four up-sampling stages)."""

    def __init__(self, ngf: int = 64, img_size: int = 224, nc: int = 3, nl: int = 100, label_emb=None,
                 le_emb_size: int = 256, le_size: int = 512, sbz: int = 200):
        super().__init__()
        self._build(16, ngf, img_size, nc, nl, label_emb, le_emb_size, le_size, sbz)


class LargeGenerator(_LinearGenerator):
    """zju-vipa/CMI's ``LargeGenerator(nz=100, ngf=64, img_size=32, nc=3)`` (its DAFL / ZSKT / DFQ /
    DFAD generator): z [B, nz] -> Linear(nz -> 4ngf (s/4)^2) -> view (B, 4ngf, s/4, s/4) -> BN, up,
    conv(4ngf->2ngf), BN, LReLU, up, conv(2ngf->ngf), BN, LReLU, conv(ngf->nc), sigmoid.
    Same state_dict keys as upstream; the (up x2, conv) pairs run fused as in ``Generator``.
    ``img_size`` must be a positive multiple of 4."""

    _width = 4

    def __init__(self, nz: int = 100, ngf: int = 64, img_size: int = 32, nc: int = 3):
        super().__init__(nz, ngf, img_size, nc)


class DCGAN_Generator(nn.Module):  # noqa: N801 (upstream name)
    """Fast-Datafree / CMI ``DCGAN_Generator(nz=100, ngf=64, nc=3, img_size=64, slope=0.2)``:
    z [B, nz] -> flatten -> Linear(nz -> 8ngf h w) with (h, w) = img_size / 16 -> BN(8ngf) ->
    four ConvTranspose2d(4, stride 2, pad 1) + BN + LeakyReLU(slope) stages (8ngf -> 4ngf -> 2ngf
    -> ngf -> ngf) -> conv3x3(ngf -> nc) -> sigmoid. ``img_size``: an int or an (H, W) pair, each a
    positive multiple of 16. State_dict keys as upstream (``project.1``, ``main.*``).
    (NAYER ships a different class under this name, driven by label embeddings; not this one.)"""

    def __init__(self, nz: int = 100, ngf: int = 64, nc: int = 3, img_size=64, slope: float = 0.2):
        super().__init__()
        hw = tuple(img_size) if isinstance(img_size, (list, tuple)) else (img_size, img_size)
        if len(hw) != 2 or not all(isinstance(v, int) and v > 0 and v % 16 == 0 for v in hw):
            raise ValueError(f"DCGAN_Generator: img_size must be a positive multiple of 16 or an (H, W) pair of "
                             f"them, got {img_size!r}")
        nz, ngf, nc = (_check_dim("DCGAN_Generator", n, v) for n, v in (("nz", nz), ("ngf", ngf), ("nc", nc)))
        self.params = (nz, ngf, nc, img_size, slope)
        self.nz = nz
        self.init_size = (hw[0] // 16, hw[1] // 16)
        self.project = nn.Sequential(nn.Flatten(), nn.Linear(nz, ngf * 8 * self.init_size[0] * self.init_size[1]))

        def up(ci, co):
            return [nn.ConvTranspose2d(ci, co, 4, 2, 1, bias=False), nn.BatchNorm2d(co),
                    nn.LeakyReLU(slope, inplace=True)]

        self.main = nn.Sequential(
            nn.BatchNorm2d(ngf * 8),
            *up(ngf * 8, ngf * 4), *up(ngf * 4, ngf * 2), *up(ngf * 2, ngf), *up(ngf, ngf),
            nn.Conv2d(ngf, nc, 3, 1, 1),
            nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lin = self.project[1]
        # upstream flattens z first: [B, nz] and [B, nz, 1, 1] are both taken
        if isinstance(z, torch.Tensor) and z.dim() > 2 and math.prod(z.shape[1:]) == self.nz:
            _check_latent(type(self).__name__, z.reshape(z.shape[0], -1), lin.weight, self.nz)
        else:
            _check_latent(type(self).__name__, z, lin.weight, self.nz)
        proj = self.project(z)
        proj = proj.view(proj.shape[0], -1, self.init_size[0], self.init_size[1])
        return self.main(proj)

    def clone(self) -> "DCGAN_Generator":
        twin = type(self)(*self.params)
        twin.load_state_dict(self.state_dict())
        return _like(twin, self)
