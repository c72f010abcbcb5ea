"""Advantage estimators and losses of the five algorithms (pure functions on tensors).

All per-token tensors are `[B, T]` over response tokens with a mask (1 = real token, EOS included).
The losses are token means; their optional `denom` replaces the local token count as the divisor
(under torchrun each rank passes global tokens / world size, so DDP's gradient average is the
gradient of the token mean over the global batch).

- dvpo:       distributional critic [B, T, H, N]; targets and advantages from
              `dvpo.ops.distributional_gae` on the ensemble's quantiles; the actor's advantage is
              the mean over quantiles (or a lower CVaR, `advantage="cvar:ALPHA"`), whitened; the
              critic is trained with the fused `dvpo.ops.critic_loss`.
- ppo:        scalar critic, GAE (the same op with M = 1), whitened advantages, clipped value loss.
- robust-ppo: H scalar critics aggregated by the worst case (min over heads) in the bootstrap
              targets and the advantages; every head regresses to the worst-case targets.
- grpo:       no critic; the outcome reward normalised within each prompt's group of G samples.
- reinforce++: no critic; per-token reward (outcome at the last token minus the KL penalty), the
              undiscounted return-to-go, whitened over the whole batch.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from dvpo import ops

ALGOS = ("dvpo", "ppo", "grpo", "robust-ppo", "reinforce++")
CRITIC_ALGOS = ("dvpo", "ppo", "robust-ppo")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None, denom: Optional[float] = None) -> torch.Tensor:
    """Mean of x over the real tokens; with `denom` (dim=None only) the masked sum / denom."""
    m = mask.to(x.dtype)
    if dim is None:
        if denom is not None:
            return (x * m).sum() / denom
        return (x * m).sum() / m.sum().clamp(min=1)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the real tokens (population variance), 0 at padding."""
    m = mask.to(x.dtype)
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    return (x - mean) * torch.rsqrt(var + eps) * m


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


def parse_advantage(spec: str) -> Tuple[str, float]:
    """'mean' or 'cvar:ALPHA' (the lower-tail CVaR of the per-quantile advantages)."""
    if spec in ("mean", "", None):
        return "mean", 0.0
    kind, _, value = str(spec).partition(":")
    if kind == "cvar":
        alpha = float(value)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"advantage cvar:ALPHA needs ALPHA in (0, 1], got {value!r}")
        return "cvar", alpha
    raise ValueError(f"advantage must be 'mean' or 'cvar:ALPHA', got {spec!r}")


def dvpo_advantages(rewards, quantiles, mask, *, gamma: float, lam: float, advantage: str = "mean"):
    """(raw advantages [B, T], critic targets [B, T, N]) from the ensemble quantiles [B, T, N]."""
    adv, returns = ops.distributional_gae(rewards, quantiles, mask, gamma=gamma, lam=lam)
    kind, alpha = parse_advantage(advantage)
    if kind == "cvar":
        per_quantile = returns - quantiles.to(returns.dtype)        # A_t,j = R_t,j - V_t,j
        adv = ops.cvar(per_quantile, alpha) * mask.to(per_quantile.dtype)
    return adv.float(), returns.float()


def gae_advantages(rewards, values, mask, *, gamma: float, lam: float):
    """Scalar GAE through the same op with M = 1: values [B, T] -> (advantages, returns [B, T])."""
    adv, returns = ops.distributional_gae(rewards, values.unsqueeze(-1), mask, gamma=gamma, lam=lam)
    return adv.float(), returns.squeeze(-1).float()


def grpo_advantages(outcome: torch.Tensor, group_size: int, mask: torch.Tensor, *, scale: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """Group-normalised outcome: (r - mean_group) / (std_group + eps) broadcast over the response
    (rows are grouped consecutively, G per prompt). `scale=False` is Dr. GRPO (no std division)."""
    r = outcome.float().view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (r.std(dim=1, unbiased=True, keepdim=True) + eps) if group_size > 1 else centred
    return centred.reshape(-1, 1) * mask.float()


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                            whiten: bool = True) -> torch.Tensor:
    """REINFORCE++: return-to-go of the per-token rewards, whitened over the batch (`whiten=False`:
    the raw return-to-go, for a caller that whitens over a larger batch)."""
    ret = torch.zeros_like(rewards, dtype=torch.float32)
    running = torch.zeros(rewards.shape[0], dtype=torch.float32, device=rewards.device)
    m = mask.float()
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t].float() + gamma * running * m[:, t]
        ret[:, t] = running * m[:, t]
    return masked_whiten(ret, mask) if whiten else ret


# ---- losses ------------------------------------------------------------------------------------

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
    """0.5 * mean_t max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clamp(V - V_old, -c, c); no
    clipping when clip <= 0. `values` may carry a trailing head dim [B, T, H] (each head, averaged)."""
    if values.dim() == returns.dim() + 1:
        returns, mask_h = returns.unsqueeze(-1), mask.unsqueeze(-1).expand_as(values)
        if denom is not None:
            denom = denom * values.shape[-1]
    else:
        mask_h = mask
    err = (values - returns) ** 2
    if clip and clip > 0:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        err = torch.maximum(err, (clipped - returns) ** 2)
    return 0.5 * masked_mean(err, mask_h, denom=denom)


def distributional_value_loss(theta, old_theta, targets, mask, config, clip: float, taus=None,
                              denom: Optional[float] = None):
    """The DVPO critic loss through the fused op: `theta` heads [B, T, H, N], `targets` [B, T, N].

    With clip > 0 the per-token loss is the max of the op's loss at theta and at the clipped
    theta_old + clamp(theta - theta_old, -c, c) (PPO's value clipping, per quantile), token-mean.
    Returns (loss, terms: dict of the eight per-token terms at theta)."""
    clipping = bool(clip and clip > 0)
    if not clipping and denom is None:      # the op reduces itself
        out = ops.critic_loss(theta, targets, taus, mask=mask, config=config, reduction="token-mean")
        return out.loss, out.terms
    out = ops.critic_loss(theta, targets, taus, mask=mask, config=config, reduction="none")
    per_token = out.loss
    if clipping:
        clipped = old_theta + (theta - old_theta).clamp(-clip, clip)
        out_c = ops.critic_loss(clipped, targets, taus, mask=mask, config=config, reduction="none")
        per_token = torch.maximum(per_token, out_c.loss)
    return masked_mean(per_token, mask, denom=denom), out.terms
