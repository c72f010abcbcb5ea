"""Held-out evaluation: greedy (and optionally sampled) accuracy and mean true reward."""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional, Sequence

import torch

from .rollout import decode, encode_prompts, sample


@torch.no_grad()
def generate_texts(model, tok, prompts: Sequence[str], max_new_tokens: int, *, greedy: bool = True,
                   generator: Optional[torch.Generator] = None, temperature: float = 1.0,
                   batch_size: int = 512) -> List[str]:
    device = next(model.parameters()).device
    out: List[str] = []
    for i in range(0, len(prompts), batch_size):
        ids, mask = encode_prompts(tok, prompts[i:i + batch_size], device)
        r_ids, r_mask = sample(model, ids, mask, max_new_tokens, tok.eos_token_id, tok.pad_token_id,
                               generator=generator, temperature=temperature, greedy=greedy)
        out.extend(decode(tok, r_ids, r_mask))
    return out


@torch.no_grad()
def evaluate(model, tok, task, problems, max_new_tokens: int, *, sampled_seed: Optional[int] = None,
             temperature: float = 1.0, examples: int = 0) -> Dict:
    """Greedy accuracy (exact success), mean true reward, per-level accuracy; with `sampled_seed`, the
    same for one temperature sample per problem (a fresh generator from that seed: reproducible and
    independent of the training streams)."""
    prompts = [p.prompt for p in problems]
    texts = generate_texts(model, tok, prompts, max_new_tokens, greedy=True)
    rewards = [task.reward(p, t) for p, t in zip(problems, texts)]
    correct = [task.correct(p, t) for p, t in zip(problems, texts)]
    by_level = defaultdict(list)
    for p, c in zip(problems, correct):
        by_level[p.level].append(c)
    res = {"heldout_acc": sum(correct) / len(correct), "heldout_reward": sum(rewards) / len(rewards)}
    if len(by_level) > 1:
        for lv, cs in sorted(by_level.items()):
            res[f"heldout_acc_L{lv}"] = sum(cs) / len(cs)
    if sampled_seed is not None:
        g = torch.Generator(device=next(model.parameters()).device)
        g.manual_seed(int(sampled_seed))
        s_texts = generate_texts(model, tok, prompts, max_new_tokens, greedy=False, generator=g,
                                 temperature=temperature)
        res["heldout_acc_sampled"] = sum(task.correct(p, t) for p, t in zip(problems, s_texts)) / len(problems)
        res["heldout_reward_sampled"] = sum(task.reward(p, t) for p, t in zip(problems, s_texts)) / len(problems)
    if examples:
        res["examples"] = [{"prompt": p.prompt, "response": t, "gold": p.gold, "reward": r}
                           for p, t, r in list(zip(problems, texts, rewards))[:examples]]
    return res
