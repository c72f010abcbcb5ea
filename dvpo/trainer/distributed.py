"""Multi-process training with `torchrun` and `torch.distributed` (an existing engine, no home-made one).

    torchrun --standalone --nproc_per_node 2 -m dvpo train --algo dvpo --task math --steps 300 ...

`Dist.from_env()` reads the variables torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK) and initialises
the default process group (gloo on CPU, nccl on CUDA with `cuda:LOCAL_RANK`); without them (one
process, no torchrun) it returns `Dist.single()`, whose helpers are no-ops: nothing changes and no
process group is created. A process group that the caller already initialised is reused (and not
destroyed by `cleanup`).

How the trainer uses it (see `dvpo/trainer/loop.py`):
- the global batch (`prompts_per_step` prompts x `group_size` samples) is split into contiguous shards
  of whole prompts (`shard`), so a GRPO group never straddles two ranks;
- every random draw that concerns one sample is made for the whole global batch on every rank from the
  shared seeded generators, and each rank uses its rows: 1 process and N processes draw the same
  samples for the same global batch;
- per-sample Python values (rewards, texts) are gathered (`gather_lists`), so reward noise and the
  logged rewards/accuracies are computed exactly as in one process; tensor statistics are reduced as
  (sum, count) pairs (`sum_`), so means are means over the global batch;
- the policy and a separate critic are wrapped in `DistributedDataParallel` (gradients averaged); each
  rank's loss is its token-loss *sum* divided by (global token count / world size), so the averaged
  gradient is the gradient of the token-mean over the global batch;
- rank 0 alone writes files (metrics, plots, checkpoints, the SFT cache) and logs.
"""

from __future__ import annotations

import datetime
import os
from typing import Dict, List, Sequence, Tuple

import torch


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def under_torchrun() -> bool:
    """True in a process that torchrun (or another launcher setting WORLD_SIZE > 1) started."""
    return env_world_size() > 1


def shard(n: int, world: int, rank: int) -> Tuple[int, int]:
    """Contiguous shard [lo, hi) of n items for `rank` (the first n % world ranks get one more)."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


class Dist:
    """The process group as the trainer sees it. `world == 1`: every helper is a local no-op."""

    def __init__(self, world: int = 1, rank: int = 0, local_rank: int = 0, owns_group: bool = False,
                 backend: str = ""):
        self.world, self.rank, self.local_rank = world, rank, local_rank
        self.owns_group = owns_group
        self.backend = backend

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def single(cls) -> "Dist":
        return cls()

    @classmethod
    def from_env(cls, device: str = "auto") -> "Dist":
        """The torchrun environment's process group (initialised here unless it already is), or
        `single()` outside torchrun. `device`: the trainer's device flag (auto/cpu/cuda...)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            backend = dist.get_backend()
            return cls(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")),
                       owns_group=False, backend=backend)
        if not under_torchrun():
            return cls.single()
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = (device in ("auto", "", None) and torch.cuda.is_available()) or str(device).startswith("cuda")
        backend = os.environ.get("DVPO_DIST_BACKEND") or ("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(local_rank)
        # rank 0 may train the SFT warm start while the others wait at a barrier: a generous timeout
        timeout = datetime.timedelta(seconds=float(os.environ.get("DVPO_DIST_TIMEOUT", "7200")))
        kw = {"device_id": torch.device("cuda", local_rank)} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, timeout=timeout, **kw)
        return cls(dist.get_world_size(), dist.get_rank(), local_rank, owns_group=True, backend=backend)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str = "auto") -> torch.device:
        """This rank's device: `cuda:LOCAL_RANK` under torchrun on GPUs, else the requested one."""
        from .models import pick_device

        dev = pick_device(requested)
        if self.enabled and dev.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return dev

    def _comm_device(self, device=None) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # ---- collectives ------------------------------------------------------------------------------
    def barrier(self):
        if self.enabled:
            import torch.distributed as dist

            if self.backend == "nccl":
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()

    def sum_(self, values: Sequence[float]) -> List[float]:
        """Elementwise sum over ranks of a list of numbers (float64, one all-reduce)."""
        if not self.enabled:
            return [float(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().tolist()

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of a tensor (returns a new tensor on t's device; t itself untouched)."""
        if not self.enabled:
            return t
        import torch.distributed as dist

        out = t.detach().to(self._comm_device(), copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(t.device)

    def all_true(self, flag: bool) -> bool:
        """True when `flag` is true on every rank (e.g. "the loss is finite everywhere")."""
        if not self.enabled:
            return bool(flag)
        return self.sum_([0.0 if flag else 1.0])[0] == 0.0

    def mean_pairs(self, pairs: Dict[str, Tuple[float, float]]) -> Dict[str, float]:
        """{name: (sum, count)} of local partial sums -> {name: global sum / global count}."""
        names = sorted(pairs)
        flat = self.sum_([x for k in names for x in pairs[k]])
        return {k: flat[2 * i] / max(flat[2 * i + 1], 1e-300) for i, k in enumerate(names)}

    def mean_lists(self, acc: Dict[str, List[float]]) -> Dict[str, List[float]]:
        """Elementwise mean over ranks of equally long lists of numbers (per-minibatch metrics whose
        global value is the mean of the ranks' values); one all-reduce."""
        if not self.enabled or not acc:
            return acc
        names = sorted(acc)
        flat = self.sum_([x for k in names for x in acc[k]])
        out, i = {}, 0
        for k in names:
            n = len(acc[k])
            out[k] = [x / self.world for x in flat[i:i + n]]
            i += n
        return out

    def gather_objects(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (picklable Python objects)."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def gather_lists(self, items: list) -> list:
        """The concatenation, in rank order, of every rank's list (the global batch's order)."""
        if not self.enabled:
            return list(items)
        return [x for part in self.gather_objects(list(items)) for x in part]

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def average_grads(self, params):
        """Average the gradients of parameters that are not under DDP (e.g. shared critic heads)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(self.world)

    # ---- models -------------------------------------------------------------------------------------
    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module for the training forward passes: DistributedDataParallel under torchrun (its
        parameters are the module's own: optimizers and checkpoints keep using the plain module), the
        module itself in one process. No FSDP: see the trainer README ("Scale out")."""
        if not self.enabled:
            return module
        import inspect

        from torch.nn.parallel import DistributedDataParallel as DDP

        dev = next(module.parameters()).device
        ids = [dev.index] if dev.type == "cuda" else None
        # no buffer broadcast at every forward: the buffers (rotary tables) are constants, the same on
        # every rank (newer torch spells it forward_sync_buffers, older broadcast_buffers)
        kw = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
              else {"broadcast_buffers": False})
        return DDP(module, device_ids=ids, **kw)

    def cleanup(self):
        """Destroy the process group if this object created it."""
        if self.enabled and self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                # Every rank done with its collectives before any rank tears the group down: a rank
                # that exits while the other still talks to it aborts in gloo's threads at exit
                # ("terminate called without an active exception").
                try:
                    self.barrier()
                except Exception:  # a rank that failed already: tear down regardless
                    pass
                dist.destroy_process_group()
            self.owns_group = False
