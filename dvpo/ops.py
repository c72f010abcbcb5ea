"""dvpo's public ops (DESIGN.md, "Public API"): validated, shape-flattening wrappers over the
`torch.library` ops in dvpo.library, with the mask-aware reductions in PyTorch."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import dispatch, library
from . import reference as ref
from . import validation as check
from .config import TERM_NAMES, CriticLossConfig, CriticLossOutput

__all__ = ["quantile_huber", "risk_weights", "cvar", "critic_loss", "distributional_gae", "backends"]


def backends(device=None):
    """Each backend with 'available' or why not (for `device`, when given)."""
    return dispatch.backends(device)


def _tokens(lead) -> int:
    return math.prod(lead)


def _mask_arg(mask, acc):
    """The kernels take the mask as a flat per-token weight in the accumulation dtype."""
    return None if mask is None else mask.reshape(-1).to(acc)


def _taus_arg(taus, n, like, acc):
    if taus is None:
        return ref.taus(n, device=like.device, dtype=acc)
    check.vector("taus", taus, n, like.device)
    return taus.to(acc)


def risk_weights(taus: Tensor, gamma: float = 1.0) -> Tensor:
    """Term 2's weights exp(-gamma tau_i) / mean_k exp(-gamma tau_k) (largest at the low quantiles)."""
    check.tensor("taus", taus)
    if taus.dim() != 1:
        raise ValueError(f"taus must have shape [N], got {tuple(taus.shape)}")
    check.finite("gamma", gamma)
    return ref.risk_weights(taus, gamma)


def quantile_huber(pred: Tensor, target: Tensor, taus: Optional[Tensor] = None, *, kappa: float = 1.0,
                   weights: Optional[Tensor] = None, normalize_kappa: bool = False,
                   mask: Optional[Tensor] = None, reduction: str = "token-mean",
                   algorithm: str = "auto") -> Tensor:
    """Quantile Huber loss of `pred` [..., N] against `target` [..., M] (terms 1 and 2).

    `algorithm`: "pairwise" (O(N M) per token), "sorted" (targets sorted once, O((N + M) log M)) or
    "auto" (the backend picks by shape); backends without a sorted kernel run pairwise."""
    check.tensor("pred", pred)
    check.tensor("target", target)
    check.same_device_dtype("pred", pred, "target", target)
    lead = pred.shape[:-1]
    if target.shape[:-1] != lead:
        raise ValueError(f"target must have leading dims {tuple(lead)} like pred, got shape {tuple(target.shape)}")
    check.positive("kappa", kappa)
    check.mask(mask, lead, pred.device)
    check.reduction(reduction)
    check.algorithm(algorithm)
    n, m = pred.shape[-1], target.shape[-1]
    acc = ref.acc_dtype(pred.dtype)
    t = _taus_arg(taus, n, pred, acc)
    if weights is not None:
        check.vector("weights", weights, n, pred.device)
        weights = weights.to(acc)
    tokens = _tokens(lead)
    loss, _ = library.quantile_huber(pred.reshape(tokens, n), target.detach().reshape(tokens, m), t, weights,
                                     _mask_arg(mask, acc), float(kappa), bool(normalize_kappa), algorithm)
    return ref.reduce_tokens(loss.reshape(lead), mask, reduction)


def cvar(x: Tensor, level: float, *, upper: bool = False) -> Tensor:
    """Sorting-free CVaR of the last dim's equally weighted atoms at `level` (upper tail with `upper`)."""
    check.tensor("x", x)
    check.level("level", level)
    lead, n = x.shape[:-1], x.shape[-1]
    value, _ = library.cvar(x.reshape(_tokens(lead), n), float(level), bool(upper))
    return value.reshape(lead)


def critic_loss(theta: Tensor, target: Tensor, taus: Optional[Tensor] = None, *, mask: Optional[Tensor] = None,
                config: Optional[CriticLossConfig] = None, reduction: str = "token-mean",
                algorithm: str = "auto", deterministic: bool = False) -> CriticLossOutput:
    """The fused DVPO critic loss (term 10): `theta` is [..., N] or heads [..., H, N].

    `deterministic` is accepted for the contract: every backend's reductions run in a fixed order,
    so results are bitwise reproducible either way.
    """
    check.tensor("theta", theta)
    check.tensor("target", target)
    check.same_device_dtype("theta", theta, "target", target)
    config = CriticLossConfig() if config is None else config
    if not isinstance(config, CriticLossConfig):
        raise ValueError(f"config must be a dvpo.CriticLossConfig or None, got {type(config).__name__}")
    check.reduction(reduction)
    check.algorithm(algorithm)
    has_heads = theta.dim() == target.dim() + 1
    heads = theta if has_heads else theta.unsqueeze(-2)
    lead = target.shape[:-1]
    if heads.shape[:-2] != lead:
        raise ValueError(f"theta must be [..., N] or [..., H, N] with leading dims {tuple(lead)} like target, "
                         f"got shape {tuple(theta.shape)}")
    check.mask(mask, lead, theta.device)
    h, n, m = heads.shape[-2], heads.shape[-1], target.shape[-1]
    acc = ref.acc_dtype(theta.dtype)
    t = _taus_arg(taus, n, theta, acc)
    risk_w = ref.risk_weights(t, config.risk_gamma) if config.risk else torch.ones_like(t)
    tokens = _tokens(lead)
    total, terms, _ = library.critic_loss(
        heads.reshape(tokens, h, n), target.detach().reshape(tokens, m), t, risk_w, _mask_arg(mask, acc),
        float(config.kappa), float(config.alpha), float(config.beta), bool(config.normalize_kappa),
        config.term_weights(), algorithm)
    terms = terms.reshape(lead + (len(TERM_NAMES),))
    return CriticLossOutput(
        loss=ref.reduce_tokens(total.reshape(lead), mask, reduction),
        terms={name: terms[..., k] for k, name in enumerate(TERM_NAMES)},
    )


def distributional_gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0,
                       lam: float = 0.95):
    """Distributional GAE (term 11): returns (advantages [B, T], returns [B, T, M]), 0 at padding."""
    check.tensor("values", values, min_dim=3)
    if values.dim() != 3:
        raise ValueError(f"values must have shape [B, T, M], got {tuple(values.shape)}")
    check.tensor("rewards", rewards)
    if values.device != rewards.device:
        raise ValueError(f"rewards must be on the same device as values ({values.device}), got {rewards.device}")
    if tuple(rewards.shape) != tuple(values.shape[:2]):
        raise ValueError(f"rewards must have shape {tuple(values.shape[:2])} ([B, T] of values), "
                         f"got {tuple(rewards.shape)}")
    if mask is None:
        raise ValueError("mask must be a [B, T] tensor (1 = real token), got None")
    check.mask(mask, values.shape[:2], values.device)
    check.unit_interval("gamma", gamma)
    check.unit_interval("lam", lam)
    acc = ref.acc_dtype(values.dtype)
    return library.distributional_gae(rewards.detach().to(acc), values.detach(), mask.to(acc),
                                      float(gamma), float(lam))
