"""`dialogue`: instruction following with rule-checkable constraints, scored 0..1.

Each prompt is an instruction made of constraint slots (a letter and a value, or "-" when the
slot is unused) asking for a word over the letters a-h:

    n<k>  the response has exactly k letters (3..8)
    s<c>  it starts with c
    e<c>  it ends with c
    h<c>  it contains c
    x<c>  it does not contain c

e.g. ``n5 sa e- hc xd:`` asks for a 5-letter word that starts with "a", contains "c" and has no
"d" (``abcca`` is one answer). The true reward is the fraction of the present constraints that
hold (0 for a response that is not 1-8 letters from a-h); a response is correct when all hold.
Constraints are derived from a random word, so every instruction is satisfiable, and there are
many correct answers (the SFT warm-up samples a random one). Levels 1..4 (``dialogue:LEVELS``,
default all) have 2..5 constraints.

For majority voting (``--noise vote:K``) each present constraint contributes one attribute of
the response (its length, first letter, last letter, or whether it contains the letter); a
response's pseudo-reward is the fraction of attributes on which it agrees with the majority.
"""

from __future__ import annotations

import random
import re

from .base import Problem, Task

LETTERS = "abcdefgh"
SLOTS = ("n", "s", "e", "h", "x")
MIN_LEN, MAX_LEN = 3, 8
_WORD = re.compile(f"[{LETTERS}]{{1,{MAX_LEN}}}")


def _check(slot: str, value, word: str) -> bool:
    if slot == "n":
        return len(word) == value
    if slot == "s":
        return word[0] == value
    if slot == "e":
        return word[-1] == value
    if slot == "h":
        return value in word
    if slot == "x":
        return value not in word
    raise ValueError(slot)


def _attribute(slot: str, value, word: str):
    if slot == "n":
        return len(word)
    if slot == "s":
        return word[0]
    if slot == "e":
        return word[-1]
    return value in word          # h and x: does the word contain the letter


class DialogueTask(Task):
    name = "dialogue"
    alphabet = "".join(sorted(set(LETTERS + "".join(SLOTS) + "345678- :")))
    sft_target = 0.3       # SFT warm-up stops at this greedy accuracy (room left for RL)
    max_new_tokens = MAX_LEN + 1
    levels_available = (1, 2, 3, 4)
    levels_default = (1, 2, 3, 4)

    def _generate(self, rng: random.Random, level: int) -> Problem:
        while True:
            k = rng.randint(MIN_LEN, MAX_LEN)
            word = "".join(rng.choice(LETTERS) for _ in range(k))
            absent = [c for c in LETTERS if c not in word]
            if absent:
                break
        values = {"n": k, "s": word[0], "e": word[-1], "h": rng.choice(word), "x": rng.choice(absent)}
        present = set(rng.sample(SLOTS, level + 1))
        cons = tuple((slot, values[slot]) for slot in SLOTS if slot in present)
        prompt = " ".join(f"{slot}{values[slot] if slot in present else '-'}" for slot in SLOTS) + ":"
        return Problem(prompt=prompt, gold=word, level=level, data=cons)

    def sft_response(self, problem: Problem, rng: random.Random) -> str:
        """A random word that meets every constraint (so SFT teaches the rule, not one word)."""
        cons = dict(problem.data)
        for _ in range(1000):
            k = cons.get("n", rng.randint(MIN_LEN, MAX_LEN))
            pool = [c for c in LETTERS if c != cons.get("x")]
            w = [rng.choice(pool) for _ in range(k)]
            if "s" in cons:
                w[0] = cons["s"]
            if "e" in cons:
                w[-1] = cons["e"]
            if "h" in cons and cons["h"] not in w:
                w[rng.randrange(1, k - 1)] = cons["h"]
            word = "".join(w)
            if all(_check(s, v, word) for s, v in problem.data):
                return word
        return problem.gold

    def reward(self, problem: Problem, response: str) -> float:
        if not _WORD.fullmatch(response):
            return 0.0
        return sum(_check(s, v, response) for s, v in problem.data) / len(problem.data)

    def vote_key(self, problem: Problem, response: str):
        if not _WORD.fullmatch(response):
            return None
        return tuple(_attribute(s, v, response) for s, v in problem.data)
