"""``FastMetaSynthesizerForImageNet``: FastDFKD's ImageNet synthesizer (zju-vipa/Fast-Datafree
``datafree/synthesis/fast_meta_imagenet.py``, driven by ``datafree_kd_imagenet.py``).

One synthesize() round (upstream behaviour; the class docstring lists where this differs):
1. ``ep += 1``; every ``reinit`` rounds (``reinit > 0`` and ``ep % reinit == 0``) the meta latent
   ``z_meta`` is drawn afresh from N(0, I) and the meta Adam restarts from zero state.
2. The round's z is the meta-learned spatial latent ``z_meta`` [B, nz, H/16, W/16] (upstream's
   ``self.z.detach()`` shares its storage: the inner steps move z_meta too);
   labels ``randint(num_classes)`` (or the given targets, unsorted).
3. The fast generator is a copy of the slow one; a fresh Adam over [fast params (lr_g), z (lr_z)],
   betas (0.5, 0.999).
4. ``iterations`` inner steps of ``bn * L_BN + oh * CE + adv * L_adv`` (adv whenever adv > 0) on
   the RandomResizedCrop(scale 0.75-1) + flip + normalised images; the first step's images are
   the round's "meta" images, the last step's (its pre-step images) the "synthetic" ones.
5. ``update_mmt`` of the BN statistics (bn_mmt != 0). Meta step, Adam over [generator
   (lr_g_meta), z_meta (lr_z_meta)], betas (0.5, 0.999): FOMAML (``is_maml=1``) takes the last
   inner step's gradients as the meta gradients; Reptile (``is_maml=0``) takes slow - fast.
6. The synthetic images go to the pool. Returns ``({"synthetic": x, "meta": x_meta},
   {"loss_bn": float, "loss_oh": float}, seconds)``: images in [0, 1], the last step's
   unweighted BN-statistics loss and cross-entropy.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..distributed import unwrap
from .core import SynthCore
from .fast_meta import _copy_pairs, _drop_batch_counters, _module_tensors
from .resized_crop import ResizedCropAugment
from .util import make_adam, now, nvtx_range, reset_optimizer_state_, set_fields
from .validate import check_int, check_synthesizer_args, meta_output

# upstream's in-synthesis augmentation: kornia RandomResizedCrop(size=img_size, scale=[0.75, 1.0])
# (default aspect ratios 3/4 .. 4/3) and RandomHorizontalFlip()
AUG_SCALE = (0.75, 1.0)
AUG_RATIO = (3.0 / 4.0, 4.0 / 3.0)
Z_STRIDE = 16  # z is [B, nz, H/16, W/16]
Z_META_GRADS = ("grad", "value")


def _check_spatial_generator(owner: str, generator: nn.Module, nz: int, img_size: tuple) -> None:
    """The generator must turn z [B, nz, H/16, W/16] into images [B, C, H, W] (a shape-only
    forward on the meta device; skipped where that forward cannot run)."""
    c, h, w = img_size
    if h % Z_STRIDE or w % Z_STRIDE:
        raise ValueError(f"{owner}: img_size={tuple(img_size)} is not supported: the latent is "
                         f"[B, nz, H/{Z_STRIDE}, W/{Z_STRIDE}], so H and W must be positive multiples of {Z_STRIDE}")
    zs = (h // Z_STRIDE, w // Z_STRIDE)
    out = meta_output(generator, torch.empty(2, nz, *zs, device="meta"))
    if out is None:
        # the shape-only forward failed: a generator that does not take spatial z at all (e.g. the
        # 32px Generator, whose Linear wants [B, nz]) raises here with its own message
        if any(isinstance(m, nn.Linear) for m in generator.modules()) and not hasattr(generator, "z_size"):
            raise ValueError(f"{owner}: the generator ({type(generator).__name__}) does not take a spatial latent "
                             f"z [B, nz={nz}, {zs[0]}, {zs[1]}]; FastMetaSynthesizerForImageNet needs a "
                             f"fully convolutional generator such as DeepGenerator")
        return
    if out.dim() != 4 or tuple(out.shape[1:]) != (c, h, w):
        raise ValueError(f"{owner}: img_size={tuple(img_size)} is not supported by the generator "
                         f"({type(generator).__name__}): z [B, nz={nz}, {zs[0]}, {zs[1]}] gives images of shape "
                         f"{tuple(out.shape[1:])}, expected {(c, h, w)}")


class FastMetaSynthesizerForImageNet(SynthCore):
    """Drop-in ``FastMetaSynthesizerForImageNet`` (zju-vipa/Fast-Datafree): same constructor
    arguments and defaults, same return tuple (module docstring), running through fastsynth's
    fused path: the fused teacher with its BN statistics and the one multi-layer BN-statistics
    loss, the fused CE + masked-KL logit loss, frozen teacher/student weights (no weight
    gradients), in-place persistent inner state (fast generator, z, inner Adam), an optional
    compiled forward (``compile``) or captured inner step (``cuda_graph``), the device pool.

    Keyword-only extras (as the other synthesizers): ``augment`` (False: normalisation only),
    ``pool_capacity``/``pool_eviction``, ``save_images``/``save_format``, ``fuse_teacher``,
    ``seed`` (private RNG: z_meta, labels, crop boxes), ``compile``, ``cuda_graph``,
    ``aug_scale``/``aug_ratio``/``aug_flip`` (the in-synthesis RandomResizedCrop, upstream's by
    default), ``z_meta_grad`` (below).

    Where this differs from upstream, and why:

    - Upstream's ImageNet path does not run as published: ``datafree_kd_imagenet.py`` has a
      SyntaxError (``assert args.dataset=='imagenet':``), and with that fixed, FOMAML's
      ``fomaml_grad`` reads ``.grad`` of every fast-generator parameter, but ``DeepGenerator``
      keeps an ``l1`` Linear that its forward never uses, whose ``.grad`` is None
      (AttributeError). Intended, and done here: a parameter the forward does not use gets a zero
      meta gradient (Adam then leaves it unchanged).
    - ``fomaml_grad(self.z, z)`` adds the adapted z's *value* (``tar.data``) as z_meta's gradient,
      where the module branch of the same function adds gradients: a slip for ``tar.grad``.
      Default here (``z_meta_grad="grad"``): z_meta's meta gradient is the last inner step's
      gradient of z, as for the generator. ``z_meta_grad="value"`` reproduces upstream's literal
      update.
    - Augmentation: kornia's RandomResizedCrop + RandomHorizontalFlip as one batched
      affine_grid/grid_sample on the device (``fastsynth.synthesis.resized_crop``): the same box
      distribution (torchvision's 10 tries then the centred fallback), continuous box positions
      (kornia/torchvision round to pixels), bilinear resampling at pixel centres; boxes drawn from
      the synthesizer's own generator, not the global RNG.
    - ``sample()``: one normalised batch from the device pool; a ``transform`` with a
      RandomResizedCrop (the ImageNet train transform) is applied as a batched RandomResizedCrop
      (+ flip, Normalize) on the device instead of a rebuilt DataLoader of PNGs.
    - Pool images with NaN/Inf (or from a non-finite loss) are dropped (fastsynth's pool policy).
    - Kept from upstream although it may look unintended: the round's z is ``self.z.detach()``,
      which shares ``self.z``'s storage, so the inner Adam steps move ``z`` (z_meta) in place
      and the meta step is applied on top of the adapted z; under Reptile z's meta gradient
      ``self.z - z`` is therefore zero.
    - As upstream, ``start_kd`` (kept as ``ep_start``), ``rand_label``, ``reset_l0``, ``reset_bn``,
      ``meta_lr_scale`` and ``lr_diff`` are stored and not used by the loop, and adv applies from
      the first round on; ``distributed`` is stored (sampling uses no DistributedSampler).
    - The returned losses are floats as upstream (read once at the end of the round, which syncs
      anyway to time it); nothing reads the device inside the inner steps.

    Raises at construction (ValueError/TypeError naming the argument) when ``iterations`` < 1,
    ``img_size`` is not (C, H, W) with H and W multiples of 16 or is not what the generator makes
    from z [B, nz, H/16, W/16], the generator does not take a spatial latent, ``num_classes``
    exceeds the teacher's outputs, ``reinit`` < 0 or ``z_meta_grad`` is unknown."""

    def __init__(self, teacher, student, generator, nz, num_classes, img_size,
                 init_dataset=None, iterations=100, lr_g=1e-3, lr_z=1e-3, lr_z_meta=1e-3, lr_g_meta=1e-3,
                 synthesis_batch_size=128, sample_batch_size=128, reinit=0,
                 adv=0.0, bn=1, oh=1, meta_lr_scale=1.0,
                 save_dir='run/fast', transform=None, autocast=None, use_fp16=False,
                 normalizer=None, device='cpu', distributed=False,
                 start_kd=10, rand_label=1, reset_l0=0, reset_bn=0, bn_mmt=0,
                 lr_diff=0, is_maml=1, *, augment=True, pool_capacity=None, pool_eviction="fifo",
                 save_images=False, save_format="shard", fuse_teacher=True, seed=None,
                 compile=False, cuda_graph=False, aug_scale=AUG_SCALE, aug_ratio=AUG_RATIO, aug_flip=True,
                 z_meta_grad="grad", num_workers=None, bn_stats="global", pool_device=None, pool_dir=None):
        super().__init__(teacher, student)
        generator = unwrap(generator)  # clone() acts on the user's module, DDP-wrapped or not
        owner = type(self).__name__
        # padding=None: the crop-fits-the-padded-image check of the 32px synthesizers does not
        # apply (a resized crop resamples); the spatial check below replaces it
        img_size = check_synthesizer_args(
            owner, teacher=teacher, num_classes=num_classes, img_size=img_size,
            steps=("iterations", iterations, 1), batch=synthesis_batch_size, generator=generator, kind="latent",
            nz=nz, padding=None)
        _check_spatial_generator(owner, generator, nz, img_size)
        check_int(owner, "reinit", reinit, 0)
        if z_meta_grad not in Z_META_GRADS:
            raise ValueError(f"{owner}: z_meta_grad must be one of {Z_META_GRADS}, got {z_meta_grad!r}")
        set_fields(self, iterations=iterations, lr_g=lr_g, lr_z=lr_z, lr_z_meta=lr_z_meta, lr_g_meta=lr_g_meta,
                   nz=nz, adv=adv, bn=bn, oh=oh, reinit=reinit, lr_diff=lr_diff, ismaml=is_maml,
                   meta_lr_scale=meta_lr_scale, num_classes=num_classes, distributed=distributed,
                   synthesis_batch_size=synthesis_batch_size, sample_batch_size=sample_batch_size,
                   init_dataset=init_dataset, ep=0, ep_start=start_kd, rand_label=rand_label, reset_l0=reset_l0,
                   reset_bn=reset_bn, z_meta_grad=z_meta_grad)
        self._setup_core(img_size=img_size, normalizer=normalizer, device=device, bn_mmt=bn_mmt,
                         transform=transform, autocast=autocast,
                         use_fp16=use_fp16, save_dir=save_dir,
                         save_images=save_images, save_format=save_format, pool_capacity=pool_capacity,
                         pool_eviction=pool_eviction, augment=augment, fuse_teacher=fuse_teacher, seed=seed,
                         compile=compile, cuda_graph=cuda_graph, aug_padding=0, aug_flip=aug_flip,
                         bn_stats=bn_stats, pool_device=pool_device, pool_dir=pool_dir)
        hw = tuple(img_size[-2:])
        self.aug = ResizedCropAugment(normalizer, size=hw, scale=aug_scale, ratio=aug_ratio, flip=bool(aug_flip),
                                      enabled=augment)
        # the meta-generator is learned jointly: rank 0's weights everywhere, meta gradients
        # averaged (the meta latent z stays per rank)
        self.generator = self._share_generator(generator.to(self.device)).train()
        zshape = (synthesis_batch_size, nz, hw[0] // 16, hw[1] // 16)
        # the meta-learned latent (upstream's self.z) and its meta optimizer
        self.z = self._randn(*zshape).requires_grad_()
        self.meta_optimizer = make_adam([{"params": list(self.generator.parameters())},
                                         {"params": [self.z], "lr": lr_z_meta}], lr_g_meta, (0.5, 0.999), self.device)
        # persistent inner state: the fast generator, the round's z, the inner optimizer
        self._fast = copy.deepcopy(self.generator).train()
        _drop_batch_counters(self._fast)
        self._z = torch.zeros(zshape, device=self.device, requires_grad=True)
        self._targets = torch.zeros(synthesis_batch_size, dtype=torch.long, device=self.device)
        self._optimizer = make_adam([{"params": list(self._fast.parameters())},
                                     {"params": [self._z], "lr": self.lr_z}],
                                    self.lr_g, (0.5, 0.999), self.device, capturable=self._graph_mode)
        # what a captured step leaves for the end of the round (static buffers; eager steps hand
        # their tensors over directly): last images, [loss, bn term, CE], last inner gradients
        self._last_x = None
        self._last_vals = None
        self._last_grads = None
        if init_dataset is not None:
            from .nayer import load_init_dataset

            self.data_pool.set_init(load_init_dataset(init_dataset, img_size))

    # ------------------------------------------------------------------ one inner step
    def _forward(self, adv_on: bool, aug_codes=None):
        """x = fast(z) -> augment -> teacher; returns (loss, bn term, CE, x). The bn term is
        ``bn * L_BN`` when bn != 0 (the coefficient folded into the fused loss), else L_BN
        (reported only, as upstream computes it in every forward); both terms detached."""
        with nvtx_range("generator", self._nvtx):
            x = self._fast(self._z)
        loss, loss_bn, loss_oh = self.objective(x, self._targets, adv_on, aug_codes, parts=True, report_bn=True)
        if not adv_on:
            loss_oh = loss_oh.detach()  # the fused adversarial loss returns it detached already
        return loss, loss_bn, loss_oh, x

    def _step(self, graph: bool, adv_on: bool):
        fwd = self._maybe_compiled(("fwd", adv_on, self.capture.mmt_active), self._forward)
        aug_codes = self._draw_aug(self._z.shape[0])
        with self._autocast_ctx():
            loss, loss_bn, loss_oh, x = fwd(adv_on, aug_codes)
        self._log(loss)
        with nvtx_range("backward", self._nvtx):
            grads = self._backward(loss, self._optimizer)  # [fast..., z], in their parameters' strides
        with nvtx_range("step", self._nvtx):
            self._optimizer.step()
        x = x.detach()
        vals = torch.stack([loss.detach().float().reshape(()), loss_bn.float().reshape(()),
                            loss_oh.float().reshape(())])
        if graph:
            with torch.no_grad():
                self._last_x.copy_(x)
                self._last_vals.copy_(vals)
                if self._last_grads is not None:
                    torch._foreach_copy_(self._last_grads, self._dense(grads))
            return None
        return x, vals, grads

    def _dense(self, grads):
        """Zeros for parameters the loss does not use (DeepGenerator's l1), as the meta gradient."""
        params = [p for g in self._optimizer.param_groups for p in g["params"]]
        return [g if g is not None else torch.zeros_like(p) for p, g in zip(params, grads)]

    def _step_tensors(self):
        return _module_tensors(self._fast) + [self._z, self._last_x, self._last_vals] + (self._last_grads or [])

    def _run_inner(self, adv_on: bool):
        """Returns (meta images, last images, [loss, bn term, CE] of the last step, last grads)."""
        want_grads = bool(self.ismaml)
        if self._graph_mode and self._last_x is None:
            self._last_x = torch.zeros(self.synthesis_batch_size, *self.img_size, device=self.device)
            self._last_vals = torch.zeros(3, device=self.device)
        if self._graph_mode and want_grads and self._last_grads is None:
            params = [p for g in self._optimizer.param_groups for p in g["params"]]
            self._last_grads = [torch.zeros_like(p) for p in params]
        meta = []

        def after(it, out):  # the first step's images are the round's "meta" images
            if it == 0:
                meta.append(out[0] if out is not None else self._last_x.clone())

        out = self._run_steps(self.iterations, lambda it: self._step(it is None, adv_on),
                              (adv_on, self.capture.mmt_active, want_grads), self._optimizer, after=after)
        if out is not None:
            x, vals, grads = out
            return meta[0], x, vals, self._dense(grads)
        return meta[0], self._last_x.clone(), self._last_vals.clone(), self._last_grads

    # ------------------------------------------------------------------ synthesize
    def _begin_round(self, targets=None):
        if self.reinit > 0 and self.ep % self.reinit == 0:
            # upstream draws a new self.z and builds a new meta Adam (the generator is kept)
            with torch.no_grad():
                self.z.copy_(self._randn(*self.z.shape))
            self.meta_optimizer.param_groups[0]["lr"] = self.lr_g_meta
            self.meta_optimizer.param_groups[1]["lr"] = self.lr_z_meta
            reset_optimizer_state_(self.meta_optimizer)
        with torch.no_grad():
            self._z.copy_(self.z)
            if targets is None:
                t = self._randint(self.num_classes, (self.synthesis_batch_size,))
            else:
                t = torch.as_tensor(targets).to(self.device)
                if t.shape != self._targets.shape:
                    raise ValueError(f"{type(self).__name__}.synthesize: targets must have shape "
                                     f"({self.synthesis_batch_size},) (synthesis_batch_size labels), got "
                                     f"{tuple(t.shape)}")
            self._targets.copy_(t)
            torch._foreach_copy_(*_copy_pairs(self._fast, self.generator))  # fast <- slow (clone())
        self._optimizer.param_groups[0]["lr"] = self.lr_g
        self._optimizer.param_groups[1]["lr"] = self.lr_z
        reset_optimizer_state_(self._optimizer)

    def _end_round(self, last_grads):
        if self.bn_mmt != 0:
            self.capture.update_mmt()
        gen_params = list(self.generator.parameters())
        with torch.no_grad():
            # upstream's round z is ``self.z.detach()``, which shares self.z's storage: the inner
            # steps move z_meta itself, and the meta step starts from the adapted z
            self.z.copy_(self._z)
            if self.ismaml:
                # first-order MAML: the adapted model's (last inner step's) gradients
                # (the fused meta Adam only reads .grad: no copies of the gradient buffers)
                for p, g in zip(gen_params, last_grads[:-1]):
                    p.grad = g
                self.z.grad = last_grads[-1] if self.z_meta_grad == "grad" else self._z.detach().clone()
            else:
                # Reptile: slow - fast (zero for z, which already is the adapted z, as upstream)
                for p, q in zip(gen_params, self._fast.parameters()):
                    p.grad = p - q
                self.z.grad = torch.zeros_like(self.z)
        self._average_grads(gen_params)
        self.meta_optimizer.step()

    def synthesize(self, targets=None):
        start = now()
        self.ep += 1
        adv_on = self.adv > 0
        self.generator.train()
        with self._synthesis_mode():
            self._begin_round(targets)
            meta_x, x, vals, grads = self._run_inner(adv_on)
            self._end_round(grads)
        loss, loss_bn, loss_oh = vals.tolist()  # one read, after the round (synthesize syncs to time it)
        if self.bn != 0:
            loss_bn = loss_bn / self.bn
        end = now()
        self._add_to_pool([(x, vals[0])])
        return {"synthetic": x, "meta": meta_x}, {"loss_bn": loss_bn, "loss_oh": loss_oh}, end - start
