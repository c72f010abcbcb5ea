"""The contract of dvpo.distributional_gae, once, on every backend (tests/backends.py): advantages
and per-atom returns against the float64 reference (every dtype, its bar in tests/utils.py's TOL),
sequence lengths across the kernels' chunking, several (gamma, lambda), trailing padding and holes
whose rewards and values are NaN (never read), bool and float masks, non-contiguous inputs, empty
batches, the kernel interface, opcheck, torch.compile(fullgraph) and the argument checks."""

import pytest
import torch

from dvpo import library, ops
from dvpo import reference as ref
from dvpo.backends import reference as ref_backend

from . import backends
from .utils import TOL, assert_mask_read_natively, randn, random_mask, rel_err

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# (B, T, M): T = 1100 and 5000 span many chunks of the CUDA scan; M = 257 and 600 long value rows.
FULL = [(1, 1, 1), (2, 7, 3), (3, 11, 6), (2, 40, 33), (3, 33, 257), (2, 5, 600), (4, 300, 70), (2, 1100, 5)]
GPU = FULL + [(2, 5000, 200)]
SMALL = [(1, 1, 1), (2, 7, 3), (3, 11, 6), (4, 9, 2), (2, 40, 33), (2, 1100, 5)]
INTERPRETER = [(1, 1, 1), (3, 7, 33), (4, 9, 2)]


def _inputs(b, t, m, dtype, device, *, mask_dtype=torch.float32):
    rewards, values = randn((b, t), dtype), randn((b, t, m), dtype)
    mask = random_mask((b, t), empty_rows=False)
    if t > 2:
        mask[:, -1] = False  # trailing padding
        mask[0, 1] = False  # a hole inside a sequence
    rewards[~mask] = float("nan")  # padding is never read
    values[~mask] = float("nan")
    return rewards.to(device), values.to(device), mask.to(dtype=mask_dtype, device=device)


def _check(adv, ret, rewards, values, mask, gamma, lam, dtype):
    want_adv, want_ret = ref.distributional_gae(rewards.double(), values.double(), mask, gamma=gamma, lam=lam)
    b, t, m = values.shape
    assert adv.shape == (b, t) and ret.shape == (b, t, m) and ret.dtype == ref.acc_dtype(dtype)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    assert rel_err(adv, want_adv) < TOL[dtype] and rel_err(ret, want_ret) < TOL[dtype]
    pad = mask == 0
    assert torch.count_nonzero(adv[pad]) == 0 and torch.count_nonzero(ret[pad]) == 0


@pytest.mark.parametrize("backend,dtype", backends.cases(DTYPES), indirect=["backend"])
def test_matches_reference(backend, dtype):
    shapes = GPU if backend.device == "cuda" else INTERPRETER if backend.name == "triton" and backend.small \
        else SMALL if backend.small else FULL
    if backend.name in ("reference", "cpp") and dtype != torch.float32:
        shapes = [s for s in shapes if s[1] <= 40]  # long sequences in fp32 only (the reference's scan is slow)
    for b, t, m in shapes:
        rewards, values, mask = _inputs(b, t, m, dtype, backend.device)
        for gamma, lam in ((1.0, 0.95), (0.99, 0.9), (0.9, 0.0), (0.5, 1.0)):
            adv, ret = ops.distributional_gae(rewards, values, mask, gamma=gamma, lam=lam)
            _check(adv, ret, rewards, values, mask, gamma, lam, dtype)


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_bool_mask_non_contiguous_and_kernel_interface(backend):
    """A bool mask, transposed rewards and values, and the kernel-interface function against the
    reference backend's (same outputs, dtypes and shapes)."""
    rewards = randn((9, 3), device=backend.device).t()
    values = randn((5, 9, 3), device=backend.device).permute(2, 1, 0)  # [3, 9, 5]
    mask = random_mask((3, 9), device=backend.device)
    assert not rewards.is_contiguous() and not values.is_contiguous()
    adv, ret = ops.distributional_gae(rewards, values, mask, gamma=0.97, lam=0.9)
    _check(adv, ret, rewards, values, mask, 0.97, 0.9, torch.float32)
    same = ops.distributional_gae(rewards.contiguous(), values.contiguous(), mask.float(), gamma=0.97, lam=0.9)
    assert rel_err(adv, same[0]) < 1e-6 and rel_err(ret, same[1]) < 1e-6
    got = backend.kernels().distributional_gae(rewards, values, mask.float(), 0.97, 0.9)
    for x, y in zip(got, ref_backend.distributional_gae(rewards, values, mask.float(), 0.97, 0.9)):
        assert x.dtype == y.dtype and x.shape == y.shape and rel_err(x, y) < TOL[torch.float32]


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_mask_read_natively(backend, monkeypatch):
    rewards, values, mask = _inputs(3, 9, 5, torch.float32, backend.device, mask_dtype=torch.bool)
    assert_mask_read_natively(library.distributional_gae, (rewards, values, mask, 0.97, 0.9), 2, monkeypatch,
                                   lambda m: ops.distributional_gae(rewards, values, m, gamma=0.97, lam=0.9))


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_empty_batch(backend):
    adv, ret = ops.distributional_gae(torch.zeros(0, 4, device=backend.device),
                                      torch.zeros(0, 4, 3, device=backend.device), torch.ones(0, 4, device=backend.device))
    assert adv.shape == (0, 4) and ret.shape == (0, 4, 3)


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_opcheck(backend):
    mask = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.float32, device=backend.device)
    torch.library.opcheck(library.distributional_gae, (randn((2, 5), device=backend.device),
                                                       randn((2, 5, 3), device=backend.device), mask, 1.0, 0.95))


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_torch_compile_fullgraph_matches_eager(backend):
    rewards, values, mask = _inputs(2, 7, 4, torch.float32, backend.device)

    def step(r, v, m):
        adv, ret = ops.distributional_gae(r, v, m, gamma=0.99, lam=0.9)
        return adv.sum() + ret.sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend.compile_backend)
    assert torch.allclose(step(rewards, values, mask), compiled(rewards, values, mask), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- argument checks (any backend)

@pytest.mark.parametrize("name,args,kw", [
    ("values", ((2, 3), (2, 3), (2, 3)), {}),
    ("rewards", ((2, 4), (2, 3, 5), (2, 3)), {}),
    ("mask", ((2, 3), (2, 3, 5), (3, 2)), {}),
    ("gamma", ((2, 3), (2, 3, 5), (2, 3)), dict(gamma=1.5)),
    ("lam", ((2, 3), (2, 3, 5), (2, 3)), dict(lam=-0.1)),
], ids=["values", "rewards", "mask", "gamma", "lam"])
def test_bad_input_raises_value_error_naming_the_argument(name, args, kw):
    rewards, values, mask = randn(args[0]), randn(args[1]), torch.ones(args[2])
    with pytest.raises(ValueError, match=name):
        ops.distributional_gae(rewards, values, mask, **kw)
