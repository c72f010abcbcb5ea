"""The trainer's losses (pure functions on tensors): the PPO policy surrogate, the KL estimators,
the clipped scalar value loss and the clipped distributional value loss.

All are token means over the real tokens; their optional `denom` replaces the local token count as
the divisor (under torchrun each rank passes global tokens / world size, so DDP's gradient average
is the gradient of the token mean over the global batch). Value clipping uses `clip_bounds` for
both critics (`dvpo/clipped_loss.py` says why).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from dvpo import ops

from ..clipped_loss import clip_bounds, clipped_critic_loss
from ..masked import masked_mean

__all__ = ["masked_mean", "policy_loss", "kl_penalty", "scalar_value_loss", "distributional_value_loss"]


def policy_loss(logp, old_logp, advantages, mask, clip_eps: float,
                denom: Optional[float] = None) -> Tuple[torch.Tensor, Dict]:
    """PPO clipped surrogate, token-mean over the real tokens:
    mean_t max(-A_t r_t, -A_t clip(r_t, 1 - eps, 1 + eps)), r_t = exp(logp_t - old_logp_t)."""
    ratio = torch.exp(logp - old_logp)
    loss1 = -advantages * ratio
    loss2 = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(loss1, loss2), mask, denom=denom)
    with torch.no_grad():
        stats = {"clipfrac": float(masked_mean((loss2 > loss1).float(), mask, denom=denom)),
                 "approx_kl": float(masked_mean(0.5 * (logp - old_logp) ** 2, mask, denom=denom))}
    return loss, stats


def kl_penalty(logp, ref_logp, kind: str = "k1") -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference: k1 = logp - ref (in the reward),
    k3 = exp(ref - logp) - (ref - logp) - 1 (non-negative, as a loss)."""
    if kind == "k1":
        return logp - ref_logp
    if kind == "k3":
        d = (ref_logp - logp).clamp(-20, 20)
        return torch.exp(d) - d - 1.0
    raise ValueError(kind)


def scalar_value_loss(values, old_values, returns, mask, clip: float, denom: Optional[float] = None) -> torch.Tensor:
    """0.5 * mean_t max((V - R)^2, (V_clip - R)^2), V_clip = clip(V, V_old - c, V_old + c); no
    clipping when clip <= 0. `values` may carry a trailing head dim [B, T, H] (each head, averaged)."""
    if values.dim() == returns.dim() + 1:
        returns, mask_h = returns.unsqueeze(-1), mask.unsqueeze(-1).expand_as(values)
        if denom is not None:
            denom = denom * values.shape[-1]
    else:
        mask_h = mask
    err = (values - returns) ** 2
    if clip and clip > 0:
        err = torch.maximum(err, (clip_bounds(values, old_values, clip) - returns) ** 2)
    return 0.5 * masked_mean(err, mask_h, denom=denom)


def distributional_value_loss(theta, old_theta, targets, mask, config, clip: float, taus=None,
                              denom: Optional[float] = None):
    """The DVPO critic loss through the fused op: `theta` heads [B, T, H, N], `targets` [B, T, N].

    With clip > 0 the per-token loss is max(L(theta), L(clip(theta, theta_old +- c))) per quantile
    (`dvpo.clipped_loss.clipped_critic_loss`, shared with `dvpo.integrations`), token-mean.
    Returns (loss, terms: dict of the eight per-token terms at theta)."""
    clipping = bool(clip and clip > 0)
    if not clipping and denom is None:      # the op reduces itself
        out = ops.critic_loss(theta, targets, taus, mask=mask, config=config, reduction="token-mean")
        return out.loss, out.terms
    per_token, _, terms = clipped_critic_loss(theta, targets, old_theta, mask, clip if clipping else None,
                                              config=config, taus=taus)
    return masked_mean(per_token, mask, denom=denom), terms
