"""The verl plugin (`VERL_USE_EXTERNAL_MODULES=dvpo.integrations.verl_plugin`) driving verl's own
trainer code on CPU, configured exactly as docs/integrations.md's shell block configures a run.

A fresh Python process gets the block's environment (its `DVPO_VERL_NUM_QUANTILES`: N = 32, and
N = 1), imports verl (which imports the plugin) and `verl.trainer.main_ppo` (the block's entry point),
and then runs, for B == T, B != T and B = 1, a tiny Llama critic through verl's code:

* `verl.utils.model.load_valuehead_model` through the plugin's wrapper: the head gets N labels
  (flash-attention, which verl asks for, is swapped for eager attention: the only CPU stand-in);
* `RayPPOTrainer._compute_values` with a stand-in critic worker whose `infer_batch` runs the model
  and verl's own `FSDPEngineWithValueHead.prepare_model_outputs` (the engine's value-head output
  processing, which `.squeeze(-1)`s the logits): values `[B, T, N]` (N = 1: `[B, T]`);
* `ray_trainer.compute_advantage(..., adv_estimator="gae")`: dvpo's GAE, returns shaped like values;
* `RayPPOTrainer._update_critic` with the loss function built as `RayPPOTrainer.init_workers` builds
  it (`partial(losses.value_loss, config=critic_config)`, looked up in verl's module, i.e. dvpo's
  after the plugin) and a stand-in worker `train_mini_batch` (model forward through the engine's
  output processing, the loss, backward, an SGD step);
* `ray_trainer.compute_data_metrics`.

The losses must be finite and equal dvpo's PyTorch reference DVPO loss with the block's config (a
distributional loss on N quantiles), the critic head must receive gradients, and at N = 1 the
plugin's engine loss with `mse_config()` must equal verl's original `value_loss` on the same
micro-batch. What cannot run on CPU (Ray workers, the FSDP engine, flash-attention) is replaced by
the stand-ins named above and nothing else.

Run as a script (`python -m tests.test_integrations_verl_plugin OUT.json`) it is the driver.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def doc_plugin_env():
    """The environment variables and the command of docs/integrations.md's plugin block."""
    from tests.test_doc_recipes import recipe

    env, commands = {}, []
    for line in recipe("verl-plugin").splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if words[0] == "export":
            key, _, value = words[1].partition("=")
            env[key] = value
        else:
            commands.append(words)
    return env, commands


# =========================================================================================== driver

def _drive(out_path):
    import tempfile
    from functools import partial

    import torch

    import verl  # noqa: F401  (imports the plugin: VERL_USE_EXTERNAL_MODULES)

    plugin_loaded = "dvpo.integrations.verl_plugin" in sys.modules
    import transformers
    from omegaconf import OmegaConf
    from transformers import AutoModelForTokenClassification, LlamaConfig

    import verl.trainer.main_ppo  # noqa: F401  (the block's entry point imports with the plugin active)
    import verl.utils.model as verl_model
    from dvpo import reference as ref
    from dvpo.integrations import mse_config
    from dvpo.integrations import verl as dvpo_verl
    from tests.test_doc_recipes import SHAPES
    from verl import DataProto
    from verl.trainer.config.algorithm import AlgoConfig
    from verl.trainer.ppo import core_algos, ray_trainer
    from verl.utils import tensordict_utils as tu
    from verl.workers.config import CriticConfig
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithValueHead
    from verl.workers.utils import losses
    from verl.workers.utils.padding import no_padding_2_padding

    n = int(os.environ["DVPO_VERL_NUM_QUANTILES"])
    cfg = losses.value_loss.dvpo_config if hasattr(losses.value_loss, "dvpo_config") else None
    result = {"plugin_loaded": plugin_loaded, "gae_module": core_algos.compute_gae_advantage_return.__module__,
              "registry_gae_module": core_algos.get_adv_estimator_fn("gae").__module__,
              "value_loss_module": losses.value_loss.__module__,
              "config": None if cfg is None else {"alpha": cfg.alpha, "beta": cfg.beta}, "runs": []}
    plugin = sys.modules["dvpo.integrations.verl_plugin"]

    # a tiny policy checkpoint; verl's critic starts from it (a token-classification model with a fresh head)
    ckpt = tempfile.mkdtemp()
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)).save_pretrained(ckpt)
    from_pretrained = AutoModelForTokenClassification.from_pretrained

    def eager_from_pretrained(*args, **kwargs):  # the CPU stand-in for flash-attention
        if kwargs.get("attn_implementation") == "flash_attention_2":
            kwargs["attn_implementation"] = "eager"
        return from_pretrained(*args, **kwargs)

    AutoModelForTokenClassification.from_pretrained = eager_from_pretrained

    class Future:
        def __init__(self, value):
            self.value = value

        def get(self):
            return self.value

    for b, t in SHAPES:
        hf_config = transformers.AutoConfig.from_pretrained(ckpt)
        hf_config.num_labels = 1                          # what verl's FSDP engine sets before loading
        torch.manual_seed(1)
        critic = verl_model.load_valuehead_model(local_path=ckpt, torch_dtype=torch.float32,
                                                 model_config=hf_config, trust_remote_code=False)
        engine = type("Engine", (), {"module": critic})()

        def engine_forward(td, grad):
            # the engine's forward without remove-padding: sequences right-padded through the model, then
            # verl's own value-head output processing (nested [B, j, (N)] values)
            ids = td["input_ids"]
            lengths = ids.offsets().diff()
            padded = ids.to_padded_tensor(0)
            mask = (torch.arange(padded.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)).long()
            with torch.set_grad_enabled(grad):
                out = critic(input_ids=padded, attention_mask=mask)
            tu.assign_non_tensor(td, use_remove_padding=False)
            return FSDPEngineWithValueHead.prepare_model_outputs(engine, out, {}, td, None)

        record = {}

        class CriticWorkerGroup:
            loss_fn = None

            def set_loss_fn(self, fn):
                self.loss_fn = fn

            def infer_batch(self, td):
                return Future(tu.get_tensordict({"values": engine_forward(td, grad=False)["values"]}))

            def train_mini_batch(self, td):
                for key in ("global_batch_size", "mini_batch_size", "epochs", "seed", "dataloader_kwargs"):
                    tu.pop(td, key=key, default=None)
                tu.assign_non_tensor(td, dp_size=1, batch_num_tokens=None, global_batch_size=None)
                optimizer = torch.optim.SGD(critic.parameters(), lr=0.1)
                model_output = engine_forward(td, grad=True)
                loss, metrics = self.loss_fn(model_output=model_output, data=td, dp_group=None)
                loss.backward()
                record["loss"] = loss.item()
                record["head_grad"] = critic.score.weight.grad.abs().sum().item()
                vpreds = no_padding_2_padding(model_output["values"], td).detach()
                record["vpreds"] = vpreds
                record["vf_clipfrac"] = metrics["critic/vf_clipfrac"]
                if n == 1:  # the plugin's engine loss with mse_config() against verl's original (unpatched)
                    detached = {"values": model_output["values"].detach()}
                    ours, _ = dvpo_verl.value_loss(critic_config, detached, td, dvpo_config=mse_config())
                    dvpo_verl.unpatch_verl()
                    try:
                        assert losses.value_loss.__module__ == "verl.workers.utils.losses"
                        theirs, _ = losses.value_loss(critic_config, detached, td)
                    finally:
                        dvpo_verl.patch_verl(config=plugin.config, num_quantiles=plugin.num_quantiles)
                    record["mse_vs_verl"] = [ours.item(), theirs.item()]
                optimizer.step()
                flat = {k: (v.value.item() if hasattr(v, "value") else v) for k, v in metrics.items()}
                flat["mfu"] = 0.0
                return Future(tu.get_tensordict({}, non_tensor_dict={"metrics": flat}))

        critic_config = CriticConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=b, cliprange_value=0.5,
                                     loss_agg_mode="token-mean")
        trainer = type("Trainer", (), {})()
        trainer.critic_wg = CriticWorkerGroup()
        trainer.config = OmegaConf.create({"critic": {"ppo_mini_batch_size": b, "ppo_epochs": 1, "data_loader_seed": 0,
                                                      "shuffle": False}, "actor_rollout_ref": {"rollout": {"n": 1}}})
        # RayPPOTrainer.init_workers' lines 888-891 (verl 0.9.1)
        trainer.critic_wg.set_loss_fn(partial(losses.value_loss, config=critic_config))

        p = 3
        g = torch.Generator().manual_seed(b * 100 + t)
        prompts = torch.randint(1, 32, (b, p), generator=g)
        responses = torch.randint(1, 32, (b, t), generator=g)
        lengths = torch.randint(1, t + 1, (b,), generator=g)
        lengths[0] = t
        response_mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).long()
        prompt_mask = torch.ones(b, p, dtype=torch.long)
        if b > 1:
            prompt_mask[1, 0] = 0                          # a left-padded prompt
        attention_mask = torch.cat([prompt_mask, response_mask], 1)
        input_ids = torch.cat([prompts, responses * response_mask], 1) * attention_mask
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        rewards = torch.randn(b, t, generator=g) * response_mask
        batch = DataProto.from_dict(tensors={
            "prompts": prompts, "responses": responses * response_mask, "input_ids": input_ids,
            "attention_mask": attention_mask, "position_ids": position_ids, "response_mask": response_mask,
            "token_level_rewards": rewards, "token_level_scores": rewards.clone()})

        values = ray_trainer.RayPPOTrainer._compute_values(trainer, batch)
        batch = batch.union(values)
        batch = ray_trainer.compute_advantage(batch, adv_estimator="gae", gamma=1.0, lam=0.95, num_repeat=1,
                                              norm_adv_by_std_in_grpo=True,
                                              config=AlgoConfig(adv_estimator="gae", gamma=1.0, lam=0.95))
        values, returns = batch.batch["values"], batch.batch["returns"]
        q = (lambda x: x.unsqueeze(-1) if x.dim() == 2 else x)
        _, ret_ref = ref.distributional_gae(rewards, q(values).double(), response_mask.bool(), gamma=1.0, lam=0.95)
        critic_output = ray_trainer.RayPPOTrainer._update_critic(trainer, batch)
        # dvpo's PyTorch reference DVPO loss on the same tensors, with the block's config
        vpreds = record["vpreds"]
        v, r, o = q(vpreds).double(), q(returns).double(), q(values).double()
        v_clip = torch.max(torch.min(v, o + 0.5), o - 0.5)
        real = response_mask.bool()
        cfg_used = losses.value_loss.dvpo_config if hasattr(losses.value_loss, "dvpo_config") else None
        import dvpo

        cfg_used = cfg_used or dvpo.CriticLossConfig()
        per_token = torch.max(ref.critic_loss(v, r, mask=real, config=cfg_used, reduction="none").loss,
                              ref.critic_loss(v_clip, r, mask=real, config=cfg_used, reduction="none").loss)
        expected = (per_token * real).sum() / real.sum()
        data_metrics = ray_trainer.compute_data_metrics(batch=batch, use_critic=True)
        result["runs"].append({
            "b": b, "t": t, "head_out": critic.score.out_features,
            "values_shape": list(values.shape), "returns_shape": list(returns.shape),
            "advantages_shape": list(batch.batch["advantages"].shape),
            "returns_vs_reference": (q(returns).double() - ret_ref).abs().max().item(),
            "loss": record["loss"], "expected_loss": expected.item(), "head_grad": record["head_grad"],
            "vf_clipfrac": record["vf_clipfrac"], "mse_vs_verl": record.get("mse_vs_verl"),
            "critic_metrics": sorted(critic_output.meta_info["metrics"]),
            "values_mean_metric": data_metrics["critic/values/mean"],
            "values_mean_expected": q(values).mean(-1)[real].mean().item(),
            "data_metrics_finite": all(float(v) == float(v) for v in data_metrics.values())})
    Path(out_path).write_text(json.dumps(result, indent=1))


# =========================================================================================== test

@pytest.mark.parametrize("n", [32, 1])
def test_doc_plugin_recipe_drives_verl_trainer_code(n, tmp_path):
    from tests.test_doc_recipes import SHAPES, require

    require("verl.trainer.ppo.ray_trainer", "pip install verl==0.9.1 cachetools uvicorn fastapi")
    env_block, commands = doc_plugin_env()
    assert env_block["VERL_USE_EXTERNAL_MODULES"] == "dvpo.integrations.verl_plugin"
    assert env_block["DVPO_VERL_NUM_QUANTILES"] == "32"
    assert commands == [["python", "-m", "verl.trainer.main_ppo", "algorithm.adv_estimator=gae", "..."]]
    config = json.loads(env_block["DVPO_VERL_CONFIG"])
    env = dict(os.environ, **env_block)
    env["DVPO_VERL_NUM_QUANTILES"] = str(n)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "tests.test_integrations_verl_plugin", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["plugin_loaded"] and result["gae_module"] == "dvpo.integrations.verl"
    assert result["registry_gae_module"] == "dvpo.integrations.verl"
    assert result["value_loss_module"] == "dvpo.integrations.verl"
    assert result["config"] == {"alpha": config["alpha"], "beta": config["beta"]}
    assert [(r["b"], r["t"]) for r in result["runs"]] == SHAPES
    for run in result["runs"]:
        b, t = run["b"], run["t"]
        vshape = [b, t] if n == 1 else [b, t, n]
        assert run["head_out"] == n
        assert run["values_shape"] == vshape and run["returns_shape"] == vshape and run["advantages_shape"] == [b, t]
        assert run["returns_vs_reference"] < 1e-5
        assert run["loss"] == pytest.approx(run["expected_loss"], rel=1e-4, abs=1e-6), run
        assert run["loss"] > 0 and run["head_grad"] > 0 and 0 <= run["vf_clipfrac"] <= 1
        assert {"critic/vf_loss", "critic/vf_clipfrac", "critic/vpred_mean"} <= set(run["critic_metrics"])
        assert run["values_mean_metric"] == pytest.approx(run["values_mean_expected"], rel=1e-5, abs=1e-6)
        assert run["data_metrics_finite"]
        if n == 1:
            ours, theirs = run["mse_vs_verl"]
            assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-8)


if __name__ == "__main__":
    _drive(sys.argv[1])
