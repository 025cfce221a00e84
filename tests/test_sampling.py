"""Sampler: seeded reproducibility, processors, logprobs."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from peer.sampling import Sampler, SampleResult, SamplingParams

VOCAB = 50


def random_logits(seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 2


def run(params: SamplingParams, steps: int = 30, prompt: tuple[int, ...] = (1, 2, 3)) -> list[int]:
    """Sample ``steps`` tokens, feeding each back into the history (logits vary per step)."""
    sampler, history = Sampler(params), list(prompt)
    for step in range(steps):
        history.append(sampler.sample(random_logits(step), history).token_id)
    return history[len(prompt) :]


def test_same_seed_same_tokens_different_seed_differs():
    params = {"temperature": 1.0, "top_p": 0.95}
    first = run(SamplingParams(seed=1234, **params))
    assert first == run(SamplingParams(seed=1234, **params))
    assert first != run(SamplingParams(seed=1235, **params))
    assert len(set(first)) > 5  # really sampling


def test_draws_depend_on_position_not_on_sampler_age():
    """A replacement peer replaying the session continues the exact same sequence."""
    params = SamplingParams(seed=99, temperature=1.0)
    tokens = run(params, steps=10)
    fresh = Sampler(params)  # never sampled before
    history = [1, 2, 3, *tokens[:6]]
    assert fresh.sample(random_logits(6), history).token_id == tokens[6]


def test_unseeded_samplers_get_random_seeds():
    assert Sampler(SamplingParams()).seed != Sampler(SamplingParams()).seed


def test_greedy_is_argmax_with_ties_to_lowest_id():
    logits = torch.zeros(VOCAB)
    logits[[7, 3, 20]] = 5.0
    assert Sampler(SamplingParams(temperature=0)).sample(logits).token_id == 3
    logits = random_logits(3)
    assert Sampler(SamplingParams(temperature=0)).sample(logits, [1, 2]).token_id == int(logits.argmax())


def test_top_k_one_equals_greedy():
    greedy = run(SamplingParams(temperature=0))
    assert run(SamplingParams(temperature=1.5, top_k=1, seed=5)) == greedy


def test_top_p_and_min_p_keep_only_the_head():
    logits = torch.full((VOCAB,), -10.0)
    logits[[4, 9]] = torch.tensor([5.0, 4.0])  # ~73% / 27% of the mass, the rest ~0
    for params in (SamplingParams(top_p=0.5, seed=1), SamplingParams(min_p=0.5, seed=1)):
        sampler = Sampler(params)
        assert {sampler.sample(logits, [0] * n).token_id for n in range(40)} == {4}
    sampler = Sampler(SamplingParams(top_p=0.9, seed=1))
    assert {sampler.sample(logits, [0] * n).token_id for n in range(60)} == {4, 9}


def test_draws_follow_the_distribution():
    """Seeded draws over many positions match the softmax: a chi-square test at the 0.1 % level
    (deterministic: the seeds are fixed, so a sampler that draws a wrong distribution fails)."""
    logits = random_logits(21)
    probs = logits.softmax(-1).double()
    draws = 12_000
    counts = torch.zeros(VOCAB, dtype=torch.float64)
    for seed in range(4):
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed))
        for position in range(draws // 4):
            counts[sampler.sample(logits, range(position)).token_id] += 1
    expected = probs * draws
    pooled = expected >= 5  # the rare tokens pooled into one cell, as the test requires
    observed = torch.cat([counts[pooled], counts[~pooled].sum().view(1)])
    wanted = torch.cat([expected[pooled], expected[~pooled].sum().view(1)])
    chi2 = float(((observed - wanted) ** 2 / wanted).sum())
    critical = {df: value for df, value in CHI2_CRITICAL_0_001}[len(observed) - 1]
    assert chi2 < critical, (chi2, critical)


# chi-square critical values at the 0.1 % level, by degrees of freedom
CHI2_CRITICAL_0_001 = [(df, value) for df, value in zip(range(20, 50), (
    45.31, 46.80, 48.27, 49.73, 51.18, 52.62, 54.05, 55.48, 56.89, 58.30, 59.70, 61.10, 62.49,
    63.87, 65.25, 66.62, 67.99, 69.35, 70.70, 72.05, 73.40, 74.74, 76.08, 77.42, 78.75, 80.08,
    81.40, 82.72, 84.04, 85.35), strict=True)]  # fmt: skip


def test_nucleus_is_the_sorted_rule():
    """Top-p ranks only the head of the distribution (`peer.sampling._nucleus`); the kept set is
    HF's: sort ascending, drop the tail whose mass is <= 1 - top_p. Flat logits need more than the
    first candidates, peaked ones fewer."""
    from peer.sampling import NUCLEUS_FIRST_CANDIDATES, _nucleus

    vocab = 4000
    for seed, scale in itertools.product(range(3), (0.1, 1.0, 4.0, 12.0)):
        logits = torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * scale
        for top_p in (0.05, 0.5, 0.9, 0.99):
            ordered, order = torch.sort(logits)
            drop = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
            drop[-1] = False
            expected = set(order[~drop].tolist())
            kept = set(torch.nonzero(torch.isfinite(_nucleus(logits, top_p))).flatten().tolist())
            assert kept == expected, (seed, scale, top_p, len(kept), len(expected))
    flat = torch.zeros(vocab)
    assert int(torch.isfinite(_nucleus(flat, 0.5)).sum()) > NUCLEUS_FIRST_CANDIDATES * 8


def test_top_k_restricts_to_k_best():
    logits = random_logits(11)
    best = set(torch.topk(logits, 3).indices.tolist())
    sampler = Sampler(SamplingParams(top_k=3, temperature=5.0, seed=2))
    seen = {sampler.sample(logits, [0] * n).token_id for n in range(80)}
    assert seen <= best and len(seen) > 1


def test_logit_bias_forces_a_token():
    logits = random_logits(4)
    target = int(logits.argmin())
    for temperature in (0.0, 1.0):
        result = Sampler(SamplingParams(temperature=temperature, logit_bias={target: 100.0}, seed=3)).sample(
            logits
        )
        assert result.token_id == target
        assert result.logprob == pytest.approx(0.0, abs=1e-4)  # bias is part of the reported logprob


def test_repetition_penalty_lowers_repeated_tokens():
    logits = torch.zeros(VOCAB)
    logits[[5, 6]] = torch.tensor([2.0, -2.0])
    result = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0, top_logprobs=VOCAB)).sample(
        logits, [5, 6, 5]
    )
    scores = dict(result.top_logprobs)
    base = -math.log(VOCAB - 2 + math.exp(1.0) + math.exp(-4.0))  # logprob of an untouched 0 logit
    assert scores[5] - base == pytest.approx(1.0, abs=1e-5)  # 2 / 2
    assert scores[6] - base == pytest.approx(-4.0, abs=1e-5)  # -2 * 2
    # A strong penalty moves greedy away from the repeated best token.
    logits = random_logits(8)
    best = int(logits.argmax())
    assert (
        Sampler(SamplingParams(temperature=0, repetition_penalty=50.0)).sample(logits, [best]).token_id
        != best
    )


def test_presence_and_frequency_penalties_count_from_penalty_start():
    logits = torch.zeros(VOCAB)
    params = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25, top_logprobs=VOCAB)
    history = [7, 7, 8, 9, 9, 9]
    lp = dict(Sampler(params).sample(logits, history, penalty_start=2).top_logprobs)
    assert lp[7] == pytest.approx(lp[0], abs=1e-6)  # prompt tokens are not counted
    assert lp[0] - lp[8] == pytest.approx(0.5 + 0.25, abs=1e-5)
    assert lp[0] - lp[9] == pytest.approx(0.5 + 3 * 0.25, abs=1e-5)


def test_logprobs_are_log_softmax_before_temperature_and_truncation():
    logits = random_logits(5)
    expected = torch.log_softmax(logits, -1)
    params = SamplingParams(temperature=0.3, top_k=4, top_p=0.8, logprobs=True, top_logprobs=5, seed=9)
    result = Sampler(params).sample(logits, [1])
    assert isinstance(result, SampleResult)
    assert result.logprob == pytest.approx(float(expected[result.token_id]), abs=1e-6)
    ids = [token for token, _ in result.top_logprobs]
    values = [value for _, value in result.top_logprobs]
    assert ids == torch.topk(expected, 5).indices.tolist()
    assert values == sorted(values, reverse=True)
    assert values == pytest.approx(torch.topk(expected, 5).values.tolist(), abs=1e-6)


def test_allowed_token_ids_restrict_the_choice():
    logits = random_logits(6)
    allowed = [2, 30, 41]
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=2.0, seed=4)):
        sampler = Sampler(params)
        assert all(sampler.sample(logits, [0] * n, allowed).token_id in allowed for n in range(30))
    expected = allowed[int(logits[allowed].argmax())]
    assert (
        Sampler(SamplingParams(temperature=0)).sample(logits, [], torch.tensor(allowed)).token_id == expected
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1},
        {"top_p": 0},
        {"top_p": 1.5},
        {"top_k": -2},
        {"min_p": 2},
        {"repetition_penalty": 0},
        {"frequency_penalty": float("nan")},
        {"logit_bias": {-1: 1.0}},
        {"top_logprobs": -1},
        {"seed": 1 << 70},
    ],
)
def test_invalid_params_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_invalid_token_ids_raise_value_error():
    sampler = Sampler(SamplingParams(temperature=0))
    with pytest.raises(ValueError, match="history"):  # the history is read (and checked) by penalties
        Sampler(SamplingParams(temperature=0, presence_penalty=1.0)).sample(random_logits(), [VOCAB])
    with pytest.raises(ValueError, match="allowed"):
        sampler.sample(random_logits(), [], [])
    with pytest.raises(ValueError, match="logit_bias"):
        Sampler(SamplingParams(logit_bias={VOCAB: 1.0})).sample(random_logits())
    with pytest.raises(ValueError, match="1-D"):
        sampler.sample(random_logits().view(5, 10))


def test_from_message_maps_zeros_to_off():
    message = SimpleNamespace(
        temperature=0.7,
        top_p=0.0,
        top_k=0,
        min_p=0.0,
        repetition_penalty=0.0,
        presence_penalty=0.1,
        frequency_penalty=0.0,
        logit_bias={3: -2.0},
        seed=42,
        logprobs=True,
        top_logprobs=2,
        HasField=lambda name: name == "seed",
    )
    params = SamplingParams.from_message(message, VOCAB)
    assert (params.top_p, params.top_k, params.repetition_penalty, params.seed) == (1.0, 0, 1.0, 42)
    assert params.logit_bias == {3: -2.0} and params.top_logprobs == 2
    message.HasField = lambda name: False
    assert SamplingParams.from_message(message, VOCAB).seed is None
