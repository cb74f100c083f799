"""fastsynth's fused ops. Each op module holds its Python API, validation, backend dispatch,
fake kernels and autograd registration; kernels live in csrc/ (C++/CUDA) and kernels/ (Triton)."""
from .contrastive_loss import contrastive_ce, instance_mean_multi  # noqa: E402,F401
from .bn_stat_loss import bn_stat_loss, bn_stat_loss_multi, loss_from_stats  # noqa: E402,F401
from .logit_losses import js_divergence, kd_loss, synthesis_logit_loss  # noqa: E402,F401
from .noisy_linear import noisy_linear  # noqa: E402,F401
from .reinit import advance_seed_, make_seed, reinit_  # noqa: E402,F401
