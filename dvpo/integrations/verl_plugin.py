"""Importing this module patches verl for a DVPO critic (`dvpo.integrations.verl.patch_verl`).

verl imports the modules named in `VERL_USE_EXTERNAL_MODULES` in every process that imports verl
(driver and Ray workers), so a verl PPO run becomes a DVPO run with:

    export VERL_USE_EXTERNAL_MODULES=dvpo.integrations.verl_plugin
    export DVPO_VERL_NUM_QUANTILES=32                      # critic head: Linear(hidden, 32)
    export DVPO_VERL_CONFIG='{"alpha": 0.1, "beta": 0.1}'  # optional: dvpo.CriticLossConfig fields

Without `DVPO_VERL_NUM_QUANTILES` the critic head is left as verl builds it (N = 1); the values are
then verl's `[B, T]` and so are the returns. `DVPO_VERL_CONFIG` with `mse_config()`'s fields
(`{"kappa": 1e18, "normalize_kappa": false, "qh": 2.0, "risk": 0, "cvar": 0, "gain": 0, "shift": 0,
"shape": 0, "curv": 0, "consist": 0}`) is verl's own value loss, exactly. Tested by driving verl's
trainer code with this module loaded (tests/test_integrations_verl_plugin.py).
"""

from __future__ import annotations

import json
import os

from ..config import CriticLossConfig
from .verl import patch_verl


def _from_env():
    raw_n = os.environ.get("DVPO_VERL_NUM_QUANTILES", "").strip()
    try:
        num_quantiles = int(raw_n) if raw_n else None
    except ValueError:
        raise ValueError(f"DVPO_VERL_NUM_QUANTILES must be a positive int, got {raw_n!r}") from None
    raw_cfg = os.environ.get("DVPO_VERL_CONFIG", "").strip()
    try:
        fields = json.loads(raw_cfg) if raw_cfg else {}
        config = CriticLossConfig(**fields) if fields else None
    except (ValueError, TypeError) as exc:
        raise ValueError(f"DVPO_VERL_CONFIG must be a JSON object of dvpo.CriticLossConfig fields, "
                         f"got {raw_cfg!r}: {exc}") from None
    return config, num_quantiles


config, num_quantiles = _from_env()
patch_verl(config=config, num_quantiles=num_quantiles)
