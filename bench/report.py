"""Markdown tables from a benchmark result (the dict `harness.run` returns, or its JSON file).

    python bench/run.py --report bench/results/cpu.json      # prints the headline table
    from dvpo.bench.report import headline_table
"""

from __future__ import annotations

import json
from typing import Dict, List, Optional

MODE_ORDER = ("fwd+bwd", "fwd", "bwd")
IMPL_ORDER = ("eager", "compile", "reference", "cpp", "triton", "cuda")


def load(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def impl_label(row: dict) -> str:
    b, a = row["backend"], row.get("algorithm")
    label = {"eager": "eager (reference)", "compile": "torch.compile (reference)",
             "reference": "dvpo reference fallback"}.get(b, b)
    return f"{label} [{a}]" if a else label


def _impl_key(row: dict):
    b = row["backend"]
    return (IMPL_ORDER.index(b) if b in IMPL_ORDER else 99, row.get("algorithm") or "")


def fmt_ms(x: Optional[float]) -> str:
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit, div in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def fmt_rate(x: Optional[float]) -> str:
    if x is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def fmt_x(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.1f}x" if x >= 10 else f"{x:.2f}x"


def fmt_pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _same_shape(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in set(a) | set(b))


def _short(reason: Optional[str], n: int = 90) -> str:
    if not reason:
        return ""
    reason = reason.replace("|", "/").replace("\n", " ")
    return reason if len(reason) <= n else reason[: n - 1] + "…"


def environment_line(result: dict) -> str:
    env, floor = result.get("environment", {}), result.get("floor", {})
    commit = (env.get("git_commit") or "unknown")[:10] + (" (dirty)" if env.get("git_dirty") else "")
    dev = env.get("gpu_name") or f"{env.get('cpu_model')} ({env.get('num_threads')} threads)"
    flops = floor.get("matmul_flops_per_s")
    floor_txt = (f"floor: {flops / 1e9:.1f} GFLOP/s fp32 matmul / {floor.get('flops_per_pair', 8)} flops per pair = "
                 f"{fmt_rate(floor.get('pair_floor_per_s'))} pair/s" if flops else "floor: not measured")
    versions = f"torch {env.get('torch')}" + (f", CUDA {env.get('cuda')}" if env.get("cuda") else "") \
        + (f", triton {env.get('triton')}" if env.get("triton") else "")
    return f"{dev}; {versions}; commit {commit}; {floor_txt}."


def op_table(result: dict, op: str, shape: Dict[str, Optional[int]], dtypes: Optional[List[str]] = None,
             main_mode: str = "fwd+bwd") -> str:
    """One row per (implementation, dtype) at `shape`: fwd+bwd / fwd / bwd medians, memory, throughput,
    share of the floor and speedups (taken from the `main_mode` row)."""
    rows = [r for r in result.get("rows", []) if r["op"] == op and _same_shape(r["shape"], shape)
            and (dtypes is None or r["dtype"] in dtypes)]
    by_impl: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        by_impl.setdefault((r["backend"], r.get("algorithm"), r["dtype"]), {})[r["mode"]] = r
    modes = [m for m in MODE_ORDER if any(m in d for d in by_impl.values())]
    header = (["backend", "dtype"] + [f"{m} ms" for m in modes]
              + ["peak extra mem", "tokens/s", "pairs/s", "of floor", "vs eager", "vs compile"])
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join(["---", "---"] + ["---:"] * (len(header) - 2)) + " |"]
    dtype_rank = {d: i for i, d in enumerate(dtypes or [])}
    keys = sorted(by_impl, key=lambda k: (dtype_rank.get(k[2], 9), _impl_key({"backend": k[0], "algorithm": k[1]})))
    notes = []
    for key in keys:
        d = by_impl[key]
        main = d.get(main_mode) or next(iter(d.values()))
        label = impl_label(main)
        if main.get("warnings"):
            notes.append(f"{label}, {key[2]}: {_short(main['warnings'][0], 200)}")
            label += f" (see note {len(notes)})"
        if main["status"] != "ok":
            cells = [label, key[2]] + [f"{main['status']}: {_short(main['reason'])}"] + [""] * (len(header) - 3)
        else:
            cells = [label, key[2]]
            cells += [fmt_ms(d[m]["median_ms"]) if m in d and d[m]["status"] == "ok" else "-" for m in modes]
            cells += [fmt_bytes(main["peak_mem_bytes"]), fmt_rate(main["tokens_per_s"]),
                      fmt_rate(main["pairs_per_s"]), fmt_pct(main["floor_fraction"]),
                      fmt_x(main["speedup_vs_eager"]), fmt_x(main["speedup_vs_compile"])]
        lines.append("| " + " | ".join(cells) + " |")
    for i, note in enumerate(notes, 1):
        lines.append(f"\nNote {i}: {note}")
    return "\n".join(lines)


def e2e_table(result: dict) -> str:
    e2e = result.get("e2e") or {}
    rows = e2e.get("rows") or []
    if not rows:
        return ""
    s = (e2e.get("config") or {}).get("shape", {})
    title = (f"**End-to-end critic update** (tiny Llama backbone, hidden {s.get('hidden')}, {s.get('layers')} layers, "
             f"B={s.get('B')} x T={s.get('T')} tokens, H={s.get('H')} heads of N={s.get('N')}, M={s.get('M')}):")
    header = ["loss backend", "dtype", "step ms", "loss fwd+bwd ms", "loss share of step", "step vs eager",
              "step vs compile"]
    lines = [title, "", "| " + " | ".join(header) + " |",
             "| " + " | ".join(["---", "---"] + ["---:"] * (len(header) - 2)) + " |"]
    for r in sorted(rows, key=lambda r: (r["dtype"], _impl_key(r))):
        if r["status"] != "ok":
            cells = [impl_label(r), r["dtype"], f"{r['status']}: {_short(r['reason'])}", "", "", "", ""]
        else:
            cells = [impl_label(r), r["dtype"], fmt_ms(r["step_ms"]), fmt_ms(r["loss_ms"]), fmt_pct(r["loss_share"]),
                     fmt_x(r["speedup_vs_eager"]), fmt_x(r["speedup_vs_compile"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline_table(result: dict, with_e2e: bool = True) -> str:
    """The README table: the fused critic loss (all terms), fwd+bwd at the headline shape, every
    implementation and headline dtype, with the environment line and (optionally) the e2e table."""
    h = result.get("headline") or {}
    shape = h.get("shape") or {}
    dtypes = h.get("dtypes") or ["fp32"]
    # fall back to whatever dtypes were measured at the headline shape
    present = {r["dtype"] for r in result.get("rows", []) if r["op"] == h.get("op") and _same_shape(r["shape"], shape)}
    dtypes = [d for d in dtypes if d in present] or sorted(present)
    title = (f"**Fused critic loss (all terms), forward+backward, N={shape.get('N')} M={shape.get('M')} "
             f"H={shape.get('H')}, {shape.get('tokens'):,} tokens, {'/'.join(dtypes) or '-'}**"
             if shape.get("tokens") else "**Fused critic loss**")
    quick = " (quick mode: small shapes, not the headline)" if result.get("quick") else ""
    parts = [title + quick, "", environment_line(result), ""]
    if present:
        parts.append(op_table(result, h.get("op", "critic_loss"), shape, dtypes, h.get("mode", "fwd+bwd")))
    else:
        parts.append("_no measurement at the headline shape in this run_")
    if with_e2e:
        e2e = e2e_table(result)
        if e2e:
            parts += ["", e2e]
    return "\n".join(parts)


def all_headline_tables(result: dict) -> str:
    """The headline table plus one table per other op at its headline shape (fp32)."""
    sw = result.get("sweeps") or {}
    parts = [headline_table(result)]
    tokens, n, m, h = sw.get("headline_tokens"), sw.get("N"), sw.get("M"), sw.get("H")
    t_len = sw.get("gae_T")
    shapes = {
        "quantile_huber": {"tokens": tokens, "N": n, "M": m, "H": None, "B": None, "T": None},
        "cvar": {"tokens": tokens, "N": n, "M": None, "H": None, "B": None, "T": None},
    }
    if tokens and t_len:
        t_len = min(tokens, t_len)
        shapes["distributional_gae"] = {"tokens": (tokens // t_len) * t_len, "N": None, "M": m, "H": None,
                                        "B": tokens // t_len, "T": t_len}
    for op, shape in shapes.items():
        if any(r["op"] == op and _same_shape(r["shape"], shape) for r in result.get("rows", [])):
            mode = "fwd" if op == "distributional_gae" else "fwd+bwd"
            parts += ["", f"**{op}**, {mode}, " + ", ".join(f"{k}={v}" for k, v in shape.items() if v is not None), "",
                      op_table(result, op, shape, None, mode)]
    return "\n".join(parts)
