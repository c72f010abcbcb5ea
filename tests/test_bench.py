"""The benchmark harness (bench/, installed as dvpo.bench): it runs, and its JSON has the documented
schema. Timings are never asserted (docs/architecture.md, "Performance": performance is measured by
bench/, not by tests)."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
    import dvpo.bench.harness  # noqa: F401
except ImportError:  # dvpo installed before bench/__init__.py existed: map bench/ as run.py does
    _spec = importlib.util.spec_from_file_location("_dvpo_bench_run", os.path.join(REPO, "bench", "run.py"))
    _run = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_run)
    _run._bootstrap()

from dvpo.bench import cases as C  # noqa: E402
from dvpo.bench import harness, report  # noqa: E402

# As fast as the harness can go: one warm-up and one timed call per measurement, tiny shapes.
FAST = dict(quick=True, device="cpu", warmup_s=0.0, rep_s=0.0, min_reps=1, max_reps=1, progress=False,
            tokens=[32, 64], nm=[(8, 8), (4, 16)], heads=[1, 2])


def _tiny_plan(monkeypatch):
    """Shrink the quick plan's headline further (the harness always adds the headline shape)."""
    original = C.SweepPlan.default

    def tiny(device, quick):
        plan = original(device, quick)
        plan.headline_tokens, plan.N, plan.M, plan.H, plan.gae_T, plan.seq = 32, 8, 8, 2, 4, (4, 8)
        plan.crossover = (4, 12)
        return plan

    monkeypatch.setattr(C.SweepPlan, "default", staticmethod(tiny))


@pytest.fixture(scope="module")
def no_compile_result(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    _tiny_plan(mp)
    out = tmp_path_factory.mktemp("bench_nocompile")
    try:
        cfg = harness.BenchConfig(out=str(out), compile=False, e2e=False, plots=True, **FAST)
        result = harness.run(cfg)
        expected = _expected_rows(cfg)
    finally:
        mp.undo()
    return out, result, expected


def _expected_rows(cfg):
    device = torch.device("cpu")
    plan = harness.build_plan(cfg, device)
    status, modules = C.backend_ops(device)
    work = harness.plan_work(cfg, device, plan, status, modules, [])
    return sum(len(spec.modes) * len(impls) for _op, spec, _s, _sw, _dt, impls in work)


def test_json_schema_one_row_per_measurement(no_compile_result):
    out, result, expected = no_compile_result
    path = out / "cpu-quick.json"
    assert path.exists()
    loaded = json.loads(path.read_text())
    harness.validate_result(loaded)  # keys, types, statuses, no duplicate measurement
    assert loaded["schema_version"] == 1 and loaded["kind"] == "dvpo-bench"
    env = loaded["environment"]
    for key in ("device", "device_name", "cpu_model", "torch", "triton", "cuda", "git_commit", "num_threads"):
        assert key in env
    assert isinstance(loaded["floor"]["matmul_flops_per_s"], float) and loaded["floor"]["flops_per_pair"] == 8
    rows = loaded["rows"]
    assert len(rows) == expected  # one row per (op, impl, algorithm, dtype, shape, mode)
    for row in rows:
        assert set(row) == set(harness.ROW_KEYS)
        assert "speedup_vs_eager" in row and "speedup_vs_compile" in row
        assert set(row["shape"]) == set(C.SHAPE_KEYS)
    ops = {r["op"] for r in rows}
    assert ops == set(C.OPS)
    eager_ok = [r for r in rows if r["backend"] == "eager" and r["status"] == "ok"]
    assert eager_ok, "the eager baseline must be measured"
    for r in eager_ok:  # identities, not timings
        assert r["speedup_vs_eager"] == pytest.approx(1.0)
        assert isinstance(r["median_ms"], float) and r["min_ms"] <= r["median_ms"] <= r["max_ms"]
    # every measured dvpo backend row has a speedup against eager of the same shape
    for r in rows:
        if r["status"] == "ok" and r["backend"] not in C.BASELINES:
            assert isinstance(r["speedup_vs_eager"], float)
            assert r["speedup_vs_compile"] is None  # compile was off
    gae = [r for r in rows if r["op"] == "distributional_gae"]
    assert gae and {r["mode"] for r in gae} == {"fwd"}
    for r in rows:
        if r["status"] == "ok" and r["mode"] != "bwd" and r["op"] != "distributional_gae":
            assert r["floor_kind"] == "compute" and isinstance(r["floor_fraction"], float)
    # the memory floor beside the pair floor, on every measured row (backward-only rows too)
    for r in rows:
        if r["status"] == "ok":
            assert isinstance(r["bytes_moved"], int) and r["bytes_moved"] > 0
            assert isinstance(r["gb_per_s"], float) and isinstance(r["mem_floor_ratio"], float)
    # the sorted/pairwise crossover sweep: both C++ algorithms at every N = M of the plan
    cross = {(r["op"], r["algorithm"], r["shape"]["N"]) for r in rows
             if "crossover" in r["sweeps"] and r["backend"] == "cpp" and r["status"] == "ok"}
    for op in ("quantile_huber", "critic_loss"):
        for n in (4, 12):
            assert {(op, "pairwise", n), (op, "sorted", n)} <= cross, (op, n)
    assert loaded["sweeps"]["crossover"] == [4, 12]
    # compile was switched off: recorded as not run, with the reason
    assert any(s["backend"] == "compile" and "no-compile" in s["reason"] for s in loaded["skipped"])


def test_outputs_plots_and_markdown(no_compile_result):
    out, result, _ = no_compile_result
    assert (out / "cpu-quick_headline.md").exists()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "cpu-quick_speedup_fp32.png" in pngs and "cpu-quick_time_vs_tokens_fp32.png" in pngs
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = report.headline_table(result)
    assert "| backend |" in md and "eager (reference)" in md and "vs compile" in md
    assert "critic loss" in md.lower()
    full = report.all_headline_tables(result)
    assert "quantile_huber" in full and "distributional_gae" in full
    assert "GB/s" in md and "time / mem floor" in md
    assert "cpp pairwise vs sorted" in full and "token sweep" in full


def test_min_bytes_by_mode():
    """The memory floor's byte counts, from shapes and dtypes: the forward reads the inputs and writes
    the per-token values (fp32) and the stored gradient (input dtype); the backward reads that
    gradient (and the upstream one) and writes the input's gradient."""
    spec = C.SPECS["critic_loss"]
    s = C.Shape(10, N=4, M=6, H=3)
    fwd = 10 * (3 * 4 * 2 + 6 * 2 + 4 + C.N_TERMS * 4 + 3 * 4 * 2)  # bf16 in, fp32 values, bf16 gradient
    bwd = 10 * (3 * 4 * 2 + 4 + 3 * 4 * 2)
    assert spec.min_bytes(s, torch.bfloat16, "fwd") == fwd
    assert spec.min_bytes(s, torch.bfloat16, "bwd") == bwd
    assert spec.min_bytes(s, torch.bfloat16, "fwd+bwd") == fwd + bwd
    qh = C.SPECS["quantile_huber"]
    assert qh.min_bytes(C.Shape(2, N=3, M=5), torch.float32, "fwd") == 2 * ((3 + 5) * 4 + 4 + 3 * 4)


def test_crossover_sweep_plan():
    """The crossover sweep: N = M over plan.crossover for the quantile-Huber ops, at about the
    headline's pair count (32 tokens at least)."""
    plan = C.SweepPlan.default(torch.device("cpu"), quick=False)
    shapes = [s for s, sw in plan.shapes("critic_loss", ["crossover"]) if "crossover" in sw]
    assert sorted(s.N for s in shapes) == sorted(plan.crossover)
    for s in shapes:
        assert s.N == s.M and s.H == plan.H
        assert s.tokens == max(32, min(plan.headline_tokens, plan.headline_tokens * 200 * 200 // (s.N * s.N)))
    assert not [s for s, sw in plan.shapes("cvar", ["crossover"]) if "crossover" in sw]
    assert plan.tokens[0] == 1024 and plan.tokens[-1] == 262144


def test_compile_baseline_memory_skip_and_e2e(tmp_path, monkeypatch):
    """The compile baseline (on the smallest graph, CVaR: torch.compile warm-up is the slow part), an eager
    case skipped by the memory budget, and the end-to-end step with a tiny backbone. (The quick mode
    itself compiles every op; CI runs `python bench/run.py --quick` for that.)"""
    _tiny_plan(monkeypatch)
    cfg = harness.BenchConfig(out=str(tmp_path), ops=["cvar"], backends=["eager", "compile", "reference"],
                              compile_ops=["cvar"], sweeps=["tokens"], filter="tokens=32", plots=False, e2e=False,
                              **FAST)
    rows = harness.run(cfg)["rows"]
    comp = [r for r in rows if r["backend"] == "compile"]
    assert comp and all(r["status"] == "ok" for r in comp), comp
    assert all(isinstance(r["compile_s"], float) for r in comp)
    for r in rows:
        if r["status"] == "ok":
            assert isinstance(r["speedup_vs_compile"], float)

    pytest.importorskip("transformers")
    cfg_e2e = harness.BenchConfig(out=str(tmp_path / "e2e"), backends=["eager", "reference"], micro=False,
                                  plots=True, **FAST)
    result = harness.run(cfg_e2e)
    assert result["rows"] == []
    assert (tmp_path / "e2e" / "cpu-quick_e2e.png").exists()
    e2e = result["e2e"]
    assert e2e is not None and e2e["rows"]
    by_backend = {r["backend"]: r for r in e2e["rows"]}
    assert {"eager", "reference"} <= set(by_backend)
    for r in e2e["rows"]:
        assert set(r) == set(harness.E2E_ROW_KEYS)
        assert r["status"] == "ok", r
        assert set(r["segments_ms"]) == {"backbone_fwd", "heads_fwd", "loss_fwd", "loss_bwd", "model_bwd", "optimizer"}
        assert 0.0 <= r["loss_share"] <= 1.0
    assert by_backend["eager"]["speedup_vs_eager"] == pytest.approx(1.0)

    # an absurdly small memory budget: eager/compile are skipped with the reason, never extrapolated
    cfg2 = harness.BenchConfig(out=str(tmp_path / "mem"), ops=["critic_loss"], backends=["eager", "reference"],
                               sweeps=["tokens"], filter="tokens=32", plots=False, e2e=False, mem_fraction=1e-12,
                               **FAST)
    rows2 = harness.run(cfg2)["rows"]
    eager = [r for r in rows2 if r["backend"] == "eager"]
    assert eager and all(r["status"] == "skipped" and "does not fit" in r["reason"] for r in eager)
    assert all(r["median_ms"] is None and r["speedup_vs_eager"] is None for r in eager)
    ref_rows = [r for r in rows2 if r["backend"] == "reference"]
    assert ref_rows and all(r["status"] == "ok" and r["speedup_vs_eager"] is None for r in ref_rows)
    harness.validate_result(json.loads((tmp_path / "mem" / "cpu-quick.json").read_text()))


def test_validate_result_rejects_bad_rows(no_compile_result):
    _out, result, _ = no_compile_result
    bad = json.loads(json.dumps(result))
    bad["rows"].append(dict(bad["rows"][0]))  # duplicate measurement
    with pytest.raises(ValueError, match="duplicate"):
        harness.validate_result(bad)
    bad = json.loads(json.dumps(result))
    del bad["rows"][0]["speedup_vs_compile"]
    with pytest.raises(ValueError, match="missing keys"):
        harness.validate_result(bad)
    bad = json.loads(json.dumps(result))
    bad["rows"][0]["status"] = "skipped"
    bad["rows"][0]["reason"] = None
    with pytest.raises(ValueError, match="needs a reason"):
        harness.validate_result(bad)


def test_filter_parsing():
    f = harness.parse_filter("op=critic_loss,cvar;backend=cpp tokens=4096 N=200")
    assert f == {"op": {"critic_loss", "cvar"}, "backend": {"cpp"}, "tokens": {"4096"}, "N": {"200"}}
    assert harness._match(f, "op", "cvar") and not harness._match(f, "op", "quantile_huber")
    assert harness._match(f, "dtype", "bf16")  # unconstrained key
    assert harness._shape_matches(f, C.Shape(4096, N=200, M=32)) and not harness._shape_matches(f, C.Shape(1024, N=200))
    with pytest.raises(ValueError):
        harness.parse_filter("colour=red")
    with pytest.raises(ValueError):
        harness.parse_filter("op")


def test_cli_entry_points(tmp_path):
    import argparse

    from dvpo import bench_cli, cli
    from dvpo.bench import run as bench_run

    assert cli.COMMANDS["bench"][0] == "dvpo.bench_cli"
    parser = argparse.ArgumentParser(prog="dvpo bench")
    bench_cli.add_arguments(parser)  # what `dvpo bench` builds (without importing the other commands)
    args = parser.parse_args(["--quick", "--out", str(tmp_path), "--filter", "op=cvar", "--no-compile",
                              "--nm", "32x64,16"])

    cfg = bench_run.config_from_args(args, [])
    assert cfg.quick and cfg.out == str(tmp_path) and cfg.filter == "op=cvar" and cfg.compile is False
    assert cfg.nm == [(32, 64), (16, 16)]
    # the script form works from any directory (absolute imports, no reliance on the cwd)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "run.py"), "--list", "--quick",
                           "--device", "cpu", "--ops", "cvar"], capture_output=True, text=True, cwd=str(tmp_path),
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "measurements planned" in proc.stdout


class _FakeEvent:
    """A CUDA event stand-in on the host clock, for the GPU timing paths' control flow on CPU."""

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3

    def synchronize(self):
        pass


def test_gpu_timer_and_memory_paths_with_fake_cuda(monkeypatch):
    """The CUDA-event timer, the CUDA memory probe and the e2e segment clock, driven through fake
    events on CPU tensors (control flow and bookkeeping only; a GPU run measures for real)."""
    from dvpo.bench import e2e
    from dvpo.bench import timing as TM

    allocated = {"now": 0}
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocated["now"] + 4096)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)

    probe = TM.MemoryProbe(torch.device("cpu"))
    probe.method = "cuda_max_memory_allocated"
    probe.device = torch.device("cuda")  # only .type is read by the CUDA branch; the calls are faked
    timer = TM.CudaTimer(TM.TimingPolicy(0.0, 0.0, 2, 3, 5.0, 1024), torch.device("cpu"), probe)
    x = torch.randn(64, 8, requires_grad=True)
    setup, phases = C.phase_fns(C.SPECS["cvar"], C.eager("cvar"), {"x": x}, True)
    m = timer.run(phases, setup)
    assert len(m.phases) == 2 and 2 <= m.total.reps <= 3
    assert all(len(t.times_ms) == m.total.reps for t in m.phases)
    assert m.phase_mem == [4096, 4096] and m.total_mem == 4096

    clock = e2e._Clock(torch.device("cuda"), 3)
    for i in range(3):
        clock.mark(i)
    assert len(clock.elapsed()) == 2


def test_graph_replay_timing_with_fake_cuda(monkeypatch):
    """The CUDA-graph replay timing of small shapes, through fake streams, graphs and events on CPU
    tensors (control flow only: warm-up on a side stream, one capture, timed replays; a GPU run
    measures for real), and the harness's rule for when it runs and what a failed capture gives."""
    import contextlib

    from dvpo.bench import harness as H
    from dvpo.bench import timing as TM

    class FakeStream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    replays = {"n": 0}

    class FakeGraph:
        def replay(self):
            replays["n"] += 1

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)

    timer = TM.CudaTimer(TM.TimingPolicy(0.0, 0.0, 2, 3, 5.0, 0), torch.device("cpu"))
    x = torch.randn(16, 8, requires_grad=True)
    calls = {"n": 0}
    setup, phases = C.phase_fns(C.SPECS["cvar"], C.eager("cvar"), {"x": x}, True)

    def counted(state):
        calls["n"] += 1
        return phases[0](state)
    ms = timer.graph_replay([counted, phases[1]], setup, replays=4, samples=3)
    assert ms > 0 and calls["n"] == 4  # 3 warm-up calls and the captured one
    assert replays["n"] == 1 + 4 * 3  # one after the capture, then the timed ones
    small, large = C.Shape(H.GRAPH_MAX_TOKENS, N=8), C.Shape(H.GRAPH_MAX_TOKENS + 1, N=8)
    assert H._graph_replay(timer, phases, setup, "cpp", small)[0] > 0
    assert H._graph_replay(timer, phases, setup, "cpp", large) == (None, None)
    assert H._graph_replay(timer, phases, setup, None, small) == (None, None)  # eager / compile baselines
    assert H._graph_replay(TM.CpuTimer(timer.policy), phases, setup, "cpp", small) == (None, None)

    def fails(state):
        raise RuntimeError("operation not permitted when stream is capturing")
    ms, note = H._graph_replay(timer, [fails], setup, "cpp", small)
    assert ms is None and note.startswith("CUDA graph replay failed: RuntimeError: operation not permitted")


def test_resume_reuses_measurements(tmp_path, monkeypatch):
    _tiny_plan(monkeypatch)
    kw = dict(out=str(tmp_path), ops=["cvar"], backends=["eager", "reference"], compile=False, e2e=False,
              plots=False, **FAST)
    first = harness.run(harness.BenchConfig(**kw))["rows"]
    assert not (tmp_path / "cpu-quick.partial.json").exists()  # removed once the final JSON is written
    again = harness.run(harness.BenchConfig(resume=True, **kw))["rows"]
    key = lambda r: (r["backend"], r["mode"], tuple(r["shape"].values()))  # noqa: E731
    assert sorted(map(key, first)) == sorted(map(key, again))
    before = {key(r): r["median_ms"] for r in first}
    assert all(before[key(r)] == r["median_ms"] for r in again)  # reused, not re-measured
