"""The registry of RL algorithms: `--algo NAME` -> an `Algorithm` (see `base.py`).

One module per algorithm. To add one: write `algorithms/NAME.py` with a subclass of `Algorithm`
(copy the closest one: `ppo.py` for a critic, `reinforce_pp.py` without), add it to `ALGORITHMS`
below; the config's `--algo` choices, `dvpo train --help`, `dvpo demo`, the experiment grids and
the tests all read the names from here.
"""

from __future__ import annotations

from typing import Dict, Type

from .base import Algorithm
from .dvpo import DVPO
from .grpo import GRPO
from .ppo import PPO
from .reinforce_pp import ReinforcePP
from .robust_ppo import RobustPPO

ALGORITHMS: Dict[str, Type[Algorithm]] = {cls.name: cls for cls in (DVPO, PPO, GRPO, RobustPPO, ReinforcePP)}
ALGOS = tuple(ALGORITHMS)


def get_algorithm(name: str) -> Type[Algorithm]:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"algo must be one of {', '.join(ALGOS)}, got {name!r}") from None


__all__ = ["Algorithm", "ALGORITHMS", "ALGOS", "get_algorithm"]
