"""Token choice: greedy, nucleus sampling, and a random stream that depends only on
(seed, request, position)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from idlefleet.llm.sampling import TIE_LOGITS, SamplingParams, choose, miss, uniform

GREEDY = SamplingParams(temperature=0.0)


def test_greedy_takes_the_largest_logit_and_the_lowest_id_on_a_tie() -> None:
    assert choose(np.array([0.1, 3.0, -1.0, 3.0]), GREEDY, "r", 0) == 1


def test_the_random_stream_is_a_function_of_seed_request_and_position_only() -> None:
    assert uniform(7, "req-1", 12) == uniform(7, "req-1", 12)
    draws = {uniform(7, "req-1", p) for p in range(1000)}
    assert len(draws) == 1000 and all(0.0 <= u < 1.0 for u in draws)
    assert uniform(7, "req-1", 12) != uniform(8, "req-1", 12)
    assert uniform(7, "req-1", 12) != uniform(7, "req-2", 12)
    assert uniform(None, "req-1", 12) != uniform(0, "req-1", 12)


def test_draws_are_uniform_enough() -> None:
    draws = np.array([uniform(1, "r", p) for p in range(20_000)])
    counts, _ = np.histogram(draws, bins=10, range=(0, 1))
    assert counts.min() > 1_800 and counts.max() < 2_200


def test_sampling_follows_the_softmax_of_the_scaled_logits() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.2]))
    params = SamplingParams(temperature=1.0, seed=3)
    picks = np.bincount([choose(logits, params, "r", p) for p in range(6_000)], minlength=3)
    np.testing.assert_allclose(picks / 6_000, [0.5, 0.3, 0.2], atol=0.025)


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = np.log(np.array([0.05, 0.6, 0.25, 0.1]))
    params = SamplingParams(temperature=1.0, top_p=0.8, seed=1)
    picks = {choose(logits, params, "r", p) for p in range(2_000)}
    assert picks == {1, 2}  # 0.6 + 0.25 reach 0.8; the tail is never drawn


def test_a_low_temperature_is_nearly_greedy() -> None:
    logits = np.array([1.0, 2.0, 1.5])
    params = SamplingParams(temperature=0.01, seed=5)
    assert {choose(logits, params, "r", p) for p in range(500)} == {1}


@settings(max_examples=200)
@given(
    logits=st.lists(st.floats(-30, 30), min_size=1, max_size=50),
    temperature=st.floats(0.05, 2.0),
    top_p=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**31),
    position=st.integers(0, 10_000),
)
def test_a_sampled_token_is_valid_and_reproducible(
    logits: list[float], temperature: float, top_p: float, seed: int, position: int
) -> None:
    array = np.array(logits, dtype=np.float32)
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=seed)
    token = choose(array, params, "req", position)
    assert 0 <= token < len(logits)
    assert choose(array.copy(), params, "req", position) == token


@settings(max_examples=200)
@given(
    logits=st.lists(st.floats(-30, 30), min_size=2, max_size=50),
    temperature=st.floats(0.05, 2.0),
    top_p=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**31),
    position=st.integers(0, 10_000),
)
def test_the_chosen_token_misses_by_nothing_and_no_other_token_does(
    logits: list[float], temperature: float, top_p: float, seed: int, position: int
) -> None:
    array = np.array(logits, dtype=np.float32)
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=seed)
    token = choose(array, params, "req", position)
    assert miss(array, params, "req", position, token) <= 1e-12
    misses = [miss(array, params, "req", position, t) for t in range(len(logits))]
    assert all(0.0 <= m <= 1.0 for m in misses)
    # Another token misses by the probability between the draw and it, unless it is a near-tie
    # of the chosen one (or the draw falls exactly on the boundary of two intervals).
    apart = [t for t in range(len(logits)) if abs(array[t] - array[token]) > TIE_LOGITS]
    assert sum(misses[t] > 0 for t in apart) >= len(apart) - 1


@pytest.mark.parametrize("top_p", [0.3, 0.95, 1.0])
def test_a_large_vocabulary_s_chosen_tokens_miss_by_nothing(top_p: float) -> None:
    """Nuclei of a few to thousands of tokens (a partial sort, grown until it holds one)."""
    logits = np.random.default_rng(7).normal(0, 3, 49_152).astype(np.float32)
    for temperature in (0.5, 1.0, 2.0):
        params = SamplingParams(temperature=temperature, top_p=top_p, seed=1)
        for position in range(10):
            token = choose(logits, params, "r", position)
            assert miss(logits, params, "r", position, token) <= 1e-12
            assert miss(logits, params, "r", position, (token + 1) % 49_152) > 0.0


def test_a_miss_is_the_distance_from_the_draw_in_probability() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.2]))
    params = SamplingParams(temperature=1.0, seed=3)
    position = next(p for p in range(100) if 0.1 < uniform(3, "r", p) < 0.4)
    u = uniform(3, "r", position)  # in token 0's interval [0, 0.5)
    assert miss(logits, params, "r", position, 0) == 0.0
    assert miss(logits, params, "r", position, 1) == pytest.approx(0.5 - u)
    assert miss(logits, params, "r", position, 2) == pytest.approx(0.8 - u)


def test_a_token_outside_the_nucleus_always_misses() -> None:
    logits = np.log(np.array([0.05, 0.6, 0.25, 0.1]))
    params = SamplingParams(temperature=1.0, top_p=0.8, seed=1)
    assert all(miss(logits, params, "r", p, 0) > 0.0 for p in range(200))
    assert all(miss(logits, params, "r", p, 3) > 0.0 for p in range(200))


def test_near_ties_miss_by_nothing() -> None:
    logits = np.log(np.array([0.4, 0.4, 0.2]))
    logits[1] -= TIE_LOGITS / 2  # another car may rank token 1 first
    params = SamplingParams(temperature=1.0, seed=3)
    for position in range(50):
        chosen = choose(logits, params, "r", position)
        if chosen in (0, 1):
            assert miss(logits, params, "r", position, 1 - chosen) == 0.0
        else:
            assert miss(logits, params, "r", position, 0) > 0.0


def test_greedy_misses_by_the_logit_gap() -> None:
    logits = np.array([0.1, 3.0, -1.0, 3.0, 2.5], dtype=np.float32)
    assert miss(logits, GREEDY, "r", 0, 1) == 0.0
    assert miss(logits, GREEDY, "r", 0, 3) == 0.0  # a tie: not what choose picks, but no miss
    assert miss(logits, GREEDY, "r", 0, 4) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("temperature", "top_p"), [(-0.1, 1.0), (2.5, 1.0), (1.0, 0.0), (1.0, 1.1)]
)
def test_out_of_range_parameters_are_refused(temperature: float, top_p: float) -> None:
    with pytest.raises(ValueError):
        SamplingParams(temperature=temperature, top_p=top_p)
