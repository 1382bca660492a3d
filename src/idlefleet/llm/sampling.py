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

Because the draw is known to anyone who knows the request, a verifier that re-reads a
completion teacher-forced can tell for each token how far the draw fell from it in its own
distribution (:func:`miss`): 0 when ``choose`` would pick it; within a hardware class, exactly
0 but for float near-ties; across classes, about as far as the two cars' distributions differ.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np

__all__ = ["TIE_LOGITS", "SamplingParams", "choose", "miss", "uniform"]

_SCALE = 1.0 / 2**64
TIE_LOGITS = 1e-3
"""Logits this close are a near-tie to :func:`miss`: their order is float noise, not the model's
choice (a prefill and a decode of the same tokens on one graph differed by 5.6e-5 at most)."""
_NEGLIGIBLE = 36.0
"""Scaled logits this far below the top are left out of :func:`miss`: all of them together
hold less than vocab x e^-36 (5e-12 for 49,152 tokens) of the probability."""


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


def miss(
    logits: np.ndarray,
    params: SamplingParams,
    request: str,
    position: int,
    token: int,
    tie: float = TIE_LOGITS,
) -> float:
    """How far ``choose``'s draw for ``position`` of ``request`` falls from ``token`` with these
    ``logits``: 0 if ``choose`` picks it, or a token whose logit is within ``tie`` of its own
    (two cars may order a near-tie either way). Sampled: the distance in probability (0 to 1)
    from the draw to the interval of those tokens in the nucleus' cumulative distribution, in
    ``choose``'s order (a token outside the nucleus is never drawn: its distance is positive).
    Greedy: the top logit minus the token's, in logit units (0 for the first choice).

    No sort of the vocabulary (``choose``'s order is by probability, so the tokens before the
    token's interval are those more likely than it and its near-ties): a few passes over the
    tokens that matter, and a partial sort for a nucleus."""
    row = np.asarray(logits)
    if params.greedy:
        return max(0.0, float(row.max()) - float(row[token]))
    scaled = row.astype(np.float64) / params.temperature
    top = scaled.max()
    near = scaled[scaled >= top - _NEGLIGIBLE]  # tokens of negligible probability left out
    probs = np.exp(near - top)
    probs /= probs.sum()
    own = float(scaled[token])
    if own < top - _NEGLIGIBLE:  # after every token that counts
        low = high = 1.0
    else:
        width = tie / params.temperature
        low = float(probs[near > own + width].sum())
        high = low + float(probs[(near >= own - width) & (near <= own + width)].sum())
    draw = uniform(params.seed, request, position) * _nucleus_mass(probs, params.top_p)
    return max(0.0, low - draw, draw - high)


def _nucleus_mass(probs: np.ndarray, top_p: float) -> float:
    """The probability of ``choose``'s nucleus: the most likely tokens until ``top_p``."""
    if top_p >= 1.0:
        return 1.0
    n = probs.size
    k = min(n, 256)
    while True:
        # The k most likely, sorted: enough unless the nucleus is larger (then 8 times more).
        largest = np.partition(probs, n - k)[n - k :] if k < n else probs
        cumulative = np.cumsum(np.sort(largest)[::-1])
        if cumulative[-1] >= top_p or k == n:
            keep = min(int(np.searchsorted(cumulative, top_p)), k - 1)
            return float(cumulative[keep])
        k = min(n, 8 * k)
