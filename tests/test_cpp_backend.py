"""The `cpp` backend (csrc/cpu, through dvpo.backends.cpp) against the float64 reference
(autograd of dvpo.reference) and against the reference backend: every op forward and backward,
fp32/bf16/fp16 (fp64 computed in fp64, gradcheck), odd sizes, ties, crossing quantiles, masks with
empty rows and NaN garbage at masked tokens, non-contiguous inputs, every critic term switched off,
both tail-term modes (consistent, the default, and CriticLossConfig.recipe()), both algorithms
(pairwise and sorted), every instruction-set variant this CPU has, opcheck, and a hypothesis property
test. Small token counts: the whole module runs in about a minute.
"""

import contextlib
import os
import platform
import re
import shutil
import subprocess

import pytest
import torch

import dvpo
from dvpo import dispatch, ops
from dvpo import reference as ref
from dvpo.backends import reference as ref_backend
from dvpo.config import PARAM_NAMES, TERM_NAMES, CriticLossConfig

from .utils import TOL, rel_err

# setup.py always builds dvpo._C: a missing or stale extension is a failure here, never a skip.
from dvpo.backends import cpp  # noqa: E402

assert cpp.isa() != "unknown" and len(cpp.OPS) >= 4, (
    "dvpo._C is older than csrc/cpu (some ops have no CPU kernel): rebuild it with "
    "`python setup.py build_ext --inplace` or `pip install --no-build-isolation -e .`")

REDUCTIONS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "none"]
ALGORITHMS = ["pairwise", "sorted"]
MODES = ["consistent", "recipe"]  # the tail-term modes (config.tail_targets)
LOW = (torch.bfloat16, torch.float16)
# Instruction-set variants this CPU can run (the kernels are compiled for each; DVPO_CPU_ISA caps).
_ISA_ORDER = ["baseline", "avx2", "avx512"]
ISAS = _ISA_ORDER[: _ISA_ORDER.index(cpp.isa(detected=True)) + 1]

# (N, M, H): every size of tests/utils.py's SIZES (docs/architecture.md, "Correctness bars") appears as N
# and as M, and every H in {1, 2, 3, 5}.
SHAPES = [(1, 1, 1), (1, 7, 2), (2, 3, 3), (3, 2, 5), (7, 32, 1), (32, 7, 2), (200, 3, 3), (3, 200, 5),
          (257, 200, 1), (200, 257, 3), (32, 257, 2), (257, 2, 5), (2, 1, 1), (7, 7, 3)]


@pytest.fixture(autouse=True)
def _cpp_backend(monkeypatch):
    monkeypatch.setenv("DVPO_BACKEND", "cpp")
    monkeypatch.delenv("DVPO_CPU_ISA", raising=False)


@contextlib.contextmanager
def _env(**values):
    """Set environment variables inside the block (hypothesis examples do not reset fixtures)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# Worst relative error seen per (input dtype, quantity), printed at the end of the module (pytest -s).
WORST = {}


@pytest.fixture(scope="module", autouse=True)
def _report_worst_errors():
    yield
    if WORST:
        print("\nworst relative errors vs the float64 reference (cpp backend, ISA %s):" % cpp.isa())
        for (dtype, what), err in sorted(WORST.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
            print(f"  {str(dtype):15s} {what:10s} {err:.2e}")


def _check(out, expected, dtype, what, tol=None):
    """rel_err(out, expected) < tol (unless given, the bar for `dtype` of docs/architecture.md,
    "Correctness bars"), recording the worst."""
    err = rel_err(out, expected)
    tol = TOL[dtype] if tol is None else tol
    key = (dtype, what)
    WORST[key] = max(WORST.get(key, 0.0), err)
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol:g} ({dtype})"


def _config(mode, **kw):
    """The default config (consistent tail terms) or the published recipe, with overrides."""
    return CriticLossConfig.recipe(**kw) if mode == "recipe" else CriticLossConfig(**kw)


def _grad(value, x, upstream):
    (g,) = torch.autograd.grad((value * upstream).sum(), x)
    return g


def _inputs(lead, h, n, m, dtype=torch.float32, *, ties=False, seed=0):
    """heads [..., H, N] (unsorted: quantiles cross) and target [..., M] with different tails.

    With `ties`, values on a grid of 0.5 (many repeats): use H in {1, 2, 4}, so that the head mean is
    exact in every precision and the kernel and the float64 reference see the same ties and kinks."""
    g = torch.Generator().manual_seed(seed)
    heads = torch.randn(tuple(lead) + (h, n), dtype=torch.float64, generator=g)
    target = torch.randn(tuple(lead) + (m,), dtype=torch.float64, generator=g) * 1.5 + 0.2
    if ties:
        heads, target = torch.round(heads * 2) / 2, torch.round(target * 2) / 2
    return heads.to(dtype), target.to(dtype)


def _mask(lead, *, seed=0, weights=False):
    """A float mask with masked tokens, an all-masked row (when there are rows) and, with `weights`,
    non-binary weights."""
    g = torch.Generator().manual_seed(seed + 17)
    keep = torch.rand(lead, generator=g) < 0.7
    if len(lead) >= 2 and lead[0] > 1:
        keep[0] = False
    if not keep.any():
        keep.view(-1)[-1] = True
    m = keep.to(torch.float32)
    if weights:
        m = m * (0.5 + torch.rand(lead, generator=g))
    return m


def _critic_cpp(heads, target, *, mask=None, config=None, algorithm="auto", reduction="none", taus=None):
    h = heads.detach().clone().requires_grad_(True)
    out = ops.critic_loss(h, target, taus, mask=mask, config=config, reduction=reduction, algorithm=algorithm)
    return h, out


def _critic_ref(heads, target, *, mask=None, config=None, reduction="none", taus=None):
    """Autograd of the float64 reference on the same (rounded) inputs."""
    h = heads.detach().double().requires_grad_(True)
    t = None if taus is None else taus.double()
    out = ref.critic_loss(h, target.double(), t, mask=mask, config=config, reduction=reduction)
    return h, out


def _compare_critic(heads, target, *, mask=None, config=None, algorithm="auto", reduction="none",
                    dtype=None, what=""):
    dtype = dtype or heads.dtype
    config = config or CriticLossConfig()
    h, out = _critic_cpp(heads, target, mask=mask, config=config, algorithm=algorithm, reduction=reduction)
    h64, expected = _critic_ref(heads, target, mask=mask, config=config, reduction=reduction)
    assert out.loss.dtype == (torch.float64 if heads.dtype == torch.float64 else torch.float32)
    _check(out.loss, expected.loss, dtype, "loss" + what)
    for name in TERM_NAMES:
        _check(out.terms[name], expected.terms[name], dtype, "terms" + what)
        if getattr(config, name) == 0:
            assert torch.count_nonzero(out.terms[name]) == 0, f"switched-off term {name} reported"
    upstream = torch.rand(out.loss.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + 0.5
    g = _grad(out.loss, h, upstream.to(out.loss.dtype))
    g64 = _grad(expected.loss, h64, upstream)
    assert g.dtype == heads.dtype and g.shape == heads.shape
    _check(g, g64, dtype, "grad" + what)
    return out, g


# ---------------------------------------------------------------------------------------------
# The fused critic loss
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("n,m,h", SHAPES)
def test_critic_loss_fp32_matches_reference(n, m, h, algorithm, mode):
    lead = (2, 3) if n * m < 10_000 else (2,)
    heads, target = _inputs(lead, h, n, m, seed=n * 1000 + m)
    mask = _mask(lead, seed=n + m, weights=True)
    _compare_critic(heads, target, mask=mask, config=_config(mode), algorithm=algorithm)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("n,m,h", [(7, 32, 3), (200, 257, 2), (3, 1, 5)])
def test_critic_loss_low_precision(n, m, h, algorithm, dtype, mode):
    lead = (2, 2)
    heads, target = _inputs(lead, h, n, m, dtype, seed=7)
    _compare_critic(heads, target, mask=_mask(lead), config=_config(mode), algorithm=algorithm, dtype=dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("n,m,h", [(7, 9, 3), (32, 257, 2), (1, 3, 1), (200, 200, 1)])
def test_critic_loss_fp64_matches_reference(n, m, h, algorithm, mode):
    heads, target = _inputs((3,), h, n, m, torch.float64, seed=3)
    _compare_critic(heads, target, mask=_mask((3,)), config=_config(mode), algorithm=algorithm)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("n,m,h", [(7, 7, 1), (32, 32, 2), (200, 257, 4), (3, 2, 4), (257, 32, 1)])
def test_critic_loss_ties(n, m, h, algorithm, mode):
    """Tied atoms: theta's VaR (consistent mode) is a tied atom, targets sit exactly at it."""
    heads, target = _inputs((2, 2), h, n, m, ties=True, seed=11)
    _compare_critic(heads, target, mask=_mask((2, 2)), config=_config(mode), algorithm=algorithm)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_critic_loss_monotone_quantiles(algorithm, ties, mode):
    """Quantiles that come sorted by level (a trained critic's) and sorted targets: the tail selects
    start from the atom at the tail's index (found at once here); still exact, ties included."""
    heads, target = _inputs((3, 2), 2, 50, 64, ties=ties, seed=30)
    heads, target = torch.sort(heads, -1).values, torch.sort(target, -1).values
    _compare_critic(heads, target, mask=_mask((3, 2)), config=_config(mode, alpha=0.2, beta=0.1),
                    algorithm=algorithm)
    for upper in (False, True):
        value, coef = cpp.cvar(heads[..., 0, :].reshape(6, 50), 0.2, upper)
        ref_value, ref_coef = ref_backend.cvar(heads[..., 0, :].reshape(6, 50), 0.2, upper)
        assert torch.equal(coef, ref_coef)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", TERM_NAMES)
def test_critic_loss_each_weight_off(name, mode):
    """Every term switched off alone: the others still match, the term is reported as 0 (in the
    consistent mode, cvar or gain off still leaves that tail on for shape, and shape off drops it)."""
    heads, target = _inputs((2, 3), 3, 20, 24, seed=2)
    config = _config(mode, **{name: 0.0}, alpha=0.2, beta=0.15)
    for algorithm in ALGORITHMS:
        _compare_critic(heads, target, mask=_mask((2, 3)), config=config, algorithm=algorithm)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", TERM_NAMES)
def test_critic_loss_single_term(name, mode):
    """Only one term on (weight 2.5): isolates each term's value and gradient."""
    weights = {t: 0.0 for t in TERM_NAMES}
    weights[name] = 2.5
    heads, target = _inputs((3,), 3, 30, 17, seed=4)
    config = _config(mode, **weights, alpha=0.25, beta=0.3, upper_expansion=0.4, shift_expectile=0.3)
    for algorithm in ALGORITHMS:
        _compare_critic(heads, target, config=config, algorithm=algorithm)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kw", [
    dict(kappa=0.3, normalize_kappa=True),
    dict(kappa=2.5, alpha=1.0, beta=1.0, risk_gamma=-0.5),
    dict(alpha=0.5, beta=0.05, risk_gamma=3.0, normalize_kappa=True),
    dict(alpha=0.013, beta=0.999, kappa=1e-3),
    dict(lower_contraction=0.9, upper_expansion=2.0, shift_expectile=0.85),
    dict(lower_contraction=0.0, upper_expansion=0.0, shift_expectile=0.05, alpha=0.37, beta=0.21),
], ids=["normalize_kappa", "levels_1", "levels_mixed", "tiny_kappa", "asymmetric", "symmetric"])
def test_critic_loss_configs(kw, mode):
    """Levels, kappa, and (consistent mode; ignored by the recipe) the tail scales and shift expectile."""
    heads, target = _inputs((2, 2), 3, 33, 40, seed=9)
    for algorithm in ALGORITHMS:
        _compare_critic(heads, target, mask=_mask((2, 2)), config=_config(mode, **kw), algorithm=algorithm)


def test_critic_loss_recipe_ignores_consistent_params():
    """Recipe mode: params 9..11 (lo_scale, hi_scale, shift_expectile) do not change any output bit;
    in consistent mode each of them matters."""
    heads, target = _inputs((6,), 3, 40, 33, seed=31)
    taus = dvpo.taus(40)
    rw = ref.risk_weights(taus)
    mask = _mask((6,))
    for algorithm in ALGORITHMS:
        base = cpp.critic_loss(heads.view(6, 3, 40), target, taus, rw, mask, 1.0, 0.2, 0.3, False,
                               [1.0] * 8 + [0.0, 1.0, 1.0, 0.5], algorithm)
        for extra in ([0.3, 1.7, 0.9], [1.0, 1.0, 0.01]):
            out = cpp.critic_loss(heads.view(6, 3, 40), target, taus, rw, mask, 1.0, 0.2, 0.3, False,
                                  [1.0] * 8 + [0.0] + extra, algorithm)
            assert all(torch.equal(a, b) for a, b in zip(base, out))
        cons = cpp.critic_loss(heads.view(6, 3, 40), target, taus, rw, mask, 1.0, 0.2, 0.3, False,
                               [1.0] * 8 + [1.0, 1.0, 1.0, 0.5], algorithm)
        for k, changed in ((9, 0.5), (10, 1.5), (11, 0.8)):
            p = [1.0] * 8 + [1.0, 1.0, 1.0, 0.5]
            p[k] = changed
            out = cpp.critic_loss(heads.view(6, 3, 40), target, taus, rw, mask, 1.0, 0.2, 0.3, False, p, algorithm)
            assert not torch.equal(out[1], cons[1]), PARAM_NAMES[k]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_critic_loss_consistent_fixed_point(algorithm):
    """Consistent mode, symmetric scales: a target equal to theta (alpha N, beta N integers) is the
    fixed point of every tail term: the R-U targets reproduce theta's own CVaR and tail moments."""
    g = torch.Generator().manual_seed(32)
    theta = torch.randn(4, 1, 40, generator=g, dtype=torch.float64)
    target = theta[:, 0, torch.randperm(40, generator=g)]
    config = CriticLossConfig.symmetric(alpha=0.2, beta=0.25, qh=0.0, risk=0.0, curv=0.0)
    _, out = _critic_cpp(theta, target, config=config, algorithm=algorithm)
    for name in ("cvar", "gain", "shift", "shape"):
        assert out.terms[name].abs().max() < 1e-24, name


def test_critic_loss_params_checked():
    heads, target = _inputs((2,), 1, 5, 6, seed=33)
    taus = dvpo.taus(5)
    args = (heads, target, taus, ref.risk_weights(taus), None, 1.0, 0.1, 0.1, False)
    for params, msg in (([1.0] * 8, "12 params"), ([1.0] * 8 + [0.5, 1.0, 1.0, 0.5], "tail_mode"),
                        ([1.0] * 8 + [1.0, 1.0, 1.0, 1.0], "shift_expectile"),
                        ([1.0] * 8 + [1.0, float("inf"), 1.0, 0.5], "lo_scale")):
        with pytest.raises(RuntimeError, match=msg):
            cpp.critic_loss(*args, params, "auto")


@pytest.mark.parametrize("mode", MODES)
def test_critic_loss_custom_taus_and_paper_grid(mode):
    heads, target = _inputs((4,), 2, 12, 10, seed=12)
    config = _config(mode)
    for taus in (dvpo.taus(12, "paper"), torch.sort(torch.rand(12)).values):
        for algorithm in ALGORITHMS:
            h, out = _critic_cpp(heads, target, taus=taus, algorithm=algorithm, config=config)
            h64, exp = _critic_ref(heads, target, taus=taus, config=config)
            _check(out.loss, exp.loss, torch.float32, "loss")
            up = torch.ones(4)
            _check(_grad(out.loss, h, up), _grad(exp.loss, h64, up.double()), torch.float32, "grad")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_critic_loss_reductions(reduction, mode):
    heads, target = _inputs((3, 5), 3, 16, 12, seed=13)
    _compare_critic(heads, target, mask=_mask((3, 5)), config=_config(mode), reduction=reduction)


def test_critic_loss_single_head_theta():
    """theta [..., N] (no heads dim): same as H = 1."""
    heads, target = _inputs((2, 3), 1, 9, 11, seed=14)
    theta = heads.squeeze(-2)
    t = theta.clone().requires_grad_(True)
    out = ops.critic_loss(t, target, reduction="none")
    t64 = theta.double().requires_grad_(True)
    exp = ref.critic_loss(t64, target.double(), reduction="none")
    _check(out.loss, exp.loss, torch.float32, "loss")
    up = torch.ones(2, 3)
    _check(_grad(out.loss, t, up), _grad(exp.loss, t64, up.double()), torch.float32, "grad")


@pytest.mark.parametrize("mode", MODES)
def test_critic_loss_algorithms_agree_at_large_sizes(mode):
    """Sorted and pairwise agree with each other (and auto with one of them) at N = M = 1000."""
    heads, target = _inputs((2,), 2, 1000, 1000, seed=15)
    outs = {}
    for algorithm in ("pairwise", "sorted", "auto"):
        h, out = _critic_cpp(heads, target, algorithm=algorithm, config=_config(mode))
        outs[algorithm] = (out.loss, _grad(out.loss, h, torch.ones(2)))
    for k in range(2):
        _check(outs["sorted"][k], outs["pairwise"][k], torch.float32, "sorted~pairwise")
    assert cpp.auto_sorted(1000, 1000) and not cpp.auto_sorted(7, 7)
    assert torch.equal(outs["auto"][0], outs["sorted"][0])


# ---------------------------------------------------------------------------------------------
# Masks, NaN garbage, non-contiguous inputs, determinism, instruction sets
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_all_masked_batch_gives_zero(algorithm):
    heads, target = _inputs((2, 4), 3, 8, 8, seed=16)
    mask = torch.zeros(2, 4)
    for reduction in REDUCTIONS:
        h, out = _critic_cpp(heads, target, mask=mask, reduction=reduction, algorithm=algorithm)
        assert torch.count_nonzero(out.loss) == 0
        g = _grad(out.loss, h, torch.ones(()) if out.loss.dim() == 0 else torch.ones(2, 4))
        assert torch.isfinite(g).all() and torch.count_nonzero(g) == 0
        pred = heads[..., 0, :].clone().requires_grad_(True)
        qh = ops.quantile_huber(pred, target, mask=mask, reduction=reduction, algorithm=algorithm)
        assert torch.count_nonzero(qh) == 0
        gq = _grad(qh, pred, torch.ones(()) if qh.dim() == 0 else torch.ones(2, 4))
        assert torch.isfinite(gq).all() and torch.count_nonzero(gq) == 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_nan_at_masked_tokens_does_not_leak(algorithm, mode):
    lead = (3, 4)
    heads, target = _inputs(lead, 3, 10, 12, seed=18)
    mask = _mask(lead, seed=1)
    masked = mask == 0
    dirty_h, dirty_t = heads.clone(), target.clone()
    dirty_h[masked] = float("nan")
    dirty_t[masked] = float("inf")
    config = _config(mode)
    h1, clean = _critic_cpp(heads, target, mask=mask, algorithm=algorithm, config=config)
    h2, dirty = _critic_cpp(dirty_h, dirty_t, mask=mask, algorithm=algorithm, config=config)
    assert torch.equal(clean.loss, dirty.loss)
    for name in TERM_NAMES:
        assert torch.equal(clean.terms[name], dirty.terms[name])
    up = torch.ones(lead)
    g1, g2 = _grad(clean.loss, h1, up), _grad(dirty.loss, h2, up)
    assert torch.equal(g1, g2) and torch.isfinite(g2).all()
    assert torch.count_nonzero(g2[masked]) == 0 and torch.count_nonzero(dirty.loss[masked]) == 0
    # quantile Huber alone
    p_clean = heads[..., 1, :].clone().requires_grad_(True)
    p_dirty = dirty_h[..., 1, :].clone().requires_grad_(True)
    q1 = ops.quantile_huber(p_clean, target, mask=mask, reduction="none", algorithm=algorithm)
    q2 = ops.quantile_huber(p_dirty, dirty_t, mask=mask, reduction="none", algorithm=algorithm)
    assert torch.equal(q1, q2)
    assert torch.equal(_grad(q1, p_clean, up), _grad(q2, p_dirty, up))


@pytest.mark.parametrize("mode", MODES)
def test_non_finite_unmasked_tokens_give_nan(mode):
    """A real token with a non-finite input: NaN for its total, computed terms and gradient (defined
    behaviour); other tokens are unaffected."""
    heads, target = _inputs((3,), 2, 6, 5, seed=19)
    dirty = target.clone()
    dirty[1, 2] = float("inf")
    h, out = _critic_cpp(heads, dirty, config=_config(mode, curv=0.0))
    _, clean = _critic_cpp(heads, target, config=_config(mode, curv=0.0))
    assert torch.isnan(out.loss[1]) and torch.equal(out.loss[[0, 2]], clean.loss[[0, 2]])
    assert torch.count_nonzero(out.terms["curv"]) == 0
    g = _grad(out.loss, h, torch.tensor([1.0, 0.0, 1.0]))
    assert torch.isfinite(g[[0, 2]]).all()


def test_non_contiguous_inputs():
    base_h = torch.randn(4, 3, 9, 2, 11)
    base_t = torch.randn(13, 4, 3)
    heads = base_h[:, :, ::4, 0, :][..., :2, :]  # [4, 3, 2, 11], strided
    target = base_t.permute(1, 2, 0)  # [4, 3, 13], non-contiguous
    assert not heads.is_contiguous() and not target.is_contiguous()
    mask = _mask((4, 3))[:, :]
    mask_nc = torch.stack([mask, mask], -1)[..., 0]
    for algorithm, mode in zip(ALGORITHMS + ALGORITHMS, MODES + MODES[::-1]):
        config = _config(mode)
        h1, a = _critic_cpp(heads, target, mask=mask_nc, algorithm=algorithm, config=config)
        h2, b = _critic_cpp(heads.contiguous(), target.contiguous(), mask=mask, algorithm=algorithm, config=config)
        assert torch.equal(a.loss, b.loss)
        up = torch.ones(4, 3)
        assert torch.equal(_grad(a.loss, h1, up), _grad(b.loss, h2, up))
        _compare_critic(heads, target, mask=mask_nc, algorithm=algorithm, config=config)
    pred = base_h[:, :, 1, 1, :]
    q1 = ops.quantile_huber(pred, target, reduction="none")
    q2 = ops.quantile_huber(pred.contiguous(), target.contiguous(), reduction="none")
    assert torch.equal(q1, q2)
    x = base_t.transpose(0, 2)
    assert torch.equal(ops.cvar(x, 0.3), ops.cvar(x.contiguous(), 0.3))


def test_deterministic_across_runs_and_threads():
    heads, target = _inputs((64,), 3, 40, 50, seed=20)
    mask = _mask((64,))
    threads = torch.get_num_threads()
    results = []
    try:
        for n_threads in (1, max(2, threads)):
            torch.set_num_threads(n_threads)
            for algorithm in ALGORITHMS:
                for mode in MODES:
                    h, out = _critic_cpp(heads, target, mask=mask, algorithm=algorithm, config=_config(mode))
                    results.append(((algorithm, mode), out.loss, _grad(out.loss, h, torch.ones(64))))
    finally:
        torch.set_num_threads(threads)
    for key in {r[0] for r in results}:
        runs = [r for r in results if r[0] == key]
        for other in runs[1:]:
            assert torch.equal(runs[0][1], other[1]) and torch.equal(runs[0][2], other[2])


@pytest.mark.parametrize("isa", ISAS)
def test_every_instruction_set_variant(isa, monkeypatch):
    """Each compiled variant (DVPO_CPU_ISA caps the dispatch) meets the bar on every op."""
    monkeypatch.setenv("DVPO_CPU_ISA", isa)
    assert cpp.isa() == isa
    for n, m, h in [(7, 32, 3), (64, 257, 2), (1, 2, 1)]:
        heads, target = _inputs((2, 2), h, n, m, seed=n)
        for algorithm in ALGORITHMS:
            for mode in MODES:
                _compare_critic(heads, target, mask=_mask((2, 2)), config=_config(mode), algorithm=algorithm,
                                what=f"[{isa}]")
        pred = heads[..., 0, :].clone().requires_grad_(True)
        q = ops.quantile_huber(pred, target, kappa=0.5, reduction="none")
        p64 = pred.detach().double().requires_grad_(True)
        q64 = ref.quantile_huber(p64, target.double(), kappa=0.5, reduction="none")
        _check(q, q64, torch.float32, f"qh[{isa}]")
        _check(_grad(q, pred, torch.ones(2, 2)), _grad(q64, p64, torch.ones(2, 2).double()), torch.float32,
               f"qh grad[{isa}]")
        for upper in (False, True):
            _check(ops.cvar(heads[..., 0, :], 0.3, upper=upper), ref.cvar(heads[..., 0, :].double(), 0.3, upper=upper),
                   torch.float32, f"cvar[{isa}]")
    rewards, values, mask = torch.randn(3, 9), torch.randn(3, 9, 300), _mask((3, 9))
    adv, ret = ops.distributional_gae(rewards, values, mask, gamma=0.99, lam=0.9)
    adv64, ret64 = ref.distributional_gae(rewards.double(), values.double(), mask, gamma=0.99, lam=0.9)
    _check(adv, adv64, torch.float32, f"gae[{isa}]")
    _check(ret, ret64, torch.float32, f"gae[{isa}]")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("objdump") is None,
                    reason="needs an x86-64 build and objdump")
def test_wide_instructions_only_in_isa_variants():
    """Wheel safety: only the per-ISA entry points (`*_avx2`, `*_avx512`, chosen at run time from the
    CPU's features) contain AVX instructions; everything else in dvpo._C, the baseline variants
    included, is plain x86-64, so an older CPU never meets an instruction it lacks."""
    import dvpo._C as ext
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", ext.__file__], capture_output=True,
                          text=True, check=True).stdout
    wide, current = set(), None
    for line in text.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            current = head.group(1)
            continue
        ins = line.split("\t")[-1].strip()
        if current and (re.match(r"v[a-z]", ins) or "ymm" in ins or "zmm" in ins):
            wide.add(current)
    variants = {f for f in wide if re.search(r"_avx(2|512)\b", f)}
    assert wide - variants == set(), sorted(wide - variants)[:5]
    assert len(variants) >= 8  # four ops x (float, double), for each wide ISA


# ---------------------------------------------------------------------------------------------
# Quantile Huber
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,m", [(1, 1), (2, 7), (3, 200), (7, 3), (32, 32), (200, 257), (257, 1)])
def test_quantile_huber_matches_reference(n, m, dtype, algorithm):
    lead = (2, 3)
    heads, target = _inputs(lead, 1, n, m, dtype, seed=n + 31 * m)
    pred = heads[..., 0, :].clone().requires_grad_(True)
    weights = ref.risk_weights(dvpo.taus(n), 1.5)
    mask = _mask(lead, weights=True)
    for kw in (dict(), dict(kappa=0.4, weights=weights, normalize_kappa=True)):
        out = ops.quantile_huber(pred, target, mask=mask, reduction="none", algorithm=algorithm, **kw)
        p64 = pred.detach().double().requires_grad_(True)
        kw64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
        exp = ref.quantile_huber(p64, target.double(), mask=mask, reduction="none", **kw64)
        _check(out, exp, dtype, "qh loss")
        up = torch.rand(lead) + 0.5
        g = _grad(out, pred, up.to(out.dtype))
        assert g.dtype == dtype
        _check(g, _grad(exp, p64, up.double()), dtype, "qh grad")


@pytest.mark.parametrize("n,m", [(5, 9), (64, 33), (200, 200)])
def test_quantile_huber_ties_and_boundaries(n, m):
    """Targets exactly at theta and at theta +- kappa (the region boundaries of the sorted algorithm)."""
    g = torch.Generator().manual_seed(21)
    pred = torch.round(torch.randn(3, n, generator=g, dtype=torch.float64) * 4) / 4
    offsets = torch.tensor([0.0, 1.0, -1.0, 0.5, -0.5, 0.25])
    target = pred[:, torch.randint(0, n, (m,), generator=g)] + offsets[torch.randint(0, 6, (m,), generator=g)]
    for dtype in (torch.float32, torch.float64):
        p, z = pred.to(dtype), target.to(dtype)
        for algorithm in ALGORITHMS:
            for kappa in (1.0, 0.5):
                pr = p.clone().requires_grad_(True)
                out = ops.quantile_huber(pr, z, kappa=kappa, reduction="none", algorithm=algorithm)
                p64 = p.double().requires_grad_(True)
                exp = ref.quantile_huber(p64, z.double(), kappa=kappa, reduction="none")
                _check(out, exp, dtype, "qh loss")
                _check(_grad(out, pr, torch.ones(3)), _grad(exp, p64, torch.ones(3).double()), dtype, "qh grad")


def test_quantile_huber_large_offsets_sorted_accuracy():
    """Sorted algorithm with theta far from the targets (centred sums must not cancel)."""
    g = torch.Generator().manual_seed(22)
    pred = torch.randn(4, 300, generator=g) * 0.3 + 40.0
    target = torch.randn(4, 500, generator=g) * 0.3 + 40.5
    for kappa in (1.0, 0.05):
        outs = []
        for algorithm in ALGORITHMS:
            pr = pred.clone().requires_grad_(True)
            out = ops.quantile_huber(pr, target, kappa=kappa, reduction="none", algorithm=algorithm)
            outs.append((out, _grad(out, pr, torch.ones(4))))
        p64 = pred.double().requires_grad_(True)
        exp = ref.quantile_huber(p64, target.double(), kappa=kappa, reduction="none")
        g64 = _grad(exp, p64, torch.ones(4).double())
        for out, g in outs:
            _check(out, exp, torch.float32, "qh loss")
            _check(g, g64, torch.float32, "qh grad")


@pytest.mark.parametrize("kind", ["outlier", "constant", "lognormal", "two_clusters", "tiny_range"])
def test_sorted_algorithm_on_clustered_targets(kind):
    """Targets the sorted algorithm's bucket index rejects (a bucket over its window: outliers, a
    constant row, heavy tails, a range of a few ulps) take the radix-sort + binary-search path; rows
    of both kinds mixed in one batch. Both match the reference."""
    g = torch.Generator().manual_seed(29)
    m = 200
    target = torch.randn(6, m, generator=g, dtype=torch.float64)
    if kind == "outlier":
        target[::2, 7] = 1e6
    elif kind == "constant":
        target[::2] = 0.25
    elif kind == "lognormal":
        target[::2] = torch.exp(3 * target[::2])
    elif kind == "two_clusters":
        target[::2] = torch.where(target[::2] > 0, 1000.0, -1000.0) + target[::2] * 1e-3
    else:
        target[::2] = 1.0 + torch.randint(0, 4, (3, m), generator=g) * 2.0 ** -22
    pred = torch.randn(6, 40, generator=g, dtype=torch.float64)
    if kind == "two_clusters":
        pred = pred + target.mean(-1, keepdim=True)
    for dtype in (torch.float32, torch.float64):
        p, z = pred.to(dtype), target.to(dtype)
        for kappa in (1.0, 0.01):
            pr = p.clone().requires_grad_(True)
            out = ops.quantile_huber(pr, z, kappa=kappa, reduction="none", algorithm="sorted")
            p64 = p.double().requires_grad_(True)
            exp = ref.quantile_huber(p64, z.double(), kappa=kappa, reduction="none")
            _check(out, exp, dtype, "qh loss")
            _check(_grad(out, pr, torch.ones(6)), _grad(exp, p64, torch.ones(6).double()), dtype, "qh grad")
        if dtype == torch.float32:
            heads = torch.stack([p, p + 0.1, p - 0.3], -2)
            for mode in MODES:
                _compare_critic(heads, z, algorithm="sorted", config=_config(mode), dtype=dtype)


def test_quantile_huber_matches_reference_backend():
    """Against the reference backend's kernel interface directly (same outputs, same dtypes)."""
    g = torch.Generator().manual_seed(23)
    pred, target = torch.randn(6, 13, generator=g), torch.randn(6, 21, generator=g)
    taus, mask = dvpo.taus(13), _mask((6,))
    for algorithm in ("auto", "pairwise", "sorted"):
        a = cpp.quantile_huber(pred, target, taus, None, mask, 1.0, False, algorithm)
        b = ref_backend.quantile_huber(pred, target, taus, None, mask, 1.0, False, algorithm)
        for x, y in zip(a, b):
            assert x.dtype == y.dtype and x.shape == y.shape
            _check(x, y, torch.float32, "qh vs ref backend")


# ---------------------------------------------------------------------------------------------
# CVaR
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 32, 200, 257])
def test_cvar_matches_reference(n, dtype):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(4, 3, n, generator=g, dtype=torch.float64).to(dtype)
    for level in (0.05, 0.1, 0.37, 0.5, 1.0):
        for upper in (False, True):
            xr = x.clone().requires_grad_(True)
            out = ops.cvar(xr, level, upper=upper)
            x64 = x.double().requires_grad_(True)
            exp = ref.cvar(x64, level, upper=upper)
            _check(out, exp, dtype, "cvar")
            up = torch.rand(4, 3, generator=g) + 0.5
            gr = _grad(out, xr, up.to(out.dtype))
            assert gr.dtype == dtype
            _check(gr, _grad(exp, x64, up.double()), dtype, "cvar grad")


@pytest.mark.parametrize("n", [2, 5, 16, 200, 257])
def test_cvar_ties_exact_coefficients(n):
    """Heavy ties (and -0.0 next to +0.0): the coefficients equal the reference's exactly
    (ranks with the index tie-break, from the top for the upper tail)."""
    g = torch.Generator().manual_seed(n + 1)
    for dtype in (torch.float32, torch.float64):
        x = torch.randint(-2, 3, (6, n), generator=g).to(dtype) * 0.5
        x[0, : n // 2] = -0.0
        x[1] = 1.0
        levels = (0.1, 0.25, 0.5, 0.9, 1.0, 1.0 / n, 1.5 / n) if n < 100 else (0.1, 0.9, 1.5 / n)
        for level in levels:
            for upper in (False, True):
                value, coef = cpp.cvar(x, level, upper)
                ref_value, ref_coef = ref_backend.cvar(x, level, upper)
                assert torch.equal(coef, ref_coef), (level, upper)
                _check(value, ref_value, dtype, "cvar ties")


def test_cvar_unsorted_equals_sorted_definition():
    """The mean of the lowest alpha N atoms (boundary atom with its fraction) for any input order."""
    g = torch.Generator().manual_seed(24)
    x = torch.randn(50, 37, generator=g, dtype=torch.float64)
    for level in (0.1, 0.3, 0.77):
        a_n = level * 37
        full = int(a_n)
        s = torch.sort(x, -1).values
        expected = (s[:, :full].sum(-1) + (a_n - full) * s[:, full]) / a_n
        torch.testing.assert_close(ops.cvar(x, level), expected, rtol=1e-12, atol=1e-12)
        s_up = torch.sort(x, -1, descending=True).values
        expected_up = (s_up[:, :full].sum(-1) + (a_n - full) * s_up[:, full]) / a_n
        torch.testing.assert_close(ops.cvar(x, level, upper=True), expected_up, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ops.cvar(x, level, upper=True), -ops.cvar(-x, level), rtol=1e-12, atol=1e-12)


def test_cvar_extreme_values():
    """Values over many binades, infinities in other rows: the selection is exact (by bits)."""
    g = torch.Generator().manual_seed(25)
    x = torch.randn(8, 64, generator=g, dtype=torch.float64) * torch.logspace(-30, 30, 64, dtype=torch.float64)
    x = x.float()
    value, coef = cpp.cvar(x, 0.2, False)
    ref_value, ref_coef = ref_backend.cvar(x, 0.2, False)
    assert torch.equal(coef, ref_coef)
    y = x.clone()
    y[3, 5] = float("inf")
    y[4, 7] = float("nan")
    value2, coef2 = cpp.cvar(y, 0.2, False)
    assert torch.isnan(value2[[3, 4]]).all() and torch.isnan(coef2[[3, 4]]).all()
    keep = [0, 1, 2, 5, 6, 7]
    assert torch.equal(value2[keep], value[keep]) and torch.equal(coef2[keep], coef[keep])


# ---------------------------------------------------------------------------------------------
# Distributional GAE
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,t,m", [(1, 1, 1), (2, 7, 3), (3, 33, 257), (2, 5, 600)])
def test_distributional_gae_matches_reference(b, t, m, dtype):
    g = torch.Generator().manual_seed(b * t * m)
    rewards = torch.randn(b, t, generator=g).to(dtype)
    values = torch.randn(b, t, m, generator=g).to(dtype)
    mask = _mask((b, t))
    if t > 2:
        mask[:, -1] = 0  # trailing padding
        mask[0, 1] = 0   # a hole inside a sequence
    values[mask == 0] = float("nan")  # padding is never read
    rewards[mask == 0] = float("nan")
    for gamma, lam in ((1.0, 0.95), (0.9, 0.0), (0.99, 1.0)):
        adv, ret = ops.distributional_gae(rewards, values, mask, gamma=gamma, lam=lam)
        adv64, ret64 = ref.distributional_gae(rewards.double(), values.double(), mask, gamma=gamma, lam=lam)
        assert adv.shape == (b, t) and ret.shape == (b, t, m)
        assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
        _check(adv, adv64, dtype, "gae adv")
        _check(ret, ret64, dtype, "gae ret")
        assert torch.count_nonzero(ret[mask == 0]) == 0 and torch.count_nonzero(adv[mask == 0]) == 0


def test_distributional_gae_matches_reference_backend_and_bool_mask():
    g = torch.Generator().manual_seed(26)
    rewards = torch.randn(3, 8, generator=g)
    values = torch.randn(3, 5, 8, generator=g).transpose(1, 2)  # non-contiguous [3, 8, 5]
    mask = _mask((3, 8)) > 0
    a = ops.distributional_gae(rewards, values, mask, gamma=0.97, lam=0.9)
    b = ref_backend.distributional_gae(rewards, values, mask.float(), 0.97, 0.9)
    for x, y in zip(a, b):
        _check(x, y, torch.float32, "gae vs ref backend")


# ---------------------------------------------------------------------------------------------
# gradcheck (float64) and opcheck
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_gradcheck_float64(algorithm):
    """Finite differences: the recipe config, and the consistent config without its semi-gradient
    terms (cvar, gain, shape: their targets hang on theta's detached VaR, so their gradient is not
    the value's derivative; the expectile shift is an exact gradient and stays on). The full
    consistent gradient is compared with the autograd oracle below."""
    g = torch.Generator().manual_seed(27)
    heads = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 7, generator=g, dtype=torch.float64) * 1.5
    mask = torch.tensor([1.0, 0.5], dtype=torch.float64)
    for config in (CriticLossConfig.recipe(alpha=0.3, beta=0.4),
                   CriticLossConfig(alpha=0.3, beta=0.4, kappa=0.3, cvar=0.0, gain=0.0, shape=0.0,
                                    shift_expectile=0.7)):
        assert torch.autograd.gradcheck(
            lambda h: ops.critic_loss(h, target, mask=mask, config=config, algorithm=algorithm,
                                      reduction="none").loss, (heads,))
    pred = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(
        lambda p: ops.quantile_huber(p, target[:1].expand(3, 7), kappa=0.7, weights=w, normalize_kappa=True,
                                     algorithm=algorithm, reduction="none"), (pred,))
    x = torch.randn(3, 9, generator=g, dtype=torch.float64, requires_grad=True)
    for upper in (False, True):
        assert torch.autograd.gradcheck(lambda v: ops.cvar(v, 0.3, upper=upper), (x,))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_consistent_semi_gradient_float64(algorithm):
    """The full consistent gradient (VaR and targets held constant) equals the float64 autograd
    oracle's, which detaches them, to fp64 precision."""
    g = torch.Generator().manual_seed(34)
    heads = torch.randn(5, 3, 11, generator=g, dtype=torch.float64)
    target = torch.randn(5, 13, generator=g, dtype=torch.float64) * 1.5 + 0.3
    for config in (CriticLossConfig(alpha=0.3, beta=0.4, upper_expansion=0.5, shift_expectile=0.6),
                   CriticLossConfig(qh=0.0, risk=0.0, curv=0.0, consist=0.0, alpha=0.2, beta=0.2)):
        h, out = _critic_cpp(heads, target, config=config, algorithm=algorithm)
        h64, exp = _critic_ref(heads, target, config=config)
        up = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
        assert rel_err(_grad(out.loss, h, up), _grad(exp.loss, h64, up)) < TOL[torch.float64]
        assert rel_err(out.loss, exp.loss) < TOL[torch.float64]


def test_opcheck():
    g = torch.Generator().manual_seed(28)
    heads, target = torch.randn(5, 3, 7, generator=g), torch.randn(5, 9, generator=g)
    taus = dvpo.taus(7)
    rw = ref.risk_weights(taus)
    mask = _mask((5,))
    pred = heads[:, 0].clone()
    cases = [
        (torch.ops.dvpo.quantile_huber.default,
         (pred.requires_grad_(True), target, taus, None, mask, 1.0, False, "pairwise")),
        (torch.ops.dvpo.quantile_huber.default, (pred, target, taus, rw, None, 0.5, True, "sorted")),
        (torch.ops.dvpo.cvar.default, (heads[:, 0].clone().requires_grad_(True), 0.2, True)),
        (torch.ops.dvpo.critic_loss.default, (heads.clone().requires_grad_(True), target, taus, rw, mask, 1.0, 0.1,
                                              0.2, False, CriticLossConfig.recipe().kernel_params(), "pairwise")),
        (torch.ops.dvpo.critic_loss.default, (heads.clone().requires_grad_(True), target, taus, rw, None, 1.0, 0.1,
                                              0.2, True, [1.0, 0.5, 0.0, 1.0, 1.0, 2.0, 1.0, 0.3, 0.0, 0.75, 1.0, 0.5],
                                              "sorted")),
        (torch.ops.dvpo.critic_loss.default, (heads.clone().requires_grad_(True), target, taus, rw, mask, 0.01, 0.1,
                                              0.2, True, CriticLossConfig().kernel_params(), "pairwise")),
        (torch.ops.dvpo.critic_loss.default, (heads.clone().requires_grad_(True), target, taus, rw, None, 1.0, 0.3,
                                              0.2, False, [1.0, 0.5, 1.0, 0.0, 1.0, 2.0, 1.0, 0.3, 1.0, 0.6, 1.5, 0.3],
                                              "sorted")),
        (torch.ops.dvpo.distributional_gae.default, (torch.randn(2, 5, generator=g), torch.randn(2, 5, 4, generator=g),
                                                     _mask((2, 5)), 0.99, 0.95)),
    ]
    for op, args in cases:
        assert dispatch.selected_name(op.name().split("::")[1], "cpu") == "cpp"
        torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------------------
# Property test over random shapes and levels
# ---------------------------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    t=st.integers(1, 4), h=st.integers(1, 4), n=st.integers(1, 40), m=st.integers(1, 40),
    alpha=st.floats(0.01, 1.0), beta=st.floats(0.01, 1.0), kappa=st.floats(0.05, 3.0),
    ties=st.booleans(), algorithm=st.sampled_from(["pairwise", "sorted", "auto"]),
    dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2 ** 16),
    mode=st.sampled_from(MODES), rho_lo=st.floats(0.0, 0.95), rho_hi=st.floats(0.0, 3.0),
    tau_s=st.floats(0.01, 0.99),
)
def test_property_random_shapes_and_levels(t, h, n, m, alpha, beta, kappa, ties, algorithm, dtype, seed, mode,
                                           rho_lo, rho_hi, tau_s):
    if ties:
        h = min(h, 2)  # keep the head mean exact (see _inputs)
    heads, target = _inputs((t,), h, n, m, dtype, ties=ties, seed=seed)
    config = _config(mode, alpha=alpha, beta=beta, kappa=kappa, lower_contraction=rho_lo, upper_expansion=rho_hi,
                     shift_expectile=tau_s)
    with _env(DVPO_BACKEND="cpp"):
        _compare_critic(heads, target, mask=_mask((t,), seed=seed), config=config, algorithm=algorithm)
        x = heads[..., 0, :]
        for upper, level in ((False, alpha), (True, beta)):
            value, coef = cpp.cvar(x, level, upper)
            ref_value, ref_coef = ref_backend.cvar(x, level, upper)
            assert torch.equal(coef, ref_coef)
