"""Batched sampling with a KV cache, and the forward passes that score a (prompt, response) batch.

Layout (shared by SFT, rollouts, updates and evaluation): prompts are left-padded `[B, P]` (so
every prompt ends at column P-1), responses right-padded `[B, R]`; the response mask is 1 up to
and including EOS. Position ids count real tokens only, so padding never shifts a sequence.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .models import cache_kwarg


def encode_prompts(tokenizer, prompts: Sequence[str], device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask; BOS is prepended when the tokenizer has one."""
    bos = tokenizer.bos_token or ""
    enc = tokenizer([bos + p for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def encode_responses(tokenizer, responses: Sequence[str], device, max_len: Optional[int] = None):
    """Right-padded response ids (each followed by EOS) and mask (SFT targets)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = [r + [eos] for r in tokenizer(list(responses), add_special_tokens=False)["input_ids"]]
    width = max(len(r) for r in rows) if max_len is None else max_len
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        r = r[:width]
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def sample(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int, eos_id: int,
           pad_id: int, generator: Optional[torch.Generator] = None, temperature: float = 1.0,
           greedy: bool = False, uniforms: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sample responses (`greedy` takes the argmax).

    The draws: with `uniforms` ([B, max_new_tokens] in [0, 1), one per row and position), token t of
    row b is the inverse CDF of its distribution at `uniforms[b, t]`, so a row's sample depends on its
    own uniforms only, not on the batch it is in (the trainer draws them for the whole global batch
    and gives each rank its rows: sharding does not change the samples). Otherwise `generator` drives
    `torch.multinomial`.

    Returns (response ids [B, R], response mask [B, R]) with R <= max_new_tokens (the loop stops once
    every row has emitted EOS); tokens after EOS are `pad_id` with mask 0."""
    b = prompt_ids.shape[0]
    device = prompt_ids.device
    attn = prompt_mask.long()
    pos = positions(attn)
    cache_name = cache_kwarg(model)
    out = model(input_ids=prompt_ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    logits = out.logits[:, -1, :]
    next_pos = pos[:, -1:] + 1
    done = torch.zeros(b, dtype=torch.bool, device=device)
    tokens, masks = [], []
    for step in range(max_new_tokens):
        if greedy:
            tok = logits.argmax(-1)
        else:
            probs = torch.softmax(logits.float() / max(temperature, 1e-6), dim=-1)
            if uniforms is not None:
                tok = inverse_cdf(probs, uniforms[:, step])
            else:
                tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        real = ~done
        tok = torch.where(real, tok, torch.full_like(tok, pad_id))
        tokens.append(tok)
        masks.append(real.long())
        done = done | (tok == eos_id)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        attn = torch.cat([attn, real.long().unsqueeze(-1)], dim=1)
        out = model(input_ids=tok.unsqueeze(-1), attention_mask=attn, position_ids=next_pos,
                    use_cache=True, **{cache_name: cache})
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        logits = out.logits[:, -1, :]
        next_pos = next_pos + 1
    return torch.stack(tokens, 1), torch.stack(masks, 1)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Categorical samples [B] from probabilities [B, V] and uniforms [B]: the first index whose
    cumulative probability exceeds u * total (float64 sums; a zero-probability token is never picked)."""
    cdf = probs.double().cumsum(-1)
    target = (u.double() * cdf[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    idx = idx.clamp(max=probs.shape[-1] - 1)
    # past the last nonzero-probability token only through rounding: step back to it
    bad = probs.gather(-1, idx.unsqueeze(-1)).squeeze(-1) <= 0
    if bool(bad.any()):
        last = (probs > 0).long().cumsum(-1).argmax(-1)
        idx = torch.where(bad, last, idx)
    return idx


def decode(tokenizer, resp_ids: torch.Tensor, resp_mask: torch.Tensor) -> List[str]:
    """Response texts without EOS/padding (special tokens skipped)."""
    rows = [ids[m.bool()].tolist() for ids, m in zip(resp_ids.cpu(), resp_mask.cpu())]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def full_inputs(prompt_ids, prompt_mask, resp_ids, resp_mask):
    ids = torch.cat([prompt_ids, resp_ids], dim=1)
    attn = torch.cat([prompt_mask.long(), resp_mask.long()], dim=1)
    return ids, attn, positions(attn)


def score(model, prompt_ids, prompt_mask, resp_ids, resp_mask, *, want_entropy: bool = False,
          want_hidden: bool = False):
    """Log-probs of the response tokens `[B, R]` under `model` (fp32), and optionally the per-token
    entropy `[B, R]` and the last hidden states at the positions that predict them `[B, R, D]` (the
    states a critic values)."""
    ids, attn, pos = full_inputs(prompt_ids, prompt_mask, resp_ids, resp_mask)
    r = resp_ids.shape[1]
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=r + 1,
                output_hidden_states=want_hidden)
    logits = out.logits[:, :-1, :].float()
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, resp_ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1) if want_entropy else None
    hidden = out.hidden_states[-1][:, -r - 1:-1, :] if want_hidden else None
    return logp, entropy, hidden


def critic_values(critic, prompt_ids, prompt_mask, resp_ids, resp_mask) -> torch.Tensor:
    """A separate critic's outputs `[B, R, H, N]` at the states before each response token."""
    ids, attn, pos = full_inputs(prompt_ids, prompt_mask, resp_ids, resp_mask)
    r = resp_ids.shape[1]
    return critic(ids, attn, pos)[:, -r - 1:-1]
