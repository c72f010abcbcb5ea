"""dvpo.integrations.verl against the installed verl (`pip install verl`, CPU-only is fine): the scalar
critic special case (N = M = 1, `mse_config()`) equals verl's own `compute_value_loss` in every
`loss_agg_mode`, the GAE equals verl's on real tokens, the engine loss function `value_loss` equals
verl's on verl's TensorDict, and `patch_verl` wires the DVPO critic into verl's modules.
Skipped, with the reason, where verl is not installed."""

import importlib

import pytest
import torch

from tests.test_doc_recipes import SHAPE_IDS, SHAPES, assert_matches_framework, require

core_algos = require("verl.trainer.ppo.core_algos",
                     "verl is not installed (pip install verl, or dvpo's [verl] extra); its value loss is compared here")

import dvpo  # noqa: E402
from dvpo.integrations import verl as dvpo_verl  # noqa: E402

MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"]


def _scalar_inputs(b=5, t=9, dtype=torch.float64):
    vpreds = torch.randn(b, t, dtype=dtype, requires_grad=True)
    values = torch.randn(b, t, dtype=dtype)
    returns = 2 * torch.randn(b, t, dtype=dtype)
    mask = (torch.rand(b, t) < 0.7).long()
    mask[0] = 0
    mask[1, 0] = 1
    return vpreds, values, returns, mask


def test_verl_signature_is_a_prefix_of_ours():
    import inspect

    theirs = list(inspect.signature(core_algos.compute_value_loss).parameters)
    ours = list(inspect.signature(dvpo_verl.compute_value_loss).parameters)
    assert ours[:len(theirs)] == theirs, (theirs, ours)
    theirs = list(inspect.signature(core_algos.compute_gae_advantage_return).parameters)
    assert list(inspect.signature(dvpo_verl.compute_gae_advantage_return).parameters)[:len(theirs)] == theirs
    theirs = list(inspect.signature(core_algos.agg_loss).parameters)
    assert list(inspect.signature(dvpo_verl.agg_loss).parameters) == theirs


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_scalar_critic_equals_verl_compute_value_loss(mode, dtype):
    vpreds, values, returns, mask = _scalar_inputs(dtype=dtype)
    theirs, their_frac = core_algos.compute_value_loss(vpreds=vpreds, returns=returns, values=values,
                                                       response_mask=mask, cliprange_value=0.3, loss_agg_mode=mode)
    v2 = vpreds.detach().clone().requires_grad_()
    # verl's keyword call, with N = M = 1 quantile tensors
    ours, our_frac = dvpo_verl.compute_value_loss(vpreds=v2.unsqueeze(-1), returns=returns.unsqueeze(-1),
                                                  values=values.unsqueeze(-1), response_mask=mask,
                                                  cliprange_value=0.3, loss_agg_mode=mode,
                                                  config=dvpo_verl.mse_config())
    assert_matches_framework(ours, theirs, v2, vpreds, dtype, frac=(our_frac, their_frac))


@pytest.mark.parametrize("mode", MODES)
def test_global_normalizers_equal_verl(mode):
    vpreds, values, returns, mask = _scalar_inputs()
    kw = dict(dp_size=4, batch_num_tokens=61, global_batch_size=13, loss_scale_factor=7)
    theirs, _ = core_algos.compute_value_loss(vpreds, returns, values, mask, 0.2, mode, **kw)
    ours, _ = dvpo_verl.compute_value_loss(vpreds, returns, values, mask, 0.2, mode, **kw,
                                           config=dvpo_verl.mse_config())
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    loss_mat = torch.rand(5, 9, dtype=torch.float64)
    torch.testing.assert_close(dvpo_verl.agg_loss(loss_mat, mask, mode, **kw),
                               core_algos.agg_loss(loss_mat, mask, mode, **kw), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("holes", [False, True])
def test_gae_equals_verl_on_real_tokens(holes):
    b, t = 6, 11
    rewards = torch.randn(b, t, dtype=torch.float64)
    values = torch.randn(b, t, dtype=torch.float64)
    lengths = torch.randint(2, t + 1, (b,))
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).long()
    if holes:  # multi-turn: observation tokens inside the response are skipped by both
        mask[:, 1] = 0
        mask[2, 4:6] = 0
    their_adv, their_ret = core_algos.compute_gae_advantage_return(rewards, values, mask, 0.99, 0.95)
    our_adv, our_ret = dvpo_verl.compute_gae_advantage_return(rewards, values, mask, 0.99, 0.95)
    real = mask.bool()
    assert our_ret.shape == their_ret.shape == (b, t) and our_ret.dtype == their_ret.dtype
    # an explicit quantile dim stays: [B, T, 1] in, [B, T, 1] out
    adv_1, ret_1 = dvpo_verl.compute_gae_advantage_return(rewards, values.unsqueeze(-1), mask, 0.99, 0.95)
    assert ret_1.shape == (b, t, 1) and torch.equal(ret_1[..., 0], our_ret) and torch.equal(adv_1, our_adv)
    torch.testing.assert_close(our_ret[real], their_ret[real], rtol=1e-12, atol=1e-12)
    # whitening: verl computes the Bessel factor n / (n - 1) of an integer mask in float32 (1e-8 off)
    torch.testing.assert_close(our_adv[real], their_adv[real], rtol=1e-6, atol=1e-7)
    assert (our_adv[~real] == 0).all() and (our_ret[~real] == 0).all()
    # quantiles: the advantage is the mean of the per-quantile GAE, i.e. verl's GAE of the mean value
    quantiles = values.unsqueeze(-1) + torch.randn(b, t, 8, dtype=torch.float64)
    adv_q, ret_q = dvpo_verl.compute_gae_advantage_return(rewards, quantiles, mask, 0.99, 0.95)
    their_adv_mean, _ = core_algos.compute_gae_advantage_return(rewards, quantiles.mean(-1), mask, 0.99, 0.95)
    torch.testing.assert_close(adv_q[real], their_adv_mean[real], rtol=1e-6, atol=1e-7)
    assert ret_q.shape == (b, t, 8)


def _engine_batch(n=None):
    """A padded verl engine micro-batch (prompts, responses, attention_mask, ...), as value_loss gets it."""
    from tensordict import NonTensorData, TensorDict

    b, p, r = 3, 4, 5
    attn = torch.ones(b, p + r, dtype=torch.long)
    attn[0, :1] = 0          # left-padded prompt
    attn[1, p + 3:] = 0      # right-padded responses
    attn[2, p + 1:] = 0
    nnz = int(attn.sum())
    resp_mask = attn[:, p:].clone()
    extra = () if n is None else (n,)
    m = resp_mask.view(b, r, *([1] * len(extra)))
    data = TensorDict({
        "prompts": torch.zeros(b, p, dtype=torch.long), "responses": torch.zeros(b, r, dtype=torch.long),
        "attention_mask": attn, "response_mask": resp_mask,
        "values": torch.randn(b, r, *extra) * m, "returns": torch.randn(b, r, *extra) * m,
        "dp_size": NonTensorData(1), "batch_num_tokens": NonTensorData(None),
        "global_batch_size": NonTensorData(None)}, batch_size=[b])
    vpreds = torch.randn(nnz, *extra, requires_grad=True)
    return data, vpreds


def _critic_config(mode="token-mean"):
    from verl.workers.config import CriticConfig

    return CriticConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=2, cliprange_value=0.3, loss_agg_mode=mode)


@pytest.mark.parametrize("mode", MODES)
def test_engine_value_loss_equals_verl_for_a_scalar_critic(mode):
    from verl.workers.utils import losses

    cfg = _critic_config(mode)
    data, vpreds = _engine_batch()
    theirs, their_metrics = losses.value_loss(cfg, {"values": vpreds}, data)
    ours, our_metrics = dvpo_verl.value_loss(cfg, {"values": vpreds}, data, dvpo_config=dvpo_verl.mse_config())
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    for key in ("critic/vf_clipfrac", "critic/vpred_mean"):
        assert our_metrics[key] == pytest.approx(their_metrics[key], rel=1e-6, abs=1e-7)
    assert our_metrics["critic/vf_loss"].aggregation == their_metrics["critic/vf_loss"].aggregation


def test_engine_value_loss_on_quantiles():
    cfg = _critic_config()
    data, vpreds = _engine_batch(n=6)
    loss, metrics = dvpo_verl.value_loss(cfg, {"values": vpreds}, data)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(vpreds.grad).all() and vpreds.grad.abs().sum() > 0
    assert 0 <= metrics["critic/vf_clipfrac"] <= 1 and isinstance(metrics["critic/vpred_mean"], float)


def test_patch_verl_wires_the_dvpo_critic(monkeypatch):
    import verl.trainer.ppo.metric_utils as metric_utils
    import verl.utils.model as verl_model
    from verl import DataProto
    from verl.workers.utils import losses

    seen = {}

    def fake_load(local_path, torch_dtype, model_config, trust_remote_code):
        seen["num_labels"] = model_config.num_labels
        return "model"

    monkeypatch.setattr(verl_model, "load_valuehead_model", fake_load)
    originals = (core_algos.compute_gae_advantage_return, core_algos.compute_value_loss, losses.value_loss,
                 losses.compute_value_loss, metric_utils.compute_data_metrics, core_algos.get_adv_estimator_fn("gae"))
    cfg = dvpo.CriticLossConfig(alpha=0.2, beta=0.2)
    dvpo_verl.patch_verl(config=cfg, num_quantiles=8)
    try:
        assert core_algos.compute_gae_advantage_return is dvpo_verl.compute_gae_advantage_return
        assert losses.compute_value_loss.dvpo_config is cfg and core_algos.compute_value_loss.dvpo_config is cfg
        assert losses.value_loss.dvpo_config is cfg
        assert core_algos.get_adv_estimator_fn("gae") is dvpo_verl.compute_gae_advantage_return
        hf_config = type("HFConfig", (), {"num_labels": 1})()
        assert verl_model.load_valuehead_model(local_path="x", torch_dtype=None, model_config=hf_config,
                                               trust_remote_code=False) == "model"
        assert seen["num_labels"] == 8
        # verl's engine value loss, as the trainer sends it to the critic workers, on quantiles
        data, vpreds = _engine_batch(n=8)
        loss, _ = losses.value_loss(config=_critic_config(), model_output={"values": vpreds}, data=data)
        expected, _ = dvpo_verl.value_loss(_critic_config(), {"values": vpreds}, data, dvpo_config=cfg)
        torch.testing.assert_close(loss, expected)
        # the trainer's data metrics on [B, T, N] values and returns
        b, t = 4, 6
        mask = torch.ones(b, t, dtype=torch.long)
        mask[0, 4:] = 0
        batch = DataProto.from_dict(tensors={
            "token_level_scores": torch.randn(b, t), "token_level_rewards": torch.randn(b, t),
            "advantages": torch.randn(b, t), "returns": torch.randn(b, t, 8), "values": torch.randn(b, t, 8),
            "response_mask": mask, "attention_mask": torch.ones(b, 2 * t, dtype=torch.long),
            "responses": torch.zeros(b, t, dtype=torch.long), "prompts": torch.zeros(b, t, dtype=torch.long)})
        metrics = metric_utils.compute_data_metrics(batch, use_critic=True)
        torch.testing.assert_close(torch.tensor(metrics["critic/values/mean"]),
                                   batch.batch["values"].mean(-1)[mask.bool()].mean(), rtol=1e-5, atol=1e-6)
        assert batch.batch["values"].shape == (b, t, 8)  # the caller's batch is untouched
    finally:
        dvpo_verl.unpatch_verl()
    assert (core_algos.compute_gae_advantage_return, core_algos.compute_value_loss, losses.value_loss,
            losses.compute_value_loss, metric_utils.compute_data_metrics,
            core_algos.get_adv_estimator_fn("gae")) == originals


def test_patch_verl_validates_before_patching():
    with pytest.raises(ValueError, match="num_quantiles"):
        dvpo_verl.patch_verl(num_quantiles=0)
    with pytest.raises(ValueError, match="config"):
        dvpo_verl.patch_verl(config={"alpha": 0.1})
    assert core_algos.compute_value_loss.__module__.startswith("verl")


def test_ray_trainer_compute_advantage_uses_distributional_gae():
    try:
        ray_trainer = importlib.import_module("verl.trainer.ppo.ray_trainer")
    except Exception as exc:  # verl's trainer module needs extra packages (uvicorn, fastapi, ...)
        pytest.skip(f"verl.trainer.ppo.ray_trainer does not import here: {type(exc).__name__}: {exc}")
    from verl import DataProto

    b, t, n = 3, 5, 4
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 3:] = 0
    data = DataProto.from_dict(tensors={"token_level_rewards": torch.randn(b, t), "values": torch.randn(b, t, n),
                                        "response_mask": mask})
    dvpo_verl.patch_verl()
    try:
        out = ray_trainer.compute_advantage(data, adv_estimator="gae", gamma=1.0, lam=0.95,
                                            config={"use_pf_ppo": False})
    finally:
        dvpo_verl.unpatch_verl()
    assert out.batch["advantages"].shape == (b, t) and out.batch["returns"].shape == (b, t, n)
    adv, ret = dvpo_verl.compute_gae_advantage_return(data.batch["token_level_rewards"], data.batch["values"], mask,
                                                      1.0, 0.95)
    torch.testing.assert_close(out.batch["returns"], ret)


# ------------------------------------------------------------------ shapes and dtypes, as verl's

def _mask(b, t, dtype):
    lengths = torch.randint(2, t + 1, (b,))
    lengths[0] = t
    return (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).to(dtype)


GAE_DTYPES = [  # (rewards, values, response_mask); verl's GAE computes `1 - mask`: no bool masks
    (torch.float32, torch.float32, torch.long), (torch.float32, torch.float32, torch.float32),
    (torch.float64, torch.float64, torch.long),
    (torch.float32, torch.float64, torch.long), (torch.float32, torch.float32, torch.float64),
    (torch.bfloat16, torch.bfloat16, torch.long), (torch.float32, torch.bfloat16, torch.long)]


@pytest.mark.parametrize("dtypes", GAE_DTYPES, ids=lambda d: "-".join(str(x).split(".")[1] for x in d))
@pytest.mark.parametrize("b,t", SHAPES, ids=SHAPE_IDS)
def test_gae_returns_what_verl_returns(b, t, dtypes):
    r_dtype, v_dtype, m_dtype = dtypes
    rewards, values = torch.randn(b, t).to(r_dtype), torch.randn(b, t).to(v_dtype)
    mask = _mask(b, t, m_dtype)
    their_adv, their_ret = core_algos.compute_gae_advantage_return(rewards, values, mask, 0.97, 0.9)
    our_adv, our_ret = dvpo_verl.compute_gae_advantage_return(rewards, values, mask, 0.97, 0.9)
    assert (our_adv.shape, our_ret.shape) == (their_adv.shape, their_ret.shape) == ((b, t), (b, t))
    assert (our_adv.dtype, our_ret.dtype) == (their_adv.dtype, their_ret.dtype)
    real = mask.bool()
    low = torch.bfloat16 in dtypes  # verl's loop runs in bf16, dvpo's in float32
    tol = dict(rtol=5e-2, atol=5e-2) if low else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_ret[real].double(), their_ret[real].double(), **tol)
    torch.testing.assert_close(our_adv[real].double(), their_adv[real].double(), **tol)
    # N quantiles in, N quantiles out (N = 1 included), in the same dtype
    for n in (1, 5):
        q = values.unsqueeze(-1) + torch.zeros(n, dtype=v_dtype)
        _, ret_q = dvpo_verl.compute_gae_advantage_return(rewards, q, mask, 0.97, 0.9)
        assert ret_q.shape == (b, t, n) and ret_q.dtype == their_ret.dtype
        torch.testing.assert_close(ret_q[..., 0], our_ret)


LOSS_DTYPES = [  # (vpreds, returns, values, response_mask)
    (torch.float32, torch.float32, torch.float32, torch.long), (torch.float64,) * 3 + (torch.long,),
    (torch.float32, torch.float32, torch.float32, torch.float64), (torch.float32, torch.float64, torch.float32,
                                                                   torch.bool),
    (torch.bfloat16, torch.float32, torch.bfloat16, torch.long), (torch.bfloat16,) * 3 + (torch.bool,),
    (torch.bfloat16,) * 3 + (torch.float32,)]


@pytest.mark.parametrize("dtypes", LOSS_DTYPES, ids=lambda d: "-".join(str(x).split(".")[1] for x in d))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("b,t", SHAPES, ids=SHAPE_IDS)
def test_value_loss_returns_what_verl_returns(b, t, mode, dtypes):
    v_dtype, r_dtype, o_dtype, m_dtype = dtypes
    vpreds, returns, values = torch.randn(b, t).to(v_dtype), torch.randn(b, t).to(r_dtype), torch.randn(b, t).to(o_dtype)
    mask = _mask(b, t, m_dtype)
    theirs, their_frac = core_algos.compute_value_loss(vpreds, returns, values, mask, 0.3, mode)
    ours, our_frac = dvpo_verl.compute_value_loss(vpreds, returns, values, mask, 0.3, mode, config=dvpo_verl.mse_config())
    assert ours.shape == theirs.shape == () and our_frac.shape == their_frac.shape == ()
    assert (ours.dtype, our_frac.dtype) == (theirs.dtype, their_frac.dtype)
    low = torch.bfloat16 in dtypes
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=2e-2 if low else 1e-5, atol=1e-6)
    torch.testing.assert_close(our_frac, their_frac)
    loss_mat = torch.rand(b, t).to(v_dtype)
    agg_theirs = core_algos.agg_loss(loss_mat, mask, mode)
    agg_ours = dvpo_verl.agg_loss(loss_mat, mask, mode)
    assert agg_ours.dtype == agg_theirs.dtype
    torch.testing.assert_close(agg_ours.double(), agg_theirs.double(), rtol=1e-2 if low else 1e-6, atol=1e-6)


def test_wrong_shapes_are_named_errors_not_broadcasts():
    b, t, n = 4, 6, 3
    rewards, values, mask = torch.randn(b, t), torch.randn(b, t), torch.ones(b, t, dtype=torch.long)
    gae = dvpo_verl.compute_gae_advantage_return
    with pytest.raises(ValueError, match=r"token_level_rewards must have shape \[B, T\].*\[4, 6\], got \[4, 6, 1\]"):
        gae(rewards.unsqueeze(-1), values, mask, 1.0, 0.95)
    with pytest.raises(ValueError, match=r"response_mask must have shape \[B, T\].*\[4, 6\], got \[4, 1\]"):
        gae(rewards, values, mask[:, :1], 1.0, 0.95)
    with pytest.raises(ValueError, match=r"values must have shape"):
        gae(rewards, torch.randn(b), mask, 1.0, 0.95)
    loss = dvpo_verl.compute_value_loss
    q = torch.randn(b, t, n)
    with pytest.raises(ValueError, match=r"values \(the old values\) must have the shape of vpreds, \[4, 6, 3\]"):
        loss(q, q, values, mask, 0.2)                      # [B, T] old values next to [B, T, N] predictions
    with pytest.raises(ValueError, match=r"values \(the old values\) must have the shape of vpreds, \[4, 6, 1\]"):
        loss(values, values, q, mask, 0.2)
    with pytest.raises(ValueError, match=r"returns must have shape \[B, T\] = \[4, 6\]"):
        loss(values, torch.randn(b, t + 1), values, mask, 0.2)
    with pytest.raises(ValueError, match=r"response_mask must have shape \[B, T\] = \[4, 6\], got \[4, 6, 1\]"):
        loss(values, values, values, mask.unsqueeze(-1), 0.2)
    with pytest.raises(ValueError, match=r"vpreds must have shape"):
        loss(torch.randn(b), values, values, mask, 0.2)
    with pytest.raises(ValueError, match=r"loss_mask must have shape \[B, T\] \(the shape of loss_mat\) = \[4, 6\]"):
        dvpo_verl.agg_loss(torch.rand(b, t), mask[:1], "token-mean")


@pytest.mark.parametrize("b,t", SHAPES, ids=SHAPE_IDS)
def test_dvpo_gae_into_verls_own_value_loss(b, t):
    """The issue's case: dvpo's returns fed to verl's own value loss (B = T = 6 gave 10.654 instead of
    1.6391 with [B, T, 1] returns) equal verl's returns fed to it, for any B, T."""
    g = torch.Generator().manual_seed(6)
    rewards, values = torch.randn(b, t, generator=g), torch.randn(b, t, generator=g)
    vpreds = values + 0.5 * torch.randn(b, t, generator=g)
    mask = _mask(b, t, torch.long)
    _, ours = dvpo_verl.compute_gae_advantage_return(rewards, values, mask, 1.0, 0.95)
    _, theirs = core_algos.compute_gae_advantage_return(rewards, values, mask, 1.0, 0.95)
    with_ours, _ = core_algos.compute_value_loss(vpreds, ours, values, mask, 0.2, "token-mean")
    with_theirs, _ = core_algos.compute_value_loss(vpreds, theirs, values, mask, 0.2, "token-mean")
    torch.testing.assert_close(with_ours, with_theirs, rtol=1e-5, atol=1e-6)
