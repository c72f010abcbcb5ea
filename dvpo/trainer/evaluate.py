"""Held-out evaluation: greedy (and optionally sampled) accuracy and mean true reward."""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional, Sequence

import torch

from .rollout import decode, encode_prompts, sample


@torch.no_grad()
def generate_texts(model, tok, prompts: Sequence[str], max_new_tokens: int, *, greedy: bool = True,
                   generator: Optional[torch.Generator] = None, temperature: float = 1.0,
                   batch_size: int = 512, uniforms: Optional[torch.Tensor] = None) -> List[str]:
    """Responses to `prompts` in batches; `uniforms` [len(prompts), max_new_tokens]: the sampling draws
    (see `rollout.sample`), else `generator` drives them."""
    device = next(model.parameters()).device
    out: List[str] = []
    for i in range(0, len(prompts), batch_size):
        ids, mask = encode_prompts(tok, prompts[i:i + batch_size], device)
        u = None if uniforms is None else uniforms[i:i + batch_size].to(device)
        r_ids, r_mask = sample(model, ids, mask, max_new_tokens, tok.eos_token_id, tok.pad_token_id,
                               generator=generator, temperature=temperature, greedy=greedy, uniforms=u)
        out.extend(decode(tok, r_ids, r_mask))
    return out


@torch.no_grad()
def evaluate(model, tok, task, problems, max_new_tokens: int, *, sampled_seed: Optional[int] = None,
             temperature: float = 1.0, examples: int = 0, dist=None) -> Dict:
    """Greedy accuracy (exact success), mean true reward, per-level accuracy; with `sampled_seed`, the
    same for one temperature sample per problem (uniforms [n, max_new_tokens] from a fresh generator
    seeded with it: reproducible and independent of the training streams).

    `dist` (a `distributed.Dist` under torchrun): each rank generates for its contiguous shard of
    `problems` (with its rows of the same uniforms) and the per-problem results are gathered, so the
    numbers are the single-process ones."""
    lo, hi = 0, len(problems)
    if dist is not None and dist.enabled:
        from .distributed import shard

        lo, hi = shard(len(problems), dist.world, dist.rank)
    mine = list(problems[lo:hi])
    prompts = [p.prompt for p in mine]
    texts = generate_texts(model, tok, prompts, max_new_tokens, greedy=True) if mine else []
    recs = [(task.reward(p, t), task.correct(p, t)) for p, t in zip(mine, texts)]
    if sampled_seed is not None:
        g = torch.Generator()
        g.manual_seed(int(sampled_seed))
        u = torch.rand(len(problems), max(1, max_new_tokens), generator=g)[lo:hi]
        s_texts = generate_texts(model, tok, prompts, max_new_tokens, greedy=False, temperature=temperature,
                                 uniforms=u) if mine else []
        recs = [r + (task.correct(p, t), task.reward(p, t)) for r, p, t in zip(recs, mine, s_texts)]
    if examples:
        texts = texts[:examples]
    if dist is not None and dist.enabled:
        recs = dist.gather_lists(recs)
        if examples:
            texts = dist.gather_lists(texts)[:examples]
    rewards = [r[0] for r in recs]
    correct = [r[1] for r in recs]
    by_level = defaultdict(list)
    for p, c in zip(problems, correct):
        by_level[p.level].append(c)
    res = {"heldout_acc": sum(correct) / len(correct), "heldout_reward": sum(rewards) / len(rewards)}
    if len(by_level) > 1:
        for lv, cs in sorted(by_level.items()):
            res[f"heldout_acc_L{lv}"] = sum(cs) / len(cs)
    if sampled_seed is not None:
        res["heldout_acc_sampled"] = sum(r[2] for r in recs) / len(problems)
        res["heldout_reward_sampled"] = sum(r[3] for r in recs) / len(problems)
    if examples:
        res["examples"] = [{"prompt": p.prompt, "response": t, "gold": p.gold, "reward": r}
                           for p, t, r in list(zip(problems, texts, rewards))[:examples]]
    return res
