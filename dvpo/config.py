"""Configuration and result types shared by the reference and every backend."""

from __future__ import annotations

import dataclasses
from typing import Dict

import torch

# The eight per-token terms of the DVPO critic loss, in the order every backend returns them
# (the `terms` tensor's last dim) and named as the weights of CriticLossConfig.
TERM_NAMES = ("qh", "risk", "cvar", "gain", "shift", "shape", "curv", "consist")

# The reductions of per-token losses to one number, in the order of their ids in every backend's
# reduce_tokens kernel (csrc/terms.h is generated from this), and the public `reduction` choices:
# those plus "none" (the per-token loss itself, no kernel).
TOKEN_REDUCTIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
REDUCTIONS = TOKEN_REDUCTIONS + ("none",)

ALGORITHMS = ("auto", "pairwise", "sorted")

TAIL_TARGETS = ("consistent", "recipe")

# The float list every backend's critic-loss kernel takes (the op's `params` argument), in this order:
# the eight term weights, then the tail-term mode (0 recipe, 1 consistent) and its three scalars.
PARAM_NAMES = TERM_NAMES + ("tail_mode", "lo_scale", "hi_scale", "shift_expectile")


@dataclasses.dataclass(frozen=True)
class CriticLossConfig:
    """Hyper-parameters of the fused DVPO critic loss (docs/math.md: "4-9. Tail and shape terms" and
    "10. The fused critic loss").

    Loss shape: `kappa` is the Huber threshold of the quantile loss and `normalize_kappa` divides it
    by kappa (so a small kappa is the plain quantile loss with gradients of size 1). `alpha`, `beta`
    are the lower and upper tail levels; `risk_gamma` the slope of the risk weights.

    Tail terms (cvar, gain, shift, shape): `tail_targets="consistent"` (default) compares the critic's
    tails with targets whose expectation over per-sample returns is the tail of the pooled return
    distribution (no collapse); `"recipe"` is the published recipe's form, kept for reproduction
    (it collapses the distribution under per-sample targets). In consistent mode the method's
    asymmetry is explicit: `lower_contraction` (rho_lo in [0, 1)) shrinks the lower tail's spread
    below its VaR by the factor 1 - rho_lo, `upper_expansion` (rho_hi >= 0) widens the upper tail's by
    1 + rho_hi, and `shift_expectile` (in (0, 1); 0.5 = the mean) tilts the mean anchor upwards
    above 0.5. All 0 / 0.5 make every term consistent with the true distribution.

    Weights `qh, risk, cvar, gain, shift, shape, curv, consist`: 0 switches a term off (its work is
    skipped and it is reported as 0). The defaults were chosen on the known-answer suite (`dvpo
    calibrate`, docs/math.md): the tail terms' per-sample targets are noisy (a 1/alpha amplification,
    a fourth moment for the shape term), so cvar/gain 0.3 and shape 0.1 keep crossing quantiles under
    2%; the consistency term sums over the N atoms where the quantile loss averages, so 0.01 keeps it
    from dominating the heads' updates. `CriticLossConfig.recipe()` gives the published recipe (all 1).
    """

    kappa: float = 0.01
    alpha: float = 0.1
    beta: float = 0.1
    risk_gamma: float = 1.0
    normalize_kappa: bool = True
    tail_targets: str = "consistent"
    lower_contraction: float = 0.4
    upper_expansion: float = 0.0
    shift_expectile: float = 0.5
    qh: float = 1.0
    risk: float = 1.0
    cvar: float = 0.3
    gain: float = 0.3
    shift: float = 1.0
    shape: float = 0.1
    curv: float = 1.0
    consist: float = 0.01

    def __post_init__(self):
        if not self.kappa > 0:
            raise ValueError(f"config.kappa must be > 0, got {self.kappa}")
        for name in ("alpha", "beta"):
            level = getattr(self, name)
            if not 0.0 < level <= 1.0:
                raise ValueError(f"config.{name} must be in (0, 1], got {level}")
        if self.tail_targets not in TAIL_TARGETS:
            raise ValueError(f"config.tail_targets must be one of {', '.join(TAIL_TARGETS)}, "
                             f"got {self.tail_targets!r}")
        if not 0.0 <= self.lower_contraction < 1.0:
            raise ValueError(f"config.lower_contraction must be in [0, 1), got {self.lower_contraction}")
        if not (0.0 <= self.upper_expansion < float("inf")):
            raise ValueError(f"config.upper_expansion must be a finite number >= 0, got {self.upper_expansion}")
        if not 0.0 < self.shift_expectile < 1.0:
            raise ValueError(f"config.shift_expectile must be in (0, 1), got {self.shift_expectile}")
        for name in TERM_NAMES:
            w = getattr(self, name)
            if not (isinstance(w, (int, float)) and w >= 0 and w == w and w != float("inf")):
                raise ValueError(f"config.{name} (a loss weight) must be a finite number >= 0, got {w!r}")

    @classmethod
    def recipe(cls, **overrides) -> "CriticLossConfig":
        """The published recipe's exact settings: kappa 1 (not normalized), every weight 1, the
        recipe's tail terms. It collapses the distribution under per-sample targets (docs/math.md)."""
        fields = dict(kappa=1.0, normalize_kappa=False, tail_targets="recipe", cvar=1.0, gain=1.0, shape=1.0,
                      consist=1.0)
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def symmetric(cls, **overrides) -> "CriticLossConfig":
        """The default with the asymmetric parts off: every term consistent with the true distribution."""
        fields = dict(lower_contraction=0.0, upper_expansion=0.0, shift_expectile=0.5)
        fields.update(overrides)
        return cls(**fields)

    def term_weights(self) -> list:
        """The eight weights in TERM_NAMES order, as Python floats."""
        return [float(getattr(self, name)) for name in TERM_NAMES]

    def kernel_params(self) -> list:
        """The kernels' `params` list (PARAM_NAMES order), as Python floats."""
        consistent = self.tail_targets == "consistent"
        return self.term_weights() + [1.0 if consistent else 0.0, 1.0 - float(self.lower_contraction),
                                      1.0 + float(self.upper_expansion), float(self.shift_expectile)]


@dataclasses.dataclass
class CriticLossOutput:
    """`loss`: the reduced (or, with reduction="none", per-token) total, fp32 (fp64 for fp64 inputs),
    differentiable. `terms`: the eight unweighted per-token terms, each `[...]`, detached, 0 at masked
    tokens and for terms whose weight is 0."""

    loss: torch.Tensor
    terms: Dict[str, torch.Tensor]
