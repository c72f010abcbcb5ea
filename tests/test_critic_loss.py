"""The contract of dvpo.critic_loss, once, on every backend (tests/backends.py): the (reduced) loss,
every one of the eight terms and the gradient w.r.t. the heads against autograd of the float64
reference (every dtype, its bar in tests/utils.py's TOL), odd N, M and H, ties, crossing and sorted
quantiles, both tail-term modes (consistent, the default, and CriticLossConfig.recipe()), the
shipped configs, every term off and each term alone, every reduction, every pair algorithm the
backend has, custom taus, a single head, all-masked and empty batches, NaN at masked tokens, a
non-finite real token, non-contiguous inputs, determinism, the `params` list (recipe mode ignores
the consistent scalars; bad lists are refused), gradcheck (the consistent tail terms are
semi-gradients: checked against the autograd oracle instead), opcheck, torch.compile(fullgraph) and
the argument checks."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dvpo
from dvpo import library, ops
from dvpo import reference as ref
from dvpo.backends import reference as ref_backend
from dvpo.config import PARAM_NAMES, TERM_NAMES, CriticLossConfig

from . import backends
from .utils import (REDUCTIONS, SIZES, TOL, assert_mask_read_natively, assert_compiled_matches_eager, critic_inputs, grad, randn,
                    random_mask, rel_err, upstream_like, weighted_mask,
                    with_garbage_at_masked)

MODES = ("consistent", "recipe")  # CriticLossConfig.tail_targets
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

# (H, N, M). On a GPU: every (N, M) of SIZES x SIZES with H in {1, 3, 5}. On CPU every size of SIZES
# as N and as M and H in {1, 2, 3, 5}; on the interpreter and the emulation fewer and shorter rows.
GPU_SHAPES = [(h, n, m) for n in SIZES for m in SIZES for h in (1, 3, 5)]
CPU_SHAPES = [(1, 1, 1), (2, 1, 7), (3, 2, 3), (5, 3, 2), (1, 7, 32), (2, 32, 7), (3, 200, 3), (5, 3, 200),
              (1, 257, 200), (3, 200, 257), (2, 32, 257), (5, 257, 2), (1, 2, 1), (3, 7, 7)]
SMALL_SHAPES = [(1, 1, 1), (2, 2, 3), (3, 3, 2), (3, 7, 7), (5, 33, 17), (3, 200, 200), (1, 257, 3), (2, 3, 257)]
INTERPRETER_SHAPES = [(1, 1, 1), (3, 2, 3), (1, 3, 7), (3, 7, 33), (1, 33, 7), (3, 33, 32), (3, 7, 2), (2, 32, 1),
                      (3, 2, 32)]
# Shorter lists for the dtypes other than fp32.
OTHER_DTYPE_SHAPES = [(3, 7, 32), (2, 200, 257), (5, 3, 1), (1, 7, 9), (2, 32, 257)]
SMALL_OTHER_DTYPE_SHAPES = [(3, 7, 33), (5, 3, 1), (2, 33, 5)]
# Non-default settings, rotated over the shapes (recipe mode ignores the three consistent scalars).
SETTINGS = [dict(kappa=0.7, alpha=0.2, beta=0.15, risk_gamma=2.0, lower_contraction=0.3, upper_expansion=0.5,
                 shift_expectile=0.7),
            dict(kappa=2.0, alpha=1.0, beta=0.5, normalize_kappa=True, consist=0.5, shape=2.0),
            dict(kappa=0.01, alpha=0.1, beta=0.1, normalize_kappa=True, upper_expansion=0.3, shift_expectile=0.3)]


def _config(mode, **kw):
    """The default config (consistent tail terms) or the published recipe, with overrides."""
    return CriticLossConfig.recipe(**kw) if mode == "recipe" else CriticLossConfig(**kw)


def _check(backend, heads, target, config, *, mask=None, algorithm="auto", reduction="none", taus=None):
    """ops.critic_loss on the backend against autograd of the float64 reference on the same rounded
    inputs: the loss, every term (0 when switched off) and the gradient under a random upstream.
    Returns the output."""
    dtype = heads.dtype
    x = heads.clone().requires_grad_()
    out = ops.critic_loss(x, target, taus, mask=mask, config=config, reduction=reduction, algorithm=algorithm)
    h64 = heads.detach().double().requires_grad_()
    t64 = None if taus is None else taus.double()
    want = ref.critic_loss(h64, target.double(), t64, mask=mask, config=config, reduction=reduction)
    up = upstream_like(want.loss)
    g = grad(out.loss, x, up)
    assert out.loss.dtype == ref.acc_dtype(dtype) and g.dtype == dtype and g.shape == heads.shape
    errs = {"loss": rel_err(out.loss, want.loss), "grad": rel_err(g, grad(want.loss, h64, up))}
    for name in TERM_NAMES:
        assert out.terms[name].shape == want.terms[name].shape
        errs[name] = rel_err(out.terms[name], want.terms[name])
        if getattr(config, name) == 0:
            assert torch.count_nonzero(out.terms[name]) == 0, f"switched-off term {name} reported"
    bad = {k: v for k, v in errs.items() if not v < TOL[dtype]}
    assert not bad, f"{backend} {algorithm}: relative errors over {TOL[dtype]}: {bad}"
    return out


def _shapes(backend, dtype):
    if backend.device == "cuda":
        return GPU_SHAPES if dtype in (torch.float32, torch.bfloat16) else CPU_SHAPES
    if backend.small:
        if dtype != torch.float32:
            return SMALL_OTHER_DTYPE_SHAPES
        return INTERPRETER_SHAPES if backend.name == "triton" else SMALL_SHAPES
    return CPU_SHAPES if dtype == torch.float32 else OTHER_DTYPE_SHAPES


@pytest.mark.parametrize("backend,case", backends.cases([(d, m) for d in DTYPES for m in MODES]),
                         indirect=["backend"])
def test_matches_reference(backend, case):
    """Crossing quantiles (unsorted heads), ties (on a GPU every shape with and without; on CPU every
    other shape; on a grid that keeps the head mean exact), a weighted mask with an empty row."""
    dtype, mode = case
    for k, (h, n, m) in enumerate(_shapes(backend, dtype)):
        lead = (2, 3) if n * m < 10_000 else (2,)
        for ties in (False, True) if backend.device == "cuda" else (k % 2 == 1,):
            heads, target = critic_inputs(lead, h, n, m, dtype, ties=ties, device=backend.device)
            mask = weighted_mask(lead, device=backend.device)
            for algorithm in backend.algorithms:
                _check(backend, heads, target, _config(mode, **SETTINGS[k % 3]), mask=mask, algorithm=algorithm)


@pytest.mark.parametrize("backend,mode", backends.cases(MODES), indirect=["backend"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_and_sorted_quantiles(backend, mode, dtype):
    """Quantiles sorted by level (a trained critic's) and sorted targets, with and without ties: the
    tail selects start from the atom at the tail's index; theta's VaR is a tied atom and targets sit
    exactly at it."""
    for ties in (False, True):
        heads, target = critic_inputs((2, 2), 2, 32, 7, dtype, ties=ties, device=backend.device)
        for algorithm in backend.algorithms:
            _check(backend, heads, target, _config(mode), algorithm=algorithm)
        heads, target = critic_inputs((3, 2), 2, 50, 64, dtype, ties=ties, device=backend.device)
        heads, target = torch.sort(heads, -1).values, torch.sort(target, -1).values
        # Sorted tied atoms put the curvature term (a ReLU of mean second differences) exactly at its
        # kink, where the sign of a rounding-level value picks the subgradient: the Triton kernel sums
        # the differences telescoped, the reference and the C++/CUDA kernels term by term, and either
        # rounding is right. There the curvature term is checked by value only (its gradient is
        # checked everywhere else), and every other term, value and gradient, as usual.
        at_kink = backend.name == "triton" and ties
        config = _config(mode, alpha=0.2, beta=0.1, **({"curv": 0.0} if at_kink else {}))
        mask = weighted_mask((3, 2), device=backend.device)
        for algorithm in backend.algorithms:
            _check(backend, heads, target, config, mask=mask, algorithm=algorithm)
        if at_kink:
            got = ops.critic_loss(heads, target, mask=mask, config=_config(mode, alpha=0.2, beta=0.1),
                                  reduction="none").terms["curv"]
            want = ref.curvature_per_token(heads.double().mean(-2), 0.2, 0.1) * mask.double()
            torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_targets_at_the_var(backend):
    """Many atoms of theta tied at the VaR (boundary weight split by index), targets exactly at the VaR
    (the kink of min(z - v, 0)), one-atom tails, all-equal rows, VaRs at the first and last atom."""
    theta = torch.tensor([[0.0, 1, 1, 1, 2, 3, 4, 4, 4, 5], [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 2.0, 1.0, 1.0],
                          [-0.0, 0.0, 0.0, 0.5, -1.0, 0.0, 2.0, 2.0, 2.0, 0.0], [2.0] * 10,
                          [5.0, 4, 3, 2, 1, 0, -1, -2, -3, -4], [3.0] * 10], device=backend.device)
    target = torch.tensor([[1.0] * 6 + [4.0] * 6, [1.0, 1, 1, 0, -1, 2, 3, 4, 4, 5, 6, 7],
                           [0.0, 2.0, -0.5, 2.0, 0.0, 1.0, 3.0, 0.0, 2.0, 2.0, 1.0, 0.5], [2.0] * 12,
                           [0.5, -0.5] * 6, [3.0, 2.0, 4.0, 3.0] * 3], device=backend.device)
    heads = theta.unsqueeze(1).expand(-1, 2, -1).contiguous()
    for alpha, beta in ((0.3, 0.3), (0.35, 0.55), (0.5, 0.25), (0.05, 1.0), (1.0, 0.1), (0.01, 0.99)):
        for kw in (dict(), dict(lower_contraction=0.0, upper_expansion=0.0, shift_expectile=0.5)):
            _check(backend, heads, target, _config("consistent", alpha=alpha, beta=beta, kappa=1.0, **kw))


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_shift_at_zero_gap(backend):
    """mean z == mean theta exactly: the expectile shift and its gradient are 0."""
    heads = torch.tensor([[[1.0, -1.0, 0.5, 0.5]], [[0.25, 0.75, 2.0, -1.0]]], device=backend.device)
    target = torch.tensor([[0.5, -0.5, 0.0, 1.0, 0.5, 0.0], [1.0, 0.0, 0.5, 0.5, 0.0, 1.0]], device=backend.device)
    cfg = _config("consistent", **{k: (1.0 if k == "shift" else 0.0) for k in TERM_NAMES}, shift_expectile=0.7)
    x = heads.clone().requires_grad_()
    out = ops.critic_loss(x, target, config=cfg, reduction="none")
    assert torch.all(out.terms["shift"] == 0) and torch.all(grad(out.loss, x) == 0)


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_consistent_fixed_point(backend):
    """Symmetric scales, a target equal to theta (alpha N, beta N integers): the fixed point of every
    tail term (the targets reproduce theta's own CVaR and tail moments)."""
    g = torch.Generator().manual_seed(32)
    theta = torch.randn(4, 1, 40, generator=g, dtype=torch.float64)
    target = theta[:, 0, torch.randperm(40, generator=g)]
    config = CriticLossConfig.symmetric(alpha=0.2, beta=0.25, qh=0.0, risk=0.0, curv=0.0)
    for algorithm in backend.algorithms:
        out = ops.critic_loss(theta.to(backend.device), target.to(backend.device), config=config,
                              reduction="none", algorithm=algorithm)
        for name in ("cvar", "gain", "shift", "shape"):
            assert out.terms[name].abs().max() < 1e-24, name


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shipped_configs(backend, dtype):
    """The default config (consistent, kappa 0.01 normalized), CriticLossConfig.recipe() and
    CriticLossConfig.symmetric() as the library ships them, on crossing quantiles (and ties in fp32)."""
    for ties in (False, True) if dtype == torch.float32 else (False,):
        heads, target = critic_inputs((3, 4), 3, 40, 57, dtype, ties=ties, device=backend.device)
        mask = weighted_mask((3, 4), device=backend.device)
        for cfg in (CriticLossConfig(), CriticLossConfig.recipe(), CriticLossConfig.symmetric()):
            for algorithm in backend.algorithms:
                _check(backend, heads, target, cfg, mask=mask, algorithm=algorithm, reduction="seq-mean-token-mean")


@pytest.mark.parametrize("backend,mode", backends.cases(MODES), indirect=["backend"])
def test_settings(backend, mode):
    """Levels, kappa, risk_gamma and (consistent mode; ignored by the recipe) the tail scales and the
    shift expectile, at their extremes."""
    heads, target = critic_inputs((2, 2), 3, 33, 40, device=backend.device)
    mask = weighted_mask((2, 2), device=backend.device)
    for kw in (dict(kappa=0.3, normalize_kappa=True), dict(kappa=2.5, alpha=1.0, beta=1.0, risk_gamma=-0.5),
               dict(alpha=0.5, beta=0.05, risk_gamma=3.0, normalize_kappa=True), dict(alpha=0.013, beta=0.999,
                                                                                      kappa=1e-3),
               dict(lower_contraction=0.9, upper_expansion=2.0, shift_expectile=0.85),
               dict(lower_contraction=0.0, upper_expansion=0.0, shift_expectile=0.05, alpha=0.37, beta=0.21)):
        for algorithm in backend.algorithms:
            _check(backend, heads, target, _config(mode, **kw), mask=mask, algorithm=algorithm)


@pytest.mark.parametrize("backend,mode", backends.cases(MODES), indirect=["backend"])
def test_each_term_off_and_alone(backend, mode):
    """Every term switched off (the others still match, the term is reported as 0; in consistent mode
    cvar or gain off still leaves that tail on for shape) and every term alone (weight 2.5: its value
    and gradient isolated; cvar alone needs only the lower tail, gain only the upper, shape both)."""
    heads, target = critic_inputs((2, 3), 3, 20, 24, device=backend.device)
    for name in TERM_NAMES:
        off = _config(mode, **{name: 0.0}, alpha=0.2, beta=0.15, normalize_kappa=True)
        alone = _config(mode, **{t: (2.5 if t == name else 0.0) for t in TERM_NAMES}, alpha=0.25, beta=0.3,
                        upper_expansion=0.4, shift_expectile=0.3)
        for algorithm in backend.algorithms:
            _check(backend, heads, target, off, mask=weighted_mask((2, 3), device=backend.device), algorithm=algorithm)
            _check(backend, heads, target, alone, algorithm=algorithm)


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reductions(backend, reduction):
    heads, target = critic_inputs((3, 5), 3, 16, 12, device=backend.device)
    for mode in MODES:
        _check(backend, heads, target, _config(mode), mask=random_mask((3, 5), device=backend.device),
               reduction=reduction, algorithm=backend.algorithms[-1])


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_custom_taus_single_head_and_leading_dims(backend):
    """The paper's tau grid and arbitrary sorted taus; theta [..., N] without a heads dim (same as
    H = 1); leading dims of any rank."""
    heads, target = critic_inputs((4,), 2, 12, 10, device=backend.device)
    for taus in (dvpo.taus(12, "paper"), torch.sort(torch.rand(12)).values):
        for mode in MODES:
            for algorithm in backend.algorithms:
                _check(backend, heads, target, _config(mode), taus=taus.to(backend.device), algorithm=algorithm)
    heads, target = critic_inputs((2, 3), 1, 9, 11, device=backend.device)
    _check(backend, heads.squeeze(-2), target, CriticLossConfig())
    for lead in [(), (7,), (2, 2, 3)]:
        heads, target = critic_inputs(lead, 2, 5, 4, torch.float64, device=backend.device)
        for reduction in REDUCTIONS:
            got = ops.critic_loss(heads, target, reduction=reduction).loss
            want = ref.critic_loss(heads, target, reduction=reduction).loss
            assert got.shape == want.shape and rel_err(got, want) < TOL[torch.float64]


# --------------------------------------------------------------------------- the params list

def _kernel_args(backend):
    heads, target = critic_inputs((6,), 3, 21, 30, device=backend.device)
    t = dvpo.taus(21, device=backend.device)
    mask = torch.tensor([1, 0, 1, 0.5, 1, 1], device=backend.device)
    return heads, target, t, ref.risk_weights(t), mask


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_params_tail_mode(backend):
    """params[8] selects the mode: recipe mode ignores params[9:12] (bit for bit, odd values too);
    consistent mode uses each of them; the modes differ in the tail terms (cvar, gain, shift, shape)
    only; both match the reference backend."""
    heads, target, t, rw, mask = _kernel_args(backend)
    kernels = backend.kernels()

    def run(params):
        return kernels.critic_loss(heads, target, t, rw, mask, 0.7, 0.2, 0.3, False, params, "auto")

    weights = [1.0, 0.5, 2.0, 1.0, 1.5, 1.0, 1.0, 0.5]
    recipe = run(weights + [0.0, 1.0, 1.0, 0.5])
    for odd in ([0.2, 3.0, 0.9], [-3.0, float("nan"), 2.0]):
        assert all(torch.equal(a, b) for a, b in zip(recipe, run(weights + [0.0] + odd)))
    consistent = run(weights + [1.0, 1.0, 1.0, 0.5])
    assert not torch.equal(recipe[1][:, 2:6], consistent[1][:, 2:6])
    assert torch.equal(recipe[1][:, [0, 1, 6, 7]], consistent[1][:, [0, 1, 6, 7]])
    for k, changed in ((9, 0.5), (10, 1.5), (11, 0.8)):
        p = weights + [1.0, 1.0, 1.0, 0.5]
        p[k] = changed
        assert not torch.equal(run(p)[1], consistent[1]), PARAM_NAMES[k]
        want = ref_backend.critic_loss(heads, target, t, rw, mask, 0.7, 0.2, 0.3, False, p)
        for got_x, want_x in zip(run(p), want):
            assert rel_err(got_x, want_x) < TOL[torch.float32]


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_params_are_checked(backend):
    """A params list of the wrong length is refused by every backend; the C++ and CUDA kernels also
    refuse values out of range."""
    heads, target, t, rw, _ = _kernel_args(backend)
    bad = [([1.0] * 8, "params"), ([1.0] * 13, "params")]
    if backend.name in ("cpp", "cuda-emu", "cuda"):
        bad += [([1.0] * 8 + [0.5, 1.0, 1.0, 0.5], "tail_mode"), ([1.0] * 8 + [1.0, 1.0, 1.0, 1.0], "shift_expectile"),
                ([1.0] * 8 + [1.0, 1.0, 1.0, 0.0], "shift_expectile"),
                ([1.0] * 8 + [1.0, float("inf"), 1.0, 0.5], "lo_scale")]
    for params, what in bad:
        with pytest.raises((RuntimeError, ValueError), match=what):
            backend.kernels().critic_loss(heads, target, t, rw, None, 1.0, 0.1, 0.1, False, params, "auto")


# --------------------------------------------------------------------------- masks, layouts, determinism

@pytest.mark.parametrize("backend", backends.params(), indirect=True)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_masked_gives_zero_loss_and_zero_finite_grads(backend, reduction):
    heads, target = critic_inputs((3, 4), 3, 7, 5, device=backend.device)
    heads[0, 0, 0, 0] = float("nan")  # garbage at masked tokens must not leak
    target[1, 2, 3] = float("inf")
    mask = torch.zeros(3, 4, dtype=torch.bool, device=backend.device)
    for mode in MODES:
        for algorithm in backend.algorithms:
            x = heads.clone().requires_grad_()
            out = ops.critic_loss(x, target, mask=mask, reduction=reduction, config=_config(mode), algorithm=algorithm)
            g = grad(out.loss, x)
            assert torch.all(out.loss == 0) and torch.all(g == 0)
            assert all(torch.all(v == 0) for v in out.terms.values())


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_empty_token_batch(backend):
    heads, target = critic_inputs((0, 5), 3, 7, 7, device=backend.device)
    x = heads.clone().requires_grad_()
    assert ops.critic_loss(x, target, reduction="none").loss.shape == (0, 5)
    out = ops.critic_loss(x, target)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("backend,mode", backends.cases(MODES), indirect=["backend"])
def test_nan_at_masked_tokens_does_not_leak(backend, mode):
    """NaN / inf at masked tokens: every output is what the clean inputs give, bit for bit."""
    heads, target = critic_inputs((3, 4), 3, 10, 12, device=backend.device)
    mask = weighted_mask((3, 4), device=backend.device)
    masked = mask == 0
    dirty_h, dirty_t = with_garbage_at_masked(heads, target, mask)
    for algorithm in backend.algorithms:
        h1, h2 = heads.clone().requires_grad_(), dirty_h.clone().requires_grad_()
        clean = ops.critic_loss(h1, target, mask=mask, config=_config(mode), reduction="none", algorithm=algorithm)
        dirty = ops.critic_loss(h2, dirty_t, mask=mask, config=_config(mode), reduction="none", algorithm=algorithm)
        assert torch.equal(clean.loss, dirty.loss)
        assert all(torch.equal(clean.terms[k], dirty.terms[k]) for k in TERM_NAMES)
        g1, g2 = grad(clean.loss, h1), grad(dirty.loss, h2)
        assert torch.equal(g1, g2) and torch.isfinite(g2).all()
        assert torch.count_nonzero(g2[masked]) == 0 and torch.count_nonzero(dirty.loss[masked]) == 0


@pytest.mark.parametrize("backend,mode", backends.cases(MODES, names=("cpp", "cuda-emu", "cuda")),
                         indirect=["backend"])
def test_non_finite_real_token_gives_nan(backend, mode):
    """A real token with a non-finite input: NaN for its total; other tokens are unaffected (the C++
    and CUDA kernels define this; the reference and Triton backends do not promise it)."""
    heads, target = critic_inputs((3,), 2, 6, 5, device=backend.device)
    dirty = target.clone()
    dirty[1, 2] = float("inf")
    cfg = _config(mode, curv=0.0)
    x = heads.clone().requires_grad_()
    out = ops.critic_loss(x, dirty, config=cfg, reduction="none")
    clean = ops.critic_loss(heads, target, config=cfg, reduction="none")
    assert torch.isnan(out.loss[1]) and torch.equal(out.loss[[0, 2]], clean.loss[[0, 2]])
    assert torch.count_nonzero(out.terms["curv"]) == 0
    g = grad(out.loss, x, torch.tensor([1.0, 0.0, 1.0], device=backend.device))
    assert torch.isfinite(g[[0, 2]]).all()


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_non_contiguous_inputs(backend):
    """Strided heads, a permuted target and a strided mask: the contiguous inputs' result, bit for bit."""
    base_h = randn((4, 3, 9, 2, 11), device=backend.device)
    heads = base_h[:, :, ::4, 0, :][..., :2, :]  # [4, 3, 2, 11]
    target = randn((13, 4, 3), device=backend.device).permute(1, 2, 0)  # [4, 3, 13]
    mask = weighted_mask((4, 3), device=backend.device)
    mask_nc = torch.stack([mask, mask], -1)[..., 0]
    assert not heads.is_contiguous() and not target.is_contiguous() and not mask_nc.is_contiguous()
    for mode in MODES:
        for algorithm in backend.algorithms:
            a = _check(backend, heads, target, _config(mode), mask=mask_nc, algorithm=algorithm)
            b = ops.critic_loss(heads.contiguous(), target.contiguous(), mask=mask, config=_config(mode),
                                reduction="none", algorithm=algorithm)
            assert torch.equal(a.loss, b.loss)


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_deterministic(backend):
    heads, target = critic_inputs((4, 5), 3, 17, 19, torch.bfloat16, device=backend.device)
    mask = random_mask((4, 5), device=backend.device)

    def run(mode, algorithm):
        x = heads.clone().requires_grad_()
        out = ops.critic_loss(x, target, mask=mask, config=_config(mode), algorithm=algorithm)
        return [out.loss, grad(out.loss, x)] + [out.terms[k] for k in TERM_NAMES]

    for mode in MODES:
        for algorithm in backend.algorithms:
            assert all(torch.equal(a, b) for a, b in zip(run(mode, algorithm), run(mode, algorithm)))


# --------------------------------------------------------------------------- gradients, opcheck, compile

@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_gradcheck_float64(backend):
    """Finite differences: the recipe config, and the consistent config without its semi-gradient terms
    (cvar, gain, shape: their targets hang on theta's detached VaR, so their gradient is not the
    value's derivative; the expectile shift is an exact gradient and stays on). The full consistent
    gradient is checked against the autograd oracle in test_consistent_semi_gradient_float64."""
    # The interpreter and the emulation pay per call: fewer inputs to perturb there.
    lead, h, n, m = ((3,), 1, 4, 3) if backend.small else ((2, 3), 3, 6, 5)
    heads, target = critic_inputs(lead, h, n, m, torch.float64, device=backend.device)
    heads.requires_grad_()
    mask = torch.tensor([[1.0, 0.5, 0.0], [1.0, 1.0, 2.0]], dtype=torch.float64, device=backend.device)
    mask = mask[0] if backend.small else mask
    reductions = ("none",) if backend.small else REDUCTIONS
    for config in (CriticLossConfig.recipe(alpha=0.3, beta=0.4),
                   CriticLossConfig(alpha=0.3, beta=0.4, kappa=0.3, cvar=0.0, gain=0.0, shape=0.0,
                                    shift_expectile=0.7)):
        for algorithm in backend.algorithms:
            for reduction in reductions:
                assert torch.autograd.gradcheck(
                    lambda h: ops.critic_loss(h, target, mask=mask, config=config, algorithm=algorithm,
                                              reduction=reduction).loss, (heads,))


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_consistent_semi_gradient_float64(backend):
    """The full consistent gradient (VaR and its targets held constant) equals the float64 autograd
    oracle's, which detaches them, to fp64 precision."""
    heads, target = critic_inputs((5,), 3, 11, 13, torch.float64, device=backend.device)
    for config in (CriticLossConfig(alpha=0.3, beta=0.4, upper_expansion=0.5, shift_expectile=0.6),
                   CriticLossConfig(qh=0.0, risk=0.0, curv=0.0, consist=0.0, alpha=0.2, beta=0.2)):
        for algorithm in backend.algorithms:
            _check(backend, heads, target, config, algorithm=algorithm)


def _opcheck_cases(device, algorithms):
    heads, target = critic_inputs((6,), 3, 5, 4, torch.float64, device=device)
    h32 = heads.float().requires_grad_()
    t = dvpo.taus(5, dtype=torch.float32, device=device)
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.float32, device=device)
    w = ref.risk_weights(t)
    alg = (algorithms * 2)[:2]
    return [
        (h32, target.float(), t, w, mask, 1.0, 0.2, 0.2, False, CriticLossConfig.recipe().kernel_params(), alg[0]),
        (heads.clone().requires_grad_(), target, t.double(), w.double(), None, 0.7, 0.1, 0.5, True,
         [1.0, 0.5, 0.0, 2.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.5], alg[1]),
        (h32.detach().clone().requires_grad_(), target.float(), t, w, mask, 0.01, 0.2, 0.3, True,
         CriticLossConfig(upper_expansion=0.2).kernel_params(), alg[0]),
        (heads.clone().requires_grad_(), target, t.double(), w.double(), None, 0.7, 0.1, 0.5, True,
         [1.0, 0.5, 0.0, 2.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.6, 1.3, 0.8], alg[1]),
        (heads.clone().requires_grad_(), target, t.double(), w.double(), None, 1.0, 0.3, 0.2, False,
         [1.0, 0.5, 1.0, 0.0, 1.0, 2.0, 1.0, 0.3, 1.0, 0.6, 1.5, 0.3], alg[0]),
    ]


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
@pytest.mark.parametrize("mode", MODES)
def test_mask_read_natively(backend, mode, monkeypatch):
    heads, target = critic_inputs((7,), 3, 5, 6, device=backend.device)
    heads[1] = float("nan")  # garbage at a masked token
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1], dtype=torch.bool, device=backend.device)
    t = dvpo.taus(5, device=backend.device)
    config = _config(mode)
    args = (heads.requires_grad_(), target, t, ref.risk_weights(t, config.risk_gamma), mask, config.kappa,
            config.alpha, config.beta, config.normalize_kappa, config.kernel_params(), backend.algorithms[-1])
    assert_mask_read_natively(library.critic_loss, args, 4, monkeypatch,
                                   lambda m: ops.critic_loss(heads, target, mask=m, config=config))


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
@pytest.mark.parametrize("case", range(5))
def test_opcheck(backend, case):
    torch.library.opcheck(library.critic_loss, _opcheck_cases(backend.device, backend.algorithms)[case])


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
@pytest.mark.parametrize("mode", MODES)
def test_torch_compile_fullgraph_matches_eager(backend, mode):
    heads, target = critic_inputs((2, 7), 3, 8, 6, device=backend.device)
    mask = random_mask((2, 7), device=backend.device)

    def step(h, z, m):
        return ops.critic_loss(h, z, mask=m, config=_config(mode), reduction="seq-mean-token-mean").loss

    assert_compiled_matches_eager(step, backend, heads, target, mask)


# --------------------------------------------------------------------------- property test

@pytest.mark.parametrize("name", ["reference", "cpp"])
@settings(max_examples=40, deadline=None, derandomize=True)
@given(t=st.integers(1, 4), h=st.integers(1, 4), n=st.integers(1, 40), m=st.integers(1, 40),
       alpha=st.floats(0.01, 1.0), beta=st.floats(0.01, 1.0), kappa=st.floats(0.05, 3.0), ties=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2 ** 16),
       mode=st.sampled_from(MODES), rho_lo=st.floats(0.0, 0.95), rho_hi=st.floats(0.0, 3.0),
       tau_s=st.floats(0.01, 0.99))
def test_property_random_shapes_and_levels(name, t, h, n, m, alpha, beta, kappa, ties, dtype, seed, mode, rho_lo,
                                           rho_hi, tau_s):
    backend = backends.BACKENDS[name]
    if ties:
        h = min(h, 2)  # keep the head mean exact (tests/utils.py, critic_inputs)
    gen = torch.Generator().manual_seed(seed)
    heads, target = critic_inputs((t,), h, n, m, dtype, ties=ties, generator=gen)
    config = _config(mode, alpha=alpha, beta=beta, kappa=kappa, lower_contraction=rho_lo, upper_expansion=rho_hi,
                     shift_expectile=tau_s)
    with backends.forced(name):  # hypothesis examples do not re-run fixtures
        for algorithm in backend.algorithms:
            _check(backend, heads, target, config, mask=weighted_mask((t,), generator=gen), algorithm=algorithm)
        x = heads[..., 0, :]
        for upper, level in ((False, alpha), (True, beta)):
            assert torch.equal(backend.kernels().cvar(x, level, upper)[1], ref_backend.cvar(x, level, upper)[1])


# --------------------------------------------------------------------------- argument checks (any backend)

def _bad_calls():
    z, h = randn((2, 3, 4)), randn((2, 3, 2, 5))
    return [
        ("theta", lambda: ops.critic_loss(randn((2, 4, 2, 5)), z)),
        ("target", lambda: ops.critic_loss(h, z.half())),
        ("mask", lambda: ops.critic_loss(h, z, mask=torch.ones(2, 4))),
        ("config", lambda: ops.critic_loss(h, z, config={"alpha": 0.1})),
        ("alpha", lambda: CriticLossConfig(alpha=0.0)),
        ("beta", lambda: CriticLossConfig(beta=2.0)),
        ("kappa", lambda: CriticLossConfig(kappa=0)),
        ("cvar", lambda: CriticLossConfig(cvar=-1.0)),
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
