"""The RL loop: `train(TrainConfig) -> summary`, one `Trainer.step` per iteration of

    rollout -> rewards -> values -> advantages -> K epochs of minibatch updates of actor and critic -> log

The stages live in their own modules: `experience.py` (sample, reward, score into a `Batch`),
the algorithm's `advantages` (`algorithms/`), whitening (`dvpo.masked`), `update.py` (the PPO
epochs), `metrics.py` (the metric files) and `checkpoint.py` (exact resume). What differs between
algorithms is in `algorithms/` only; this file has no per-algorithm branch.

Under `torchrun` (see `distributed.py`) the same loop runs on every rank: each rank samples, scores
and updates on its contiguous shard of the global batch's prompts (whole GRPO groups), with the
sampling and noise draws made for the global batch (so the samples do not depend on the number of
ranks), global token-mean losses under DDP, global advantage whitening and metrics reduced over the
ranks; rank 0 alone writes files and logs. One process without torchrun: no process group at all."""

from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import os
import random
import re
import sys
import time
from typing import Dict, Optional

import torch

from . import advantages as adv
from . import checkpoint as ck
from . import metrics
from .batch import Batch
from .config import TrainConfig, from_dict, to_dict
from .distributed import Dist
from .metrics import read_metrics

__all__ = ["Trainer", "train", "read_metrics", "evaluate_checkpoint", "default_out", "TrainingAborted"]

# config fields that do not change a run's trajectory (may differ when resuming)
RUNTIME_FIELDS = {"steps", "resume", "progress", "plots", "threads", "device", "save_every", "eval_every",
                  "n_eval", "out", "sft_cache", "max_bad_steps"}


class TrainingAborted(RuntimeError):
    pass


def default_out(cfg: TrainConfig) -> str:
    name = f"{cfg.algo}_{cfg.task}_{cfg.noise}_s{cfg.seed}"
    return os.path.join("runs", re.sub(r"[^A-Za-z0-9_.+-]+", "_", name))


def derived_seed(seed: int, stream: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{stream}".encode(), digest_size=8).digest(), "little") >> 1


def _stderr(msg):
    print(msg, file=sys.stderr, flush=True)


class Trainer:
    def __init__(self, cfg: TrainConfig, log="stderr"):
        from dvpo.tasks import get_task, parse_noise

        from .algorithms import get_algorithm

        self.log = _stderr if log == "stderr" else (log or (lambda *a, **k: None))
        problem = get_algorithm(cfg.algo).check(cfg)      # an unknown name is a ValueError here
        if problem is not None:
            raise ValueError(f"{problem[0]} {problem[1]!r}: expected {problem[2]}")
        adv.parse_advantage(cfg.advantage)
        self.cfg = cfg
        self.algo = cfg.algorithm()
        self.out = cfg.out or default_out(cfg)
        self.task = get_task(cfg.task)
        self.noise = parse_noise(cfg.noise, salt=cfg.seed)
        self.max_new = cfg.max_new_tokens or self.task.max_new_tokens
        self.dist = Dist.single()

    # ---- setup ----------------------------------------------------------------------------------
    def setup(self):
        import dvpo

        from .models import build_critic, load_policy, pick_device
        from .sft import sft

        cfg = self.cfg
        self.dist = dist = Dist.from_env(cfg.device)     # Dist.single() outside torchrun
        main = dist.is_main
        if not main:
            self.log = lambda *a, **k: None
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        elif dist.enabled:
            # several ranks share the machine's cores: one thread each unless OMP_NUM_THREADS says otherwise
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS") or 1)))
        self.device = dist.device(cfg.device) if dist.enabled else pick_device(cfg.device)
        if dist.enabled and cfg.prompts_per_step < dist.world:
            raise ValueError(f"prompts_per_step ({cfg.prompts_per_step}) must be >= the number of processes "
                             f"({dist.world}): each rank samples whole prompt groups")
        ckpt = os.path.join(self.out, "ckpt")
        resuming = cfg.resume and os.path.exists(os.path.join(ckpt, "state.json"))
        if not resuming and os.path.exists(os.path.join(ckpt, "state.json")):
            raise FileExistsError(f"{self.out} already holds a run: pass resume=True (--resume) or another out dir")
        if main:
            os.makedirs(self.out, exist_ok=True)
        if resuming:
            saved = from_dict(TrainConfig, ck.read_json(os.path.join(self.out, "config.json")))
            diff = {f.name: (getattr(saved, f.name), getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
                    if f.name not in RUNTIME_FIELDS and getattr(saved, f.name) != getattr(cfg, f.name)}
            if diff:
                raise ValueError(f"resume: the config differs from the saved run in {diff}")
        ref_dir = os.path.join(self.out, "ref")
        if resuming and os.path.exists(ref_dir):
            init_dir = ref_dir
        elif cfg.init:
            init_dir = cfg.init
        else:
            # rank 0 trains (or finds) the cached SFT warm start; the others load it after a barrier
            init_dir = sft(cfg.sft_config(), log=self.log if self.log else False) if main else None
        dist.barrier()       # every rank has checked the run dir before rank 0 writes anything
        if init_dir is None:
            init_dir = sft(cfg.sft_config(), log=False)
        self.init_dir = init_dir
        self.policy, self.tok = load_policy(os.path.join(ckpt, "policy") if resuming else init_dir,
                                            self.device, cfg.attn, cfg.bf16)
        if resuming:
            self.ref, _ = load_policy(init_dir, self.device, cfg.attn, cfg.bf16)
        else:
            self.ref = copy.deepcopy(self.policy)       # the same weights as init_dir, without a reload
        for p in self.ref.parameters():
            p.requires_grad_(False)
        if main and not resuming and init_dir != ref_dir:
            self.policy.save_pretrained(ref_dir)     # the reference policy travels with the run
            self.tok.save_pretrained(ref_dir)
        shape = self.algo.critic_shape()
        self.critic, self.taus = None, None
        if shape is not None:
            self.critic = build_critic(self.policy, shape[0], shape[1], cfg.shared_critic,
                                       derived_seed(cfg.seed, "critic-init"))
            self.taus = dvpo.taus(shape[1], cfg.taus, device=self.device)
        self.shared_critic = self.critic is not None and cfg.shared_critic
        pol_params = list(self.policy.parameters())
        if self.shared_critic:
            pol_params += list(self.critic.heads.parameters())
        self.opt = torch.optim.AdamW(pol_params, lr=cfg.policy_lr, weight_decay=cfg.weight_decay)
        self.critic_opt = None
        if self.critic is not None and not cfg.shared_critic:
            self.critic_opt = torch.optim.AdamW(self.critic.parameters(), lr=cfg.critic_lr,
                                                weight_decay=cfg.weight_decay)
        gdev = self.device if self.device.type == "cuda" else "cpu"
        # every rank holds the same generators and draws for the whole global batch (then uses its rows)
        self.g_sample = torch.Generator(device=gdev)
        self.g_sample.manual_seed(derived_seed(cfg.seed, "sample"))
        # vote:K labels are drawn per prompt (`experience._vote_uniforms`); this generator only keeps the
        # checkpoint format (its state is saved and restored, nothing draws from it)
        self.g_vote = torch.Generator(device=gdev)
        self.g_vote.manual_seed(derived_seed(cfg.seed, "vote"))
        self.g_shuffle = torch.Generator()
        self.g_shuffle.manual_seed(derived_seed(cfg.seed, "shuffle"))
        self.g_noise = torch.Generator()
        self.g_noise.manual_seed(derived_seed(cfg.seed, "noise"))
        self.prompt_rng = random.Random(f"prompts:{cfg.seed}")
        self.votes: Dict[str, Optional[tuple]] = {}
        self.step = 0
        self.bad_streak = 0
        self.heldout = self.task.heldout_set(cfg.n_eval)
        self.metrics_path = os.path.join(self.out, "metrics.jsonl")
        if resuming:
            ck.load_trainer(self, ckpt)
            if main:
                metrics.truncate(self.metrics_path, self.step)
        elif main:
            if os.path.exists(self.metrics_path):
                os.remove(self.metrics_path)
            ck.write_json(os.path.join(self.out, "config.json"), to_dict(cfg))
        self.use_bf16 = cfg.bf16 and self.device.type == "cuda"
        # the modules of the training forward passes: DDP wrappers under torchrun (the same modules in
        # one process); sampling, scoring of rollouts, evaluation and checkpoints use the plain modules
        self.policy_train = dist.wrap(self.policy)
        self.critic_train = self.critic
        if self.critic is not None and not cfg.shared_critic:
            self.critic_train = dist.wrap(self.critic)
        dist.barrier()
        return resuming

    def autocast(self):
        from .models import autocast

        return autocast(self.device, self.use_bf16)

    def save(self):
        ck.save_trainer(self)

    # ---- the models' forward passes -----------------------------------------------------------------
    def score(self, policy, mb, want_entropy: bool = False):
        """(log-probs, entropies, last hidden states if the critic shares the trunk) of a minibatch."""
        from .rollout import score

        return score(policy, mb.p_ids, mb.p_mask, mb.r_ids, mb.mask.long(), want_entropy=want_entropy,
                     want_hidden=self.shared_critic)

    def values(self, critic, p_ids, p_mask, r_ids, r_mask, hidden=None) -> Optional[torch.Tensor]:
        """The critic's values in the algorithm's view (None without a critic); a shared critic
        reads the policy's `hidden` states."""
        from .rollout import critic_values

        if self.critic is None:
            return None
        raw = self.critic.heads_from_hidden(hidden) if self.shared_critic else critic_values(
            critic, p_ids, p_mask, r_ids, r_mask)
        return self.algo.view(raw.float())

    def metric_mean(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> float:
        """Mean over the global batch's real tokens (every entry without a mask), for metrics."""
        from dvpo.masked import masked_mean

        return float(masked_mean(x, mask, all_reduce=self.dist.sum_tensor))

    # ---- the stages of a step --------------------------------------------------------------------------
    def rollout(self, row: Dict) -> Batch:
        """Sample, reward and score this rank's shard of the step's global batch."""
        from .experience import collect

        return collect(self, row)

    def advantages(self, batch: Batch, row: Dict) -> Batch:
        """The batch with the algorithm's advantages (whitened over the global batch unless the
        algorithm says not to) and the critic's targets."""
        from dvpo.masked import masked_moments, masked_whiten

        cfg, mask = self.cfg, batch.mask
        kl = batch.old_logp - batch.ref_logp if self.algo.kl_in_reward else None
        rewards = adv.token_rewards(batch.outcome, mask, kl, cfg.kl_coef if kl is not None else 0.0)
        raw, returns, stats = self.algo.advantages(batch, rewards, self.metric_mean)
        row.update(stats)
        mean, var = masked_moments(raw, mask, all_reduce=self.dist.sum_tensor)     # population variance
        row["adv_raw_std"] = float(var.sqrt())
        if self.algo.whiten:
            raw = masked_whiten(raw, mask, moments=(mean, var)) * mask
        return batch.with_targets(raw, returns)

    def update(self, batch: Batch, row: Dict) -> bool:
        """K epochs of minibatch updates; True when a non-finite loss or gradient skipped one."""
        from .update import update

        return update(self, batch, row)

    def evaluate(self, step: int) -> Dict:
        """Held-out evaluation (sharded over the ranks under torchrun; the single-process numbers)."""
        from .evaluate import evaluate

        t0 = time.perf_counter()
        with self.autocast():
            res = evaluate(self.policy, self.tok, self.task, self.heldout, self.max_new,
                           sampled_seed=derived_seed(self.cfg.seed, f"eval:{step}"),
                           temperature=self.cfg.temperature, dist=self.dist)
        res["t_eval"] = time.perf_counter() - t0
        return res

    def step_once(self) -> Dict:
        """One training step; returns its metrics row (written by the caller)."""
        t0, c0 = time.perf_counter(), time.process_time()
        row = {"step": self.step}
        batch = self.rollout(row)                   # rollout, rewards, values
        batch = self.advantages(batch, row)
        t1 = time.perf_counter()
        bad = self.update(batch, row)               # K epochs of actor and critic minibatch updates
        row["t_update"] = time.perf_counter() - t1
        row["t_step"] = time.perf_counter() - t0
        row["t_step_cpu"] = time.process_time() - c0        # CPU seconds (all threads): robust to a busy machine
        self.bad_streak = self.bad_streak + 1 if bad else 0
        row["bad_step"] = bad
        return row

    # ---- the loop -----------------------------------------------------------------------------------
    def run(self, stop_at: Optional[int] = None, checkpoint_on_stop: bool = True) -> Dict:
        from tqdm.auto import tqdm

        cfg = self.cfg
        t_start = time.time()
        if not self.setup():
            row = {"step": 0, **self.evaluate(0)}
            self.write_row(row)
            self.log(f"[{cfg.algo} {cfg.task} noise={cfg.noise} seed={cfg.seed}] step 0: held-out accuracy "
                     f"{row['heldout_acc']:.3f} (sampled {row['heldout_acc_sampled']:.3f})")
        status = "ok"
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{cfg.algo} {cfg.task}",
                   disable=not cfg.progress or not self.dist.is_main)
        last_eval = None
        while self.step < cfg.steps:
            self.step += 1
            step = self.step
            row = self.step_once()
            if step % cfg.eval_every == 0 or step == cfg.steps:
                row.update(self.evaluate(step))
                last_eval = row["heldout_acc"]
            self.write_row(row)
            post = {"r_true": f"{row['reward_true']:.2f}", "r_noisy": f"{row['reward_noisy']:.2f}"}
            if last_eval is not None:
                post["heldout"] = f"{last_eval:.2f}"
            bar.set_postfix(post)
            bar.update(1)
            if row["bad_step"]:
                self.log(f"step {step}: non-finite loss or gradient, {row['skipped_updates']} update(s) skipped")
            if self.bad_streak >= cfg.max_bad_steps:
                status = "aborted"
                self.log(f"aborting: {self.bad_streak} steps in a row with non-finite losses")
                self.save()
                break
            if step % cfg.save_every == 0 or step == cfg.steps or (step == stop_at and checkpoint_on_stop):
                self.save()
            if step == stop_at:
                bar.close()
                return {"status": "stopped", "step": step, "out": self.out}
        bar.close()
        return self.finish(status, time.time() - t_start)

    def write_row(self, row: Dict):
        if self.dist.is_main:
            metrics.append_row(self.metrics_path, row)

    def finish(self, status: str, wall: float) -> Dict:
        """The summary (rank 0 writes it and the plots; every rank returns it)."""
        summary = None
        if self.dist.is_main:
            rows = read_metrics(self.out)
            cfg = self.cfg
            summary = {"status": status, "out": self.out, "algo": cfg.algo, "task": cfg.task, "noise": cfg.noise,
                       "seed": cfg.seed, "steps": self.step, "sft_dir": self.init_dir, **metrics.summarize(rows),
                       "wall_seconds": wall, "world_size": self.dist.world}
            if cfg.plots:
                from .evaluate import value_fan
                from .plots import plot_run

                with self.autocast():
                    fan = value_fan(self) if self.critic is not None else None
                if fan is not None:
                    ck.write_json(os.path.join(self.out, "value_fan.json"), fan)
                summary["plots"] = plot_run(self.out, rows, fan)
            ck.write_json(os.path.join(self.out, "summary.json"), summary)
        return self.dist.broadcast_object(summary)


def train(config: TrainConfig, *, stop_at: Optional[int] = None, checkpoint_on_stop: bool = True,
          log="stderr") -> Dict:
    """Run (or, with `config.resume`, continue) an RL experiment. Deterministic given the seed.

    `stop_at=k` returns right after step k, as if the run had been killed there (for resume tests):
    with `checkpoint_on_stop` after a checkpoint of step k, without it after only the metrics row
    (a resume then restarts from the last periodic checkpoint and drops the later rows).
    Returns the summary (also in OUT/summary.json): status ("ok", "aborted", "stopped"), held-out
    accuracy initial/final/best, rewards, timings.

    Under torchrun every rank calls this (`torchrun ... -m dvpo train ...`): the process group is
    initialised from the environment (or an existing one is used), the batch is sharded over the
    ranks, and every rank returns the same summary."""
    trainer = Trainer(config, log=log)
    dist = trainer.dist
    try:
        return trainer.run(stop_at=stop_at, checkpoint_on_stop=checkpoint_on_stop)
    finally:
        # the DDP-wrapped models hold the process group: release them first, so destroying the group
        # really frees it (and its gloo threads) now rather than at interpreter exit
        del trainer
        gc.collect()
        dist.cleanup()


def evaluate_checkpoint(path: str, *, task: Optional[str] = None, n_eval: Optional[int] = None,
                        seed: Optional[int] = None, device: str = "auto") -> Dict:
    """Held-out evaluation of a run dir (its latest `ckpt/policy`) or a policy checkpoint dir; for a run
    dir the same numbers as the run's own evaluation at that step (see `evaluate.evaluate_checkpoint`)."""
    from .evaluate import evaluate_checkpoint as _evaluate_checkpoint

    return _evaluate_checkpoint(path, task=task, n_eval=n_eval, seed=seed, device=device)
