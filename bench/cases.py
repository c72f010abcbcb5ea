"""What each op benchmarks: inputs, the eager and torch.compile baselines, the dvpo.ops call, work
counts (tokens, pairs, bytes) and the eager/compile memory estimates used to skip cases that would
not fit.

Implementations ("impls") of an op:
- `eager`: `dvpo.reference` (pure PyTorch; materializes the `[tokens, N, M]` pair tensor and the
  `[tokens, N, N]` rank comparisons) -- the baseline the speedups are against;
- `compile`: `torch.compile(<that same reference function>, dynamic=False)`, one specialization per
  shape and dtype (its compile time is reported separately as `compile_s`);
- `reference`, `cpp`, `triton`, `cuda`: `dvpo.ops.<op>` with `DVPO_BACKEND` forced to that backend
  (`reference` is dvpo's chunked PyTorch fallback, not the eager baseline), for each `algorithm` the
  op takes (`pairwise`, `sorted`) where it applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from dvpo import ops
from dvpo import reference as ref
from dvpo.config import TERM_NAMES, CriticLossConfig

OPS = ("quantile_huber", "cvar", "critic_loss", "distributional_gae")
BASELINES = ("eager", "compile")
KERNEL_BACKENDS = ("reference", "cpp", "triton", "cuda")
ALL_IMPLS = BASELINES + KERNEL_BACKENDS
ALGORITHMS = ("pairwise", "sorted")
MODES = ("fwd", "bwd", "fwd+bwd")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

CVAR_LEVEL = 0.1  # the default alpha of CriticLossConfig
GAE_GAMMA, GAE_LAM = 1.0, 0.95

N_TERMS = len(TERM_NAMES)  # per-token terms the critic loss writes
SWEEPS = ("tokens", "nm", "heads", "seq", "crossover")
SHAPE_KEYS = ("tokens", "N", "M", "H", "B", "T")


@dataclass(frozen=True, order=True)
class Shape:
    """One benchmark shape. Dims an op does not use are None (N, H for GAE; M, H for CVaR)."""

    tokens: int
    N: Optional[int] = None
    M: Optional[int] = None
    H: Optional[int] = None
    B: Optional[int] = None  # GAE: sequences
    T: Optional[int] = None  # GAE: sequence length (tokens = B * T)

    def to_dict(self) -> Dict[str, Optional[int]]:
        return {k: getattr(self, k) for k in SHAPE_KEYS}

    def label(self) -> str:
        return " ".join(f"{k}={getattr(self, k)}" for k in SHAPE_KEYS if getattr(self, k) is not None)




# ------------------------------------------------------------------------- eager reference functions
# Module-level so that torch.compile caches one entry per (shape, dtype) on each code object.

def eager_quantile_huber(pred, target):
    return ref.quantile_huber(pred, target)


def eager_cvar(x):
    return ref.cvar(x, CVAR_LEVEL)


# The critic loss's configuration for every implementation in a run (`bench/run.py --critic-config`):
# the default (consistent tail terms) or the published recipe's, to compare the two kernels.
CRITIC_CONFIGS = {"default": CriticLossConfig(), "recipe": CriticLossConfig.recipe()}
CRITIC_CONFIG = CRITIC_CONFIGS["default"]


def eager_critic_loss(heads, target):
    return ref.critic_loss(heads, target, config=CRITIC_CONFIG).loss


def eager_distributional_gae(rewards, values, mask):
    return ref.distributional_gae(rewards, values, mask, gamma=GAE_GAMMA, lam=GAE_LAM)


_EAGER = {
    "quantile_huber": eager_quantile_huber,
    "cvar": eager_cvar,
    "critic_loss": eager_critic_loss,
    "distributional_gae": eager_distributional_gae,
}
_COMPILED: Dict[str, Callable] = {}


def _configure_dynamo():
    """Many shapes x dtypes are compiled in one process: lift the recompile limit (falling back to
    eager silently after 8 recompiles would make the 'compile' baseline a lie)."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 4096))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 1 << 16))


def compiled(op: str) -> Callable:
    if op not in _COMPILED:
        _configure_dynamo()
        _COMPILED[op] = torch.compile(_EAGER[op], dynamic=False)
    return _COMPILED[op]


def eager(op: str) -> Callable:
    return _EAGER[op]


# ------------------------------------------------------------------------- dvpo.ops calls

def _kernel_fn(op: str, algorithm: Optional[str]) -> Callable:
    if op == "quantile_huber":
        return lambda pred, target: ops.quantile_huber(pred, target, algorithm=algorithm)
    if op == "cvar":
        return lambda x: ops.cvar(x, CVAR_LEVEL)
    if op == "critic_loss":
        return lambda heads, target: ops.critic_loss(heads, target, config=CRITIC_CONFIG, algorithm=algorithm).loss
    if op == "distributional_gae":
        return lambda rewards, values, mask: ops.distributional_gae(rewards, values, mask,
                                                                    gamma=GAE_GAMMA, lam=GAE_LAM)
    raise ValueError(op)


def impl_fn(op: str, backend: str, algorithm: Optional[str]) -> Callable:
    """The callable taking the op's input tensors (positional, in OpSpec.arg_names order)."""
    if backend == "eager":
        return eager(op)
    if backend == "compile":
        return compiled(op)
    return _kernel_fn(op, algorithm)


# ------------------------------------------------------------------------- op specs

@dataclass(frozen=True)
class OpSpec:
    name: str
    arg_names: Tuple[str, ...]
    grad_args: Tuple[str, ...]  # leaves that require grad (empty: forward only)
    has_algorithm: bool
    dims: Tuple[str, ...]  # which of N, M, H it uses

    @property
    def modes(self) -> Tuple[str, ...]:
        return MODES if self.grad_args else ("fwd",)

    # ---- work counts
    def pairs_per_token(self, s: Shape) -> Optional[int]:
        """Pairs one pass visits per token: N*M quantile-Huber pairs (the critic loss: the same;
        its CVaR/tail terms are O(N + M) per token with a sort-free select), N*N rank comparisons
        for CVaR, none for GAE (memory-bound: compared with the bandwidth floor instead)."""
        if self.name in ("quantile_huber", "critic_loss"):
            return s.N * s.M
        if self.name == "cvar":
            return s.N * s.N
        return None

    def pairs(self, s: Shape) -> Optional[int]:
        p = self.pairs_per_token(s)
        return None if p is None else p * s.tokens

    def min_bytes(self, s: Shape, dtype: torch.dtype, mode: str = "fwd+bwd") -> int:
        """Bytes an op must at least read and write in `mode` (the memory floor), from the shapes and
        dtypes: the forward reads its inputs and writes the per-token values (accumulation dtype)
        and the gradient it stores for the backward (input dtype, dvpo/opspec.py); the backward
        reads that stored gradient and the upstream gradient and writes the input's gradient (input
        dtype)."""
        e = torch.tensor([], dtype=dtype).element_size()
        a = 8 if dtype == torch.float64 else 4  # accumulation dtype
        t = s.tokens
        if self.name == "distributional_gae":
            # read values, rewards, mask; write returns (fp32) and advantages (fp32); forward only
            return t * (s.M * e + e + 1 + s.M * 4 + 4)
        if self.name == "quantile_huber":
            rows, reads, values = s.N, s.N * e + s.M * e, a  # pred, target -> loss
        elif self.name == "cvar":
            rows, reads, values = s.N, s.N * e, a
        else:  # critic_loss: heads, target -> per-token loss and the terms
            rows, reads, values = s.H * s.N, s.H * s.N * e + s.M * e, a + N_TERMS * a
        fwd = t * (reads + values + rows * e)
        bwd = t * (rows * e + a + rows * e)
        return {"fwd": fwd, "bwd": bwd}.get(mode, fwd + bwd)

    def work(self, s: Shape) -> int:
        """A size to order cases by (and to skip cases larger than one that was too slow)."""
        p = self.pairs_per_token(s) or 0
        return s.tokens * (p + (s.H or 1) * (s.N or 0) + (s.M or 0) + 1)

    # ---- memory estimates (bytes) for the baselines, calibrated on dvpo.reference (fwd+bwd peak,
    # fp32 compute whatever the input dtype: the reference upcasts). Deliberately on the high side.
    def eager_bytes(self, s: Shape) -> int:
        t = s.tokens
        if self.name == "quantile_huber":
            return int(7.5 * t * s.N * s.M * 4)
        if self.name == "cvar":
            return int(3.0 * t * s.N * s.N * 4)
        if self.name == "critic_loss":
            return int(t * (7.5 * s.N * s.M + 3.0 * (s.N * s.N + s.M * s.M)) * 4 + 8 * t * s.H * s.N * 4)
        return int(8 * t * s.M * 4)

    def compile_bytes(self, s: Shape) -> int:
        t = s.tokens
        if self.name == "quantile_huber":
            return int(0.15 * t * s.N * s.M * 4 + 8 * t * (s.N + s.M) * 4)
        if self.name == "cvar":
            return int(0.15 * t * s.N * s.N * 4 + 8 * t * s.N * 4)
        if self.name == "critic_loss":
            return int(0.15 * t * (s.N * s.M + s.N * s.N + s.M * s.M) * 4 + 8 * t * (s.H * s.N + s.M) * 4)
        return int(8 * t * s.M * 4)

    # ---- inputs
    def make_inputs(self, s: Shape, dtype: torch.dtype, device: torch.device, seed: int) -> Dict[str, torch.Tensor]:
        g = torch.Generator(device="cpu").manual_seed(seed)

        def randn(*shape, scale=1.0, shift=0.0):
            x = torch.randn(*shape, generator=g, dtype=torch.float32) * scale + shift
            return x.to(device=device, dtype=dtype)

        t = s.tokens
        if self.name == "quantile_huber":
            inputs = {"pred": randn(t, s.N), "target": randn(t, s.M, scale=1.5, shift=0.2)}
        elif self.name == "cvar":
            inputs = {"x": randn(t, s.N)}
        elif self.name == "critic_loss":
            inputs = {"heads": randn(t, s.H, s.N), "target": randn(t, s.M, scale=1.5, shift=0.2)}
        else:
            lengths = torch.randint(max(1, s.T // 2), s.T + 1, (s.B,), generator=g)
            mask = torch.arange(s.T).unsqueeze(0) < lengths.unsqueeze(1)
            inputs = {"rewards": randn(s.B, s.T), "values": randn(s.B, s.T, s.M),
                      "mask": mask.to(device)}
        for name in self.grad_args:
            inputs[name].requires_grad_(True)
        return inputs


SPECS: Dict[str, OpSpec] = {
    "quantile_huber": OpSpec("quantile_huber", ("pred", "target"), ("pred",), True, ("N", "M")),
    "cvar": OpSpec("cvar", ("x",), ("x",), False, ("N",)),
    "critic_loss": OpSpec("critic_loss", ("heads", "target"), ("heads",), True, ("N", "M", "H")),
    "distributional_gae": OpSpec("distributional_gae", ("rewards", "values", "mask"), (), False, ("M",)),
}


def backward(out) -> None:
    """Backward from an op's output: scalar losses directly, per-token values with a ones gradient."""
    if out.dim() == 0:
        out.backward()
    else:
        out.backward(torch.ones_like(out))


def phase_fns(spec: OpSpec, fn: Callable, inputs: Dict[str, torch.Tensor], backward_too: bool):
    """(setup, phases): setup resets grads (outside the clock); the phases are the forward and, when
    `backward_too` and the op is differentiable, the backward from its output. Timing the boundary
    between them gives the fwd, bwd and fwd+bwd rows from the same calls."""
    args = [inputs[n] for n in spec.arg_names]
    leaves = [inputs[n] for n in spec.grad_args]

    def setup():
        for x in leaves:
            x.grad = None
        return None

    def forward(_state):
        return fn(*args)

    def backward_phase(out):
        backward(out)

    if backward_too and spec.grad_args:
        return setup, [forward, backward_phase]
    return setup, [forward]


# ------------------------------------------------------------------------- sweeps

@dataclass
class SweepPlan:
    """The shapes of each sweep; every sweep passes through the headline shape."""

    headline_tokens: int
    tokens: Sequence[int]
    nm: Sequence[Tuple[int, int]]
    heads: Sequence[int]
    seq: Sequence[int]  # GAE sequence lengths at the headline token count
    N: int = 200
    M: int = 200
    H: int = 3
    gae_T: int = 256  # GAE sequence length of the tokens and nm sweeps
    # N = M sizes of the sorted/pairwise crossover sweep (quantile_huber and critic_loss), each at
    # crossover_tokens(size) tokens (about the same work per case)
    crossover: Sequence[int] = (50, 100, 200, 300, 500, 1000)

    @staticmethod
    def default(device: torch.device, quick: bool) -> "SweepPlan":
        if quick:
            return SweepPlan(headline_tokens=256, tokens=(256, 512), nm=((16, 16), (32, 32), (16, 64)), heads=(1, 2),
                             seq=(8, 32), N=32, M=32, H=2, gae_T=8, crossover=(16, 48))
        headline = 65536 if device.type == "cuda" else 4096
        # 1k to 256k tokens; on a CPU the top is capped by time: a call over --max-call-s skips the
        # larger shapes of that implementation (and eager/compile by their memory estimate)
        return SweepPlan(
            headline_tokens=headline,
            tokens=(1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144),
            nm=((32, 32), (64, 64), (128, 128), (200, 200), (256, 256), (512, 512), (32, 512), (512, 32)),
            heads=(1, 3, 5),
            seq=(16, 64, 256, 1024, 4096) if device.type == "cuda" else (16, 64, 256, 1024),
            gae_T=4096 if device.type == "cuda" else 256,
        )

    def crossover_tokens(self, n: int) -> int:
        """Tokens of the crossover case N = M = n: the headline's pair count, 32 tokens at least."""
        pairs = self.headline_tokens * self.N * self.M
        return max(32, min(self.headline_tokens, pairs // (n * n)))

    def headline_shape(self, op: str) -> Shape:
        return self.shape(op, self.headline_tokens, self.N, self.M, self.H)

    def shape(self, op: str, tokens: int, n: int, m: int, h: int, gae_T: Optional[int] = None) -> Shape:
        if op == "quantile_huber":
            return Shape(tokens, N=n, M=m)
        if op == "cvar":
            return Shape(tokens, N=n)
        if op == "critic_loss":
            return Shape(tokens, N=n, M=m, H=h)
        t_len = min(tokens, gae_T or self.gae_T)
        return Shape(tokens, M=m, B=max(1, tokens // t_len), T=t_len)

    def shapes(self, op: str, sweeps: Sequence[str]) -> List[Tuple[Shape, List[str]]]:
        """[(shape, the sweeps it belongs to)], deduplicated, in the order of the work they take."""
        found: Dict[Shape, List[str]] = {}

        def add(shape, sweep):
            shape = Shape(shape.B * shape.T if shape.B else shape.tokens, shape.N, shape.M, shape.H, shape.B, shape.T)
            found.setdefault(shape, [])
            if sweep not in found[shape]:
                found[shape].append(sweep)

        add(self.headline_shape(op), "headline")
        if "tokens" in sweeps:
            for t in self.tokens:
                add(self.shape(op, t, self.N, self.M, self.H), "tokens")
        if "nm" in sweeps and op != "distributional_gae":
            for n, m in self.nm:
                if op == "cvar":
                    m = n  # CVaR has N only
                add(self.shape(op, self.headline_tokens, n, m, self.H), "nm")
        if "nm" in sweeps and op == "distributional_gae":
            for _n, m in self.nm:
                add(self.shape(op, self.headline_tokens, self.N, m, self.H), "nm")
        if "heads" in sweeps and op == "critic_loss":
            for h in self.heads:
                add(self.shape(op, self.headline_tokens, self.N, self.M, h), "heads")
        if "crossover" in sweeps and op in ("quantile_huber", "critic_loss"):
            for n in self.crossover:
                add(self.shape(op, self.crossover_tokens(n), n, n, self.H), "crossover")
        if "seq" in sweeps and op == "distributional_gae":
            for t_len in self.seq:
                if t_len <= self.headline_tokens:
                    add(self.shape(op, self.headline_tokens, self.N, self.M, self.H, gae_T=t_len), "seq")
        spec = SPECS[op]
        return sorted(found.items(), key=lambda kv: (spec.work(kv[0]), kv[0]))


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES[dtype]


def backend_ops(device: torch.device) -> Tuple[Dict[str, str], Dict[str, object]]:
    """(status of each dvpo backend for `device`, the importable backend modules)."""
    from dvpo import dispatch
    import importlib

    status = dispatch.backends(device)
    modules = {}
    for name in KERNEL_BACKENDS:
        if status.get(name) == "available":
            try:
                modules[name] = importlib.import_module(f"dvpo.backends.{name}")
            except Exception as exc:  # listed available but not importable: record why
                status[name] = f"not available: {type(exc).__name__}: {exc}"
    return status, modules


def backend_algorithms(name: str, module, op: str) -> Sequence[Optional[str]]:
    """The algorithms to benchmark for (backend, op). A backend module may declare
    `ALGORITHMS = {op: ("pairwise", "sorted"), ...}`; without it, dvpo's reference fallback is known
    to run pairwise only, and other backends are asked for both (dvpo.ops runs pairwise where a
    backend has no sorted kernel, so equal timings then mean 'no sorted kernel')."""
    if not SPECS[op].has_algorithm:
        return (None,)
    declared = getattr(module, "ALGORITHMS", None)
    if isinstance(declared, dict) and op in declared:
        return tuple(a for a in ALGORITHMS if a in tuple(declared[op]))
    if name == "reference":
        return ("pairwise",)
    return ALGORITHMS


__all__ = ["OPS", "SPECS", "Shape", "SweepPlan", "impl_fn", "phase_fns"]
