"""GRPO: no critic; the outcome reward normalised within each prompt's group of G samples (not
whitened again), the KL to the reference as a k3 loss instead of a reward penalty."""

from __future__ import annotations

from .. import advantages as adv
from .. import losses
from .base import Algorithm


class GRPO(Algorithm):
    name = "grpo"
    kl_in_reward = False
    whiten = False

    @classmethod
    def check(cls, cfg):
        if cfg.group_size < 2:
            return "--group-size", cfg.group_size, "an integer >= 2 for --algo grpo (group statistics)"
        return super().check(cfg)

    def advantages(self, batch, rewards, mean):
        # a rank holds whole groups (the batch is sharded by prompts): the group statistics are local
        return adv.grpo_advantages(batch.outcome, self.cfg.group_size, batch.mask, scale=self.cfg.grpo_scale), None, {}

    def extra_losses(self, logp, mb):
        if self.cfg.kl_coef:
            kl = losses.masked_mean(losses.kl_penalty(logp, mb.ref_logp, "k3"), mb.mask, denom=mb.denom)
            yield "kl_loss", self.cfg.kl_coef, kl
