"""PNG plots of a benchmark result (matplotlib, Agg backend; no display needed).

- `<tag>_speedup_<dtype>.png`: speedup bars (vs eager, vs torch.compile) per backend at each op's
  headline shape (fwd+bwd; GAE: fwd);
- `<tag>_time_vs_tokens_<dtype>.png`: median time vs tokens, log-log, one line per implementation;
- `<tag>_time_vs_size_<dtype>.png`: median time vs N*M (CVaR: N, GAE: M), log-log, plus time vs H for
  the critic loss;
- `<tag>_e2e.png`: the end-to-end critic update split into segments (share of the step) per backend.
"""

from __future__ import annotations

import os
from typing import Dict, List

from dvpo.bench.report import IMPL_ORDER, fmt_ms, impl_label

OP_TITLES = {"quantile_huber": "quantile Huber", "cvar": "CVaR", "critic_loss": "fused critic loss",
             "distributional_gae": "distributional GAE"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


_COLORS = {("eager", None): "C0", ("compile", None): "C1", ("reference", None): "C2", ("reference", "pairwise"): "C2",
           ("cpp", None): "C3", ("cpp", "pairwise"): "C3", ("cpp", "sorted"): "C4",
           ("triton", None): "C5", ("triton", "pairwise"): "C5", ("triton", "sorted"): "C6",
           ("cuda", None): "C8", ("cuda", "pairwise"): "C8", ("cuda", "sorted"): "C9"}


def _color(row: dict):
    """The same colour for an implementation in every panel and figure."""
    return _COLORS.get((row["backend"], row.get("algorithm")), "C7")


def _main_mode(op: str) -> str:
    return "fwd" if op == "distributional_gae" else "fwd+bwd"


def _impl_sort(label_rows):
    def key(item):
        r = item[1][0]
        b = r["backend"]
        return (IMPL_ORDER.index(b) if b in IMPL_ORDER else 99, r.get("algorithm") or "")
    return sorted(label_rows, key=key)


def _headline_shape(result: dict, op: str) -> Dict[str, object]:
    sw = result.get("sweeps") or {}
    t, n, m, h, t_len = (sw.get("headline_tokens"), sw.get("N"), sw.get("M"), sw.get("H"), sw.get("gae_T"))
    if op == "quantile_huber":
        return {"tokens": t, "N": n, "M": m, "H": None, "B": None, "T": None}
    if op == "cvar":
        return {"tokens": t, "N": n, "M": None, "H": None, "B": None, "T": None}
    if op == "critic_loss":
        return {"tokens": t, "N": n, "M": m, "H": h, "B": None, "T": None}
    t_len = min(t, t_len)
    return {"tokens": (t // t_len) * t_len, "N": None, "M": m, "H": None, "B": t // t_len, "T": t_len}


def _ok(rows):
    return [r for r in rows if r["status"] == "ok" and r.get("median_ms")]


def speedup_plot(result: dict, dtype: str, path: str) -> bool:
    plt = _plt()
    ops = [op for op in OP_TITLES if any(r["op"] == op for r in result.get("rows", []))]
    panels = []
    for op in ops:
        shape = _headline_shape(result, op)
        rows = [r for r in _ok(result["rows"]) if r["op"] == op and r["dtype"] == dtype
                and r["mode"] == _main_mode(op) and r["shape"] == shape and r["backend"] != "eager"]
        if rows:
            panels.append((op, shape, rows))
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1, 4.4), squeeze=False)
    for ax, (op, shape, rows) in zip(axes[0], panels):
        rows = sorted(rows, key=lambda r: (IMPL_ORDER.index(r["backend"]), r.get("algorithm") or ""))
        labels = [impl_label(r).replace(" (reference)", "").replace("dvpo reference fallback", "ref. fallback")
                  for r in rows]
        xs = range(len(rows))
        width = 0.38
        for off, key, name in ((-width / 2, "speedup_vs_eager", "vs eager"),
                               (width / 2, "speedup_vs_compile", "vs torch.compile")):
            vals = [r.get(key) or 0.0 for r in rows]
            bars = ax.bar([x + off for x in xs], [v if v > 0 else float("nan") for v in vals], width, label=name)
            for b, v in zip(bars, vals):
                if v > 0:
                    ax.annotate(f"{v:.3g}x", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        dims = ", ".join(f"{k}={v}" for k, v in shape.items() if v is not None)
        ax.set_title(f"{OP_TITLES[op]} ({_main_mode(op)})\n{dims}", fontsize=9)
        ax.set_ylabel("speedup (higher is better)")
        ax.legend(fontsize=7)
    env = result.get("environment", {})
    fig.suptitle(f"dvpo speedups at the headline shape, {dtype}, {env.get('device_name')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _lines(ax, rows, xkey, xlabel, connect=None):
    """One line per implementation; rows for which `connect(row)` is False (e.g. N != M at the same
    N*M as a square shape) are drawn as hollow markers of the same colour, not joined."""
    by_impl: Dict[str, List[dict]] = {}
    for r in rows:
        by_impl.setdefault(impl_label(r), []).append(r)
    drew = False
    for label, rs in _impl_sort(by_impl.items()):
        rs = sorted(rs, key=xkey)
        joined = [r for r in rs if connect is None or connect(r)]
        loose = [r for r in rs if connect is not None and not connect(r)]
        color = _color(rs[0])
        ax.plot([xkey(r) for r in joined], [r["median_ms"] for r in joined], marker="o", ms=3, label=label,
                color=color)
        if loose:
            ax.scatter([xkey(r) for r in loose], [r["median_ms"] for r in loose], s=18, facecolors="none",
                       edgecolors=color)
        drew = True
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("median ms")
    ax.grid(True, which="both", lw=0.3)
    if drew:
        ax.legend(fontsize=6)
    return drew


def tokens_plot(result: dict, dtype: str, path: str) -> bool:
    plt = _plt()
    panels = []
    for op in OP_TITLES:
        rows = [r for r in _ok(result.get("rows", [])) if r["op"] == op and r["dtype"] == dtype
                and r["mode"] == _main_mode(op) and "tokens" in r["sweeps"]]
        if rows:
            panels.append((op, rows))
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1, 4.2), squeeze=False)
    for ax, (op, rows) in zip(axes[0], panels):
        _lines(ax, rows, lambda r: r["shape"]["tokens"], "tokens")
        ax.set_title(f"{OP_TITLES[op]} ({_main_mode(op)})", fontsize=9)
    fig.suptitle(f"time vs tokens, {dtype}, {result.get('environment', {}).get('device_name')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def size_plot(result: dict, dtype: str, path: str) -> bool:
    plt = _plt()
    xspec = {"quantile_huber": (lambda s: s["N"] * s["M"], "N*M (N = M joined; hollow: N != M)"),
             "critic_loss": (lambda s: s["N"] * s["M"], "N*M (N = M joined; hollow: N != M)"),
             "cvar": (lambda s: s["N"], "N"),
             "distributional_gae": (lambda s: s["M"], "M")}
    panels = []
    for op in OP_TITLES:
        rows = [r for r in _ok(result.get("rows", [])) if r["op"] == op and r["dtype"] == dtype
                and r["mode"] == _main_mode(op) and "nm" in r["sweeps"]]
        if rows:
            f, label = xspec[op]
            panels.append((OP_TITLES[op], rows, f, label))
    heads = [r for r in _ok(result.get("rows", [])) if r["op"] == "critic_loss" and r["dtype"] == dtype
             and r["mode"] == "fwd+bwd" and "heads" in r["sweeps"]]
    if heads:
        panels.append(("fused critic loss vs heads", heads, lambda s: s["H"], "H"))
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1, 4.2), squeeze=False)
    def square(r):
        s = r["shape"]
        return s["N"] is None or s["M"] is None or s["N"] == s["M"]

    for ax, (title, rows, f, label) in zip(axes[0], panels):
        _lines(ax, rows, lambda r, f=f: f(r["shape"]), label, connect=square)
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"time vs size at fixed tokens, {dtype}, {result.get('environment', {}).get('device_name')}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def e2e_plot(result: dict, path: str) -> bool:
    e2e = result.get("e2e") or {}
    rows = [r for r in (e2e.get("rows") or []) if r["status"] == "ok" and r.get("segments_ms")]
    if not rows:
        return False
    plt = _plt()
    segs = (e2e.get("config") or {}).get("segments") or list(rows[0]["segments_ms"])
    rows = sorted(rows, key=lambda r: (r["dtype"], IMPL_ORDER.index(r["backend"]), r.get("algorithm") or ""))
    labels = [f"{impl_label(r)} {r['dtype']}".replace(" (reference)", "") for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(rows) + 1.8))
    left = [0.0] * len(rows)
    colors = {"backbone_fwd": "#1f77b4", "heads_fwd": "#17becf", "loss_fwd": "#d62728", "loss_bwd": "#ff9896",
              "model_bwd": "#2ca02c", "optimizer": "#7f7f7f"}
    for seg in segs:
        vals = [r["segments_ms"][seg] / sum(r["segments_ms"].values()) for r in rows]
        ax.barh(range(len(rows)), vals, left=left, label=seg, color=colors.get(seg))
        left = [a + b for a, b in zip(left, vals)]
    for i, r in enumerate(rows):
        ax.annotate(f"{fmt_ms(r['step_ms'])} ms/step, loss {100 * r['loss_share']:.0f}%", (1.01, i), va="center",
                    fontsize=7, annotation_clip=False)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of one critic update")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.18 - 0.02 * len(rows)))
    s = (e2e.get("config") or {}).get("shape", {})
    ax.set_title(f"end-to-end critic step: B={s.get('B')} T={s.get('T')} N={s.get('N')} M={s.get('M')} "
                 f"H={s.get('H')}, hidden {s.get('hidden')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def make_plots(result: dict, out_dir: str, tag: str) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    files = []
    dtypes = sorted({r["dtype"] for r in result.get("rows", [])}, key=lambda d: ("fp32", "bf16", "fp16").index(d))
    for dt in dtypes:
        for name, fn in (("speedup", speedup_plot), ("time_vs_tokens", tokens_plot), ("time_vs_size", size_plot)):
            path = os.path.join(out_dir, f"{tag}_{name}_{dt}.png")
            if fn(result, dt, path):
                files.append(path)
    path = os.path.join(out_dir, f"{tag}_e2e.png")
    if e2e_plot(result, path):
        files.append(path)
    return files
