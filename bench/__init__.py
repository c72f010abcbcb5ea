"""dvpo's benchmark harness (installed as `dvpo.bench`; run with `dvpo bench` or `python bench/run.py`).

Modules (imported lazily by the runner; keep this file free of heavy imports):

- `dvpo.bench.harness`: the sweep of ops x backends x dtypes x shapes, JSON result, schema check
- `dvpo.bench.cases`: what each op benchmarks (inputs, eager/compile baselines, dvpo.ops calls)
- `dvpo.bench.timing`: CPU (perf_counter) and GPU (CUDA events, L2 flush) timers, peak memory
- `dvpo.bench.env`: device, versions, git commit, and the measured compute/bandwidth floor
- `dvpo.bench.e2e`: one critic update of a tiny causal-LM critic, split into segments
- `dvpo.bench.plots`, `dvpo.bench.report`: PNG plots and the Markdown headline table
- `dvpo.bench.run`: the command line (`add_arguments`, `main`)
"""

SCHEMA_VERSION = 1
