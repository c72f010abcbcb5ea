"""dvpo/opspec.py is the one written form of each op's kernel interface; everything else that
states it is generated from it or checked against it here:

- the public `dvpo::` ops (dvpo/library.py registers them from the table): schema and fake outputs;
- the C++ schemas of `dvpo_C` (written in csrc/cpu/bindings.cpp; the CUDA kernels register
  implementations of the same schemas, and torch checks each C++ function against them at load);
- the Python backends' function signatures (read from source, so a backend that cannot be imported
  on this machine, e.g. Triton without a GPU package, is still checked);
- the cpp and cuda backends, which are forwarders built from the table.
"""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch

import dvpo
import dvpo.opspec
from dvpo import library
from dvpo.config import PARAM_NAMES, TERM_NAMES
from dvpo.dispatch import use_backend
from dvpo.opspec import OPS, Arg, OpSpec, Out, forwarder

from . import backends

ROOT = pathlib.Path(__file__).resolve().parent.parent
PY_BACKENDS = ("reference", "triton")


def _schema_args(schema) -> list:
    return [(a.name, str(a.type)) for a in schema.arguments]


def _spec_args(spec: OpSpec) -> list:
    # torch prints `float[]` as `List[float]` and `Tensor?` as `Optional[Tensor]`.
    spelled = {"float[]": "List[float]", "Tensor?": "Optional[Tensor]"}
    return [(a.name, spelled.get(a.type, a.type)) for a in spec.args]


@pytest.mark.parametrize("name", sorted(OPS))
def test_public_op_schema_is_the_table(name):
    op = getattr(torch.ops.dvpo, name).default
    assert _schema_args(op._schema) == _spec_args(OPS[name])
    assert len(op._schema.returns) == len(OPS[name].outputs)
    assert getattr(library, name)._opoverload is op


@pytest.mark.parametrize("name", sorted(OPS))
def test_cpp_schema_is_the_table(name):
    pytest.importorskip("dvpo._C", reason="the C++ extension is not built")
    op = getattr(torch.ops.dvpo_C, name).default
    assert _schema_args(op._schema) == _spec_args(OPS[name]), (
        f"csrc/cpu/bindings.cpp's schema of {name} differs from dvpo/opspec.py")
    assert len(op._schema.returns) == len(OPS[name].outputs)


def _functions(path: pathlib.Path) -> dict:
    tree = ast.parse(path.read_text())
    return {f.name: [a.arg for a in f.args.args] for f in tree.body if isinstance(f, ast.FunctionDef)}


@pytest.mark.parametrize("backend", PY_BACKENDS)
def test_python_backends_take_the_table_arguments(backend):
    funcs = _functions(ROOT / "dvpo" / "backends" / f"{backend}.py")
    for name, spec in OPS.items():
        assert name in funcs, f"dvpo/backends/{backend}.py does not implement {name}"
        assert tuple(funcs[name]) == spec.arg_names, (
            f"dvpo/backends/{backend}.py:{name} takes {funcs[name]}, dvpo/opspec.py says {list(spec.arg_names)}")


@pytest.mark.parametrize("backend", ("cpp", "cuda"))
def test_compiled_backends_are_built_from_the_table(backend):
    source = (ROOT / "dvpo" / "backends" / f"{backend}.py").read_text()
    assert "_spec.forwarder(" in source
    for name in OPS:  # no hand-written wrapper that could drift from the table
        assert f"def {name}(" not in source


def test_critic_loss_params_and_terms_follow_the_config():
    spec = OPS["critic_loss"]
    assert str(len(PARAM_NAMES)) in next(a.shape for a in spec.args if a.name == "params")
    assert next(o for o in spec.outputs if o.name == "terms").extra == (len(TERM_NAMES),)


def test_architecture_doc_quotes_the_table():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for line in dvpo.opspec.describe().splitlines():
        assert line in doc, f"docs/architecture.md does not show the current interface line:\n{line}"


def _example_args(name, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    t, h, n, m = 5, 2, 7, 6

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)
    taus = dvpo.taus(n, dtype=dtype)
    mask = (torch.arange(t) % 4 != 1).to(dtype)
    if name == "quantile_huber":
        return (r(t, n), r(t, m), taus, None, mask, 0.7, False, "auto")
    if name == "cvar":
        return (r(t, n), 0.3, False)
    if name == "critic_loss":
        return (r(t, h, n), r(t, m), taus, torch.ones(n, dtype=dtype), mask, 0.5, 0.2, 0.2, True,
                dvpo.CriticLossConfig().kernel_params(), "auto")
    if name == "reduce_tokens":
        return (r(3, t), (torch.arange(3 * t).reshape(3, t) % 4 != 1), "seq-mean-token-mean")
    return (r(2, t), r(2, t, m), (torch.arange(2 * t).reshape(2, t) % 3 != 0).to(dtype), 0.99, 0.9)


@pytest.mark.parametrize("backend", backends.params(), indirect=True)
def test_every_backend_returns_the_opspec_dtypes(backend):
    """Each backend's kernel-interface functions return the shapes and dtypes the fake outputs
    declare: per-token values in the accumulation dtype, the loss ops' gradients in the input dtype
    (Out.dtype), for fp64, fp32 and both 16-bit inputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    kernels = backend.kernels()
    for name in sorted(OPS):
        for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
            args = [a.to(backend.device) if isinstance(a, torch.Tensor) else a for a in _example_args(name, dtype)]
            got = getattr(kernels, name)(*args)
            with FakeTensorMode() as mode:
                fake = getattr(library, name)(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                for a in args])
            for g, f, out in zip(got, fake, OPS[name].outputs):
                assert (tuple(g.shape), g.dtype) == (tuple(f.shape), f.dtype), f"{name}.{out.name} for {dtype}"
            want = {"input": dtype, "acc": torch.float64 if dtype == torch.float64 else torch.float32}
            assert [f.dtype for f in fake] == [want[out.dtype] for out in OPS[name].outputs], name


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16))
@pytest.mark.parametrize("name", sorted(OPS))
def test_fake_outputs_match_a_real_call(name, dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode
    args = _example_args(name, dtype)
    with use_backend("reference"):
        real = getattr(library, name)(*args)
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = getattr(library, name)(*fake_args)
    assert len(real) == len(fake) == len(OPS[name].outputs)
    for r, f, out in zip(real, fake, OPS[name].outputs):
        assert (tuple(r.shape), r.dtype) == (tuple(f.shape), f.dtype), out.name


def test_forwarder_coerces_scalars_and_counts_arguments():
    seen = []
    spec = OpSpec("toy", (Arg("x", "Tensor"), Arg("k", "float"), Arg("on", "bool"), Arg("ps", "float[]")),
                  (Out("y", "x", 1),), True, "a toy op")
    fn = forwarder(spec, lambda *a: seen.append(a))
    fn(torch.zeros(2), 1, 0, (1, 2))
    assert [type(v) for v in seen[0][1:]] == [float, bool, list] and seen[0][3] == [1.0, 2.0]
    assert spec.schema() == "(Tensor x, float k, bool on, float[] ps) -> (Tensor)"
    with pytest.raises(TypeError, match="toy takes 4 arguments"):
        fn(torch.zeros(2), 1.0)
    with pytest.raises(ValueError, match="unsupported schema type"):
        Arg("bad", "int?")


def test_backward_scales_in_place_only_when_the_graph_is_freed():
    """In place when nothing reads the stored gradient again; out of place under retain_graph."""
    g = torch.Generator().manual_seed(0)
    heads = torch.randn(4, 5, 3, 7, generator=g, requires_grad=True)
    target = torch.randn(4, 5, 9, generator=g)
    out = dvpo.ops.critic_loss(heads, target)
    out.loss.backward(retain_graph=True)
    first = heads.grad.clone()
    out.loss.backward()  # the stored gradient is intact after the first pass
    torch.testing.assert_close(heads.grad, 2 * first)
    per_token = dvpo.ops.critic_loss(heads, target, reduction="none").loss
    heads.grad = None
    per_token.sum().backward(retain_graph=True)  # upstream all ones: no multiply at all
    ones = heads.grad.clone()
    per_token.sum().backward()
    torch.testing.assert_close(heads.grad, 2 * ones)
    torch.testing.assert_close(ones / per_token.numel(), first)  # token-mean = sum / tokens


def test_default_taus_and_risk_weights_are_built_once():
    from dvpo import ops
    ops._CONSTANTS.clear()
    heads, target = torch.randn(3, 2, 11), torch.randn(3, 5)
    for _ in range(3):
        ops.critic_loss(heads, target)
    keys = sorted(k[0] for k in ops._CONSTANTS)
    assert keys == ["risk", "taus"]
    torch.testing.assert_close(ops._CONSTANTS[next(k for k in ops._CONSTANTS if k[0] == "taus")], dvpo.taus(11))


@pytest.mark.parametrize("private", (False, True))
def test_backward_leaves_a_held_gradient_output_alone(private):
    """A caller of the library op that keeps its gradient output (opcheck, a user) sees it unchanged
    by the backward; dvpo.ops drops it (private_gradients), and there the backward reuses it in place."""
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    with use_backend("reference"):
        if private:
            with library.private_gradients():
                value, coef = library.cvar(x, 0.4, False)
        else:
            value, coef = library.cvar(x, 0.4, False)
    before = coef.clone()
    (value * 3.0).sum().backward()
    torch.testing.assert_close(x.grad, 3.0 * before)
    torch.testing.assert_close(coef, 3.0 * before if private else before)
