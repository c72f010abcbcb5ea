"""Advantage estimators, losses, masked reductions (pure functions): shapes, masks, hand-computed values;
the algorithm registry."""

import math
import threading

import pytest
import torch

import dvpo
from dvpo import masked
from dvpo.clipped_loss import clip_bounds, clip_delta
from dvpo.trainer import advantages as A
from dvpo.trainer import losses as L


def _mask(lengths, t):
    return (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).float()


def _hand_gae(r, v, m, gamma, lam):
    """Per-row GAE over the real (prefix) tokens, in python floats."""
    b, t = len(r), len(r[0])
    adv = [[0.0] * t for _ in range(b)]
    ret = [[0.0] * t for _ in range(b)]
    for i in range(b):
        n = int(sum(m[i]))
        nxt_v, nxt_a = 0.0, 0.0
        for j in reversed(range(n)):
            delta = r[i][j] + gamma * nxt_v - v[i][j]
            a = delta + gamma * lam * nxt_a
            adv[i][j], ret[i][j] = a, a + v[i][j]
            nxt_v, nxt_a = v[i][j], a
    return adv, ret


def test_token_rewards_place_outcome_on_last_real_token():
    mask = _mask([3, 1, 4], 4)
    kl = torch.full((3, 4), 0.5)
    r = A.token_rewards(torch.tensor([1.0, 2.0, 3.0]), mask, kl, kl_coef=0.1)
    expect = torch.tensor([[-0.05, -0.05, 0.95, 0.0], [1.95, 0, 0, 0], [-0.05, -0.05, -0.05, 2.95]])
    assert torch.allclose(r, expect)


def test_scalar_gae_matches_hand_recursion_and_masks():
    torch.manual_seed(0)
    b, t = 4, 6
    mask = _mask([6, 3, 1, 4], t)
    r = torch.randn(b, t) * mask
    v = torch.randn(b, t)
    adv, ret = A.gae_advantages(r, v, mask, gamma=0.9, lam=0.8)
    ha, hr = _hand_gae(r.tolist(), v.tolist(), mask.tolist(), 0.9, 0.8)
    assert adv.shape == (b, t) and ret.shape == (b, t)
    assert torch.allclose(adv, torch.tensor(ha), atol=1e-5) and torch.allclose(ret, torch.tensor(hr), atol=1e-5)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_dvpo_advantages_shapes_masks_and_cvar():
    torch.manual_seed(1)
    b, t, n = 3, 5, 7
    mask = _mask([5, 2, 3], t)
    r = A.token_rewards(torch.tensor([1.0, 0.0, 1.0]), mask)
    q = torch.randn(b, t, n).sort(-1).values
    adv, ret = A.dvpo_advantages(r, q, mask, gamma=1.0, lam=0.95)
    assert adv.shape == (b, t) and ret.shape == (b, t, n)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()
    # per quantile it is scalar GAE: the actor's advantage is the mean over quantiles
    per_q = torch.stack([A.gae_advantages(r, q[..., j], mask, gamma=1.0, lam=0.95)[0] for j in range(n)], -1)
    assert torch.allclose(adv, per_q.mean(-1), atol=1e-5)
    assert torch.allclose(ret, (q + per_q) * mask[..., None], atol=1e-5)
    # cvar:ALPHA: the lower-tail CVaR of the per-quantile advantages (<= their mean)
    adv_c, _ = A.dvpo_advantages(r, q, mask, gamma=1.0, lam=0.95, advantage="cvar:0.25")
    assert torch.allclose(adv_c, dvpo.ops.cvar(per_q, 0.25) * mask, atol=1e-5)
    assert (adv_c <= adv + 1e-5).all()
    with pytest.raises(ValueError):
        A.parse_advantage("cvar:0")


def test_dvpo_trim_advantage_floors_only_the_negative_side():
    torch.manual_seed(2)
    b, t, n = 4, 6, 8
    mask = _mask([6, 3, 1, 0], t)
    r = A.token_rewards(torch.tensor([1.0, 0.0, -3.0, 1.0]), mask)
    q = (torch.randn(b, t, n) * 0.5 + 0.4).sort(-1).values
    adv, _ = A.dvpo_advantages(r, q, mask, gamma=1.0, lam=0.95)
    alpha = 0.25
    trim, _ = A.dvpo_advantages(r, q, mask, gamma=1.0, lam=0.95, advantage=f"trim:{alpha}")
    # the floor: the critic's alpha-quantile (the atom at level alpha: index ceil(alpha n) - 1 when sorted)
    floor = q[..., int(torch.tensor(alpha * n).ceil()) - 1] - q.mean(-1)
    want = torch.where(adv < floor, floor, adv) * mask
    assert torch.allclose(trim, want, atol=1e-6)
    assert (trim >= adv - 1e-6).all() and (trim[adv > 0] == adv[adv > 0]).all()
    assert (trim[mask == 0] == 0).all()
    assert (trim > adv + 1e-3).any(), "the -3 outcome falls below the critic's lower quantile: it must be floored"
    with pytest.raises(ValueError, match="trim:ALPHA"):
        A.parse_advantage("trim:1.5")


def test_masked_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 0.0, 0.0]])
    m = _mask([3, 2], 4)
    w = masked.masked_whiten(x, m) * m
    real = w[m.bool()]
    assert abs(float(real.mean())) < 1e-6 and abs(float(real.pow(2).mean()) - 1.0) < 1e-4
    assert (w[m == 0] == 0).all()


def test_grpo_advantages():
    outcome = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    mask = _mask([2, 3, 1, 2, 2, 2], 3)
    adv = A.grpo_advantages(outcome, 3, mask)
    g0 = torch.tensor([1.0, 0.0, 0.0])
    expect0 = (g0 - g0.mean()) / (g0.std() + 1e-6)
    assert torch.allclose(adv[:3, 0], expect0, atol=1e-6)
    assert (adv[3:] == 0).all()                         # an all-equal group has no signal
    assert (adv[mask == 0] == 0).all()
    dr = A.grpo_advantages(outcome, 3, mask, scale=False)
    assert torch.allclose(dr[:3, 0], g0 - g0.mean())


def test_reinforce_pp_advantages():
    mask = _mask([3, 2], 3)
    r = torch.tensor([[-0.1, -0.1, 0.9], [0.0, 1.0, 0.0]])
    adv = A.reinforce_pp_advantages(r, mask)
    ret = torch.tensor([[0.7, 0.8, 0.9], [1.0, 1.0, 0.0]])
    assert torch.allclose(adv, masked.masked_whiten(ret, mask) * mask, atol=1e-6)


def test_policy_loss_hand_computed():
    logp = torch.tensor([[-1.0, -0.5, -2.0], [-0.1, -3.0, -1.0]])
    old = torch.tensor([[-1.2, -0.5, -1.0], [-0.3, -2.0, -5.0]])
    adv = torch.tensor([[1.0, -2.0, 0.5], [-1.0, 2.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    eps = 0.2
    terms = []
    for i in range(2):
        for j in range(3):
            if mask[i, j]:
                ratio = math.exp(logp[i, j] - old[i, j])
                clipped = min(max(ratio, 1 - eps), 1 + eps)
                terms.append(max(-adv[i, j].item() * ratio, -adv[i, j].item() * clipped))
    loss, stats = L.policy_loss(logp, old, adv, mask, eps)
    assert abs(float(loss) - sum(terms) / len(terms)) < 1e-6
    assert 0.0 <= stats["clipfrac"] <= 1.0


def test_kl_estimators():
    logp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -1.0])
    assert torch.allclose(L.kl_penalty(logp, ref, "k1"), logp - ref)
    k3 = L.kl_penalty(logp, ref, "k3")
    assert (k3 >= 0).all() and torch.allclose(k3, torch.exp(ref - logp) - (ref - logp) - 1)


def test_scalar_value_loss_hand_computed():
    v = torch.tensor([[0.5, 1.5], [0.0, 2.0]])
    old = torch.tensor([[0.0, 1.0], [0.2, 0.0]])
    ret = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    c = 0.3
    vals = []
    for i in range(2):
        for j in range(2):
            if mask[i, j]:
                vc = min(max(v[i, j], old[i, j] - c), old[i, j] + c)
                vals.append(max((v[i, j] - ret[i, j]) ** 2, (vc - ret[i, j]) ** 2))
    assert abs(float(L.scalar_value_loss(v, old, ret, mask, c)) - 0.5 * sum(vals) / len(vals)) < 1e-6
    # heads: every head against the same (worst-case) target
    vh = torch.stack([v, v + 1], -1)
    oh = torch.stack([old, old + 1], -1)
    l2 = L.scalar_value_loss(vh, oh, ret, mask, 0.0)
    assert abs(float(l2) - 0.5 * float(((vh - ret[..., None]) ** 2 * mask[..., None]).sum() / 6)) < 1e-6


def test_distributional_value_loss_is_the_op():
    torch.manual_seed(2)
    b, t, h, n = 2, 4, 3, 5
    theta = torch.randn(b, t, h, n, requires_grad=True)
    old = theta.detach() + 0.1 * torch.randn(b, t, h, n)
    target = torch.randn(b, t, n)
    mask = _mask([4, 2], t)
    cfg = dvpo.CriticLossConfig()
    loss, terms = L.distributional_value_loss(theta, old, target, mask, cfg, clip=0.0)
    ref = dvpo.ops.critic_loss(theta, target, mask=mask, config=cfg)
    assert torch.allclose(loss, ref.loss) and set(terms) == set(dvpo.TERM_NAMES)
    lc, _ = L.distributional_value_loss(theta, old, target, mask, cfg, clip=0.05)
    per_tok = dvpo.ops.critic_loss(theta, target, mask=mask, config=cfg, reduction="none").loss
    clipped = torch.max(torch.min(theta, old + 0.05), old - 0.05)
    per_tok_c = dvpo.ops.critic_loss(clipped, target, mask=mask, config=cfg, reduction="none").loss
    assert torch.allclose(lc, L.masked_mean(torch.maximum(per_tok, per_tok_c), mask))
    lc.backward()
    assert torch.isfinite(theta.grad).all()


def test_masked_moments_population_and_bessel():
    torch.manual_seed(3)
    x = torch.randn(5, 7, dtype=torch.float64)
    m = _mask([7, 3, 1, 0, 5], 7)
    real = x[m.bool()]
    mean, var = masked.masked_moments(x, m)
    assert torch.allclose(mean, real.mean()) and torch.allclose(var, real.var(unbiased=False))
    _, var_b = masked.masked_moments(x, m, unbiased=True)
    assert torch.allclose(var_b, real.var(unbiased=True))
    x_nan = x.masked_fill(m == 0, float("nan"))                     # padding cannot leak in
    assert torch.equal(torch.stack(masked.masked_moments(x_nan, m)), torch.stack((mean, var)))
    mean0, var0 = masked.masked_moments(x, torch.zeros_like(m))        # no real token: zeros, not NaN
    assert float(mean0) == 0.0 and float(var0) == 0.0
    one = torch.zeros_like(m)
    one[1, 2] = 1
    assert float(masked.masked_moments(x, one, unbiased=True)[1]) == 0.0


def test_masked_reductions_over_ranks_equal_one_process():
    """Two 'ranks' (threads summing through a barrier) give the one-process mean, variance and whitening."""
    torch.manual_seed(4)
    x = torch.randn(6, 5)
    m = _mask([5, 2, 4, 1, 3, 5], 5)
    slots, barrier = [None, None], threading.Barrier(2)

    def rank(r, out):
        def all_reduce(t):
            slots[r] = t.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total

        part = slice(0, 2) if r == 0 else slice(2, 6)                  # uneven shards
        out[r] = (masked.masked_moments(x[part], m[part], all_reduce=all_reduce),
                  masked.masked_whiten(x[part], m[part], all_reduce=all_reduce) * m[part],
                  masked.masked_mean(x[part], m[part], all_reduce=all_reduce))

    out = [None, None]
    threads = [threading.Thread(target=rank, args=(r, out)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    mean, var = masked.masked_moments(x, m)
    for (m_r, v_r), _, mean_r in out:
        assert torch.allclose(m_r, mean) and torch.allclose(v_r, var) and torch.allclose(mean_r, mean)
    assert torch.allclose(torch.cat([out[0][1], out[1][1]]), masked.masked_whiten(x, m) * m, atol=1e-6)


def test_clip_bounds_is_the_identity_inside_the_range():
    """Why the trainer and the adapters clip with clip_bounds: inside the clip range it returns v
    itself, while old + clamp(v - old) (OpenRLHF's form) can be a rounding away from v."""
    torch.manual_seed(5)
    v = torch.randn(10000)
    old = v + 0.1 * torch.randn(10000)
    inside = (v - old).abs() < 0.5
    assert torch.equal(clip_bounds(v, old, 0.5)[inside], v[inside])
    assert not torch.equal(clip_delta(v, old, 0.5)[inside], v[inside])
    assert torch.allclose(clip_delta(v, old, 0.5), clip_bounds(v, old, 0.5), atol=1e-6)


def test_registry_is_the_one_list_of_algorithms():
    from dvpo.trainer import TrainConfig
    from dvpo.trainer.algorithms import ALGORITHMS, ALGOS, Algorithm, get_algorithm
    from dvpo.trainer.config import TrainConfig as Cfg

    field = {f.name: f for f in __import__("dataclasses").fields(Cfg)}["algo"]
    assert tuple(field.metadata["choices"]) == ALGOS == ("dvpo", "ppo", "grpo", "robust-ppo", "reinforce++")
    for name, cls in ALGORITHMS.items():
        assert issubclass(cls, Algorithm) and cls.name == name
        shape = TrainConfig(algo=name, n_heads=3, n_quantiles=7).critic_shape()
        expect = {"none": None, "scalar": (shape[0] if shape else None, 1), "distributional": (3, 7)}[cls.critic]
        assert shape == expect, name
        if shape is not None:
            view = cls(TrainConfig(algo=name, n_heads=3, n_quantiles=7)).view(torch.zeros(2, 4, *shape))
            assert view.shape == {"ppo": (2, 4), "robust-ppo": (2, 4, 3), "dvpo": (2, 4, 3, 7)}[name]
    with pytest.raises(ValueError, match="one of dvpo, ppo"):
        get_algorithm("a2c")
