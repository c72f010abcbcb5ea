"""`dvpo check`: run the fused critic loss (forward + backward) on every backend available for a
device, compare each with the float64 reference, and print a table (backend, errors, time)."""

from __future__ import annotations

import os
import time


def add_arguments(parser):
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    parser.add_argument("--shape", default="4,256,3,200,200", help="B,T,H,N,M (default: 4,256,3,200,200)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (median reported)")


def _time_ms(fn, reps, sync):
    fn()  # warm-up (compilation, allocation)
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2]


def run(args) -> int:
    import torch

    from . import dispatch, ops
    from . import reference as ref
    from .config import TERM_NAMES

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    b, t, h, n, m = (int(x) for x in args.shape.split(","))
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    heads = torch.randn(b, t, h, n, generator=gen, dtype=torch.float64)
    target = 1.5 * torch.randn(b, t, m, generator=gen, dtype=torch.float64)
    mask = torch.rand(b, t, generator=gen) < 0.9
    heads_lp, target_lp = heads.to(device, dtype), target.to(device, dtype)
    mask_d = mask.to(device)

    # The oracle: float64 reference on the same (rounded) inputs, autograd for the gradient.
    h64 = heads_lp.detach().cpu().double().requires_grad_()
    want = ref.critic_loss(h64, target_lp.cpu().double(), mask=mask)
    want.loss.backward()
    want_grad = h64.grad

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"dvpo check: fused critic loss fwd+bwd, [B,T,H,N]=[{b},{t},{h},{n}], M={m}, {args.dtype}, {device}")
    print(f"{'backend':<10} {'loss rel err':>13} {'grad rel err':>13} {'ms':>9}   status")
    status = dispatch.backends(device)
    ok = True
    for name in dispatch.BACKENDS:
        if status[name] != "available":
            print(f"{name:<10} {'-':>13} {'-':>13} {'-':>9}   {status[name]}")
            continue
        os.environ[dispatch.ENV_VAR] = name
        try:
            x = heads_lp.clone().requires_grad_()

            def step():
                x.grad = None
                out = ops.critic_loss(x, target_lp, mask=mask_d)
                out.loss.backward()
                return out

            out = step()
            loss_err = abs(out.loss.item() - want.loss.item()) / max(abs(want.loss.item()), 1e-30)
            grad_err = ((x.grad.double().cpu() - want_grad).norm() / want_grad.norm()).item()
            ms = _time_ms(step, args.reps, sync)
            bar = 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2
            verdict = "ok" if loss_err < bar and grad_err < bar else f"FAIL (bar {bar:g})"
            ok &= verdict == "ok"
            print(f"{name:<10} {loss_err:>13.2e} {grad_err:>13.2e} {ms:>9.2f}   {verdict}")
        except RuntimeError as exc:  # a backend without this op yet, or not for this device
            print(f"{name:<10} {'-':>13} {'-':>13} {'-':>9}   skipped: {exc}")
        finally:
            os.environ.pop(dispatch.ENV_VAR, None)
    terms = ", ".join(f"{k}={want.terms[k].sum().item() / max(mask.sum().item(), 1):.4g}" for k in TERM_NAMES)
    print(f"reference per-token mean of each term: {terms}")
    return 0 if ok else 1
