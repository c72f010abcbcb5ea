"""DVPO for verl: drop-in replacements for verl's PPO critic pieces, on quantile values.

    from dvpo.integrations import verl as dvpo_verl

    # verl.trainer.ppo.core_algos.compute_gae_advantage_return, on [B, T, N] values:
    advantages, returns = dvpo_verl.compute_gae_advantage_return(rewards, values, response_mask, gamma, lam)
    # verl.trainer.ppo.core_algos.compute_value_loss, on [B, T, N] (or [B, T, H, N]) quantiles:
    vf_loss, vf_clipfrac = dvpo_verl.compute_value_loss(vpreds, returns, values, response_mask,
                                                        cliprange_value, loss_agg_mode="token-mean")

Signatures, argument names and return conventions are verl's (0.9: `core_algos.compute_value_loss`,
`core_algos.agg_loss`, `core_algos.compute_gae_advantage_return`), with dvpo's keyword-only extras
(`config`, `taus`). Scalar tensors (`[B, T]`) are accepted as one quantile and give verl's shapes
back (`[B, T]` values -> `[B, T]` returns), in verl's dtypes.

The exact verl value loss: `config=mse_config()` makes `compute_value_loss` verl's
`0.5 * agg(max((v - R)^2, (v_clip - R)^2))` for N = M = 1 (`[B, T]` tensors), to the last bit in
float64. With it, verl 0.9.1's own test files for the value loss, `agg_loss`, GAE and the data
metrics pass with these functions patched in (tools/upstream_tests.sh). The intended deviations
from verl (0 instead of NaN for an all-masked batch, 0 at padding, ...) are listed in
docs/integrations.md. `patch_verl()` installs them into a running verl (see docs/integrations.md).

This module imports nothing from verl at import time; only `patch_verl` and `value_loss` need it.
"""

from __future__ import annotations

import functools
import sys
from typing import Optional

import torch
from torch import Tensor

from ..config import CriticLossConfig
from ..clipped_loss import clip_bounds
from ._common import (LOSS_AGG_MODES, MSE_KAPPA, QuantileValueHead, aggregate, clipped_critic_loss, compute_dtype,
                      distributional_returns, masked_mean, masked_whiten, mse_config, quantile_mean, result_dtype)

__all__ = [
    "compute_value_loss",
    "compute_gae_advantage_return",
    "agg_loss",
    "value_loss",
    "patch_verl",
    "QuantileValueHead",
    "mse_config",
    "MSE_KAPPA",
    "LOSS_AGG_MODES",
]


def _agg_dtype(loss_agg_mode, *tensors) -> torch.dtype:
    # verl's seq-mean modes multiply by a `.float()` sequence mask (a bf16 loss comes out float32)
    floor = torch.float32 if loss_agg_mode.startswith("seq-mean") else None
    return result_dtype(*tensors, floor=floor)


def agg_loss(loss_mat: Tensor, loss_mask: Tensor, loss_agg_mode: str, dp_size: int = 1,
             batch_num_tokens: Optional[int] = None, global_batch_size: Optional[int] = None,
             loss_scale_factor: Optional[int] = None) -> Tensor:
    """verl's `agg_loss` (same arguments and modes, see `dvpo.integrations._common.aggregate`), in
    verl's output dtype; an all-masked micro-batch gives 0, not NaN."""
    dtype = _agg_dtype(loss_agg_mode, loss_mat, loss_mask, batch_num_tokens, global_batch_size)
    return aggregate(loss_mat.to(compute_dtype(dtype)), loss_mask, loss_agg_mode, dp_size=dp_size,
                     batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size,
                     loss_scale_factor=loss_scale_factor, seq_count_eps=1e-8).to(dtype)


def compute_value_loss(vpreds: Tensor, returns: Tensor, values: Tensor, response_mask: Tensor,
                       cliprange_value: Optional[float], loss_agg_mode: str = "token-mean", dp_size: int = 1,
                       batch_num_tokens: Optional[int] = None, global_batch_size: Optional[int] = None,
                       loss_scale_factor: Optional[int] = None, *, config: Optional[CriticLossConfig] = None,
                       taus: Optional[Tensor] = None, return_terms: bool = False):
    """The clipped DVPO critic loss with verl's signature and return convention `(vf_loss, vf_clipfrac)`.

    Args:
        vpreds: the critic's predicted quantiles `[B, T, N]` (or heads `[B, T, H, N]`; `[B, T]` is
            read as N = 1).
        returns: the targets `[B, T, M]` (from `compute_gae_advantage_return`; `[B, T]` is M = 1).
        values: the old quantiles the rollout stored, shaped like `vpreds` (`[B, T, N]` also clips
            every head); only used for clipping.
        response_mask: `[B, T]`, nonzero = real token (its values weight tokens in the aggregation,
            as in verl).
        cliprange_value: clip range per quantile around `values`; None switches clipping off.
        loss_agg_mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor: as verl's
            `agg_loss` (all of verl's modes, `seq-mean-token-sum-norm` included).
        config: the `dvpo.CriticLossConfig` (default: all eight DVPO terms with the public recipe's
            weights). `mse_config()` makes the loss verl's `0.5 * (v - R)^2` for N = M = 1.
        taus: the `[N]` quantile levels (default: midpoints).
        return_terms: also return the unclipped branch's eight per-token terms (dict of `[B, T]`).

    Returns:
        `(vf_loss, vf_clipfrac)`: the aggregated `max(L(v), L(v_clip))` (differentiable) and the
        fraction of real tokens where the clipped branch is larger, both 0-dim tensors in the dtypes
        verl's function returns for the same inputs (float32 for float32 and bf16 tensors, float64
        when any input is float64; computed in at least float32).

    Raises:
        ValueError: a tensor of the wrong shape (named, with the shape it must have); nothing is
            broadcast.
    """
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {', '.join(LOSS_AGG_MODES)}; got {loss_agg_mode!r}")
    per_token, clipped, terms = clipped_critic_loss(vpreds, returns, values, response_mask, cliprange_value,
                                                    config=config, taus=taus, clip=clip_bounds,
                                                    names=("vpreds", "returns", "values", "response_mask"))
    dtype = _agg_dtype(loss_agg_mode, vpreds, returns, values, response_mask, batch_num_tokens, global_batch_size)
    vf_loss = aggregate(per_token.to(compute_dtype(dtype)), response_mask, loss_agg_mode, dp_size=dp_size,
                        batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size,
                        loss_scale_factor=loss_scale_factor, seq_count_eps=1e-8).to(dtype)
    vf_clipfrac = masked_mean(clipped.float(), response_mask).to(torch.promote_types(torch.float32,
                                                                                       response_mask.dtype))
    if return_terms:
        return vf_loss, vf_clipfrac, terms
    return vf_loss, vf_clipfrac


def compute_gae_advantage_return(token_level_rewards: Tensor, values: Tensor, response_mask: Tensor,
                                 gamma=1.0, lam=1.0, *, whiten: bool = True):
    """Distributional GAE with verl's signature and return convention `(advantages, returns)`.

    Args:
        token_level_rewards: `[B, T]`.
        values: the old values: verl's scalar `[B, T]`, quantiles `[B, T, N]`, or heads
            `[B, T, H, N]` (their mean is used).
        response_mask: `[B, T]`; the scan skips padding and observation tokens (links consecutive
            real tokens), as verl's does.
        gamma, lam: floats (or 0-dim tensors) in [0, 1].
        whiten: whiten the advantages over real tokens, as verl does (default True).

    Returns:
        advantages `[B, T]` (the quantile mean of the per-quantile GAE, whitened) and returns in the
        shape of `values` (`[B, T]` for verl's `[B, T]`, `[B, T, N]` for quantiles and heads), in
        verl's dtype for these inputs. Both are 0 at padding; verl leaves non-zero values there
        (masked out everywhere downstream), so only real tokens are comparable.

    Raises:
        ValueError: `token_level_rewards` or `response_mask` not exactly `[B, T]` (the first two dims
            of `values`), or `values` not 2-4 dimensional.
    """
    dtype = result_dtype(token_level_rewards, values, response_mask)
    with torch.no_grad():
        advantages, returns = distributional_returns(token_level_rewards, values, response_mask, gamma, lam,
                                                     names=("token_level_rewards", "values", "response_mask"),
                                                     dtype=dtype)
        if whiten:
            real = (response_mask != 0)
            advantages = torch.where(real, masked_whiten(advantages, real), torch.zeros_like(advantages))
    return advantages.to(dtype), returns.to(dtype)


# ----------------------------------------------------------------------------------------------
# Plugging into a verl PPO run (needs verl)
# ----------------------------------------------------------------------------------------------

def value_loss(config, model_output, data, dp_group=None, *, dvpo_config: Optional[CriticLossConfig] = None):
    """A replacement for `verl.workers.utils.losses.value_loss` (verl 0.9's engine critic loss
    function, `(config, model_output, data, dp_group=None) -> (loss, metrics)`) on quantile values:
    the same data plumbing (verl's own helpers), `compute_value_loss` above, and metrics that
    average the quantiles (`critic/vpred_mean`)."""
    from verl.utils.metric import AggregationType, Metric
    from verl.workers.utils.padding import no_padding_2_padding

    vpreds = no_padding_2_padding(model_output["values"], data)
    dp_size = data["dp_size"]
    batch_num_tokens = data["batch_num_tokens"]
    global_batch_size = data["global_batch_size"]
    loss_scale_factor = getattr(config, "loss_scale_factor", None)
    summed = (dp_size > 1 or batch_num_tokens is not None or global_batch_size is not None
              or loss_scale_factor is not None)
    aggregation = AggregationType.SUM if summed else AggregationType.MEAN
    padded = data.select("values", "returns", "response_mask").to_padded_tensor()
    response_mask = padded["response_mask"].to(bool)
    vf_loss, vf_clipfrac = compute_value_loss(
        vpreds=vpreds, returns=padded["returns"], values=padded["values"], response_mask=response_mask,
        cliprange_value=config.cliprange_value, loss_agg_mode=config.loss_agg_mode, dp_size=dp_size,
        batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size,
        loss_scale_factor=loss_scale_factor, config=dvpo_config)
    vp = quantile_mean(vpreds.detach().float(), tuple(response_mask.shape), "values (model output)")
    metrics = {
        "critic/vf_loss": Metric(value=vf_loss, aggregation=aggregation),
        "critic/vf_clipfrac": vf_clipfrac.detach().item(),
        "critic/vpred_mean": masked_mean(vp, response_mask).item(),
    }
    return vf_loss, metrics


_PATCHED = []   # (container, key, original, is_item) in patching order


def _quantile_mean_batch(batch):
    """A shallow copy of a DataProto whose `values`/`returns` are averaged over quantiles (heads)."""
    import copy

    td = batch.batch
    if td is None or all(k not in td.keys() or td[k].dim() <= 2 for k in ("values", "returns")):
        return batch
    new_td = td.clone(recurse=False)
    for key in ("values", "returns"):
        if key in td.keys() and td[key].dim() > 2:
            x = td[key]
            new_td[key] = x.reshape(x.shape[0], x.shape[1], -1).mean(-1)
    out = copy.copy(batch)
    out.batch = new_td
    return out


def patch_verl(config: Optional[CriticLossConfig] = None, num_quantiles: Optional[int] = None) -> None:
    """Make the verl imported in this process train a DVPO critic.

    Replaces, in verl's modules (idempotent; `unpatch_verl()` restores them):

    * `core_algos.compute_gae_advantage_return` (used by `ray_trainer.compute_advantage` for
      `algorithm.adv_estimator=gae`) and its entry in `core_algos.ADV_ESTIMATOR_REGISTRY` (what
      `get_adv_estimator_fn("gae")` returns): distributional GAE on `[B, T, N]` values;
    * `core_algos.compute_value_loss` and `workers.utils.losses.compute_value_loss`: the clipped
      DVPO critic loss with `config` (`config=mse_config()`: verl's own MSE value loss, exactly, on
      verl's scalar critic);
    * `workers.utils.losses.value_loss` (the critic's loss function the trainer sends to the critic
      workers): `value_loss` above (metrics over quantile means);
    * `metric_utils.compute_data_metrics` (and its import in `ray_trainer`): values/returns metrics
      on the quantile mean;
    * when `num_quantiles` is given, `verl.utils.model.load_valuehead_model`: the critic is loaded
      as a token-classification model with `num_labels = num_quantiles` (verl sets 1), so the value
      head is `Linear(hidden, N)` and its `.squeeze(-1)` keeps `[.., N]`.

    Call it before verl's trainer module is imported, in every process (verl runs the critic in
    Ray workers): set `VERL_USE_EXTERNAL_MODULES=dvpo.integrations.verl_plugin` and
    `DVPO_VERL_NUM_QUANTILES=N` (optionally `DVPO_VERL_CONFIG='{"alpha": 0.1, ...}'`), and verl
    imports the plugin, which calls this, in each process that imports verl (docs/integrations.md).
    """
    if num_quantiles is not None and (isinstance(num_quantiles, bool) or not isinstance(num_quantiles, int)
                                      or num_quantiles < 1):
        raise ValueError(f"num_quantiles must be a positive int or None, got {num_quantiles!r}")
    if config is not None and not isinstance(config, CriticLossConfig):
        raise ValueError(f"config must be a dvpo.CriticLossConfig or None, got {type(config).__name__}")
    import verl.trainer.ppo.core_algos as core_algos
    import verl.trainer.ppo.metric_utils as metric_utils
    import verl.workers.utils.losses as losses

    unpatch_verl()
    saved = []

    def setattr_saved(module, name, value):
        saved.append((module, name, getattr(module, name), False))
        setattr(module, name, value)

    original_gae = core_algos.compute_gae_advantage_return
    loss_fn = _with_config(compute_value_loss, "config", config)
    setattr_saved(core_algos, "compute_gae_advantage_return", compute_gae_advantage_return)
    registry = getattr(core_algos, "ADV_ESTIMATOR_REGISTRY", {})
    for key, fn in list(registry.items()):
        if fn is original_gae:
            saved.append((registry, key, fn, True))
            registry[key] = compute_gae_advantage_return
    setattr_saved(core_algos, "compute_value_loss", loss_fn)
    setattr_saved(losses, "compute_value_loss", loss_fn)
    setattr_saved(losses, "value_loss", _with_config(value_loss, "dvpo_config", config))

    original_metrics = metric_utils.compute_data_metrics

    @functools.wraps(original_metrics)
    def compute_data_metrics(batch, *args, **kwargs):
        return original_metrics(_quantile_mean_batch(batch), *args, **kwargs)

    setattr_saved(metric_utils, "compute_data_metrics", compute_data_metrics)
    # ray_trainer binds compute_data_metrics at its import: patch its copy only if it is already
    # imported (importing it here would pull in Ray and the rollout stack); imported later, it
    # picks up the patched metric_utils function by itself.
    ray_trainer = sys.modules.get("verl.trainer.ppo.ray_trainer")
    if ray_trainer is not None and hasattr(ray_trainer, "compute_data_metrics"):
        setattr_saved(ray_trainer, "compute_data_metrics", compute_data_metrics)

    if num_quantiles is not None:
        import verl.utils.model as verl_model

        original_load = verl_model.load_valuehead_model

        @functools.wraps(original_load)
        def load_valuehead_model(*args, **kwargs):
            model_config = kwargs.get("model_config", args[2] if len(args) > 2 else None)
            if model_config is not None:
                model_config.num_labels = num_quantiles
            return original_load(*args, **kwargs)

        setattr_saved(verl_model, "load_valuehead_model", load_valuehead_model)
    _PATCHED.extend(saved)


def _with_config(fn, keyword: str, config: Optional[CriticLossConfig]):
    """`fn` with `keyword=config` as a default (a named function, unlike functools.partial, so verl
    and its tests see a plain function); `fn` itself when config is None. The config is kept on
    the wrapper as `.dvpo_config`."""
    if config is None:
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        kwargs.setdefault(keyword, config)
        return fn(*args, **kwargs)

    wrapper.dvpo_config = config
    return wrapper


def unpatch_verl() -> None:
    """Undo `patch_verl`."""
    for container, key, original, is_item in reversed(_PATCHED):
        if is_item:
            container[key] = original
        else:
            setattr(container, key, original)
    _PATCHED.clear()
