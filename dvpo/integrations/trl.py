"""DVPO for TRL's PPO trainer: a quantile value head for its value model, and the value loss and
GAE its training step inlines.

TRL's `PPOTrainer` (`trl.experimental.ppo`, TRL 0.2x - 1.12; removed from TRL 1.13) builds the value
model as a `*ForSequenceClassification` model with `num_labels=1`, reads its `.score` head through
`get_reward` / `PolicyAndValueWrapper`, squeezes the last dim, and inlines GAE and the clipped value
loss in `train()`. The changes (docs/integrations.md has the full diff, which the tests apply to
TRL's own `train()` and run):

    value_model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    dvpo_trl.attach_quantile_head(value_model, num_quantiles=N)          # .score -> [.., N]

    # in train(): padding (instead of masked_fill with the [B, T] mask), values [B, T] or [B, T, N]
    values = dvpo_trl.fill_padding(values, padding_mask_p1, 0)
    # in train(): GAE (instead of the reversed loop)
    advantages, returns = dvpo_trl.compute_advantages_and_returns(rewards, values, ~padding_mask_p1,
                                                                   args.gamma, args.lam)
    # in train(): the value loss (instead of vpredclipped ... vf_clipfrac)
    vf_loss, vf_clipfrac = dvpo_trl.compute_value_loss(vpred, mb_values, mb_return,
                                                       ~padding_mask_p1[micro_batch_inds],
                                                       args.cliprange_value, config=cfg)

With N = 1, TRL's `.squeeze(-1)` leaves `[B, T]` tensors; every function here takes them and gives
TRL's shapes back (`[B, T]` returns). `config=mse_config()` makes `compute_value_loss` TRL's own
`0.5 * masked_mean(max((v - R)^2, (v_clip - R)^2), mask)` for N = M = 1 (tested against TRL's
`masked_mean`). This module does not import TRL.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..config import CriticLossConfig
from ..clipped_loss import clip_bounds
from ._common import (MSE_KAPPA, QuantileValueHead, clipped_critic_loss, compute_dtype, distributional_returns,
                      expand_token_mask, masked_mean, mse_config, result_dtype)

__all__ = ["attach_quantile_head", "compute_value_loss", "compute_advantages_and_returns", "fill_padding",
           "QuantileValueHead", "mse_config", "MSE_KAPPA"]


def attach_quantile_head(value_model: nn.Module, num_quantiles: int, num_heads: int = 1, *,
                         head_name: str = "score", bias: Optional[bool] = None, **head_kwargs) -> QuantileValueHead:
    """Replace a Hugging Face value/reward model's `Linear(hidden, 1)` head (`value_model.score`, the
    attribute TRL's `get_reward` and `PolicyAndValueWrapper` call) by a `QuantileValueHead` of N
    quantiles (H heads), on the old head's device and dtype (its bias kept or not, unless `bias` is
    given). The model's `config.num_labels` becomes `H * N`, so `save_pretrained` /
    `from_pretrained` round-trip it as a plain `Linear(hidden, H * N)` head.

    Returns the new head. The value model's outputs (and TRL's `full_value[..].squeeze(-1)`) are then
    `[B, L, N]` (`[B, L, H, N]` for heads).
    """
    old = getattr(value_model, head_name, None)
    if not isinstance(old, nn.Linear):
        raise ValueError(f"value_model.{head_name} must be the nn.Linear value head to replace, "
                         f"got {type(old).__name__}")
    head = QuantileValueHead(old.in_features, num_quantiles, num_heads,
                             bias=(old.bias is not None) if bias is None else bias,
                             device=old.weight.device, dtype=old.weight.dtype, **head_kwargs)
    setattr(value_model, head_name, head)
    config = getattr(value_model, "config", None)
    if config is not None and hasattr(config, "num_labels"):
        config.num_labels = num_heads * num_quantiles
    return head


def fill_padding(values: Tensor, padding_mask: Tensor, value: float = 0.0) -> Tensor:
    """`torch.masked_fill(values, padding_mask, value)` for TRL's `[B, T]` padding masks and values of
    any critic: `[B, T]` (N = 1, after TRL's `.squeeze(-1)`), `[B, T, N]` or `[B, T, H, N]`. The mask
    must be exactly `values.shape[:2]` (a ValueError naming it otherwise); it is never broadcast
    across the token dim, which `padding_mask.unsqueeze(-1)` would do for `[B, T]` values."""
    return torch.masked_fill(values, expand_token_mask(padding_mask, values, mask_name="padding_mask",
                                                       x_name="values"), value)


def compute_value_loss(vpred: Tensor, values: Tensor, returns: Tensor, mask: Tensor, cliprange_value: Optional[float],
                       *, config: Optional[CriticLossConfig] = None, taus: Optional[Tensor] = None,
                       return_terms: bool = False):
    """TRL's inlined clipped value loss, for quantiles: returns `(vf_loss, vf_clipfrac)`.

    Args (TRL's local variables): `vpred` the new quantiles `[B, T, N]` (heads `[B, T, H, N]`,
    `[B, T]` is N = 1), `values` the rollout's (`mb_values`, the shape of `vpred`), `returns` the
    targets `[B, T]` or `[B, T, M]` (`mb_return`), `mask` the real tokens `[B, T]` (TRL's
    `~padding_mask_p1[micro_batch_inds]`), `cliprange_value` (`args.cliprange_value`; None: no
    clipping).

    `vf_loss` is the masked token mean of `max(L(vpred), L(vpred_clipped))` (`0.5 * masked_mean(
    vf_loss_max, mask)` of TRL's when `config=mse_config()` and N = M = 1); `vf_clipfrac` the
    fraction of real tokens where the clipped branch is larger. Both are 0-dim, in the dtypes TRL's
    lines give. An all-padding micro-batch gives 0. Wrong shapes are ValueErrors naming the argument.
    """
    per_token, clipped, terms = clipped_critic_loss(vpred, returns, values, mask, cliprange_value, config=config,
                                                    taus=taus, clip=clip_bounds,
                                                    names=("vpred", "returns", "values", "mask"))
    dtype = result_dtype(vpred, values, returns, mask)
    vf_loss = masked_mean(per_token.to(compute_dtype(dtype)), mask).to(dtype)
    vf_clipfrac = masked_mean(clipped.float(), mask).to(torch.promote_types(torch.float32, mask.dtype))
    if return_terms:
        return vf_loss, vf_clipfrac, terms
    return vf_loss, vf_clipfrac


def compute_advantages_and_returns(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float):
    """Distributional GAE replacing TRL's reversed loop: rewards `[B, T]`, values `[B, T]` (N = 1, what
    TRL's `.squeeze(-1)` leaves), `[B, T, N]` or heads `[B, T, H, N]` (their mean is used), `mask` the
    real tokens `[B, T]` (`~padding_mask_p1`). Returns (advantages `[B, T]`, the quantile mean, *not*
    whitened: TRL's next line whitens them; returns in the shape of `values`, `[B, T, N]` for
    heads), 0 at padding, in the dtype of TRL's loop (`rewards` and `values` promoted).

    TRL's loop runs over every position with values and rewards already 0 past the response; dvpo's
    scan skips masked positions. They agree on real tokens when each row's real tokens are a prefix
    (TRL's layout), which the tests check against TRL's formula.
    """
    dtype = result_dtype(rewards, values)
    with torch.no_grad():
        advantages, returns = distributional_returns(rewards, values, mask, gamma, lam,
                                                     names=("rewards", "values", "mask"), dtype=dtype)
    return advantages.to(dtype), returns.to(dtype)
