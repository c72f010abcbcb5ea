"""A deliberately naive second implementation of docs/math.md, to check the reference against.

Python loops over plain floats, the *sorted* definitions of CVaR and tail variance (not rank
counting), the O(H^2) pairwise form of the consistency term, and GAE by walking each sequence's
real tokens. Slow by design; used at small sizes only.
"""

import math


def huber(u, k):
    return 0.5 * u * u if abs(u) <= k else k * (abs(u) - 0.5 * k)


def quantile_huber(theta, z, taus, kappa=1.0, weights=None, normalize_kappa=False):
    n, m = len(theta), len(z)
    total = 0.0
    for i in range(n):
        row = 0.0
        for j in range(m):
            u = z[j] - theta[i]
            row += abs(taus[i] - (1.0 if u < 0 else 0.0)) * huber(u, kappa) / (kappa if normalize_kappa else 1.0)
        total += (weights[i] if weights is not None else 1.0) * row
    return total / (n * m)


def _tail_atoms(x, level, upper):
    """(value, weight) pairs of the tail: the lowest (highest) level*N atoms, the boundary fractional."""
    order = sorted(x, reverse=upper)
    remaining = level * len(x)
    atoms = []
    for v in order:
        take = min(1.0, remaining)
        if take <= 0:
            break
        atoms.append((v, take))
        remaining -= take
    return atoms, level * len(x)


def cvar(x, level, upper=False):
    atoms, mass = _tail_atoms(x, level, upper)
    return sum(v * w for v, w in atoms) / mass


def tail_variance(x, level, upper=False):
    atoms, mass = _tail_atoms(x, level, upper)
    c = cvar(x, level, upper)
    return sum(w * (v - c) ** 2 for v, w in atoms) / mass


def relu(x):
    return x if x > 0 else 0.0


def var_atom(x, level, upper=False):
    """The last atom of the sorted tail (the boundary atom, with a positive weight)."""
    atoms, _ = _tail_atoms(x, level, upper)
    return atoms[-1][0]


def consistent_tail(theta, z, level, scale, upper=False):
    """(tail term CVaR - y)^2 and the tail spread term (S - s)^2, written from the sorted tail."""
    v = var_atom(theta, level, upper)
    parts = [max(zj - v, 0.0) if upper else min(zj - v, 0.0) for zj in z]
    y = v + scale * sum(parts) / len(z) / level
    s = scale ** 2 * sum(p * p for p in parts) / len(z) / level
    atoms, mass = _tail_atoms(theta, level, upper)
    spread = sum(w * (a - v) ** 2 for a, w in atoms) / mass
    return (cvar(theta, level, upper) - y) ** 2, (spread - s) ** 2


def curvature(theta, alpha, beta):
    n = len(theta)
    if n < 3:
        return 0.0
    d2 = [theta[i + 1] - 2 * theta[i] + theta[i - 1] for i in range(1, n - 1)]
    n_lo = max(1, math.floor(alpha * (n - 2)))
    n_hi = max(1, math.floor(beta * (n - 2)))
    return relu(sum(d2[:n_lo]) / n_lo) + relu(-sum(d2[len(d2) - n_hi:]) / n_hi)


def consistency(heads):
    h = len(heads)
    if h == 1:
        return 0.0
    total = 0.0
    for a in range(h):
        for b in range(a + 1, h):
            total += sum((x - y) ** 2 for x, y in zip(heads[a], heads[b]))
    return 2.0 / (h * (h - 1)) * total


def risk_weights(taus, gamma):
    e = [math.exp(-gamma * t) for t in taus]
    mean = sum(e) / len(e)
    return [v / mean for v in e]


def critic_terms(heads, z, taus, cfg):
    """The eight unweighted terms (dict) for one token; heads is a list of H lists of N floats."""
    n = len(heads[0])
    theta = [sum(h[i] for h in heads) / len(heads) for i in range(n)]
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    if cfg.tail_targets == "consistent":
        cv, sh_lo = consistent_tail(theta, z, cfg.alpha, 1.0 - cfg.lower_contraction)
        gn, sh_hi = consistent_tail(theta, z, cfg.beta, 1.0 + cfg.upper_expansion, True)
        d = mean(z) - mean(theta)
        omega = cfg.shift_expectile if d > 0 else 1.0 - cfg.shift_expectile
        tails = {"cvar": cv, "gain": gn, "shift": 2 * omega * d * d, "shape": sh_lo + sh_hi}
    else:
        tails = {
            "cvar": (cvar(theta, cfg.alpha) - cvar(z, cfg.alpha)) ** 2,
            "gain": (cvar(theta, cfg.beta, True) - cvar(z, cfg.beta, True)) ** 2,
            "shift": relu(mean(z) - mean(theta)),
            "shape": relu(tail_variance(theta, cfg.alpha) - tail_variance(z, cfg.alpha))
            + relu(tail_variance(z, cfg.beta, True) - tail_variance(theta, cfg.beta, True)),
        }
    terms = {
        "qh": quantile_huber(theta, z, taus, cfg.kappa, None, cfg.normalize_kappa),
        "risk": quantile_huber(theta, z, taus, cfg.kappa, risk_weights(taus, cfg.risk_gamma), cfg.normalize_kappa),
        **tails,
        "curv": curvature(theta, cfg.alpha, cfg.beta),
        "consist": consistency(heads),
    }
    return {k: (v if getattr(cfg, k) != 0 else 0.0) for k, v in terms.items()}


def reduce(per_token, mask, reduction):
    """per_token, mask: lists of rows (sequences) of floats; per_token already 0 at masked tokens."""
    if reduction == "none":
        return per_token
    if reduction == "token-mean":
        den = sum(sum(r) for r in mask)
        return sum(sum(r) for r in per_token) / den if den > 0 else 0.0
    rows = []
    for vals, ms in zip(per_token, mask):
        cnt = sum(ms)
        if cnt > 0:
            rows.append(sum(vals) / cnt if reduction == "seq-mean-token-mean" else sum(vals))
    return sum(rows) / len(rows) if rows else 0.0


def gae(rewards, values, mask, gamma, lam):
    """One sequence: rewards [T], values [T][M], mask [T] -> (adv [T], returns [T][M])."""
    t_len, m = len(values), len(values[0])
    real = [t for t in range(t_len) if mask[t]]
    adv = [[0.0] * m for _ in range(t_len)]
    ret = [[0.0] * m for _ in range(t_len)]
    for pos in reversed(range(len(real))):
        t = real[pos]
        nxt = real[pos + 1] if pos + 1 < len(real) else None
        for j in range(m):
            v_next = values[nxt][j] if nxt is not None else 0.0
            a_next = adv[nxt][j] if nxt is not None else 0.0
            delta = rewards[t] + gamma * v_next - values[t][j]
            adv[t][j] = delta + gamma * lam * a_next
            ret[t][j] = values[t][j] + adv[t][j]
    return [sum(a) / m for a in adv], ret
