"""Noisy supervision: the trainer only ever sees the reward through one of these models.

Spec (``--noise``), optionally chained with "+" (applied left to right, e.g. ``vote:8+flip:0.1``):

- ``none``        the true reward (clean).
- ``flip:P``      with probability P (independently per sample) the reward r becomes 1 - r
                  (a binary reward is flipped; a graded one in [0, 1] is mirrored).
- ``gauss:S``     r + S * N(0, 1), independently per sample.
- ``rm:ACC``      a simulated reward model that is right with probability ACC: for each distinct
                  (prompt, response) it is right or wrong *consistently* (a deterministic hash of
                  the pair and the run's seed decides), reporting r when right and 1 - r when wrong,
                  as a learned reward model would; ACC = 0.72 is about the paper's dialogue RM.
- ``missing:P``   with probability P the reward is withheld: returned as NaN (the trainer fills it
                  with ``missing_fill``, 0 by default: a withheld outcome gives no reward).
- ``vote:K``      majority-vote pseudo-labels, no ground truth: for each prompt, K responses are
                  sampled once from the initial (SFT) policy and the majority of their answers
                  becomes the label (`Task.majority`); a response's reward is its agreement with the
                  label (`Task.vote_reward`). The trainer does the sampling and passes the labels.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import List, Optional, Sequence, Tuple

import torch

KINDS = ("none", "flip", "gauss", "rm", "missing", "vote")
# the accepted forms, as error messages (and the CLI's usage errors) spell them
FORMS = "none, flip:P, gauss:S, rm:ACC, missing:P or vote:K (chained with '+', e.g. vote:8+flip:0.1)"


@dataclasses.dataclass(frozen=True)
class NoiseStage:
    kind: str
    param: float = 0.0

    def __str__(self):
        if self.kind == "none":
            return "none"
        p = int(self.param) if self.kind == "vote" else self.param
        return f"{self.kind}:{p}"


def _parse_stage(text: str) -> NoiseStage:
    text = text.strip()
    if text in ("", "none", "clean"):
        return NoiseStage("none")
    kind, sep, value = text.partition(":")
    if kind not in KINDS or kind == "none" or not sep:
        raise ValueError(f"unknown noise model {text!r}: expected {FORMS}")
    try:
        x = float(value)
    except ValueError:
        raise ValueError(f"noise {kind}: the parameter must be a number, got {value!r}") from None
    if kind in ("flip", "rm", "missing") and not 0.0 <= x <= 1.0:
        what = "ACC" if kind == "rm" else "P"
        raise ValueError(f"noise {kind}:{what} needs {what} in [0, 1] (a probability), got {value!r}")
    if kind == "gauss" and not (x >= 0 and math.isfinite(x)):
        raise ValueError(f"noise gauss:S needs a finite S >= 0 (a standard deviation), got {value!r}")
    if kind == "vote" and not (x >= 1 and x == int(x)):
        raise ValueError(f"noise vote:K needs an integer K >= 1 (samples per prompt), got {value!r}")
    return NoiseStage(kind, x)


def _hash_uniform(*parts) -> float:
    """A uniform number in [0, 1) from a stable hash of the parts (the same on every run)."""
    h = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0 ** 64


class NoiseModel:
    """A chain of noise stages. `apply` maps true rewards to the rewards the trainer sees."""

    def __init__(self, stages: Sequence[NoiseStage], salt: int = 0):
        stages = [s for s in stages if s.kind != "none"] or [NoiseStage("none")]
        if any(s.kind == "vote" for s in stages[1:]):
            raise ValueError("noise vote:K must come first in a chain (it replaces the reward)")
        self.stages = tuple(stages)
        self.salt = salt

    @property
    def spec(self) -> str:
        return "+".join(str(s) for s in self.stages)

    @property
    def vote_k(self) -> int:
        """K for vote:K (0 when the chain has no vote stage)."""
        return int(self.stages[0].param) if self.stages[0].kind == "vote" else 0

    @property
    def is_clean(self) -> bool:
        return self.stages == (NoiseStage("none"),)

    def with_salt(self, salt: int) -> "NoiseModel":
        return NoiseModel(self.stages, salt)

    def apply(self, true_rewards: Sequence[float], *, generator: torch.Generator,
              prompts: Optional[Sequence[str]] = None, responses: Optional[Sequence[str]] = None,
              vote_rewards: Optional[Sequence[float]] = None) -> Tuple[List[float], dict]:
        """Noisy rewards (a list of floats, NaN where withheld) and counts for logging.

        `generator` drives the random stages (flip, gauss, missing), one draw per sample per stage, so
        the stream is reproducible; `prompts`/`responses` are needed by rm:ACC; `vote_rewards` (the
        agreement of each response with its prompt's majority label) by vote:K."""
        r = torch.tensor([float(x) for x in true_rewards], dtype=torch.float64)
        n = r.numel()
        info = {"flipped": 0, "missing": 0, "rm_wrong": 0}
        for st in self.stages:
            if st.kind == "none":
                continue
            if st.kind == "vote":
                if vote_rewards is None or len(vote_rewards) != n:
                    raise ValueError("noise vote:K needs vote_rewards, one per sample")
                r = torch.tensor([float(x) for x in vote_rewards], dtype=torch.float64)
            elif st.kind == "flip":
                hit = torch.rand(n, generator=generator, dtype=torch.float64) < st.param
                r = torch.where(hit, 1.0 - r, r)
                info["flipped"] += int(hit.sum())
            elif st.kind == "gauss":
                r = r + st.param * torch.randn(n, generator=generator, dtype=torch.float64)
            elif st.kind == "missing":
                hit = torch.rand(n, generator=generator, dtype=torch.float64) < st.param
                r = torch.where(hit, torch.full_like(r, float("nan")), r)
                info["missing"] += int(hit.sum())
            elif st.kind == "rm":
                if prompts is None or responses is None:
                    raise ValueError("noise rm:ACC needs the prompts and responses")
                wrong = torch.tensor([_hash_uniform("rm", self.salt, p, q) >= st.param
                                      for p, q in zip(prompts, responses)], dtype=torch.bool)
                r = torch.where(wrong, 1.0 - r, r)
                info["rm_wrong"] += int(wrong.sum())
        return r.tolist(), info


def parse_noise(spec: str, salt: int = 0) -> NoiseModel:
    """A NoiseModel from its spec (see the module docstring); `salt` seeds rm:ACC's hash."""
    return NoiseModel([_parse_stage(part) for part in str(spec).split("+")], salt=salt)
