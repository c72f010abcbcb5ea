"""Run a grid: the SFT warm starts first (one per task/seed/model, cached in OUT/sft_cache), then the RL
runs in a pool of processes (one torch thread each), resumable: finished runs are skipped, interrupted
ones continue from their last checkpoint, a failed run is recorded without stopping the grid."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import multiprocessing
import os
import time
import traceback
from typing import Dict, List, Optional, Sequence

from .grid import RunSpec

FINISHED = ("ok", "aborted")


def read_summary(run_dir: str) -> Optional[Dict]:
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def run_state(run_dir: str, steps: int) -> str:
    """done (finished with at least `steps` steps, or aborted), failed, partial (has a checkpoint or
    metrics) or pending."""
    s = read_summary(run_dir)
    if s is not None:
        if s.get("status") == "aborted" or (s.get("status") == "ok" and int(s.get("steps") or 0) >= steps):
            return "done"
        if s.get("status") == "failed":
            return "failed"
    if os.path.exists(os.path.join(run_dir, "ckpt", "state.json")) or \
            os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        return "partial"
    return "pending"


def _write_json(path: str, obj) -> None:
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


# ---- worker side (top-level functions: picklable under spawn) ------------------------------------------

def _quiet_hf():
    """No transformers progress bars or advisories from the workers (they would break the grid's bar)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # noqa: BLE001 - cosmetic
        pass


def _init_worker():
    _quiet_hf()
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


def _file_logger(path: str):
    def log(msg, *_a, **_k):
        with open(path, "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
    return log


def sft_job(cfg_dict: Dict) -> Dict:
    """Train (or find) one SFT warm start; returns its dir, seconds and validation accuracy."""
    from dvpo.trainer.config import SFTConfig, from_dict
    from dvpo.trainer.sft import sft, sft_dir

    _quiet_hf()
    cfg = from_dict(SFTConfig, cfg_dict)
    t0 = time.time()
    path = sft_dir(cfg)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    path = sft(cfg, log=_file_logger(path + ".log"))
    with open(os.path.join(path, "sft.json")) as f:
        meta = json.load(f)
    return {"dir": path, "task": cfg.task, "seed": cfg.seed, "wall_s": time.time() - t0,
            "steps": meta.get("steps"), "val_acc": meta.get("val_acc"), "seconds": meta.get("seconds")}


def run_job(cfg_dict: Dict) -> Dict:
    """One RL run (resumed when its dir holds a checkpoint); never raises: a failure is recorded in
    its summary.json with status "failed"."""
    from dvpo.trainer.config import TrainConfig, from_dict

    _quiet_hf()
    cfg = from_dict(TrainConfig, cfg_dict)
    out = cfg.out
    os.makedirs(out, exist_ok=True)
    log = _file_logger(os.path.join(out, "log.txt"))
    t0 = time.time()
    try:
        import torch

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        from dvpo.trainer.loop import train

        cfg.resume = os.path.exists(os.path.join(out, "ckpt", "state.json"))
        if cfg.resume:
            log(f"resuming from {os.path.join(out, 'ckpt')}")
        summary = train(cfg, log=log)
        summary["grid_wall_s"] = time.time() - t0
        return summary
    except BaseException as exc:  # noqa: BLE001 - recorded, the grid goes on
        tb = traceback.format_exc()
        log(tb)
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        summary = {"status": status, "error": f"{type(exc).__name__}: {exc}", "traceback": tb, "out": out,
                   "algo": cfg.algo, "task": cfg.task, "noise": cfg.noise, "seed": cfg.seed,
                   "wall_seconds": time.time() - t0}
        try:
            _write_json(os.path.join(out, "summary.json"), summary)
        except OSError:
            pass
        if isinstance(exc, KeyboardInterrupt):
            raise
        return summary


# ---- main side -------------------------------------------------------------------------------------------

def sft_configs(configs) -> List:
    """The distinct SFT warm starts the runs need (by cache dir), in run order."""
    from dvpo.trainer.sft import sft_dir

    seen, out = set(), []
    for cfg in configs:
        if cfg.init:
            continue
        s = cfg.sft_config()
        d = sft_dir(s)
        if d not in seen:
            seen.add(d)
            out.append(s)
    return out


def _pool(jobs: int):
    return cf.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                  initializer=_init_worker)


def _fmt(x, nd=3):
    return "-" if x is None else f"{x:.{nd}f}"


def run_grid(specs: Sequence[RunSpec], out: str, *, jobs: Optional[int] = None, sft_cache: Optional[str] = None,
             progress: bool = True, echo=print) -> Dict:
    """Run every spec not yet done; returns {"total", "skipped", "ok", "failed", "sft": [...]}."""
    from tqdm.auto import tqdm

    from dvpo.trainer.sft import sft_dir

    out = os.path.abspath(out)
    sft_cache = os.path.abspath(sft_cache or os.path.join(out, "sft_cache"))
    jobs = max(1, int(jobs or os.cpu_count() or 1))
    os.makedirs(out, exist_ok=True)
    configs = {s.rel_dir: s.config(out, sft_cache) for s in specs}
    todo = [s for s in specs if run_state(os.path.join(out, s.rel_dir), configs[s.rel_dir].steps) != "done"]
    result = {"total": len(specs), "skipped": len(specs) - len(todo), "ok": 0, "failed": 0, "sft": []}
    if not todo:
        echo(f"all {len(specs)} runs already finished in {out}")
        return result
    echo(f"{len(todo)} of {len(specs)} runs to do ({result['skipped']} finished), {jobs} process(es)")
    # the same warm start per (task, seed): each SFT is trained once into the cache before any run that
    # needs it starts (runs whose SFT is ready start while the other SFTs still train)
    need = {s.rel_dir: (None if configs[s.rel_dir].init else sft_dir(configs[s.rel_dir].sft_config()))
            for s in todo}
    sfts = [c for c in sft_configs(configs[s.rel_dir] for s in todo)
            if not os.path.exists(os.path.join(sft_dir(c), "sft.json"))]
    for c in sfts:
        c.threads, c.progress = 1, False
    bar = tqdm(total=len(specs), initial=result["skipped"], desc="runs", unit="run", disable=not progress)
    say = bar.write if progress else echo

    def sft_done(r):
        result["sft"].append(r)
        say(f"SFT {r['task']} seed {r['seed']}: {r['steps']} steps, val acc {_fmt(r['val_acc'])}, "
            f"{r['wall_s']:.0f} s")

    def record(spec, summ):
        if summ.get("status") in FINISHED:
            result["ok"] += 1
            bar.set_postfix_str(f"{spec.name}: acc {_fmt(summ.get('heldout_acc_final'))}")
        else:
            result["failed"] += 1
            msg = f"{spec.name}: FAILED ({summ.get('error')})"
            bar.set_postfix_str(msg[:80])
            say(msg)
        bar.update(1)

    def fail(spec, error):
        summ = {"status": "failed", "error": error}
        try:
            os.makedirs(os.path.join(out, spec.rel_dir), exist_ok=True)
            _write_json(os.path.join(out, spec.rel_dir, "summary.json"), summ)
        except OSError:
            pass
        record(spec, summ)

    pool = None
    try:
        if sfts and (jobs == 1 or len(sfts) == 1):       # in this process, with every thread we may use
            for c in sfts:
                c.threads = min(jobs, os.cpu_count() or 1) if len(sfts) == 1 else 1
                bar.set_postfix_str(f"SFT {c.task} seed {c.seed}")
                with _keep_threads():
                    sft_done(sft_job(_asdict(c)))
            sfts = []
        pool = _pool(jobs) if jobs > 1 else _Inline()
        pending = {pool.submit(sft_job, _asdict(c)): ("sft", sft_dir(c)) for c in sfts}
        waiting = {sft_dir(c) for c in sfts}
        queue = list(todo)

        def submit_ready():
            for spec in list(queue):
                if len(pending) >= jobs:          # keep the queue here: in order, and jobs=1 runs inline
                    break
                if need[spec.rel_dir] not in waiting:
                    pending[pool.submit(run_job, _asdict(configs[spec.rel_dir]))] = ("run", spec)
                    queue.remove(spec)

        submit_ready()
        while pending:
            done, _ = cf.wait(list(pending), return_when=cf.FIRST_COMPLETED)
            for f in done:
                kind, what = pending.pop(f)
                if kind == "sft":
                    waiting.discard(what)
                    try:
                        sft_done(f.result())
                    except Exception as exc:  # noqa: BLE001 - its runs fail, the others go on
                        for spec in [q for q in queue if need[q.rel_dir] == what]:
                            queue.remove(spec)
                            fail(spec, f"SFT warm start failed: {type(exc).__name__}: {exc}")
                    continue
                try:
                    summ = f.result()
                except Exception as exc:  # noqa: BLE001 - the worker process itself died
                    fail(what, f"{type(exc).__name__}: {exc}")
                    continue
                record(what, summ)
            submit_ready()
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return result


class _Inline:
    """--jobs 1: run each job in this process when it is submitted (no worker start-up)."""

    def submit(self, fn, *args):
        f = cf.Future()
        try:
            with _keep_threads():
                f.set_result(fn(*args))
        except Exception as exc:  # noqa: BLE001
            f.set_exception(exc)
        return f

    def shutdown(self, **_kw):
        pass


@contextlib.contextmanager
def _keep_threads():
    """Restore torch's thread count after an in-process SFT or run (they set their own)."""
    import torch

    n = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _asdict(cfg) -> Dict:
    from dvpo.trainer.config import to_dict

    return to_dict(cfg)
