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


def _scaled(x, units, fmt: str, plain: str) -> str:
    """x in the largest of `units` ((name, divisor), largest first) it reaches, else `plain`."""
    if x is None:
        return "-"
    for unit, div in units:
        if x >= div:
            return fmt.format(x / div, unit)
    return plain.format(x)


def fmt_bytes(n: Optional[int]) -> str:
    return _scaled(n, (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)), "{:.1f} {}", "{} B")


def fmt_rate(x: Optional[float]) -> str:
    return _scaled(x, (("G", 1e9), ("M", 1e6), ("k", 1e3)), "{:.2f}{}", "{:.0f}")


def fmt_gbps(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}"


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
              + ["peak extra mem", "tokens/s", "pairs/s", "of floor", "GB/s", "time / mem floor", "vs eager",
                 "vs compile"])
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
                      fmt_gbps(main.get("gb_per_s")), fmt_x(main.get("mem_floor_ratio")),
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


def _ok_rows(result: dict, op: str, sweep: str, mode: str, dtype: str = "fp32") -> List[dict]:
    return [r for r in result.get("rows", []) if r["op"] == op and sweep in r["sweeps"] and r["mode"] == mode
            and r["dtype"] == dtype and r["status"] == "ok" and r.get("median_ms")]


def crossover_table(result: dict) -> str:
    """The C++ CPU sorted/pairwise crossover: per op and N = M, both algorithms' microseconds per
    token (fwd+bwd, fp32) and sorted's speedup; empty when the run had no crossover sweep."""
    parts = []
    for op in ("critic_loss", "quantile_huber"):
        rows = [r for r in _ok_rows(result, op, "crossover", "fwd+bwd") if r["backend"] == "cpp"]
        by_n: Dict[int, Dict[str, float]] = {}
        for r in rows:
            by_n.setdefault(r["shape"]["N"], {})[r["algorithm"]] = 1e3 * r["median_ms"] / r["shape"]["tokens"]
        if not by_n:
            continue
        lines = [f"**{op}: cpp pairwise vs sorted, fwd+bwd fp32, N = M (us per token)**", "",
                 "| N = M | pairwise | sorted | sorted speedup |", "| ---: | ---: | ---: | ---: |"]
        for n in sorted(by_n):
            d = by_n[n]
            p, q = d.get("pairwise"), d.get("sorted")
            lines.append(f"| {n} | {'-' if p is None else f'{p:.2f}'} | {'-' if q is None else f'{q:.2f}'} | "
                         f"{fmt_x(p / q) if p and q else '-'} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def token_sweep_table(result: dict, op: str = "critic_loss") -> str:
    """The token sweep of `op` (fwd+bwd, fp32): median ms, GB/s and time over the memory floor per
    implementation and token count, and on a GPU the CUDA-graph replay time of small shapes."""
    rows = _ok_rows(result, op, "tokens", "fwd+bwd")
    if not rows:
        return ""
    tokens = sorted({r["shape"]["tokens"] for r in rows})
    impls = sorted({(r["backend"], r.get("algorithm")) for r in rows},
                   key=lambda k: _impl_key({"backend": k[0], "algorithm": k[1]}))
    cell = {(r["backend"], r.get("algorithm"), r["shape"]["tokens"]): r for r in rows}
    graphs = any(r.get("graph_replay_ms") for r in rows)
    lines = [f"**{op} token sweep, fwd+bwd fp32: median ms (GB/s, time / memory floor"
             + ("; ms per CUDA-graph replay" if graphs else "") + ")**", "",
             "| tokens | " + " | ".join(impl_label({"backend": b, "algorithm": a}) for b, a in impls) + " |",
             "| ---: | " + " | ".join("---:" for _ in impls) + " |"]
    for t in tokens:
        cells = []
        for b, a in impls:
            r = cell.get((b, a, t))
            graph = f"; graph {fmt_ms(r['graph_replay_ms'])}" if r is not None and r.get("graph_replay_ms") else ""
            cells.append("-" if r is None else f"{fmt_ms(r['median_ms'])} ({fmt_gbps(r.get('gb_per_s'))}, "
                                               f"{fmt_x(r.get('mem_floor_ratio'))}{graph})")
        lines.append(f"| {t:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    for extra in (crossover_table(result), token_sweep_table(result)):
        if extra:
            parts += ["", extra]
    return "\n".join(parts)
