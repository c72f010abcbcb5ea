"""Drop-in DVPO critic pieces for the RL frameworks people already use (docs/integrations.md).

* `dvpo.integrations.verl`: `compute_value_loss` (verl's signature, `(loss, clipfrac)`, every
  `loss_agg_mode`), `compute_gae_advantage_return`, `agg_loss`, `value_loss`, `patch_verl`
  (and the `dvpo.integrations.verl_plugin` module for `VERL_USE_EXTERNAL_MODULES`).
* `dvpo.integrations.trl`: `attach_quantile_head`, `fill_padding`, `compute_value_loss`,
  `compute_advantages_and_returns` for TRL's PPO trainer.
* `dvpo.integrations.openrlhf`: `ValueLoss` (OpenRLHF's constructor and forward), `aggregate_loss`,
  `get_advantages_and_returns`, `apply_action_mask`, `mean_value`.

Every adapter returns what the framework's own function returns, shape for shape and dtype for
dtype (`[B, T]` values give `[B, T]` returns, `[B, T, N]` give `[B, T, N]`), and raises a ValueError
naming the argument and the expected shape instead of broadcasting.

Shared: `QuantileValueHead` (the `Linear(hidden, H * N)` quantile head), `mse_config()` (the DVPO
loss configured as the scalar critic's `0.5 * (v - R)^2`, exactly: with it every adapter computes
its framework's own value loss), `aggregate` (verl's `loss_agg_mode` reductions),
`clipped_critic_loss` (per-token `max(L(v), L(v_clip))`).

None of the adapter modules imports its framework at import time; they work on plain tensors.
"""

from ._common import (LOSS_AGG_MODES, MSE_KAPPA, QuantileValueHead, aggregate, clipped_critic_loss, masked_whiten,
                      mse_config)

__all__ = ["QuantileValueHead", "mse_config", "MSE_KAPPA", "LOSS_AGG_MODES", "aggregate", "clipped_critic_loss",
           "masked_whiten", "verl", "trl", "openrlhf"]


def __getattr__(name):
    # `dvpo.integrations.verl` etc. are submodules; import them on first attribute access.
    if name in ("verl", "trl", "openrlhf"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
