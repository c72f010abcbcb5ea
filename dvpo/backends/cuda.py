"""The `cuda` backend: the hand-written CUDA C++ kernels of the `dvpo._cuda_C` extension (csrc/cuda),
exposed with the kernel interface documented in dvpo/backends/reference.py.

Importing this module fails (and dispatch falls back to Triton / the reference) unless the CUDA
extension was built: `dvpo._C` defines the `dvpo_C` operator schemas, `dvpo._cuda_C` registers their
CUDA implementations, so `_C` is imported first. The tensors passed here are CUDA tensors (dispatch
only picks this backend for them). Per-token values and gradients come back in the accumulation
dtype (fp64 for fp64 inputs, else fp32), computed in one pass, deterministic (no atomics).

`algorithm` is accepted for the interface and ignored: every CUDA kernel is pairwise for now
(the sorted O((N + M) log M) kernel exists on the CPU side only).
"""

import torch

from .. import _C  # noqa: F401  (defines the torch.ops.dvpo_C schemas)
from .. import _cuda_C  # noqa: F401  (registers their CUDA kernels)

_ops = torch.ops.dvpo_C


def quantile_huber(pred, target, taus, weights, mask, kappa, normalize_kappa, algorithm="auto"):
    return _ops.quantile_huber(pred, target, taus, weights, mask, float(kappa), bool(normalize_kappa), algorithm)


def cvar(x, level, upper):
    return _ops.cvar(x, float(level), bool(upper))


def critic_loss(heads, target, taus, risk_w, mask, kappa, alpha, beta, normalize_kappa, params,
                algorithm="auto"):
    # params: the eight term weights, then tail_mode (0 recipe, 1 consistent), lo_scale, hi_scale and
    # shift_expectile (dvpo.config.PARAM_NAMES; CriticLossConfig.kernel_params()).
    return _ops.critic_loss(heads, target, taus, risk_w, mask, float(kappa), float(alpha), float(beta),
                            bool(normalize_kappa), [float(p) for p in params], algorithm)


def distributional_gae(rewards, values, mask, gamma, lam):
    return _ops.distributional_gae(rewards, values, mask, float(gamma), float(lam))
