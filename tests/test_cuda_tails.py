"""The CUDA kernels' sorted tails (csrc/cuda/common.cuh: sort_row, sorted_tail, tail_stats) against
the float64 reference.

The critic loss and the cvar op find each tail by sorting the row by (value, index) in the warp's
scratch; the upper tail keeps index order inside the boundary tie group. These cases aim at what a
sort can get wrong: ties straddling the tail boundary (which tied atom gets the fractional
coefficient, and the gradient), all-equal rows, a tail of one atom and of every atom, rows that are
not a power of two (padding), odd H x N, both tail-target modes, masks, theta's tail variance
exactly equal to the target's (the recipe's shape ReLU at its kink), and the global-scratch path.
The last group checks the sorted pair algorithm (algorithm="sorted", csrc/cuda/sorted.cuh) of the
quantile Huber op and of the critic loss the same way, and its pairwise fallback for non-finite rows.

Each case runs twice: on the emulated kernels (CPU, the `emu` fixture of tests/test_cuda_backend.py;
DVPO_SKIP_CUDA_EMU=1 skips it) and, `gpu`-marked, on the real ones through dvpo.backends.cuda (CUDA
tensors; tools/gpu_check.sh runs them).
"""

import os

import pytest
import torch

import dvpo
from dvpo import dispatch
from dvpo import reference as ref
from dvpo.backends import reference as ref_backend
from dvpo.config import TERM_NAMES

from .test_cuda_backend import emu  # noqa: F401  (the emulated CUDA kernels, a module fixture)
from .utils import TOL, rel_err

# params[8:]: tail_mode, lo_scale, hi_scale, shift_expectile (consistent mode asymmetric on purpose).
MODES = {"recipe": [0.0, 1.0, 1.0, 0.5], "consistent": [1.0, 0.6, 1.3, 0.7]}
# Every term, and the tail terms alone (cvar, gain, shape), so that a tail error is not diluted.
WEIGHTS = {"all": [1.0] * 8, "tails": [0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0]}


class _OnGpu:
    """The real kernels with the emulation's calling convention: CPU tensors in and out."""

    def __init__(self):
        from dvpo.backends import cuda
        self._cuda = cuda

    @staticmethod
    def _to(x):
        return x.cuda() if isinstance(x, torch.Tensor) else x

    def critic_loss(self, *args):
        return tuple(o.cpu() for o in self._cuda.critic_loss(*map(self._to, args)))

    def cvar(self, x, level, upper):
        return tuple(o.cpu() for o in self._cuda.cvar(x.cuda(), level, upper))

    def quantile_huber(self, *args):
        return tuple(o.cpu() for o in self._cuda.quantile_huber(*map(self._to, args)))


@pytest.fixture(params=["emulated", pytest.param("gpu", marks=pytest.mark.gpu)])
def kernels(request):
    if request.param == "emulated":
        return request.getfixturevalue("emu")
    status = dispatch.backends("cuda")["cuda"]
    if status != "available":
        if os.environ.get("DVPO_REQUIRE_CUDA_BACKEND", "0") not in ("", "0"):
            pytest.fail(f"the CUDA backend is not available: {status}")
        pytest.skip(f"the CUDA backend is not available: {status}")
    return _OnGpu()


def _check_critic(kernels, heads, target, mask, alpha, beta, mode, weights, dtype=torch.float64, *,
                  kappa=0.5, normalize_kappa=True, algorithm="auto"):
    n = heads.shape[-1]
    acc = ref.acc_dtype(dtype)
    t = dvpo.taus(n, dtype=acc)
    rw = ref.risk_weights(t, 2.0)
    params = WEIGHTS[weights] + MODES[mode]
    heads, target = heads.to(dtype), target.to(dtype)
    m = None if mask is None else mask.to(acc)
    got = kernels.critic_loss(heads, target, t, rw, m, kappa, alpha, beta, normalize_kappa, params, algorithm)
    want = ref_backend.critic_loss(heads.double(), target.double(), t.double(), rw.double(),
                                   None if m is None else m.double(), kappa, alpha, beta, normalize_kappa, params)
    for g, w, what in zip(got, want, ("total", "terms", "grad")):
        assert rel_err(g, w) < TOL[dtype], what
    for k, name in enumerate(TERM_NAMES):
        g, w = got[1][:, k], want[1][:, k]
        # All-equal tails have a variance of exactly 0 mathematically; the reference's float64 sums
        # leave rounding noise there (1e-32) that the recipe's shape ReLU passes on, hence the floor.
        assert rel_err(g, w) < TOL[dtype] or (g.double() - w).abs().max() < 1e-20, name


def _tied_rows(tokens, n, seed):
    """Rows on a grid of 5 values: every tail boundary sits in a tie group of about n / 5 atoms."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2, 3, (tokens, n), generator=g).double() * 0.5


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("n,m", [(7, 9), (10, 10), (33, 20), (64, 31), (257, 65)])
@pytest.mark.parametrize("alpha,beta", [(0.35, 0.35), (0.2, 0.45), (0.5, 0.5), (0.9, 0.75)])
def test_ties_straddling_the_boundary(kernels, mode, n, m, alpha, beta):
    heads = _tied_rows(6, n, n).unsqueeze(1).expand(6, 3, n).contiguous()  # H = 3 equal heads: exact mean
    target = _tied_rows(6, m, 1000 + m) + 0.25
    mask = torch.tensor([1, 1, 0, 1, 1, 1])
    for weights in WEIGHTS:
        _check_critic(kernels, heads, target, mask, alpha, beta, mode, weights)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("n", [1, 2, 5, 32, 100])
def test_all_equal_atoms(kernels, mode, n):
    heads = torch.full((4, 2, n), 0.75, dtype=torch.float64)
    target = torch.full((4, 11), -0.25, dtype=torch.float64)
    target[1] = 0.75  # target equal to theta too
    target[2, ::2] = 2.0
    for weights in WEIGHTS:
        _check_critic(kernels, heads, target, None, 0.3, 0.2, mode, weights)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("n", [1, 3, 7, 16, 33, 200])
@pytest.mark.parametrize("level", ["one atom", "all atoms", "exact boundary"])
def test_tail_of_one_atom_and_of_all(kernels, mode, n, level):
    # one atom: level N < 1; all atoms: level 1; exact boundary: level N an integer (no fractional atom)
    alpha = {"one atom": 0.5 / n, "all atoms": 1.0, "exact boundary": min(1.0, 3.0 / n)}[level]
    g = torch.Generator().manual_seed(n)
    heads = torch.randn((5, 3, n), generator=g, dtype=torch.float64)
    target = torch.randn((5, 13), generator=g, dtype=torch.float64)
    for weights in WEIGHTS:
        _check_critic(kernels, heads, target, None, alpha, alpha, mode, weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("h,n,m", [(3, 7, 5), (5, 33, 17), (3, 129, 257), (7, 3, 2)])
def test_odd_sizes_masks_and_dtypes(kernels, dtype, mode, h, n, m):
    g = torch.Generator().manual_seed(h * n + m)
    heads = torch.randn((7, h, n), generator=g, dtype=torch.float64)
    target = torch.randn((7, m), generator=g, dtype=torch.float64) * 1.5
    heads[3] = float("nan")  # masked: never read
    mask = torch.tensor([1, 0.5, 1, 0, 1, 1, 0.25])
    for weights in WEIGHTS:
        _check_critic(kernels, heads, target, mask, 0.15, 0.25, mode, weights, dtype)


@pytest.mark.parametrize("n", [6, 40])
def test_recipe_shape_at_its_kink(kernels, n):
    """theta equal to the target atom for atom: the recipe's tail variances are equal (the shape
    term's ReLU at exactly 0 on both sides, gradient 0), in the kernel as in the reference."""
    row = _tied_rows(4, n, 7)
    heads = row.unsqueeze(1).expand(4, 3, n).contiguous()
    _check_critic(kernels, heads, row.clone(), None, 0.3, 0.3, "recipe", "tails")
    got = kernels.critic_loss(heads, row, dvpo.taus(n, dtype=torch.float64), dvpo.taus(n, dtype=torch.float64),
                          None, 0.5, 0.3, 0.3, True, [0, 0, 0, 0, 0, 1, 0, 0] + MODES["recipe"], "auto")
    assert torch.all(got[1][:, TERM_NAMES.index("shape")] == 0)
    assert torch.all(got[2] == 0)


@pytest.mark.parametrize("n", [1, 2, 5, 31, 32, 33, 100])
@pytest.mark.parametrize("upper", [False, True])
def test_cvar_coefficients_with_ties(kernels, n, upper):
    x = _tied_rows(6, n, 3 * n)
    x[1] = 1.0  # all equal
    if n > 2:
        x[2, :2] = torch.tensor([0.0, -0.0])  # the zeros are one value
    for level in (0.5 / n, 0.2, 0.35, 0.5, 1.0):
        got = kernels.cvar(x, level, upper)
        want = ref_backend.cvar(x, level, upper)
        for g, w in zip(got, want):
            assert rel_err(g, w) < TOL[torch.float64]


@pytest.mark.parametrize("mode", sorted(MODES))
def test_global_scratch_path_with_ties(kernels, mode):
    """Rows sorted in the global workspace: the emulation lowers both shared-memory limits to 0; on
    a GPU the rows are made too large for shared memory (4097 atoms pad to 8192, 20,000 targets)."""
    emulated = not isinstance(kernels, _OnGpu)
    n, m = (45, 70) if emulated else (4097, 20000)
    if emulated:
        kernels.set_smem_limits(0, 0)
    try:
        heads = _tied_rows(9, n, 5).unsqueeze(1).expand(9, 2, n).contiguous()
        # on the GPU the tail terms only: the float64 reference of the pair terms would take minutes
        _check_critic(kernels, heads, _tied_rows(9, m, 6), torch.tensor([1, 0, 1, 1, 1, 0, 1, 1, 1]), 0.3, 0.4,
                      mode, "all" if emulated else "tails")
        x = _tied_rows(9, n, 8)
        for g, w in zip(kernels.cvar(x, 0.3, True), ref_backend.cvar(x, 0.3, True)):
            assert rel_err(g, w) < TOL[torch.float64]
    finally:
        if emulated:
            kernels.set_smem_limits(48 * 1024, 227 * 1024)


# ------------------------------------------------------------------ algorithm="sorted" (sorted.cuh)

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n,m", [(1, 1), (2, 3), (7, 7), (32, 200), (200, 33), (257, 2), (3, 257)])
def test_sorted_quantile_huber(kernels, dtype, n, m):
    acc = ref.acc_dtype(dtype)
    g = torch.Generator().manual_seed(n * 1000 + m)
    t = dvpo.taus(n, "paper", dtype=acc)
    w = torch.rand(n, generator=g, dtype=acc) + 0.5
    mask = torch.tensor([1, 0, 1, 0.5, 1, 1], dtype=acc)
    for ties in (False, True):
        pred = torch.randn((6, n), generator=g, dtype=torch.float64)
        target = torch.randn((6, m), generator=g, dtype=torch.float64) * 2.0
        if ties:
            pred, target = torch.round(pred * 2) / 2, torch.round(target * 2) / 2
        pred, target = pred.to(dtype), target.to(dtype)
        for weights, mk, kappa, nk in [(None, None, 1.0, False), (w, mask, 0.01, True), (w, mask, 3.0, False)]:
            got = kernels.quantile_huber(pred, target, t, weights, mk, kappa, nk, "sorted")
            want = ref_backend.quantile_huber(pred.double(), target.double(), t.double(),
                                              None if weights is None else weights.double(),
                                              None if mk is None else mk.double(), kappa, nk)
            for a, b, out_dtype in zip(got, want, (acc, dtype)):  # loss, grad (in the input dtype)
                assert a.dtype == out_dtype
                assert rel_err(a, b) < TOL[dtype]


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("h,n,m", [(1, 1, 1), (3, 7, 7), (5, 33, 17), (3, 200, 200), (2, 3, 257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sorted_critic_loss(kernels, dtype, h, n, m, mode):
    g = torch.Generator().manual_seed(h + n + m)
    heads = torch.randn((6, h, n), generator=g, dtype=torch.float64)
    target = torch.randn((6, m), generator=g, dtype=torch.float64)
    mask = torch.tensor([1, 0, 1, 0.5, 1, 1])
    for kappa, nk in ((0.7, False), (0.01, True)):
        _check_critic(kernels, heads, target, mask, 0.2, 0.15, mode, "all", dtype, kappa=kappa, normalize_kappa=nk,
                      algorithm="sorted")


def test_sorted_non_finite_rows_run_pairwise(kernels):
    """A token with inf or NaN gives exactly the pairwise result (inf/NaN propagate as in the formula)."""
    g = torch.Generator().manual_seed(3)
    pred = torch.randn((4, 9), generator=g)
    target = torch.randn((4, 12), generator=g)
    target[1, 3] = float("inf")
    pred[2, 0] = float("nan")
    t = dvpo.taus(9)
    got = kernels.quantile_huber(pred, target, t, None, None, 1.0, False, "sorted")
    want = kernels.quantile_huber(pred, target, t, None, None, 1.0, False, "pairwise")
    for a, b in zip(got, want):  # the non-finite tokens 1, 2 bitwise
        torch.testing.assert_close(a[1:3], b[1:3], equal_nan=True, rtol=0, atol=0)
    assert torch.isfinite(got[0][[0, 3]]).all() and not torch.isfinite(got[0][1:3]).any()
    ok = [0, 3]  # the finite tokens by the sorted algorithm
    want = ref_backend.quantile_huber(pred[ok].double(), target[ok].double(), t.double(), None, None, 1.0, False)
    for a, b in zip(got, want):
        assert rel_err(a[ok], b) < TOL[torch.float32]


def test_sorted_global_scratch_path(kernels):
    if isinstance(kernels, _OnGpu):
        pytest.skip("the emulation lowers the shared-memory limits; the GPU case is the large-row tail test")
    kernels.set_smem_limits(0, 0)
    try:
        g = torch.Generator().manual_seed(4)
        pred = torch.randn((9, 40), generator=g, dtype=torch.float64)
        target = torch.randn((9, 70), generator=g, dtype=torch.float64)
        t = dvpo.taus(40, dtype=torch.float64)
        got = kernels.quantile_huber(pred, target, t, None, None, 0.5, True, "sorted")
        want = ref_backend.quantile_huber(pred, target, t, None, None, 0.5, True)
        for a, b in zip(got, want):
            assert rel_err(a, b) < TOL[torch.float64]
    finally:
        kernels.set_smem_limits(48 * 1024, 227 * 1024)
