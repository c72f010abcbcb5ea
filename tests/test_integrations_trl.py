"""dvpo.integrations.trl against the installed TRL (PPO lives in `trl.experimental.ppo` in TRL 0.2x-1.12;
TRL 1.13 removed it). TRL inlines its value loss and GAE in `PPOTrainer.train`: the tests check that
the inlined lines are still the ones the adapter replaces, then compare the scalar-critic special
case (N = M = 1, `mse_config()`) with TRL's formula built from TRL's own `masked_mean`, and run a tiny
Hugging Face value model with the quantile head through TRL's `get_reward`, `forward` and
`PolicyAndValueWrapper`. Skipped, with the reason, where TRL's PPO trainer is not installed."""

import importlib
import inspect

import pytest
import torch


def _ppo_module():
    for name in ("trl.experimental.ppo.ppo_trainer", "trl.trainer.ppo_trainer"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


from tests.test_doc_recipes import SHAPE_IDS, SHAPES, assert_matches_framework, require  # noqa: E402

require("trl", "TRL is not installed (pip install 'trl<1.13', or dvpo's [trl] extra)")
ppo = _ppo_module()
if ppo is None or not hasattr(ppo, "PPOTrainer"):
    require("trl.experimental.ppo.ppo_trainer", "this TRL has no PPOTrainer (removed in TRL 1.13): install 'trl<1.13'")

import dvpo  # noqa: E402
from dvpo.integrations import trl as dvpo_trl  # noqa: E402


def _trl_masked_mean():
    fn = getattr(ppo, "masked_mean", None)
    if fn is None:
        from trl.trainer.utils import masked_mean as fn
    return fn


def _trl_get_reward():
    fn = getattr(ppo, "get_reward", None)
    if fn is None:
        from trl.trainer.utils import get_reward as fn
    return fn


def test_trl_still_inlines_the_value_loss_and_gae_the_adapter_replaces():
    src = inspect.getsource(ppo.PPOTrainer.train)
    for line in ("vf_losses1 = torch.square(vpred - mb_return)",
                 "vf_losses2 = torch.square(vpredclipped - mb_return)",
                 "vf_loss = 0.5 * masked_mean(vf_loss_max, ~padding_mask_p1[micro_batch_inds])",
                 "delta = rewards[:, t] + args.gamma * nextvalues - values[:, t]",
                 "returns = advantages + values"):
        assert line in src, f"TRL's PPOTrainer.train changed: {line!r} is gone; update docs/integrations.md"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("b,t", SHAPES, ids=SHAPE_IDS)
def test_scalar_critic_equals_trl_value_loss(b, t, dtype):
    masked_mean = _trl_masked_mean()
    eps = 0.2
    vpred = torch.randn(b, t, dtype=dtype, requires_grad=True)
    mb_values = torch.randn(b, t, dtype=dtype)
    mb_return = 2 * torch.randn(b, t, dtype=dtype)
    lengths = torch.randint(1, t, (b,))
    padding_mask_p1 = torch.arange(t).unsqueeze(0) > lengths.unsqueeze(1)
    # TRL's value loss, as PPOTrainer.train computes it, with TRL's masked_mean
    vpredclipped = torch.clamp(vpred, mb_values - eps, mb_values + eps)
    vf_losses1 = torch.square(vpred - mb_return)
    vf_losses2 = torch.square(vpredclipped - mb_return)
    theirs = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), ~padding_mask_p1)
    their_frac = masked_mean((vf_losses2 > vf_losses1).float(), ~padding_mask_p1)
    v2 = vpred.detach().clone().requires_grad_()
    # TRL's own [B, T] tensors (N = 1 after its .squeeze(-1))
    ours, our_frac = dvpo_trl.compute_value_loss(v2, mb_values, mb_return, ~padding_mask_p1, eps,
                                                 config=dvpo_trl.mse_config())
    assert (ours.shape, our_frac.shape) == (theirs.shape, their_frac.shape) == ((), ())
    assert (ours.dtype, our_frac.dtype) == (theirs.dtype, their_frac.dtype)
    tol = assert_matches_framework(ours, theirs, v2, vpred, dtype, frac=(our_frac, their_frac))
    # the same with an explicit quantile dim
    ours_q, _ = dvpo_trl.compute_value_loss(v2.detach().unsqueeze(-1), mb_values.unsqueeze(-1),
                                            mb_return.unsqueeze(-1), ~padding_mask_p1, eps,
                                            config=dvpo_trl.mse_config())
    torch.testing.assert_close(ours_q, theirs.detach(), **tol)


@pytest.mark.parametrize("b,t", SHAPES, ids=SHAPE_IDS)
def test_gae_equals_trl_loop_on_trl_layout(b, t):
    gamma, lam = 0.99, 0.95
    lengths = torch.randint(1, t, (b,))
    padding_mask_p1 = torch.arange(t).unsqueeze(0) > lengths.unsqueeze(1)
    values = torch.randn(b, t, dtype=torch.float64).masked_fill(padding_mask_p1, 0)
    rewards = torch.randn(b, t, dtype=torch.float64).masked_fill(padding_mask_p1, 0)
    # TRL's GAE: a reversed scan over every position (values and rewards are 0 past the response)
    last, advs = 0.0, []
    for k in reversed(range(t)):
        nxt = values[:, k + 1] if k < t - 1 else 0.0
        last = rewards[:, k] + gamma * nxt - values[:, k] + gamma * lam * last
        advs.append(last)
    their_adv = torch.stack(advs[::-1], 1)
    their_ret = their_adv + values
    our_adv, our_ret = dvpo_trl.compute_advantages_and_returns(rewards, values, ~padding_mask_p1, gamma, lam)
    assert our_adv.shape == our_ret.shape == their_ret.shape == (b, t) and our_ret.dtype == their_ret.dtype
    # everywhere, padding included (both are 0 there)
    torch.testing.assert_close(our_adv, their_adv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(our_ret, their_ret, rtol=1e-12, atol=1e-12)
    _, ret_1 = dvpo_trl.compute_advantages_and_returns(rewards, values.unsqueeze(-1), ~padding_mask_p1, gamma, lam)
    assert ret_1.shape == (b, t, 1) and torch.equal(ret_1[..., 0], our_ret)


def test_wrong_shapes_are_named_errors():
    b, t = 3, 5
    values, mask = torch.randn(b, t), torch.zeros(b, t, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"padding_mask must have shape \[B, T\] = \[3, 5\], got \[3, 5, 1\]"):
        dvpo_trl.fill_padding(values, mask.unsqueeze(-1), 0)
    assert dvpo_trl.fill_padding(torch.randn(b, t, 4), mask, 0).shape == (b, t, 4)
    with pytest.raises(ValueError, match=r"mask must have shape \[B, T\]"):
        dvpo_trl.compute_advantages_and_returns(torch.randn(b, t), values, ~mask[:, :1], 1.0, 0.95)
    with pytest.raises(ValueError, match=r"rewards must have shape \[B, T\]"):
        dvpo_trl.compute_advantages_and_returns(torch.randn(b, t, 1), values, ~mask, 1.0, 0.95)
    with pytest.raises(ValueError, match=r"values \(the old values\) must have the shape of vpred"):
        dvpo_trl.compute_value_loss(torch.randn(b, t, 4), values, torch.randn(b, t, 4), ~mask, 0.2)


def _tiny_models(num_labels=1):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                      num_labels=num_labels)
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(cfg)
    value_model = AutoModelForSequenceClassification.from_config(cfg)
    return policy, value_model


def test_quantile_head_through_trl_value_model_plumbing(tmp_path):
    policy, value_model = _tiny_models()
    head = dvpo_trl.attach_quantile_head(value_model, num_quantiles=6)
    b, context, t = 3, 4, 5
    query_responses = torch.randint(1, 64, (b, context + t))
    query_responses[1, -2:] = 0  # padding
    # rollout: TRL's get_reward on the value model, sliced as PPOTrainer does
    full_value, _, _ = _trl_get_reward()(value_model, query_responses, 0, context)
    value = full_value[:, context - 1: -1].squeeze(-1)
    assert value.shape == (b, t, 6)
    # training step: TRL's PolicyAndValueWrapper + forward give the same [B, T, N] quantiles
    model = ppo.PolicyAndValueWrapper(policy, value_model)
    output, vpred_temp = ppo.forward(model, query_responses, 0)
    vpred = vpred_temp[:, context - 1: -1].squeeze(-1)
    torch.testing.assert_close(vpred, value)
    mask = query_responses[:, context:] != 0
    value = dvpo_trl.fill_padding(value, ~mask, 0)
    vpred = dvpo_trl.fill_padding(vpred, ~mask, 0)
    adv, returns = dvpo_trl.compute_advantages_and_returns(torch.randn(b, t), value.detach(), mask, 1.0, 0.95)
    cfg = dvpo.CriticLossConfig(alpha=0.2, beta=0.2)
    vf_loss, vf_clipfrac = dvpo_trl.compute_value_loss(vpred, value.detach() + 0.1, returns, mask, 0.2, config=cfg)
    vf_loss.backward()
    assert torch.isfinite(vf_loss) and head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    # the quantile head round-trips through save_pretrained / from_pretrained as num_labels = N
    from transformers import AutoModelForSequenceClassification

    value_model.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert reloaded.score.out_features == 6
    torch.testing.assert_close(reloaded.score.weight, head.weight)
