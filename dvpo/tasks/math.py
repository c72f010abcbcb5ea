"""`math`: procedural arithmetic and word problems with a fixed final-answer format.

Levels (``--task math:LEVELS``, e.g. ``math:2`` (the default), ``math:1-5``, ``math:all``):

1. one-digit addition, written fixed-width:        ``03+04=``            -> ``007``
2. two-digit addition:                             ``07+45=``            -> ``052``
3. two-digit subtraction (non-negative result):    ``45-07=``            -> ``038``
4. three two-digit addends:                        ``07+45+33=``         -> ``085``
5. word problems (gain or loss):                   ``bob had 45 ate 07=`` -> ``038``

The final-answer format is exactly three digits, zero-padded, then EOS; the verifier gives 1 for
exactly the right three digits and 0 for anything else (a wrong format included).
"""

from __future__ import annotations

import random
import re

from .base import Problem, Task

_ANSWER = re.compile(r"\d{3}")
_NAMES = ("ann", "bob", "cat", "dan", "eve")
_GAIN = ("got", "won", "found")
_LOSS = ("ate", "lost", "gave")


class MathTask(Task):
    name = "math"
    alphabet = "0123456789+-= abcdefghijklmnopqrstuvwxyz"
    sft_target = 0.35       # SFT warm-up stops at this greedy accuracy (room left for RL)
    max_new_tokens = 4          # three digits and EOS
    levels_available = (1, 2, 3, 4, 5)
    levels_default = (2,)

    def _generate(self, rng: random.Random, level: int) -> Problem:
        if level == 1:
            a, b = rng.randrange(10), rng.randrange(10)
            prompt, value = f"{a:02d}+{b:02d}=", a + b
        elif level == 2:
            a, b = rng.randrange(100), rng.randrange(100)
            prompt, value = f"{a:02d}+{b:02d}=", a + b
        elif level == 3:
            a, b = rng.randrange(100), rng.randrange(100)
            a, b = max(a, b), min(a, b)
            prompt, value = f"{a:02d}-{b:02d}=", a - b
        elif level == 4:
            a, b, c = rng.randrange(100), rng.randrange(100), rng.randrange(100)
            prompt, value = f"{a:02d}+{b:02d}+{c:02d}=", a + b + c
        elif level == 5:
            name = _NAMES[rng.randrange(len(_NAMES))]
            a, b = rng.randrange(100), rng.randrange(100)
            if rng.random() < 0.5:
                verb, value = _GAIN[rng.randrange(len(_GAIN))], a + b
            else:
                a, b = max(a, b), min(a, b)
                verb, value = _LOSS[rng.randrange(len(_LOSS))], a - b
            prompt = f"{name} had {a:02d} {verb} {b:02d}="
        else:
            raise ValueError(f"math has no level {level}")
        return Problem(prompt=prompt, gold=f"{value:03d}", level=level, data=(value,))

    def reward(self, problem: Problem, response: str) -> float:
        return 1.0 if response == problem.gold else 0.0

    def vote_key(self, problem: Problem, response: str):
        return (response,) if _ANSWER.fullmatch(response) else None
