"""Configuration and result types shared by the reference and every backend."""

from __future__ import annotations

import dataclasses
from typing import Dict

import torch

# The eight per-token terms of the DVPO critic loss, in the order every backend returns them
# (the `terms` tensor's last dim) and named as the weights of CriticLossConfig.
TERM_NAMES = ("qh", "risk", "cvar", "gain", "shift", "shape", "curv", "consist")

REDUCTIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "none")

ALGORITHMS = ("auto", "pairwise", "sorted")


@dataclasses.dataclass(frozen=True)
class CriticLossConfig:
    """Hyper-parameters of the fused DVPO critic loss (DESIGN.md, term 10).

    A weight of 0 switches its term off: backends skip its work and report the term as 0.
    """

    kappa: float = 1.0
    alpha: float = 0.1
    beta: float = 0.1
    risk_gamma: float = 1.0
    normalize_kappa: bool = False
    qh: float = 1.0
    risk: float = 1.0
    cvar: float = 1.0
    gain: float = 1.0
    shift: float = 1.0
    shape: float = 1.0
    curv: float = 1.0
    consist: float = 1.0

    def __post_init__(self):
        if not self.kappa > 0:
            raise ValueError(f"config.kappa must be > 0, got {self.kappa}")
        for name in ("alpha", "beta"):
            level = getattr(self, name)
            if not 0.0 < level <= 1.0:
                raise ValueError(f"config.{name} must be in (0, 1], got {level}")
        for name in TERM_NAMES:
            w = getattr(self, name)
            if not (isinstance(w, (int, float)) and w >= 0 and w == w and w != float("inf")):
                raise ValueError(f"config.{name} (a loss weight) must be a finite number >= 0, got {w!r}")

    def term_weights(self) -> list:
        """The eight weights in TERM_NAMES order, as Python floats."""
        return [float(getattr(self, name)) for name in TERM_NAMES]


@dataclasses.dataclass
class CriticLossOutput:
    """`loss`: the reduced (or, with reduction="none", per-token) total, fp32 (fp64 for fp64 inputs),
    differentiable. `terms`: the eight unweighted per-token terms, each `[...]`, detached, 0 at masked
    tokens and for terms whose weight is 0."""

    loss: torch.Tensor
    terms: Dict[str, torch.Tensor]
