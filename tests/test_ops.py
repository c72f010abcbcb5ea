"""The public ops (dvpo.ops) on the `reference` backend and the C++ quantile Huber: exactness against
autograd of dvpo.reference, gradcheck, opcheck, torch.compile, masks, dtypes and bad input."""

import pytest
import torch

import dvpo
from dvpo import dispatch, library, ops
from dvpo.dispatch import use_backend
from dvpo import reference as ref
from dvpo.config import TERM_NAMES, CriticLossConfig

from .utils import TOL, critic_inputs, randn, random_mask, rel_err

REDUCTIONS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "none"]
CPU_BACKENDS = [b for b in ("reference", "cpp") if dispatch.backends("cpu")[b] == "available"]


@pytest.fixture
def backend(request, monkeypatch):
    monkeypatch.setenv("DVPO_BACKEND", request.param)
    return request.param


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss.sum(), x)
    return g


def _ref_critic(heads, target, **kw):
    """Loss and gradient of the float64 reference on the same (rounded) inputs."""
    h = heads.detach().double().requires_grad_()
    mask = kw.pop("mask", None)
    out = ref.critic_loss(h, target.double(), mask=mask, **kw)
    return out, _grad(out.loss, h)


# --------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("backend", ["reference"], indirect=True)
@pytest.mark.parametrize("h,n,m", [(1, 1, 1), (2, 2, 3), (3, 7, 7), (5, 33, 17), (3, 200, 200), (1, 257, 3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_critic_loss_matches_reference(backend, h, n, m, dtype):
    heads, target = critic_inputs((3, 5), h, n, m, dtype, ties=(n == 7))
    mask = random_mask((3, 5))
    cfg = CriticLossConfig(kappa=0.7, alpha=0.2, beta=0.15, risk_gamma=2.0)
    x = heads.clone().requires_grad_()
    for reduction in REDUCTIONS:
        out = ops.critic_loss(x, target, mask=mask, config=cfg, reduction=reduction)
        want, want_grad = _ref_critic(heads, target, mask=mask, config=cfg, reduction=reduction)
        g = _grad(out.loss, x)
        assert out.loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert g.dtype == dtype
        assert rel_err(out.loss, want.loss) < TOL[dtype]
        assert rel_err(g, want_grad) < TOL[dtype]
        for name in TERM_NAMES:
            assert out.terms[name].shape == (3, 5)
            assert rel_err(out.terms[name], want.terms[name]) < TOL[dtype], name


@pytest.mark.parametrize("backend", ["reference"], indirect=True)
@pytest.mark.parametrize("off", TERM_NAMES)
def test_critic_loss_each_weight_off(backend, off):
    heads, target = critic_inputs((2, 4), 3, 9, 8, torch.float64, ties=True)
    cfg = CriticLossConfig(**{off: 0.0, "alpha": 0.3})
    x = heads.clone().requires_grad_()
    out = ops.critic_loss(x, target, config=cfg)
    want, want_grad = _ref_critic(heads, target, config=cfg)
    assert rel_err(out.loss, want.loss) < 1e-12
    assert rel_err(_grad(out.loss, x), want_grad) < 1e-12
    assert torch.all(out.terms[off] == 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("n,m", [(1, 1), (2, 3), (7, 7), (32, 200), (257, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_quantile_huber_matches_reference(backend, n, m, dtype):
    pred = randn((4, 3, n), dtype, ties=True)
    target = randn((4, 3, m), dtype, scale=2.0, ties=True)
    mask = random_mask((4, 3))
    t = dvpo.taus(n, "paper", dtype=torch.float64)
    w = torch.rand(n, dtype=torch.float64) + 0.5
    for kw in [dict(), dict(kappa=0.4, normalize_kappa=True, weights=w), dict(kappa=3.0, weights=w)]:
        for reduction in REDUCTIONS:
            x = pred.clone().requires_grad_()
            got = ops.quantile_huber(x, target, t, mask=mask, reduction=reduction, **kw)
            x64 = pred.double().requires_grad_()
            want = ref.quantile_huber(x64, target.double(), t, mask=mask, reduction=reduction, **kw)
            assert rel_err(got, want) < TOL[dtype]
            assert rel_err(_grad(got, x), _grad(want, x64)) < TOL[dtype]


@pytest.mark.parametrize("backend", ["reference"], indirect=True)
@pytest.mark.parametrize("n", [1, 2, 3, 7, 32, 200, 257])
@pytest.mark.parametrize("upper", [False, True])
def test_cvar_matches_reference(backend, n, upper):
    x = randn((5, 2, n), torch.float32, ties=True)
    for level in (0.01, 0.1, 0.5, 1.0):
        xx = x.clone().requires_grad_()
        got = ops.cvar(xx, level, upper=upper)
        x64 = x.double().requires_grad_()
        want = ref.cvar(x64, level, upper=upper)
        assert got.shape == (5, 2)
        assert rel_err(got, want) < 1e-5
        assert rel_err(_grad(got, xx), _grad(want, x64)) < 1e-5


@pytest.mark.parametrize("backend", ["reference"], indirect=True)
def test_distributional_gae_matches_reference(backend):
    rewards, values = randn((3, 11)), randn((3, 11, 6))
    mask = random_mask((3, 11))
    adv, ret = ops.distributional_gae(rewards, values, mask, gamma=0.99, lam=0.9)
    want_adv, want_ret = ref.distributional_gae(rewards.double(), values.double(), mask, gamma=0.99, lam=0.9)
    assert adv.shape == (3, 11) and ret.shape == (3, 11, 6)
    assert rel_err(adv, want_adv) < 1e-5 and rel_err(ret, want_ret) < 1e-5


# --------------------------------------------------------------------------- gradcheck / opcheck / compile

@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_gradcheck_quantile_huber(backend):
    pred = randn((2, 3, 5), torch.float64).requires_grad_()
    target = randn((2, 3, 4), torch.float64)
    w = torch.rand(5, dtype=torch.float64)
    mask = random_mask((2, 3))
    fn = lambda p: ops.quantile_huber(p, target, kappa=0.6, weights=w, mask=mask, reduction="none")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (pred,))


@pytest.mark.parametrize("backend", ["reference"], indirect=True)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_critic_loss_and_cvar(backend, reduction):
    heads, target = critic_inputs((2, 3), 3, 6, 5, torch.float64)
    heads.requires_grad_()
    mask = random_mask((2, 3))
    # The consistent cvar/gain/shape terms are semi-gradients (their targets use the critic's own VaR,
    # held constant, as a TD target is): finite differences of their value see the VaR move, so they are
    # checked against the autograd oracle (which detaches the same targets) instead, elsewhere.
    for cfg in (CriticLossConfig.recipe(alpha=0.3, beta=0.4),
                CriticLossConfig(alpha=0.3, beta=0.4, cvar=0.0, gain=0.0, shape=0.0, shift_expectile=0.7)):
        assert torch.autograd.gradcheck(
            lambda h: ops.critic_loss(h, target, mask=mask, config=cfg, reduction=reduction).loss, (heads,))
    x = randn((3, 6), torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: ops.cvar(v, 0.4), (x,))
    assert torch.autograd.gradcheck(lambda v: ops.cvar(v, 0.4, upper=True), (x,))


def _opcheck_cases():
    heads, target = critic_inputs((6,), 3, 5, 4, torch.float64)
    h32 = heads.float().requires_grad_()
    t = dvpo.taus(5, dtype=torch.float32)
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.float32)
    w = ref.risk_weights(t)
    return [
        (library.quantile_huber, (h32[:, 0], target.float(), t, w, mask, 1.0, False, "auto")),
        (library.quantile_huber, (heads[:, 0].clone().requires_grad_(), target, t.double(), None, None, 0.5, True,
                                  "pairwise")),
        (library.cvar, (h32[:, 1].detach().requires_grad_(), 0.3, True)),
        (library.critic_loss, (h32, target.float(), t, w, mask, 1.0, 0.2, 0.2, False,
                               CriticLossConfig.recipe().kernel_params(), "auto")),
        (library.critic_loss, (heads.clone().requires_grad_(), target, t.double(), w.double(), None, 0.7, 0.1, 0.5,
                               True, [1.0, 0.5, 0.0, 2.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.5], "auto")),
        (library.critic_loss, (h32.detach().clone().requires_grad_(), target.float(), t, w, mask, 0.01, 0.2, 0.3,
                               True, CriticLossConfig(upper_expansion=0.2).kernel_params(), "auto")),
        (library.critic_loss, (heads.clone().requires_grad_(), target, t.double(), w.double(), None, 0.7, 0.1, 0.5,
                               True, [1.0, 0.5, 0.0, 2.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.6, 1.3, 0.8], "auto")),
        (library.distributional_gae, (randn((2, 5)), randn((2, 5, 3)), mask[:5].expand(2, 5).contiguous(), 1.0,
                                      0.95)),
    ]


def _implements(backend, op_name):
    return hasattr(dispatch._load(backend), op_name)


# Every (backend, case) whose backend implements the op (the cpp backend grows op by op).
_OPCHECK_PARAMS = [(b, k) for b in CPU_BACKENDS for k, (op, _) in enumerate(_opcheck_cases())
                   if _implements(b, op._name)]


@pytest.mark.parametrize("backend,case", _OPCHECK_PARAMS, indirect=["backend"])
def test_opcheck(backend, case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_torch_compile_fullgraph_matches_eager(backend):
    heads, target = critic_inputs((2, 7), 3, 8, 6, torch.float32)
    mask = random_mask((2, 7))

    def step(h, z, m):
        out = ops.critic_loss(h, z, mask=m, reduction="seq-mean-token-mean")
        qh = ops.quantile_huber(h.mean(-2), z, mask=m)
        return out.loss + qh + ops.cvar(h, 0.2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    xe, xc = heads.clone().requires_grad_(), heads.clone().requires_grad_()
    eager, comp = step(xe, target, mask), compiled(xc, target, mask)
    assert torch.allclose(eager, comp, rtol=1e-6, atol=1e-6)
    eager.backward()
    comp.backward()
    assert torch.allclose(xe.grad, xc.grad, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- masks, layouts, dtypes

@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_masked_gives_zero_loss_and_zero_finite_grads(backend, reduction):
    heads, target = critic_inputs((3, 4), 3, 7, 5, torch.float32)
    heads[0, 0, 0, 0] = float("nan")  # garbage at masked tokens must not leak
    target[1, 2, 3] = float("inf")
    mask = torch.zeros(3, 4, dtype=torch.bool)
    x = heads.clone().requires_grad_()
    out = ops.quantile_huber(x.mean(-2), target, mask=mask, reduction=reduction)
    g = _grad(out, x)
    assert torch.all(out == 0) and torch.all(g == 0)
    if backend == "reference":
        out = ops.critic_loss(x, target, mask=mask, reduction=reduction)
        g = _grad(out.loss, x)
        assert torch.all(out.loss == 0) and torch.all(g == 0)
        assert all(torch.all(v == 0) for v in out.terms.values())


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_nan_at_masked_tokens_does_not_leak(backend):
    pred, target = randn((2, 5, 6)), randn((2, 5, 4))
    pred[0, 1] = float("nan")
    target[1, 3] = float("nan")
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 1] = mask[1, 3] = False
    x = pred.clone().requires_grad_()
    loss = ops.quantile_huber(x, target, mask=mask)
    g = _grad(loss, x)
    assert torch.isfinite(loss) and torch.all(torch.isfinite(g))
    assert torch.all(g[0, 1] == 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_non_contiguous_inputs(backend):
    base = randn((6, 9, 2, 11))
    heads = base[::2]  # [3, 9, 2, 11]: strided
    pred = base[::2, :, 1, 1:]  # [3, 9, 10]
    target = randn((5, 9, 3)).permute(2, 1, 0)  # [3, 9, 5]
    assert not heads.is_contiguous() and not pred.is_contiguous() and not target.is_contiguous()
    x = pred.clone().requires_grad_()  # the same values, contiguous, for the gradient comparison
    got = ops.quantile_huber(pred, target)
    assert rel_err(got, ref.quantile_huber(pred.double(), target.double())) < 1e-5
    assert rel_err(got, ops.quantile_huber(x, target.contiguous())) < 1e-6
    out = ops.critic_loss(heads, target)
    assert rel_err(out.loss, ref.critic_loss(heads.double(), target.double()).loss) < 1e-5


@pytest.mark.parametrize("backend", ["reference"], indirect=True)
def test_leading_dims_of_any_rank(backend):
    for lead in [(), (7,), (2, 3), (2, 2, 3)]:
        heads, target = critic_inputs(lead, 2, 5, 4, torch.float64)
        for reduction in REDUCTIONS:
            got = ops.critic_loss(heads, target, reduction=reduction).loss
            want = ref.critic_loss(heads, target, reduction=reduction).loss
            assert got.shape == want.shape
            assert rel_err(got, want) < 1e-12


def test_empty_token_batch():
    heads, target = critic_inputs((0, 5), 3, 7, 7)
    x = heads.clone().requires_grad_()
    out = ops.critic_loss(x, target)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert x.grad.shape == x.shape


def test_backends_listing_and_forcing(monkeypatch):
    listing = ops.backends()
    assert set(listing) == {"cuda", "triton", "cpp", "reference"}
    assert listing["reference"] == "available"
    assert "not" in ops.backends("cpu")["cuda"]
    monkeypatch.setenv("DVPO_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        ops.cvar(randn((3, 4)), 0.5)
    monkeypatch.setenv("DVPO_BACKEND", "quantum")
    with pytest.raises(ValueError, match="DVPO_BACKEND"):
        ops.cvar(randn((3, 4)), 0.5)


def test_automatic_dispatch_prefers_cpp_on_cpu(monkeypatch):
    monkeypatch.delenv("DVPO_BACKEND", raising=False)
    expected = "cpp" if "cpp" in CPU_BACKENDS else "reference"
    assert dispatch.selected_name("quantile_huber", "cpu") == expected


# --------------------------------------------------------------------------- bad input

def _bad_calls():
    p, z = randn((2, 3, 5)), randn((2, 3, 4))
    h = randn((2, 3, 2, 5))
    return [
        ("target", lambda: ops.quantile_huber(p, randn((2, 4, 4)))),
        ("mask", lambda: ops.quantile_huber(p, z, mask=torch.ones(3, 2))),
        ("mask", lambda: ops.quantile_huber(p, z, mask=torch.ones(2, 3, dtype=torch.int64))),
        ("taus", lambda: ops.quantile_huber(p, z, torch.rand(4))),
        ("weights", lambda: ops.quantile_huber(p, z, weights=torch.rand(6))),
        ("kappa", lambda: ops.quantile_huber(p, z, kappa=0.0)),
        ("kappa", lambda: ops.quantile_huber(p, z, kappa=-1.0)),
        ("reduction", lambda: ops.quantile_huber(p, z, reduction="sum")),
        ("algorithm", lambda: ops.quantile_huber(p, z, algorithm="bogus")),
        ("pred", lambda: ops.quantile_huber(p.long(), z)),
        ("target", lambda: ops.quantile_huber(p, z.double())),
        ("pred", lambda: ops.quantile_huber(torch.zeros(2, 3, 0), z)),
        ("level", lambda: ops.cvar(p, 0.0)),
        ("level", lambda: ops.cvar(p, 1.5)),
        ("x", lambda: ops.cvar(p.int(), 0.5)),
        ("theta", lambda: ops.critic_loss(randn((2, 4, 2, 5)), z)),
        ("target", lambda: ops.critic_loss(h, z.half())),
        ("mask", lambda: ops.critic_loss(h, z, mask=torch.ones(2, 4))),
        ("config", lambda: ops.critic_loss(h, z, config={"alpha": 0.1})),
        ("alpha", lambda: CriticLossConfig(alpha=0.0)),
        ("beta", lambda: CriticLossConfig(beta=2.0)),
        ("kappa", lambda: CriticLossConfig(kappa=0)),
        ("cvar", lambda: CriticLossConfig(cvar=-1.0)),
        ("values", lambda: ops.distributional_gae(randn((2, 3)), randn((2, 3)), torch.ones(2, 3))),
        ("rewards", lambda: ops.distributional_gae(randn((2, 4)), randn((2, 3, 5)), torch.ones(2, 3))),
        ("mask", lambda: ops.distributional_gae(randn((2, 3)), randn((2, 3, 5)), torch.ones(3, 2))),
        ("gamma", lambda: ops.distributional_gae(randn((2, 3)), randn((2, 3, 5)), torch.ones(2, 3), gamma=1.5)),
        ("lam", lambda: ops.distributional_gae(randn((2, 3)), randn((2, 3, 5)), torch.ones(2, 3), lam=-0.1)),
        ("gamma", lambda: ops.risk_weights(torch.rand(4), gamma=float("nan"))),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_raises_value_error_naming_the_argument(case):
    name, call = _bad_calls()[case]
    with pytest.raises(ValueError, match=name):
        call()


def test_meta_device_shapes():
    heads = torch.empty(4, 6, 3, 9, device="meta")
    target = torch.empty(4, 6, 11, device="meta")
    out = ops.critic_loss(heads, target, reduction="none")
    assert out.loss.shape == (4, 6) and out.terms["qh"].shape == (4, 6)


# --------------------------------------------------------------------------- property test

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 4), n=st.integers(1, 12), m=st.integers(1, 12), tokens=st.integers(1, 5),
       alpha=st.floats(0.01, 1.0), beta=st.floats(0.01, 1.0), kappa=st.floats(0.05, 3.0),
       ties=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_property_reference_backend_matches_autograd_of_reference(h, n, m, tokens, alpha, beta, kappa, ties, seed):
    gen = torch.Generator().manual_seed(seed)
    heads, target = critic_inputs((tokens,), h, n, m, torch.float64, ties=ties, generator=gen)
    cfg = CriticLossConfig(alpha=alpha, beta=beta, kappa=kappa)
    x = heads.clone().requires_grad_()
    with use_backend("reference"):
        out = ops.critic_loss(x, target, config=cfg, reduction="none")
    want, want_grad = _ref_critic(heads, target, config=cfg, reduction="none")
    assert rel_err(out.loss, want.loss) < 1e-12
    assert rel_err(_grad(out.loss, x), want_grad) < 1e-12
