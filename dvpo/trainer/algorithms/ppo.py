"""PPO: one scalar critic, GAE (the fused distributional GAE with M = 1), whitened advantages,
the clipped MSE value loss."""

from __future__ import annotations

from .. import advantages as adv
from .. import losses
from .base import Algorithm


class PPO(Algorithm):
    name = "ppo"
    critic = "scalar"

    def critic_shape(self):
        return (1, 1)

    def view(self, values):
        return values.squeeze(-1).squeeze(-1)                   # [B, T, 1, 1] -> [B, T]

    def advantages(self, batch, rewards, mean):
        cfg = self.cfg
        a, returns = adv.gae_advantages(rewards, batch.values, batch.mask, gamma=cfg.gamma, lam=cfg.lam)
        return a, returns, {"value_mean": mean(batch.values[:, 0])}

    def value_loss(self, values, mb, taus):
        return losses.scalar_value_loss(values, mb.old_values, mb.returns, mb.mask, self.cfg.cliprange_value,
                                        denom=mb.denom), {}
