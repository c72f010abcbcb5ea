"""The contract of dvpo.cvar, once, on every backend (tests/backends.py): values and gradients
against autograd of the float64 reference (every dtype, its bar in tests/utils.py's TOL), both tails,
levels from one atom to all, odd sizes, heavy ties (-0.0 next to +0.0; the boundary weight goes to
the lowest indices, from either tail), the sorted definition for any input order, non-contiguous
inputs, gradcheck, opcheck, torch.compile(fullgraph) and the argument checks."""

import pytest
import torch

from dvpo import library, ops
from dvpo import reference as ref
from dvpo.backends import reference as ref_backend

from . import backends
from .utils import SIZES, TOL, assert_compiled_matches_eager, grad, randn, rel_err, upstream_like

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


# (dtype, N): every dtype at every size of SIZES; in Triton's interpreter and on the reference
# backend (whose exact ranks are slow on long rows) the short rows in every dtype and the long ones
# in fp32.
_CASES = [(d, n) for d in DTYPES for n in SIZES]
_SHORT = [(d, n) for d in DTYPES for n in SIZES[:5]] + [(torch.float32, 200), (torch.float32, 257)]


@pytest.mark.parametrize("backend,case", backends.cases(_CASES, interpreter=_SHORT, only={"reference": _SHORT}),
                         indirect=["backend"])
def test_matches_reference(backend, case):
    dtype, n = case
    for ties, levels in ((False, (0.1, 0.5)), (True, (0.01, 0.37, 1.0))):
        x = randn((5, 2, n), dtype, ties=ties, device=backend.device)
        if ties and n > 2:
            x[0, 0, :2] = torch.tensor([0.0, -0.0])  # -0 and +0 tie (ranked by index)
        for level in levels:
            for upper in (False, True):
                xx = x.clone().requires_grad_()
                got = ops.cvar(xx, level, upper=upper)
                x64 = x.double().requires_grad_()
                want = ref.cvar(x64, level, upper=upper)
                up = upstream_like(want)
                g = grad(got, xx, up)
                assert got.shape == (5, 2) and got.dtype == ref.acc_dtype(dtype) and g.dtype == dtype
                assert rel_err(got, want) < TOL[dtype], (level, upper, ties)
                assert rel_err(g, grad(want, x64, up)) < TOL[dtype], (level, upper, ties)


@pytest.mark.parametrize("backend,n", backends.cases([2, 5, 16, 200, 257], [2, 5, 16, 257]), indirect=["backend"])
def test_heavy_ties_exact_coefficients(backend, n):
    """Heavy ties (and -0.0 next to +0.0): the coefficients equal the reference backend's exactly
    (ranks with the index tie-break, from the top for the upper tail)."""
    g = torch.Generator().manual_seed(n + 1)
    for dtype in (torch.float32, torch.float64):
        x = torch.randint(-2, 3, (6, n), generator=g).to(dtype) * 0.5
        x[0, : n // 2] = -0.0
        x[1] = 1.0
        x = x.to(backend.device)
        levels = (0.1, 0.25, 0.5, 0.9, 1.0, 1.0 / n, 1.5 / n) if n < 100 else (0.1, 0.9, 1.5 / n)
        for level in levels:
            for upper in (False, True):
                value, coef = library.cvar(x, level, upper)
                ref_value, ref_coef = ref_backend.cvar(x, level, upper)
                assert torch.equal(coef, ref_coef), (level, upper)
                assert rel_err(value, ref_value) < TOL[dtype]


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_boundary_weight_split_by_index(backend):
    """Many atoms tied at the threshold: the boundary weight goes to the lowest indices (either tail)."""
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 2.0, 1.0, 1.0]], device=backend.device)
    for level, upper in [(0.35, False), (0.55, True), (0.5, False), (1.0, True)]:
        _, coef = library.cvar(x, level, upper)
        assert torch.equal(coef, ref.cvar_coefficients(x.double(), level, upper).float())


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_unsorted_equals_sorted_definition(backend):
    """The mean of the lowest alpha N atoms (boundary atom with its fraction), for any input order."""
    g = torch.Generator().manual_seed(24)
    x = torch.randn(50, 37, generator=g, dtype=torch.float64).to(backend.device)
    for level in (0.1, 0.3, 0.77):
        a_n = level * 37
        full = int(a_n)
        for upper in (False, True):
            s = torch.sort(x, -1, descending=upper).values
            expected = (s[:, :full].sum(-1) + (a_n - full) * s[:, full]) / a_n
            torch.testing.assert_close(ops.cvar(x, level, upper=upper), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ops.cvar(x, level, upper=True), -ops.cvar(-x, level), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_empty_and_non_contiguous_inputs(backend):
    x = randn((13, 4, 3), device=backend.device).transpose(0, 2)  # [3, 4, 13]
    assert not x.is_contiguous()
    for upper in (False, True):
        got = ops.cvar(x, 0.3, upper=upper)
        assert torch.equal(got, ops.cvar(x.contiguous(), 0.3, upper=upper))
        assert rel_err(got, ref.cvar(x.double(), 0.3, upper=upper)) < TOL[torch.float32]
    assert ops.cvar(randn((0, 4, 3), device=backend.device), 0.2).shape == (0, 4)


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_gradcheck_float64(backend):
    x = randn((3, 9), torch.float64, device=backend.device).requires_grad_()
    for upper in (False, True):
        for level in (0.3, 0.4):
            assert torch.autograd.gradcheck(lambda v: ops.cvar(v, level, upper=upper), (x,))


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
@pytest.mark.parametrize("dtype,level,upper", [(torch.float32, 0.3, True), (torch.float64, 0.3, True),
                                               (torch.float64, 0.2, False)],
                         ids=["fp32-upper", "fp64-upper", "fp64-lower"])
def test_opcheck(backend, dtype, level, upper):
    x = randn((6, 5), dtype, device=backend.device)
    torch.library.opcheck(library.cvar, (x.requires_grad_(), level, upper))


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_torch_compile_fullgraph_matches_eager(backend):
    def step(x):
        return ops.cvar(x, 0.2).sum() + ops.cvar(x, 0.3, upper=True).sum()

    assert_compiled_matches_eager(step, backend, randn((2, 7, 3, 8), device=backend.device))


# --------------------------------------------------------------------------- argument checks (any backend)

@pytest.mark.parametrize("name,call", [
    ("level", lambda p: ops.cvar(p, 0.0)),
    ("level", lambda p: ops.cvar(p, 1.5)),
    ("x", lambda p: ops.cvar(p.int(), 0.5)),
], ids=["level-0", "level-1.5", "x-int"])
def test_bad_input_raises_value_error_naming_the_argument(name, call):
    with pytest.raises(ValueError, match=name):
        call(randn((2, 3, 5)))
