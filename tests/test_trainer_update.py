"""One PPO update on a fixed batch against a hand computation, and the sampler against the scorer."""

import copy
import dataclasses
import math

import pytest
import torch

from dvpo.trainer import TrainConfig
from dvpo.trainer.loop import Trainer

TINY = dict(hidden=16, layers=1, heads=2, ffn=32, sft_steps=10, sft_batch=16, sft_eval_every=10,
            prompts_per_step=3, group_size=2, n_eval=4, steps=1, progress=False, plots=False, threads=1)


@pytest.fixture(scope="module")
def sft_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("sft-cache-update"))


def _hand_logp(model, b):
    """Response log-probs by an explicit forward and per-token indexing (no trainer helpers)."""
    ids = torch.cat([b.p_ids, b.r_ids], 1)
    attn = torch.cat([b.p_mask, b.mask.long()], 1)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits.float()
    p = b.p_ids.shape[1]
    rows = []
    for i in range(ids.shape[0]):
        row = []
        for j in range(b.r_ids.shape[1]):
            lp = torch.log_softmax(logits[i, p - 1 + j], -1)
            row.append(lp[b.r_ids[i, j]])
        rows.append(torch.stack(row))
    return torch.stack(rows)


def test_one_step_ppo_update_matches_hand_computed(sft_cache, tmp_path):
    cfg = TrainConfig(**TINY, algo="ppo", task="math", out=str(tmp_path), sft_cache=sft_cache, ppo_epochs=1,
                      minibatches=1, kl_coef=0.05, cliprange_value=0.05, clip_eps=0.2, policy_lr=1e-3,
                      critic_lr=2e-3, gamma=1.0, lam=0.9, grad_clip=0.5)
    tr = Trainer(cfg, log=None)
    tr.setup()
    row = {}
    b = tr.advantages(tr.rollout(row), row)
    mask = b.mask
    B, T = mask.shape
    m = mask.tolist()

    # --- advantages and returns by hand: per-token rewards, GAE recursion, whitening -------------
    assert b.values.shape == (B, T)                                   # PPO's critic: one scalar per token
    old, ref, v = b.old_logp.tolist(), b.ref_logp.tolist(), b.values.tolist()
    outcome = b.outcome.tolist()
    adv_h, ret_h = [[0.0] * T for _ in range(B)], [[0.0] * T for _ in range(B)]
    for i in range(B):
        n = int(sum(m[i]))
        r = [-0.05 * (old[i][j] - ref[i][j]) for j in range(n)]
        r[n - 1] += outcome[i]
        nv, na = 0.0, 0.0
        for j in reversed(range(n)):
            a = r[j] + nv - v[i][j] + 0.9 * na
            adv_h[i][j], ret_h[i][j] = a, a + v[i][j]
            nv, na = v[i][j], a
    flat = [adv_h[i][j] for i in range(B) for j in range(T) if m[i][j]]
    mu = sum(flat) / len(flat)
    sd = math.sqrt(sum((x - mu) ** 2 for x in flat) / len(flat) + 1e-8)
    white = [[(adv_h[i][j] - mu) / sd if m[i][j] else 0.0 for j in range(T)] for i in range(B)]
    assert torch.allclose(b.advantages, torch.tensor(white), atol=1e-4)
    assert torch.allclose(b.returns, torch.tensor(ret_h), atol=1e-5)

    # --- move old_logp so ratios differ from 1 and the clip is active ------------------------------
    g = torch.Generator().manual_seed(0)
    b = dataclasses.replace(b, old_logp=b.old_logp + 0.4 * torch.randn(B, T, generator=g) * mask)
    pol0, crit0 = copy.deepcopy(tr.policy), copy.deepcopy(tr.critic)
    p_before = [p.detach().clone() for p in tr.policy.parameters()]
    c_before = [p.detach().clone() for p in tr.critic.parameters()]
    out = {}
    tr.update(b, out)

    # --- the same losses by hand -----------------------------------------------------------------
    logp = _hand_logp(pol0, b)
    terms = []
    for i in range(B):
        for j in range(T):
            if m[i][j]:
                ratio = torch.exp(logp[i, j] - b.old_logp[i, j])
                a = white[i][j]
                terms.append(torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2)))
    pg = torch.stack(terms).mean()
    ids = torch.cat([b.p_ids, b.r_ids], 1)
    attn = torch.cat([b.p_mask, mask.long()], 1)
    hid = crit0.backbone(input_ids=ids, attention_mask=attn,
                         position_ids=(attn.cumsum(-1) - 1).clamp(min=0)).last_hidden_state
    vals = crit0.heads(hid)[:, b.p_ids.shape[1] - 1:-1, 0]
    vterms = []
    for i in range(B):
        for j in range(T):
            if m[i][j]:
                vo = v[i][j]
                vc = torch.clamp(vals[i, j], vo - 0.05, vo + 0.05)
                vterms.append(torch.maximum((vals[i, j] - ret_h[i][j]) ** 2, (vc - ret_h[i][j]) ** 2))
    vl = 0.5 * torch.stack(vterms).mean()
    assert abs(out["pg_loss"] - float(pg.detach())) < 1e-5
    assert abs(out["critic_loss"] - float(vl.detach())) < 1e-5
    assert out["clipfrac"] > 0

    # --- gradients (clipped to norm 0.5) and the first AdamW step ------------------------------------
    (pg + vl).backward()
    for model, before, lr, live in ((pol0, p_before, 1e-3, tr.policy), (crit0, c_before, 2e-3, tr.critic)):
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        norm = torch.sqrt(sum((gr ** 2).sum() for gr in grads))
        coef = min(1.0, 0.5 / (float(norm) + 1e-6))
        for gr, p_live, p0 in zip(grads, live.parameters(), before):
            gc = gr * coef
            assert torch.allclose(p_live.grad, gc, rtol=1e-3, atol=1e-7)
            # AdamW step 1 (bias-corrected, weight decay 0): p - lr * g / (|g| + eps), with the trainer's g
            expect = p0 - lr * p_live.grad / (p_live.grad.abs() + 1e-8)
            assert torch.allclose(p_live.detach(), expect, atol=1e-6)


def test_sampler_matches_scorer_with_left_padding(sft_cache, tmp_path):
    """Mixed-length prompts (math:1-5 is left-padded): the sampling loop's token probabilities equal
    the scorer's, and greedy decoding of a prompt does not depend on its batch."""
    from dvpo.trainer.evaluate import generate_texts
    from dvpo.trainer.rollout import encode_prompts, sample, score

    cfg = TrainConfig(**TINY, task="math:1-5", out=str(tmp_path), sft_cache=sft_cache)
    tr = Trainer(cfg, log=None)
    tr.setup()
    probs = tr.task.heldout_set(12)
    ids, pmask = encode_prompts(tr.tok, [p.prompt for p in probs], "cpu")
    assert (pmask == 0).any()                                            # some rows are padded
    seen = []
    real = torch.multinomial

    def spy(p, n, generator=None):
        tok = real(p, n, generator=generator)
        seen.append(p.gather(-1, tok).squeeze(-1).log())
        return tok

    torch.multinomial = spy
    try:
        g = torch.Generator().manual_seed(3)
        r_ids, r_mask = sample(tr.policy, ids, pmask, 4, tr.tok.eos_token_id, tr.tok.pad_token_id, generator=g)
    finally:
        torch.multinomial = real
    with torch.no_grad():
        lp, _, _ = score(tr.policy, ids, pmask, r_ids, r_mask)
    assert torch.allclose(torch.stack(seen, 1) * r_mask, lp * r_mask, atol=1e-4)
    batched = generate_texts(tr.policy, tr.tok, [p.prompt for p in probs], 4)
    alone = [generate_texts(tr.policy, tr.tok, [p.prompt], 4)[0] for p in probs]
    assert batched == alone
    # gradients through left-padded batches stay finite
    lp, _, _ = score(tr.policy, ids, pmask, r_ids, r_mask)
    (lp * r_mask).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in tr.policy.parameters() if p.grad is not None)
