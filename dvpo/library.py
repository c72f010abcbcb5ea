"""The `torch.library` custom ops (namespace `dvpo`) behind `dvpo.ops`.

Each op takes flattened tensors (tokens first) and returns per-token values plus the gradient with
respect to the prediction, computed in the same pass (the targets are detached, so a loss kernel
can produce its gradient in the forward, as fused cross-entropy kernels do). The autograd formula
only scales that stored gradient by the upstream gradient. Fake implementations give shapes and
dtypes, so torch.compile(fullgraph=True) traces through the ops; the real implementation picks a
backend per call (dvpo.dispatch).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import dispatch
from .config import TERM_NAMES
from .reference import acc_dtype


def _backend(op: str, t: Tensor):
    return dispatch.select(op, t.device)


# ---------------------------------------------------------------------------- quantile Huber

@torch.library.custom_op("dvpo::quantile_huber", mutates_args=())
def quantile_huber(pred: Tensor, target: Tensor, taus: Tensor, weights: Optional[Tensor],
                   mask: Optional[Tensor], kappa: float, normalize_kappa: bool,
                   algorithm: str) -> Tuple[Tensor, Tensor]:
    return _backend("quantile_huber", pred).quantile_huber(
        pred, target, taus, weights, mask, kappa, normalize_kappa, algorithm)


@quantile_huber.register_fake
def _(pred, target, taus, weights, mask, kappa, normalize_kappa, algorithm):
    acc = acc_dtype(pred.dtype)
    return pred.new_empty(pred.shape[:1], dtype=acc), pred.new_empty(pred.shape, dtype=acc)


# ---------------------------------------------------------------------------- CVaR

@torch.library.custom_op("dvpo::cvar", mutates_args=())
def cvar(x: Tensor, level: float, upper: bool) -> Tuple[Tensor, Tensor]:
    return _backend("cvar", x).cvar(x, level, upper)


@cvar.register_fake
def _(x, level, upper):
    acc = acc_dtype(x.dtype)
    return x.new_empty(x.shape[:1], dtype=acc), x.new_empty(x.shape, dtype=acc)


# ---------------------------------------------------------------------------- fused critic loss

@torch.library.custom_op("dvpo::critic_loss", mutates_args=())
def critic_loss(heads: Tensor, target: Tensor, taus: Tensor, risk_weights: Tensor, mask: Optional[Tensor],
                kappa: float, alpha: float, beta: float, normalize_kappa: bool, params: List[float],
                algorithm: str) -> Tuple[Tensor, Tensor, Tensor]:
    # params: the eight term weights, then the tail-term mode and scalars (dvpo.config.PARAM_NAMES)
    return _backend("critic_loss", heads).critic_loss(
        heads, target, taus, risk_weights, mask, kappa, alpha, beta, normalize_kappa, list(params), algorithm)


@critic_loss.register_fake
def _(heads, target, taus, risk_weights, mask, kappa, alpha, beta, normalize_kappa, params, algorithm):
    acc = acc_dtype(heads.dtype)
    t = heads.shape[0]
    return (heads.new_empty((t,), dtype=acc), heads.new_empty((t, len(TERM_NAMES)), dtype=acc),
            heads.new_empty(heads.shape, dtype=acc))


# ---------------------------------------------------------------------------- distributional GAE

@torch.library.custom_op("dvpo::distributional_gae", mutates_args=())
def distributional_gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float,
                       lam: float) -> Tuple[Tensor, Tensor]:
    return _backend("distributional_gae", values).distributional_gae(rewards, values, mask, gamma, lam)


@distributional_gae.register_fake
def _(rewards, values, mask, gamma, lam):
    acc = acc_dtype(values.dtype)
    return values.new_empty(values.shape[:2], dtype=acc), values.new_empty(values.shape, dtype=acc)


# ---------------------------------------------------------------------------- autograd

def _save_grad(ctx, inputs, output):
    """All three differentiable ops: the last output is d(per-token value)/d(first input)."""
    grad = output[-1]
    ctx.save_for_backward(grad)
    ctx.input_dtype = inputs[0].dtype
    ctx.mark_non_differentiable(*output[1:])


def _scale_grad(ctx, upstream):
    (grad,) = ctx.saved_tensors
    scale = upstream.reshape(upstream.shape + (1,) * (grad.dim() - upstream.dim()))
    return (scale.to(grad.dtype) * grad).to(ctx.input_dtype)


def _qh_backward(ctx, g_loss, _g_grad):
    return (_scale_grad(ctx, g_loss),) + (None,) * 7


def _cvar_backward(ctx, g_value, _g_coef):
    return _scale_grad(ctx, g_value), None, None


def _critic_backward(ctx, g_total, _g_terms, _g_grad):
    return (_scale_grad(ctx, g_total),) + (None,) * 10


quantile_huber.register_autograd(_qh_backward, setup_context=_save_grad)
cvar.register_autograd(_cvar_backward, setup_context=_save_grad)
critic_loss.register_autograd(_critic_backward, setup_context=_save_grad)
