"""Held-out evaluation: greedy (and optionally sampled) accuracy and mean true reward."""

from __future__ import annotations

import json
import os
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


class CheckpointError(ValueError):
    """`path` is not something `evaluate_checkpoint` can evaluate; `reason` says why, in one line."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path!r}: {reason}")
        self.path, self.reason = path, reason


def describe_checkpoint(path: str) -> Dict:
    """What `path` holds: {"policy_dir", "run" (the run's TrainConfig dict, or None), "sft" (the SFT config
    dict of a cached warm start, or None), "step" (the run checkpoint's step, or None)}. Raises a
    CheckpointError when the path does not exist or holds no policy checkpoint."""
    if not os.path.exists(path):
        raise CheckpointError(path, "the path does not exist")
    if not os.path.isdir(path):
        raise CheckpointError(path, "the path is a file, not a run dir (dvpo train --out) or a policy "
                                    "checkpoint dir")

    def read(p):
        try:
            with open(p) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    run_cfg = read(os.path.join(path, "config.json")) if not os.path.exists(os.path.join(path, "sft.json")) else None
    if not (isinstance(run_cfg, dict) and "algo" in run_cfg):
        run_cfg = None                                 # a Hugging Face config.json, not a run's
    sft_meta = read(os.path.join(path, "sft.json"))
    sft_cfg = sft_meta.get("config") if isinstance(sft_meta, dict) else None
    policy_dir, step = path, None
    if os.path.exists(os.path.join(path, "ckpt", "policy")):
        policy_dir = os.path.join(path, "ckpt", "policy")
        state = read(os.path.join(path, "ckpt", "state.json"))
        step = state.get("step") if isinstance(state, dict) else None
    elif run_cfg is not None:
        raise CheckpointError(path, "the run dir has no checkpoint yet (no ckpt/policy)")
    elif not os.path.exists(os.path.join(path, "config.json")):
        raise CheckpointError(path, "the dir is neither a run dir (no ckpt/policy) nor a policy checkpoint "
                                    "(no config.json)")
    return {"policy_dir": policy_dir, "run": run_cfg, "sft": sft_cfg, "step": step}


def evaluate_checkpoint(path: str, *, task: Optional[str] = None, n_eval: Optional[int] = None,
                        seed: Optional[int] = None, device: str = "auto") -> Dict:
    """Held-out evaluation of a run dir (its latest `ckpt/policy`) or a policy checkpoint dir.

    For a run dir the defaults repeat the trainer's own evaluation of that checkpoint: the run's task,
    `n_eval`, response length cap, temperature, attention and bf16 settings, and the sampled-accuracy
    draw the trainer made at the checkpoint's step (its seed is derived from the run's seed and the
    step), so `heldout_acc` and `heldout_acc_sampled` equal that step's row of metrics.jsonl (at the
    same thread count and device). `seed` picks another draw; `task`/`n_eval` another problem set.
    For a policy dir (an SFT warm start or any saved policy): n_eval 256, seed 0, temperature 1."""
    from dvpo.tasks import get_task

    from .loop import derived_seed
    from .models import autocast, load_policy, pick_device

    info = describe_checkpoint(path)
    run = info["run"] or {}
    task_spec = task or run.get("task") or (info["sft"] or {}).get("task")
    if task_spec is None:
        raise CheckpointError(path, "cannot tell the task (no run or SFT config there): pass task=")
    t = get_task(task_spec)
    same_task = bool(run) and task_spec == run.get("task")
    n_eval = int(n_eval if n_eval is not None else run.get("n_eval", 256))
    if seed is None:
        step = info["step"]
        seed = derived_seed(run["seed"], f"eval:{step}") if run and step is not None else 0
    max_new = (run.get("max_new_tokens") or t.max_new_tokens) if same_task else t.max_new_tokens
    bf16 = bool(run.get("bf16", True))
    dev = pick_device(device)
    model, tok = load_policy(info["policy_dir"], dev, run.get("attn", "auto"), bf16)
    with autocast(dev, bf16):
        res = evaluate(model, tok, t, t.heldout_set(n_eval), max_new, sampled_seed=seed,
                       temperature=float(run.get("temperature", 1.0)), examples=5)
    res.update({"checkpoint": info["policy_dir"], "task": task_spec, "n_eval": n_eval, "step": info["step"],
                "sampled_seed": int(seed)})
    return res


@torch.no_grad()
def value_fan(tr, index: int = 0) -> Dict:
    """The critic's value quantiles along the greedy response to the held-out prompt `index` of the
    `Trainer` `tr` (for `value_fan.png`): per token the ensemble mean's quantiles and every head's."""
    from .rollout import critic_values, score

    p = tr.heldout[index]
    ids, mask = encode_prompts(tr.tok, [p.prompt], tr.device)
    r_ids, r_mask = sample(tr.policy, ids, mask, tr.max_new, tr.tok.eos_token_id, tr.tok.pad_token_id, greedy=True)
    if tr.shared_critic:
        _, _, hidden = score(tr.policy, ids, mask, r_ids, r_mask, want_hidden=True)
        v = tr.critic.heads_from_hidden(hidden)
    else:
        v = critic_values(tr.critic, ids, mask, r_ids, r_mask)
    v = v[0].float().cpu()                                               # [R, H, N]
    tokens = [tr.tok.decode([t]) for t in r_ids[0].tolist()]
    text = decode(tr.tok, r_ids, r_mask)[0]
    return {"prompt": p.prompt, "response": text, "tokens": tokens, "true_reward": tr.task.reward(p, text),
            "quantiles": v.mean(1).tolist(), "heads": v.tolist(), "taus": tr.taus.tolist(), "algo": tr.cfg.algo}
