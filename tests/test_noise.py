"""Noise models: parsing and the stated statistics over many draws."""

import math
import random

import pytest
import torch

from dvpo.tasks import get_task, parse_noise


def _gen(seed=0):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _within(rate, p, n, sigmas=5.0):
    return abs(rate - p) <= sigmas * math.sqrt(p * (1 - p) / n) + 1e-12


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_flip_rate(p):
    n = 20000
    true = [float(i % 2) for i in range(n)]
    noisy, info = parse_noise(f"flip:{p}").apply(true, generator=_gen())
    flipped = sum(a != b for a, b in zip(true, noisy))
    assert flipped == info["flipped"]
    assert _within(flipped / n, p, n)
    assert all(b == 1.0 - a for a, b in zip(true, noisy) if a != b)     # a flip maps r -> 1 - r


def test_flip_graded_is_mirrored_and_zero_is_identity():
    noisy, _ = parse_noise("flip:1.0").apply([0.25, 1.0], generator=_gen())
    assert noisy == [0.75, 0.0]
    true = [0.0, 1.0, 0.5]
    assert parse_noise("flip:0").apply(true, generator=_gen())[0] == true
    assert parse_noise("none").apply(true, generator=_gen())[0] == true


def test_gauss_moments():
    n = 20000
    noisy, _ = parse_noise("gauss:0.5").apply([1.0] * n, generator=_gen(1))
    t = torch.tensor(noisy)
    assert abs(float(t.mean()) - 1.0) < 5 * 0.5 / math.sqrt(n)
    assert abs(float(t.std()) - 0.5) < 0.02


def test_missing_rate_gives_nan():
    n = 20000
    noisy, info = parse_noise("missing:0.2").apply([1.0] * n, generator=_gen(2))
    miss = sum(x != x for x in noisy)
    assert miss == info["missing"] and _within(miss / n, 0.2, n)
    assert all(x == 1.0 for x in noisy if x == x)


def test_reward_model_accuracy_and_consistency():
    n = 20000
    prompts = [f"{i:05d}+" for i in range(n)]
    responses = [str(i % 7) for i in range(n)]
    true = [float(i % 3 == 0) for i in range(n)]
    rm = parse_noise("rm:0.72", salt=5)
    noisy, info = rm.apply(true, generator=_gen(), prompts=prompts, responses=responses)
    right = sum(a == b for a, b in zip(true, noisy))
    assert _within(right / n, 0.72, n)
    assert info["rm_wrong"] == n - right
    # deterministic per (prompt, response): the same pair gets the same verdict, whatever the generator
    again, _ = rm.apply(true, generator=_gen(99), prompts=prompts, responses=responses)
    assert again == noisy
    other, _ = parse_noise("rm:0.72", salt=6).apply(true, generator=_gen(), prompts=prompts, responses=responses)
    assert other != noisy                                          # another seed, another reward model


def test_vote_label_accuracy_matches_binomial():
    """Majority labels from K samples that are right with probability q (wrong answers spread
    over many values) are right about as often as P(Binomial(K, q) is the plurality)."""
    task = get_task("math:all")
    probs = task.heldout_set(1500)
    rng = random.Random(0)
    k, q = 5, 0.45
    hits = 0
    for p in probs:
        samples = [p.gold if rng.random() < q else f"{rng.randrange(1000):03d}" for _ in range(k)]
        maj = task.majority(p, samples)
        hits += task.vote_reward(p, p.gold, maj) == 1.0
    # right whenever >= 2 of 5 are right (wrong answers rarely coincide), and with exactly one right
    # answer when it comes first (a five-way tie goes to the first seen)
    binom = [math.comb(k, j) * q ** j * (1 - q) ** (k - j) for j in range(k + 1)]
    expected = sum(binom[2:]) + binom[1] / k
    assert abs(hits / len(probs) - expected) < 0.05
    noisy, _ = parse_noise("vote:5").apply([1.0, 0.0], generator=_gen(), vote_rewards=[0.0, 1.0])
    assert noisy == [0.0, 1.0]                                     # vote rewards replace the true reward


def test_chain_and_parsing():
    m = parse_noise("vote:8+flip:0.1")
    assert m.vote_k == 8 and m.spec == "vote:8+flip:0.1"
    assert parse_noise("none").is_clean and parse_noise("clean").is_clean
    for bad in ["flip", "flip:2", "gauss:-1", "vote:0", "vote:2.5", "rm:x", "noise:1", "flip:0.1+vote:3"]:
        with pytest.raises(ValueError):
            parse_noise(bad)


def test_streams_are_reproducible():
    a, _ = parse_noise("flip:0.3+gauss:0.1+missing:0.1").apply([1.0] * 100, generator=_gen(7))
    b, _ = parse_noise("flip:0.3+gauss:0.1+missing:0.1").apply([1.0] * 100, generator=_gen(7))
    assert str(a) == str(b)
