"""Robust-Bellman PPO: H scalar critics aggregated by the worst case (min over heads) in the
bootstrap targets and the advantages; every head regresses to the worst-case targets."""

from __future__ import annotations

from .. import advantages as adv
from .. import losses
from .base import Algorithm


class RobustPPO(Algorithm):
    name = "robust-ppo"
    critic = "scalar"
    uses_heads = True

    def critic_shape(self):
        return (self.cfg.n_heads, 1)

    def view(self, values):
        return values.squeeze(-1)                               # [B, T, H, 1] -> [B, T, H]

    def advantages(self, batch, rewards, mean):
        cfg = self.cfg
        worst = batch.values.min(-1).values                      # min over the H critics
        a, returns = adv.gae_advantages(rewards, worst, batch.mask, gamma=cfg.gamma, lam=cfg.lam)
        return a, returns, {"value_mean": mean(worst[:, 0]),
                            "value_head_spread": mean(batch.values.max(-1).values - worst, batch.mask)}

    def value_loss(self, values, mb, taus):
        return losses.scalar_value_loss(values, mb.old_values, mb.returns, mb.mask, self.cfg.cliprange_value,
                                        denom=mb.denom), {}
