"""The generative synthesizer of zju-vipa/Fast-Datafree and zju-vipa/CMI (``GenerativeSynthesizer``):
DAFL, ZSKT, DFQ and DFAD are settings of its five loss coefficients.

One synthesize() call runs ``iterations`` steps; each step draws a fresh z ~ N(0, I)
[synthesis_batch_size, nz], makes x = generator(z) (generator in train mode), normalises it and
minimises, over the generator's parameters only (Adam(lr_g, betas (0.5, 0.999)), built once),

    bn * L_BN(teacher) + oh * CE(t, argmax t) + adv * (-criterion(s, t))
      + balance * sum_c p_c log p_c + act * (-mean |f|)

with t = teacher(x), s = student(x) (only when adv > 0), p = softmax(t).mean(0) and f the
teacher's penultimate features (what the upstream models return with ``return_features=True``:
the input of their final Linear). It returns ``({"synthetic": x of the last step, in [0, 1]},
seconds)``; ``sample()`` draws a new z and returns ``(normalizer(generator(z)), seconds)`` under
no_grad, in the generator's current mode (train after synthesize(), as upstream: its BatchNorm
running statistics move).

How the upstream scripts configure it (``datafree_kd.py`` + ``scripts/<method>_cifar.sh``;
all with g_steps=iterations=1, lr_g=1e-3, batch 256, ngf=64, 32x32)::

    method  nz   adv  criterion       bn  oh  act    balance   KD loop (student)
    DAFL    512  0    KLDiv()         0   1   0.001  20        kd_steps 5,  KLDiv(T=1)
    ZSKT    256  1    KLDiv()         0   0   0      0         kd_steps 5,  KLDiv(T=1)
    DFQ     256  1    KLDiv()         1   1   0      20        kd_steps 10, KLDiv(T=1)
    DFAD    256  1    nn.L1Loss()     0   0   0      0         kd_steps 5,  nn.L1Loss()

(``GENERATIVE_METHODS`` holds these rows.) The script overwrites its KD criterion with the
synthesis criterion, so the scripts' ``--T 20`` never reaches the KD loss. zju-vipa/CMI's script
builds a ``LargeGenerator`` and passes the real student; Fast-Datafree's builds ``Generator``
and passes ``student=teacher``, with which the adversarial term and its gradient are identically
zero (ZSKT and DFAD then do not train the generator at all). fastsynth does what it is given.

What changes against upstream (results equal to float rounding):
- teacher and student parameters get no gradients (frozen inside synthesize());
- L_BN comes from the fused teacher (statistics in its own BatchNorm passes, all layers in one
  loss op) and only when ``bn != 0``; upstream's hooks compute it in every teacher forward;
- a term whose coefficient is 0 is not computed (upstream computes all five and multiplies by
  0, so a NaN in an unused term, e.g. an underflowed class probability, poisons its loss);
  sum p log p is ``xlogy(p, p)`` (0 where p underflows to 0);
- CE against the argmax and the balance term share one log_softmax; the features are read by a
  pre-hook on the teacher's last ``nn.Linear`` during synthesis (teachers need no
  ``return_features`` argument);
- the images returned are the generator's output itself (upstream normalises and de-normalises
  it back);
- ``normalizer=None`` means no normalisation (upstream fails).

fastsynth keywords (keyword-only, after the upstream ones): ``fuse_teacher``, ``seed`` (a
private RNG for z), ``compile`` (torch.compile of the step's forward and loss), ``cuda_graph``
(the whole step captured in a CUDA graph and replayed ``iterations`` times).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distributed import unwrap
from .core import SynthCore
from .util import make_adam, now, nvtx_range

__all__ = ["GenerativeSynthesizer", "GENERATIVE_METHODS"]

# constructor settings of the upstream scripts (see the module docstring); "criterion" is a
# factory name resolved by the caller: "KLDiv" -> fastsynth.losses.KLDiv(), "L1Loss" -> nn.L1Loss()
GENERATIVE_METHODS = {
    "dafl": dict(nz=512, adv=0.0, criterion="KLDiv", bn=0.0, oh=1.0, act=0.001, balance=20.0),
    "zskt": dict(nz=256, adv=1.0, criterion="KLDiv", bn=0.0, oh=0.0, act=0.0, balance=0.0),
    "dfq": dict(nz=256, adv=1.0, criterion="KLDiv", bn=1.0, oh=1.0, act=0.0, balance=20.0),
    "dfad": dict(nz=256, adv=1.0, criterion="L1Loss", bn=0.0, oh=0.0, act=0.0, balance=0.0),
}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_generator(generator, nz: int, img_size) -> None:
    """One tiny forward (eval mode, no grad, restored) to check that the generator takes z of
    width ``nz`` and makes images of shape ``img_size``: a mismatch surfaces here as a ValueError
    naming the argument, not as a shape error deep inside the first synthesis step."""
    p = next(generator.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    dt = p.dtype if p is not None and p.is_floating_point() else torch.float32
    was = generator.training
    generator.eval()
    try:
        with torch.no_grad():
            out = generator(torch.zeros(2, nz, device=dev, dtype=dt))
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"GenerativeSynthesizer: the generator does not take z of shape [B, nz={nz}] "
                         f"({type(exc).__name__}: {exc})") from exc
    finally:
        generator.train(was)
    if not isinstance(out, torch.Tensor) or tuple(out.shape[1:]) != tuple(img_size):
        got = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"GenerativeSynthesizer: img_size={tuple(img_size)} is not supported by the generator, "
                         f"which makes images of shape {got}")


class GenerativeSynthesizer(SynthCore):
    """Drop-in ``GenerativeSynthesizer`` (zju-vipa/Fast-Datafree, zju-vipa/CMI); see the module
    docstring for the loop, the DAFL / ZSKT / DFQ / DFAD settings and what differs."""

    def __init__(self, teacher, student, generator, nz, img_size, iterations=1,
                 lr_g=1e-3, synthesis_batch_size=128, sample_batch_size=128,
                 adv=0, bn=0, oh=0, act=0, balance=0, criterion=None,
                 normalizer=None, device='cpu',
                 autocast=None, use_fp16=False, distributed=False, *,
                 fuse_teacher=True, seed=None, compile=False, cuda_graph=False, bn_stats="global"):
        super().__init__(teacher, student)
        generator = unwrap(generator)
        if not isinstance(img_size, (tuple, list)) or len(img_size) != 3:
            raise ValueError(f"GenerativeSynthesizer: img_size must be a 3-tuple (C, H, W), got {img_size!r}")
        for name, v in (("nz", nz), ("iterations", iterations), ("synthesis_batch_size", synthesis_batch_size),
                        ("sample_batch_size", sample_batch_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"GenerativeSynthesizer: {name} must be a positive int, got {v!r}")
        for name, v in (("lr_g", lr_g), ("adv", adv), ("bn", bn), ("oh", oh), ("act", act), ("balance", balance)):
            if not _is_number(v):
                raise TypeError(f"GenerativeSynthesizer: {name} must be a number, got {type(v).__name__}")
        if criterion is not None and not callable(criterion):
            raise TypeError(f"GenerativeSynthesizer: criterion must be callable (s_out, t_out) -> loss, "
                            f"got {type(criterion).__name__}")
        if adv > 0 and student is None:
            raise ValueError("GenerativeSynthesizer: adv > 0 needs a student (got student=None)")
        self.img_size = tuple(img_size)
        self.iterations = iterations
        self.nz = nz
        if criterion is None:
            from ..losses import kldiv

            criterion = kldiv
        self.criterion = criterion
        self.synthesis_batch_size = synthesis_batch_size
        self.sample_batch_size = sample_batch_size
        self.lr_g = lr_g
        self.adv = adv
        self.bn = bn
        self.oh = oh
        self.balance = balance
        self.act = act
        self.distributed = distributed
        self._setup_core(img_size=self.img_size, normalizer=normalizer, device=device, bn_mmt=0,
                         transform=None, autocast=autocast, use_fp16=use_fp16, save_dir=None,
                         save_images=False, save_format="shard", pool_capacity=None, pool_eviction="fifo",
                         augment=False, fuse_teacher=fuse_teacher, seed=seed, compile=compile,
                         cuda_graph=cuda_graph, bn_stats=bn_stats)
        # learned jointly: rank 0's weights everywhere, gradients averaged before each step
        self.generator = self._share_generator(generator.to(self.device))
        _check_generator(self.generator, nz, self.img_size)
        self.generator.train()
        self.optimizer = make_adam(self.generator.parameters(), self.lr_g, (0.5, 0.999), self.device,
                                   capturable=self._graph_mode)
        # act: the teacher's penultimate features = the input of its last Linear layer
        self._feature_layer = None
        if act != 0:
            linears = [m for m in self.teacher.modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise ValueError("GenerativeSynthesizer: act != 0 needs the teacher's penultimate features, read as "
                                 "the input of its last nn.Linear, and the teacher has no nn.Linear")
            self._feature_layer = linears[-1]
        self._feat = None
        self._x = None  # images of the last step (a persistent buffer in graph mode)
        self._z = None  # z of the captured step (graph mode)

    # ------------------------------------------------------------------ one step
    def _feature_hook(self, module, inputs):
        self._feat = inputs[0]

    def _forward(self, z: torch.Tensor, adv_on: bool):
        """Generator, teacher, losses of one step: returns (loss, x)."""
        with nvtx_range("generator", self._nvtx):
            x = self.generator(z)
        xn = self.normalizer(x) if self.normalizer is not None else x
        with nvtx_range("teacher", self._nvtx):
            t_out = self.teacher(xn)
        with nvtx_range("losses", self._nvtx):
            # read everything taken from the teacher's forward before the student's: with
            # student=teacher (Fast-Datafree's script) its forward overwrites the statistics
            terms = []
            if self.bn != 0:
                terms.append(self.capture.loss(scale=self.bn))
            if self.act != 0:
                terms.append(self._feat.abs().mean() * (-self.act))
                self._feat = None
            if self.oh != 0 or self.balance != 0:
                logp = F.log_softmax(t_out, dim=1)
                if self.oh != 0:
                    terms.append(F.nll_loss(logp, t_out.detach().argmax(1)) * self.oh)
                if self.balance != 0:
                    p = logp.exp().mean(0)
                    terms.append(torch.special.xlogy(p, p).sum() * self.balance)
            if adv_on:
                with nvtx_range("student", self._nvtx):
                    s_out = self._student_fwd(xn)
                terms.append(self.criterion(s_out, t_out) * (-self.adv))
            if not terms:  # every coefficient 0: upstream's loss is an all-zero sum
                terms.append(t_out.sum() * 0.0)
            loss = terms[0]
            for t in terms[1:]:
                loss = loss + t
        return loss.reshape(()), x

    def _step(self, adv_on: bool, graph: bool):
        # z is drawn inside the step: every replay of a captured step draws fresh numbers
        z = self._randn(self.synthesis_batch_size, self.nz)
        fwd = self._maybe_compiled(("fwd", adv_on), self._forward)
        with self._autocast_ctx():
            loss, x = fwd(z, adv_on)
        self._log(loss)
        with nvtx_range("backward", self._nvtx):
            self._backward(loss, self.optimizer)
        self._average_grads(self.generator.parameters())
        with nvtx_range("step", self._nvtx):
            self.optimizer.step()
        if graph:
            with torch.no_grad():
                self._x.copy_(x)
        else:
            self._x = x.detach()

    # every coefficient a captured step reads as a Python number (act/balance also pick terms)
    _graph_coefficients = ("bn", "oh", "adv", "act", "balance")

    def _graph_optimizer(self):
        return self.optimizer

    def _step_tensors(self):
        return list(self.generator.parameters()) + list(self.generator.buffers()) + [self._x]

    # ------------------------------------------------------------------ API
    def synthesize(self):
        start = now()
        adv_on = self.adv > 0
        self.generator.train()
        hook = None
        with self._synthesis_mode():
            if self.bn == 0:
                self.capture.deactivate()  # no statistics work in the teacher's BatchNorm passes
            if self._feature_layer is not None:
                hook = self._feature_layer.register_forward_pre_hook(self._feature_hook)
            try:
                if self._graph_mode and self._x is None:
                    self._x = torch.zeros(self.synthesis_batch_size, *self.img_size, device=self.device)
                # no BN-statistics buffers: this loop has no BN momentum (bn_mmt) to feed
                self._run_steps(self.iterations, lambda it: self._step(adv_on, it is None), ("step", adv_on),
                                self.optimizer, stats=False)
            finally:
                if hook is not None:
                    hook.remove()
                self._feat = None
        out = self._x.clone() if self._graph_mode else self._x
        self._sync()
        end = now()
        return {"synthetic": out}, end - start

    @torch.no_grad()
    def sample(self):
        start = now()
        z = self._randn(self.sample_batch_size, self.nz)
        x = self.generator(z)
        if self.normalizer is not None:
            x = self.normalizer(x)
        end = now()
        return x, end - start
