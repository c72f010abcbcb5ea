"""REINFORCE++: no critic; per-token rewards (the outcome at the last token minus the KL penalty),
the return-to-go, whitened over the global batch."""

from __future__ import annotations

from .. import advantages as adv
from .base import Algorithm


class ReinforcePP(Algorithm):
    name = "reinforce++"

    def advantages(self, batch, rewards, mean):
        return adv.reinforce_pp_advantages(rewards, batch.mask, gamma=self.cfg.gamma, whiten=False), None, {}
