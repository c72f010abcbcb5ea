"""dvpo.integrations.openrlhf against the installed OpenRLHF: the scalar-critic special case
(N = M = 1, `mse_config()`) of `ValueLoss` equals OpenRLHF's own `ValueLoss` (clipped and not,
token- and sequence-level, with the data-parallel normalizers), gradients included.

OpenRLHF does not install on a CPU-only machine with its dependencies (it pins flash-attn, a CUDA
build). It installs with `pip install --no-deps openrlhf` plus `pip install --no-build-isolation
deepspeed` (its loss module imports `openrlhf.models.utils`, which imports deepspeed). Its
`openrlhf.models` package `__init__` imports the actor and model code (peft, flash-attn), so the
loss module is loaded as `openrlhf.models.loss` under a bare `openrlhf.models` package that skips
that `__init__`: the code under test is OpenRLHF's own, unchanged. Skipped, with the reason, where
OpenRLHF or deepspeed is missing (a failure under DVPO_REQUIRE_FRAMEWORKS=1). Its GAE lives in the
Ray experience maker, whose module imports Ray and vLLM: the method is taken from the installed file
(its source, unchanged) and run on its own."""

import importlib
import importlib.util
import inspect
import sys
import types

import pytest
import torch


def _load_openrlhf_loss():
    if importlib.util.find_spec("openrlhf") is None:
        return None, "OpenRLHF is not installed (pip install --no-deps openrlhf; see docs/integrations.md)"
    try:
        return importlib.import_module("openrlhf.models.loss"), None
    except Exception as exc:  # the package __init__ needs flash-attn / peft
        reason = f"{type(exc).__name__}: {exc}"
    for name in [k for k in sys.modules if k == "openrlhf.models" or k.startswith("openrlhf.models.")]:
        del sys.modules[name]
    spec = importlib.util.find_spec("openrlhf")
    package = types.ModuleType("openrlhf.models")
    package.__path__ = [p + "/models" for p in spec.submodule_search_locations]
    sys.modules["openrlhf.models"] = package
    try:
        return importlib.import_module("openrlhf.models.loss"), None
    except Exception as exc:
        return None, (f"openrlhf.models.loss does not import here ({type(exc).__name__}: {exc}; the package "
                      f"itself: {reason}); it needs deepspeed: pip install --no-build-isolation deepspeed")
    finally:
        sys.modules.pop("openrlhf.models", None)


from tests.test_doc_recipes import SHAPE_IDS, SHAPES, _functions, assert_matches_framework, require  # noqa: E402

openrlhf_loss, _why = _load_openrlhf_loss()
if openrlhf_loss is None:
    require("openrlhf.models.loss", _why)

import dvpo  # noqa: E402
from dvpo.integrations import openrlhf as dvpo_openrlhf  # noqa: E402


def test_constructor_and_forward_signatures_match():
    theirs = inspect.signature(openrlhf_loss.ValueLoss.__init__).parameters
    ours = inspect.signature(dvpo_openrlhf.ValueLoss.__init__).parameters
    assert list(ours)[:len(theirs)] == list(theirs)
    theirs = list(inspect.signature(openrlhf_loss.ValueLoss.forward).parameters)
    assert list(inspect.signature(dvpo_openrlhf.ValueLoss.forward).parameters) == theirs


def _inputs(b=5, t=8, dtype=torch.float64):
    values = torch.randn(b, t, dtype=dtype, requires_grad=True)
    old_values = torch.randn(b, t, dtype=dtype)
    returns = 2 * torch.randn(b, t, dtype=dtype)
    action_mask = torch.rand(b, t) < 0.7
    action_mask[0] = False
    action_mask[1, 0] = True
    return values, old_values, returns, action_mask


@pytest.mark.parametrize("clip_eps", [None, 0.2])
@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_scalar_critic_equals_openrlhf_value_loss(clip_eps, token_level_loss, dtype):
    values, old_values, returns, action_mask = _inputs(dtype=dtype)
    mask = action_mask.to(dtype)  # OpenRLHF multiplies by the mask: a float mask, as its trainer passes
    theirs = openrlhf_loss.ValueLoss(clip_eps, token_level_loss)(values, old_values, returns, action_mask=mask)
    v2 = values.detach().clone().requires_grad_()
    ours_fn = dvpo_openrlhf.ValueLoss(clip_eps, token_level_loss, config=dvpo_openrlhf.mse_config())
    ours = ours_fn(v2.unsqueeze(-1), old_values.unsqueeze(-1), returns.unsqueeze(-1), action_mask=mask)
    assert_matches_framework(ours, theirs, v2, values, dtype)


@pytest.mark.parametrize("token_level_loss", [True, False])
def test_data_parallel_normalizers_equal_openrlhf(token_level_loss):
    values, old_values, returns, action_mask = _inputs()
    mask = action_mask.double()
    kw = dict(dp_size=4, batch_num_tokens=37.0, global_batch_size=11.0)
    theirs = openrlhf_loss.ValueLoss(0.3, token_level_loss)(values, old_values, returns, mask, **kw)
    ours = dvpo_openrlhf.ValueLoss(0.3, token_level_loss, config=dvpo_openrlhf.mse_config())(
        values, old_values, returns, mask, **kw)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)


def test_quantile_values_through_the_drop_in():
    b, t, n = 3, 6, 16
    values = torch.randn(b, t, n, requires_grad=True)
    old_values = values.detach() + 0.3 * torch.randn(b, t, n)
    rewards = torch.randn(b, t)
    action_mask = torch.ones(b, t, dtype=torch.bool)
    action_mask[2, 4:] = False
    adv, returns = dvpo_openrlhf.get_advantages_and_returns(old_values, rewards, action_mask, 1.0, 0.95)
    loss_fn = dvpo_openrlhf.ValueLoss(clip_eps=0.2, config=dvpo.CriticLossConfig())
    loss = loss_fn(values, old_values, returns, action_mask=action_mask)
    loss.backward()
    assert torch.isfinite(loss) and values.grad.abs().sum() > 0
    assert (values.grad[2, 4:] == 0).all() and 0 <= loss_fn.last_clipfrac.item() <= 1


def _openrlhf_gae():
    """OpenRLHF's `RemoteExperienceMaker.get_advantages_and_returns`, from the installed file."""
    spec = importlib.util.find_spec("openrlhf")
    path = f"{list(spec.submodule_search_locations)[0]}/trainer/ppo_utils/experience_maker.py"
    with open(path) as f:
        source = _functions(f.read(), {"get_advantages_and_returns"})["get_advantages_and_returns"]
    ns = {"torch": torch, "Tuple": tuple}
    exec(source, ns)
    return lambda *args: ns["get_advantages_and_returns"](None, *args)


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bool, torch.float64])
@pytest.mark.parametrize("b,t", SHAPES, ids=SHAPE_IDS)
def test_gae_equals_openrlhf_experience_maker(b, t, mask_dtype):
    their_gae = _openrlhf_gae()
    lengths = torch.randint(1, t + 1, (b,))
    action_mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).to(mask_dtype)
    values = torch.randn(b, t)
    rewards = torch.randn(b, t)
    their_adv, their_ret = their_gae(values, rewards, action_mask, 0.99, 0.95)
    our_adv, our_ret = dvpo_openrlhf.get_advantages_and_returns(values, rewards, action_mask, 0.99, 0.95)
    assert (our_adv.shape, our_ret.shape) == (their_adv.shape, their_ret.shape) == ((b, t), (b, t))
    assert (our_adv.dtype, our_ret.dtype) == (their_adv.dtype, their_ret.dtype)
    torch.testing.assert_close(our_adv, their_adv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_ret, their_ret, rtol=1e-5, atol=1e-5)
    _, ret_q = dvpo_openrlhf.get_advantages_and_returns(values.unsqueeze(-1).expand(b, t, 4), rewards, action_mask,
                                                        0.99, 0.95)
    assert ret_q.shape == (b, t, 4)
    torch.testing.assert_close(ret_q[..., 2], our_ret)


AGG_DTYPES = [(torch.float32, torch.float32), (torch.float32, torch.bool), (torch.float64, torch.float32),
              (torch.float32, torch.float64), (torch.bfloat16, torch.bool), (torch.bfloat16, torch.bfloat16)]


@pytest.mark.parametrize("dtypes", AGG_DTYPES, ids=lambda d: "-".join(str(x).split(".")[1] for x in d))
@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("b,t", SHAPES, ids=SHAPE_IDS)
def test_loss_and_aggregation_return_what_openrlhf_returns(b, t, token_level_loss, dtypes):
    v_dtype, m_dtype = dtypes
    values, old_values, returns = (torch.randn(b, t).to(v_dtype) for _ in range(3))
    lengths = torch.randint(1, t + 1, (b,))
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).to(m_dtype)
    low = v_dtype == torch.bfloat16
    tol = dict(rtol=2e-2, atol=1e-3) if low else dict(rtol=1e-5, atol=1e-6)
    for kw in ({}, dict(dp_size=2, batch_num_tokens=torch.tensor(40.0), global_batch_size=torch.tensor(9.0))):
        theirs = openrlhf_loss.ValueLoss(0.2, token_level_loss)(values, old_values, returns, mask, **kw)
        ours = dvpo_openrlhf.ValueLoss(0.2, token_level_loss, config=dvpo_openrlhf.mse_config())(
            values, old_values, returns, mask, **kw)
        assert ours.shape == theirs.shape == () and ours.dtype == theirs.dtype, (ours.dtype, theirs.dtype)
        torch.testing.assert_close(ours.double(), theirs.double(), **tol)
        loss = torch.rand(b, t).to(v_dtype)
        their_agg = openrlhf_loss.aggregate_loss(loss, mask, token_level_loss, **kw)
        our_agg = dvpo_openrlhf.aggregate_loss(loss, mask, token_level_loss, **kw)
        assert our_agg.dtype == their_agg.dtype
        torch.testing.assert_close(our_agg.double(), their_agg.double(), **tol)


def test_wrong_shapes_are_named_errors():
    b, t = 3, 5
    values, mask = torch.randn(b, t), torch.ones(b, t, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"action_mask must have shape \[B, T\] = \[3, 5\], got \[3, 5, 1\]"):
        dvpo_openrlhf.ValueLoss(0.2)(values, values, values, action_mask=mask.unsqueeze(-1))
    with pytest.raises(ValueError, match=r"old_values \(the old values\) must have the shape of values"):
        dvpo_openrlhf.ValueLoss(0.2)(torch.randn(b, t, 4), values, values, action_mask=mask)
    with pytest.raises(ValueError, match=r"action_mask must have shape \[B, T\]"):
        dvpo_openrlhf.get_advantages_and_returns(values, values, mask[:1], 1.0, 0.95)
    with pytest.raises(ValueError, match=r"action_mask must have shape \[B, T\]"):
        dvpo_openrlhf.apply_action_mask(values, mask.unsqueeze(-1))
    assert dvpo_openrlhf.apply_action_mask(torch.randn(b, t, 4), mask).shape == (b, t, 4)
    torch.testing.assert_close(dvpo_openrlhf.mean_value(torch.ones(b, t, 4) * 2, mask), torch.full((b, t), 2.0))
    torch.testing.assert_close(dvpo_openrlhf.mean_value(values, mask), values)
