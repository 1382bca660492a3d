"""Choosing the next token: greedy, or sampled from a reproducible random stream.

The random number for a token is a pure function of (seed, request, position): the first 8
bytes of BLAKE2b over the three, as a float in [0, 1). Nothing depends on which car runs the
request, on what else shares its batch, or on how many tokens came before on this car, so a
generation that moves to another car mid-sentence (which continues from prompt + the tokens so
far) draws exactly the numbers the first car would have drawn: with the same logits, the same
tokens. Without a seed the request id alone keys the stream (still reproducible for a retry).

Sampling follows OpenAI's parameters: ``temperature`` 0 is greedy (argmax, lowest id on a tie);
otherwise softmax(logits / temperature) in float64, cut to the smallest set of most likely
tokens whose probability reaches ``top_p`` (nucleus), and one draw by inverse CDF.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np

__all__ = ["SamplingParams", "choose", "uniform"]

_SCALE = 1.0 / 2**64


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def uniform(seed: int | None, request: str, position: int) -> float:
    """The random number in [0, 1) for ``request``'s token at ``position``."""
    key = f"{'' if seed is None else seed}\x1f{request}\x1f{position}".encode()
    (value,) = struct.unpack("<Q", hashlib.blake2b(key, digest_size=8).digest())
    return value * _SCALE


def choose(logits: np.ndarray, params: SamplingParams, request: str, position: int) -> int:
    """The token for ``position`` of ``request`` from its ``logits`` [vocab]."""
    if params.greedy:
        return int(np.argmax(logits))
    scaled = np.asarray(logits, dtype=np.float64) / params.temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    # Most likely first (stable: equal probabilities keep id order), then the nucleus.
    order = np.argsort(-probs, kind="stable")
    ranked = probs[order]
    cumulative = np.cumsum(ranked)
    keep = int(np.searchsorted(cumulative, params.top_p * cumulative[-1])) + 1
    kept = cumulative[:keep]
    draw = uniform(params.seed, request, position) * kept[-1]
    index = min(int(np.searchsorted(kept, draw, side="right")), keep - 1)
    return int(order[index])
