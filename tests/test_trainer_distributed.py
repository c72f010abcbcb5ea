"""Multi-process training: the real `torchrun --standalone --nproc_per_node 2 -m dvpo train ...` on
CPU (gloo) against the same run in one process (the same global batch): the per-step metrics
(rewards, accuracies, losses, KL, ...) agree within fp tolerance, rank 0 alone writes the run dir,
a checkpoint resumes under torchrun, and rank 0 trains the SFT warm start while the other rank waits.
Three torchrun launches (~15-20 s each on 2 cores, mostly imports)."""

import json
import os
import subprocess
import sys

import pytest

from dvpo.trainer import TrainConfig, train
from dvpo.trainer.distributed import Dist, shard
from dvpo.trainer.loop import read_metrics

# a tiny model, 3 prompts x 2 samples per step (uneven shards: 2 prompts on rank 0, 1 on rank 1),
# 5 held-out problems (3 + 2), two minibatches (a rank may hold no row of one)
TINY = dict(hidden=16, layers=1, heads=2, ffn=32, sft_steps=10, sft_batch=16, sft_eval_every=10,
            prompts_per_step=3, group_size=2, n_eval=5, n_quantiles=4, n_heads=2, eval_every=1,
            minibatches=2, progress=False, plots=False, threads=1)
CASES = {
    "dvpo": dict(algo="dvpo", task="science", noise="flip:0.3"),
    "ppo": dict(algo="ppo", task="science", noise="vote:3+flip:0.3", shared_critic=True),
    # (not a zero-advantage batch: then only the k3 KL term, ~0 near the reference, drives AdamW,
    # whose normalised step turns fp rounding into full-size steps, in one process as in two)
    "grpo": dict(algo="grpo", task="science", noise="rm:0.72+gauss:0.3", kl_coef=0.05),
}
# per-sample counts and held-out results: the same samples give exactly the same numbers
EXACT = ("reward_true", "reward_noisy", "acc_train", "noise_disagree", "noise_missing", "vote_label_acc",
         "resp_len", "heldout_acc", "heldout_reward", "heldout_acc_sampled", "heldout_reward_sampled",
         "skipped_updates", "bad_step", "step")


def _flags(cfg: dict) -> list:
    out = []
    for k, v in cfg.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            out += [flag, str(v)]
    return out


def _torchrun(args: list, cache: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", DVPO_CACHE=cache, TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dvpo", "train", *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"torchrun failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    return res


def _files(root) -> set:
    out = set()
    for d, _, files in os.walk(root):
        out |= {os.path.relpath(os.path.join(d, f), root) for f in files}
    return out


def _compare(one: list, two: list):
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        keys = {k for k in a if not k.startswith("t_")}
        assert keys == {k for k in b if not k.startswith("t_")}, (a["step"], keys ^ set(b))
        for k in sorted(keys):
            if k in EXACT:
                assert a[k] == b[k], (a["step"], k, a[k], b[k])
            else:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k, a[k], b[k])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("sft-cache-dist"))


def test_shards_and_single_process_helpers():
    assert [shard(5, 2, r) for r in range(2)] == [(0, 3), (3, 5)]
    assert [shard(3, 3, r) for r in range(3)] == [(0, 1), (1, 2), (2, 3)]
    assert [shard(8, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    d = Dist.single()                                    # outside torchrun: no process group, no-ops
    assert not d.enabled and d.is_main and d.world == 1
    assert d.gather_lists([1, 2]) == [1, 2] and d.sum_([1, 2.5]) == [1.0, 2.5] and d.all_true(True)
    assert d.mean_pairs({"a": (3.0, 2.0)}) == {"a": 1.5} and d.broadcast_object({"x": 1}) == {"x": 1}


@pytest.mark.parametrize("name", list(CASES))
def test_torchrun_two_processes_match_one(name, cache, tmp_path):
    cfg = {**TINY, **CASES[name], "steps": 2, "seed": 0}
    ref_out, out = tmp_path / "one", tmp_path / "two"
    if name == "grpo":
        # an empty SFT cache: rank 0 trains and writes the warm start while rank 1 waits, then both load it
        cache = str(tmp_path / "cache")
        res = _torchrun(_flags(cfg) + ["--sft-cache", cache, "--out", str(out)], cache)
        entries = os.listdir(os.path.join(cache, "sft"))
        assert len(entries) == 1 and not any(".tmp" in e for e in entries)      # one writer, no leftovers
    s1 = train(TrainConfig(**cfg, sft_cache=cache, out=str(ref_out)), log=None)   # one process (this one)
    assert s1["status"] == "ok" and s1["world_size"] == 1
    one = read_metrics(str(ref_out))
    if name == "dvpo":
        # stopped after step 1 (one process), resumed under torchrun (both ranks load the checkpoint):
        # the same metrics as the uninterrupted run
        train(TrainConfig(**cfg, sft_cache=cache, out=str(out)), stop_at=1, log=None)
        assert [r["step"] for r in read_metrics(str(out))] == [0, 1]
        res = _torchrun(["--out", str(out), "--resume", "--steps", "2", "--no-progress"], cache)
    elif name != "grpo":
        res = _torchrun(_flags(cfg) + ["--sft-cache", cache, "--out", str(out)], cache)
    else:
        assert os.listdir(os.path.join(cache, "sft")) == entries                  # the run reused it
    two = read_metrics(str(out))
    _compare(one, two)
    assert any(r.get("reward_noisy", 0) for r in one[1:]), "a degenerate test: no reward at all"
    # rank 0 alone wrote: one summary printed, the same files as the single-process run, one row per step
    assert res.stdout.count('"status": "ok"') == 1
    assert _files(out) == _files(ref_out)
    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert summary["world_size"] == 2 and summary["steps"] == 2
    with open(out / "ckpt" / "state.json") as f, open(ref_out / "ckpt" / "state.json") as g:
        st2, st1 = json.load(f), json.load(g)
    assert st2["step"] == st1["step"] == 2 and st2["rng"]["sample"] == st1["rng"]["sample"]
    assert dict(map(tuple, st2["votes"])) == dict(map(tuple, st1["votes"]))     # gathered from both ranks
