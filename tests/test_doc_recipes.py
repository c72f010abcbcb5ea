"""Every code block of docs/integrations.md and of README.md's integration section is executed here
(or, for the verl plugin's shell block, in tests/test_integrations_verl_plugin.py), at N = 1 (the
frameworks' own `[B, T]` scalar critic) and N = 32, with B == T, B != T and B = 1.

Blocks are found by the `<!-- recipe: NAME -->` line before them; `test_every_code_block_is_a_tested_recipe`
fails on a block without a marker or a marker without a test. Python blocks are executed as written
(the `N = 32` line swapped for `N = 1`), with the free names they use (the framework's tensors and
models) supplied by the test; diff blocks are applied to the installed framework's files and the
patched code is run: TRL's `PPOTrainer.train` for one PPO update, OpenRLHF's `CriticModel` and
`CriticPPOTrainer.training_step`. At N = 1 with `mse_config()`, the patched framework code is checked
against the unpatched framework code on the same seed: the documented recipe must not change a
scalar critic's training by a single bit of meaning (the broken recipe this replaces raised for
B != T and silently built `[B, T, T]` values for B == T or B = 1).

Helpers used by the other integration tests live here too: `require` (skip, with the reason, when a
framework is missing; fail instead under DVPO_REQUIRE_FRAMEWORKS=1, as .ci/run's integration block
sets), `recipe` (a block's text) and `apply_diff`.
"""

from __future__ import annotations

import ast
import copy
import importlib
import importlib.machinery
import importlib.util
import os
import re
import sys
import textwrap
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import dvpo
from dvpo import reference as ref
from dvpo.integrations import mse_config

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "integrations.md"
README = REPO / "README.md"
README_SECTION = "## Use in verl / TRL / OpenRLHF"

SHAPES = [(6, 6), (3, 7), (1, 5)]          # (B, T): B == T, B != T, B = 1
SHAPE_IDS = ["B==T", "B!=T", "B=1"]
NS = [1, 32]

# recipe name -> where it is executed
TESTED_RECIPES = {
    "verl-functions": "test_verl_functions_recipe",
    "verl-plugin": "tests/test_integrations_verl_plugin.py::test_doc_plugin_recipe_drives_verl_trainer_code",
    "trl-setup": "test_trl_recipe_runs_ppo_trainer",
    "trl-train-diff": "test_trl_recipe_runs_ppo_trainer, test_trl_recipe_at_n1_is_trls_own_training",
    "openrlhf-diff": "test_openrlhf_recipe_runs_critic_training_step, test_openrlhf_recipe_at_n1_is_openrlhfs_own",
    "openrlhf-api": "test_openrlhf_api_recipe",
    "readme-verl": "test_readme_verl_recipe",
    "readme-trl": "test_readme_trl_recipe",
    "readme-openrlhf": "test_readme_openrlhf_recipe",
}


# ================================================================================== helpers

def require(module: str, hint: str = ""):
    """Import `module`, or skip the calling test (module) with the reason; under
    DVPO_REQUIRE_FRAMEWORKS=1 a missing framework fails instead (nothing is silently skipped in CI)."""
    try:
        return importlib.import_module(module)
    except Exception as exc:  # an ImportError, or a framework that fails at import on this machine
        reason = f"{module} does not import here ({type(exc).__name__}: {exc}){': ' + hint if hint else ''}"
        if os.environ.get("DVPO_REQUIRE_FRAMEWORKS") == "1":
            pytest.fail(f"DVPO_REQUIRE_FRAMEWORKS=1 but {reason}", pytrace=False)
        pytest.skip(reason, allow_module_level=True)


def assert_matches_framework(ours, theirs, ours_input, theirs_input, dtype, frac=None):
    """An adapter's loss equals the framework's own (and its clipfrac, given `frac=(ours, theirs)`),
    and so do the gradients of the inputs they were computed from (a backward of each); tolerance by
    dtype (returned, for further comparisons)."""
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours, theirs, **tol)
    if frac is not None:
        torch.testing.assert_close(*frac)
    theirs.backward()
    ours.backward()
    torch.testing.assert_close(ours_input.grad, theirs_input.grad, **tol)
    return tol


def _sections():
    docs = DOCS.read_text()
    readme = README.read_text()
    start = readme.index(README_SECTION)
    nxt = readme.find("\n## ", start + len(README_SECTION))
    return {"docs/integrations.md": docs, "README.md (integration section)": readme[start:nxt if nxt >= 0 else None]}


_FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<lang>[\w-]*)[ ]*$")
_MARKER = re.compile(r"<!--\s*recipe:\s*(?P<name>[\w-]+)\s*-->")


def code_blocks(text):
    """[(marker name or None, language, code)] for every fenced block of `text` (indentation removed)."""
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang = len(m.group("indent")), m.group("lang")
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        body = "\n".join(line[indent:] for line in lines[i + 1:j]) + "\n"
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        marker = _MARKER.search(lines[k]) if k >= 0 else None
        out.append((marker.group("name") if marker else None, lang, body))
        i = j + 1
    return out


def recipe(name: str) -> str:
    found = [code for text in _sections().values() for marker, _, code in code_blocks(text) if marker == name]
    assert len(found) == 1, f"recipe {name!r}: {len(found)} blocks"
    return found[0]


def with_n(code: str, n: int) -> str:
    """The block with its `N = 32` line set to N = n."""
    new, count = re.subn(r"^(\+?)N = 32\b", lambda m: f"{m.group(1)}N = {n}", code, flags=re.M)
    assert count == 1, "the block must define N with one `N = 32` line"
    return new


def parse_diff(text: str):
    """{path: [(anchor, old_lines, new_lines)]} from a diff block with `--- a/`/`+++ b/` file headers
    and `@@ anchor @@` hunks (lines ' ' context, '-' removed, '+' added)."""
    files, path, hunk = {}, None, None
    for line in text.splitlines():
        if line.startswith("--- a/"):
            continue
        if line.startswith("+++ b/"):
            path = line[len("+++ b/"):].strip()
            files[path] = []
            continue
        m = re.match(r"^@@ (.*) @@$", line)
        if m:
            hunk = (m.group(1), [], [])
            files[path].append(hunk)
            continue
        tag, body = line[:1], line[1:]
        assert hunk is not None and tag in (" ", "-", "+"), f"bad diff line {line!r}"
        if tag in (" ", "-"):
            hunk[1].append(body)
        if tag in (" ", "+"):
            hunk[2].append(body)
    return files


def apply_diff(source: str, hunks, path="") -> str:
    """Apply hunks in order: each hunk's old lines must appear, as whole lines, after the first line
    containing its anchor (searched after the previous hunk)."""
    cursor = 0
    for anchor, old, new in hunks:
        at = source.find(anchor, cursor)
        assert at >= 0, f"{path}: anchor {anchor!r} not found (the framework changed?)"
        at = source.rfind("\n", 0, at) + 1
        old_text = "\n".join(old) + "\n"
        pos = source.find(old_text, at)
        assert pos >= 0 and (pos == 0 or source[pos - 1] == "\n"), \
            f"{path}: the lines of hunk @@ {anchor} @@ are not in the installed file (the framework changed?):\n{old_text}"
        new_text = "\n".join(new) + "\n"
        source = source[:pos] + new_text + source[pos + len(old_text):]
        cursor = pos + len(new_text)
    return source


def _prefix_mask(b, t, dtype=torch.long, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0] = t                       # one full row
    return (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).to(dtype)


def _values(b, t, n, scale=1.0):
    shape = (b, t) if n == 1 else (b, t, n)
    return scale * torch.randn(shape)


def _q(x):
    """[B, T] -> [B, T, 1]; [B, T, N] as is (the quantile view the reference takes)."""
    return x.unsqueeze(-1) if x.dim() == 2 else x


def _hand_loss(vpreds, returns, old, mask, eps, cfg, mode, clip="bounds"):
    """The clipped DVPO loss from dvpo's PyTorch reference and a hand-written aggregation."""
    from tests.test_integrations_common import _hand_aggregate

    v, r, o = _q(vpreds), _q(returns), _q(old)
    if clip == "bounds":
        vc = torch.max(torch.min(v, o + eps), o - eps)
    else:
        vc = o + (v - o).clamp(-eps, eps)
    real = mask != 0
    l1 = ref.critic_loss(v, r, mask=real, config=cfg, reduction="none").loss
    l2 = ref.critic_loss(vc, r, mask=real, config=cfg, reduction="none").loss
    return _hand_aggregate(torch.max(l1, l2), mask, mode)


# ================================================================================== coverage

def test_every_code_block_is_a_tested_recipe():
    seen = []
    for where, text in _sections().items():
        for marker, lang, code in code_blocks(text):
            assert marker is not None, f"{where}: a ```{lang} block without a `<!-- recipe: NAME -->` line:\n{code}"
            seen.append(marker)
    assert len(seen) == len(set(seen)), f"recipe names must be unique: {seen}"
    assert set(seen) == set(TESTED_RECIPES), (sorted(set(seen) - set(TESTED_RECIPES)),
                                              sorted(set(TESTED_RECIPES) - set(seen)))
    # the tests named here exist
    for where in TESTED_RECIPES.values():
        for name in where.split(", "):
            path, _, func = name.rpartition("::")
            source = (REPO / path).read_text() if path else Path(__file__).read_text()
            assert f"def {func}(" in source, name


def test_diff_tools_refuse_a_diff_that_does_not_apply():
    hunks = parse_diff("--- a/x.py\n+++ b/x.py\n@@ def f @@\n def f():\n-    return 1\n+    return 2\n")["x.py"]
    assert apply_diff("def f():\n    return 1\n", hunks) == "def f():\n    return 2\n"
    with pytest.raises(AssertionError, match="not in the installed file"):
        apply_diff("def f():\n    return 3\n", hunks)
    with pytest.raises(AssertionError, match="anchor"):
        apply_diff("def g():\n    return 1\n", hunks)


# ================================================================================== verl (no verl needed)

def _verl_namespace(b, t, n, seed=0):
    torch.manual_seed(seed)
    mask = _prefix_mask(b, t, seed=seed)
    values = _values(b, t, n)
    return dict(token_level_rewards=torch.randn(b, t) * mask, values=values, response_mask=mask,
                vpreds=(values + 0.3 * torch.randn(values.shape)).requires_grad_())


def _check_verl_recipe(ns, b, t, n, mode, cfg):
    values, mask = ns["values"], ns["response_mask"]
    adv = ns["advantages"] if "advantages" in ns else ns["adv"]
    returns = ns["returns"]
    assert adv.shape == (b, t) and returns.shape == values.shape and returns.dtype == values.dtype
    # GAE: dvpo's reference scan on the quantile view, whitened over real tokens
    adv_ref, ret_ref = ref.distributional_gae(ns["token_level_rewards"], _q(values), mask.bool(), gamma=1.0, lam=0.95)
    torch.testing.assert_close(_q(returns), ret_ref, rtol=1e-5, atol=1e-5)
    real = mask.bool()
    a = adv_ref[real]
    expected = (a - a.mean()) / torch.sqrt(a.var() + 1e-8) if a.numel() > 1 else torch.zeros_like(a)
    torch.testing.assert_close(adv[real], expected, rtol=1e-4, atol=1e-4)
    # the loss: the reference, clipped per quantile, aggregated by hand
    vf_loss = ns["vf_loss"]
    assert vf_loss.shape == () and torch.isfinite(vf_loss) and 0 <= ns["vf_clipfrac"].item() <= 1
    expected_loss = _hand_loss(ns["vpreds"].detach().double(), returns.double(), values.double(), mask, 0.5, cfg, mode)
    torch.testing.assert_close(vf_loss.double(), expected_loss, rtol=1e-4, atol=1e-6)
    vf_loss.backward()
    grad = ns["vpreds"].grad
    assert grad.shape == values.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("b,t", SHAPES, ids=SHAPE_IDS)
def test_verl_functions_recipe(b, t, n):
    ns = _verl_namespace(b, t, n)
    exec(recipe("verl-functions"), ns)
    _check_verl_recipe(ns, b, t, n, "seq-mean-token-sum-norm", ns["cfg"])


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("b,t", SHAPES, ids=SHAPE_IDS)
def test_readme_verl_recipe(b, t, n):
    ns = _verl_namespace(b, t, n, seed=1)
    exec(recipe("readme-verl"), ns)
    _check_verl_recipe(ns, b, t, n, "token-mean", dvpo.CriticLossConfig())


@pytest.mark.parametrize("b,t", SHAPES, ids=SHAPE_IDS)
def test_verl_recipe_returns_feed_verls_own_value_loss(b, t):
    """At N = 1 the recipe's returns are verl's `[B, T]`: verl's own value loss on them equals dvpo's
    exact MSE (with `[B, T, 1]` returns verl's loss raised for B != T and was wrong for B == T, B = 1)."""
    core_algos = require("verl.trainer.ppo.core_algos", "pip install verl==0.9.1")
    from dvpo.integrations import verl as dvpo_verl

    ns = _verl_namespace(b, t, 1, seed=2)
    exec(recipe("verl-functions"), ns)
    args = (ns["vpreds"].detach(), ns["returns"], ns["values"], ns["response_mask"], 0.5, "token-mean")
    theirs, their_frac = core_algos.compute_value_loss(*args)
    ours, our_frac = dvpo_verl.compute_value_loss(*args, config=mse_config())
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(our_frac, their_frac)
    their_adv, their_ret = core_algos.compute_gae_advantage_return(ns["token_level_rewards"], ns["values"],
                                                                  ns["response_mask"], 1.0, 0.95)
    real = ns["response_mask"].bool()
    assert their_ret.shape == ns["returns"].shape
    torch.testing.assert_close(ns["returns"][real], their_ret[real], rtol=1e-6, atol=1e-6)
    if real.sum() > 1:  # verl's whitening raises for a single real token
        torch.testing.assert_close(ns["advantages"][real], their_adv[real], rtol=1e-5, atol=1e-5)


# ================================================================================== OpenRLHF API (no OpenRLHF needed)

def _openrlhf_namespace(b, t, n, seed=0):
    torch.manual_seed(seed)
    action_mask = _prefix_mask(b, t, dtype=torch.bool, seed=seed)
    values = _values(b, t, n) * (action_mask if n == 1 else action_mask.unsqueeze(-1))
    return dict(value_clip=0.2, config=SimpleNamespace(hidden_size=16), values=values,
                old_values=values + 0.3 * torch.randn(values.shape), rewards=torch.randn(b, t) * action_mask,
                action_mask=action_mask, gamma=0.99, lambd=0.95)


def _check_openrlhf_api(ns, b, t, n):
    values, mask = ns["values"], ns["action_mask"]
    adv, returns = ns["advantages"], ns["returns"]
    assert adv.shape == (b, t) and returns.shape == values.shape
    adv_ref, ret_ref = ref.distributional_gae(ns["rewards"], _q(values), mask, gamma=0.99, lam=0.95)
    torch.testing.assert_close(adv, adv_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_q(returns), ret_ref, rtol=1e-5, atol=1e-5)
    head = ns["value_head"]
    out = head(torch.randn(b, t, 16))
    assert out.shape == (b, t, n) and head.bias is None
    assert ns["critic_loss_fn"].clip_eps == 0.2


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("b,t", SHAPES, ids=SHAPE_IDS)
def test_openrlhf_api_recipe(b, t, n):
    ns = _openrlhf_namespace(b, t, n)
    exec(with_n(recipe("openrlhf-api"), n), ns)
    _check_openrlhf_api(ns, b, t, n)
    loss = ns["loss"]
    expected = _hand_loss(ns["values"].double(), ns["returns"].double(), ns["old_values"].double(),
                          ns["action_mask"], 0.2, dvpo.CriticLossConfig(), "token-mean", clip="delta")
    assert loss.shape == () and torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("b,t", SHAPES, ids=SHAPE_IDS)
def test_readme_openrlhf_recipe(b, t, n):
    ns = _openrlhf_namespace(b, t, n, seed=3)
    exec(with_n(recipe("readme-openrlhf"), n), ns)
    _check_openrlhf_api(ns, b, t, n)


# ================================================================================== TRL

def _tiny_llama_config(vocab=6, num_labels=1):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                       bos_token_id=None, eos_token_id=None, num_labels=num_labels)


def _trl_tokenizer(vocab=6):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


_TRL_PATCHED = {}


def _trl_patched_module():
    """TRL's ppo_trainer.py with the documented diff applied, as a module of TRL's package."""
    if "module" in _TRL_PATCHED:
        return _TRL_PATCHED["module"]
    ppo = importlib.import_module("trl.experimental.ppo.ppo_trainer")
    path = Path(ppo.__file__)
    (target, hunks), = parse_diff(recipe("trl-train-diff")).items()
    assert path.as_posix().endswith(target), (path, target)
    source = apply_diff(path.read_text(), hunks, target)
    name = "trl.experimental.ppo._ppo_trainer_dvpo_recipe"
    module = types.ModuleType(name)
    module.__file__ = str(path)
    module.__package__ = "trl.experimental.ppo"
    sys.modules[name] = module
    exec(compile(source, f"{path} (with the docs/integrations.md diff)", "exec"), module.__dict__)
    _TRL_PATCHED["module"] = module
    return module


class _Recorder:
    """dvpo_trl as the patched train() sees it, recording the shapes it is called with."""

    def __init__(self):
        from dvpo.integrations import trl as dvpo_trl

        self.calls = []
        self.padded = 0                      # padding tokens seen by fill_padding (TRL's padding_mask_p1)
        for fname in ("fill_padding", "compute_advantages_and_returns", "compute_value_loss"):
            setattr(self, fname, self._wrap(fname, getattr(dvpo_trl, fname)))

    def _wrap(self, fname, fn):
        def wrapper(*args, **kwargs):
            if fname == "fill_padding":
                self.padded += int(args[1].sum())
            out = fn(*args, **kwargs)
            self.calls.append((fname, [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)],
                               [tuple(o.shape) for o in (out if isinstance(out, tuple) else (out,))], out))
            return out

        return wrapper


def _trl_models(b, t, n, seed=0, vocab=6):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from dvpo.integrations import trl as dvpo_trl

    torch.manual_seed(seed)
    policy = AutoModelForCausalLM.from_config(_tiny_llama_config(vocab))
    ref_policy = copy.deepcopy(policy)
    reward_model = AutoModelForSequenceClassification.from_config(_tiny_llama_config(vocab))
    value_model = AutoModelForSequenceClassification.from_config(_tiny_llama_config(vocab))
    for model in (policy, ref_policy):
        model.generation_config.eos_token_id = None   # every response is exactly T tokens long
    g = torch.Generator().manual_seed(seed)
    dataset = Dataset.from_dict({"input_ids": torch.randint(2, vocab, (b, 3), generator=g).tolist()})
    return dict(policy=policy, ref_policy=ref_policy, reward_model=reward_model, value_model=value_model,
                train_dataset=dataset, tokenizer=_trl_tokenizer(vocab), dvpo_trl=dvpo_trl)


def _trl_args(b, t, out_dir):
    from trl.experimental.ppo import PPOConfig

    # one PPO update on B prompts, one micro-batch; responses of T tokens, truncated after token 2
    # (w2, frequent with a 6-word vocabulary), which gives padding (TRL's padding_mask_p1). SGD: Adam's
    # first step is lr * sign(grad), which turns rounding-level gradient differences (the whitened
    # advantages sum to ~0) into lr-sized ones and would hide what the comparison is about
    return PPOConfig(output_dir=str(out_dir), per_device_train_batch_size=b, gradient_accumulation_steps=1,
                     num_mini_batches=1, total_episodes=b, response_length=t, num_ppo_epochs=1,
                     local_rollout_forward_batch_size=b, num_sample_generations=0, report_to=[], use_cpu=True,
                     save_strategy="no", stop_token=None, stop_token_id=2, missing_eos_penalty=None, seed=0,
                     logging_steps=1, bf16=False, cliprange_value=0.2, learning_rate=1e-2, optim="sgd")


def _full_length_responses(trainer):
    """TRL makes its stop token the policy's generation EOS; without it every response is exactly T
    tokens (so B and T are what the test says), and TRL's truncation after the stop token still pads."""
    assert trainer.stop_token_id == 2
    trainer.policy_model.generation_config.eos_token_id = None


def _train(trainer, seed=0):
    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed)
    trainer.train()
    return trainer.state.log_history[-1]


def _check_trl_calls(rec, b, t, n):
    names = [c[0] for c in rec.calls]
    assert names.count("compute_advantages_and_returns") == 1 and names.count("compute_value_loss") == 1
    assert names.count("fill_padding") == 2
    vshape = (b, t) if n == 1 else (b, t, n)
    for fname, in_shapes, out_shapes, out in rec.calls:
        if fname == "compute_advantages_and_returns":
            assert in_shapes == [(b, t), vshape, (b, t)] and out_shapes == [(b, t), vshape]
        elif fname == "fill_padding":
            assert in_shapes == [vshape, (b, t)] and out_shapes == [vshape]
        else:
            assert in_shapes == [vshape, vshape, vshape, (b, t)] and out_shapes == [(), ()]
            assert torch.isfinite(out[0]) and 0 <= out[1].item() <= 1


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("b,t", SHAPES, ids=SHAPE_IDS)
def test_trl_recipe_runs_ppo_trainer(b, t, n, tmp_path):
    require("trl.experimental.ppo", "pip install 'trl>=1.12,<1.13'")
    from transformers import AutoModelForSequenceClassification

    module = _trl_patched_module()
    rec = _Recorder()
    module.dvpo_trl = rec
    models = _trl_models(b, t, n)
    models["value_model"].save_pretrained(tmp_path / "value_model")
    ns = dict(AutoModelForSequenceClassification=AutoModelForSequenceClassification, path=str(tmp_path / "value_model"),
              training_args=_trl_args(b, t, tmp_path / "out"), tokenizer=models["tokenizer"], policy=models["policy"],
              ref_policy=models["ref_policy"], reward_model=models["reward_model"],
              train_dataset=models["train_dataset"], PPOTrainer=module.PPOTrainer)
    torch.manual_seed(0)
    code = with_n(recipe("trl-setup"), n)
    before = {}

    # run the block up to trainer.train(), snapshot the value head, then train
    head_line = code.index("trainer.train()")
    exec(code[:head_line], ns)
    head = ns["value_model"].score
    assert head.out_features == n and ns["value_model"].config.num_labels == n
    before["head"] = head.weight.detach().clone()
    _full_length_responses(ns["trainer"])
    exec(code[head_line:], ns)
    logs = ns["trainer"].state.log_history[-1]
    assert all(torch.isfinite(torch.tensor(float(logs[k]))) for k in ("loss/value_avg", "loss/policy_avg"))
    assert 0 <= logs["val/clipfrac_avg"] <= 1
    _check_trl_calls(rec, b, t, n)
    # the critic was trained through the quantile head
    assert not torch.equal(ns["trainer"].model.value_model.score.weight.detach(), before["head"])


@pytest.mark.parametrize("b,t", SHAPES, ids=SHAPE_IDS)
def test_trl_recipe_at_n1_is_trls_own_training(b, t, tmp_path):
    """N = 1 and mse_config(): TRL's train() with the documented diff gives TRL's own PPO update
    (every logged metric, every updated weight of the policy and the value model)."""
    ppo = require("trl.experimental.ppo", "pip install 'trl>=1.12,<1.13'")
    module = _trl_patched_module()
    rec = _Recorder()
    module.dvpo_trl = rec
    runs = {}
    for variant, trainer_cls in (("trl", ppo.PPOTrainer), ("dvpo", module.PPOTrainer)):
        models = _trl_models(b, t, 1, seed=5)
        models["dvpo_trl"].attach_quantile_head(models["value_model"], num_quantiles=1)  # re-initialized
        torch.manual_seed(7)
        torch.nn.init.normal_(models["value_model"].score.weight, std=0.5)
        trainer = trainer_cls(args=_trl_args(b, t, tmp_path / variant), processing_class=models["tokenizer"],
                              model=models["policy"], ref_model=models["ref_policy"],
                              reward_model=models["reward_model"], value_model=models["value_model"],
                              train_dataset=models["train_dataset"])
        trainer.dvpo_config = mse_config()
        _full_length_responses(trainer)
        logs = _train(trainer)
        runs[variant] = (logs, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
    (their_logs, their_state), (our_logs, our_state) = runs["trl"], runs["dvpo"]
    _check_trl_calls(rec, b, t, 1)
    if b > 1:  # these seeds truncate some responses: the padding paths are exercised
        assert rec.padded > 0
    for key in ("loss/value_avg", "val/clipfrac_avg", "loss/policy_avg", "policy/approxkl_avg", "objective/scores",
                "objective/kl", "val/num_eos_tokens"):
        assert our_logs[key] == pytest.approx(their_logs[key], rel=1e-5, abs=1e-7), key
    assert our_logs["loss/value_avg"] > 0
    assert our_state.keys() == their_state.keys()
    for key in their_state:
        torch.testing.assert_close(our_state[key], their_state[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("b,t", SHAPES, ids=SHAPE_IDS)
def test_readme_trl_recipe(b, t, n):
    from dvpo.integrations import trl as dvpo_trl

    require("transformers")
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    value_model = AutoModelForSequenceClassification.from_config(_tiny_llama_config())
    padding_mask_p1 = ~_prefix_mask(b, t, dtype=torch.bool)
    shape = (b, t) if n == 1 else (b, t, n)
    values = torch.randn(shape)
    rewards = torch.randn(b, t).masked_fill(padding_mask_p1, 0)
    ns = dict(value_model=value_model, values=values, padding_mask_p1=padding_mask_p1, rewards=rewards,
              gamma=1.0, lam=0.95, mask=~padding_mask_p1, cliprange_value=0.2)
    # TRL's training step feeds the rollout's values and returns back: mirror that after the GAE line
    code = with_n(recipe("readme-trl"), n)
    gae_end = code.index("vf_loss, vf_clipfrac")
    exec(code[:gae_end], ns)
    assert value_model.score(torch.randn(2, 16)).shape == (2, n)
    assert ns["values"].shape == shape and (ns["values"][padding_mask_p1] == 0).all()
    assert ns["advantages"].shape == (b, t) and ns["returns"].shape == shape
    ns.update(vpred=(ns["values"] + 0.1 * torch.randn(shape)).requires_grad_(), mb_values=ns["values"],
              mb_return=ns["returns"])
    exec(code[gae_end:], ns)
    expected = _hand_loss(ns["vpred"].detach().double(), ns["returns"].double(), ns["values"].double(),
                          ~padding_mask_p1, 0.2, dvpo.CriticLossConfig(), "token-mean")
    torch.testing.assert_close(ns["vf_loss"].double(), expected, rtol=1e-4, atol=1e-6)
    # the broken form this replaces: a [B, T, 1] mask on N = 1 values broadcasts or raises
    if n == 1:
        if b == t or b == 1:
            assert torch.masked_fill(values, padding_mask_p1.unsqueeze(-1), 0).shape == (b, t, t)
        else:
            with pytest.raises(RuntimeError):
                torch.masked_fill(values, padding_mask_p1.unsqueeze(-1), 0)
        with pytest.raises(ValueError, match=r"padding_mask must have shape \[B, T\]"):
            dvpo_trl.fill_padding(values, padding_mask_p1.unsqueeze(-1), 0)


# ================================================================================== OpenRLHF

def _openrlhf_root():
    spec = importlib.util.find_spec("openrlhf")
    if spec is None:
        require("openrlhf", "pip install --no-deps openrlhf==0.11.2")
    return Path(list(spec.submodule_search_locations)[0])


def _stub(name, **attrs):
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__path__ = []
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


_OPENRLHF = {}


def _openrlhf_modules(n):
    """OpenRLHF's models/model.py as shipped and with the documented diff (N quantiles), plus its
    loss.py, utils.py and utils/loss_utils.py, loaded by path under a bare `openrlhf.models` package
    (the package __init__ imports the actor, vLLM glue, flash-attn). flash-attn, imported by
    models/ring_attn_utils.py for packed samples, is stubbed (OpenRLHF's own CPU tests do the same)."""
    require("deepspeed", "pip install --no-build-isolation deepspeed==0.19.6 (OpenRLHF's model code imports it)")
    require("peft")
    root = _openrlhf_root()
    key = ("modules", n)
    if key in _OPENRLHF:
        return _OPENRLHF[key]
    diff = parse_diff(with_n(recipe("openrlhf-diff"), n))
    saved = {k: sys.modules.get(k) for k in ("openrlhf.models", "flash_attn", "flash_attn.bert_padding",
                                               "flash_attn.utils", "flash_attn.utils.distributed")}
    none = lambda *a, **k: None  # noqa: E731
    package = _stub("openrlhf.models")
    package.__path__ = [str(root / "models")]
    stubs = {"flash_attn": _stub("flash_attn"),
             "flash_attn.bert_padding": _stub("flash_attn.bert_padding", index_first_axis=none, pad_input=none,
                                              rearrange=none, unpad_input=none),
             "flash_attn.utils": _stub("flash_attn.utils"),
             "flash_attn.utils.distributed": _stub("flash_attn.utils.distributed", all_gather=none)}
    out = {}
    try:
        sys.modules["openrlhf.models"] = package
        for name, module in stubs.items():
            if saved[name] is None:
                sys.modules[name] = module
        for name in ("utils", "loss", "ring_attn_utils"):
            out[name] = importlib.import_module(f"openrlhf.models.{name}")
        for variant in ("shipped", "patched"):
            path = root / "models" / "model.py"
            source = path.read_text()
            if variant == "patched":
                source = apply_diff(source, diff["openrlhf/models/model.py"], "openrlhf/models/model.py")
            module = types.ModuleType(f"openrlhf.models._model_{variant}_{n}")
            module.__file__, module.__package__ = str(path), "openrlhf.models"
            exec(compile(source, f"{path} ({variant})", "exec"), module.__dict__)
            out[f"model_{variant}"] = module
        spec = importlib.util.spec_from_file_location("_openrlhf_loss_utils", root / "utils" / "loss_utils.py")
        out["loss_utils"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(out["loss_utils"])
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        for name in [k for k in sys.modules if k.startswith("openrlhf.models.")]:
            del sys.modules[name]
    # ppo_critic.py and experience_maker.py import Ray and vLLM: their patched functions are taken
    # from the patched file text (the whole diff must apply), with the file's dvpo imports
    for rel, funcs in (("trainer/ray/ppo_critic.py", {"training_step"}),
                       ("trainer/ppo_utils/experience_maker.py", {"get_advantages_and_returns"})):
        text = (root / rel).read_text()
        patched = apply_diff(text, diff[f"openrlhf/{rel}"], f"openrlhf/{rel}")
        out[rel] = {"shipped": _functions(text, funcs), "patched": _functions(patched, funcs),
                    "patched_text": patched}
    _OPENRLHF[key] = out
    return out


def _functions(text, names):
    tree = ast.parse(text)
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name in names:
            found[node.name] = textwrap.dedent(ast.get_source_segment(text, node))
    assert set(found) == set(names), (names, set(found))
    return found


def _dvpo_imports(text):
    """The `from dvpo... import ...` statements of a patched file, executed: {name: object}."""
    ns = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dvpo"):
            exec(ast.get_source_segment(text, node), ns)
    ns.pop("__builtins__", None)
    return ns


def _gae_statement(text):
    """The patched experience maker's `experience.advantages, experience.returns = get_advantages_and_returns(...)`."""
    for node in ast.walk(ast.parse(text)):
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Name) and node.value.func.id == "get_advantages_and_returns"):
            return textwrap.dedent(ast.get_source_segment(text, node))
    raise AssertionError("the patched experience_maker.py has no get_advantages_and_returns(...) assignment")


def _critic(mods, variant, seed=0):
    from transformers import LlamaModel, LlamaPreTrainedModel

    config = _tiny_llama_config(vocab=16)
    config.normalize_reward = False
    cls = mods[f"model_{variant}"]._get_critic_model(LlamaPreTrainedModel, LlamaModel, "score", packing_samples=False)
    torch.manual_seed(seed)
    return cls(config)


class _Strategy:
    ring_attn_group = None

    def backward(self, loss, model, optimizer):
        loss.backward()

    def optimizer_step(self, optimizer, model, scheduler, name=""):
        optimizer.step()
        optimizer.zero_grad()

    def get_grad_norm(self, model):
        return 0.0


def _training_step(mods, variant, critic, critic_loss_fn, experience):
    rel = "trainer/ray/ppo_critic.py"
    import typing

    ns = {"torch": torch, "Dict": typing.Dict, "Optional": typing.Optional, "Experience": object,
          "masked_mean": mods["utils"].masked_mean, "get_loss_batch_info": mods["loss_utils"].get_loss_batch_info}
    if variant == "patched":
        ns.update(_dvpo_imports(mods[rel]["patched_text"]))
    exec(mods[rel][variant]["training_step"], ns)
    optimizer = torch.optim.SGD(critic.parameters(), lr=0.1)
    self = SimpleNamespace(critic=critic, critic_loss_fn=critic_loss_fn, strategy=_Strategy(), replay_buffer=None,
                           args=SimpleNamespace(train=SimpleNamespace(dynamic_batch_enable=False),
                                                actor=SimpleNamespace(aux_loss_coef=0.0)),
                           aux_loss=False, critic_optim=optimizer,
                           critic_scheduler=SimpleNamespace(get_last_lr=lambda: [0.1]))
    return ns["training_step"](self, experience, 0)


def _rollout(mods, variant, critic, b, a, seed=0):
    """A right-padded batch of B prompts (3 tokens) + A actions, the critic's old values and GAE
    through the (shipped or patched) experience-maker code."""
    g = torch.Generator().manual_seed(seed)
    action_mask = _prefix_mask(b, a, dtype=torch.bool, seed=seed)
    sequences = torch.randint(2, 16, (b, 3 + a), generator=g)
    attention_mask = torch.cat([torch.ones(b, 3, dtype=torch.long), action_mask.long()], 1)
    sequences = sequences * attention_mask
    with torch.no_grad():
        values = critic(sequences, action_mask=action_mask, attention_mask=attention_mask)
    reward = torch.randn(b, a, generator=g) * action_mask
    experience = SimpleNamespace(sequences=sequences, attention_mask=attention_mask, action_mask=action_mask,
                                 values=values)
    args = SimpleNamespace(algo=SimpleNamespace(advantage=SimpleNamespace(gamma=0.99, lambd=0.95)))
    rel = "trainer/ppo_utils/experience_maker.py"
    if variant == "patched":
        ns = dict(_dvpo_imports(mods[rel]["patched_text"]), experience=experience, reward=reward, args=args)
        exec(_gae_statement(mods[rel]["patched_text"]), ns)
    else:
        ns = {"torch": torch, "Tuple": tuple}
        exec(mods[rel]["shipped"]["get_advantages_and_returns"], ns)
        experience.advantages, experience.returns = ns["get_advantages_and_returns"](
            None, experience.values, reward, experience.action_mask, 0.99, 0.95)
    return experience


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("b,t", SHAPES, ids=SHAPE_IDS)
def test_openrlhf_recipe_runs_critic_training_step(b, t, n):
    mods = _openrlhf_modules(n)
    critic = _critic(mods, "patched")
    assert critic.score.out_features == n and critic.score.bias is None
    experience = _rollout(mods, "patched", critic, b, t)
    vshape = (b, t) if n == 1 else (b, t, n)
    assert experience.values.shape == vshape and experience.returns.shape == vshape
    assert experience.advantages.shape == (b, t)
    assert (experience.values[~experience.action_mask] == 0).all()
    head_before = critic.score.weight.detach().clone()
    loss_fn = _dvpo_imports(mods["trainer/ray/ppo_critic.py"]["patched_text"])["ValueLoss"](0.2)
    status = _training_step(mods, "patched", critic, loss_fn, experience)
    assert torch.isfinite(torch.tensor(status["critic_loss"])) and status["critic_loss"] > 0
    assert torch.isfinite(torch.tensor(status["values"]))
    assert not torch.equal(critic.score.weight.detach(), head_before)
    assert 0 <= loss_fn.last_clipfrac.item() <= 1


@pytest.mark.parametrize("b,t", SHAPES, ids=SHAPE_IDS)
def test_openrlhf_recipe_at_n1_is_openrlhfs_own(b, t):
    """N = 1, mse_config(): the patched CriticModel, GAE and training step equal OpenRLHF's own."""
    mods = _openrlhf_modules(1)
    results = {}
    for variant in ("shipped", "patched"):
        critic = _critic(mods, variant)
        if variant == "patched":
            critic.load_state_dict(results["shipped"]["init"])
        init = copy.deepcopy(critic.state_dict())
        experience = _rollout(mods, variant, critic, b, t, seed=4)
        if variant == "shipped":
            loss_fn = mods["loss"].ValueLoss(0.2)
        else:
            loss_fn = _dvpo_imports(mods["trainer/ray/ppo_critic.py"]["patched_text"])["ValueLoss"](
                0.2, config=mse_config())
        status = _training_step(mods, variant, critic, loss_fn, experience)
        results[variant] = dict(init=init, experience=experience, status=status, state=critic.state_dict())
    theirs, ours = results["shipped"], results["patched"]
    for key in ("values", "advantages", "returns"):
        a, e = getattr(ours["experience"], key), getattr(theirs["experience"], key)
        assert a.shape == e.shape == (b, t), key
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6, msg=key)
    for key in ("critic_loss", "values"):
        assert ours["status"][key] == pytest.approx(theirs["status"][key], rel=1e-5, abs=1e-7), key
    for key in theirs["state"]:
        torch.testing.assert_close(ours["state"][key], theirs["state"][key], rtol=1e-5, atol=1e-7, msg=key)
