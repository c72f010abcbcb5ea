"""The KV-cached sampling loop against plain full-sequence forwards.

The cache is handed to the model by keyword; transformers renamed it (`past_key_values` ->
`cache`) and both forwards accept **kwargs, so a wrong name is silently dropped and every decoding
step sees only its new token (seen on a GPU machine with transformers 5.17: SFT loss fell to 0.001
while greedy accuracy stayed 0). This test fails in that case, whatever the installed version.
"""

import pytest
import torch

from dvpo.tasks import get_task
from dvpo.trainer.config import TrainConfig
from dvpo.trainer.models import build_policy, cache_kwarg
from dvpo.trainer.rollout import encode_prompts, positions, sample


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cached_greedy_decoding_matches_full_forwards(arch):
    torch.manual_seed(0)
    cfg = TrainConfig(arch=arch, hidden=32, layers=2, heads=2, ffn=64, device="cpu")
    task = get_task("math:1-5")  # mixed levels: left-padded prompts of different lengths
    model, tok = build_policy(cfg, task, torch.device("cpu"))
    model.eval()
    with torch.no_grad():  # large random weights: a freshly initialised model barely looks at its context
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    import random

    rng = random.Random(0)
    prompts = [task.train_problem(rng).prompt for _ in range(6)]
    ids, mask = encode_prompts(tok, prompts, "cpu")
    steps = 6
    got, got_mask = sample(model, ids, mask, steps, eos_id=-1, pad_id=tok.pad_token_id, greedy=True)
    assert got.shape == (len(prompts), steps) and bool(got_mask.all())

    # the same greedy decode, recomputing the whole sequence at every step (no cache)
    seq, attn = ids, mask.long()
    want = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=seq, attention_mask=attn, position_ids=positions(attn)).logits[:, -1]
            nxt = logits.argmax(-1)
            want.append(nxt)
            seq = torch.cat([seq, nxt[:, None]], 1)
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
    assert torch.equal(got, torch.stack(want, 1))


def test_cache_kwarg_names_a_forward_parameter():
    torch.manual_seed(0)
    cfg = TrainConfig(hidden=16, layers=1, heads=2, ffn=32, device="cpu")
    model, _ = build_policy(cfg, get_task("math"), torch.device("cpu"))
    import inspect

    assert cache_kwarg(model) in inspect.signature(model.forward).parameters
