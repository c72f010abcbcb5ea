"""PPO's value clipping for the distributional critic: one implementation for the trainer
(`dvpo.trainer.losses`) and the framework adapters (`dvpo.integrations`).

The per-token critic loss is `max(L(v), L(v_clip))`, where `L` is the whole fused DVPO critic loss
of the token (`dvpo.ops.critic_loss`, all terms) and `v_clip` clips every quantile (of every head)
around its old value, as PPO takes `max((v - R)^2, (v_clip - R)^2)`. The gradient flows through the
branch that wins (through the clipped quantiles only where they are inside the clip range).

Clip formula: `clip_bounds`, `max(min(v, old + eps), old - eps)`, is the default. Inside the clip
range it returns `v` itself, so there the two branches are the same tensor values and the loss is
exactly `L(v)`. `clip_delta`, `old + clamp(v - old, -eps, eps)`, is the same function in exact
arithmetic, but `old + (v - old)` can differ from `v` by a rounding, so an unclipped quantile can
make the "clipped" branch win by a rounding (and count in clipfrac). OpenRLHF writes it that way;
its adapter passes `clip=clip_delta` to reproduce OpenRLHF to the last bit.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from . import ops


def clip_bounds(v: Tensor, old: Tensor, eps: float) -> Tensor:
    """`clip(v, old - eps, old + eps)` as `max(min(v, old + eps), old - eps)` (verl, TRL, the trainer)."""
    return torch.max(torch.min(v, old + eps), old - eps)


def clip_delta(v: Tensor, old: Tensor, eps: float) -> Tensor:
    """`old + clamp(v - old, -eps, eps)` (OpenRLHF's formulation; equal to clip_bounds up to rounding)."""
    return old + (v - old).clamp(-eps, eps)


def clipped_critic_loss(theta: Tensor, targets: Tensor, old: Optional[Tensor], mask: Optional[Tensor],
                        clip_eps: Optional[float], *, config=None, taus: Optional[Tensor] = None,
                        clip: Callable = clip_bounds) -> Tuple[Tensor, Tensor, dict]:
    """Per-token `max(L(theta), L(clip(theta, old, clip_eps)))` of the fused critic loss, unreduced.

    `theta` `[B, T, N]` or heads `[B, T, H, N]`, `targets` `[B, T, M]`, `old` broadcastable to `theta`
    (heads may share one old ensemble `[B, T, 1, N]`), `mask` `[B, T]`. `clip_eps=None`: no clipping,
    one kernel call. No shape checks here (the adapters check the frameworks' shapes first).
    Returns (per_token `[B, T]`, clipped `[B, T]` bool: the clipped branch strictly larger, the eight
    per-token terms of the unclipped branch)."""
    out = ops.critic_loss(theta, targets, taus, mask=mask, config=config, reduction="none")
    if clip_eps is None:
        return out.loss, torch.zeros(out.loss.shape, dtype=torch.bool, device=out.loss.device), out.terms
    out_clipped = ops.critic_loss(clip(theta, old, float(clip_eps)), targets, taus, mask=mask, config=config,
                                  reduction="none")
    return torch.max(out.loss, out_clipped.loss), out_clipped.loss > out.loss, out.terms
