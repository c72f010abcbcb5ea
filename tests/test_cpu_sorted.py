"""The C++ CPU sorted algorithm (csrc/cpu/merge_path.h: targets and atoms sorted once per token,
region boundaries by merge walks, sums from fp64 prefix sums) against the float64 reference, for
quantile_huber and the fused critic loss (both tail-term modes): ties (repeated targets, targets
equal to theta and to theta +- kappa, repeated atoms), crossing (unsorted) quantiles, odd N and M
(including fewer atoms than merge walks and rows longer than a walk's share), tiny and large kappa,
masks with weights and empty rows, rows the bucket sort rejects (clustered values: the comparison
sort fallbacks), every dtype at its bar (tests/utils.py TOL) and every instruction-set variant this
CPU has (DVPO_CPU_ISA caps the dispatch, as in tests/test_cpp_backend.py).
"""

import pytest
import torch

import dvpo
from dvpo import ops
from dvpo import reference as ref
from dvpo.backends import cpp
from dvpo.config import TERM_NAMES, CriticLossConfig

from .utils import TOL, critic_inputs, random_mask, rel_err

_ISA_ORDER = ["baseline", "avx2", "avx512"]
ISAS = _ISA_ORDER[: _ISA_ORDER.index(cpp.isa(detected=True)) + 1]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
MODES = ["consistent", "recipe"]
# (N, M): sizes 1, 2, 3 (fewer atoms than merge walks), 7, 33, 200 and over 200, as N and as M.
SIZES = [(1, 1), (1, 7), (2, 3), (3, 2), (7, 33), (33, 7), (200, 200), (257, 3), (3, 257), (201, 1000)]


@pytest.fixture(autouse=True)
def _cpp_backend(monkeypatch):
    monkeypatch.setenv("DVPO_BACKEND", "cpp")
    monkeypatch.delenv("DVPO_CPU_ISA", raising=False)


def _check(out, expected, dtype, what):
    err = rel_err(out, expected)
    assert err < TOL[dtype], f"{what}: relative error {err:.3g} >= {TOL[dtype]:g} ({dtype})"


def _grad(value, x, upstream):
    (g,) = torch.autograd.grad((value * upstream).sum(), x)
    return g


def _compare_qh(pred, target, dtype, *, mask=None, **kw):
    """ops.quantile_huber with algorithm="sorted" vs autograd of the float64 reference, loss and grad."""
    p = pred.to(dtype).detach().requires_grad_(True)
    z = target.to(dtype)
    out = ops.quantile_huber(p, z, mask=mask, reduction="none", algorithm="sorted", **kw)
    p64 = p.detach().double().requires_grad_(True)
    kw64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
    exp = ref.quantile_huber(p64, z.double(), mask=mask, reduction="none", **kw64)
    _check(out, exp, dtype, "qh loss")
    up = torch.rand(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
    g = _grad(out, p, up.to(out.dtype))
    assert g.dtype == dtype and g.shape == p.shape
    _check(g, _grad(exp, p64, up), dtype, "qh grad")


def _compare_critic(heads, target, config, dtype, *, mask=None):
    """ops.critic_loss with algorithm="sorted" vs autograd of the float64 reference: loss, every term
    and the gradient w.r.t. the heads."""
    h = heads.to(dtype).detach().requires_grad_(True)
    z = target.to(dtype)
    out = ops.critic_loss(h, z, mask=mask, config=config, reduction="none", algorithm="sorted")
    h64 = h.detach().double().requires_grad_(True)
    exp = ref.critic_loss(h64, z.double(), mask=mask, config=config, reduction="none")
    _check(out.loss, exp.loss, dtype, "critic loss")
    for name in TERM_NAMES:
        _check(out.terms[name], exp.terms[name], dtype, f"critic term {name}")
    up = torch.rand(out.loss.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.5
    g = _grad(out.loss, h, up.to(out.loss.dtype))
    _check(g, _grad(exp.loss, h64, up), dtype, "critic grad")


def _config(mode, **kw):
    return CriticLossConfig.recipe(**kw) if mode == "recipe" else CriticLossConfig(**kw)


# ---------------------------------------------------------------------------------------------
# quantile_huber
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", SIZES)
def test_qh_sorted_matches_reference(n, m, dtype, isa, monkeypatch):
    monkeypatch.setenv("DVPO_CPU_ISA", isa)
    g = torch.Generator().manual_seed(n + 7 * m)
    pred = torch.randn(5, n, generator=g, dtype=torch.float64)  # crossing quantiles: not sorted
    target = torch.randn(5, m, generator=g, dtype=torch.float64) * 1.5 + 0.2
    mask = random_mask((5,), generator=g, dtype=torch.float32) * (0.5 + torch.rand(5, generator=g))
    weights = ref.risk_weights(dvpo.taus(n), 1.5)
    # kappa 1e-4 only where the gradient (~kappa / M per atom) is representable: in fp16 it is
    # subnormal, and both algorithms lose it alike
    for kappa in (1e-4, 1.0, 50.0) if dtype != torch.float16 else (0.01, 1.0, 50.0):
        _compare_qh(pred, target, dtype, kappa=kappa)
        _compare_qh(pred, target, dtype, mask=mask, kappa=kappa, weights=weights.to(dtype), normalize_kappa=True)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,m", [(3, 5), (33, 7), (200, 200), (257, 301)])
def test_qh_sorted_ties_and_boundaries(n, m, isa, monkeypatch):
    """Targets on a coarse grid (many equal targets), exactly at theta and at theta +- kappa (the
    merge boundaries, strict and non-strict), repeated atoms; fp32 and fp64 (exact on the grid)."""
    monkeypatch.setenv("DVPO_CPU_ISA", isa)
    g = torch.Generator().manual_seed(11 * n + m)
    pred = torch.round(torch.randn(4, n, generator=g, dtype=torch.float64) * 2) / 2  # repeated atoms
    offsets = torch.tensor([0.0, 1.0, -1.0, 0.5, -0.5, 0.25, 2.0], dtype=torch.float64)
    pick = torch.randint(0, n, (4, m), generator=g)
    target = torch.gather(pred, 1, pick) + offsets[torch.randint(0, len(offsets), (4, m), generator=g)]
    for dtype in (torch.float32, torch.float64):
        for kappa in (1.0, 0.5, 0.25):
            _compare_qh(pred, target, dtype, kappa=kappa)


@pytest.mark.parametrize("kind", ["constant_atoms", "outlier_atom", "constant_targets", "outlier_target",
                                  "tiny_range", "sorted_rows", "reversed_rows"])
def test_qh_sorted_clustered_and_ordered_rows(kind):
    """Rows the bucket sort rejects (a constant row, one far outlier, a range of a few ulps: the
    comparison/radix sort fallbacks), rows already sorted and sorted backwards; mixed with ordinary
    rows in one batch."""
    g = torch.Generator().manual_seed(13)
    n, m = 64, 80
    pred = torch.randn(6, n, generator=g, dtype=torch.float64)
    target = torch.randn(6, m, generator=g, dtype=torch.float64)
    if kind == "constant_atoms":
        pred[::2] = 0.5
    elif kind == "outlier_atom":
        pred[::2, 3] = 1e5
    elif kind == "constant_targets":
        target[::2] = -0.25
    elif kind == "outlier_target":
        target[::2, 5] = -1e6
    elif kind == "tiny_range":
        pred[::2] = 1.0 + torch.randint(0, 4, (3, n), generator=g) * 2.0 ** -22
        target[::2] = 1.0 + torch.randint(0, 4, (3, m), generator=g) * 2.0 ** -22
    elif kind == "sorted_rows":
        pred, target = pred.sort(-1).values, target.sort(-1).values
    else:
        pred, target = pred.sort(-1, descending=True).values, target.sort(-1, descending=True).values
    for dtype in (torch.float32, torch.float64):
        for kappa in (1.0, 0.01):
            _compare_qh(pred, target, dtype, kappa=kappa)


def test_qh_sorted_agrees_with_pairwise():
    """Both algorithms on the same large rows agree to rounding (no reference involved)."""
    g = torch.Generator().manual_seed(17)
    pred = torch.randn(8, 300, generator=g)
    target = torch.randn(8, 700, generator=g) * 2
    outs = []
    for algorithm in ("pairwise", "sorted"):
        p = pred.clone().requires_grad_(True)
        loss = ops.quantile_huber(p, target, reduction="none", algorithm=algorithm)
        outs.append((loss, _grad(loss, p, torch.ones(8))))
    assert rel_err(outs[1][0], outs[0][0]) < 1e-5
    assert rel_err(outs[1][1], outs[0][1]) < 1e-5


def test_qh_sorted_non_finite_tokens_match_pairwise():
    """A token with inf/NaN takes the pairwise formula (same NaN/inf pattern as algorithm="pairwise")."""
    g = torch.Generator().manual_seed(19)
    pred = torch.randn(4, 9, generator=g)
    target = torch.randn(4, 11, generator=g)
    pred[1, 2] = float("nan")
    target[2, 0] = float("inf")
    a = ops.quantile_huber(pred, target, reduction="none", algorithm="sorted")
    b = ops.quantile_huber(pred, target, reduction="none", algorithm="pairwise")
    assert torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.isinf(a), torch.isinf(b))
    finite = torch.isfinite(b)
    assert rel_err(a[finite], b[finite]) < 1e-5


# ---------------------------------------------------------------------------------------------
# critic_loss
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m,h", [(1, 1, 1), (2, 3, 2), (3, 7, 3), (7, 2, 1), (33, 33, 3), (200, 200, 3),
                                   (257, 33, 2), (33, 257, 3)])
def test_critic_sorted_matches_reference(n, m, h, dtype, mode, isa, monkeypatch):
    monkeypatch.setenv("DVPO_CPU_ISA", isa)
    g = torch.Generator().manual_seed(n + 5 * m + h)
    heads, target = critic_inputs((3, 2), h, n, m, torch.float64, generator=g)
    mask = random_mask((3, 2), generator=g, dtype=torch.float32)
    _compare_critic(heads, target, _config(mode), dtype, mask=mask)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n,m,h", [(7, 9, 1), (33, 40, 2), (200, 200, 4)])
def test_critic_sorted_ties(n, m, h, mode):
    """Tied heads and targets (a grid of 0.5; CVaR ranks broken by index, as the reference)."""
    g = torch.Generator().manual_seed(23 + n)
    heads, target = critic_inputs((4,), h, n, m, torch.float64, ties=True, generator=g)
    for dtype in (torch.float32, torch.float64):
        _compare_critic(heads, target, _config(mode), dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kappa", [1e-4, 1.0, 30.0])
def test_critic_sorted_kappa_and_levels(kappa, mode):
    g = torch.Generator().manual_seed(29)
    heads, target = critic_inputs((5,), 3, 41, 57, torch.float64, generator=g)
    for alpha, beta in ((0.1, 0.1), (0.03, 0.5), (1.0, 1.0)):
        _compare_critic(heads, target, _config(mode, kappa=kappa, alpha=alpha, beta=beta), torch.float32)


def test_auto_follows_the_crossover():
    """algorithm="auto" runs what dvpo.backends.cpp.auto_sorted(N, M) says (same results as that
    algorithm, bit for bit)."""
    g = torch.Generator().manual_seed(31)
    for n, m in ((8, 8), (200, 200), (1000, 1000)):
        heads, target = critic_inputs((3,), 3, n, m, torch.float32, generator=g)
        chosen = "sorted" if cpp.auto_sorted(n, m) else "pairwise"
        a = ops.critic_loss(heads, target, reduction="none", algorithm="auto")
        b = ops.critic_loss(heads, target, reduction="none", algorithm=chosen)
        assert torch.equal(a.loss, b.loss)
