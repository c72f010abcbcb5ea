"""dvpo.integrations.openrlhf against the installed OpenRLHF: the scalar-critic special case
(N = M = 1, `mse_config()`) of `ValueLoss` equals OpenRLHF's own `ValueLoss` (clipped and not,
token- and sequence-level, with the data-parallel normalizers), gradients included.

OpenRLHF does not install on a CPU-only machine with its dependencies (it pins flash-attn, a CUDA
build). It installs with `pip install --no-deps openrlhf` plus `pip install --no-build-isolation
deepspeed` (its loss module imports `openrlhf.models.utils`, which imports deepspeed). Its
`openrlhf.models` package `__init__` imports the actor and model code (peft, flash-attn), so the
loss module is loaded as `openrlhf.models.loss` under a bare `openrlhf.models` package that skips
that `__init__`: the code under test is OpenRLHF's own, unchanged. Skipped, with the reason, where
OpenRLHF or deepspeed is missing. Its GAE lives in the Ray experience maker (needs Ray): compared
only where that imports."""

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


openrlhf_loss, _why = _load_openrlhf_loss()
if openrlhf_loss is None:
    pytest.skip(_why, allow_module_level=True)

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
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours, theirs, **tol)
    theirs.backward()
    ours.backward()
    torch.testing.assert_close(v2.grad, values.grad, **tol)


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


def test_gae_equals_openrlhf_experience_maker():
    try:
        maker = importlib.import_module("openrlhf.trainer.ppo_utils.experience_maker")
    except Exception as exc:
        pytest.skip(f"OpenRLHF's experience maker does not import here ({type(exc).__name__}: {exc})")
    b, t = 4, 9
    lengths = torch.randint(1, t + 1, (b,))
    action_mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).float()
    values = torch.randn(b, t, dtype=torch.float64)
    rewards = torch.randn(b, t, dtype=torch.float64)
    their_adv, their_ret = maker.RemoteExperienceMaker.get_advantages_and_returns(
        None, values, rewards, action_mask, 0.99, 0.95)
    our_adv, our_ret = dvpo_openrlhf.get_advantages_and_returns(values.unsqueeze(-1), rewards, action_mask, 0.99, 0.95)
    torch.testing.assert_close(our_adv, their_adv.to(our_adv.dtype), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(our_ret[..., 0], their_ret.to(our_ret.dtype), rtol=1e-12, atol=1e-12)
