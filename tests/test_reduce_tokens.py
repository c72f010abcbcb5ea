"""The contract of the token reduction (dvpo::reduce_tokens, what every op's `reduction` runs), once,
on every backend (tests/backends.py): the value and the per-token gradient against autograd of the
float64 reference `dvpo.reference.reduce_tokens` for each reduction, with no mask, bool masks
(read natively), float weights, all-masked rows and an all-masked batch (0, not NaN), odd sizes and
every dtype; bitwise the same at every call (and, on the CPU, at any thread count); gradcheck,
opcheck, torch.compile(fullgraph); the ops' reductions go through it."""

import pytest
import torch

import dvpo
from dvpo import library, ops
from dvpo import reference as ref

from . import backends
from .utils import TOL, random_mask, randn, rel_err, weighted_mask

REDUCTIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
SHAPES = ((1, 1), (3, 7), (5, 200), (2, 257))
SMALL_SHAPES = ((1, 1), (3, 7), (4, 33))


def _masks(shape, g):
    yield "none", None
    yield "bool", random_mask(shape, generator=g)
    yield "float", weighted_mask(shape, generator=g)
    yield "all-masked", torch.zeros(shape, dtype=torch.bool)


def _check(backend, dtype, shape, g):
    for mask_name, mask in _masks(shape, g):
        x = randn(shape, dtype, generator=g)
        if mask is not None:
            x = (x.double() * mask.double()).to(dtype)  # the ops' per-token losses are 0 at masked tokens
            mask = mask.to(backend.device)
        x = x.to(backend.device)
        for reduction in REDUCTIONS:
            xx = x.clone().requires_grad_()
            loss, weights = library.reduce_tokens(xx, mask, reduction)
            (g_got,) = torch.autograd.grad(loss, xx)
            x64 = x.double().requires_grad_()
            want = ref.reduce_tokens(x64, None if mask is None else mask.double(), reduction)
            (g_want,) = torch.autograd.grad(want, x64)
            where = (mask_name, reduction)
            assert loss.shape == () and loss.dtype == ref.acc_dtype(dtype) and g_got.dtype == dtype, where
            assert rel_err(loss, want) < TOL[dtype], where
            assert rel_err(weights, g_want) < TOL[dtype], where
            assert rel_err(g_got, g_want) < TOL[dtype], where
            if mask_name == "all-masked":
                assert loss.item() == 0.0 and torch.isfinite(weights).all(), where


@pytest.mark.parametrize("backend,case", backends.cases([(d, s) for d in DTYPES for s in SHAPES],
                                                        [(d, s) for d in DTYPES for s in SMALL_SHAPES]),
                         indirect=["backend"])
def test_matches_reference(backend, case):
    dtype, shape = case
    _check(backend, dtype, shape, torch.Generator().manual_seed(shape[0] * 1000 + shape[1]))


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_bitwise_same_at_every_call(backend):
    g = torch.Generator().manual_seed(3)
    x = randn((37, 129), generator=g).to(backend.device)
    mask = random_mask((37, 129), generator=g).to(backend.device)
    for reduction in REDUCTIONS:
        first = library.reduce_tokens(x, mask, reduction)
        for _ in range(3):
            again = library.reduce_tokens(x, mask, reduction)
            assert all(torch.equal(a, b) for a, b in zip(first, again)), reduction


@pytest.mark.parametrize("backend", backends.params(("cpp",)), indirect=True)
def test_cpu_same_bits_at_any_thread_count(backend):
    """Fixed chunks and fixed-order finishes: the thread count cannot change a bit."""
    g = torch.Generator().manual_seed(4)
    x = randn((3, 50_000), generator=g)         # token-mean: 37 chunks of 4096 tokens
    rows = randn((999, 31), generator=g)        # the sequence reductions: a row per task
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append([library.reduce_tokens(t, None, r)[0] for t in (x, rows) for r in REDUCTIONS])
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for other in results[1:] for a, b in zip(results[0], other))


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_empty_batch(backend):
    for shape in ((0, 5), (4, 0)):
        x = torch.zeros(shape, device=backend.device)
        for reduction in REDUCTIONS:
            loss, weights = library.reduce_tokens(x, None, reduction)
            assert loss.item() == 0.0 and weights.shape == shape, (shape, reduction)


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_gradcheck_float64(backend):
    g = torch.Generator().manual_seed(5)
    mask = weighted_mask((3, 5), generator=g).double().to(backend.device)
    x = (randn((3, 5), torch.float64, generator=g).to(backend.device) * mask).requires_grad_()
    for reduction in REDUCTIONS:
        for m in (None, mask):
            assert torch.autograd.gradcheck(lambda v: library.reduce_tokens(v, m, reduction)[0], (x,))


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
@pytest.mark.parametrize("dtype,mask_dtype", [(torch.float32, torch.bool), (torch.float64, torch.float64),
                                              (torch.float32, None)], ids=["fp32-bool", "fp64-float", "fp32-nomask"])
def test_opcheck(backend, dtype, mask_dtype):
    g = torch.Generator().manual_seed(6)
    x = randn((4, 9), dtype, generator=g).to(backend.device)
    mask = None if mask_dtype is None else random_mask((4, 9), generator=g).to(mask_dtype).to(backend.device)
    for reduction in REDUCTIONS:
        torch.library.opcheck(library.reduce_tokens, (x.clone().requires_grad_(), mask, reduction))


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_torch_compile_fullgraph_matches_eager(backend):
    g = torch.Generator().manual_seed(7)
    x = randn((4, 9), generator=g).to(backend.device)
    mask = random_mask((4, 9), generator=g).to(backend.device)

    def step(v):
        return library.reduce_tokens(v * mask, mask, "seq-mean-token-mean")[0]

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend.compile_backend)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager, comp = step(xe), compiled(xc)
    assert torch.allclose(eager, comp, rtol=1e-6, atol=1e-6)
    eager.backward()
    comp.backward()
    assert torch.allclose(xe.grad, xc.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_bad_reduction_is_refused_by_every_backend_kernel(backend):
    x = torch.randn(2, 3, device=backend.device)
    for bad in ("mean", "token-mean ", "none"):  # "none" is a public choice, but no kernel's
        with pytest.raises((ValueError, RuntimeError), match="reduction must be .*seq-mean-token-sum"):
            backend.kernels().reduce_tokens(x, None, bad)


@pytest.mark.parametrize("backend", backends.params(("reference", "cpp")), indirect=True)
def test_ops_reductions_run_it(backend, monkeypatch):
    """dvpo.ops reduces through the op: one call per op call, and the same value as the reference."""
    calls = []
    real = library.reduce_tokens
    monkeypatch.setattr(library, "reduce_tokens", lambda *a: calls.append(a[2]) or real(*a))
    g = torch.Generator().manual_seed(8)
    heads, target = randn((2, 5, 3, 8), generator=g), randn((2, 5, 8), generator=g)
    mask = random_mask((2, 5), generator=g)
    for reduction in REDUCTIONS:
        out = ops.critic_loss(heads, target, mask=mask, reduction=reduction)
        per_token = ops.critic_loss(heads, target, mask=mask, reduction="none").loss
        assert rel_err(out.loss, ref.reduce_tokens(per_token.double(), mask, reduction)) < 1e-6
        qh = ops.quantile_huber(heads[..., 0, :], target, mask=mask, reduction=reduction)
        qh_tok = ops.quantile_huber(heads[..., 0, :], target, mask=mask, reduction="none")
        assert rel_err(qh, ref.reduce_tokens(qh_tok.double(), mask, reduction)) < 1e-6
    assert calls == [r for r in REDUCTIONS for _ in range(2)]
    assert dvpo.ops.critic_loss(heads[0, 0], target[0, 0]).loss.shape == ()   # no leading dims
