"""The `cuda` backend (csrc/cuda, through dvpo.backends.cuda): what only it has. The op contract
(values and gradients against the float64 reference, masks, layouts, opcheck, torch.compile, ...)
runs on it, on a GPU, and on its host emulation (`cuda-emu`, tests/cuda_emu.py) without one, in
tests/test_quantile_huber.py, test_cvar.py, test_critic_loss.py and test_distributional_gae.py.

Here:
  * GPU (`gpu`-marked, skipped without one): the large-size shared-memory fallbacks and bitwise
    determinism at a realistic size.
  * CPU: the kernel files (csrc/cuda/*.cu, *.cuh and the launcher header) include no torch header;
    the binding registers every op.
  * CPU, emulated: the launchers' paths past 48 KB of shared memory per token (opt-in) and past the
    opt-in limit (global scratch), which the emulation reaches at small sizes by lowering the limits.
"""

import os
import pathlib
import re

import pytest
import torch

import dvpo
from dvpo import dispatch, ops
from dvpo import reference as ref
from dvpo.backends import reference as ref_backend
from dvpo.config import TERM_NAMES, CriticLossConfig

from . import cuda_emu
from .utils import TOL, critic_inputs, random_mask, rel_err

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_SRC = ROOT / "csrc" / "cuda"

# Both tail-term modes: the consistent form (the default; asymmetric scalars switched on) and the
# published recipe.
_MODE_CONFIGS = {
    "consistent": dict(lower_contraction=0.25, upper_expansion=0.3, shift_expectile=0.7),
    "recipe": dict(tail_targets="recipe"),
}
_EMU_MODES = {"recipe": [0.0, 0.3, 7.0, 0.9], "consistent": [1.0, 0.75, 1.3, 0.7]}


def _config(mode, **kw):
    return CriticLossConfig(**_MODE_CONFIGS[mode], **kw)


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss.sum(), x)
    return g


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

@pytest.fixture(scope="module")
def emu():
    reason = cuda_emu.skip_reason()
    if reason:
        pytest.skip(f"CUDA kernel emulation: {reason}")
    ops_ = cuda_emu.build()
    yield ops_
    ops_.set_smem_limits(cuda_emu.SMEM_STATIC, cuda_emu.SMEM_OPTIN)


def _close(got, want, dtype):
    """Every output of a loss op or cvar against the reference: values in the accumulation dtype, the
    last (the gradient) in the input dtype."""
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == (dtype if k == len(got) - 1 else ref.acc_dtype(dtype))
        assert rel_err(g, w) < TOL[dtype]


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


@pytest.mark.parametrize("mode", ["recipe", "consistent"])
@pytest.mark.parametrize("path", ["opt-in", "global"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_emulated_large_size_paths(emu, dtype, path, mode):
    """Past 48 KB per token the launchers opt in to more shared memory; past the opt-in limit they
    use a global scratch slot per resident warp (a bounded grid, tokens visited grid-stride). The
    emulation lowers both limits so that small shapes take those paths."""
    acc = ref.acc_dtype(dtype)
    emu.set_smem_limits(0, cuda_emu.SMEM_OPTIN if path == "opt-in" else 0)
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
        emu.set_smem_limits(cuda_emu.SMEM_STATIC, cuda_emu.SMEM_OPTIN)
