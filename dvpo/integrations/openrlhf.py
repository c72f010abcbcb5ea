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
against the installed package, and OpenRLHF's own aggregation tests pass with `aggregate_loss`
below patched in: tools/upstream_tests.sh). Values of any critic are accepted: OpenRLHF's `[B, A]`
(N = 1, after its `.squeeze(-1)`), `[B, A, N]`, `[B, A, H, N]`; shapes are checked (a ValueError
naming the argument), never broadcast, and come back as they went in (`[B, A]` values -> `[B, A]`
returns). For the critic model's forward and the metrics, `apply_action_mask` and `mean_value`
replace `values * action_mask.float()` and `masked_mean(values, action_mask)`, which would
broadcast `[B, A, N]` values against a `[B, A]` mask. This module does not import OpenRLHF.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..config import CriticLossConfig
from ..clipped_loss import clip_delta
from ._common import (MSE_KAPPA, QuantileValueHead, aggregate, clipped_critic_loss, compute_dtype,
                      distributional_returns, expand_token_mask, masked_mean, mse_config, quantile_mean, result_dtype)

__all__ = ["ValueLoss", "aggregate_loss", "get_advantages_and_returns", "apply_action_mask", "mean_value",
           "QuantileValueHead", "mse_config", "MSE_KAPPA"]


def aggregate_loss(loss: Tensor, loss_mask: Optional[Tensor], token_level_loss: bool = True, dp_size: int = 1,
                   batch_num_tokens: Optional[float] = None, global_batch_size: Optional[float] = None) -> Tensor:
    """OpenRLHF 0.11's `openrlhf.models.loss.aggregate_loss` (same arguments, what `ValueLoss` reduces
    with), on dvpo's `aggregate`: `token_level_loss=True` is the masked token mean (or the masked
    sum over `batch_num_tokens` times `dp_size`), `False` the mean over sequences with a real token
    of per-sequence token means (or their sum over `global_batch_size` times `dp_size`). `loss_mask`
    `[B, A]` (None: every token), in OpenRLHF's output dtype. Unlike OpenRLHF, an all-masked batch
    gives 0 instead of NaN."""
    if not isinstance(loss, torch.Tensor) or loss.dim() != 2:
        raise ValueError(f"loss must be the per-token loss [B, A], got "
                         f"{list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}")
    dtype = _agg_dtype(token_level_loss, batch_num_tokens, global_batch_size, loss, loss_mask)
    return _aggregate(loss.to(compute_dtype(dtype)), loss_mask, token_level_loss, dp_size, batch_num_tokens,
                      global_batch_size).to(dtype)


def _agg_dtype(token_level_loss, batch_num_tokens, global_batch_size, *tensors) -> torch.dtype:
    # OpenRLHF's sequence-level mode multiplies by a `.float()` sequence mask (bf16 -> float32)
    return result_dtype(*tensors, batch_num_tokens if token_level_loss else global_batch_size,
                        floor=None if token_level_loss else torch.float32)


def _aggregate(loss, loss_mask, token_level_loss, dp_size, batch_num_tokens, global_batch_size):
    if loss_mask is None:
        loss_mask = torch.ones(loss.shape, dtype=torch.bool, device=loss.device)
    elif tuple(loss_mask.shape) != tuple(loss.shape):
        raise ValueError(f"the mask must have shape [B, A] = {list(loss.shape)}, got {list(loss_mask.shape)}")
    if token_level_loss:
        return aggregate(loss, loss_mask, "token-mean", dp_size=1 if batch_num_tokens is None else dp_size,
                         batch_num_tokens=batch_num_tokens)
    return aggregate(loss, loss_mask, "seq-mean-token-mean", dp_size=1 if global_batch_size is None else dp_size,
                     global_batch_size=global_batch_size, seq_count_eps=1e-8)


class ValueLoss(nn.Module):
    """OpenRLHF's `ValueLoss` for a DVPO critic (see the module docstring).

    `ValueLoss(clip_eps, token_level_loss, config=mse_config())` is OpenRLHF's own value loss for
    N = M = 1 (`[B, A]` tensors), exactly. After a call, `self.last_clipfrac` (0-dim tensor) and
    `self.last_terms` (the unclipped branch's eight per-token terms, `[B, A]` each) hold the logging
    values OpenRLHF's loss does not return.
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
                                                        config=self.config, taus=self.taus, clip=clip_delta,
                                                        names=("values", "returns", "old_values", "action_mask"))
        dtype = _agg_dtype(self.token_level_loss, batch_num_tokens, global_batch_size, values, returns,
                           old_values if self.clip_eps is not None else None, action_mask)
        loss = _aggregate(per_token.to(compute_dtype(dtype)), action_mask, self.token_level_loss, dp_size,
                          batch_num_tokens, global_batch_size).to(dtype)
        mask = action_mask if action_mask is not None else torch.ones(per_token.shape, device=per_token.device)
        self.last_clipfrac = masked_mean(clipped.float(), mask).detach()
        self.last_terms = terms
        return loss


def get_advantages_and_returns(values: Tensor, rewards: Tensor, action_mask: Optional[Tensor], gamma: float,
                               lambd: float):
    """Distributional GAE with the arguments and returns of OpenRLHF's experience maker's
    `get_advantages_and_returns(values, rewards, action_mask, gamma, lambd)`: values `[B, A]` (N = 1),
    `[B, A, N]` or heads `[B, A, H, N]` (their mean is used), rewards and action_mask `[B, A]`.
    Returns (advantages `[B, A]`, the quantile mean, not whitened, as OpenRLHF's; returns in the
    shape of `values`, `[B, A, N]` for heads), 0 at masked actions, in OpenRLHF's dtype.

    OpenRLHF's scan zeroes masked values and rewards and runs over every position; dvpo's skips
    masked positions. They agree whenever the real actions are a prefix of each row (right padding,
    OpenRLHF's layout); with holes in the mask dvpo links consecutive real tokens instead.
    """
    if action_mask is None and isinstance(rewards, torch.Tensor):
        action_mask = torch.ones(rewards.shape, dtype=torch.bool, device=rewards.device)
    dtype = result_dtype(values, rewards, action_mask)
    with torch.no_grad():
        advantages, returns = distributional_returns(rewards, values, action_mask, gamma, lambd,
                                                     names=("rewards", "values", "action_mask"), dtype=dtype)
    return advantages.to(dtype), returns.to(dtype)


def apply_action_mask(values: Tensor, action_mask: Tensor) -> Tensor:
    """`values * action_mask.float()` (OpenRLHF's `CriticModel.forward`) for values of any critic:
    `[B, A]` (N = 1), `[B, A, N]`, `[B, A, H, N]`; the mask must be exactly `[B, A]`."""
    return values * expand_token_mask(action_mask, values, mask_name="action_mask").float()


def mean_value(values: Tensor, action_mask: Tensor) -> Tensor:
    """The scalar value per action, `[B, A]`, for OpenRLHF's metrics (`masked_mean(values, action_mask)`
    expects `[B, A]`): the quantile (and head) mean of `[B, A, N]` / `[B, A, H, N]`, `[B, A]` as is."""
    if not isinstance(action_mask, torch.Tensor) or action_mask.dim() != 2:
        raise ValueError(f"action_mask must have shape [B, A], got "
                         f"{list(action_mask.shape) if isinstance(action_mask, torch.Tensor) else action_mask}")
    return quantile_mean(values, tuple(action_mask.shape), "values")
