"""The `reference` backend: the fallback implementation of every op's kernel interface in PyTorch.

Every backend module implements the interface of dvpo/opspec.py (one table: the arguments of each
op, their types and its outputs) on flattened tensors (tokens first), returning per-token values
*and* the gradient w.r.t. the first argument, computed in the forward pass (targets are detached,
so the backward only scales the stored gradient). Outputs are in the accumulation dtype (fp64 for
fp64 inputs, else fp32), the loss ops' gradients in the input dtype (computed in the accumulation
dtype and rounded once at the end); masked tokens give 0 (the mask is a per-token weight; the loss and
gradient are multiplied by it). Here the gradients are the closed forms of docs/math.md, written
out in PyTorch (custom-op kernels run below autograd, so autograd cannot be used); tests check them
against autograd of `dvpo.reference`. The pair tensor is built in token chunks of bounded size, so
the fallback's memory stays bounded too.
"""

from __future__ import annotations

import torch

from .. import reference as ref
from ..config import PARAM_NAMES, TERM_NAMES, TOKEN_REDUCTIONS

# Pair-tensor elements per chunk of tokens (bounds the fallback's peak memory to ~100 MB).
_PAIRS_PER_CHUNK = 1 << 22


def _token_chunks(n_tokens: int, pairs_per_token: int):
    step = max(1, _PAIRS_PER_CHUNK // max(1, pairs_per_token))
    for start in range(0, n_tokens, step):
        yield slice(start, min(n_tokens, start + step))


def _qh_loss_grad(theta, target, taus, kappa, weights, normalize_kappa):
    """Per-token quantile Huber loss [T] and its gradient w.r.t. theta [T,N]."""
    n, m = theta.shape[-1], target.shape[-1]
    scale = 1.0 / (n * m) / (kappa if normalize_kappa else 1.0)
    loss = theta.new_zeros(theta.shape[0])
    grad = torch.zeros_like(theta)
    tau = taus.unsqueeze(-1)
    for s in _token_chunks(theta.shape[0], n * m):
        u = target[s].unsqueeze(-2) - theta[s].unsqueeze(-1)
        asym = torch.abs(tau - (u < 0).to(u.dtype))
        a = u.abs()
        hub = torch.where(a <= kappa, 0.5 * u * u, kappa * (a - 0.5 * kappa))
        per_q_loss = (asym * hub).sum(-1) * scale
        per_q_grad = -(asym * u.clamp(-kappa, kappa)).sum(-1) * scale
        if weights is not None:
            per_q_loss = per_q_loss * weights
            per_q_grad = per_q_grad * weights
        loss[s] = per_q_loss.sum(-1)
        grad[s] = per_q_grad
    return loss, grad


def _mask(mask, dtype):
    return None if mask is None else mask.to(dtype)


def _finish(values, grad, mask, grad_trailing):
    """Multiply per-token values and gradients by the mask weight (exactly 0 at masked tokens)."""
    if mask is None:
        return values, grad
    return ref.apply_mask(values, mask), ref.apply_mask(grad, mask.reshape(mask.shape + (1,) * grad_trailing))


def quantile_huber(pred, target, taus, weights, mask, kappa, normalize_kappa, algorithm="auto"):
    acc = ref.acc_dtype(pred.dtype)
    theta = ref._zero_masked(pred.to(acc), mask, 1)
    z = ref._zero_masked(target.to(acc), mask, 1)
    w = None if weights is None else weights.to(acc)
    loss, grad = _qh_loss_grad(theta, z, taus.to(acc), kappa, w, normalize_kappa)
    loss, grad = _finish(loss, grad, mask, 1)
    return loss, grad.to(pred.dtype)


def cvar(x, level, upper):
    acc = ref.acc_dtype(x.dtype)
    xa = x.to(acc)
    coef = ref.cvar_coefficients(xa, level, upper)
    return (coef * xa).sum(-1), coef.to(x.dtype)


def _tail(x, level, upper):
    """CVaR, its coefficients, and the tail variance with its gradient."""
    c = ref.cvar_coefficients(x, level, upper)
    value = (c * x).sum(-1)
    centred = x - value.unsqueeze(-1)
    var = (c * centred ** 2).sum(-1)
    # d var / d x_i = 2 c_i (x_i - CVaR) (the term through CVaR vanishes: sum_i c_i (x_i - CVaR) = 0).
    return value, c, var, 2.0 * c * centred


def _curvature(theta, alpha, beta):
    t, n = theta.shape
    zero = theta.new_zeros(t)
    if n < 3:
        return zero, torch.zeros_like(theta)
    n_lo, n_hi = ref.curvature_counts(n, alpha, beta)
    d2 = theta[:, 2:] - 2.0 * theta[:, 1:-1] + theta[:, :-2]
    lo = d2[:, :n_lo].mean(-1)
    hi = -d2[:, -n_hi:].mean(-1)
    # d(mean of d2 over a set S)/d theta: each d2_i spreads (1, -2, 1)/|S| over theta_{i-1..i+1}.
    sel = torch.zeros(t, n - 2, dtype=theta.dtype, device=theta.device)
    sel[:, :n_lo] += (lo > 0).to(theta.dtype).unsqueeze(-1) / n_lo
    sel[:, n - 2 - n_hi:] -= (hi > 0).to(theta.dtype).unsqueeze(-1) / n_hi
    grad = torch.zeros_like(theta)
    grad[:, :-2] += sel
    grad[:, 1:-1] -= 2.0 * sel
    grad[:, 2:] += sel
    return torch.relu(lo) + torch.relu(hi), grad


def _consistent_tail(theta, target, level, scale, upper):
    """Consistent-mode tail pieces: CVaR, coefficients c, the CVaR target y, the second moment
    S = sum c (theta - v)^2 with d S / d theta = 2 c (theta - v), and its target s (v, y, s constant)."""
    c = ref.cvar_coefficients(theta, level, upper)
    value = (c * theta).sum(-1)
    v = ref.var_atom(theta, level, upper)
    y, s = ref.tail_targets(target, v, level, scale, upper)
    dev = theta - v.unsqueeze(-1)
    return value, c, y, (c * dev * dev).sum(-1), 2.0 * c * dev, s


def _tail_side(theta, z, level, scale, upper, consistent):
    """One tail: theta's CVaR, its coefficients, what it is aligned with (the target's own CVaR in the
    recipe, the Rockafellar-Uryasev target about theta's VaR in the consistent form), and the shape
    statistic of theta with its gradient and of the target (tail variance in the recipe, the second
    moment about theta's VaR in the consistent form)."""
    if consistent:
        return _consistent_tail(theta, z, level, scale, upper)
    value, c, s_t, ds_t = _tail(theta, level, upper)
    goal, _, s_z, _ = _tail(z, level, upper)
    return value, c, goal, s_t, ds_t, s_z


def critic_loss(heads, target, taus, risk_weights, mask, kappa, alpha, beta, normalize_kappa, params,
                algorithm="auto"):
    if len(params) != len(PARAM_NAMES):
        raise ValueError(f"params must hold {len(PARAM_NAMES)} values ({', '.join(PARAM_NAMES)}), got {len(params)}")
    acc = ref.acc_dtype(heads.dtype)
    h = ref._zero_masked(heads.to(acc), mask, 2)
    z = ref._zero_masked(target.to(acc), mask, 1)
    taus = taus.to(acc)
    t_len, n_heads, n = h.shape
    theta = h.mean(1)
    weights = [float(x) for x in params[:len(TERM_NAMES)]]
    w = dict(zip(TERM_NAMES, weights))
    consistent, lo_scale, hi_scale, tau_s = params[len(TERM_NAMES)] != 0, *params[len(TERM_NAMES) + 1:]
    terms = theta.new_zeros(t_len, len(TERM_NAMES))
    g_theta = torch.zeros_like(theta)  # d total / d theta (ensemble mean)

    def add(name, value, grad):
        terms[:, TERM_NAMES.index(name)] = value
        if grad is not None:
            g_theta.add_(grad * w[name])

    if w["qh"]:
        add("qh", *_qh_loss_grad(theta, z, taus, kappa, None, normalize_kappa))
    if w["risk"]:
        add("risk", *_qh_loss_grad(theta, z, taus, kappa, risk_weights.to(acc), normalize_kappa))
    if w["cvar"] or w["shape"]:
        lo_t, c_lo, lo_goal, s_lo_t, ds_lo, s_lo_z = _tail_side(theta, z, alpha, lo_scale, False, consistent)
    if w["gain"] or w["shape"]:
        hi_t, c_hi, hi_goal, s_hi_t, ds_hi, s_hi_z = _tail_side(theta, z, beta, hi_scale, True, consistent)
    if w["cvar"]:
        diff = lo_t - lo_goal
        add("cvar", diff ** 2, 2.0 * diff.unsqueeze(-1) * c_lo)
    if w["gain"]:
        diff = hi_t - hi_goal
        add("gain", diff ** 2, 2.0 * diff.unsqueeze(-1) * c_hi)
    if w["shift"]:
        gap = z.mean(-1) - theta.mean(-1)
        if consistent:  # expectile square
            omega = torch.where(gap > 0, torch.full_like(gap, tau_s), torch.full_like(gap, 1.0 - tau_s))
            add("shift", 2.0 * omega * gap * gap, (-4.0 * omega * gap / n).unsqueeze(-1).expand(-1, n))
        else:  # hinge
            add("shift", torch.relu(gap), -(gap > 0).to(acc).unsqueeze(-1).expand(-1, n) / n)
    if w["shape"]:
        if consistent:
            d_lo, d_hi = s_lo_t - s_lo_z, s_hi_t - s_hi_z
            add("shape", d_lo ** 2 + d_hi ** 2, 2.0 * d_lo.unsqueeze(-1) * ds_lo + 2.0 * d_hi.unsqueeze(-1) * ds_hi)
        else:
            lo, hi = s_lo_t - s_lo_z, s_hi_z - s_hi_t
            grad = (lo > 0).to(acc).unsqueeze(-1) * ds_lo - (hi > 0).to(acc).unsqueeze(-1) * ds_hi
            add("shape", torch.relu(lo) + torch.relu(hi), grad)
    if w["curv"]:
        add("curv", *_curvature(theta, alpha, beta))
    grad = (g_theta / n_heads).unsqueeze(1).expand(-1, n_heads, -1).clone()
    if w["consist"] and n_heads > 1:
        centred = h - theta.unsqueeze(1)
        terms[:, TERM_NAMES.index("consist")] = (2.0 / (n_heads - 1)) * (centred ** 2).sum((1, 2))
        grad += w["consist"] * (4.0 / (n_heads - 1)) * centred
    total = (terms * torch.tensor(weights, dtype=acc, device=terms.device)).sum(-1)
    total, grad = _finish(total, grad, mask, 2)
    if mask is not None:
        terms = ref.apply_mask(terms, mask.unsqueeze(-1))
    return total, terms, grad.to(heads.dtype)


def distributional_gae(rewards, values, mask, gamma, lam):
    return ref.distributional_gae(rewards, values, mask, gamma=gamma, lam=lam)


def reduce_tokens(values, mask, reduction):
    """The reduced value (as `dvpo.reference.reduce_tokens`) and its gradient w.r.t. every token's
    value, in closed form (docs/math.md, "Reductions"): 1 / W, or per row 1 / (w_r V) and 1 / V (0 in
    a row without a real token); a zero denominator counts as 1."""
    if reduction not in TOKEN_REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(TOKEN_REDUCTIONS)}, got {reduction!r}")
    acc = ref.acc_dtype(values.dtype)
    v = values.detach().to(acc)
    w = torch.ones_like(v) if mask is None else mask.detach().to(acc)
    if reduction == "token-mean":
        den = ref._safe_div(torch.ones((), dtype=acc, device=v.device), w.sum())   # 1 / W (1 when W = 0)
        return v.sum() * den, den.expand(v.shape).clone()
    row_w = w.sum(-1)
    valid = (row_w > 0).to(acc)
    per_row = v.sum(-1)
    scale = valid
    if reduction == "seq-mean-token-mean":
        scale = valid / torch.where(row_w > 0, row_w, torch.ones_like(row_w))
    inv_v = 1.0 / torch.clamp(valid.sum(), min=1.0)
    return (per_row * scale).sum() * inv_v, (scale * inv_v).unsqueeze(-1).expand(v.shape).clone()
