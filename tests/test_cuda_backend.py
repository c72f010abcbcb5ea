"""The `cuda` backend (csrc/cuda, through dvpo.backends.cuda) against the float64 reference.

Three groups:
  * `TestCudaBackend` (gpu-marked, skipped without a GPU): DVPO_BACKEND=cuda through dvpo.ops, every
    op forward and backward, N, M in {1, 2, 3, 7, 32, 200, 257}, H in {1, 3, 5}, fp32/bf16/fp16
    (fp64 computed in fp64), both tail-term modes of the critic loss (the default "consistent"
    config and CriticLossConfig.recipe()), ties, crossing quantiles, masks with empty rows, garbage in masked
    tokens, zero tokens, the large-size shared-memory fallbacks, bitwise determinism, gradcheck,
    opcheck and torch.compile(fullgraph) forward + backward.
  * CPU: the kernel files (csrc/cuda/*.cu, *.cuh and the launcher header) include no torch header.
  * CPU, emulated: the unmodified kernel sources built with g++ against a host emulation of the
    CUDA execution model (csrc/cuda/emu: one fiber per CUDA thread, warp collectives as barriers)
    and the binding compiled against stub c10/cuda headers, run against the reference. This checks
    the kernels' logic (indexing, warp-cooperative selects, tie ranks, reductions, scratch layouts,
    the fallbacks, the chunked GAE scan) on machines without a GPU; it cannot check timing, memory
    ordering across real concurrent warps, or nvcc's code generation. Needs the CUDA headers, g++
    and ninja (skipped otherwise); DVPO_SKIP_CUDA_EMU=1 skips it (the build takes a few minutes).
"""

import hashlib
import os
import pathlib
import re
import shutil
import tempfile

import pytest
import torch

import dvpo
from dvpo import dispatch, library, ops
from dvpo import reference as ref
from dvpo.backends import reference as ref_backend
from dvpo.config import PARAM_NAMES, TERM_NAMES, CriticLossConfig

from .utils import SIZES, TOL, critic_inputs, randn, random_mask, rel_err

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_SRC = ROOT / "csrc" / "cuda"
REDUCTIONS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "none"]
ALL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss.sum(), x)
    return g


def _ref_critic(heads, target, **kw):
    """Loss, terms and gradient of the float64 reference on the same (rounded) inputs."""
    h = heads.detach().double().requires_grad_()
    out = ref.critic_loss(h, target.double(), **kw)
    return out, _grad(out.loss, h)


# =============================================================================================== GPU

# fp32 and bf16 on every (N, M) in SIZES x SIZES, H in {1, 3, 5}, with and without ties; fp16 and
# fp64 on a subset of the shapes.
_CRITIC_CASES = [(d, n, m, h, t) for d in (torch.float32, torch.bfloat16) for n in SIZES for m in SIZES
                 for h in (1, 3, 5) for t in (False, True)]
_CRITIC_CASES += [(d, n, m, h, t) for d in (torch.float16, torch.float64)
                  for n, m in ((1, 1), (3, 2), (7, 7), (200, 200), (257, 32)) for h in (1, 3, 5) for t in (False, True)]

# Both tail-term modes: the consistent form (the default; asymmetric scalars switched on) and the
# published recipe.
_MODE_CONFIGS = {
    "consistent": dict(lower_contraction=0.25, upper_expansion=0.3, shift_expectile=0.7),
    "recipe": dict(tail_targets="recipe"),
}


def _config(mode, **kw):
    return CriticLossConfig(**_MODE_CONFIGS[mode], **kw)


@pytest.fixture
def cuda_backend(monkeypatch):
    status = dispatch.backends("cuda")["cuda"]
    if status != "available":
        if os.environ.get("DVPO_REQUIRE_CUDA_BACKEND", "0") not in ("", "0"):
            pytest.fail(f"the CUDA backend is not available: {status}")
        pytest.skip(f"the CUDA backend is not available: {status}")
    monkeypatch.setenv("DVPO_BACKEND", "cuda")
    return "cuda"


@pytest.mark.usefixtures("cuda_backend")
class TestCudaBackend:
    pytestmark = pytest.mark.gpu

    # ------------------------------------------------------------------------- exactness

    @pytest.mark.parametrize("mode", sorted(_MODE_CONFIGS))
    @pytest.mark.parametrize("dtype,n,m,h,ties", _CRITIC_CASES)
    def test_critic_loss_matches_reference(self, dtype, n, m, h, ties, mode):
        heads, target = critic_inputs((3, 5), h, n, m, dtype, ties=ties, device="cuda")
        mask = random_mask((3, 5), device="cuda")
        cfg = _config(mode, kappa=0.7, alpha=0.2, beta=0.15, risk_gamma=2.0)
        single = h == 1  # one head: pass theta as [..., N]
        x = heads.clone().requires_grad_()
        theta, ref_heads = (x[..., 0, :], heads[..., 0, :]) if single else (x, heads)
        for reduction in ("none", "seq-mean-token-mean"):
            out = ops.critic_loss(theta, target, mask=mask, config=cfg, reduction=reduction)
            want, want_grad = _ref_critic(ref_heads, target, mask=mask, config=cfg, reduction=reduction)
            g = _grad(out.loss, x)
            if single:
                g = g[..., 0, :]
            assert out.loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            assert g.dtype == dtype
            assert rel_err(out.loss, want.loss) < TOL[dtype]
            assert rel_err(g, want_grad) < TOL[dtype]
            for name in TERM_NAMES:
                assert out.terms[name].shape == (3, 5)
                assert rel_err(out.terms[name], want.terms[name]) < TOL[dtype], name

    @pytest.mark.parametrize("config", ["default", "recipe()"])
    def test_critic_loss_default_and_recipe_configs(self, config):
        """The default config (consistent tails) and CriticLossConfig.recipe() as they are."""
        heads, target = critic_inputs((4, 6), 3, 50, 64, torch.float32, device="cuda")
        mask = random_mask((4, 6), device="cuda")
        cfg = CriticLossConfig() if config == "default" else CriticLossConfig.recipe()
        x = heads.clone().requires_grad_()
        out = ops.critic_loss(x, target, mask=mask, config=cfg)
        want, want_grad = _ref_critic(heads, target, mask=mask, config=cfg)
        assert rel_err(out.loss, want.loss) < 1e-5
        assert rel_err(_grad(out.loss, x), want_grad) < 1e-5
        for name in TERM_NAMES:
            assert rel_err(out.terms[name], want.terms[name]) < 1e-5, name

    @pytest.mark.parametrize("mode", sorted(_MODE_CONFIGS))
    @pytest.mark.parametrize("off", TERM_NAMES)
    def test_critic_loss_each_weight_off(self, off, mode):
        heads, target = critic_inputs((4, 6), 3, 33, 40, torch.float32, device="cuda")
        cfg = _config(mode, **{off: 0.0, "alpha": 0.3, "normalize_kappa": True})
        x = heads.clone().requires_grad_()
        out = ops.critic_loss(x, target, config=cfg)
        want, want_grad = _ref_critic(heads, target, config=cfg)
        assert rel_err(out.loss, want.loss) < 1e-5
        assert rel_err(_grad(out.loss, x), want_grad) < 1e-5
        assert torch.all(out.terms[off] == 0)

    @pytest.mark.parametrize("m", SIZES)
    @pytest.mark.parametrize("n", SIZES)
    @pytest.mark.parametrize("dtype", ALL_DTYPES)
    def test_quantile_huber_matches_reference(self, dtype, n, m):
        pred = randn((4, 3, n), dtype, ties=True, device="cuda")
        target = randn((4, 3, m), dtype, scale=2.0, ties=True, device="cuda")
        mask = random_mask((4, 3), device="cuda")
        t = dvpo.taus(n, "paper", dtype=torch.float64, device="cuda")
        w = torch.rand(n, dtype=torch.float64, device="cuda") + 0.5
        for kw in [dict(), dict(kappa=0.4, normalize_kappa=True, weights=w), dict(kappa=3.0, weights=w)]:
            for reduction in ("none", "token-mean"):
                x = pred.clone().requires_grad_()
                got = ops.quantile_huber(x, target, t, mask=mask, reduction=reduction, **kw)
                x64 = pred.double().requires_grad_()
                want = ref.quantile_huber(x64, target.double(), t, mask=mask, reduction=reduction, **kw)
                assert rel_err(got, want) < TOL[dtype]
                assert rel_err(_grad(got, x), _grad(want, x64)) < TOL[dtype]

    @pytest.mark.parametrize("ties", [False, True])
    @pytest.mark.parametrize("upper", [False, True])
    @pytest.mark.parametrize("n", SIZES)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
    def test_cvar_matches_reference(self, dtype, n, upper, ties):
        x = randn((5, 2, n), dtype, ties=ties, device="cuda")
        if ties and n > 2:
            x[0, 0, :2] = torch.tensor([0.0, -0.0])  # -0 and +0 tie (ranked by index)
        for level in (0.01, 0.1, 0.37, 0.5, 1.0):
            xx = x.clone().requires_grad_()
            got = ops.cvar(xx, level, upper=upper)
            x64 = x.double().requires_grad_()
            want = ref.cvar(x64, level, upper=upper)
            assert got.shape == (5, 2)
            assert rel_err(got, want) < TOL[dtype]
            assert rel_err(_grad(got, xx), _grad(want, x64)) < TOL[dtype]

    @pytest.mark.parametrize("shape", [(1, 1, 1), (3, 11, 6), (2, 40, 33), (4, 300, 70), (2, 1100, 5), (2, 5000, 200)])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
    def test_distributional_gae_matches_reference(self, dtype, shape):
        b, t, m = shape
        rewards, values = randn((b, t), device="cuda"), randn((b, t, m), dtype, device="cuda")
        mask = random_mask((b, t), device="cuda")
        if t > 10:
            mask[-1, -5:] = False  # padding after the last real token
        for gamma, lam in ((1.0, 0.95), (0.99, 0.9), (0.5, 0.0)):
            adv, ret = ops.distributional_gae(rewards, values, mask, gamma=gamma, lam=lam)
            want_adv, want_ret = ref.distributional_gae(rewards.double(), values.double(), mask, gamma=gamma, lam=lam)
            assert adv.shape == (b, t) and ret.shape == (b, t, m)
            assert rel_err(adv, want_adv) < TOL[dtype] and rel_err(ret, want_ret) < TOL[dtype]

    # ------------------------------------------------------------------------- masks, layouts, sizes

    @pytest.mark.parametrize("mode", sorted(_MODE_CONFIGS))
    def test_masked_tokens_are_never_read(self, mode):
        heads, target = critic_inputs((3, 4), 3, 20, 17, torch.float32, device="cuda")
        mask = random_mask((3, 4), device="cuda")
        heads[~mask] = float("nan")
        target[~mask] = float("inf")
        x = heads.clone().requires_grad_()
        out = ops.critic_loss(x, target, mask=mask, reduction="none", config=_config(mode))
        g = _grad(out.loss, x)
        assert torch.isfinite(out.loss).all() and torch.isfinite(g).all()
        assert torch.all(out.loss[~mask] == 0) and torch.all(g[~mask] == 0)
        for name in TERM_NAMES:
            assert torch.all(out.terms[name][~mask] == 0)
        p = heads[..., 0, :].clone().requires_grad_()
        qh = ops.quantile_huber(p, target, mask=mask, reduction="none")
        gq = _grad(qh, p)
        assert torch.isfinite(qh).all() and torch.all(qh[~mask] == 0) and torch.all(gq[~mask] == 0)

    @pytest.mark.parametrize("reduction", REDUCTIONS)
    def test_all_masked_gives_zero(self, reduction):
        heads, target = critic_inputs((2, 3), 3, 7, 5, torch.float32, device="cuda")
        mask = torch.zeros(2, 3, dtype=torch.bool, device="cuda")
        x = heads.clone().requires_grad_()
        out = ops.critic_loss(x, target, mask=mask, reduction=reduction)
        assert torch.all(out.loss == 0)
        assert torch.all(_grad(out.loss, x) == 0)

    def test_zero_tokens(self):
        heads, target = critic_inputs((0, 4), 3, 7, 5, torch.float32, device="cuda")
        x = heads.clone().requires_grad_()
        out = ops.critic_loss(x, target, reduction="none")
        assert out.loss.shape == (0, 4)
        assert _grad(out.loss, x).shape == heads.shape
        assert ops.quantile_huber(heads[..., 0, :], target, reduction="none").shape == (0, 4)
        assert ops.cvar(heads, 0.2).shape == (0, 4, 3)
        adv, ret = ops.distributional_gae(torch.zeros(0, 4, device="cuda"), torch.zeros(0, 4, 3, device="cuda"),
                                          torch.ones(0, 4, device="cuda"))
        assert adv.shape == (0, 4) and ret.shape == (0, 4, 3)

    def test_non_contiguous_inputs(self):
        heads, target = critic_inputs((5, 4), 3, 9, 6, torch.float32, device="cuda")
        h_nc = heads.transpose(0, 1)  # [4, 5, H, N], not contiguous
        z_nc = target.transpose(0, 1)
        mask = random_mask((4, 5), device="cuda")
        x = h_nc.detach().requires_grad_()
        assert not x.is_contiguous()
        out = ops.critic_loss(x, z_nc, mask=mask, reduction="seq-mean-token-mean")
        want, want_grad = _ref_critic(h_nc, z_nc, mask=mask, reduction="seq-mean-token-mean")
        assert rel_err(out.loss, want.loss) < 1e-5
        assert rel_err(_grad(out.loss, x), want_grad) < 1e-5

    @pytest.mark.parametrize("mode", sorted(_MODE_CONFIGS))
    @pytest.mark.parametrize("n,m", [(1000, 1000), (2000, 20000), (3000, 30000)])
    def test_large_sizes(self, n, m, mode):
        """N=M=1000 (shared memory), then sizes past 48 KB (opt-in) and past the opt-in limit (global
        scratch); consistent mode keeps no target keys, so its per-token scratch is smaller."""
        heads, target = critic_inputs((2,), 2, n, m, torch.float32, device="cuda")
        cfg = _config(mode, kappa=1.0, normalize_kappa=False)
        x = heads.clone().requires_grad_()
        out = ops.critic_loss(x, target, reduction="none", config=cfg)
        g = _grad(out.loss, x)
        t = dvpo.taus(n, dtype=torch.float64, device="cuda")
        total, terms, grad = ref_backend.critic_loss(
            heads.double(), target.double(), t, ref.risk_weights(t), None, 1.0, 0.1, 0.1, False, cfg.kernel_params())
        assert rel_err(out.loss, total) < 1e-5
        assert rel_err(g, grad) < 1e-5
        for k, name in enumerate(TERM_NAMES):
            assert rel_err(out.terms[name], terms[:, k]) < 1e-5, name

    @pytest.mark.parametrize("mode", sorted(_MODE_CONFIGS))
    def test_deterministic(self, mode):
        heads, target = critic_inputs((8, 512), 3, 200, 200, torch.bfloat16, device="cuda")
        mask = random_mask((8, 512), device="cuda")

        def run():
            x = heads.clone().requires_grad_()
            out = ops.critic_loss(x, target, mask=mask, config=_config(mode))
            g = _grad(out.loss, x)
            qh = ops.quantile_huber(heads[..., 1, :], target, mask=mask, reduction="none")
            cv = ops.cvar(heads, 0.1, upper=True)
            adv, ret = ops.distributional_gae(target[..., 0].float(), target, mask)
            return [out.loss, g, qh, cv, adv, ret] + [out.terms[k] for k in TERM_NAMES]

        for a, b in zip(run(), run()):
            assert torch.equal(a, b)

    # ------------------------------------------------------------------------- gradcheck / opcheck / compile

    def test_gradcheck_float64(self):
        heads, target = critic_inputs((2, 3), 3, 6, 5, torch.float64, device="cuda")
        heads.requires_grad_()
        mask = random_mask((2, 3), device="cuda")
        cfg = CriticLossConfig.recipe(alpha=0.3, beta=0.4)
        assert torch.autograd.gradcheck(lambda h: ops.critic_loss(h, target, mask=mask, config=cfg).loss, (heads,))
        # Consistent mode is a semi-gradient (the VaRs and the targets built from them are held
        # constant), so it is not the full derivative gradcheck measures: only the terms that do not
        # involve the VaR (shift is an exact gradient; cvar/gain/shape are checked against the
        # reference backend's closed form elsewhere).
        cfg = _config("consistent", alpha=0.3, beta=0.4, cvar=0.0, gain=0.0, shape=0.0)
        assert torch.autograd.gradcheck(lambda h: ops.critic_loss(h, target, mask=mask, config=cfg).loss, (heads,))
        p = randn((2, 3, 5), torch.float64, device="cuda").requires_grad_()
        w = torch.rand(5, dtype=torch.float64, device="cuda")
        assert torch.autograd.gradcheck(
            lambda v: ops.quantile_huber(v, target, kappa=0.6, weights=w, mask=mask, reduction="none"), (p,))
        x = randn((3, 6), torch.float64, device="cuda").requires_grad_()
        assert torch.autograd.gradcheck(lambda v: ops.cvar(v, 0.4), (x,))
        assert torch.autograd.gradcheck(lambda v: ops.cvar(v, 0.4, upper=True), (x,))

    @staticmethod
    def _opcheck_cases():
        heads, target = critic_inputs((6,), 3, 5, 4, torch.float64, device="cuda")
        h32 = heads.float().requires_grad_()
        t = dvpo.taus(5, dtype=torch.float32, device="cuda")
        mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.float32, device="cuda")
        w = ref.risk_weights(t)
        return [
            (library.quantile_huber, (h32[:, 0], target.float(), t, w, mask, 1.0, False, "auto")),
            (library.quantile_huber, (heads[:, 0].clone().requires_grad_(), target, t.double(), None, None, 0.5,
                                      True, "pairwise")),
            (library.cvar, (h32[:, 1].detach().requires_grad_(), 0.3, True)),
            (library.critic_loss, (h32, target.float(), t, w, mask, 1.0, 0.2, 0.2, False,
                                   CriticLossConfig.recipe().kernel_params(), "auto")),
            (library.critic_loss, (heads.clone().requires_grad_(), target, t.double(), w.double(), None, 0.7, 0.1,
                                   0.5, True, [1.0, 0.5, 0.0, 2.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.75, 1.2, 0.6], "auto")),
            (library.critic_loss, (h32.detach().clone().requires_grad_(), target.float(), t, w, mask, 0.01, 0.2, 0.3,
                                   True, CriticLossConfig().kernel_params(), "auto")),
            (library.distributional_gae, (randn((2, 5), device="cuda"), randn((2, 5, 3), device="cuda"),
                                          mask[:5].expand(2, 5).contiguous(), 1.0, 0.95)),
        ]

    @pytest.mark.parametrize("case", range(7))
    def test_opcheck(self, case):
        op, args = self._opcheck_cases()[case]
        torch.library.opcheck(op, args)

    def test_torch_compile_fullgraph_matches_eager(self):
        heads, target = critic_inputs((2, 7), 3, 8, 6, torch.float32, device="cuda")
        mask = random_mask((2, 7), device="cuda")

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


# ============================================================================ CPU: torch-free kernels

_TORCH_PREFIXES = ("torch/", "ATen/", "c10/", "caffe2/", "pybind11/")
_TORCH_FILES = ("torch.h", "Python.h", "extension.h")


def test_kernel_files_include_no_torch_header():
    files = sorted(CUDA_SRC.glob("*.cu")) + sorted(CUDA_SRC.glob("*.cuh")) + [CUDA_SRC / "dvpo_cuda.h"]
    assert any(f.suffix == ".cu" for f in files), "no CUDA kernel files under csrc/cuda"
    include = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', re.M)
    for f in files:
        for kind, name in include.findall(f.read_text()):
            assert not name.startswith(_TORCH_PREFIXES) and pathlib.PurePath(name).name not in _TORCH_FILES, (
                f"{f.relative_to(ROOT)} includes {name}: kernel files must stay torch-free")
            if kind == '"':  # project headers: csrc/cuda or the shared csrc/dvpo_math.h only
                assert (CUDA_SRC / name).exists() or (ROOT / "csrc" / name).exists(), f"{f.name}: {name} not found"


def test_binding_registers_every_op():
    text = (CUDA_SRC / "bindings.cpp").read_text()
    assert "TORCH_LIBRARY_IMPL(dvpo_C, CUDA, m)" in text
    for op in ("quantile_huber", "cvar", "critic_loss", "distributional_gae"):
        assert f'm.impl("{op}"' in text, op


# ======================================================================== CPU: emulated kernels

def _emu_skip_reason():
    if os.environ.get("DVPO_SKIP_CUDA_EMU", "0") not in ("", "0"):
        return "DVPO_SKIP_CUDA_EMU is set"
    if not hasattr(os, "fork") or os.name != "posix":
        return "the emulation needs POSIX ucontext"
    cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    if not (pathlib.Path(cuda_home) / "include" / "cuda_runtime.h").exists():
        return f"no CUDA headers under {cuda_home}/include"
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no C++ compiler"
    from torch.utils import cpp_extension
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed"
    return None


def _emu_transform(text):
    """The two constructs a host compiler cannot parse, and the 48 KB limit as a test setting."""
    text = re.sub(r"extern\s+__shared__\s+__align__\(\d+\)\s+char\s+(\w+)\[\];",
                  r"char* \1 = ::dvpo_emu::dynamic_smem();", text)
    text = re.sub(r"([\w:]+<[^<>;()]*>)\s*<<<(.*?)>>>\s*\(", r"::dvpo_emu::launch(\1, \2, ", text, flags=re.S)
    text = re.sub(r"constexpr size_t kStaticSmemLimit = [^;]*;",
                  "static const size_t& kStaticSmemLimit = ::dvpo_emu::emu().static_smem;", text)
    return text


def _build_emulator():
    from torch.utils import cpp_extension
    name = "dvpo_cuda_emu"
    inputs = sorted(CUDA_SRC.glob("*")) + sorted((CUDA_SRC / "emu").rglob("*.*")) + [
        ROOT / "csrc" / "dvpo_math.h", ROOT / "csrc" / "terms.h", ROOT / "csrc/cpu/bindings.cpp"]
    # one build per source state and torch (an emulator built against another torch must not be reused)
    digest = hashlib.sha1(b"".join(p.read_bytes() for p in inputs if p.is_file())
                          + f"{torch.__version__} {torch.version.cuda}".encode()).hexdigest()[:12]
    build = pathlib.Path(tempfile.gettempdir()) / f"dvpo_cuda_emu_{digest}"
    src = build / "src"
    src.mkdir(parents=True, exist_ok=True)
    sources = []
    for f in sorted(CUDA_SRC.iterdir()):
        if f.suffix in (".cuh", ".h"):
            (src / f.name).write_text(_emu_transform(f.read_text()))
        elif f.suffix == ".cu":
            (src / f"{f.stem}_emu.cpp").write_text('#include "emu_runtime.h"\n' + _emu_transform(f.read_text()))
            sources.append(str(src / f"{f.stem}_emu.cpp"))
    schemas = re.search(r"TORCH_LIBRARY\(dvpo_C, m\) \{.*?\n\}", (ROOT / "csrc/cpu/bindings.cpp").read_text(), re.S)
    binding = (CUDA_SRC / "bindings.cpp").read_text()
    binding = binding.replace("PyInit__cuda_C", f"PyInit_{name}").replace('"_cuda_C"', f'"{name}"')
    binding = binding.replace(".is_cuda()", ".is_cpu()").replace(
        "TORCH_LIBRARY_IMPL(dvpo_C, CUDA, m)",
        schemas.group(0).replace("dvpo_C", "dvpo_emu") + "\n\nTORCH_LIBRARY_IMPL(dvpo_emu, CPU, m)")
    binding += """
void dvpo_emu_set_smem_limits(long long static_bytes, long long optin_bytes);
TORCH_LIBRARY_FRAGMENT(dvpo_emu, m) {
  m.def("set_smem_limits(int static_bytes, int optin_bytes) -> ()",
        [](int64_t s, int64_t o) { dvpo_emu_set_smem_limits(s, o); });
}
"""
    (src / "bindings_emu.cpp").write_text(binding)
    sources += [str(src / "bindings_emu.cpp"), str(CUDA_SRC / "emu" / "emu_api.cpp")]
    cuda_inc = pathlib.Path(os.environ.get("CUDA_HOME") or "/usr/local/cuda") / "include"
    cpp_extension.load(name, sources, build_directory=str(build),
                       extra_include_paths=[str(CUDA_SRC / "emu" / "stubs"), str(src), str(CUDA_SRC / "emu"),
                                            str(ROOT / "csrc"), str(cuda_inc)],
                       # no -std: torch adds the one its headers need (c++20 since 2.13). -Bsymbolic:
                       # under a CUDA build of torch the real libcudart is loaded first and would
                       # otherwise interpose on the emulated runtime's functions of the same names.
                       extra_cflags=["-O2", "-Wno-attributes"], extra_ldflags=["-Wl,-Bsymbolic"])
    return torch.ops.dvpo_emu


@pytest.fixture(scope="module")
def emu():
    reason = _emu_skip_reason()
    if reason:
        pytest.skip(f"CUDA kernel emulation: {reason}")
    ops_ = _build_emulator()
    ops_.set_smem_limits(48 * 1024, 227 * 1024)
    yield ops_
    ops_.set_smem_limits(48 * 1024, 227 * 1024)


def _close(got, want, dtype):
    for g, w in zip(got, want):
        assert g.dtype == ref.acc_dtype(dtype)
        assert rel_err(g, w) < TOL[dtype]


@pytest.mark.parametrize("n,m", [(1, 1), (2, 3), (7, 7), (32, 200), (200, 33), (257, 2), (3, 257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_emulated_quantile_huber(emu, dtype, n, m):
    acc = ref.acc_dtype(dtype)
    pred, target = randn((6, n), dtype, ties=(n == 7)), randn((6, m), dtype, scale=2.0, ties=(n == 7))
    t = dvpo.taus(n, "paper", dtype=acc)
    w = torch.rand(n, dtype=acc) + 0.5
    mask = torch.tensor([1, 0, 1, 0.5, 1, 1], dtype=acc)
    for args in [(None, None, 1.0, False), (w, mask, 0.4, True), (w, mask, 3.0, False)]:
        got = emu.quantile_huber(pred, target, t, args[0], args[1], args[2], args[3], "auto")
        want = ref_backend.quantile_huber(pred.double(), target.double(), t.double(),
                                          None if args[0] is None else args[0].double(),
                                          None if args[1] is None else args[1].double(), args[2], args[3])
        _close(got, want, dtype)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_emulated_cvar(emu, dtype, n):
    for ties in (False, True):
        x = randn((6, n), torch.float64, ties=ties)
        if n > 2:
            x[0, :2] = torch.tensor([0.0, -0.0])
        x = x.to(dtype)
        for level in (0.01, 0.1, 0.37, 0.5, 1.0):
            for upper in (False, True):
                got = emu.cvar(x, level, upper)
                want = ref_backend.cvar(x.double(), level, upper)
                _close(got, want, dtype)


_EMU_WEIGHTS = [[1.0] * 8, [0.5, 0, 2, 0, 1, 3, 0, 1], [0, 1, 0, 1, 0, 0, 1.5, 0], [0, 0, 0, 0, 0, 1, 0, 0]]
# params[8:]: tail_mode, lo_scale, hi_scale, shift_expectile. Recipe mode ignores the last three
# (given odd values here on purpose); consistent mode once symmetric, once asymmetric.
_EMU_MODES = {"recipe": [0.0, 0.3, 7.0, 0.9], "consistent": [1.0, 0.75, 1.3, 0.7],
              "consistent-symmetric": [1.0, 1.0, 1.0, 0.5]}


def _close_critic(got, want, dtype):
    """total, terms (each term separately) and grad of the emulated kernel against the reference."""
    _close(got, want, dtype)
    for k, name in enumerate(TERM_NAMES):
        assert rel_err(got[1][:, k], want[1][:, k]) < TOL[dtype], name


def _emu_critic_check(emu, heads, target, t, rw, mask, kappa, alpha, beta, nk, params, dtype):
    got = emu.critic_loss(heads, target, t, rw, mask, kappa, alpha, beta, nk, params, "auto")
    want = ref_backend.critic_loss(heads.double(), target.double(), t.double(), rw.double(),
                                   None if mask is None else mask.double(), kappa, alpha, beta, nk, params)
    _close_critic(got, want, dtype)
    return got


@pytest.mark.parametrize("mode", sorted(_EMU_MODES))
@pytest.mark.parametrize("h,n,m", [(1, 1, 1), (2, 2, 3), (3, 3, 2), (3, 7, 7), (5, 33, 17), (3, 200, 200),
                                   (1, 257, 3), (2, 3, 257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_emulated_critic_loss(emu, dtype, h, n, m, mode):
    acc = ref.acc_dtype(dtype)
    t = dvpo.taus(n, dtype=acc)
    rw = ref.risk_weights(t, 2.0)
    mask = torch.tensor([1, 0, 1, 0.5, 1, 1], dtype=acc)
    for ties in (False, True):
        heads, target = critic_inputs((6,), h, n, m, dtype, ties=ties)
        for weights in _EMU_WEIGHTS:
            for kappa, alpha, beta, nk in ((0.7, 0.2, 0.15, False), (2.0, 1.0, 0.5, True), (0.01, 0.1, 0.1, True)):
                _emu_critic_check(emu, heads, target, t, rw, mask, kappa, alpha, beta, nk,
                                  weights + _EMU_MODES[mode], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", ["default", "recipe()", "symmetric()"])
def test_emulated_critic_loss_configs(emu, config, dtype):
    """The default config (consistent tails), CriticLossConfig.recipe() and .symmetric() as they are,
    on crossing quantiles (unsorted heads) and on ties, fp16 included."""
    cfg = {"default": CriticLossConfig(), "recipe()": CriticLossConfig.recipe(),
           "symmetric()": CriticLossConfig.symmetric()}[config]
    params = cfg.kernel_params()
    assert len(params) == len(PARAM_NAMES) == 12
    acc = ref.acc_dtype(dtype)
    t = dvpo.taus(40, dtype=acc)
    rw = ref.risk_weights(t, cfg.risk_gamma)
    mask = torch.tensor([1, 1, 0, 1, 0.25, 1, 1], dtype=acc)
    for ties in (False, True):
        heads, target = critic_inputs((7,), 3, 40, 57, dtype, ties=ties)
        _emu_critic_check(emu, heads, target, t, rw, mask, cfg.kappa, cfg.alpha, cfg.beta, cfg.normalize_kappa,
                          params, dtype)


@pytest.mark.parametrize("mode", ["recipe", "consistent"])
@pytest.mark.parametrize("off", TERM_NAMES)
def test_emulated_critic_loss_each_weight_off(emu, off, mode):
    heads, target = critic_inputs((5,), 3, 33, 40, torch.float32)
    t = dvpo.taus(33)
    rw = ref.risk_weights(t)
    weights = [0.0 if name == off else 1.0 for name in TERM_NAMES]
    got = _emu_critic_check(emu, heads, target, t, rw, None, 0.5, 0.3, 0.2, True, weights + _EMU_MODES[mode],
                            torch.float32)
    assert torch.all(got[1][:, TERM_NAMES.index(off)] == 0)
    # and the term alone
    alone = [1.0 if name == off else 0.0 for name in TERM_NAMES]
    _emu_critic_check(emu, heads, target, t, rw, None, 0.5, 0.3, 0.2, True, alone + _EMU_MODES[mode], torch.float32)


def test_emulated_recipe_ignores_consistent_scalars(emu):
    """Recipe mode: params[9:] are ignored, bit for bit (the recipe path never reads them)."""
    heads, target = critic_inputs((6,), 3, 21, 30, torch.float32)
    t = dvpo.taus(21)
    rw = ref.risk_weights(t)
    mask = torch.tensor([1, 0, 1, 0.5, 1, 1])
    base = emu.critic_loss(heads, target, t, rw, mask, 1.0, 0.1, 0.1, False, [1.0] * 8 + [0.0, 1.0, 1.0, 0.5], "auto")
    other = emu.critic_loss(heads, target, t, rw, mask, 1.0, 0.1, 0.1, False,
                            [1.0] * 8 + [0.0, -3.0, float("nan"), 2.0], "auto")
    for a, b in zip(base, other):
        assert torch.equal(a, b)


def test_emulated_consistent_targets_at_the_var(emu):
    """Targets exactly at theta's VaRs (excess 0 there), tied atoms at the VaR, one-atom tails,
    all-equal rows, and levels that put the VaR at the first/last atom."""
    n, m = 10, 12
    theta = torch.tensor([[0.0, 1, 1, 1, 2, 3, 4, 4, 4, 5]] * 4 + [[2.0] * n, [5.0, 4, 3, 2, 1, 0, -1, -2, -3, -4]])
    z = torch.tensor([[1.0] * 6 + [4.0] * 6, [1.0, 1, 1, 0, -1, 2, 3, 4, 4, 5, 6, 7], [2.0] * m,
                      [-5.0, 10] * 6, [2.0] * m, [0.5, -0.5] * 6])
    heads = theta.unsqueeze(1).expand(-1, 2, -1).contiguous()
    t = dvpo.taus(n)
    rw = ref.risk_weights(t)
    for alpha, beta in ((0.3, 0.3), (0.1, 0.1), (0.25, 0.35), (1.0, 1.0), (0.01, 0.99)):
        for weights in _EMU_WEIGHTS:
            for mode in ("consistent", "consistent-symmetric"):
                _emu_critic_check(emu, heads, z, t, rw, None, 1.0, alpha, beta, False, weights + _EMU_MODES[mode],
                                  torch.float32)


def test_emulated_critic_params_are_checked(emu):
    heads, target = critic_inputs((2,), 2, 5, 4, torch.float32)
    t = dvpo.taus(5)
    args = (heads, target, t, t, None, 1.0, 0.1, 0.1, False)
    for params, what in (([1.0] * 8, "12 params"), ([1.0] * 13, "12 params"),
                         ([1.0] * 8 + [0.5, 1.0, 1.0, 0.5], "tail_mode"),
                         ([1.0] * 8 + [1.0, 1.0, 1.0, 1.0], "shift_expectile"),
                         ([1.0] * 8 + [1.0, 1.0, 1.0, 0.0], "shift_expectile"),
                         ([1.0] * 8 + [1.0, float("inf"), 1.0, 0.5], "lo_scale")):
        with pytest.raises(RuntimeError, match=what):
            emu.critic_loss(*args, params, "auto")


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 11, 6), (2, 40, 33), (2, 1100, 5)])  # 1100: 32 chunks
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_emulated_distributional_gae(emu, dtype, shape):
    b, t, m = shape
    acc = ref.acc_dtype(dtype)
    rewards, values = randn((b, t), acc), randn((b, t, m), dtype)
    mask = random_mask((b, t), dtype=acc)
    if t > 10:
        mask[-1, -5:] = 0
    for gamma, lam in ((1.0, 0.95), (0.99, 0.9), (0.5, 0.0)):
        got = emu.distributional_gae(rewards, values, mask, gamma, lam)
        want = ref_backend.distributional_gae(rewards.double(), values.double(), mask, gamma, lam)
        _close(got, want, dtype)


@pytest.mark.parametrize("mode", ["recipe", "consistent"])
@pytest.mark.parametrize("path", ["opt-in", "global"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_emulated_large_size_paths(emu, dtype, path, mode):
    """Past 48 KB per token the launchers opt in to more shared memory; past the opt-in limit they
    use a global scratch slot per resident warp (a bounded grid, tokens visited grid-stride). The
    emulation lowers both limits so that small shapes take those paths."""
    acc = ref.acc_dtype(dtype)
    emu.set_smem_limits(0, 227 * 1024 if path == "opt-in" else 0)
    try:
        heads, target = critic_inputs((45,), 3, 70, 300, dtype)
        t = dvpo.taus(70, dtype=acc)
        rw = ref.risk_weights(t)
        mask = random_mask((45,), dtype=acc)
        _emu_critic_check(emu, heads, target, t, rw, mask, 1.0, 0.1, 0.1, False, [1.0] * 8 + _EMU_MODES[mode], dtype)
        got = emu.quantile_huber(heads[:, 0], target, t, rw, mask, 1.0, False, "auto")
        want = ref_backend.quantile_huber(heads[:, 0].double(), target.double(), t.double(), rw.double(),
                                          mask.double(), 1.0, False)
        _close(got, want, dtype)
        _close(emu.cvar(target, 0.3, True), ref_backend.cvar(target.double(), 0.3, True), dtype)
    finally:
        emu.set_smem_limits(48 * 1024, 227 * 1024)


@pytest.mark.parametrize("mode", ["recipe", "consistent"])
def test_emulated_masked_inputs_and_zero_tokens(emu, mode):
    params = [1.0] * 8 + _EMU_MODES[mode]
    heads, target = critic_inputs((5,), 3, 9, 8, torch.float32)
    mask = torch.tensor([1, 0, 1, 0, 1], dtype=torch.float32)
    heads[mask == 0] = float("nan")
    target[mask == 0] = float("inf")
    t = dvpo.taus(9)
    total, terms, grad = emu.critic_loss(heads, target, t, ref.risk_weights(t), mask, 1.0, 0.1, 0.1, False,
                                         params, "auto")
    assert torch.isfinite(total).all() and torch.isfinite(terms).all() and torch.isfinite(grad).all()
    assert torch.all(total[mask == 0] == 0) and torch.all(grad[mask == 0] == 0) and torch.all(terms[mask == 0] == 0)
    loss, g = emu.quantile_huber(heads[:, 0], target, t, None, mask, 1.0, False, "auto")
    assert torch.isfinite(loss).all() and torch.all(g[mask == 0] == 0)
    empty = emu.critic_loss(heads[:0], target[:0], t, t, None, 1.0, 0.1, 0.1, False, params, "auto")
    assert [tuple(x.shape) for x in empty] == [(0,), (0, 8), (0, 3, 9)]
