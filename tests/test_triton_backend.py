"""The `triton` backend (kernels/, through dvpo.backends.triton): what only it has. The op contract
(values and gradients against the float64 reference, masks, layouts, opcheck, torch.compile, ...)
runs on it in tests/test_quantile_huber.py, test_cvar.py, test_critic_loss.py and
test_distributional_gae.py: on CUDA with a GPU, else on CPU tensors in the Triton interpreter
(tests/conftest.py sets TRITON_INTERPRET=1) at small token counts.

Here: dispatch picks it and it implements the kernel interface; both CVaR threshold selects (rank
counting and the exact bisection select) forced at every size; rows beyond one tile and beyond the
rank-count limit; rows too long for registers fall back with a warning; no unexpected warnings; an
ahead-of-time compile for sm_90 without a GPU (DVPO_TEST_AOT=1); and, `gpu`-marked, realistic sizes.
"""

import os
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("triton", reason="the Triton backend needs the `triton` package (not importable here)")

from dvpo import dispatch, library, ops  # noqa: E402
from dvpo import reference as ref  # noqa: E402
from dvpo.backends import reference as ref_backend  # noqa: E402
from dvpo.config import TERM_NAMES, CriticLossConfig  # noqa: E402

from .utils import TOL, randn, random_mask, rel_err  # noqa: E402

pytestmark = pytest.mark.triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODES = ("consistent", "recipe")  # CriticLossConfig.tail_targets


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    if DEVICE == "cpu" and not dispatch.triton_interpreter():
        pytest.skip("no GPU and TRITON_INTERPRET is not set: Triton cannot run here")
    monkeypatch.setenv("DVPO_BACKEND", "triton")


@pytest.fixture(params=["rank", "bisect"])
def select(request, monkeypatch):
    """How the CVaR thresholds are found, forced at every size: "rank" (rank counting, what short
    rows use) or "bisect" (the exact bisection select, what long rows use)."""
    import dvpo.kernels._common as common
    monkeypatch.setattr(common, "RANK_SELECT_MAX", 1 << 20 if request.param == "rank" else 0)
    return request.param


def _ok(err, dtype, what, tol=None):
    """err < tol (the bar for `dtype` of docs/architecture.md, "Correctness bars", unless given)."""
    return err < (TOL[dtype] if tol is None else tol)


def _grad(loss, x, upstream=None):
    loss = loss if upstream is None else loss * upstream
    (g,) = torch.autograd.grad(loss.sum(), x)
    return g


def _inputs(lead, h, n, m, dtype, ties):
    """heads [..., H, N] (unsorted: quantiles cross) and target [..., M]. With ties, values on a grid
    that keeps the head mean exact in every precision (multiples of 0.75, so H = 3 gives multiples
    of 0.25): ties and kinks (relu at exactly 0) are then the same for the kernel and the reference."""
    heads = torch.randn(tuple(lead) + (h, n), dtype=torch.float64)
    target = torch.randn(tuple(lead) + (m,), dtype=torch.float64) * 1.5 + 0.2
    if ties:
        heads = torch.round(heads * 1.5) * 0.75
        target = torch.round(target * 2.0) * 0.25
    return heads.to(dtype=dtype, device=DEVICE), target.to(dtype=dtype, device=DEVICE)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_critic(heads, target, mask, cfg, reduction="none", tol=None):
    """ops.critic_loss (triton) vs autograd of dvpo.reference in float64 on the same rounded inputs:
    the (reduced) loss, every term, and the gradient w.r.t. the heads under a random upstream.
    Returns the triton output."""
    dtype = heads.dtype
    tol = TOL[dtype] if tol is None else tol
    x = heads.clone().requires_grad_()
    out = ops.critic_loss(x, target, mask=mask, config=cfg, reduction=reduction)
    h64 = heads.detach().double().requires_grad_()
    want = ref.critic_loss(h64, target.double(), mask=mask, config=cfg, reduction=reduction)
    up = torch.rand_like(want.loss) + 0.5
    g = _grad(out.loss, x, up.to(out.loss.dtype))
    g_want = _grad(want.loss, h64, up)
    assert out.loss.dtype == _acc(dtype) and g.dtype == dtype and g.shape == heads.shape
    errs = {"loss": rel_err(out.loss, want.loss), "grad": rel_err(g, g_want)}
    for name in TERM_NAMES:
        assert out.terms[name].shape == want.terms[name].shape
        errs[name] = rel_err(out.terms[name], want.terms[name])
    bad = {k: v for k, v in errs.items() if not _ok(v, dtype, "critic " + k, tol)}
    assert not bad, f"relative errors over {tol}: {bad}"
    return out


_SETTINGS = dict(kappa=0.7, alpha=0.2, beta=0.15, risk_gamma=2.0, consist=0.5, shape=2.0,
                 lower_contraction=0.3, upper_expansion=0.5, shift_expectile=0.7)


def _cfg(mode="consistent", **overrides):
    return CriticLossConfig(**dict(_SETTINGS, tail_targets=mode, **overrides))


_CFG = _cfg()


def test_dispatch_selects_the_triton_backend():
    assert dispatch.selected_name("critic_loss", DEVICE) == "triton"
    assert ops.backends(DEVICE)["triton"] == "available"


def test_backend_implements_the_kernel_interface():
    import inspect

    from dvpo.backends import triton as tri
    for op in ("quantile_huber", "cvar", "critic_loss", "distributional_gae"):
        assert list(inspect.signature(getattr(tri, op)).parameters) == \
            list(inspect.signature(getattr(ref_backend, op)).parameters), op


@pytest.mark.parametrize("n", [1, 2, 3, 7, 33])
@pytest.mark.parametrize("upper", [False, True])
def test_cvar_with_each_select(n, upper, select):
    for dtype, ties, levels in [(torch.float32, True, (0.05, 0.3, 1.0)), (torch.bfloat16, False, (0.3,))]:
        x = randn((3, 4, n), dtype, ties=ties, device=DEVICE)
        x[0, 0] = 0.0
        if n > 1:
            x[0, 0, 0] = -0.0  # -0.0 and +0.0 tie
        for level in levels:
            xx = x.clone().requires_grad_()
            got = ops.cvar(xx, level, upper=upper)
            x64 = x.double().requires_grad_()
            want = ref.cvar(x64, level, upper=upper)
            assert got.shape == (3, 4)
            assert _ok(rel_err(got, want), dtype, "cvar")
            assert _ok(rel_err(_grad(got, xx), _grad(want, x64)), dtype, "cvar grad")


def test_cvar_heavy_ties_split_by_index(select):
    """Many atoms tied at the threshold: the boundary weight goes to the lowest indices (from either tail)."""
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 2.0, 1.0, 1.0]], device=DEVICE)
    for level, upper in [(0.35, False), (0.55, True), (0.5, False), (1.0, True)]:
        _, coef = library.cvar(x, level, upper)
        assert torch.equal(coef, ref.cvar_coefficients(x.double(), level, upper).float())


@pytest.mark.parametrize("h,n,m,ties", [(3, 7, 33, True), (1, 33, 3, False), (3, 3, 2, True)])
@pytest.mark.parametrize("mode", MODES)
def test_critic_loss_bisection_select(h, n, m, ties, select, mode):
    heads, target = _inputs((11,), h, n, m, torch.float32, ties)
    _check_critic(heads, target, random_mask((11,), device=DEVICE), _cfg(mode, alpha=0.3, beta=0.25))


@pytest.mark.parametrize("mode", MODES)
def test_critic_loss_large_rows(mode):
    """N, M beyond one tile and beyond the rank-count limit (the bisection select, several N tiles;
    a long target row for the consistent mode's one pass over it)."""
    heads, target = _inputs((2,), 2, 520, 40, torch.float32, ties=False)
    _check_critic(heads, target, None, _cfg(mode, alpha=0.05, beta=0.1))
    heads, target = _inputs((2,), 3, 40, 600, torch.float32, ties=True)
    _check_critic(heads, target, None, _cfg(mode, alpha=0.1, beta=0.05))


@pytest.mark.parametrize("mode", MODES)
def test_float64_is_computed_in_float64(select, mode):
    heads, target = _inputs((2, 3), 3, 7, 9, torch.float64, ties=True)
    mask = random_mask((2, 3), device=DEVICE)
    _check_critic(heads, target, mask, _cfg(mode), reduction="seq-mean-token-sum")
    heads, target = _inputs((2, 3), 2, 33, 5, torch.float64, ties=False)
    _check_critic(heads, target, mask, _cfg(mode, alpha=0.05, beta=0.3))
    x = torch.randn(4, 9, dtype=torch.float64, device=DEVICE)
    assert _ok(rel_err(ops.cvar(x, 0.3, upper=True), ref.cvar(x, 0.3, upper=True)), torch.float64, "cvar")
    got = ops.quantile_huber(x, x.flip(0), kappa=0.3)
    assert got.dtype == torch.float64
    assert _ok(rel_err(got, ref.quantile_huber(x, x.flip(0), kappa=0.3)), torch.float64, "qh loss")


def test_consistent_var_atom_ties_and_targets_at_the_var(select):
    """Many atoms of theta tied at the VaR (the boundary weight split by index, v their common value)
    and target atoms exactly at v (the kink of min(z - v, 0)): values and gradients as the reference."""
    theta = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 2.0, 1.0, 1.0],
                          [-0.0, 0.0, 0.0, 0.5, -1.0, 0.0, 2.0, 2.0, 2.0, 0.0],
                          [3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0]], device=DEVICE)
    heads = theta.unsqueeze(1).expand(3, 2, 10).contiguous()
    target = torch.tensor([[1.0, 1.0, 0.0, 2.5, -1.0, 1.0, 0.5],
                           [0.0, 2.0, -0.5, 2.0, 0.0, 1.0, 3.0],
                           [3.0, 2.0, 4.0, 3.0, 3.0, 3.5, 2.5]], device=DEVICE)
    for alpha, beta in [(0.35, 0.55), (0.5, 0.25), (0.05, 1.0), (1.0, 0.1)]:
        for cfg in (_cfg(alpha=alpha, beta=beta), _cfg(alpha=alpha, beta=beta, lower_contraction=0.0,
                                                       upper_expansion=0.0, shift_expectile=0.5)):
            _check_critic(heads, target, None, cfg)


def test_rows_too_long_for_registers_fall_back_with_a_warning(monkeypatch):
    import dvpo.kernels._common as common
    monkeypatch.setattr(common, "MAX_ROW", 16)
    x = randn((2, 17), device=DEVICE)
    with pytest.warns(RuntimeWarning, match="limit"):
        got = ops.cvar(x, 0.1)
    assert rel_err(got, ref.cvar(x.double(), 0.1)) < 1e-5
    heads, target = _inputs((2,), 1, 5, 17, torch.float32, ties=False)
    with pytest.warns(RuntimeWarning, match="limit"):
        _check_critic(heads, target, None, _CFG)


def test_no_unexpected_warnings():
    heads, target = _inputs((2, 3), 3, 5, 4, torch.float32, ties=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ops.critic_loss(heads, target)


# --------------------------------------------------------------------------- compile for H100 without a GPU

_AOT_SCRIPT = r"""
import importlib, triton, triton.language as tl
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget

def build(mod, ptrs, consts, warps):
    fn = importlib.import_module(mod).__dict__[ptrs.pop("_kernel")]
    fn = fn if isinstance(fn, triton.runtime.JITFunction) else fn.fn  # autotuned kernels wrap theirs
    sig = {}
    for i, name in enumerate(fn.arg_names):
        p = fn.params[i]
        sig[name] = "constexpr" if name in consts else ptrs.get(name) or p.annotation_type or "i32"
    triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": warps})

f32 = tl.float32
flags = {k: True for k in ("DO_QH", "DO_RISK", "DO_CVAR", "DO_GAIN", "DO_SHIFT", "DO_SHAPE", "DO_CURV",
                           "DO_CONSIST", "DO_LO", "DO_HI")}
crit = {n: "*fp32" for n in ("taus_ptr", "riskw_ptr", "mask_ptr", "total_ptr", "terms_ptr", "grad_ptr")}
# both tail modes (recipe 0, consistent 1: no target select, so RANK_M is off as the launcher sets it)
for mode, rank, npad, bt in ((0, False, 256, 1), (0, True, 32, 4), (1, False, 256, 1), (1, True, 32, 4)):
    build("dvpo.kernels.critic_loss", dict(crit, _kernel="_critic_loss_kernel", heads_ptr="*bf16", target_ptr="*bf16",
                                           grad_ptr="*bf16",  # the gradient in the input dtype
                                           mask_ptr="*i1" if rank else "*fp32"),  # bool masks as they come
          dict(TAIL_MODE=mode, HAS_MASK=True, **flags, RANK_N=rank, RANK_M=rank and mode == 0, IS_F64=False,
               ACC=f32, N_PAD=npad, M_PAD=npad, BLOCK_T=bt, BLOCK_N=16 if rank else 32, BLOCK_M=32 if rank else 64), 4)
build("dvpo.kernels.critic_loss", dict({n: "*fp64" for n in crit}, _kernel="_critic_loss_kernel", heads_ptr="*fp64",
      target_ptr="*fp64"), dict(TAIL_MODE=1, HAS_MASK=False, **flags, RANK_N=False, RANK_M=False, IS_F64=True,
      ACC=tl.float64, N_PAD=64, M_PAD=64, BLOCK_T=1, BLOCK_N=32, BLOCK_M=32), 4)
for mask_t, in_t in (("*fp32", "*fp32"), ("*i1", "*bf16")):  # float weights, a bool mask; bf16 in and grad
    build("dvpo.kernels.quantile_huber", {"_kernel": "_quantile_huber_kernel", **{n: "*fp32" for n in (
          "taus_ptr", "w_ptr", "loss_ptr")}, **{n: in_t for n in ("pred_ptr", "target_ptr", "grad_ptr")},
          "mask_ptr": mask_t}, dict(HAS_W=True, HAS_MASK=True, ACC=f32, BLOCK_T=1, BLOCK_N=32, BLOCK_M=64), 4)
build("dvpo.kernels.cvar", {"_kernel": "_cvar_kernel", "x_ptr": "*fp64", "value_ptr": "*fp64", "coef_ptr": "*fp64"},
      dict(UPPER=True, RANK=False, IS_F64=True, ACC=tl.float64, N_PAD=256, BLOCK_T=1), 4)
build("dvpo.kernels.cvar", {"_kernel": "_cvar_kernel", "x_ptr": "*fp16", "value_ptr": "*fp32", "coef_ptr": "*fp16"},
      dict(UPPER=False, RANK=True, IS_F64=False, ACC=f32, N_PAD=32, BLOCK_T=4), 4)
for mask_t in ("*fp32", "*i1"):
    build("dvpo.kernels.distributional_gae", {"_kernel": "_gae_kernel", **{n: "*fp32" for n in (
          "r_ptr", "v_ptr", "adv_ptr", "ret_ptr")}, "mask_ptr": mask_t}, dict(ACC=f32, BLOCK_B=1, BLOCK_M=32), 1)
for red in (0, 1, 2):  # token-mean and the two sequence reductions; a bool mask, float weights, none
    for mask_t, has_mask in (("*i1", True), ("*fp32", True), ("*bf16", False)):
        build("dvpo.kernels.reduce_tokens", {"_kernel": "_reduce_tokens_kernel", "v_ptr": "*bf16", "m_ptr": mask_t,
              "loss_ptr": "*fp32", "w_ptr": "*fp32"}, dict(HAS_MASK=has_mask, RED=red, BLOCK_R=16, BLOCK_S=256), 8)
print("compiled")
"""


@pytest.mark.skipif(os.environ.get("DVPO_TEST_AOT", "0") in ("", "0"),
                    reason="set DVPO_TEST_AOT=1 to compile the kernels for sm_90 with Triton's bundled ptxas "
                           "(no GPU needed, ~30 s)")
def test_kernels_compile_for_h100():
    """The interpreter accepts code the compiler rejects: compile the main specializations to sm_90
    cubins (ahead of time, no GPU needed) in a process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]


# --------------------------------------------------------------------------- GPU, realistic sizes

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_realistic_sizes(dtype):
    """On CUDA (compiled kernels, autotuned): the fused critic loss at N = M = 200, H = 3 and the
    other ops at the odd sizes of docs/architecture.md ("Correctness bars"), against autograd of the
    float64 reference."""
    heads, target = _inputs((4, 256), 3, 200, 200, dtype, ties=False)
    mask = random_mask((4, 256), device=DEVICE)
    for reduction in ("token-mean", "none"):
        for cfg in (CriticLossConfig(), CriticLossConfig.recipe()):
            _check_critic(heads, target, mask, cfg, reduction=reduction)
    for mode in MODES:
        heads, target = _inputs((2, 64), 2, 257, 32, dtype, ties=True)
        _check_critic(heads, target, random_mask((2, 64), device=DEVICE), _cfg(mode))
        heads, target = _inputs((2, 16), 1, 1000, 700, dtype, ties=False)  # bisection select, many tiles
        _check_critic(heads, target, None, _cfg(mode))
    for n in (1, 2, 3, 7, 32, 200, 257, 600):
        x = randn((512, n), dtype, ties=True, device=DEVICE)
        for upper in (False, True):
            xx = x.clone().requires_grad_()
            got = ops.cvar(xx, 0.1, upper=upper)
            x64 = x.double().requires_grad_()
            want = ref.cvar(x64, 0.1, upper=upper)
            assert rel_err(got, want) < TOL[dtype] and rel_err(_grad(got, xx), _grad(want, x64)) < TOL[dtype]
    rewards, values = randn((16, 1024), device=DEVICE), randn((16, 1024, 200), dtype, device=DEVICE)
    mask = random_mask((16, 1024), device=DEVICE)
    adv, ret = ops.distributional_gae(rewards, values, mask)
    want_adv, want_ret = ref.distributional_gae(rewards.double(), values.double(), mask)
    assert rel_err(adv, want_adv) < 1e-5 and rel_err(ret, want_ret) < 1e-5


@pytest.mark.gpu
def test_gpu_quantile_huber_realistic_sizes():
    for dtype in (torch.float32, torch.bfloat16):
        for n, m in [(200, 200), (257, 7), (1, 257), (32, 1000)]:
            pred = randn((4, 128, n), dtype, device=DEVICE)
            target = randn((4, 128, m), dtype, scale=2.0, device=DEVICE)
            mask = random_mask((4, 128), device=DEVICE)
            x = pred.clone().requires_grad_()
            got = ops.quantile_huber(x, target, mask=mask, kappa=0.5)
            x64 = pred.double().requires_grad_()
            want = ref.quantile_huber(x64, target.double(), mask=mask, kappa=0.5)
            assert rel_err(got, want) < TOL[dtype]
            assert rel_err(_grad(got, x), _grad(want, x64)) < TOL[dtype]
