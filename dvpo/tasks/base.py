"""The task interface shared by the built-in tasks (math, science, dialogue).

A task is a procedural problem generator with an exact verifier for the *true* reward:

- every problem has a stable text `prompt` (what the policy sees after BOS) and a `gold` response
  (a correct answer, used as the SFT target);
- the held-out split is defined by the prompt text (``crc32(prompt) % 10 == 0``), so a held-out
  prompt never appears in training, whatever the seed;
- `reward(problem, response)` is the true reward in [0, 1] (binary for math and science, graded
  for dialogue); the trainer only sees it through a noise model (`dvpo.tasks.noise`);
- `vote_key(problem, response)` gives the attributes a majority vote is taken over (the final
  answer for math/science; one attribute per constraint for dialogue) and `vote_reward` scores a
  response against the majority: no ground truth is used by either.
"""

from __future__ import annotations

import dataclasses
import random
import zlib
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


@dataclasses.dataclass(frozen=True)
class Problem:
    prompt: str            # the text the policy conditions on (BOS is added by the tokenizer wrapper)
    gold: str              # one correct response (the SFT target), without EOS
    level: int             # difficulty level (task specific, 1 = easiest)
    data: Tuple = ()       # task-specific payload the verifier needs (hashable)


def is_heldout(prompt: str) -> bool:
    """The held-out split: one prompt in ten, by a stable hash of its text."""
    return zlib.crc32(prompt.encode("utf-8")) % 10 == 0


def parse_levels(text: Optional[str], available: Sequence[int], default: Sequence[int]) -> Tuple[int, ...]:
    """'2' -> (2,), '1-3' -> (1, 2, 3), '1,4' -> (1, 4), 'all'/'mixed' -> every level."""
    if text is None or text == "":
        return tuple(default)
    if text in ("all", "mixed"):
        return tuple(available)
    levels = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            levels.extend(range(int(lo), int(hi) + 1))
        else:
            levels.append(int(part))
    bad = [lv for lv in levels if lv not in available]
    if bad or not levels:
        raise ValueError(f"task levels must be among {list(available)}, got {text!r}")
    return tuple(sorted(set(levels)))


class Task:
    """Base class: subclasses define `alphabet`, `max_new_tokens`, `levels_available`,
    `_generate(rng, level)`, `reward`, `vote_key` (and may override `vote_reward`)."""

    name = "task"
    alphabet = ""
    max_new_tokens = 8
    sft_target = 0.35
    levels_available: Tuple[int, ...] = (1,)
    levels_default: Tuple[int, ...] = (1,)

    def __init__(self, levels: Optional[str] = None):
        self.levels = parse_levels(levels, self.levels_available, self.levels_default)

    # ---- problem generation -------------------------------------------------------------
    def _generate(self, rng: random.Random, level: int) -> Problem:
        raise NotImplementedError

    def _draw(self, rng: random.Random, heldout: bool) -> Problem:
        for _ in range(10_000):
            level = self.levels[rng.randrange(len(self.levels))]
            p = self._generate(rng, level)
            if is_heldout(p.prompt) == heldout:
                return p
        raise RuntimeError(f"{self.name}: could not draw a {'held-out' if heldout else 'train'} problem")

    def train_problem(self, rng: random.Random) -> Problem:
        """A problem from the train split (the RL prompt stream and the SFT data)."""
        return self._draw(rng, heldout=False)

    def heldout_set(self, n: int) -> List[Problem]:
        """The first `n` distinct held-out problems of a fixed stream: the same for every run."""
        return self._fixed_set(n, heldout=True, seed=0x5EED)

    def validation_set(self, n: int) -> List[Problem]:
        """`n` distinct *train-split* problems from a fixed stream (SFT early stopping)."""
        return self._fixed_set(n, heldout=False, seed=0xA11D)

    def _fixed_set(self, n: int, heldout: bool, seed: int) -> List[Problem]:
        rng = random.Random(f"{self.name}:{self.levels}:{seed}")
        seen, out, misses = set(), [], 0
        while len(out) < n and misses < 2000:      # fewer than n when the split has fewer problems
            p = self._draw(rng, heldout)
            if p.prompt in seen:
                misses += 1
                continue
            misses = 0
            seen.add(p.prompt)
            out.append(p)
        return out

    def sft_example(self, rng: random.Random) -> Tuple[str, str]:
        """(prompt, response) for the SFT warm-up: a train problem and a correct response."""
        p = self.train_problem(rng)
        return p.prompt, self.sft_response(p, rng)

    def sft_response(self, problem: Problem, rng: random.Random) -> str:
        return problem.gold

    # ---- verification ----------------------------------------------------------------------
    def reward(self, problem: Problem, response: str) -> float:
        """The true reward in [0, 1]."""
        raise NotImplementedError

    def correct(self, problem: Problem, response: str) -> bool:
        """Exact success (reward 1)."""
        return self.reward(problem, response) >= 1.0

    def vote_key(self, problem: Problem, response: str) -> Optional[Tuple]:
        """The attributes voted on, or None for a response that cannot vote (bad format)."""
        raise NotImplementedError

    def majority(self, problem: Problem, responses: Sequence[str]) -> Optional[Tuple]:
        """Per-attribute majority over the responses that can vote (ties: the first seen)."""
        keys = [k for k in (self.vote_key(problem, r) for r in responses) if k is not None]
        if not keys:
            return None
        width = len(keys[0])
        out = []
        for i in range(width):
            counts = Counter(k[i] for k in keys)
            best = max(counts.values())
            out.append(next(k[i] for k in keys if counts[k[i]] == best))
        return tuple(out)

    def vote_reward(self, problem: Problem, response: str, majority: Optional[Tuple]) -> float:
        """Agreement with the majority: the fraction of voted attributes that match (0 when no
        majority exists or the response cannot vote)."""
        if majority is None:
            return 0.0
        key = self.vote_key(problem, response)
        if key is None:
            return 0.0
        return sum(a == b for a, b in zip(key, majority)) / len(majority)

    def describe(self) -> Dict:
        return {"task": self.name, "levels": list(self.levels), "alphabet": self.alphabet,
                "max_new_tokens": self.max_new_tokens}
