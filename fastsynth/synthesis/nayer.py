"""NAYER synthesizer (tmtuan1307/nayer); eager reference: ``fastsynth/bench/reference_loops.py``.

One synthesize() call:
- the generator is rebuilt with its default initialisation (``generator.reinit()``) when
  ``(ep - warmup) % g_life == 0 or ep % g_life == 0`` (ep before the increment);
- ``loops = gwp_loops`` while ``ep < warmup``, else ``g_loops``; then ``ep += 1``; zero loops
  returns ``(None, 0, 0, 0)``;
- per loop: ``re_init_le()`` (noisy layers ~ N(0, 1), bias 0), labels ``[0..C-1]`` repeated
  ``B // C`` times followed by ``B % C`` random labels, a fresh Adam over the generator (lr_g,
  betas (0.5, 0.999)), ``g_steps`` steps of ``bn*L_BN + oh*CE + adv*L_adv`` (adv only once
  ``ep > warmup``) keeping the best pre-step images, ``update_mmt``, the images to the pool;
- returns ``({"synthetic": [images per loop]}, seconds, best_cost, best_oh)``: best_cost is the
  lowest loss of the last loop (upstream resets its tracking at each loop's first step), a Python
  float read once at the end; best_oh the lowest one-hot loss of the call (a device tensor).

Differences from the reference, on purpose: the student stays in eval() for every loop (the
reference switches it to train() after the first loop, so its adversarial term in later loops
used batch statistics and moved the student's running statistics); no per-step printing.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from ..distributed import unwrap
from ..nn.generators import NoisyLayers
from .core import SynthCore
from .util import make_adam, now, nvtx_range, reset_optimizer_state_, set_fields
from .validate import check_synthesizer_args


def load_init_dataset(init_dataset, img_size):
    """Images to sample from besides the synthesized ones (``DataPool.set_init``, kept apart from
    the pool as upstream keeps its init folder): a tensor (N, C, H, W) in [0, 1] or uint8, or a
    directory (``--cmi_init``) of fastsynth uint8 shards (``shard_*.npy``) or, as upstream reads
    it, of PNG/JPG images (recursively; each of img_size, read with Pillow)."""
    if torch.is_tensor(init_dataset):
        return init_dataset
    if isinstance(init_dataset, (str, os.PathLike)) and os.path.isdir(init_dataset):
        import numpy as np

        from .png import list_images, read_images

        init_dataset = os.fspath(init_dataset)
        shards = sorted(f for f in os.listdir(init_dataset) if f.startswith("shard_") and f.endswith(".npy"))
        if shards:
            return torch.from_numpy(np.concatenate([np.load(os.path.join(init_dataset, f)) for f in shards]))
        images = list_images(init_dataset)
        if not images:
            raise ValueError(f"init_dataset: no shard_*.npy, PNG or JPG files in {init_dataset!r}")
        return read_images(images, img_size)
    raise TypeError(f"init_dataset must be a tensor or a directory of images (PNG/JPG) or shard_*.npy files, "
                    f"got {init_dataset!r}")


def nayer_targets(batch: int, num_classes: int, randint) -> torch.Tensor:
    """[0..C-1] repeated batch // C times, then batch % C random labels."""
    s, v = divmod(batch, num_classes)
    rest = randint(num_classes, (v,))
    base = torch.arange(num_classes, device=rest.device).repeat(s)
    return torch.cat([base, rest])


class NAYER(SynthCore):
    """Drop-in ``NAYER``; fastsynth keywords follow the upstream ones (see FastMetaSynthesizer;
    ``num_workers=``, passed by upstream forks, is accepted and ignored).

    Raises at construction (ValueError/TypeError) when ``g_steps`` < 1, the generator is not a
    NAYER generator (no ``reinit``/``re_init_le``), ``num_classes`` exceeds the teacher's outputs,
    or ``img_size`` crops are larger than the generator's padded images (NAYER's ImageNet script
    passes img_size=(3, 244, 244) for a 224 generator).

    torch.distributed (``SynthCore``; ``bn_stats``, ``pool_device``, ``pool_dir``): the generator
    is rank 0's (broadcast at construction and after every ``reinit()``) and its gradients are
    averaged across ranks at every step, except its noisy layers (``NoisyLayers``), which are per
    rank: each rank's re-initialisations draw from their own seeds, so ranks given the same labels
    still synthesize different images."""

    def __init__(self, teacher, student, generator, num_classes, img_size,
                 init_dataset=None, g_steps=100, lr_g=0.1,
                 synthesis_batch_size=128, sample_batch_size=128,
                 adv=0.0, bn=1, oh=1,
                 save_dir='run/fast', transform=None, autocast=None, use_fp16=False,
                 normalizer=None, device='cpu', distributed=False,
                 warmup=10, bn_mmt=0, bnt=30, oht=1.5,
                 cr_loop=1, g_life=50, g_loops=1, gwp_loops=10, dataset="cifar10", *,
                 augment=True, pool_capacity=None, pool_eviction="fifo", save_images=False,
                 save_format="shard", fuse_teacher=True, seed=None, compile=False, cuda_graph=False,
                 aug_padding=4, aug_flip=None, num_workers=None, bn_stats="global", pool_device=None,
                 pool_dir=None):
        super().__init__(teacher, student)
        generator = unwrap(generator)  # reinit()/re_init_le() are the user's module's, DDP-wrapped or not
        if isinstance(cr_loop, bool) or not isinstance(cr_loop, (int, float)) or not cr_loop > 0:
            raise ValueError(f"NAYER: cr_loop must be a positive number, got {cr_loop!r}")
        img_size = check_synthesizer_args(
            type(self).__name__, teacher=teacher, num_classes=num_classes, img_size=img_size,
            steps=("g_steps", g_steps, 1), batch=int(synthesis_batch_size / cr_loop), generator=generator,
            kind="nayer", padding=aug_padding if augment else None)
        set_fields(self, g_steps=g_steps, lr_g=lr_g, adv=adv, bn=bn, oh=oh, num_classes=num_classes,
                   distributed=distributed, synthesis_batch_size=int(synthesis_batch_size / cr_loop),
                   sample_batch_size=sample_batch_size, init_dataset=init_dataset, ep=0, ep_start=warmup,
                   g_life=g_life, bnt=bnt, oht=oht, g_loops=g_loops, gwp_loops=gwp_loops, dataset=dataset,
                   label_list=torch.arange(num_classes))
        if aug_flip is None:  # upstream: no flip for the ImageNet variants
            aug_flip = dataset not in ("imagenet", "tiny_imagenet")
        self._setup_core(img_size=img_size, normalizer=normalizer, device=device, bn_mmt=bn_mmt,
                         transform=transform, autocast=autocast, use_fp16=use_fp16, save_dir=save_dir,
                         save_images=save_images, save_format=save_format, pool_capacity=pool_capacity,
                         pool_eviction=pool_eviction, augment=augment, fuse_teacher=fuse_teacher, seed=seed,
                         compile=compile, cuda_graph=cuda_graph, aug_padding=aug_padding,
                         aug_flip=aug_flip, bn_stats=bn_stats, pool_device=pool_device, pool_dir=pool_dir)
        self.generator = self._share_nayer_generator(generator.to(self.device)).train()
        self._targets = torch.zeros(self.synthesis_batch_size, dtype=torch.long, device=self.device)
        self._best_cost = torch.full((), float("inf"), device=self.device)
        self._best_oh = torch.full((), float("inf"), device=self.device)
        self._best_x = None
        self._optimizer = None
        self._opt_owner = None
        if init_dataset is not None:
            self.data_pool.set_init(load_init_dataset(init_dataset, img_size))

    # ------------------------------------------------------------------ one inner step
    def _forward(self, adv_on: bool, aug_codes=None):
        with nvtx_range("generator", self._nvtx):
            x = self.generator(targets=self._targets)
        loss, _, loss_oh = self.objective(x, self._targets, adv_on, aug_codes, parts=True)
        return loss, x, loss_oh

    def _step(self, adv_on: bool, first: bool | None = False):
        fwd = self._maybe_compiled(("fwd", adv_on, self.capture.mmt_active, id(self.generator)), self._forward)
        loss_oh, = self._tracked_step(fwd, adv_on, first, shared=self._shared_params if self._dist else None)
        with torch.no_grad():
            torch.minimum(self._best_oh, loss_oh, out=self._best_oh)

    def _step_tensors(self):
        return list(self.generator.parameters()) + list(self.generator.buffers()) + \
            [self._best_cost, self._best_oh, self._best_x]

    def _share_nayer_generator(self, generator: nn.Module) -> nn.Module:
        """Under torch.distributed: rank 0's generator on every rank, except that each rank's
        noisy layers draw their own re-initialisations (their seed buffers are offset by
        rank * 2**40, far beyond the one-per-loop advance), so that two ranks given the same labels
        still synthesize different images; the noisy layers are per rank and their gradients
        are not averaged (``_shared_params``). Unwraps DDP."""
        generator = self._share_generator(generator)
        noisy = [m for m in generator.modules() if isinstance(m, NoisyLayers)]
        if self._dist:
            with torch.no_grad():
                for m in noisy:
                    m.seed.add_(self._rank * 2**40)
        noisy_ids = {id(p) for m in noisy for p in m.parameters()}
        self._shared_params = [p for p in generator.parameters() if id(p) not in noisy_ids]
        return generator

    # the optimizer's owner is the generator itself (saved once, as "generator")
    _STATE_SKIP = SynthCore._STATE_SKIP | {"_opt_owner", "_shared_params"}

    def _prepare_load(self, state: dict) -> None:
        # the saved run had built its Adam (first round done): build it over this generator
        if "_optimizer" in state["optimizers"] and self._opt_owner is not self.generator:
            self._ensure_optimizer()

    def _ensure_optimizer(self):
        if self._opt_owner is not self.generator:
            self._optimizer = make_adam(self.generator.parameters(), self.lr_g, (0.5, 0.999), self.device,
                                        capturable=self._graph_mode)
            self._opt_owner = self.generator
            self._close_graphs()  # captured with the old generator's tensors
            self._compiled = {}
        else:
            # upstream builds the Adam each loop from lr_g: a change between rounds counts
            for group in self._optimizer.param_groups:
                group["lr"] = self.lr_g
            reset_optimizer_state_(self._optimizer)

    def _run_inner(self, adv_on: bool):
        if self._graph_mode and self._best_x is None:
            self._best_x = torch.zeros(self.synthesis_batch_size, *self.img_size, device=self.device)
        self._run_steps(self.g_steps, lambda it: self._step(adv_on, self._first(it)), (adv_on, self.capture.mmt_active),
                        self._optimizer)

    # ------------------------------------------------------------------ synthesize
    def synthesize(self, targets=None):
        start = now()
        if (self.ep - self.ep_start) % self.g_life == 0 or self.ep % self.g_life == 0:
            g = self.generator.reinit()
            if isinstance(g, nn.Module):
                self.generator = self._share_nayer_generator(g.to(self.device)).train()
        loops = self.gwp_loops if self.ep < self.ep_start else self.g_loops
        self.ep += 1
        if loops == 0:
            return None, 0, 0, 0
        adv_on = self.adv > 0 and (self.ep > self.ep_start)
        bi_list, costs = [], []
        self._best_oh.fill_(float("inf"))
        with self._synthesis_mode():
            for _ in range(loops):
                self.generator.re_init_le()
                t = nayer_targets(self.synthesis_batch_size, self.num_classes, self._randint)
                with torch.no_grad():
                    self._targets.copy_(t)
                    self._best_cost.fill_(float("inf"))
                self._ensure_optimizer()
                self._run_inner(adv_on)
                if self.bn_mmt != 0:
                    self.capture.update_mmt()
                best = self._best_x.clone()
                bi_list.append(best)
                costs.append(self._best_cost.clone())  # the loss that picked this loop's images
        self._sync()
        end = now()
        self._add_to_pool(list(zip(bi_list, costs)))
        best_cost = float(self._best_cost)  # the one host read of the call
        return {"synthetic": bi_list}, end - start, best_cost, self._best_oh.clone()

    def generate_ys(self, cr=0.0):
        """Upstream helper: labels and their (smoothed) one-hot rows."""
        target = nayer_targets(self.synthesis_batch_size, self.num_classes, self._randint).cpu()
        ys = torch.full((self.synthesis_batch_size, self.num_classes), cr / (self.num_classes - 1))
        ys.scatter_(1, target.unsqueeze(1), 1 - cr)
        return target, ys


NayerSynthesizer = NAYER
