"""fastsynth's fused ops. Each op module ``fastsynth/ops/<op>.py`` holds its Python API, the eager
reference ``<op>_reference`` (the upstream formulation, differentiable and float64-capable: the
oracle of the tests), validation, backend dispatch, fake kernels and autograd registration; kernels
live in csrc/ (C++/CUDA) and fastsynth/kernels/ (Triton). docs/DEVELOPING.md describes the layout."""
from .bn_stat_loss import bn_stat_loss, bn_stat_loss_multi, loss_from_stats
from .contrastive_loss import contrastive_ce, instance_mean_multi
from .fused_bn import fused_bn
from .logit_losses import js_divergence, kd_loss, synthesis_logit_loss
from .noisy_linear import noisy_linear
from .reinit import advance_seed_, make_seed, reinit_

__all__ = [
    "advance_seed_",
    "bn_stat_loss",
    "bn_stat_loss_multi",
    "contrastive_ce",
    "fused_bn",
    "instance_mean_multi",
    "js_divergence",
    "kd_loss",
    "loss_from_stats",
    "make_seed",
    "noisy_linear",
    "reinit_",
    "synthesis_logit_loss",
]
