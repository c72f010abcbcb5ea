"""`science`: a multiple-choice physical-science QA set generated from rules.

"What is the state of matter of SUBSTANCE at T degrees C (1 atm)?" with the options
s (solid), l (liquid), g (gas). The rule: s below the melting point, l from the melting point up
to (not including) the boiling point, g at or above it. The melting and boiling points are the
textbook values (rounded to whole degrees) of the fifteen substances below, so the policy has to
learn a small fact table and compare signed numbers.

Prompt: the formula padded to 5 characters, the temperature as a signed 4-character number, and
"?", e.g. ``H2O   +025?`` -> ``l``. Levels (``science:LEVELS``, default all three) are by the
distance from T to the nearest phase boundary: 1 = more than 100 degrees, 2 = 20 to 100, 3 = under
20 (the hard, close calls).
"""

from __future__ import annotations

import random

from .base import Problem, Task

# formula: (melting point, boiling point) in degrees C at 1 atm
SUBSTANCES = {
    "H2O": (0, 100),
    "C2H6O": (-114, 78),   # ethanol
    "Hg": (-39, 357),
    "N2": (-210, -196),
    "O2": (-218, -183),
    "NH3": (-78, -33),
    "C6H6": (6, 80),       # benzene
    "Cl2": (-101, -34),
    "Br2": (-7, 59),
    "Ga": (30, 2400),
    "Na": (98, 883),
    "Sn": (232, 2602),
    "Pb": (327, 1749),
    "S": (115, 445),
    "CO2": (-78, -78),     # sublimes at 1 atm: solid below -78, gas at or above
}
T_MIN, T_MAX = -273, 999
OPTIONS = ("s", "l", "g")


def state(formula: str, t: int) -> str:
    mp, bp = SUBSTANCES[formula]
    if t >= bp:
        return "g"
    return "l" if t >= mp else "s"


def _distance(formula: str, t: int) -> int:
    mp, bp = SUBSTANCES[formula]
    return min(abs(t - mp), abs(t - bp))


def _band(level: int):
    return {1: (101, 10_000), 2: (20, 100), 3: (0, 19)}[level]


class ScienceTask(Task):
    name = "science"
    alphabet = "".join(sorted(set("0123456789+-? " + "".join(SUBSTANCES) + "".join(OPTIONS))))
    sft_target = 0.55       # SFT warm-up stops at this greedy accuracy (room left for RL)
    max_new_tokens = 2          # one option letter and EOS
    levels_available = (1, 2, 3)
    levels_default = (1, 2, 3)

    def __init__(self, levels=None):
        super().__init__(levels)
        self._formulas = sorted(SUBSTANCES)
        # every (formula, temperature) by level, for sampling a level first
        self._by_level = {lv: [] for lv in self.levels_available}
        for f in self._formulas:
            for t in range(T_MIN, T_MAX + 1):
                d = _distance(f, t)
                for lv in self.levels_available:
                    lo, hi = _band(lv)
                    if lo <= d <= hi:
                        self._by_level[lv].append((f, t))

    def _generate(self, rng: random.Random, level: int) -> Problem:
        pool = self._by_level[level]
        f, t = pool[rng.randrange(len(pool))]
        return Problem(prompt=f"{f:<5} {t:+04d}?", gold=state(f, t), level=level, data=(f, t))

    def reward(self, problem: Problem, response: str) -> float:
        return 1.0 if response == problem.gold else 0.0

    def vote_key(self, problem: Problem, response: str):
        return (response,) if response in OPTIONS else None
