"""How a unit is cut into result chunks: bounded in requests and in bytes, nothing lost."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from idlefleet.agent.chunk_runner import RESULT_CHUNK_BYTES, plan_chunks, vectors_per_chunk


def test_a_chunk_of_big_requests_is_cut_by_its_vectors_not_only_its_count() -> None:
    inputs = [2048, 1, 1, 600, 600, 3]
    assert plan_chunks(range(6), inputs, max_requests=64, max_vectors=1024) == [
        [0],  # more than a chunk's worth alone: a chunk of its own
        [1, 2, 3],
        [4, 5],
    ]
    assert plan_chunks([5, 4, 3], inputs, max_requests=2, max_vectors=10_000) == [[5, 4], [3]]


def test_a_full_chunk_of_384_d_vectors_fits_its_byte_bound_as_base64() -> None:
    n = vectors_per_chunk(384)
    assert n == 1024
    assert 4 * ((n * 384 * 4 + 2) // 3) <= RESULT_CHUNK_BYTES


@given(
    inputs=st.lists(st.integers(1, 3000), min_size=1, max_size=60),
    max_requests=st.integers(1, 70),
    max_vectors=st.integers(1, 5000),
)
def test_every_item_is_in_one_chunk_in_order_and_no_chunk_breaks_a_bound_it_could_keep(
    inputs: list[int], max_requests: int, max_vectors: int
) -> None:
    order = sorted(range(len(inputs)), key=lambda i: -inputs[i])
    chunks = plan_chunks(order, inputs, max_requests, max_vectors)

    assert [i for chunk in chunks for i in chunk] == order
    for chunk in chunks:
        assert 1 <= len(chunk) <= max_requests
        assert len(chunk) == 1 or sum(inputs[i] for i in chunk) <= max_vectors
