"""The rollout stage of a training step: sample this rank's shard of the step's global batch, reward
it (the true reward and the noisy one the trainer sees) and score it (log-probs of the policy and
the reference, the critic's values) into a `Batch`.

Every rank draws the whole global batch's randomness (prompts, sampling uniforms, reward noise) and
uses its rows, so 1 and N processes sample the same responses; per-sample values are gathered and
the noise model runs on the global batch, as in one process (`distributed.py`)."""

from __future__ import annotations

import time
from typing import Dict, List, Optional

import torch

from . import losses
from .batch import Batch
from .distributed import shard
from .rollout import decode, encode_prompts, sample, score


@torch.no_grad()
def collect(tr, row: Dict) -> Batch:
    """One step's experience on this rank (all of it in one process); `row` gets the step's
    reward, KL, entropy and length metrics over the global batch. `tr`: the `Trainer`."""
    cfg, task, dist = tr.cfg, tr.task, tr.dist
    g = cfg.group_size
    t0 = time.perf_counter()
    all_problems = [task.train_problem(tr.prompt_rng) for _ in range(cfg.prompts_per_step)]
    p_lo, p_hi = shard(len(all_problems), dist.world, dist.rank)
    problems = all_problems[p_lo:p_hi]
    lo, n_global = p_lo * g, len(all_problems) * g
    rep = [p for p in problems for _ in range(g)]
    # the draws of the whole global batch, on every rank; this rank samples with its rows
    u = torch.rand(n_global, max(1, tr.max_new), generator=tr.g_sample, device=tr.g_sample.device)
    u = u[lo:lo + len(rep)].to(tr.device)
    p_ids, p_mask = encode_prompts(tr.tok, [p.prompt for p in rep], tr.device)
    with tr.autocast():
        r_ids, r_mask = sample(tr.policy, p_ids, p_mask, tr.max_new, tr.tok.eos_token_id, tr.tok.pad_token_id,
                               temperature=cfg.temperature, uniforms=u)
    texts = decode(tr.tok, r_ids, r_mask)
    t1 = time.perf_counter()

    # rewards: true and noisy, from the per-sample values of the global batch (rank order = global order)
    true = [task.reward(p, t) for p, t in zip(rep, texts)]
    correct = [task.correct(p, t) for p, t in zip(rep, texts)]
    vote_r, labels = None, None
    if tr.noise.vote_k:
        labels = vote_labels(tr, problems)
        lab = {p.prompt: l for p, l in zip(problems, labels)}
        vote_r = [task.vote_reward(p, t, lab[p.prompt]) for p, t in zip(rep, texts)]
    per_row = dist.gather_lists(list(zip(true, correct, texts, vote_r or [None] * len(rep))))
    g_true = [r[0] for r in per_row]
    g_rep = [p for p in all_problems for _ in range(g)]
    if labels is not None:
        g_labels = dist.gather_lists(labels)
        row["vote_label_acc"] = sum(
            task.vote_reward(p, p.gold, l) for p, l in zip(all_problems, g_labels)) / len(all_problems)
    noisy, info = tr.noise.apply(g_true, generator=tr.g_noise, prompts=[p.prompt for p in g_rep],
                                 responses=[r[2] for r in per_row],
                                 vote_rewards=[r[3] for r in per_row] if vote_r is not None else None)
    missing = [x != x for x in noisy]
    noisy = [cfg.missing_fill if m else x for x, m in zip(noisy, missing)]
    t2 = time.perf_counter()

    # scores: log-probs of the policy and the reference, the critic's values
    mask = r_mask.float()
    with tr.autocast():
        logp, ent, hidden = score(tr.policy, p_ids, p_mask, r_ids, r_mask, want_entropy=True,
                                  want_hidden=tr.shared_critic)
        ref_logp, _, _ = score(tr.ref, p_ids, p_mask, r_ids, r_mask)
        values = tr.values(tr.critic, p_ids, p_mask, r_ids, r_mask, hidden)
    t3 = time.perf_counter()

    n = n_global
    lens = mask.sum(1)
    tok_means = dist.mean_pairs({
        "kl": (float(((logp - ref_logp) * mask).sum()), float(lens.sum())),
        "kl_k3": (float((losses.kl_penalty(logp, ref_logp, "k3") * mask).sum()), float(lens.sum())),
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
    return Batch(p_ids=p_ids, p_mask=p_mask, r_ids=r_ids, mask=mask, old_logp=logp.float(),
                 ref_logp=ref_logp.float(), values=values,
                 outcome=torch.tensor(noisy[lo:lo + len(rep)], dtype=torch.float32, device=tr.device),
                 lo=lo, n_global=n_global,
                 lens=torch.tensor(dist.gather_lists(lens.tolist()), dtype=torch.float64))


def _vote_uniforms(tr, prompt: str, k: int) -> torch.Tensor:
    """The sampling draws [k, max_new] of a prompt's vote:K samples, from a generator seeded by the
    run's seed and the prompt: the labels do not depend on the batch, the order or the rank."""
    from .loop import derived_seed

    g = torch.Generator()
    g.manual_seed(derived_seed(tr.cfg.seed, "vote:" + prompt))
    return torch.rand(k, max(1, tr.max_new), generator=g)


@torch.no_grad()
def vote_labels(tr, problems) -> List[Optional[tuple]]:
    """Majority-vote labels from K samples of the initial (reference) policy, once per prompt
    (cached in `tr.votes`, which the checkpoint keeps)."""
    k = tr.noise.vote_k
    need = []
    for p in problems:
        if p.prompt not in tr.votes and p not in need:
            need.append(p)
    if need:
        prompts = [p.prompt for p in need for _ in range(k)]
        ids, mask = encode_prompts(tr.tok, prompts, tr.device)
        u = torch.cat([_vote_uniforms(tr, p.prompt, k) for p in need]).to(tr.device)
        with tr.autocast():
            r_ids, r_mask = sample(tr.ref, ids, mask, tr.max_new, tr.tok.eos_token_id, tr.tok.pad_token_id,
                                   temperature=tr.cfg.temperature, uniforms=u)
        texts = decode(tr.tok, r_ids, r_mask)
        for i, p in enumerate(need):
            tr.votes[p.prompt] = tr.task.majority(p, texts[i * k:(i + 1) * k])
    return [tr.votes[p.prompt] for p in problems]
