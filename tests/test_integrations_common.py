"""dvpo.integrations without any framework installed: shapes, the exact MSE special case, per-quantile
clipping and clipfrac, every loss_agg_mode against a hand-written PyTorch computation, gradients,
heads, GAE wrappers, the quantile value head. Runs in the normal CI (no verl/TRL/OpenRLHF needed)."""

import math

import pytest
import torch

import dvpo
from dvpo import reference as ref
from dvpo.integrations import (LOSS_AGG_MODES, MSE_KAPPA, QuantileValueHead, aggregate, clipped_critic_loss,
                               masked_whiten, mse_config)
from dvpo.integrations import openrlhf as dvpo_openrlhf
from dvpo.integrations import trl as dvpo_trl
from dvpo.integrations import verl as dvpo_verl


def _inputs(b=4, t=7, n=5, m=None, dtype=torch.float64, heads=None, scale=1.0):
    m = n if m is None else m
    shape = (b, t, n) if heads is None else (b, t, heads, n)
    vpreds = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    old = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)
    returns = (torch.randn(b, t, m, dtype=torch.float64) * 2 * scale).to(dtype)
    mask = torch.rand(b, t) < 0.7
    mask[0] = False            # an empty sequence
    mask[1, 0] = True
    mask[1, 3] = False         # a hole
    return vpreds, old, returns, mask


def _hand_aggregate(loss, mask, mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                    loss_scale_factor=None, seq_eps=1e-8):
    """verl's loss_agg_mode written out with Python loops over sequences (the adapters add verl's and
    OpenRLHF's 1e-8 to the per-sequence token count in seq-mean-token-mean)."""
    w = mask.to(loss.dtype)
    loss = torch.where(mask != 0, loss, torch.zeros_like(loss)) * w
    if mode == "token-mean":
        n = w.sum() if batch_num_tokens is None else torch.tensor(float(batch_num_tokens), dtype=loss.dtype)
        return loss.sum() / n * dp_size if n != 0 else loss.sum() * 0
    if mode == "token-sum":
        return loss.sum() * dp_size
    per_seq = []
    for i in range(loss.shape[0]):
        count = w[i].sum()
        if count == 0:
            continue
        s = loss[i].sum()
        if mode == "seq-mean-token-mean":  # the count in the mask's dtype, as verl and OpenRLHF
            s = s / (mask[i].sum() + seq_eps).to(loss.dtype) if seq_eps else s / count
        per_seq.append(s)
    if not per_seq:
        return loss.sum() * 0
    denom = len(per_seq) if global_batch_size is None else global_batch_size
    out = torch.stack(per_seq).sum() / denom * dp_size
    if mode == "seq-mean-token-sum-norm":
        out = out / (loss.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return out


def _reference_per_token(theta, target, mask, config):
    return ref.critic_loss(theta, target, mask=mask, config=config, reduction="none").loss


# ------------------------------------------------------------------ the exact MSE special case

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mse_config_is_exactly_half_squared_error(dtype):
    v = (torch.randn(5, 9, 1, dtype=torch.float64) * 50).to(dtype)
    r = (torch.randn(5, 9, 1, dtype=torch.float64) * 50).to(dtype)
    out = dvpo.ops.critic_loss(v, r, dvpo.taus(1, dtype=dtype), config=mse_config(), reduction="none")
    expected = 0.5 * (v - r).squeeze(-1) ** 2
    if dtype == torch.float64:
        assert torch.equal(out.loss, expected)   # powers of two only: bitwise
    else:
        torch.testing.assert_close(out.loss, expected.float(), rtol=1e-6, atol=1e-6)
    assert dvpo.taus(1).item() == 0.5
    cfg = mse_config()
    assert cfg.kappa == MSE_KAPPA and cfg.qh == 2.0
    assert all(getattr(cfg, k) == 0 for k in ("risk", "cvar", "gain", "shift", "shape", "curv", "consist"))


def test_mse_config_stays_quadratic_for_huge_residuals():
    v = torch.tensor([[[0.0]], [[1e15]], [[-3e17]]], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([[[1e17]], [[-1e15]], [[0.0]]], dtype=torch.float64)
    loss = dvpo.ops.critic_loss(v, r, config=mse_config(), reduction="none").loss
    assert torch.equal(loss, 0.5 * (v.detach() - r).squeeze(-1) ** 2)
    loss.sum().backward()
    assert torch.equal(v.grad, v.detach() - r)


# ------------------------------------------------------------------ aggregation

@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_aggregate_matches_hand_written(mode):
    loss = torch.randn(5, 8, dtype=torch.float64).abs()
    mask = (torch.rand(5, 8) < 0.6).long()
    mask[2] = 0
    mask[3, 1] = 1
    loss[mask == 0] = float("nan")  # garbage at padding must not leak
    got = aggregate(loss, mask, mode)
    torch.testing.assert_close(got, _hand_aggregate(loss, mask, mode, seq_eps=0.0), rtol=1e-12, atol=0)
    kw = dict(dp_size=4, batch_num_tokens=37, global_batch_size=9, loss_scale_factor=5)
    torch.testing.assert_close(aggregate(loss, mask, mode, **kw),
                               _hand_aggregate(loss, mask, mode, seq_eps=0.0, **kw), rtol=1e-12, atol=0)
    torch.testing.assert_close(aggregate(loss, mask, mode, seq_count_eps=1e-8),
                               _hand_aggregate(loss, mask, mode), rtol=1e-12, atol=0)


def test_aggregate_float_mask_weights_tokens_and_rejects_bad_input():
    loss = torch.rand(3, 4, dtype=torch.float64)
    w = torch.rand(3, 4, dtype=torch.float64)
    torch.testing.assert_close(aggregate(loss, w, "token-mean"), (loss * w).sum() / w.sum())
    with pytest.raises(ValueError, match="loss_agg_mode"):
        aggregate(loss, w, "seq-mean")
    with pytest.raises(ValueError, match="batch_num_tokens"):
        aggregate(loss, w, "token-mean", dp_size=2)
    with pytest.raises(ValueError, match="global_batch_size"):
        aggregate(loss, w, "seq-mean-token-mean", dp_size=2)
    with pytest.raises(ValueError, match="shape"):
        aggregate(loss, w[:, :2], "token-mean")


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_all_masked_batch_gives_zero_loss_and_zero_grad(mode):
    vpreds, old, returns, _ = _inputs()
    mask = torch.zeros(vpreds.shape[:2], dtype=torch.long)
    loss, clipfrac = dvpo_verl.compute_value_loss(vpreds, returns, old, mask, 0.2, mode)
    assert loss.item() == 0 and clipfrac.item() == 0
    loss.backward()
    assert torch.count_nonzero(vpreds.grad) == 0


# ------------------------------------------------------------------ clipping semantics

@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("heads", [None, 3])
def test_verl_value_loss_is_max_of_clipped_and_unclipped_critic_loss(mode, heads):
    vpreds, old, returns, mask = _inputs(n=6, m=4, heads=heads)
    cfg = dvpo.CriticLossConfig(alpha=0.25, beta=0.25)
    eps = 0.3
    loss, clipfrac = dvpo_verl.compute_value_loss(vpreds, returns, old, mask, eps, mode, config=cfg)
    # by hand: clip every quantile (of every head) around its old value, reference loss per branch
    clipped = torch.max(torch.min(vpreds, old + eps), old - eps)
    l1 = _reference_per_token(vpreds, returns, mask, cfg)
    l2 = _reference_per_token(clipped, returns, mask, cfg)
    expected = _hand_aggregate(torch.max(l1, l2), mask, mode)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    expected_frac = ((l2 > l1) & mask).sum() / mask.sum()
    torch.testing.assert_close(clipfrac, expected_frac.to(clipfrac.dtype))
    assert 0 < clipfrac.item() < 1
    # the gradient flows through the winning branch (through unclipped quantiles of the clipped one)
    loss.backward()
    v2 = vpreds.detach().clone().requires_grad_()
    c2 = torch.max(torch.min(v2, old + eps), old - eps)
    _hand_aggregate(torch.max(_reference_per_token(v2, returns, mask, cfg),
                              _reference_per_token(c2, returns, mask, cfg)), mask, mode).backward()
    torch.testing.assert_close(vpreds.grad, v2.grad, rtol=1e-9, atol=1e-12)


def test_no_clipping_is_one_branch_and_zero_clipfrac():
    vpreds, old, returns, mask = _inputs()
    loss, clipfrac = dvpo_verl.compute_value_loss(vpreds, returns, old, mask, None)
    expected = _hand_aggregate(_reference_per_token(vpreds, returns, mask, dvpo.CriticLossConfig()), mask,
                               "token-mean")
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    assert clipfrac.item() == 0
    # a huge clip range never clips; a zero one always returns the worse branch
    loss_big, frac_big = dvpo_verl.compute_value_loss(vpreds, returns, old, mask, 1e6)
    torch.testing.assert_close(loss_big, loss)
    assert frac_big.item() == 0


def test_clipfrac_counts_tokens_where_the_clipped_branch_wins():
    # token 0: v far from old, target near old -> clipped branch (near the target) is smaller: no clip
    # token 1: v near target, old far away -> clipped branch (pulled to old) is larger: clipped
    v = torch.tensor([[[5.0], [1.0]]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[[0.0], [-3.0]]], dtype=torch.float64)
    ret = torch.tensor([[[0.1], [1.0]]], dtype=torch.float64)
    mask = torch.ones(1, 2)
    loss, frac = dvpo_verl.compute_value_loss(v, ret, old, mask, 0.5, config=mse_config())
    assert frac.item() == 0.5
    per_token = torch.tensor([0.5 * 4.9 ** 2, 0.5 * 3.5 ** 2], dtype=torch.float64)
    torch.testing.assert_close(loss, per_token.mean())
    loss.backward()
    # token 1's clipped branch is constant in v (v - old > eps): gradient 0 there
    torch.testing.assert_close(v.grad, torch.tensor([[[4.9 / 2], [0.0]]], dtype=torch.float64))


def test_scalar_tensors_are_one_quantile():
    b, t = 3, 5
    v = torch.randn(b, t, dtype=torch.float64, requires_grad=True)
    old, ret = torch.randn(b, t, dtype=torch.float64), torch.randn(b, t, dtype=torch.float64)
    mask = torch.ones(b, t, dtype=torch.long)
    loss, frac = dvpo_verl.compute_value_loss(v, ret, old, mask, 0.2, config=mse_config())
    clipped = torch.clamp(v, old - 0.2, old + 0.2)
    expected = 0.5 * torch.max((v - ret) ** 2, (clipped - ret) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-14, atol=0)
    assert frac.item() == pytest.approx(((clipped - ret) ** 2 > (v - ret) ** 2).double().mean().item())


def test_heads_with_ensemble_old_values_and_terms():
    vpreds, old, returns, mask = _inputs(heads=4)
    old_mean = old.mean(-2)
    cfg = dvpo.CriticLossConfig()
    loss, frac, terms = dvpo_verl.compute_value_loss(vpreds, returns, old_mean, mask, 0.2, config=cfg,
                                                     return_terms=True)
    clipped = torch.max(torch.min(vpreds, old_mean.unsqueeze(-2) + 0.2), old_mean.unsqueeze(-2) - 0.2)
    expected = _hand_aggregate(torch.max(_reference_per_token(vpreds, returns, mask, cfg),
                                         _reference_per_token(clipped, returns, mask, cfg)), mask, "token-mean")
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    assert set(terms) == set(dvpo.TERM_NAMES) and terms["consist"].shape == mask.shape
    assert (terms["consist"][~mask] == 0).all() and (terms["consist"][mask] > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs(dtype):
    vpreds, old, returns, mask = _inputs(dtype=dtype)
    loss, frac = dvpo_verl.compute_value_loss(vpreds, returns.float(), old, mask, 0.2)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert vpreds.grad.dtype == dtype and torch.isfinite(vpreds.grad.float()).all()
    v64 = vpreds.detach().double()
    ref_loss, _ = dvpo_verl.compute_value_loss(v64, returns.double(), old.double(), mask, 0.2)
    assert abs(loss.item() - ref_loss.item()) <= (1e-5 if dtype == torch.float32 else 2e-2) * abs(ref_loss.item())


def test_bad_inputs_are_named():
    vpreds, old, returns, mask = _inputs()
    with pytest.raises(ValueError, match="mask"):
        dvpo_verl.compute_value_loss(vpreds, returns, old, mask[:, :3], 0.2)
    with pytest.raises(ValueError, match="returns"):
        dvpo_verl.compute_value_loss(vpreds, returns[:2], old, mask, 0.2)
    with pytest.raises(ValueError, match="old values"):
        dvpo_verl.compute_value_loss(vpreds, returns, old[..., :2], mask, 0.2)
    with pytest.raises(ValueError, match="old values"):
        clipped_critic_loss(vpreds, returns, None, mask, 0.2)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        dvpo_verl.compute_value_loss(vpreds, returns, old, mask, 0.2, "mean")


# ------------------------------------------------------------------ OpenRLHF and TRL adapters (no package)

@pytest.mark.parametrize("token_level_loss", [True, False])
def test_openrlhf_value_loss_conventions(token_level_loss):
    vpreds, old, returns, mask = _inputs()
    cfg = dvpo.CriticLossConfig(alpha=0.2)
    loss_fn = dvpo_openrlhf.ValueLoss(0.2, token_level_loss, config=cfg)
    loss = loss_fn(vpreds, old, returns, action_mask=mask)
    clipped = old + (vpreds - old).clamp(-0.2, 0.2)
    per_token = torch.max(_reference_per_token(vpreds, returns, mask, cfg),
                          _reference_per_token(clipped, returns, mask, cfg))
    mode = "token-mean" if token_level_loss else "seq-mean-token-mean"
    torch.testing.assert_close(loss, _hand_aggregate(per_token, mask, mode), rtol=1e-10, atol=1e-12)
    assert 0 < loss_fn.last_clipfrac.item() < 1 and set(loss_fn.last_terms) == set(dvpo.TERM_NAMES)
    # global normalizers (data parallel)
    kw = dict(dp_size=2, batch_num_tokens=50.0, global_batch_size=7.0)
    got = loss_fn(vpreds, old, returns, mask, **kw)
    expected = (_hand_aggregate(per_token, mask, "token-mean", dp_size=2, batch_num_tokens=50.0) if token_level_loss
                else _hand_aggregate(per_token, mask, "seq-mean-token-mean", dp_size=2, global_batch_size=7.0))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # no mask: every token counts
    torch.testing.assert_close(dvpo_openrlhf.ValueLoss(None, token_level_loss, config=cfg)(vpreds, old, returns),
                               _hand_aggregate(_reference_per_token(vpreds, returns, None, cfg),
                                               torch.ones(mask.shape), mode), rtol=1e-10, atol=1e-12)


def test_trl_value_loss_is_masked_token_mean():
    vpreds, old, returns, mask = _inputs()
    loss, frac = dvpo_trl.compute_value_loss(vpreds, old, returns, mask, 0.2)
    l_verl, f_verl = dvpo_verl.compute_value_loss(vpreds, returns, old, mask, 0.2)
    torch.testing.assert_close(loss, l_verl, rtol=1e-12, atol=0)
    torch.testing.assert_close(frac, f_verl)


# ------------------------------------------------------------------ GAE

def _prefix_mask(b, t):
    lengths = torch.randint(1, t + 1, (b,))
    return torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)


@pytest.mark.parametrize("heads", [None, 3])
def test_gae_wrappers_match_the_reference(heads):
    b, t, n = 4, 9, 6
    shape = (b, t, n) if heads is None else (b, t, heads, n)
    values = torch.randn(shape, dtype=torch.float64)
    rewards = torch.randn(b, t, dtype=torch.float64)
    mask = torch.rand(b, t) < 0.8
    mask[0] = False
    v = values if heads is None else values.mean(-2)
    adv_ref, ret_ref = ref.distributional_gae(rewards, v, mask, gamma=0.99, lam=0.9)
    adv, ret = dvpo_verl.compute_gae_advantage_return(rewards, values, mask.long(), 0.99, 0.9, whiten=False)
    torch.testing.assert_close(adv, adv_ref)
    torch.testing.assert_close(ret, ret_ref)
    adv_w, ret_w = dvpo_verl.compute_gae_advantage_return(rewards, values, mask.long(), 0.99, 0.9)
    torch.testing.assert_close(ret_w, ret_ref)
    real = adv_ref[mask]
    torch.testing.assert_close(adv_w[mask], (real - real.mean()) / torch.sqrt(real.var() + 1e-8))
    assert (adv_w[~mask] == 0).all()
    adv_o, ret_o = dvpo_openrlhf.get_advantages_and_returns(values, rewards, mask, 0.99, 0.9)
    adv_t, ret_t = dvpo_trl.compute_advantages_and_returns(rewards, values, mask, 0.99, 0.9)
    for a, r in ((adv_o, ret_o), (adv_t, ret_t)):
        torch.testing.assert_close(a, adv_ref)
        torch.testing.assert_close(r, ret_ref)


def test_gae_on_scalar_values_is_textbook_gae_on_prefix_masks():
    b, t, gamma, lam = 5, 8, 0.97, 0.9
    values = torch.randn(b, t, dtype=torch.float64)
    rewards = torch.randn(b, t, dtype=torch.float64)
    mask = _prefix_mask(b, t)
    adv, ret = dvpo_trl.compute_advantages_and_returns(rewards, values, mask, gamma, lam)
    for i in range(b):
        n = int(mask[i].sum())
        a_next, expect = 0.0, torch.zeros(t, dtype=torch.float64)
        for k in reversed(range(n)):
            v_next = values[i, k + 1] if k + 1 < n else 0.0
            a_next = rewards[i, k] + gamma * v_next - values[i, k] + gamma * lam * a_next
            expect[k] = a_next
        torch.testing.assert_close(adv[i], expect)
        torch.testing.assert_close(ret[i], (expect + values[i]) * mask[i])
    assert ret.shape == values.shape


def test_masked_whiten():
    x = torch.randn(4, 6, dtype=torch.float64)
    mask = torch.rand(4, 6) < 0.7
    mask[0, :2] = True
    w = masked_whiten(x, mask)
    real = x[mask]
    torch.testing.assert_close(w[mask], (real - real.mean()) * torch.rsqrt(real.var() + 1e-8))
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False)[mask],
                               (real - real.mean()) * torch.rsqrt(real.var() + 1e-8) + real.mean())
    one = torch.zeros(4, 6, dtype=torch.bool)
    one[1, 1] = True
    assert torch.isfinite(masked_whiten(x, one)).all()


# ------------------------------------------------------------------ the quantile value head

def test_quantile_value_head_shapes_init_and_state_dict():
    head = QuantileValueHead(16, 8)
    h = torch.randn(2, 5, 16)
    assert head(h).shape == (2, 5, 8) and isinstance(head, torch.nn.Linear)
    assert torch.equal(head.bias, torch.zeros(8))
    multi = QuantileValueHead(16, 8, num_heads=3, quantile_init=(-1.0, 1.0))
    out = multi(h)
    assert out.shape == (2, 5, 3, 8)
    torch.testing.assert_close(multi.bias.view(3, 8)[1], torch.linspace(-1, 1, 8))
    # it is a Linear(hidden, H * N): checkpoints load into a plain head and back
    plain = torch.nn.Linear(16, 24)
    plain.load_state_dict(multi.state_dict())
    torch.testing.assert_close(plain(h).view(2, 5, 3, 8), out)
    # [B, T, N] straight into the adapters, gradients reach the head
    vpreds = head(h)
    returns, old = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    loss, _ = dvpo_verl.compute_value_loss(vpreds, returns, old, torch.ones(2, 5), 0.2)
    loss.backward()
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()
    assert "num_quantiles=8" in repr(head)
    with pytest.raises(ValueError, match="num_quantiles"):
        QuantileValueHead(16, 0)
    with pytest.raises(ValueError, match="quantile_init"):
        QuantileValueHead(16, 4, bias=False, quantile_init=(0.0, 1.0))


def test_attach_quantile_head_replaces_a_linear_score_head():
    class TinyValueModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"num_labels": 1})()
            self.score = torch.nn.Linear(12, 1, bias=False, dtype=torch.float64)

    model = TinyValueModel()
    head = dvpo_trl.attach_quantile_head(model, num_quantiles=7, num_heads=2)
    assert model.score is head and head.bias is None and head.weight.dtype == torch.float64
    assert model.config.num_labels == 14
    assert model.score(torch.randn(3, 12, dtype=torch.float64)).shape == (3, 2, 7)
    with pytest.raises(ValueError, match="value_model.v_head"):
        dvpo_trl.attach_quantile_head(model, 4, head_name="v_head")


def test_gradients_of_the_adapter_match_gradcheck():
    vpreds, old, returns, mask = _inputs(b=2, t=4, n=4, m=3)
    # the published recipe's form (kappa 1): smooth enough for finite differences, unlike the default's
    # consistent tail terms, whose targets move with the critic's own (detached) VaR
    cfg = dvpo.CriticLossConfig.recipe(alpha=0.3, beta=0.3)
    # nudge the inputs off the clip boundaries / ties so the loss is differentiable there
    fn = lambda v: dvpo_verl.compute_value_loss(v, returns, old, mask, 0.25, "seq-mean-token-sum-norm",
                                                config=cfg)[0]
    assert torch.autograd.gradcheck(fn, (vpreds,), eps=1e-7, atol=1e-5)
    assert math.isfinite(fn(vpreds).item())


def test_documented_mse_json_is_mse_config():
    """docs/integrations.md and the plugin's docstring give mse_config() as DVPO_VERL_CONFIG JSON."""
    import json
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    docs = (repo / "docs" / "integrations.md").read_text().replace("\n", " ")
    plugin = (repo / "dvpo" / "integrations" / "verl_plugin.py").read_text()  # not imported: it patches verl
    found = re.findall(r"DVPO_VERL_CONFIG='(\{[^']*\"kappa\": 1e18[^']*\})'", docs)
    plugin_doc = re.sub(r"\s+", " ", plugin[:plugin.index('"""', 3)])
    found += re.findall(r"\(`(\{\"kappa\": 1e18[^`]*\})`\)", plugin_doc)
    assert len(found) == 2, found
    for raw in found:
        assert dvpo.CriticLossConfig(**json.loads(raw)) == mse_config()
