"""Tasks: problem generation, splits, verifiers, SFT sets, majority votes, the char tokenizer."""

import random

import pytest

from dvpo.tasks import get_task, is_heldout, tokenizer_for
from dvpo.tasks.dialogue import DialogueTask
from dvpo.tasks.science import SUBSTANCES, state

TASKS = ["math:all", "science", "dialogue"]


@pytest.mark.parametrize("spec", TASKS)
def test_splits_are_disjoint_and_fixed(spec):
    task = get_task(spec)
    rng = random.Random(0)
    train = [task.train_problem(rng) for _ in range(500)]
    held = task.heldout_set(100)
    assert len({p.prompt for p in held}) == 100
    assert all(is_heldout(p.prompt) for p in held)
    assert not any(is_heldout(p.prompt) for p in train)
    assert not ({p.prompt for p in held} & {p.prompt for p in train})
    assert [p.prompt for p in get_task(spec).heldout_set(100)] == [p.prompt for p in held]   # the same every run
    assert set(p.level for p in train) == set(task.levels)


@pytest.mark.parametrize("spec", TASKS)
def test_gold_and_sft_responses_are_correct(spec):
    task = get_task(spec)
    rng = random.Random(1)
    for _ in range(300):
        p = task.train_problem(rng)
        assert task.reward(p, p.gold) == 1.0 and task.correct(p, p.gold)
        prompt, resp = task.sft_example(rng)
        assert isinstance(prompt, str) and isinstance(resp, str) and not is_heldout(prompt)
    for _ in range(100):
        p = task.train_problem(rng)
        assert task.reward(p, task.sft_response(p, rng)) == 1.0


def test_math_verifier_and_levels():
    task = get_task("math:1-5")
    rng = random.Random(3)
    seen = {}
    for _ in range(400):
        p = task.train_problem(rng)
        seen.setdefault(p.level, p)
        assert len(p.gold) == 3 and p.gold.isdigit()
    assert sorted(seen) == [1, 2, 3, 4, 5]
    p = seen[2]
    assert task.reward(p, p.gold) == 1.0
    assert task.reward(p, str(int(p.gold) + 1).zfill(3)) == 0.0
    assert task.reward(p, p.gold + "0") == 0.0
    assert task.reward(p, str(int(p.gold))) == (1.0 if int(p.gold) >= 100 else 0.0)   # format: three digits
    a, b = (int(x) for x in p.prompt[:-1].split("+"))
    assert int(p.gold) == a + b
    word = seen[5]
    assert word.prompt.split()[0] in ("ann", "bob", "cat", "dan", "eve")
    assert task.vote_key(p, "abc") is None and task.vote_key(p, "042") == ("042",)


def test_science_rules():
    assert state("H2O", -1) == "s" and state("H2O", 0) == "l" and state("H2O", 99) == "l" and state("H2O", 100) == "g"
    assert state("CO2", -79) == "s" and state("CO2", -78) == "g"
    task = get_task("science")
    for p in task.heldout_set(200):
        f, t = p.data
        assert p.gold == state(f, t) and f in SUBSTANCES
        mp, bp = SUBSTANCES[f]
        d = min(abs(t - mp), abs(t - bp))
        assert {1: d > 100, 2: 20 <= d <= 100, 3: d < 20}[p.level]
        assert task.reward(p, p.gold) == 1.0 and task.reward(p, "x") == 0.0


def test_dialogue_graded_reward():
    task = DialogueTask()
    rng = random.Random(4)
    for _ in range(200):
        p = task.train_problem(rng)
        cons = dict(p.data)
        assert len(p.data) == p.level + 1
        assert task.reward(p, "zzz") == 0.0 and task.reward(p, "") == 0.0     # bad format
        w = task.sft_response(p, rng)
        if "s" in cons:
            bad = ("b" if cons["s"] == "a" else "a") + w[1:]
            assert task.reward(p, bad) <= 1.0 - 1.0 / len(p.data) + 1e-9
    p = task._generate(random.Random(0), 4)           # all five constraints
    assert task.reward(p, p.gold) == 1.0
    assert 0.0 <= task.reward(p, "abc") <= 1.0


@pytest.mark.parametrize("spec", TASKS)
def test_majority_vote(spec):
    task = get_task(spec)
    p = task.heldout_set(1)[0]
    wrong = "999" if spec.startswith("math") else ("x" if spec == "science" else "zzzz")
    maj = task.majority(p, [p.gold, p.gold, "garbage!", wrong])
    assert maj == task.vote_key(p, p.gold)
    assert task.vote_reward(p, p.gold, maj) == 1.0
    assert task.vote_reward(p, p.gold, None) == 0.0
    assert task.majority(p, ["!!", "??"]) is None


@pytest.mark.parametrize("spec", TASKS)
def test_char_tokenizer_roundtrip(spec):
    from transformers import PreTrainedTokenizerFast

    task = get_task(spec)
    tok = tokenizer_for(task)
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    p = task.heldout_set(1)[0]
    ids = tok(p.prompt + p.gold, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(p.prompt + p.gold)                   # one token per character
    assert tok.decode(ids) == p.prompt + p.gold
    assert tok.decode(ids + [tok.eos_token_id, 0], skip_special_tokens=True) == p.prompt + p.gold


def test_bad_specs():
    with pytest.raises(ValueError):
        get_task("poetry")
    with pytest.raises(ValueError):
        get_task("math:9")
