"""DVPO for OpenRLHF: a drop-in `ValueLoss` for quantile values, its GAE, and the value head.

    from dvpo.integrations.openrlhf import ValueLoss          # instead of openrlhf.models.ValueLoss
    critic_loss_fn = ValueLoss(clip_eps=value_clip)            # same constructor (+ config=)
    loss = critic_loss_fn(values, old_values, returns, action_mask=experience.action_mask)

`ValueLoss` has OpenRLHF's constructor `(clip_eps=None, token_level_loss=True)` and forward
`(values, old_values, returns, action_mask=None, dp_size=1, batch_num_tokens=None,
global_batch_size=None) -> loss`, OpenRLHF 0.11's conventions: `token_level_loss=True` is the
masked token mean (or the masked sum over `batch_num_tokens` times `dp_size`), `False` is the mean
over sequences (with a real token) of per-sequence token means (or their sum over
`global_batch_size` times `dp_size`). Values are `[B, A, N]` quantiles (heads `[B, A, H, N]`;
`[B, A]` is one quantile), clipped per quantile around `old_values` when `clip_eps` is set.

With `config=mse_config()` and scalar values it is OpenRLHF's own `0.5 * (v - R)^2` loss (tested
against the installed package). This module does not import OpenRLHF.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..config import CriticLossConfig
from ._common import (MSE_KAPPA, QuantileValueHead, aggregate, clip_delta, clipped_critic_loss,
                      distributional_returns, masked_mean, mse_config)

__all__ = ["ValueLoss", "get_advantages_and_returns", "QuantileValueHead", "mse_config", "MSE_KAPPA"]


class ValueLoss(nn.Module):
    """OpenRLHF's `ValueLoss` for a DVPO critic (see the module docstring).

    After a call, `self.last_clipfrac` (0-dim tensor) and `self.last_terms` (the unclipped branch's
    eight per-token terms, `[B, A]` each) hold the logging values OpenRLHF's loss does not return.
    """

    def __init__(self, clip_eps: Optional[float] = None, token_level_loss: bool = True, *,
                 config: Optional[CriticLossConfig] = None, taus: Optional[Tensor] = None) -> None:
        super().__init__()
        self.clip_eps = clip_eps
        self.token_level_loss = token_level_loss
        self.config = config
        self.taus = taus
        self.last_clipfrac: Optional[Tensor] = None
        self.last_terms = None

    def forward(self, values: Tensor, old_values: Tensor, returns: Tensor, action_mask: Optional[Tensor] = None,
                dp_size: int = 1, batch_num_tokens: Optional[float] = None,
                global_batch_size: Optional[float] = None) -> Tensor:
        per_token, clipped, terms = clipped_critic_loss(values, returns, old_values, action_mask, self.clip_eps,
                                                        config=self.config, taus=self.taus, clip=clip_delta)
        mask = action_mask if action_mask is not None else torch.ones(per_token.shape, device=per_token.device)
        if self.token_level_loss:
            loss = aggregate(per_token, mask, "token-mean", dp_size=1 if batch_num_tokens is None else dp_size,
                             batch_num_tokens=batch_num_tokens)
        else:
            loss = aggregate(per_token, mask, "seq-mean-token-mean",
                             dp_size=1 if global_batch_size is None else dp_size,
                             global_batch_size=global_batch_size, seq_count_eps=1e-8)
        self.last_clipfrac = masked_mean(clipped.float(), mask).detach()
        self.last_terms = terms
        return loss


def get_advantages_and_returns(values: Tensor, rewards: Tensor, action_mask: Optional[Tensor], gamma: float,
                               lambd: float):
    """Distributional GAE with the arguments and returns of OpenRLHF's experience maker's
    `get_advantages_and_returns(values, rewards, action_mask, gamma, lambd)`: values `[B, A, N]`
    (heads use their mean; `[B, A]` is N = 1), rewards `[B, A]`. Returns (advantages `[B, A]`, the
    quantile mean, not whitened, as OpenRLHF's; returns `[B, A, N]`), 0 at masked actions.

    OpenRLHF's scan zeroes masked values and rewards and runs over every position; dvpo's skips
    masked positions. They agree whenever the real actions are a prefix of each row (right padding,
    OpenRLHF's layout); with holes in the mask dvpo links consecutive real tokens instead.
    """
    if action_mask is None:
        action_mask = torch.ones(rewards.shape, dtype=torch.bool, device=rewards.device)
    advantages, returns = distributional_returns(rewards, values, action_mask, gamma, lambd)
    return advantages.detach(), returns
