"""The `triton` backend: the Triton kernels of `dvpo.kernels` (kernels/), with the kernel interface
documented in dvpo/backends/reference.py.

It runs CUDA tensors (dispatch picks it when the CUDA C++ backend is not built, or when
DVPO_BACKEND=triton) and, for the tests, CPU tensors under TRITON_INTERPRET=1 with DVPO_BACKEND=triton.
Dtypes: fp16, bf16 and fp32 inputs accumulate in fp32; fp64 inputs are computed in fp64 (on the GPU
and in the interpreter alike). Outputs follow the interface: fp32 (fp64 for fp64 inputs), the
gradient w.r.t. the prediction computed in the same launch as the values.

`algorithm`: the Triton quantile Huber is pairwise (tiled); "sorted" and "auto" run it too.
Rows longer than `dvpo.kernels._common.MAX_ROW` atoms (N or M, padded to a power of two) do not fit the
row-in-registers CVaR and critic-loss kernels: those calls fall back to the PyTorch implementation
(the `reference` backend) with a warning.
"""

from __future__ import annotations

import warnings

from .. import kernels as _k
from ..kernels import _common
from . import reference as _fallback


def _too_long(*lengths) -> bool:
    return max(_common.pow2(n) for n in lengths) > _common.MAX_ROW


def _warn_fallback(op, lengths):
    warnings.warn(f"dvpo triton backend: {op} with rows of {lengths} atoms exceeds the Triton kernels' "
                  f"limit ({_common.MAX_ROW}); running the PyTorch implementation instead", RuntimeWarning,
                  stacklevel=3)


def quantile_huber(pred, target, taus, weights, mask, kappa, normalize_kappa, algorithm="auto"):
    return _k.quantile_huber(pred, target.detach(), taus, weights, mask, kappa, normalize_kappa)


def cvar(x, level, upper):
    if _too_long(x.shape[-1]):
        _warn_fallback("cvar", (x.shape[-1],))
        return _fallback.cvar(x, level, upper)
    return _k.cvar(x.detach(), level, upper)


def critic_loss(heads, target, taus, risk_weights, mask, kappa, alpha, beta, normalize_kappa, params,
                algorithm="auto"):
    if _too_long(heads.shape[-1], target.shape[-1]):
        _warn_fallback("critic_loss", (heads.shape[-1], target.shape[-1]))
        return _fallback.critic_loss(heads, target, taus, risk_weights, mask, kappa, alpha, beta, normalize_kappa,
                                     params, algorithm)
    return _k.critic_loss(heads.detach(), target.detach(), taus, risk_weights, mask, kappa, alpha, beta,
                          normalize_kappa, params)


def distributional_gae(rewards, values, mask, gamma, lam):
    return _k.distributional_gae(rewards.detach(), values.detach(), mask, gamma, lam)


def reduce_tokens(values, mask, reduction):
    return _k.reduce_tokens(values.detach(), mask, reduction)
