"""The host path of `dvpo.ops.critic_loss` on a GPU: no host-device synchronisation in forward +
backward, so the whole step can be captured in a CUDA graph and run under
torch.compile(mode="reduce-overhead"). GPU-only (skipped without one); tools/gpu_check.sh runs them.
"""

from __future__ import annotations

import pytest
import torch

import dvpo
from dvpo import ops

pytestmark = pytest.mark.gpu

T_BATCH, T_SEQ, H, N, M = 4, 33, 3, 200, 200


def _inputs(seed, dtype=torch.float32):
    g = torch.Generator(device="cuda").manual_seed(seed)
    heads = torch.randn(T_BATCH, T_SEQ, H, N, device="cuda", dtype=dtype, generator=g)
    target = torch.randn(T_BATCH, T_SEQ, M, device="cuda", dtype=dtype, generator=g)
    mask = torch.rand(T_BATCH, T_SEQ, device="cuda", generator=g) > 0.2
    return heads, target, mask


def _step(heads, target, mask):
    out = ops.critic_loss(heads, target, mask=mask)
    (grad,) = torch.autograd.grad(out.loss, heads)
    return out.loss, grad


def _eager(seed, dtype=torch.float32):
    heads, target, mask = _inputs(seed, dtype)
    return _step(heads.requires_grad_(), target, mask)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_forward_backward_has_no_host_sync(dtype):
    heads, target, mask = _inputs(0, dtype)
    heads.requires_grad_()
    _step(heads, target, mask)  # warm-up: builds the cached taus and risk weights
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(heads, target, mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_captured_in_a_cuda_graph_and_replayed(dtype):
    heads, target, mask = _inputs(0, dtype)
    heads.requires_grad_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _step(heads, target, mask)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, grad = _step(heads, target, mask)
    for seed in (1, 2):
        new_heads, new_target, new_mask = _inputs(seed, dtype)
        with torch.no_grad():
            heads.copy_(new_heads)
        target.copy_(new_target)
        mask.copy_(new_mask)
        graph.replay()
        want_loss, want_grad = _eager(seed, dtype)
        torch.testing.assert_close(loss, want_loss)
        torch.testing.assert_close(grad, want_grad)


def test_runs_under_compile_reduce_overhead():
    step = torch.compile(_step, mode="reduce-overhead")
    for seed in (0, 1, 2):
        heads, target, mask = _inputs(seed)
        loss, grad = step(heads.requires_grad_(), target, mask)
        want_loss, want_grad = _eager(seed)
        torch.testing.assert_close(loss, want_loss)
        torch.testing.assert_close(grad, want_grad)


def test_default_taus_are_not_rebuilt_per_call():
    heads, target, mask = _inputs(0)
    ops.critic_loss(heads, target, mask=mask)
    cached = {k: v.data_ptr() for k, v in ops._CONSTANTS.items() if "cuda" in str(k)}
    ops.critic_loss(heads, target, mask=mask)
    assert cached and cached == {k: v.data_ptr() for k, v in ops._CONSTANTS.items() if k in cached}
    torch.testing.assert_close(next(v for k, v in ops._CONSTANTS.items() if k[0] == "taus" and k[1] == N).cpu(),
                               dvpo.taus(N))
