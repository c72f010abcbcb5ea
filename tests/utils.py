"""Shared test helpers: tolerances, relative error, random inputs with ties, crossing quantiles and
masks with empty rows (docs/architecture.md, "Correctness bars")."""


import torch

# Relative error bars against the float64 reference, by input dtype.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}

SIZES = (1, 2, 3, 7, 32, 200, 257)


def rel_err(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    den = ref.norm()
    num = (out - ref).norm()
    if den == 0:
        return num.item()
    return (num / den).item()


def randn(shape, dtype=torch.float32, *, ties=False, scale=1.0, device="cpu", generator=None):
    """Random values (never zeros); with `ties`, rounded to a coarse grid so many values repeat."""
    x = torch.randn(shape, dtype=torch.float64, generator=generator) * scale
    if ties:
        x = torch.round(x * 2.0) / 2.0
    return x.to(dtype=dtype, device=device)


def random_mask(lead, *, empty_rows=True, p=0.7, dtype=torch.bool, device="cpu", generator=None):
    """A mask over the leading dims with some tokens masked and, when possible, an all-masked row."""
    m = torch.rand(lead, generator=generator) < p
    if empty_rows and len(lead) >= 2 and lead[0] > 1:
        m[0] = False
    if m.numel() > 0 and not m.any():
        m.view(-1)[-1] = True
    return m.to(dtype=dtype, device=device)


def critic_inputs(lead, h, n, m, dtype=torch.float32, *, ties=False, device="cpu", generator=None):
    """heads [..., H, N] (unsorted: quantiles cross) and target [..., M], shifted so tails differ.

    With `ties` every head is the same tied row: the head mean is then exact in every precision,
    so ties (and second differences of exactly 0) are the same for a low-precision backend and the
    float64 reference, and both must pick the same subgradient."""
    if ties:
        row = randn(tuple(lead) + (1, n), dtype, ties=True, device=device, generator=generator)
        heads = row.expand(tuple(lead) + (h, n)).clone()
    else:
        heads = randn(tuple(lead) + (h, n), dtype, device=device, generator=generator)
    target = randn(tuple(lead) + (m,), dtype, ties=ties, scale=1.5, device=device, generator=generator)
    if ties:
        _redraw_tied_tail_variances(row[..., 0, :], target, dtype, generator)
    return heads, target


def _redraw_tied_tail_variances(theta, target, dtype, generator, levels=(0.1, 0.15, 0.2, 0.3)):
    """On a tie grid the tail variances of theta and target can be mathematically equal, which puts
    the tail-shape ReLU exactly at its kink; the float64 reference then picks a side by rounding
    noise (seen: 5.6e-17 instead of 0), so no backend can be expected to pick the same subgradient. Redraw the
    targets of such tokens (in place; nothing else is redrawn, so other data is unchanged)."""
    from dvpo import reference as ref

    flat_t, flat_x = target.view(-1, target.shape[-1]), theta.reshape(-1, theta.shape[-1])
    for _ in range(50):
        x64, t64 = flat_x.double().cpu(), flat_t.double().cpu()
        bad = torch.zeros(x64.shape[0], dtype=torch.bool)
        for level in levels:
            for upper in (False, True):
                d = ref.tail_variance(x64, level, upper) - ref.tail_variance(t64, level, upper)
                bad |= (d != 0) & (d.abs() < 1e-9)  # exactly 0 (e.g. one-atom tails) is exact everywhere
        if not bad.any():
            return
        rows = int(bad.sum())
        fresh = randn((rows, flat_t.shape[-1]), dtype, ties=True, scale=1.5, generator=generator)
        flat_t[bad.to(flat_t.device)] = fresh.to(flat_t.device)


REDUCTIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "none")


def grad(value, x, upstream=None):
    """d(sum(value * upstream))/dx (upstream: a random positive weight per output, or None for ones)."""
    if upstream is not None:
        value = value * upstream.to(value.dtype)
    (g,) = torch.autograd.grad(value.sum(), x)
    return g


def upstream_like(value):
    """A random positive upstream gradient for `value` (float64, on its device)."""
    return torch.rand(value.shape, dtype=torch.float64).to(value.device) + 0.5


def weighted_mask(lead, *, device="cpu", generator=None):
    """A float mask with masked tokens, an all-masked row (when there are rows) and non-binary weights."""
    m = random_mask(lead, dtype=torch.float32, generator=generator)
    return (m * (0.5 + torch.rand(lead, generator=generator))).to(device)


def assert_compiled_matches_eager(step, backend, x, *args):
    """torch.compile(step, fullgraph=True) gives eager's value and gradient w.r.t. `x`."""
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend.compile_backend)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager, comp = step(xe, *args), compiled(xc, *args)
    assert torch.allclose(eager, comp, rtol=1e-6, atol=1e-6)
    eager.backward()
    comp.backward()
    assert torch.allclose(xe.grad, xc.grad, rtol=1e-6, atol=1e-7)


def with_garbage_at_masked(x, target, mask):
    """Copies of `x` and `target` with NaN and inf at the tokens `mask` drops (weight 0)."""
    dirty_x, dirty_t = x.clone(), target.clone()
    dirty_x[mask == 0] = float("nan")
    dirty_t[mask == 0] = float("inf")
    return dirty_x, dirty_t


def assert_mask_read_natively(op, args, mask_index, monkeypatch, public_call):
    """Masks reach the kernel as they come, with no conversion pass in dvpo.ops: the kernel-interface
    call `op(*args)` with the bool mask at `args[mask_index]` gives bitwise the outputs of the same mask
    as 0/1 float weights, and float weights in any float dtype bitwise those of the same weights in
    fp32 (the values are exact in every dtype; the backend converts them to its accumulation dtype);
    torch.library.opcheck passes with both; and `public_call(mask)` (the dvpo.ops function) hands
    either to the `dvpo::` op in its own dtype."""
    import dvpo.library as library

    mask = args[mask_index]
    assert mask.dtype == torch.bool and (~mask).any() and mask.any()
    # weights 0 (masked), 1, 1.25, 1.5: exact in bf16, fp16, fp32 and fp64
    steps = torch.arange(mask.numel(), device=mask.device).reshape(mask.shape) % 3
    weights = mask.to(torch.float32) * (1 + 0.25 * steps)

    def call(m):
        a = list(args)
        a[mask_index] = m
        return op(*a)

    for got, want in zip(call(mask), call(mask.to(torch.float32))):
        assert got.dtype == want.dtype and torch.equal(got, want)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        for got, want in zip(call(weights.to(dtype)), call(weights)):
            assert got.dtype == want.dtype and torch.equal(got, want), f"{dtype} weights"
    torch.library.opcheck(op, tuple(args))
    as_half = list(args)
    as_half[mask_index] = weights.to(torch.float16)
    torch.library.opcheck(op, tuple(as_half))
    seen = []
    name = op._name.split("::")[-1] if hasattr(op, "_name") else op.__name__
    real = getattr(library, name)

    def spy(*a, **k):
        seen.append(a[mask_index].dtype if a[mask_index] is not None else None)
        return real(*a, **k)

    monkeypatch.setattr(library, name, spy)
    for m in (mask, weights.to(torch.float64), weights.to(torch.bfloat16)):
        seen.clear()
        public_call(m)
        assert seen and seen[0] == m.dtype, f"dvpo.ops passed a {m.dtype} mask to dvpo::{name} as {seen}"
