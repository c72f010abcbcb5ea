"""One step's experience as typed records: `Batch` (this rank's rows of the step's global batch)
and `Minibatch` (the rows of one update, with the loss denominator).

Tensors are on the trainer's device; per-token tensors are `[B, T]` over response tokens.
A `Batch` is not mutated: the advantage stage returns a copy with `advantages` and `returns` set
(`with_targets`)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class Batch:
    p_ids: Tensor                 # [B, P] prompt ids (left-padded)
    p_mask: Tensor                # [B, P]
    r_ids: Tensor                 # [B, T] response ids
    mask: Tensor                  # [B, T] float, 1 = response token (EOS included)
    old_logp: Tensor              # [B, T] the sampling policy's log-probs
    ref_logp: Tensor              # [B, T] the reference policy's log-probs
    values: Optional[Tensor]      # the critic's values in its algorithm's view (`Algorithm.view`), or None
    outcome: Tensor               # [B] the (noisy) reward the trainer sees
    lo: int                       # this shard's first row in the global batch
    n_global: int                 # rows in the global batch
    lens: Tensor                  # [n_global] float64: every global row's token count
    advantages: Optional[Tensor] = None   # [B, T], set by the advantage stage
    returns: Optional[Tensor] = None      # the critic's targets ([B, T] or [B, T, N]), or None

    def with_targets(self, advantages: Tensor, returns: Optional[Tensor]) -> "Batch":
        return dataclasses.replace(self, advantages=advantages, returns=returns)

    def minibatch(self, gidx: Tensor, world: int) -> "Minibatch":
        """The minibatch of global rows `gidx` on this rank.

        One process (`world == 1`): those rows and no denominator (token means of the minibatch).
        Under torchrun: this rank's rows of the minibatch, in the minibatch's order, and the
        denominator global tokens / world size (DDP averages the gradients). A rank with no row in
        the minibatch runs one of its rows with a zero mask, so that it joins the gradient all-reduce."""
        device = self.mask.device
        if world == 1:
            idx = gidx.to(device)
            return self._take(idx, self.mask[idx], None)
        nl = self.mask.shape[0]
        mine = (gidx >= self.lo) & (gidx < self.lo + nl)
        idx = (gidx[mine] - self.lo).to(device)
        denom = max(float(self.lens[gidx].sum()), 1.0) / world
        if idx.numel() == 0:
            idx = torch.zeros(1, dtype=torch.long, device=device)
            return self._take(idx, torch.zeros_like(self.mask[idx]), denom)
        return self._take(idx, self.mask[idx], denom)

    def _take(self, idx: Tensor, mask: Tensor, denom: Optional[float]) -> "Minibatch":
        def rows(t):
            return None if t is None else t[idx]

        return Minibatch(p_ids=self.p_ids[idx], p_mask=self.p_mask[idx], r_ids=self.r_ids[idx], mask=mask,
                         old_logp=self.old_logp[idx], ref_logp=self.ref_logp[idx], advantages=self.advantages[idx],
                         old_values=rows(self.values), returns=rows(self.returns), denom=denom)


@dataclasses.dataclass(frozen=True)
class Minibatch:
    p_ids: Tensor
    p_mask: Tensor
    r_ids: Tensor
    mask: Tensor                  # zeros for a rank that only joins the all-reduce
    old_logp: Tensor
    ref_logp: Tensor
    advantages: Tensor
    old_values: Optional[Tensor]  # the critic's values at rollout (value clipping)
    returns: Optional[Tensor]
    denom: Optional[float]        # loss divisor (global tokens / world size) under torchrun, else None
