"""dvpo's Triton kernels (installed as `dvpo.kernels`): every op of docs/math.md as fused Triton kernels
that return per-token values and the gradient w.r.t. the prediction in one launch.

    quantile_huber      terms 1-2, pairwise and tiled (kernels/quantile_huber.py)
    cvar                term 3, sorting-free: rank counting or an exact bisection select (kernels/cvar.py)
    critic_loss         term 10: the eight terms, the total and the per-head gradient (kernels/critic_loss.py)
    distributional_gae  term 11, a reverse scan (kernels/distributional_gae.py)
    reduce_tokens       the token reductions, one deterministic program (kernels/reduce_tokens.py)

The launchers take the flattened tensors of the backend kernel interface (dvpo/backends/reference.py)
on CUDA, or on CPU under TRITON_INTERPRET=1; `dvpo.backends.triton` registers them with dispatch.
Tunables (module attributes of `dvpo.kernels._common`, read at every launch): MAX_ROW, the longest row
(padded) the row-in-registers kernels take; RANK_SELECT_MAX, the longest row (padded) whose CVaR
threshold is selected by rank counting rather than by the bisection select.
"""

from ._common import interpreting
from .critic_loss import critic_loss
from .cvar import cvar
from .distributional_gae import distributional_gae
from .quantile_huber import quantile_huber
from .reduce_tokens import reduce_tokens

__all__ = ["quantile_huber", "cvar", "critic_loss", "distributional_gae", "reduce_tokens", "interpreting"]
