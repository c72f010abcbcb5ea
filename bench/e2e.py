"""End-to-end step benchmark: one critic update of a trainer-like model, and the loss's share of it.

The model is built here (not taken from dvpo.trainer) so the benchmark depends on nothing but
transformers: a tiny Llama backbone built from a config (`LlamaConfig`, random weights), H linear
quantile heads on its last hidden state, and the fused critic loss against [B*T, M] return targets.
One step = backbone forward, heads forward, loss forward, loss backward (to the heads' output),
model backward, AdamW step; each segment is timed (perf_counter on CPU, CUDA events on GPU) so the
loss's share of the step is measured, not inferred. The loss is computed on flattened tokens
(`[B*T, H, N]`), without a mask, as in the microbenchmarks.
"""

from __future__ import annotations

import math
import time
from typing import Dict, List

import torch

from dvpo.bench.timing import median

from dvpo.bench import cases as C
from dvpo.dispatch import use_backend
from dvpo.bench import env as E
from dvpo.bench import timing as TM

SEGMENTS = ("backbone_fwd", "heads_fwd", "loss_fwd", "loss_bwd", "model_bwd", "optimizer")


def e2e_shape(device: torch.device, quick: bool, plan: C.SweepPlan) -> Dict[str, int]:
    if quick:
        return {"B": 4, "T": plan.headline_tokens // 4, "N": plan.N, "M": plan.M, "H": plan.H,
                "hidden": 64, "layers": 2, "attn_heads": 4, "vocab": 32}
    if device.type == "cuda":
        return {"B": 16, "T": plan.headline_tokens // 16, "N": plan.N, "M": plan.M, "H": plan.H,
                "hidden": 128, "layers": 2, "attn_heads": 4, "vocab": 32}
    return {"B": 16, "T": plan.headline_tokens // 16, "N": plan.N, "M": plan.M, "H": plan.H,
            "hidden": 64, "layers": 2, "attn_heads": 4, "vocab": 32}


class TinyCritic(torch.nn.Module):
    """A causal-LM backbone (transformers Llama, from config) plus H linear quantile heads."""

    def __init__(self, s: Dict[str, int]):
        super().__init__()
        from transformers import AutoModel, LlamaConfig

        config = LlamaConfig(
            vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=4 * s["hidden"],
            num_hidden_layers=s["layers"], num_attention_heads=s["attn_heads"],
            num_key_value_heads=s["attn_heads"], max_position_embeddings=max(64, s["T"]),
            tie_word_embeddings=False,
        )
        try:
            self.backbone = AutoModel.from_config(config, attn_implementation="sdpa")
        except (TypeError, ValueError):
            self.backbone = AutoModel.from_config(config)
        self.heads = torch.nn.Linear(s["hidden"], s["H"] * s["N"])
        self.H, self.N = s["H"], s["N"]


class _Clock:
    """Marks segment boundaries; elapsed() returns the segment durations in ms."""

    def __init__(self, device: torch.device, n_marks: int):
        self.cuda = device.type == "cuda"
        self.device = device
        self.events = ([torch.cuda.Event(enable_timing=True) for _ in range(n_marks)] if self.cuda else None)
        self.times: List[float] = []

    def mark(self, i: int):
        if self.cuda:
            self.events[i].record()
        else:
            self.times.append(time.perf_counter())

    def elapsed(self) -> List[float]:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return [a.elapsed_time(b) for a, b in zip(self.events[:-1], self.events[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.times[:-1], self.times[1:])]


def _step(model, opt, ids, target, loss_fn, device) -> List[float]:
    s = ids.shape[0] * ids.shape[1]
    clock = _Clock(device, len(SEGMENTS) + 1)
    clock.mark(0)
    hidden = model.backbone(input_ids=ids).last_hidden_state
    clock.mark(1)
    q = model.heads(hidden).reshape(s, model.H, model.N)
    clock.mark(2)
    loss = loss_fn(q, target)
    clock.mark(3)
    (g,) = torch.autograd.grad(loss, q)
    clock.mark(4)
    q.backward(g)
    clock.mark(5)
    opt.step()
    opt.zero_grad(set_to_none=True)
    clock.mark(6)
    return clock.elapsed()


def _impls(cfg, device, status, modules):
    from dvpo.bench.harness import _match, parse_filter

    flt = parse_filter(cfg.filter)
    wanted = list(cfg.backends) if cfg.backends else list(C.ALL_IMPLS)
    out, skipped = [], []
    for name in C.ALL_IMPLS:
        if name not in wanted or not _match(flt, "backend", name):
            continue
        if name == "compile" and not cfg.compile:
            continue
        if name in C.BASELINES:
            out.append((name, None))
            continue
        if status.get(name) != "available":
            skipped.append((name, None, status.get(name, "unknown")))
            continue
        if name == "triton" and device.type != "cuda" and not cfg.allow_triton_interpreter:
            skipped.append((name, None, "Triton on CPU tensors runs in the interpreter: not benchmarked"))
            continue
        if not hasattr(modules[name], "critic_loss"):
            skipped.append((name, None, f"the {name} backend does not implement critic_loss (yet)"))
            continue
        for alg in C.backend_algorithms(name, modules[name], "critic_loss"):
            if _match(flt, "algorithm", alg):
                out.append((name, alg))
    return out, skipped


def _row(backend, alg, dt, shape, status, reason=None, **kw) -> dict:
    row = {"backend": backend, "algorithm": alg, "dtype": dt, "shape": dict(shape), "status": status,
           "reason": reason, "step_ms": None, "step_min_ms": None, "step_max_ms": None, "loss_ms": None,
           "loss_share": None, "segments_ms": None, "reps": 0, "speedup_vs_eager": None,
           "speedup_vs_compile": None, "loss_speedup_vs_eager": None, "loss_speedup_vs_compile": None,
           "compile_s": None}
    row.update(kw)
    return row


def run_e2e(cfg, device: torch.device, plan: C.SweepPlan, policy: TM.TimingPolicy, status, modules) -> dict:
    from dvpo.bench.harness import _match, parse_filter

    shape = e2e_shape(device, cfg.quick, plan)
    shape["tokens"] = shape["B"] * shape["T"]
    flt = parse_filter(cfg.filter)
    headline = ["fp32", "bf16"] if device.type == "cuda" else ["fp32"]
    dtypes = [d for d in headline if (not cfg.dtypes or d in cfg.dtypes) and _match(flt, "dtype", d)]
    if not dtypes and cfg.dtypes:
        dtypes = [cfg.dtypes[0]]
    impls, skipped = _impls(cfg, device, status, modules)
    result = {"config": {"model": "transformers LlamaConfig/AutoModel (random init) + Linear(hidden, H*N) heads",
                         "optimizer": "AdamW(lr=1e-4)", "segments": list(SEGMENTS), "shape": dict(shape),
                         "dtypes": dtypes},
              "skipped": [{"backend": b, "algorithm": a, "reason": r} for b, a, r in skipped],
              "rows": []}
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        result["skipped"].append({"backend": "*", "algorithm": None, "reason": f"transformers missing: {exc}"})
        return result
    spec = C.SPECS["critic_loss"]
    loss_shape = C.Shape(shape["tokens"], N=shape["N"], M=shape["M"], H=shape["H"])
    progress = None
    if cfg.progress:
        try:
            from tqdm import tqdm
            import sys
            progress = tqdm(total=len(impls) * len(dtypes), unit="step-bench", desc="e2e", file=sys.stderr,
                            dynamic_ncols=True)
        except ImportError:
            progress = None
    rows = result["rows"]
    torch.manual_seed(cfg.seed)
    try:
        for dt in dtypes:
            dtype = C.DTYPES[dt]
            model = TinyCritic(shape).to(device=device, dtype=dtype)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            g = torch.Generator().manual_seed(cfg.seed)
            ids = torch.randint(0, shape["vocab"], (shape["B"], shape["T"]), generator=g).to(device)
            target = (torch.randn(shape["tokens"], shape["M"], generator=g) * 1.5).to(device=device, dtype=dtype)
            for backend, alg in impls:
                if progress is not None:
                    progress.set_description_str(f"e2e {backend}{'/' + alg if alg else ''} {dt}")
                rows.append(_bench_one(cfg, device, policy, spec, loss_shape, shape, model, opt, ids, target,
                                       backend, alg, dt))
                if progress is not None:
                    progress.update(1)
            del model, opt
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if progress is not None:
            progress.close()
    # speedups (step and loss) against eager and compile of the same dtype
    for dt in dtypes:
        base = {r["backend"]: r for r in rows if r["dtype"] == dt and r["status"] == "ok"
                and r["backend"] in C.BASELINES}
        for r in rows:
            if r["dtype"] != dt or r["status"] != "ok":
                continue
            for name in C.BASELINES:
                if name in base:
                    r[f"speedup_vs_{name}"] = float(base[name]["step_ms"] / r["step_ms"])
                    r[f"loss_speedup_vs_{name}"] = float(base[name]["loss_ms"] / r["loss_ms"])
    return result


def _bench_one(cfg, device, policy, spec, loss_shape, shape, model, opt, ids, target, backend, alg, dt) -> dict:
    from dvpo.bench.harness import _fmt_bytes, _is_oom

    if backend in C.BASELINES:
        need = spec.eager_bytes(loss_shape) if backend == "eager" else spec.compile_bytes(loss_shape)
        avail = E.memory_available(device)
        if avail is not None and need > cfg.mem_fraction * avail:
            return _row(backend, alg, dt, shape, "skipped",
                        f"does not fit: the {backend} critic loss needs an estimated {_fmt_bytes(need)} > "
                        f"{cfg.mem_fraction:g} x {_fmt_bytes(avail)} available; not run, not extrapolated")
    loss_fn = C.impl_fn("critic_loss", backend, alg)
    kernel_backend = backend if backend in C.KERNEL_BACKENDS else None
    try:
        with use_backend(kernel_backend):
            t0 = time.perf_counter()
            _step(model, opt, ids, target, loss_fn, device)  # compilation, lazy init, optimizer state
            first_s = time.perf_counter() - t0
            est, spent = first_s, 0.0
            if backend == "compile" or first_s < max(1.0, policy.rep_s):
                # warm-up (a slow eager step has nothing to warm: its first step is the estimate)
                while True:
                    est = sum(_step(model, opt, ids, target, loss_fn, device)) / 1e3
                    spent += est
                    if spent >= policy.warmup_s or est > policy.max_call_s:
                        break
            if est > policy.max_call_s:
                reps = 1
            else:
                reps = max(policy.min_reps, min(50, int(math.ceil(2 * policy.rep_s / max(est, 1e-9)))))
            steps = [_step(model, opt, ids, target, loss_fn, device) for _ in range(reps)]
    except Exception as exc:  # noqa: BLE001
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return _row(backend, alg, dt, shape, "skipped" if _is_oom(exc) else "error",
                    f"{type(exc).__name__}: {str(exc)[:300]}")
    totals = [sum(s) for s in steps]
    losses = [s[2] + s[3] for s in steps]
    segs = {name: float(median([s[i] for s in steps])) for i, name in enumerate(SEGMENTS)}
    return _row(backend, alg, dt, shape, "ok", None,
                step_ms=float(median(totals)), step_min_ms=float(min(totals)), step_max_ms=float(max(totals)),
                loss_ms=float(median(losses)), loss_share=float(median([l / t for l, t in zip(losses, totals)])),
                segments_ms=segs, reps=len(steps),
                compile_s=float(first_s) if backend == "compile" else None)
