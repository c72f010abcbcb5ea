"""Advantage estimators (pure functions on tensors), used by the algorithms in `algorithms/`.

Per-token tensors are `[B, T]` over response tokens with a mask (1 = real token, EOS included).
Whitening over the (global) batch is the trainer's step after these (`dvpo.masked.masked_whiten`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from dvpo import ops
from dvpo import reference

from ..masked import masked_whiten


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (0 for an empty row)."""
    t = mask.shape[1]
    idx = torch.arange(t, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), idx, torch.zeros_like(idx)).max(dim=1).values


def token_rewards(outcome: torch.Tensor, mask: torch.Tensor, kl: Optional[torch.Tensor] = None,
                  kl_coef: float = 0.0) -> torch.Tensor:
    """Per-token rewards: -kl_coef * kl_t at every real token, plus the outcome at the last one."""
    r = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    if kl is not None and kl_coef:
        r = r - kl_coef * kl.float()
    last = last_token_index(mask)
    r[torch.arange(mask.shape[0], device=mask.device), last] += outcome.float()
    return r * mask.float()


ADVANTAGE_KINDS = ("mean", "cvar", "trim")


def parse_advantage(spec: str) -> Tuple[str, float]:
    """'mean', 'cvar:ALPHA' (the lower-tail CVaR of the per-quantile advantages) or 'trim:ALPHA' (the
    mean advantage with its negative side floored at the critic's own alpha-quantile deviation)."""
    if spec in ("mean", "", None):
        return "mean", 0.0
    kind, _, value = str(spec).partition(":")
    if kind in ("cvar", "trim"):
        try:
            alpha = float(value)
        except ValueError:
            alpha = float("nan")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"advantage {kind}:ALPHA needs ALPHA in (0, 1], got {value!r}")
        return kind, alpha
    raise ValueError(f"advantage must be 'mean', 'cvar:ALPHA' or 'trim:ALPHA', got {spec!r}")


def dvpo_advantages(rewards, quantiles, mask, *, gamma: float, lam: float, advantage: str = "mean"):
    """(raw advantages [B, T], critic targets [B, T, N]) from the ensemble quantiles [B, T, N].

    mean: mean_j A_t,j (PPO's GAE with the fan's mean as the baseline). cvar:ALPHA: the lower CVaR over
    j of A_t,j (risk-averse: tokens with a wide fan lose). trim:ALPHA: max(mean_j A_t,j, q_alpha(V_t) -
    mean_j V_t,j): a return below what the critic itself puts at its alpha-quantile counts only as
    that quantile, so a single surprising low reward (a flipped label) cannot push the policy down
    further than the critic's lower tail; positive advantages are kept whole (docs/math.md, 11)."""
    adv, returns = ops.distributional_gae(rewards, quantiles, mask, gamma=gamma, lam=lam)
    kind, alpha = parse_advantage(advantage)
    m = mask.to(returns.dtype)
    q = quantiles.to(returns.dtype)
    if kind == "cvar":
        adv = ops.cvar(returns - q, alpha) * m                      # A_t,j = R_t,j - V_t,j
    elif kind == "trim":
        floor = reference.var_atom(q, alpha) - q.mean(-1)
        adv = torch.maximum(adv.to(returns.dtype), floor) * m
    return adv.float(), returns.float()


def gae_advantages(rewards, values, mask, *, gamma: float, lam: float):
    """Scalar GAE through the same op with M = 1: values [B, T] -> (advantages, returns [B, T])."""
    adv, returns = ops.distributional_gae(rewards, values.unsqueeze(-1), mask, gamma=gamma, lam=lam)
    return adv.float(), returns.squeeze(-1).float()


def grpo_advantages(outcome: torch.Tensor, group_size: int, mask: torch.Tensor, *, scale: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """Group-normalised outcome: (r - mean_group) / (std_group + eps) broadcast over the response
    (rows are grouped consecutively, G per prompt). `scale=False` is Dr. GRPO (no std division).
    The group std is GRPO's sample std (Bessel-corrected, as the GRPO paper and TRL compute it)."""
    r = outcome.float().view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (r.std(dim=1, unbiased=True, keepdim=True) + eps) if group_size > 1 else centred
    return centred.reshape(-1, 1) * mask.float()


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                            whiten: bool = True) -> torch.Tensor:
    """REINFORCE++: return-to-go of the per-token rewards, whitened over the batch (`whiten=False`:
    the raw return-to-go, for a caller that whitens over a larger batch, as the trainer does)."""
    ret = torch.zeros_like(rewards, dtype=torch.float32)
    running = torch.zeros(rewards.shape[0], dtype=torch.float32, device=rewards.device)
    m = mask.float()
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t].float() + gamma * running * m[:, t]
        ret[:, t] = running * m[:, t]
    return masked_whiten(ret, mask) * m if whiten else ret
