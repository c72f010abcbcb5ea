"""The update stage of a training step: K epochs (`--ppo-epochs`) over the batch in minibatches
(`--minibatches`), each a gradient step of the actor (PPO surrogate, entropy bonus, the
algorithm's extra losses) and of the critic (the algorithm's value loss).

Under torchrun the minibatches are the single-process ones (one global permutation, each rank
taking its rows, `Batch.minibatch`), gradients are averaged by DDP, and a non-finite loss or
gradient skips the update on every rank together."""

from __future__ import annotations

import math
from typing import Dict, List

import torch

from . import losses
from .batch import Batch


def update(tr, batch: Batch, row: Dict) -> bool:
    """Train on one batch; per-minibatch metrics are averaged into `row`. Returns True when an
    update was skipped (a non-finite loss or gradient). `tr`: the `Trainer`."""
    cfg, dist, algo = tr.cfg, tr.dist, tr.algo
    n = batch.n_global
    size = max(1, math.ceil(n / max(1, cfg.minibatches)))
    acc: Dict[str, List[float]] = {}
    timings: Dict[str, float] = {}
    skipped, bad = 0, False
    pol_params = [p for g in tr.opt.param_groups for p in g["params"]]
    clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")

    def log(name, value):
        if name.startswith("t_"):
            timings[name] = timings.get(name, 0.0) + value        # timings add up over the step
        else:
            acc.setdefault(name, []).append(value)

    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(n, generator=tr.g_shuffle)           # global rows, the same on every rank
        for start in range(0, n, size):
            mb = batch.minibatch(perm[start:start + size], dist.world)
            with tr.autocast():
                logp, ent, hidden = tr.score(tr.policy_train, mb, want_entropy=cfg.entropy_coef > 0)
                pg, st = losses.policy_loss(logp, mb.old_logp, mb.advantages, mb.mask, cfg.clip_eps, denom=mb.denom)
                loss = pg
                if cfg.entropy_coef > 0:
                    loss = loss - cfg.entropy_coef * losses.masked_mean(ent, mb.mask, denom=mb.denom)
                for name, weight, extra in algo.extra_losses(logp, mb):
                    loss = loss + weight * extra
                    log(name, float(extra.detach()))
                vloss = None
                if tr.critic is not None:
                    values = tr.values(tr.critic_train, mb.p_ids, mb.p_mask, mb.r_ids, mb.mask.long(), hidden)
                    vloss, vmetrics = algo.value_loss(values, mb, tr.taus)
                    for name, value in vmetrics.items():
                        log(name, value)
                    if tr.shared_critic:
                        loss = loss + cfg.vf_coef * vloss
            finite = bool(torch.isfinite(loss)) and (vloss is None or bool(torch.isfinite(vloss)))
            if not dist.all_true(finite):                        # skipped on every rank together
                skipped, bad = skipped + 1, True
                continue
            tr.opt.zero_grad(set_to_none=True)
            if tr.critic_opt is not None:
                tr.critic_opt.zero_grad(set_to_none=True)
                (loss + vloss).backward()           # disjoint parameters: one backward for both
            else:
                loss.backward()
            if tr.shared_critic:
                dist.average_grads(tr.critic.heads.parameters())    # not under DDP
            # after DDP's all-reduce: the global gradient, the same norm on every rank
            gn = torch.nn.utils.clip_grad_norm_(pol_params, clip)
            cgn = None
            if tr.critic_opt is not None:
                cgn = torch.nn.utils.clip_grad_norm_(tr.critic.parameters(), clip)
            if not bool(torch.isfinite(gn)) or (cgn is not None and not bool(torch.isfinite(cgn))):
                skipped, bad = skipped + 1, True
                continue
            tr.opt.step()
            if tr.critic_opt is not None:
                tr.critic_opt.step()
            log("pg_loss", float(pg.detach()))
            log("clipfrac", st["clipfrac"])
            log("approx_kl", st["approx_kl"])
            log("grad_norm", float(gn))
            if vloss is not None:
                log("critic_loss", float(vloss.detach()))
            if cgn is not None:
                log("critic_grad_norm", float(cgn))
    # per-minibatch values: each rank's is its share x world size, so the global one is the mean over
    # ranks (the grad norms are already global: equal on every rank)
    for name, values in dist.mean_lists(acc).items():
        row[name] = sum(values) / len(values)
    row.update(timings)
    row["skipped_updates"] = skipped
    return bad
