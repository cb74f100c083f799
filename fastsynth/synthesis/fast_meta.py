"""FastDFKD synthesizers: ``FastMetaSynthesizer`` (meta-learned generator) and
``FastSynthesizer`` (the generator is updated directly); eager reference: ``fastsynth/bench/reference_loops.py``.

One synthesize() round:
1. ``ep += 1``; at ``ep == 120 + warmup`` with ``reset_l0`` the generator's first Linear and
   first BatchNorm get N(0, 0.02) weights and zero biases (FastMetaSynthesizer).
2. ``z ~ N(0, I)`` (B x nz) and labels ``randint(num_classes)`` (or the sorted given targets).
3. FastMeta: the fast generator is a copy of the slow one (copied in place into a persistent
   module, which is the same as upstream's ``clone()`` without a throwaway initialisation);
   a fresh Adam over [fast params (lr_g), z (lr_z)], betas (0.5, 0.999) (reset in place).
4. ``iterations`` inner steps of ``bn*L_BN + oh*CE + adv*L_adv`` (adv only once ep >= warmup),
   keeping the pre-step images of the lowest loss. MAML (``is_maml=1``): the slow generator's
   gradient is the SUM of the inner gradients; the meta Adam (lr_g * iterations, betas (0.5,
   0.999)) steps once after the last one. Reptile (``is_maml=0``): grad = 67 * (slow - fast).
5. ``update_mmt`` of the BN statistics (bn_mmt != 0); the best images go to the pool.
6. Returns ``({"synthetic": images in [0, 1]}, seconds)``.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..distributed import unwrap
from .core import SynthCore
from .util import make_adam, now, nvtx_range, reset_optimizer_state_, set_fields
from .validate import check_synthesizer_args

REPTILE_SCALE = 67.0  # constant of the reference implementation


def reset_l0(model: nn.Module) -> None:
    """Upstream reset_l0: modules named 'l1.0' (first Linear) and 'conv_blocks.0' (first BN)
    get N(0, 0.02) weights and zero bias."""
    for n, m in model.named_modules():
        if n in ("l1.0", "conv_blocks.0"):
            nn.init.normal_(m.weight, 0.0, 0.02)
            nn.init.constant_(m.bias, 0)


def _module_tensors(m: nn.Module) -> list:
    return list(m.parameters()) + [b for b in m.buffers()]


def _drop_batch_counters(fast: nn.Module) -> None:
    """The fast generator is thrown away after each round (its BN running statistics included,
    as upstream's clone): a BatchNorm with a fixed momentum never reads ``num_batches_tracked``,
    so the fast copy does without it (no ``add_`` per BatchNorm per step)."""
    for m in fast.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is not None and \
                getattr(m, "num_batches_tracked", None) is not None:
            m.num_batches_tracked = None


def _copy_pairs(dst: nn.Module, src: nn.Module) -> tuple[list, list]:
    """(dst tensors, src tensors) matched by name, for fast <- slow: every parameter and every
    buffer ``dst`` still has."""
    s = dict(src.named_parameters())
    s.update(dict(src.named_buffers()))
    d = list(dst.named_parameters()) + list(dst.named_buffers())
    return [t for _, t in d], [s[n] for n, _ in d]


class FastMetaSynthesizer(SynthCore):
    """Drop-in ``FastMetaSynthesizer`` (zju-vipa/Fast-Datafree); fastsynth keywords follow the
    upstream ones: ``augment`` (crop/flip inside synthesis), ``pool_capacity``/``pool_eviction``,
    ``save_images``/``save_format`` (write to save_dir in a background thread), ``fuse_teacher``,
    ``seed`` (private RNG), ``compile`` (torch.compile of the forward/loss), ``cuda_graph``
    (capture of the whole inner step).

    ``save_images``: False, True (``save_format``: "shard" or "png") or the format name itself;
    PNGs are written as upstream's ImagePool writes them (``{save_dir}/{batch}-{k}.png``).
    ``init_dataset``: a tensor or a directory of PNG/JPG images (``--cmi_init``), sampled
    together with the synthesized images but kept apart from the pool.
    ``num_workers``: accepted and ignored (upstream forks pass the DataLoader's worker count;
    sampling here never builds a DataLoader).
    ``bn_stats`` ("global" | "per_rank"), ``pool_device``, ``pool_dir``: torch.distributed and
    pool storage (``SynthCore``). Under torch.distributed the meta-generator's summed inner
    gradients (FastSynthesizer: the generator's gradients at every step) are averaged across
    ranks before its optimizer steps; z stays per rank.

    Raises at construction (ValueError/TypeError) when ``iterations`` < 1, the generator's latent
    size is not ``nz``, ``num_classes`` exceeds the teacher's outputs, or ``img_size`` crops are
    larger than the generator's padded images."""

    _meta = True

    def __init__(self, teacher, student, generator, nz, num_classes, img_size,
                 init_dataset=None, iterations=100, lr_g=0.1,
                 synthesis_batch_size=128, sample_batch_size=128,
                 adv=0.0, bn=1, oh=1,
                 save_dir='run/fast', transform=None, autocast=None, use_fp16=False,
                 normalizer=None, device='cpu', distributed=False, lr_z=0.01,
                 warmup=10, reset_l0=0, reset_bn=0, bn_mmt=0,
                 is_maml=1, *, augment=True, pool_capacity=None, pool_eviction="fifo",
                 save_images=False, save_format="shard", fuse_teacher=True, seed=None,
                 compile=False, cuda_graph=False, aug_padding=4, aug_flip=None, num_workers=None,
                 bn_stats="global", pool_device=None, pool_dir=None):
        super().__init__(teacher, student)
        generator = unwrap(generator)  # clone()/reset_l0 act on the user's module, DDP-wrapped or not
        img_size = check_synthesizer_args(
            type(self).__name__, teacher=teacher, num_classes=num_classes, img_size=img_size,
            steps=("iterations", iterations, 1), batch=synthesis_batch_size, generator=generator, kind="latent",
            nz=nz, padding=aug_padding if augment else None)
        set_fields(self, iterations=iterations, lr_g=lr_g, lr_z=lr_z, nz=nz, adv=adv, bn=bn, oh=oh, ismaml=is_maml,
                   num_classes=num_classes, distributed=distributed, synthesis_batch_size=synthesis_batch_size,
                   sample_batch_size=sample_batch_size, init_dataset=init_dataset, ep=0, ep_start=warmup,
                   reset_l0=reset_l0, reset_bn=reset_bn, prev_z=None)
        self._setup_core(img_size=img_size, normalizer=normalizer, device=device, bn_mmt=bn_mmt,
                         transform=transform, autocast=autocast, use_fp16=use_fp16, save_dir=save_dir,
                         save_images=save_images, save_format=save_format, pool_capacity=pool_capacity,
                         pool_eviction=pool_eviction, augment=augment, fuse_teacher=fuse_teacher, seed=seed,
                         compile=compile, cuda_graph=cuda_graph, aug_padding=aug_padding,
                         aug_flip=True if aug_flip is None else aug_flip, bn_stats=bn_stats,
                         pool_device=pool_device, pool_dir=pool_dir)
        # the generator is learned jointly: rank 0's weights everywhere, gradients averaged
        self.generator = self._share_generator(generator.to(self.device)).train()
        # persistent inner state: the module optimised in the inner loop, z, the inner optimiser
        if self._meta:
            self._fast = copy.deepcopy(self.generator).train()
            _drop_batch_counters(self._fast)
            self.meta_optimizer = make_adam(self.generator.parameters(), self.lr_g * self.iterations,
                                            (0.5, 0.999), self.device, capturable=self._graph_mode)
        else:
            self._fast = self.generator
        self._z = torch.zeros(synthesis_batch_size, nz, device=self.device, requires_grad=True)
        self._targets = torch.zeros(synthesis_batch_size, dtype=torch.long, device=self.device)
        self._best_x = None
        self._best_cost = torch.full((), float("inf"), device=self.device)
        self._optimizer = make_adam([{"params": list(self._fast.parameters())},
                                     {"params": [self._z], "lr": self.lr_z}],
                                    self.lr_g, (0.5, 0.999), self.device, capturable=self._graph_mode)
        if init_dataset is not None:
            from .nayer import load_init_dataset

            self.data_pool.set_init(load_init_dataset(init_dataset, img_size))

    # ------------------------------------------------------------------ one inner step
    def _forward(self, adv_on: bool, aug_codes=None):
        with nvtx_range("generator", self._nvtx):
            x = self._fast(self._z)
        loss = self.objective(x, self._targets, adv_on, aug_codes)
        return loss, x

    def _step(self, adv_on: bool, meta_accumulate: bool, first: bool | None = False):
        fwd = self._maybe_compiled(("fwd", adv_on, self.capture.mmt_active), self._forward)
        # FastSynthesizer updates the shared generator itself (param group 0; z stays per rank)
        shared = None if self._meta else self._optimizer.param_groups[0]["params"]
        self._tracked_step(fwd, adv_on, first, shared=shared,
                           on_grads=self._accumulate_meta_grads if meta_accumulate else None)

    def _accumulate_meta_grads(self, grads):
        """First-order MAML: the slow generator's grad is the sum of the inner grads (one op);
        ``grads``: param group 0 (the fast generator), then z."""
        fast = self._optimizer.param_groups[0]["params"]
        fast_grads = [g if g is not None else torch.zeros_like(p) for p, g in zip(fast, grads)]
        torch._foreach_add_(self._meta_grads, fast_grads)

    def _step_tensors(self):
        ts = _module_tensors(self._fast) + [self._z, self._best_cost, self._best_x]
        if self._meta and self.ismaml:
            ts += self._meta_grads
        return ts

    def _run_inner(self, adv_on: bool):
        meta = self._meta and self.ismaml
        if self._graph_mode and self._best_x is None:
            self._best_x = torch.zeros(self.synthesis_batch_size, *self.img_size, device=self.device)
        self._run_steps(self.iterations, lambda it: self._step(adv_on, meta, self._first(it)),
                        (adv_on, self.capture.mmt_active, meta), self._optimizer)

    # ------------------------------------------------------------------ synthesize
    def _begin_round(self, targets=None):
        """Fresh z and labels, fast <- slow, inner optimizer and best tracking reset (in place)."""
        with torch.no_grad():
            self._z.copy_(self._randn(self.synthesis_batch_size, self.nz))
            if targets is None:
                t = self._randint(self.num_classes, (self.synthesis_batch_size,))
            else:
                t = targets.sort()[0].to(self.device)
            self._targets.copy_(t)
            if self._meta:
                # fast <- slow (the upstream clone()), in place
                torch._foreach_copy_(*_copy_pairs(self._fast, self.generator))
            self._best_cost.fill_(float("inf"))
        # upstream builds the inner Adam each round from lr_g / lr_z: a change between rounds counts
        self._optimizer.param_groups[0]["lr"] = self.lr_g
        self._optimizer.param_groups[1]["lr"] = self.lr_z
        reset_optimizer_state_(self._optimizer)
        if self._meta and self.ismaml:
            # the summed inner gradients go to buffers this object owns (a captured step writes
            # them by address; the generator's .grad may be set to None or replaced between
            # rounds); _end_round hands them to the meta optimizer as the .grad
            params = list(self.generator.parameters())
            mg = getattr(self, "_meta_grads", None)
            if mg is None or len(mg) != len(params) or any(
                    b.shape != p.shape or b.dtype != p.dtype or b.device != p.device for b, p in zip(mg, params)):
                self._meta_grads = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in params]
                self._close_graphs()  # captured with the old buffers
            else:
                torch._foreach_zero_(mg)

    def _end_round(self):
        if self._meta and self.ismaml and self.iterations > 0:
            self._average_grads(self._meta_grads)  # one all_reduce per round under torch.distributed
            for p, g in zip(self.generator.parameters(), self._meta_grads):
                p.grad = g
            self.meta_optimizer.step()
        if self.bn_mmt != 0:
            self.capture.update_mmt()
        if self._meta and not self.ismaml:
            # Reptile meta gradient
            with torch.no_grad():
                for p, q in zip(self.generator.parameters(), self._fast.parameters()):
                    p.grad = (p - q) * REPTILE_SCALE
            self._average_grads(self.generator.parameters())
            self.meta_optimizer.step()

    def synthesize(self, targets=None):
        start = now()
        self.ep += 1
        if self._meta and (self.ep == 120 + self.ep_start) and self.reset_l0:
            reset_l0(self.generator)
            self._share_generator(self.generator)  # reset_l0 draws from each rank's default generator
        adv_on = self.adv > 0 and (self.ep >= self.ep_start)
        with self._synthesis_mode():
            self._begin_round(targets)
            self._run_inner(adv_on)
            self._end_round()
        best = self._best_x.clone()
        self.prev_z = (self._z.detach().clone(), self._targets.clone())
        cost = self._best_cost.clone()
        self._sync()
        end = now()
        self._add_to_pool([(best, cost)])
        return {"synthetic": best}, end - start


class FastSynthesizer(FastMetaSynthesizer):
    """Drop-in ``FastSynthesizer``: the same loop, updating the generator itself (no meta step,
    no reset_l0), with a fresh Adam over [generator (lr_g), z (lr_z)] each call."""

    _meta = False
