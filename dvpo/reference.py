"""The pure-PyTorch reference of every formula in docs/math.md.

This module is the oracle for all backends: it is written for clarity, differentiable with autograd,
vectorized (the pairwise quantile Huber materializes `[..., N, M]`, which is what the fused kernels
avoid), and computes in float64 when given float64, otherwise in fp32. It is itself checked against a
deliberately naive implementation (Python loops, sorted CVaR) in tests/naive.py.

The functions named like the public ops (`quantile_huber`, `cvar`, `critic_loss`,
`distributional_gae`, `risk_weights`, `taus`) take the same arguments as `dvpo.ops`; the
`*_per_token` helpers are the unreduced building blocks.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .config import TERM_NAMES, CriticLossConfig, CriticLossOutput


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# Quantile levels and weights
# ----------------------------------------------------------------------------------------------

def taus(n: int, kind: str = "midpoint", *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Quantile levels: midpoints (2i-1)/(2n) (default) or the paper's grid i/n, i = 1..n."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    i = torch.arange(1, n + 1, dtype=torch.float64)
    if kind == "midpoint":
        t = (2 * i - 1) / (2 * n)
    elif kind == "paper":
        t = i / n
    else:
        raise ValueError(f"kind must be 'midpoint' or 'paper', got {kind!r}")
    return t.to(device=device, dtype=dtype)


_taus = taus  # the ops below take an argument named `taus`


def risk_weights(taus: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Term 2's w_i = exp(-gamma tau_i) / mean_k exp(-gamma tau_k): largest at the lowest quantiles."""
    e = torch.exp(-gamma * taus.to(acc_dtype(taus.dtype)))
    return e / e.mean()


# ----------------------------------------------------------------------------------------------
# Term 1/2: quantile Huber
# ----------------------------------------------------------------------------------------------

def huber(u: torch.Tensor, kappa: float) -> torch.Tensor:
    a = u.abs()
    return torch.where(a <= kappa, 0.5 * u * u, kappa * (a - 0.5 * kappa))


def quantile_huber_per_token(pred, target, taus, kappa=1.0, weights=None, normalize_kappa=False):
    """(1/(N M)) sum_i w_i sum_j |tau_i - 1{u_ij < 0}| L_k(u_ij) [/ k], u_ij = z_j - theta_i."""
    u = target.unsqueeze(-2) - pred.unsqueeze(-1)  # [..., N, M]: the pair tensor kernels never build
    asym = torch.abs(taus.to(u.dtype).unsqueeze(-1) - (u < 0).to(u.dtype))
    pair = asym * huber(u, kappa)
    if normalize_kappa:
        pair = pair / kappa
    per_quantile = pair.mean(-1)  # [..., N]
    if weights is not None:
        per_quantile = per_quantile * weights.to(u.dtype)
    return per_quantile.mean(-1)


# ----------------------------------------------------------------------------------------------
# Term 3: sorting-free CVaR and tail statistics
# ----------------------------------------------------------------------------------------------

def ranks(x: torch.Tensor, upper: bool = False) -> torch.Tensor:
    """rank_i = #{k : x_k < x_i} + #{k < i : x_k == x_i} (from the top when `upper`): a permutation."""
    x = x.detach()
    if upper:
        x = -x
    n = x.shape[-1]
    xi, xk = x.unsqueeze(-1), x.unsqueeze(-2)  # [..., i, 1], [..., 1, k]
    idx = torch.arange(n, device=x.device)
    k_before_i = idx.unsqueeze(0) < idx.unsqueeze(1)  # [i, k]
    return (xk < xi).sum(-1) + ((xk == xi) & k_before_i).sum(-1)


def cvar_coefficients(x: torch.Tensor, level: float, upper: bool = False) -> torch.Tensor:
    """c_i = clamp(level N - rank_i, 0, 1) / (level N): the (detached) gradient of CVaR w.r.t. x_i."""
    n = x.shape[-1]
    a_n = level * n
    r = ranks(x, upper).to(acc_dtype(x.dtype))
    return ((a_n - r).clamp(0.0, 1.0) / a_n).to(x.dtype)


def cvar(x: torch.Tensor, level: float, *, upper: bool = False) -> torch.Tensor:
    """CVaR_level of the N equally weighted atoms in the last dim (upper tail with `upper`)."""
    return (cvar_coefficients(x, level, upper) * x).sum(-1)


def tail_variance(x: torch.Tensor, level: float, upper: bool = False) -> torch.Tensor:
    """c-weighted population variance of the tail: sum_i c_i (x_i - CVaR(x))^2."""
    c = cvar_coefficients(x, level, upper)
    mean = (c * x).sum(-1, keepdim=True)
    return (c * (x - mean) ** 2).sum(-1)


# ----------------------------------------------------------------------------------------------
# Terms 4-9
# ----------------------------------------------------------------------------------------------

def cvar_loss_per_token(theta, target, alpha):
    return (cvar(theta, alpha) - cvar(target, alpha)) ** 2


def gain_per_token(theta, target, beta):
    return (cvar(theta, beta, upper=True) - cvar(target, beta, upper=True)) ** 2


def mean_shift_per_token(theta, target):
    return torch.relu(target.mean(-1) - theta.mean(-1))


def tail_shape_per_token(theta, target, alpha, beta):
    lo = torch.relu(tail_variance(theta, alpha) - tail_variance(target, alpha))
    hi = torch.relu(tail_variance(target, beta, upper=True) - tail_variance(theta, beta, upper=True))
    return lo + hi


# Consistent tail terms (tail_targets="consistent"): targets whose expectation over per-sample returns
# is the property of the pooled return distribution. The VaR v is the critic's own boundary atom and,
# like the targets built from it, is held constant in the gradient (a semi-gradient, as TD targets).

def var_atom(x: torch.Tensor, level: float, upper: bool = False) -> torch.Tensor:
    """The tail's boundary atom (detached): max of x over c > 0 (min from the top when `upper`)."""
    x = x.detach()
    inside = cvar_coefficients(x, level, upper) > 0
    fill = torch.full_like(x, float("inf") if upper else float("-inf"))
    v = torch.where(inside, x, fill)
    return v.amin(-1) if upper else v.amax(-1)


def tail_targets(target, v, level, scale, upper=False):
    """(y, s): the Rockafellar-Uryasev CVaR target and the tail's second moment about v, each with the
    tail's deviations from v scaled by `scale`:
    y = v + scale E[min(z - v, 0)] / level, s = scale^2 E[min(z - v, 0)^2] / level (max for `upper`)."""
    d = target - v.unsqueeze(-1)
    part = d.clamp(min=0.0) if upper else d.clamp(max=0.0)
    y = v + scale * part.mean(-1) / level
    s = scale * scale * (part * part).mean(-1) / level
    return y.detach(), s.detach()


def tail_second_moment(x, v, level, upper=False):
    """S = sum_i c_i (x_i - v)^2: the critic's tail spread about its (detached) VaR."""
    c = cvar_coefficients(x, level, upper)
    return (c * (x - v.unsqueeze(-1)) ** 2).sum(-1)


def consistent_tail_terms(theta, target, alpha, beta, lo_scale, hi_scale):
    """cvar, gain and shape in consistent form: (C_lo - y_lo)^2, (C_hi - y_hi)^2, and
    (S_lo - s_lo)^2 + (S_hi - s_hi)^2."""
    v_lo, v_hi = var_atom(theta, alpha), var_atom(theta, beta, upper=True)
    y_lo, s_lo = tail_targets(target, v_lo, alpha, lo_scale)
    y_hi, s_hi = tail_targets(target, v_hi, beta, hi_scale, upper=True)
    cvar_term = (cvar(theta, alpha) - y_lo) ** 2
    gain_term = (cvar(theta, beta, upper=True) - y_hi) ** 2
    shape_term = ((tail_second_moment(theta, v_lo, alpha) - s_lo) ** 2
                  + (tail_second_moment(theta, v_hi, beta, upper=True) - s_hi) ** 2)
    return cvar_term, gain_term, shape_term


def expectile_shift_per_token(theta, target, tau):
    """2 |tau - 1{d < 0}| d^2, d = mean(z) - mean(theta): an asymmetric square whose fixed point over
    per-sample targets is the tau-expectile of the sampled means (the mean at tau = 0.5)."""
    d = target.mean(-1) - theta.mean(-1)
    omega = torch.where(d > 0, torch.full_like(d, tau), torch.full_like(d, 1.0 - tau))
    return 2.0 * omega * d * d


def curvature_counts(n: int, alpha: float, beta: float):
    """How many second differences each tail of the curvature term averages (docs/math.md, term 8 in
    "4-9. Tail and shape terms")."""
    return max(1, math.floor(alpha * (n - 2))), max(1, math.floor(beta * (n - 2)))


def curvature_per_token(theta, alpha, beta):
    n = theta.shape[-1]
    if n < 3:
        return theta.sum(-1) * 0.0
    d2 = theta[..., 2:] - 2.0 * theta[..., 1:-1] + theta[..., :-2]
    n_lo, n_hi = curvature_counts(n, alpha, beta)
    return torch.relu(d2[..., :n_lo].mean(-1)) + torch.relu(-d2[..., -n_hi:].mean(-1))


def consistency_per_token(heads):
    """(2/(H(H-1))) sum_{a<b} ||h_a - h_b||^2 == (2/(H-1)) sum_a ||h_a - mean_h||^2, 0 when H = 1."""
    h = heads.shape[-2]
    if h == 1:
        return heads.sum((-2, -1)) * 0.0
    centred = heads - heads.mean(-2, keepdim=True)
    return (2.0 / (h - 1)) * (centred ** 2).sum((-2, -1))


def critic_terms_per_token(heads, target, taus, config: CriticLossConfig):
    """The eight unweighted per-token terms, stacked in TERM_NAMES order: `[..., 8]`.

    `heads` is `[..., H, N]`; terms 1-8 use the ensemble `heads.mean(-2)`. A term whose weight is 0
    is not computed and reported as 0 (the contract every backend follows).
    """
    c = config
    theta = heads.mean(-2)
    zero = theta.sum(-1) * 0.0
    consistent = c.tail_targets == "consistent"
    lo_scale, hi_scale = 1.0 - c.lower_contraction, 1.0 + c.upper_expansion
    tails = {}

    def tail(k):  # the three consistent tail terms share their VaRs and targets
        if not tails:
            tails.update(zip(("cvar", "gain", "shape"),
                             consistent_tail_terms(theta, target, c.alpha, c.beta, lo_scale, hi_scale)))
        return tails[k]

    compute = {
        "qh": lambda: quantile_huber_per_token(theta, target, taus, c.kappa, None, c.normalize_kappa),
        "risk": lambda: quantile_huber_per_token(
            theta, target, taus, c.kappa, risk_weights(taus, c.risk_gamma), c.normalize_kappa),
        "cvar": (lambda: tail("cvar")) if consistent else (lambda: cvar_loss_per_token(theta, target, c.alpha)),
        "gain": (lambda: tail("gain")) if consistent else (lambda: gain_per_token(theta, target, c.beta)),
        "shift": ((lambda: expectile_shift_per_token(theta, target, c.shift_expectile)) if consistent
                  else (lambda: mean_shift_per_token(theta, target))),
        "shape": ((lambda: tail("shape")) if consistent
                  else (lambda: tail_shape_per_token(theta, target, c.alpha, c.beta))),
        "curv": lambda: curvature_per_token(theta, c.alpha, c.beta),
        "consist": lambda: consistency_per_token(heads),
    }
    return torch.stack([compute[name]() if getattr(c, name) != 0 else zero for name in TERM_NAMES], -1)


# ----------------------------------------------------------------------------------------------
# Masks and reductions (verl's loss_agg_mode)
# ----------------------------------------------------------------------------------------------

def _mask_weights(mask, like):
    return None if mask is None else mask.to(like.dtype)


def _zero_masked(x, mask, n_trailing):
    """Replace masked tokens' inputs by 0 so garbage (NaN/inf) there cannot reach outputs or grads."""
    if mask is None:
        return x
    keep = (mask != 0).reshape(mask.shape + (1,) * n_trailing)
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def apply_mask(per_token, mask):
    """Per-token values times the mask weight, exactly 0 at masked tokens."""
    if mask is None:
        return per_token
    m = mask.to(per_token.dtype)
    return torch.where(mask != 0, per_token * m, torch.zeros((), dtype=per_token.dtype, device=per_token.device))


def _safe_div(num, den):
    return num / torch.where(den > 0, den, torch.ones_like(den))


def reduce_tokens(per_token: torch.Tensor, mask: Optional[torch.Tensor], reduction: str) -> torch.Tensor:
    """Reduce masked per-token values (already 0 at masked tokens) over the leading dims.

    A sequence is a row of the last leading dim; rows with no real token are left out of the
    sequence means; an all-masked batch gives exactly 0 (and zero gradients).
    """
    if reduction == "none":
        return per_token
    weights = torch.ones_like(per_token) if mask is None else mask.to(per_token.dtype)
    if reduction == "token-mean":
        return _safe_div(per_token.sum(), weights.sum())
    rows = per_token.reshape(-1, per_token.shape[-1]) if per_token.dim() > 0 else per_token.reshape(1, 1)
    row_w = weights.reshape(rows.shape).sum(-1)
    row_sum = rows.sum(-1)
    if reduction == "seq-mean-token-mean":
        per_row = _safe_div(row_sum, row_w)
    elif reduction == "seq-mean-token-sum":
        per_row = row_sum
    else:
        raise ValueError(f"reduction must be one of token-mean, seq-mean-token-mean, "
                         f"seq-mean-token-sum, none; got {reduction!r}")
    valid = (row_w > 0).to(per_row.dtype)
    return _safe_div((per_row * valid).sum(), valid.sum())


# ----------------------------------------------------------------------------------------------
# The ops, with dvpo.ops' signatures
# ----------------------------------------------------------------------------------------------

def quantile_huber(pred, target, taus=None, *, kappa=1.0, weights=None, normalize_kappa=False,
                   mask=None, reduction="token-mean"):
    acc = acc_dtype(pred.dtype)
    n = pred.shape[-1]
    t = taus if taus is not None else _taus(n, device=pred.device, dtype=acc)
    p = _zero_masked(pred.to(acc), mask, 1)
    z = _zero_masked(target.detach().to(acc), mask, 1)
    w = None if weights is None else weights.to(acc)
    per_token = quantile_huber_per_token(p, z, t.to(acc), kappa, w, normalize_kappa)
    return reduce_tokens(apply_mask(per_token, mask), mask, reduction)


def critic_loss(theta, target, taus=None, *, mask=None, config=None, reduction="token-mean",
                algorithm="auto"):
    """Term 10. `theta` is `[..., N]` or `[..., H, N]` (heads when theta.dim() == target.dim() + 1)."""
    config = config or CriticLossConfig()
    acc = acc_dtype(theta.dtype)
    heads = theta if theta.dim() == target.dim() + 1 else theta.unsqueeze(-2)
    n = heads.shape[-1]
    t = (taus if taus is not None else _taus(n, device=theta.device, dtype=acc)).to(acc)
    h = _zero_masked(heads.to(acc), mask, 2)
    z = _zero_masked(target.detach().to(acc), mask, 1)
    terms = critic_terms_per_token(h, z, t, config)  # [..., 8]
    w = torch.tensor(config.term_weights(), dtype=acc, device=terms.device)
    total = apply_mask((terms * w).sum(-1), mask)
    terms = terms.detach()
    if mask is not None:
        terms = apply_mask(terms, mask.unsqueeze(-1))
    return CriticLossOutput(
        loss=reduce_tokens(total, mask, reduction),
        terms={name: terms[..., k] for k, name in enumerate(TERM_NAMES)},
    )


def distributional_gae(rewards, values, mask, *, gamma=1.0, lam=0.95):
    """Term 11: per-quantile GAE by a reversed scan that links consecutive real tokens.

    Returns (advantages [B, T] = mean_j A_tj, returns [B, T, M] = V + A), both 0 at padding.
    """
    acc = acc_dtype(values.dtype)
    r = rewards.detach().to(acc)
    v = values.detach().to(acc)
    real = (mask != 0)
    b, t_len, m = v.shape
    next_v = v.new_zeros(b, m)
    next_a = v.new_zeros(b, m)
    adv = torch.zeros_like(v)
    for t in reversed(range(t_len)):
        here = real[:, t].unsqueeze(-1)
        delta = r[:, t].unsqueeze(-1) + gamma * next_v - v[:, t]
        a = delta + gamma * lam * next_a
        adv[:, t] = torch.where(here, a, torch.zeros_like(a))
        next_v = torch.where(here, v[:, t], next_v)
        next_a = torch.where(here, a, next_a)
    returns = torch.where(real.unsqueeze(-1), v + adv, torch.zeros_like(v))
    return adv.mean(-1), returns
