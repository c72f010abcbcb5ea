"""The contract of dvpo.quantile_huber, once, on every backend (tests/backends.py): values and
gradients against autograd of the float64 reference (every dtype, its bar in tests/utils.py's TOL),
odd sizes, ties and targets on the region boundaries theta +- kappa, weights, kappa normalization,
every reduction, every pair algorithm the backend has, all-masked and empty batches, NaN at masked
tokens, non-contiguous inputs, the kernel interface, gradcheck, opcheck, torch.compile(fullgraph)
and the argument checks."""

import pytest
import torch

import dvpo
from dvpo import library, ops
from dvpo import reference as ref
from dvpo.backends import reference as ref_backend

from . import backends
from .utils import (REDUCTIONS, SIZES, TOL, assert_mask_read_natively, assert_compiled_matches_eager, grad,
                    randn, random_mask, rel_err, upstream_like, weighted_mask, with_garbage_at_masked)

# (N, M): every pair of SIZES on a GPU; on CPU every size of SIZES as N and as M (fewer pairs on the
# interpreter and the emulation, which are slow).
GPU_SHAPES = [(n, m) for n in SIZES for m in SIZES]
CPU_SHAPES = [(1, 1), (2, 3), (2, 7), (3, 200), (7, 3), (7, 7), (32, 32), (32, 200), (200, 257), (257, 1), (257, 2)]
SMALL_SHAPES = [(1, 1), (2, 3), (7, 7), (3, 32), (32, 2), (32, 200), (257, 2), (3, 257)]
# The dtypes other than fp32 on CPU: still every size of SIZES as N and as M.
CPU_OTHER_DTYPE_SHAPES = [(1, 1), (2, 7), (7, 3), (32, 200), (257, 2), (200, 257)]
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _check(backend, pred, target, algorithm, *, mask=None, reduction="none", **kw):
    """Loss and gradient (random upstream) of the backend against autograd of the float64 reference."""
    dtype = pred.dtype
    x = pred.clone().requires_grad_()
    got = ops.quantile_huber(x, target, mask=mask, reduction=reduction, algorithm=algorithm, **kw)
    x64 = pred.detach().double().requires_grad_()
    kw64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
    want = ref.quantile_huber(x64, target.double(), mask=mask, reduction=reduction, **kw64)
    up = upstream_like(want)
    g = grad(got, x, up)
    assert got.dtype == ref.acc_dtype(dtype) and g.dtype == dtype and g.shape == pred.shape
    assert rel_err(got, want) < TOL[dtype], f"{backend} loss {algorithm} {kw}"
    assert rel_err(g, grad(want, x64, up)) < TOL[dtype], f"{backend} grad {algorithm} {kw}"


@pytest.mark.parametrize("backend,dtype", backends.cases(DTYPES), indirect=["backend"])
def test_matches_reference(backend, dtype):
    """Crossing (unsorted) predictions, ties on a grid for N = 7, weights, kappa small and large,
    normalize_kappa, a weighted mask with an empty row."""
    dev = backend.device
    if backend.device == "cuda":
        shapes = GPU_SHAPES
    elif backend.small:
        shapes = SMALL_SHAPES
    else:
        shapes = CPU_SHAPES if dtype == torch.float32 else CPU_OTHER_DTYPE_SHAPES
    for n, m in shapes:
        pred = randn((4, 3, n), dtype, ties=n == 7, device=dev)
        target = randn((4, 3, m), dtype, scale=2.0, ties=n == 7, device=dev)
        mask = weighted_mask((4, 3), device=dev)
        taus = dvpo.taus(n, "paper", dtype=torch.float64, device=dev)
        w = torch.rand(n, dtype=torch.float64).to(dev) + 0.5
        for kw in (dict(), dict(kappa=0.4, normalize_kappa=True, weights=w), dict(kappa=3.0, weights=w)):
            for algorithm in backend.algorithms:
                _check(backend, pred, target, algorithm, mask=mask, taus=taus, **kw)


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reductions(backend, reduction):
    pred, target = randn((3, 5, 9), device=backend.device), randn((3, 5, 6), scale=2.0, device=backend.device)
    for algorithm in backend.algorithms:
        _check(backend, pred, target, algorithm, mask=random_mask((3, 5), device=backend.device),
               reduction=reduction, kappa=0.7)


@pytest.mark.parametrize("backend,nm", backends.cases([(5, 9), (64, 33), (200, 200)], [(5, 9), (33, 17)]),
                         indirect=["backend"])
def test_ties_and_region_boundaries(backend, nm):
    """Targets exactly at theta and at theta +- kappa (the kinks; the region boundaries of the sorted
    algorithm), many tied atoms."""
    n, m = nm
    g = torch.Generator().manual_seed(21)
    pred = torch.round(torch.randn(3, n, generator=g, dtype=torch.float64) * 4) / 4
    offsets = torch.tensor([0.0, 1.0, -1.0, 0.5, -0.5, 0.25], dtype=torch.float64)
    target = pred[:, torch.randint(0, n, (m,), generator=g)] + offsets[torch.randint(0, 6, (m,), generator=g)]
    for dtype in (torch.float32, torch.float64):
        p, z = pred.to(dtype=dtype, device=backend.device), target.to(dtype=dtype, device=backend.device)
        for algorithm in backend.algorithms:
            for kappa in (1.0, 0.5):
                _check(backend, p, z, algorithm, kappa=kappa)


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_kernel_interface_matches_reference_backend(backend):
    """The backend's kernel-interface function against the reference backend's: same outputs (per-token
    loss, gradient), same dtypes and shapes."""
    dev = backend.device
    pred, target = randn((6, 13), device=dev), randn((6, 21), device=dev)
    taus, w, mask = dvpo.taus(13, device=dev), torch.rand(13).to(dev) + 0.5, weighted_mask((6,), device=dev)
    for args in ((None, mask, 1.0, False), (w, None, 0.4, True), (w, mask, 3.0, False)):
        want = ref_backend.quantile_huber(pred, target, taus, *args, "auto")
        for algorithm in ("auto", "pairwise", "sorted"):
            got = backend.kernels().quantile_huber(pred, target, taus, *args, algorithm)
            for x, y in zip(got, want):
                assert x.dtype == y.dtype and x.shape == y.shape
                assert rel_err(x, y) < TOL[torch.float32]


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_mask_read_natively(backend, monkeypatch):
    dev = backend.device
    pred, target = randn((7, 5), device=dev), randn((7, 6), device=dev)
    pred[1] = float("nan")  # garbage at a masked token
    taus, mask = dvpo.taus(5, device=dev), torch.tensor([1, 0, 1, 1, 0, 1, 1], dtype=torch.bool, device=dev)
    args = (pred.requires_grad_(), target, taus, None, mask, 1.0, False, backend.algorithms[-1])
    assert_mask_read_natively(library.quantile_huber, args, 4, monkeypatch,
                                   lambda m: ops.quantile_huber(pred, target, mask=m))


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_non_finite_values_at_real_tokens_propagate_as_the_reference(backend):
    """A NaN target (a NaN gradient at every atom), an infinite target (an infinite loss, a finite
    gradient), an infinite atom, and an atom equal to a target's infinity (a NaN pair: a NaN gradient
    at that atom): the per-token loss and the gradient are non-finite exactly where the float64
    reference backend's are (its analytic gradient: autograd through the Huber branches would also
    give NaN for an infinite target), and match it elsewhere. N = 40 covers a full and a remainder
    block of the vectorized pair passes."""
    dev = backend.device
    pred, target = randn((5, 40), device=dev), randn((5, 65), device=dev)
    target[0, 5] = float("nan")
    target[1, 7] = float("inf")
    pred[2, 3] = -float("inf")
    pred[3, 33], target[3, 9] = float("inf"), float("inf")
    taus = dvpo.taus(40, dtype=torch.float64, device=dev)
    want = ref_backend.quantile_huber(pred.double(), target.double(), taus, None, None, 0.5, False)
    assert (~want[1].isfinite()).sum() == 41  # row 0, and atom 33 of row 3
    for algorithm in backend.algorithms:
        got = backend.kernels().quantile_huber(pred, target, taus.to(pred.dtype), None, None, 0.5, False,
                                               algorithm)
        for x, y, what in zip(got, want, ("loss", "grad")):
            x, y = x.double().cpu(), y.cpu()
            fin = y.isfinite()
            assert torch.equal(x.isfinite(), fin), (algorithm, what, (~x.isfinite()).nonzero().tolist())
            assert rel_err(x[fin], y[fin]) < TOL[torch.float32], (algorithm, what)


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_masked_gives_zero_loss_and_zero_finite_grads(backend, reduction):
    pred, target = randn((3, 4, 7), device=backend.device), randn((3, 4, 5), device=backend.device)
    pred[0, 0, 0] = float("nan")  # garbage at masked tokens must not leak
    target[1, 2, 3] = float("inf")
    mask = torch.zeros(3, 4, dtype=torch.bool, device=backend.device)
    for algorithm in backend.algorithms:
        x = pred.clone().requires_grad_()
        out = ops.quantile_huber(x, target, mask=mask, reduction=reduction, algorithm=algorithm)
        g = grad(out, x)
        assert torch.all(out == 0) and torch.all(g == 0)


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_empty_token_batch(backend):
    pred, target = randn((0, 4, 7), device=backend.device), randn((0, 4, 5), device=backend.device)
    x = pred.clone().requires_grad_()
    assert ops.quantile_huber(x, target, reduction="none").shape == (0, 4)
    out = ops.quantile_huber(x, target)
    assert out.item() == 0.0
    out.backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_nan_at_masked_tokens_does_not_leak(backend):
    """NaN / inf at masked tokens: every output is what the clean inputs give, bit for bit."""
    pred, target = randn((3, 4, 10), device=backend.device), randn((3, 4, 12), device=backend.device)
    mask = weighted_mask((3, 4), device=backend.device)
    masked = mask == 0
    dirty_p, dirty_t = with_garbage_at_masked(pred, target, mask)
    for algorithm in backend.algorithms:
        p1, p2 = pred.clone().requires_grad_(), dirty_p.clone().requires_grad_()
        q1 = ops.quantile_huber(p1, target, mask=mask, reduction="none", algorithm=algorithm)
        q2 = ops.quantile_huber(p2, dirty_t, mask=mask, reduction="none", algorithm=algorithm)
        g1, g2 = grad(q1, p1), grad(q2, p2)
        assert torch.equal(q1, q2) and torch.equal(g1, g2)
        assert torch.isfinite(g2).all() and torch.count_nonzero(g2[masked]) == 0


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_non_contiguous_inputs(backend):
    base = randn((6, 9, 2, 11), device=backend.device)
    pred = base[::2, :, 1, 1:]  # [3, 9, 10]: strided
    target = randn((5, 9, 3), device=backend.device).permute(2, 1, 0)  # [3, 9, 5]
    mask = torch.stack([random_mask((3, 9), device=backend.device)] * 2, -1)[..., 0]
    assert not pred.is_contiguous() and not target.is_contiguous() and not mask.is_contiguous()
    for algorithm in backend.algorithms:
        got = ops.quantile_huber(pred, target, mask=mask, reduction="none", algorithm=algorithm)
        same = ops.quantile_huber(pred.contiguous(), target.contiguous(), mask=mask.contiguous(), reduction="none",
                                  algorithm=algorithm)
        assert rel_err(got, same) < 1e-6
        _check(backend, pred, target, algorithm, mask=mask)


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_gradcheck_float64(backend):
    pred = randn((2, 3, 5), torch.float64, device=backend.device).requires_grad_()
    target = randn((2, 3, 7), torch.float64, device=backend.device)
    w = torch.rand(5, dtype=torch.float64).to(backend.device) + 0.5
    mask = torch.tensor([[1.0, 0.5, 0.0], [1.0, 1.0, 2.0]], dtype=torch.float64, device=backend.device)
    for algorithm in backend.algorithms:
        for kw in (dict(kappa=0.6, weights=w, mask=mask), dict(kappa=0.7, weights=w, normalize_kappa=True)):
            assert torch.autograd.gradcheck(
                lambda p: ops.quantile_huber(p, target, algorithm=algorithm, reduction="none", **kw), (pred,))


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_opcheck(backend):
    dev = backend.device
    pred, target = randn((6, 5), torch.float64, device=dev), randn((6, 4), torch.float64, device=dev)
    t = dvpo.taus(5, dtype=torch.float32, device=dev)
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.float32, device=dev)
    w = ref.risk_weights(t)
    algorithms = dict(zip(("auto", "pairwise"), backend.algorithms + backend.algorithms))
    torch.library.opcheck(library.quantile_huber, (pred.float().requires_grad_(), target.float(), t, w, mask, 1.0,
                                                   False, algorithms["auto"]))
    torch.library.opcheck(library.quantile_huber, (pred.clone().requires_grad_(), target, t.double(), None, None,
                                                   0.5, True, algorithms["pairwise"]))


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_torch_compile_fullgraph_matches_eager(backend):
    pred, target = randn((2, 7, 8), device=backend.device), randn((2, 7, 6), device=backend.device)
    mask = random_mask((2, 7), device=backend.device)

    def step(p, z, m):
        return ops.quantile_huber(p, z, mask=m, kappa=0.5) + ops.quantile_huber(p * 2, z, reduction="none").sum()

    assert_compiled_matches_eager(step, backend, pred, target, mask)


# --------------------------------------------------------------------------- argument checks (any backend)

def _bad_calls():
    p, z = randn((2, 3, 5)), randn((2, 3, 4))
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
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_raises_value_error_naming_the_argument(case):
    name, call = _bad_calls()[case]
    with pytest.raises(ValueError, match=name):
        call()
