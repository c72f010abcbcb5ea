"""The RL loop: rollouts, (noisy) rewards, advantages, PPO-style updates, evaluation, metrics,
checkpoints and exact resume. `train(TrainConfig) -> summary`.

Under `torchrun` (see `distributed.py`) the same loop runs on every rank: each rank samples, scores
and updates on its contiguous shard of the global batch's prompts (whole GRPO groups), with the
sampling and noise draws made for the global batch (so the samples do not depend on the number of
ranks), global token-mean losses under DDP, global advantage whitening and metrics reduced over the
ranks; rank 0 alone writes files and logs. One process without torchrun: no process group at all."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import re
import time
from typing import Dict, List, Optional

import torch

from . import algos as A
from . import checkpoint as ck
from .config import TrainConfig, from_dict, to_dict
from .distributed import Dist, shard

# config fields that do not change a run's trajectory (may differ when resuming)
RUNTIME_FIELDS = {"steps", "resume", "progress", "plots", "threads", "device", "save_every", "eval_every",
                  "n_eval", "out", "sft_cache", "max_bad_steps"}


class TrainingAborted(RuntimeError):
    pass


def default_out(cfg: TrainConfig) -> str:
    name = f"{cfg.algo}_{cfg.task}_{cfg.noise}_s{cfg.seed}"
    return os.path.join("runs", re.sub(r"[^A-Za-z0-9_.+-]+", "_", name))


def _derived_seed(seed: int, stream: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(f"{seed}:{stream}".encode(), digest_size=8).digest(), "little") >> 1


def _stderr(msg):
    import sys

    print(msg, file=sys.stderr, flush=True)


def _json_float(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


class Trainer:
    def __init__(self, cfg: TrainConfig, log="stderr"):
        from dvpo.tasks import get_task, parse_noise

        if log == "stderr":
            log = _stderr
        self.log = log or (lambda *a, **k: None)
        if cfg.algo not in A.ALGOS:
            raise ValueError(f"algo must be one of {', '.join(A.ALGOS)}, got {cfg.algo!r}")
        A.parse_advantage(cfg.advantage)
        if cfg.algo == "grpo" and cfg.group_size < 2:
            raise ValueError("grpo needs group_size >= 2")
        if cfg.algo in ("dvpo", "robust-ppo") and cfg.n_heads < 1:
            raise ValueError("n_heads must be >= 1")
        self.cfg = cfg
        self.out = cfg.out or default_out(cfg)
        self.task = get_task(cfg.task)
        self.noise = parse_noise(cfg.noise, salt=cfg.seed)
        self.closs_cfg = cfg.critic_loss_config() if cfg.algo == "dvpo" else None
        self.max_new = cfg.max_new_tokens or self.task.max_new_tokens
        self.dist = Dist.single()

    # ---- setup ----------------------------------------------------------------------------------
    def setup(self):
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
        shape = cfg.critic_shape()
        self.critic = None
        if shape is not None:
            self.critic = build_critic(self.policy, shape[0], shape[1], cfg.shared_critic,
                                       _derived_seed(cfg.seed, "critic-init"))
            self.taus = dvpo_taus(shape[1], cfg.taus, self.device)
        pol_params = list(self.policy.parameters())
        if self.critic is not None and cfg.shared_critic:
            pol_params += list(self.critic.heads.parameters())
        self.opt = torch.optim.AdamW(pol_params, lr=cfg.policy_lr, weight_decay=cfg.weight_decay)
        self.critic_opt = None
        if self.critic is not None and not cfg.shared_critic:
            self.critic_opt = torch.optim.AdamW(self.critic.parameters(), lr=cfg.critic_lr,
                                                weight_decay=cfg.weight_decay)
        gdev = self.device if self.device.type == "cuda" else "cpu"
        # every rank holds the same generators and draws for the whole global batch (then uses its rows)
        self.g_sample = torch.Generator(device=gdev)
        self.g_sample.manual_seed(_derived_seed(cfg.seed, "sample"))
        # vote:K labels are drawn per prompt (`_vote_uniforms`); this generator only keeps the
        # checkpoint format (its state is saved and restored, nothing draws from it)
        self.g_vote = torch.Generator(device=gdev)
        self.g_vote.manual_seed(_derived_seed(cfg.seed, "vote"))
        self.g_shuffle = torch.Generator()
        self.g_shuffle.manual_seed(_derived_seed(cfg.seed, "shuffle"))
        self.g_noise = torch.Generator()
        self.g_noise.manual_seed(_derived_seed(cfg.seed, "noise"))
        self.prompt_rng = random.Random(f"prompts:{cfg.seed}")
        self.votes: Dict[str, Optional[tuple]] = {}
        self.step = 0
        self.bad_streak = 0
        self.heldout = self.task.heldout_set(cfg.n_eval)
        self.metrics_path = os.path.join(self.out, "metrics.jsonl")
        if resuming:
            self._load(ckpt)
            if main:
                self._truncate_metrics(self.step)
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

    # ---- checkpoints ------------------------------------------------------------------------------
    def save(self):
        """Rank 0 writes the checkpoint (every rank calls this: the vote labels are gathered)."""
        from safetensors.torch import save_file

        from .models import save_critic

        votes = dict(self.votes)
        if self.dist.enabled:
            for part in self.dist.gather_objects(self.votes):
                votes.update(part)
        if not self.dist.is_main:
            return
        path = os.path.join(self.out, "ckpt")
        tmp = ck.begin(path)
        self.policy.save_pretrained(os.path.join(tmp, "policy"))
        self.tok.save_pretrained(os.path.join(tmp, "policy"))
        if self.critic is not None:
            save_critic(self.critic, os.path.join(tmp, "critic"))
        tensors, opt_meta = ck.optimizer_tensors("policy", self.opt)
        meta = {"policy": opt_meta}
        if self.critic_opt is not None:
            t2, m2 = ck.optimizer_tensors("critic", self.critic_opt)
            tensors.update(t2)
            meta["critic"] = m2
        save_file(tensors, os.path.join(tmp, "optim.safetensors"))
        state = {
            "step": self.step, "bad_streak": self.bad_streak, "init_dir": self.init_dir,
            "optimizers": meta,
            "rng": {"sample": ck.generator_state(self.g_sample), "vote": ck.generator_state(self.g_vote),
                    "shuffle": ck.generator_state(self.g_shuffle), "noise": ck.generator_state(self.g_noise),
                    "prompts": ck.python_random_state(self.prompt_rng), "global": ck.global_rng_states()},
            "votes": [[k, list(v) if v is not None else None] for k, v in votes.items()],
        }
        ck.write_json(os.path.join(tmp, "state.json"), state)
        ck.commit(tmp, path)

    def _load(self, path: str):
        from safetensors.torch import load_file

        from .models import load_critic_into

        state = ck.read_json(os.path.join(path, "state.json"))
        if self.critic is not None:
            load_critic_into(self.critic, os.path.join(path, "critic"))
        tensors = load_file(os.path.join(path, "optim.safetensors"), device=str(self.device))
        ck.load_optimizer("policy", self.opt, tensors, state["optimizers"]["policy"])
        if self.critic_opt is not None:
            ck.load_optimizer("critic", self.critic_opt, tensors, state["optimizers"]["critic"])
        rng = state["rng"]
        ck.set_generator_state(self.g_sample, rng["sample"])
        ck.set_generator_state(self.g_vote, rng["vote"])
        ck.set_generator_state(self.g_shuffle, rng["shuffle"])
        ck.set_generator_state(self.g_noise, rng["noise"])
        ck.set_python_random_state(self.prompt_rng, rng["prompts"])
        ck.set_global_rng_states(rng["global"])
        self.votes = {k: (tuple(v) if v is not None else None) for k, v in state["votes"]}
        self.step = state["step"]
        self.bad_streak = state["bad_streak"]

    def _truncate_metrics(self, step: int):
        if not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path) as f:
            rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(self.metrics_path, "w") as f:
            f.writelines(rows)

    def _write_metrics(self, row: Dict):
        if not self.dist.is_main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({k: _json_float(v) for k, v in row.items()}) + "\n")

    # ---- rollout ------------------------------------------------------------------------------------
    def _encode(self, prompts):
        from .rollout import encode_prompts

        return encode_prompts(self.tok, prompts, self.device)

    def _vote_uniforms(self, prompt: str, k: int) -> torch.Tensor:
        """The sampling draws [k, max_new] of a prompt's vote:K samples, from a generator seeded by the
        run's seed and the prompt: the labels do not depend on the batch, the order or the rank."""
        g = torch.Generator()
        g.manual_seed(_derived_seed(self.cfg.seed, "vote:" + prompt))
        return torch.rand(k, max(1, self.max_new), generator=g)

    @torch.no_grad()
    def vote_labels(self, problems) -> List[Optional[tuple]]:
        """Majority-vote labels from K samples of the initial (reference) policy, once per prompt."""
        from .rollout import decode, sample

        k = self.noise.vote_k
        need = []
        for p in problems:
            if p.prompt not in self.votes and p not in need:
                need.append(p)
        if need:
            prompts = [p.prompt for p in need for _ in range(k)]
            ids, mask = self._encode(prompts)
            u = torch.cat([self._vote_uniforms(p.prompt, k) for p in need]).to(self.device)
            with self.autocast():
                r_ids, r_mask = sample(self.ref, ids, mask, self.max_new, self.tok.eos_token_id,
                                       self.tok.pad_token_id, temperature=self.cfg.temperature, uniforms=u)
            texts = decode(self.tok, r_ids, r_mask)
            for i, p in enumerate(need):
                self.votes[p.prompt] = self.task.majority(p, texts[i * k:(i + 1) * k])
        return [self.votes[p.prompt] for p in problems]

    @torch.no_grad()
    def rollout(self, row: Dict) -> Dict:
        """Sample, reward and score this rank's shard of the step's global batch (all of it in one
        process). Metrics in `row` are over the global batch."""
        from .rollout import critic_values, decode, sample, score

        cfg, task, dist = self.cfg, self.task, self.dist
        g = cfg.group_size
        t0 = time.perf_counter()
        all_problems = [task.train_problem(self.prompt_rng) for _ in range(cfg.prompts_per_step)]
        p_lo, p_hi = shard(len(all_problems), dist.world, dist.rank)
        problems = all_problems[p_lo:p_hi]
        lo, n_global = p_lo * g, len(all_problems) * g
        rep = [p for p in problems for _ in range(g)]
        # the draws of the whole global batch, on every rank; this rank samples with its rows
        gdev = self.g_sample.device
        u = torch.rand(n_global, max(1, self.max_new), generator=self.g_sample, device=gdev)
        u = u[lo:lo + len(rep)].to(self.device)
        p_ids, p_mask = self._encode([p.prompt for p in rep])
        with self.autocast():
            r_ids, r_mask = sample(self.policy, p_ids, p_mask, self.max_new, self.tok.eos_token_id,
                                   self.tok.pad_token_id, temperature=cfg.temperature, uniforms=u)
        texts = decode(self.tok, r_ids, r_mask)
        t1 = time.perf_counter()
        true = [task.reward(p, t) for p, t in zip(rep, texts)]
        correct = [task.correct(p, t) for p, t in zip(rep, texts)]
        vote_r, labels = None, None
        if self.noise.vote_k:
            labels = self.vote_labels(problems)
            lab = {p.prompt: l for p, l in zip(problems, labels)}
            vote_r = [task.vote_reward(p, t, lab[p.prompt]) for p, t in zip(rep, texts)]
        # per-sample values of the global batch (rank order = the global order): the reward noise and
        # the logged rates are computed from them exactly as in one process
        per_row = dist.gather_lists(list(zip(true, correct, texts, vote_r or [None] * len(rep))))
        g_true = [r[0] for r in per_row]
        g_rep = [p for p in all_problems for _ in range(g)]
        if labels is not None:
            g_labels = dist.gather_lists(labels)
            row["vote_label_acc"] = sum(
                task.vote_reward(p, p.gold, l) for p, l in zip(all_problems, g_labels)) / len(all_problems)
        noisy, info = self.noise.apply(g_true, generator=self.g_noise, prompts=[p.prompt for p in g_rep],
                                       responses=[r[2] for r in per_row],
                                       vote_rewards=[r[3] for r in per_row] if vote_r is not None else None)
        missing = [x != x for x in noisy]
        noisy = [cfg.missing_fill if m else x for x, m in zip(noisy, missing)]
        t2 = time.perf_counter()
        mask = r_mask.float()
        with self.autocast():
            logp, ent, hidden = score(self.policy, p_ids, p_mask, r_ids, r_mask, want_entropy=True,
                                      want_hidden=self.critic is not None and cfg.shared_critic)
            ref_logp, _, _ = score(self.ref, p_ids, p_mask, r_ids, r_mask)
            values = None
            if self.critic is not None:
                values = (self.critic.heads_from_hidden(hidden) if cfg.shared_critic
                          else critic_values(self.critic, p_ids, p_mask, r_ids, r_mask)).float()
        t3 = time.perf_counter()
        n = n_global
        lens = mask.sum(1)
        tok_means = dist.mean_pairs({
            "kl": (float(((logp - ref_logp) * mask).sum()), float(lens.sum())),
            "kl_k3": (float((A.kl_penalty(logp, ref_logp, "k3") * mask).sum()), float(lens.sum())),
            "entropy": (float((ent * mask).sum()), float(lens.sum())),
            "resp_len": (float(lens.sum()), float(len(rep)))})
        row.update({
            "reward_true": sum(g_true) / n, "reward_noisy": sum(noisy) / n,
            "acc_train": sum(r[1] for r in per_row) / n,
            "noise_disagree": sum(abs(a - b) > 1e-9 for a, b in zip(g_true, noisy)) / n,
            "noise_missing": sum(missing) / n,
            **tok_means,
            "t_sample": t1 - t0, "t_reward": t2 - t1, "t_score": t3 - t2,
        })
        my_noisy = noisy[lo:lo + len(rep)]
        return {"problems": problems, "texts": texts, "p_ids": p_ids, "p_mask": p_mask, "r_ids": r_ids,
                "mask": mask, "old_logp": logp.float(), "ref_logp": ref_logp.float(), "values": values,
                "outcome": torch.tensor(my_noisy, dtype=torch.float32, device=self.device),
                "true": torch.tensor(true, device=self.device),
                # where this shard sits in the global batch, and every row's token count (minibatch
                # denominators under torchrun)
                "lo": lo, "n_global": n_global,
                "lens": torch.tensor(dist.gather_lists(lens.tolist()), dtype=torch.float64)}

    # ---- advantages -----------------------------------------------------------------------------
    def _mean(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> float:
        """Mean of x over the real tokens (all entries without a mask) of the global batch."""
        if mask is None:
            return self.dist.mean_pairs({"m": (float(x.sum()), float(x.numel()))})["m"]
        if not self.dist.enabled:
            return float(A.masked_mean(x, mask))
        m = mask.to(x.dtype)
        return self.dist.mean_pairs({"m": (float((x * m).sum()), float(m.sum()))})["m"]

    def _whiten(self, x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8):
        """(x - mean) / std over the real tokens of the global batch (population variance), 0 at
        padding; also returns the raw std. One process: `algos.masked_whiten`."""
        if not self.dist.enabled:
            std = float(torch.sqrt(A.masked_mean((x - A.masked_mean(x, mask)) ** 2, mask)))
            return A.masked_whiten(x, mask, eps), std
        m = mask.to(x.dtype)
        mean = self._mean(x, mask)
        var = self.dist.mean_pairs({"v": (float((((x - mean) ** 2) * m).sum()), float(m.sum()))})["v"]
        return (x - mean) * (1.0 / math.sqrt(var + eps)) * m, math.sqrt(var)

    def advantages(self, b: Dict, row: Dict):
        cfg = self.cfg
        mask = b["mask"]
        kl = b["old_logp"] - b["ref_logp"]
        in_reward = cfg.algo != "grpo"
        rewards = A.token_rewards(b["outcome"], mask, kl if in_reward else None, cfg.kl_coef if in_reward else 0.0)
        if cfg.algo == "dvpo":
            quant = b["values"].mean(-2)                                   # ensemble [B, T, N]
            adv, returns = A.dvpo_advantages(rewards, quant, mask, gamma=cfg.gamma, lam=cfg.lam,
                                             advantage=cfg.advantage)
            b["returns"] = returns
            first = quant[:, 0]
            n = quant.shape[-1]
            lo, hi = max(0, int(0.1 * n)), min(n - 1, int(0.9 * n))
            srt = quant.sort(-1).values
            # Crossing: neighbour quantiles out of order. Where the true quantile function is flat (0/1
            # outcomes tie many quantiles) any noise orders half of them wrongly, so the deep count, out
            # of order by more than 1% of the token's fan, is the one that says the fan is disordered.
            step_down = -quant.diff(dim=-1)
            fan = (srt[..., -1] - srt[..., 0]).unsqueeze(-1)
            row.update({"value_mean": self._mean(first),
                        "value_spread": self._mean(srt[..., hi] - srt[..., lo], mask),
                        "value_crossing": self._mean((step_down > 0).float().mean(-1), mask),
                        "value_crossing_deep": self._mean((step_down > 0.01 * fan).float().mean(-1), mask)})
        elif cfg.algo == "ppo":
            adv, returns = A.gae_advantages(rewards, b["values"][..., 0, 0], mask, gamma=cfg.gamma, lam=cfg.lam)
            b["returns"] = returns
            row["value_mean"] = self._mean(b["values"][:, 0, 0, 0])
        elif cfg.algo == "robust-ppo":
            worst = b["values"][..., 0].min(-1).values                       # min over the H critics
            adv, returns = A.gae_advantages(rewards, worst, mask, gamma=cfg.gamma, lam=cfg.lam)
            b["returns"] = returns
            row.update({"value_mean": self._mean(worst[:, 0]),
                        "value_head_spread": self._mean(b["values"][..., 0].max(-1).values - worst, mask)})
        elif cfg.algo == "grpo":
            adv = A.grpo_advantages(b["outcome"], cfg.group_size, mask, scale=cfg.grpo_scale)  # groups are local
        elif cfg.algo == "reinforce++":
            adv = A.reinforce_pp_advantages(rewards, mask, gamma=cfg.gamma, whiten=False)
            adv, _ = self._whiten(adv, mask)                              # over the global batch
        if cfg.algo in A.CRITIC_ALGOS:
            adv, row["adv_raw_std"] = self._whiten(adv, mask)
        else:
            row["adv_raw_std"] = self._whiten(adv, mask)[1]
        b["adv"] = adv

    # ---- update -----------------------------------------------------------------------------------
    def _critic_loss(self, values, b, idx, acc, mask=None, denom=None):
        cfg = self.cfg
        mask = b["mask"][idx] if mask is None else mask
        old = b["values"][idx]
        if cfg.algo == "dvpo":
            t0 = time.perf_counter()
            loss, terms = A.distributional_value_loss(values, old, b["returns"][idx], mask, self.closs_cfg,
                                                      cfg.cliprange_value, taus=self.taus, denom=denom)
            acc["t_critic_loss"] = acc.get("t_critic_loss", 0.0) + time.perf_counter() - t0
            for name, v in terms.items():
                acc.setdefault("term_" + name, []).append(float(A.masked_mean(v.float(), mask, denom=denom)))
            return loss
        if cfg.algo == "ppo":
            return A.scalar_value_loss(values[..., 0, 0], old[..., 0, 0], b["returns"][idx], mask,
                                       cfg.cliprange_value, denom=denom)
        return A.scalar_value_loss(values[..., 0], old[..., 0], b["returns"][idx], mask, cfg.cliprange_value,
                                   denom=denom)

    def _minibatch(self, b: Dict, gidx: torch.Tensor):
        """(local row indices, their mask, loss denominator) of a minibatch given by global row indices.

        One process: the rows themselves and no denominator (token means of the minibatch). Under
        torchrun: this rank's rows of the minibatch, in the minibatch's order, and the denominator
        global tokens / world size (DDP averages the gradients). A rank with no row in the minibatch
        runs one of its rows with a zero mask, so that it takes part in the gradient all-reduce."""
        if not self.dist.enabled:
            idx = gidx.to(self.device)
            return idx, b["mask"][idx], None
        lo, nl = b["lo"], b["mask"].shape[0]
        mine = (gidx >= lo) & (gidx < lo + nl)
        idx = (gidx[mine] - lo).to(self.device)
        denom = max(float(b["lens"][gidx].sum()), 1.0) / self.dist.world
        if idx.numel() == 0:
            idx = torch.zeros(1, dtype=torch.long, device=self.device)
            return idx, torch.zeros_like(b["mask"][idx]), denom
        return idx, b["mask"][idx], denom

    def update(self, b: Dict, row: Dict):
        from .rollout import critic_values, score

        cfg, dist = self.cfg, self.dist
        n = b["n_global"]
        mb = max(1, math.ceil(n / max(1, cfg.minibatches)))
        acc: Dict = {}
        skipped, bad = 0, False
        pol_params = [p for g in self.opt.param_groups for p in g["params"]]
        shared = self.critic is not None and cfg.shared_critic
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(n, generator=self.g_shuffle)          # global rows, the same on every rank
            for start in range(0, n, mb):
                idx, mask, denom = self._minibatch(b, perm[start:start + mb])
                with self.autocast():
                    logp, ent, hidden = score(self.policy_train, b["p_ids"][idx], b["p_mask"][idx], b["r_ids"][idx],
                                              mask.long(), want_entropy=cfg.entropy_coef > 0, want_hidden=shared)
                    pg, st = A.policy_loss(logp, b["old_logp"][idx], b["adv"][idx], mask, cfg.clip_eps, denom=denom)
                    loss = pg
                    if cfg.entropy_coef > 0:
                        loss = loss - cfg.entropy_coef * A.masked_mean(ent, mask, denom=denom)
                    if cfg.algo == "grpo" and cfg.kl_coef:
                        kl_loss = A.masked_mean(A.kl_penalty(logp, b["ref_logp"][idx], "k3"), mask, denom=denom)
                        loss = loss + cfg.kl_coef * kl_loss
                        acc.setdefault("kl_loss", []).append(float(kl_loss.detach()))
                    vloss = None
                    if self.critic is not None:
                        values = (self.critic.heads_from_hidden(hidden) if shared else
                                  critic_values(self.critic_train, b["p_ids"][idx], b["p_mask"][idx],
                                                b["r_ids"][idx], mask.long())).float()
                        vloss = self._critic_loss(values, b, idx, acc, mask=mask, denom=denom)
                        if shared:
                            loss = loss + cfg.vf_coef * vloss
                finite = bool(torch.isfinite(loss)) and (vloss is None or bool(torch.isfinite(vloss)))
                if not dist.all_true(finite):                    # skipped on every rank together
                    skipped += 1
                    bad = True
                    continue
                self.opt.zero_grad(set_to_none=True)
                if self.critic_opt is not None:
                    self.critic_opt.zero_grad(set_to_none=True)
                    (loss + vloss).backward()    # disjoint parameters: one backward for both
                else:
                    loss.backward()
                if shared:
                    dist.average_grads(self.critic.heads.parameters())    # not under DDP
                # after DDP's all-reduce: the global gradient, the same norm on every rank
                gn = torch.nn.utils.clip_grad_norm_(pol_params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                cgn = None
                if self.critic_opt is not None:
                    cgn = torch.nn.utils.clip_grad_norm_(self.critic.parameters(),
                                                         cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                if not bool(torch.isfinite(gn)) or (cgn is not None and not bool(torch.isfinite(cgn))):
                    skipped += 1
                    bad = True
                    continue
                self.opt.step()
                if self.critic_opt is not None:
                    self.critic_opt.step()
                acc.setdefault("pg_loss", []).append(float(pg.detach()))
                acc.setdefault("clipfrac", []).append(st["clipfrac"])
                acc.setdefault("approx_kl", []).append(st["approx_kl"])
                acc.setdefault("grad_norm", []).append(float(gn))
                if vloss is not None:
                    acc.setdefault("critic_loss", []).append(float(vloss.detach()))
                if cgn is not None:
                    acc.setdefault("critic_grad_norm", []).append(float(cgn))
        # per-minibatch values: each rank's is its share x world size, so the global one is the mean
        # over ranks (the grad norms are already global: equal on every rank)
        acc.update(dist.mean_lists({k: v for k, v in acc.items() if isinstance(v, list)}))
        for k, v in acc.items():
            row[k] = (sum(v) / len(v)) if isinstance(v, list) else v
        row["skipped_updates"] = skipped
        return bad

    # ---- evaluation -------------------------------------------------------------------------------
    def evaluate(self, step: int) -> Dict:
        """Held-out evaluation (sharded over the ranks under torchrun; the single-process numbers)."""
        from .evaluate import evaluate

        t0 = time.perf_counter()
        with self.autocast():
            res = evaluate(self.policy, self.tok, self.task, self.heldout, self.max_new,
                           sampled_seed=_derived_seed(self.cfg.seed, f"eval:{step}"),
                           temperature=self.cfg.temperature, dist=self.dist)
        res["t_eval"] = time.perf_counter() - t0
        return res

    @torch.no_grad()
    def value_fan(self, index: int = 0) -> Optional[Dict]:
        with self.autocast():
            return self._value_fan(index)

    def _value_fan(self, index: int) -> Optional[Dict]:
        """The critic's value quantiles along the greedy response to one held-out prompt."""
        from .rollout import critic_values, decode, sample, score

        if self.critic is None:
            return None
        p = self.heldout[index]
        ids, mask = self._encode([p.prompt])
        r_ids, r_mask = sample(self.policy, ids, mask, self.max_new, self.tok.eos_token_id, self.tok.pad_token_id,
                               greedy=True)
        if self.cfg.shared_critic:
            _, _, hidden = score(self.policy, ids, mask, r_ids, r_mask, want_hidden=True)
            v = self.critic.heads_from_hidden(hidden)
        else:
            v = critic_values(self.critic, ids, mask, r_ids, r_mask)
        v = v[0].float().cpu()                                               # [R, H, N]
        tokens = [self.tok.decode([t]) for t in r_ids[0].tolist()]
        text = decode(self.tok, r_ids, r_mask)[0]
        return {"prompt": p.prompt, "response": text, "tokens": tokens, "true_reward": self.task.reward(p, text),
                "quantiles": v.mean(1).tolist(), "heads": v.tolist(), "taus": self.taus.tolist(), "algo": self.cfg.algo}

    # ---- the loop -----------------------------------------------------------------------------------
    def run(self, stop_at: Optional[int] = None, checkpoint_on_stop: bool = True) -> Dict:
        from tqdm.auto import tqdm

        cfg = self.cfg
        t_start = time.time()
        resumed = self.setup()
        if not resumed:
            row = {"step": 0}
            row.update(self.evaluate(0))
            self._write_metrics(row)
            self.log(f"[{cfg.algo} {cfg.task} noise={cfg.noise} seed={cfg.seed}] step 0: held-out accuracy "
                     f"{row['heldout_acc']:.3f} (sampled {row['heldout_acc_sampled']:.3f})")
        status = "ok"
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{cfg.algo} {cfg.task}",
                   disable=not cfg.progress or not self.dist.is_main)
        last_eval = None
        while self.step < cfg.steps:
            self.step += 1
            step = self.step
            t0, c0 = time.perf_counter(), time.process_time()
            row = {"step": step}
            batch = self.rollout(row)
            self.advantages(batch, row)
            t1 = time.perf_counter()
            bad = self.update(batch, row)
            row["t_update"] = time.perf_counter() - t1
            row["t_step"] = time.perf_counter() - t0
            row["t_step_cpu"] = time.process_time() - c0        # CPU seconds (all threads): robust to a busy machine
            self.bad_streak = self.bad_streak + 1 if bad else 0
            row["bad_step"] = bad
            if step % cfg.eval_every == 0 or step == cfg.steps:
                row.update(self.evaluate(step))
                last_eval = row["heldout_acc"]
            self._write_metrics(row)
            post = {"r_true": f"{row['reward_true']:.2f}", "r_noisy": f"{row['reward_noisy']:.2f}"}
            if last_eval is not None:
                post["heldout"] = f"{last_eval:.2f}"
            bar.set_postfix(post)
            bar.update(1)
            if bad:
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

    def finish(self, status: str, wall: float) -> Dict:
        """The summary (rank 0 writes it and the plots; every rank returns it)."""
        summary = self._finish(status, wall) if self.dist.is_main else None
        return self.dist.broadcast_object(summary)

    def _finish(self, status: str, wall: float) -> Dict:
        rows = read_metrics(self.out)
        evals = [r for r in rows if "heldout_acc" in r]
        steps = [r for r in rows if r["step"] > 0]
        tail = steps[-max(1, len(steps) // 10):] if steps else []
        summary = {
            "status": status, "out": self.out, "algo": self.cfg.algo, "task": self.cfg.task, "noise": self.cfg.noise,
            "seed": self.cfg.seed, "steps": self.step, "sft_dir": self.init_dir,
            "heldout_acc_initial": evals[0]["heldout_acc"] if evals else None,
            "heldout_acc_final": evals[-1]["heldout_acc"] if evals else None,
            "heldout_acc_sampled_initial": evals[0].get("heldout_acc_sampled") if evals else None,
            "heldout_acc_sampled_final": evals[-1].get("heldout_acc_sampled") if evals else None,
            "heldout_reward_final": evals[-1].get("heldout_reward") if evals else None,
            "heldout_acc_best": max(r["heldout_acc"] for r in evals) if evals else None,
            "reward_true_last10pct": sum(r["reward_true"] for r in tail) / len(tail) if tail else None,
            "reward_noisy_last10pct": sum(r["reward_noisy"] for r in tail) / len(tail) if tail else None,
            "sec_per_step_median": sorted(r["t_step"] for r in steps)[len(steps) // 2] if steps else None,
            "cpu_sec_per_step_median": sorted(r["t_step_cpu"] for r in steps)[len(steps) // 2] if steps else None,
            "bad_steps": sum(bool(r.get("bad_step")) for r in steps),
            "wall_seconds": wall, "world_size": self.dist.world,
        }
        if self.cfg.plots:
            from .plots import plot_run

            fan = self.value_fan()
            if fan is not None:
                ck.write_json(os.path.join(self.out, "value_fan.json"), fan)
            summary["plots"] = plot_run(self.out, rows, fan)
        ck.write_json(os.path.join(self.out, "summary.json"), summary)
        return summary


def dvpo_taus(n: int, kind: str, device) -> torch.Tensor:
    import dvpo

    return dvpo.taus(n, kind, device=device)


def read_metrics(out: str) -> List[Dict]:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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
    try:
        return trainer.run(stop_at=stop_at, checkpoint_on_stop=checkpoint_on_stop)
    finally:
        trainer.dist.cleanup()


def evaluate_checkpoint(path: str, *, task: Optional[str] = None, n_eval: Optional[int] = None,
                        seed: Optional[int] = None, device: str = "auto") -> Dict:
    """Held-out evaluation of a run dir (its latest `ckpt/policy`) or a policy checkpoint dir; for a run
    dir the same numbers as the run's own evaluation at that step (see `evaluate.evaluate_checkpoint`)."""
    from .evaluate import evaluate_checkpoint as _evaluate_checkpoint

    return _evaluate_checkpoint(path, task=task, n_eval=n_eval, seed=seed, device=device)
