"""The `cpp` backend (csrc/cpu, through dvpo.backends.cpp): what only it has. The op contract (values
and gradients against the float64 reference, both pair algorithms, masks, layouts, opcheck,
torch.compile, ...) runs on it in tests/test_quantile_huber.py, test_cvar.py, test_critic_loss.py and
test_distributional_gae.py.

Here: the build is current (every op has a CPU kernel); automatic dispatch picks it on CPU; the
sorted and pairwise algorithms agree at large sizes and `auto` follows the cost model; the sorted
algorithm's accuracy far from the targets and on targets its bucket index rejects; determinism
across thread counts; every instruction-set variant this CPU has; no wide instructions outside the
per-ISA variants; CVaR's exact selection over many binades and with non-finite rows.
"""

import platform
import re
import shutil
import subprocess

import pytest
import torch

from dvpo import dispatch, ops
from dvpo import reference as ref
from dvpo.backends import reference as ref_backend
from dvpo.config import TERM_NAMES, CriticLossConfig

from .utils import TOL, rel_err

# setup.py always builds dvpo._C: a missing or stale extension is a failure here, never a skip.
from dvpo.backends import cpp  # noqa: E402

assert cpp.isa() != "unknown" and len(cpp.OPS) >= 4, (
    "dvpo._C is older than csrc/cpu (some ops have no CPU kernel): rebuild it with "
    "`python setup.py build_ext --inplace` or `pip install --no-build-isolation -e .`")

ALGORITHMS = ["pairwise", "sorted"]
MODES = ["consistent", "recipe"]  # the tail-term modes (config.tail_targets)
# Instruction-set variants this CPU can run (the kernels are compiled for each; DVPO_CPU_ISA caps).
_ISA_ORDER = ["baseline", "avx2", "avx512"]
ISAS = _ISA_ORDER[: _ISA_ORDER.index(cpp.isa(detected=True)) + 1]


@pytest.fixture(autouse=True)
def _cpp_backend(monkeypatch):
    monkeypatch.setenv("DVPO_BACKEND", "cpp")
    monkeypatch.delenv("DVPO_CPU_ISA", raising=False)


def _check(out, expected, dtype, what, tol=None):
    """rel_err(out, expected) < tol (unless given, the bar for `dtype` of docs/architecture.md,
    "Correctness bars")."""
    err = rel_err(out, expected)
    tol = TOL[dtype] if tol is None else tol
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


def test_automatic_dispatch_picks_cpp_on_cpu(monkeypatch):
    monkeypatch.delenv("DVPO_BACKEND", raising=False)
    for op in ("quantile_huber", "cvar", "critic_loss", "distributional_gae"):
        assert dispatch.selected_name(op, "cpu") == "cpp", op


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
    """Each compiled variant (DVPO_CPU_ISA caps the dispatch) meets the bar on every op. N = 40 and 57
    leave remainders of one and of two vectors after the avx512 pair pass's 32-atom blocks."""
    monkeypatch.setenv("DVPO_CPU_ISA", isa)
    assert cpp.isa() == isa
    for n, m, h in [(7, 32, 3), (64, 257, 2), (40, 65, 2), (57, 130, 1), (1, 2, 1)]:
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
