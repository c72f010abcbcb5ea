"""The reference (the oracle of every backend) against the naive loops of tests/naive.py."""

import itertools
import math

import pytest
import torch

import dvpo
from dvpo import reference as ref
from dvpo.config import TERM_NAMES, CriticLossConfig

from . import naive
from .utils import SIZES, critic_inputs, randn, random_mask


def _close(a, b, tol=1e-9):
    return abs(a - b) <= tol * max(1.0, abs(b))


# --------------------------------------------------------------------------- fixed values

def test_qrdqn_convention_pred_zero_target_one():
    # u = 1 > 0 everywhere: weight tau, Huber(1) = 0.5; midpoint taus average 0.5 -> 0.25 per pair.
    pred, target = torch.zeros(10, dtype=torch.float64), torch.ones(10, dtype=torch.float64)
    assert ref.quantile_huber(pred, target).item() == pytest.approx(0.25, abs=1e-15)
    paper = dvpo.taus(10, "paper", dtype=torch.float64)  # mean of i/10 is 0.55
    assert ref.quantile_huber(pred, target, paper).item() == pytest.approx(0.275, abs=1e-15)
    # QR-DQN divides by kappa: kappa = 2 keeps u = 1 quadratic, 0.25 / 2.
    assert ref.quantile_huber(pred, target, kappa=2.0, normalize_kappa=True).item() == pytest.approx(0.125)
    # Linear region: kappa = 0.5, Huber(1) = 0.5 (1 - 0.25) = 0.375, times mean tau 0.5.
    assert ref.quantile_huber(pred, target, kappa=0.5).item() == pytest.approx(0.1875)


def test_taus_grids():
    assert torch.allclose(dvpo.taus(4), torch.tensor([0.125, 0.375, 0.625, 0.875]))
    assert torch.allclose(dvpo.taus(4, "paper"), torch.tensor([0.25, 0.5, 0.75, 1.0]))
    assert dvpo.taus(3, dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="kind"):
        dvpo.taus(3, "uniform")
    with pytest.raises(ValueError, match="n must"):
        dvpo.taus(0)


def test_risk_weights_emphasise_low_quantiles():
    w = ref.risk_weights(dvpo.taus(7, dtype=torch.float64), gamma=2.0)
    assert torch.all(w[:-1] > w[1:])  # decreasing in tau: the lower tail weighs most
    assert w.mean().item() == pytest.approx(1.0)
    assert torch.allclose(w, torch.tensor(naive.risk_weights(dvpo.taus(7).double().tolist(), 2.0), dtype=torch.float64))


def test_cvar_known_values():
    x = torch.tensor([3.0, 1.0, 2.0, 4.0], dtype=torch.float64)  # unsorted on purpose
    assert ref.cvar(x, 0.5).item() == pytest.approx(1.5)
    assert ref.cvar(x, 0.5, upper=True).item() == pytest.approx(3.5)
    assert ref.cvar(x, 1.0).item() == pytest.approx(2.5)
    assert ref.cvar(x, 0.375).item() == pytest.approx((1.0 + 0.5 * 2.0) / 1.5)  # fractional boundary atom
    assert ref.cvar(x, 0.1).item() == pytest.approx(1.0)  # level N < 1: the minimum


# --------------------------------------------------------------------------- vs naive

@pytest.mark.parametrize("n,m", [(1, 1), (2, 3), (3, 2), (7, 7), (32, 7), (7, 200), (200, 32), (257, 3), (3, 257)])
@pytest.mark.parametrize("ties", [False, True])
def test_quantile_huber_vs_naive(n, m, ties):
    tokens = 2
    pred = randn((tokens, n), torch.float64, ties=ties)
    target = randn((tokens, m), torch.float64, ties=ties, scale=1.5)
    t = dvpo.taus(n, dtype=torch.float64)
    w = torch.rand(n, dtype=torch.float64) + 0.5
    for kappa, normalize, weights in [(1.0, False, None), (0.3, True, w), (2.5, False, w)]:
        got = ref.quantile_huber(pred, target, t, kappa=kappa, weights=weights, normalize_kappa=normalize,
                                 reduction="none")
        for k in range(tokens):
            want = naive.quantile_huber(pred[k].tolist(), target[k].tolist(), t.tolist(), kappa,
                                        None if weights is None else weights.tolist(), normalize)
            assert _close(got[k].item(), want)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("level", [0.001, 0.1, 0.25, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("ties", [False, True])
def test_cvar_sorting_free_equals_sorted(n, level, ties):
    x = randn((3, n), torch.float64, ties=ties)
    for upper in (False, True):
        got = ref.cvar(x, level, upper=upper)
        var = ref.tail_variance(x, level, upper)
        for k in range(3):
            assert _close(got[k].item(), naive.cvar(x[k].tolist(), level, upper))
            assert _close(var[k].item(), naive.tail_variance(x[k].tolist(), level, upper))


@pytest.mark.parametrize("n", SIZES)
def test_cvar_ranks_are_a_permutation_and_coefficients_sum_to_one(n):
    x = randn((4, n), torch.float64, ties=True)
    for upper in (False, True):
        r = ref.ranks(x, upper)
        assert torch.equal(r.sort(-1).values, torch.arange(n).expand(4, n))
        c = ref.cvar_coefficients(x, 0.3, upper)
        assert torch.allclose(c.sum(-1), torch.ones(4, dtype=torch.float64))


def test_cvar_gradient_is_the_coefficients_and_ties_break_by_index():
    x = torch.tensor([2.0, 1.0, 1.0, 5.0], dtype=torch.float64, requires_grad=True)
    ref.cvar(x, 0.25).backward()  # level N = 1: only the lowest atom, the first of the tied pair
    assert x.grad.tolist() == [0.0, 1.0, 0.0, 0.0]
    y = torch.tensor([5.0, 1.0, 5.0, 2.0], dtype=torch.float64, requires_grad=True)
    ref.cvar(y, 0.25, upper=True).backward()  # from the top, ties again by index
    assert y.grad.tolist() == [1.0, 0.0, 0.0, 0.0]


_CRITIC_SHAPES = [(1, 1, 1), (1, 2, 3), (2, 3, 2), (3, 7, 7), (5, 32, 7), (2, 7, 32), (3, 200, 7), (1, 7, 257),
                  (2, 257, 3)]


@pytest.mark.parametrize("h,n,m", _CRITIC_SHAPES)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("tails", ["consistent", "recipe"])
def test_critic_terms_vs_naive(h, n, m, ties, tails):
    heads, target = critic_inputs((2,), h, n, m, torch.float64, ties=ties)
    cfg = CriticLossConfig(kappa=0.8, alpha=0.15, beta=0.3, risk_gamma=1.7, tail_targets=tails,
                           lower_contraction=0.3, upper_expansion=0.2, shift_expectile=0.7)
    got = ref.critic_loss(heads, target, config=cfg, reduction="none")
    w = cfg.term_weights()
    for k in range(2):
        want = naive.critic_terms(heads[k].tolist(), target[k].tolist(), dvpo.taus(n, dtype=torch.float64).tolist(), cfg)
        for name in TERM_NAMES:
            assert _close(got.terms[name][k].item(), want[name]), name
        assert _close(got.loss[k].item(), sum(wi * want[nm] for wi, nm in zip(w, TERM_NAMES)))


@pytest.mark.parametrize("name", TERM_NAMES)
def test_zero_weight_switches_a_term_off(name):
    heads, target = critic_inputs((3,), 3, 9, 11, torch.float64)
    cfg = CriticLossConfig(**{name: 0.0})
    out = ref.critic_loss(heads, target, config=cfg, reduction="none")
    assert torch.all(out.terms[name] == 0)
    full = ref.critic_loss(heads, target, reduction="none")
    others = sum(getattr(cfg, k) * full.terms[k] for k in TERM_NAMES if k != name)
    assert torch.allclose(out.loss, others)


def test_single_head_theta_equals_one_head():
    theta, target = critic_inputs((2, 5), 1, 7, 9, torch.float64)
    a = ref.critic_loss(theta[..., 0, :], target, reduction="none")
    b = ref.critic_loss(theta, target, reduction="none")
    assert torch.equal(a.loss, b.loss)
    assert torch.all(a.terms["consist"] == 0)


@pytest.mark.parametrize("reduction", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "none"])
def test_reductions_vs_naive(reduction):
    heads, target = critic_inputs((4, 6), 2, 5, 4, torch.float64)
    mask = random_mask((4, 6))
    out = ref.critic_loss(heads, target, mask=mask, reduction=reduction)
    per_token = ref.critic_loss(heads, target, mask=mask, reduction="none").loss
    assert torch.all(per_token[~mask] == 0)
    want = naive.reduce(per_token.tolist(), mask.double().tolist(), reduction)
    if reduction == "none":
        assert torch.equal(out.loss, per_token)
    else:
        assert _close(out.loss.item(), want)


def test_float_mask_is_a_token_weight():
    heads, target = critic_inputs((2, 5), 3, 6, 6, torch.float64)
    wts = torch.rand(2, 5, dtype=torch.float64)
    out = ref.critic_loss(heads, target, mask=wts)
    per = ref.critic_loss(heads, target, reduction="none").loss
    assert out.loss.item() == pytest.approx(((per * wts).sum() / wts.sum()).item())


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0)])
def test_distributional_gae_vs_naive(gamma, lam):
    b, t, m = 4, 9, 5
    rewards = randn((b, t), torch.float64)
    values = randn((b, t, m), torch.float64)
    mask = random_mask((b, t))
    mask[1, 3:5] = False  # padding in the middle: the recursion must link across it
    mask[2, :2] = False  # left padding
    adv, ret = ref.distributional_gae(rewards, values, mask, gamma=gamma, lam=lam)
    for i in range(b):
        want_adv, want_ret = naive.gae(rewards[i].tolist(), values[i].tolist(), mask[i].tolist(), gamma, lam)
        assert torch.allclose(adv[i], torch.tensor(want_adv, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(ret[i], torch.tensor(want_ret, dtype=torch.float64), atol=1e-12)
    assert torch.all(adv[~mask] == 0) and torch.all(ret[~mask] == 0)


def test_consistency_identity_equals_pairwise_definition():
    heads = randn((6, 4, 13), torch.float64)
    got = ref.consistency_per_token(heads)
    for k in range(6):
        assert _close(got[k].item(), naive.consistency(heads[k].tolist()))


def test_reference_accumulates_low_precision_in_fp32():
    heads, target = critic_inputs((3, 4), 3, 16, 16, torch.bfloat16)
    out = ref.critic_loss(heads, target)
    assert out.loss.dtype == torch.float32
    want = ref.critic_loss(heads.double(), target.double())
    assert out.loss.item() == pytest.approx(want.loss.item(), rel=1e-5)


def test_every_combination_of_small_sizes_runs():
    for n, m, h in itertools.product((1, 2, 3), (1, 2, 3), (1, 2)):
        heads, target = critic_inputs((2,), h, n, m, torch.float64)
        out = ref.critic_loss(heads, target)
        assert math.isfinite(out.loss.item())
