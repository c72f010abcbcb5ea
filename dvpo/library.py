"""The `torch.library` custom ops (namespace `dvpo`) behind `dvpo.ops`, registered from the interface
table in dvpo/opspec.py.

Each op takes flattened tensors (tokens first) and returns per-token values plus the gradient with
respect to its first argument, computed in the same pass (the targets are detached, so a loss kernel
can produce its gradient in the forward, as fused cross-entropy kernels do). The autograd formula only
scales that stored gradient by the upstream gradient (in place for dvpo.ops, which drops the
gradient output). Fake implementations give shapes and
dtypes, so torch.compile(fullgraph=True) traces through the ops; the real implementation picks a
backend per call (dvpo.dispatch).

The module-level names (`library.quantile_huber`, `library.cvar`, `library.critic_loss`,
`library.distributional_gae`, `library.reduce_tokens`) are the registered ops, callable with the arguments of OPS[name].
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import dispatch
from .opspec import OPS, OpSpec
from .reference import acc_dtype

_ANNOTATIONS = {"Tensor": Tensor, "Tensor?": Optional[Tensor], "float": float, "bool": bool, "str": str,
                "float[]": List[float]}


def _signature(spec: OpSpec) -> inspect.Signature:
    """The Python signature torch infers the op's schema from (the same text as spec.schema())."""
    params = [inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=_ANNOTATIONS[a.type])
              for a in spec.args]
    return inspect.Signature(params, return_annotation=Tuple[tuple(Tensor for _ in spec.outputs)])


def _with_signature(fn, spec: OpSpec):
    fn.__signature__ = _signature(spec)
    fn.__name__ = fn.__qualname__ = spec.name
    return fn


def _out_dtype(out, first: Tensor) -> torch.dtype:
    return first.dtype if out.dtype == "input" else acc_dtype(first.dtype)


def _real(spec: OpSpec):
    def impl(*args):
        return getattr(dispatch.select(spec.name, args[0].device), spec.name)(*args)
    return _with_signature(impl, spec)


def _fake(spec: OpSpec):
    def fake(*args):
        first = args[0]
        named = dict(zip(spec.arg_names, args))
        return tuple(first.new_empty(out.shape(named), dtype=_out_dtype(out, first)) for out in spec.outputs)
    return _with_signature(fake, spec)


# ---------------------------------------------------------------------------- autograd

_state = threading.local()


@contextlib.contextmanager
def private_gradients():
    """Ops called inside the block belong to a caller that drops their gradient output (dvpo.ops
    does), so their backward may scale that stored gradient in place. Any other caller keeps its
    outputs intact: the backward then multiplies out of place."""
    old = getattr(_state, "private", False)
    _state.private = True
    try:
        yield
    finally:
        _state.private = old


def _graph_is_kept() -> bool:
    """Whether the running backward keeps the graph (retain_graph=True: gradcheck, a second
    backward). Older torch cannot tell; then assume it does (the safe answer)."""
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if query is None else bool(query())


def _save_grad(ctx, inputs, output):
    """Every differentiable op: the last output is d(first output)/d(first input)."""
    ctx.save_for_backward(output[-1])
    ctx.private = getattr(_state, "private", False)
    ctx.mark_non_differentiable(*output[1:])


def _is_one(upstream: Tensor) -> bool:
    # Only checked on real CPU tensors: on a GPU reading the value would synchronise the stream (one
    # in-place multiply costs less), and under tracing (fake/functional subclasses) it has no value.
    return type(upstream) is Tensor and upstream.device.type == "cpu" and bool((upstream == 1).all())


def _scale_grad(ctx, upstream: Tensor) -> Tensor:
    """The stored gradient times the upstream one: in place when nothing can read the stored
    gradient again (its caller dropped the output, see private_gradients, and the graph is freed
    after this backward; eager mode, since under tracing AOTAutograd plans the buffers itself), and
    not at all when the upstream gradient is all ones."""
    (grad,) = ctx.saved_tensors  # the loss ops': in the input's dtype (opspec, Out.dtype)
    reused = not ctx.private or type(grad) is not Tensor or _graph_is_kept()
    if _is_one(upstream):
        return grad.clone() if reused else grad
    # The multiply runs in fp32 for 16-bit gradients (torch's op math) and rounds once.
    scale = upstream.reshape(upstream.shape + (1,) * (grad.dim() - upstream.dim()))
    return (grad * scale).to(grad.dtype) if reused else grad.mul_(scale)


def _backward(spec: OpSpec):
    rest = (None,) * (len(spec.args) - 1)

    def backward(ctx, upstream, *_non_differentiable):
        return (_scale_grad(ctx, upstream),) + rest
    return backward


# ---------------------------------------------------------------------------- registration

def _register(spec: OpSpec):
    op = torch.library.custom_op(f"dvpo::{spec.name}", _real(spec), mutates_args=())
    op.register_fake(_fake(spec))
    if spec.differentiable:
        op.register_autograd(_backward(spec), setup_context=_save_grad)
    return op


quantile_huber = _register(OPS["quantile_huber"])
cvar = _register(OPS["cvar"])
critic_loss = _register(OPS["critic_loss"])
distributional_gae = _register(OPS["distributional_gae"])
reduce_tokens = _register(OPS["reduce_tokens"])
