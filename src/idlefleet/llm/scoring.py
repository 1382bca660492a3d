"""Teacher-forced re-scoring: how far each token of a given completion is from what this
model would have chosen there.

Verification of a generation (issue #13) does not generate again and compare text: sampled
text differs after the first token two cars' numbers disagree on. It reads the prompt and the
completion another car returned in one prefill and, for every completion token, looks at the
logits the model gives at the position before it: the token's *miss*
(:func:`idlefleet.llm.sampling.miss`: how far the request's own random draw for that position
falls from the token in this model's distribution; 0 when this model would have chosen it).
After the last token, the same for the end-of-text token, which a generation that ended with
``stop`` (and not on a stop string) has just drawn.

The prefill runs in chunks of :data:`CHUNK_TOKENS` positions over the key/value cache, so that
the logits of a long completion (vocab floats per position: 197 KB each for SmolLM2) are never
all in memory at once; logits are computed only from the prompt's last position on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from idlefleet.llm.sampling import SamplingParams, miss
from idlefleet.models.gguf_llama import LlamaConfig
from idlefleet.models.llama_onnx import cache_names

__all__ = ["CHUNK_TOKENS", "Scores", "score"]

CHUNK_TOKENS = 256
"""Positions per model call: 256 x 49,152 float32 logits are 50 MB."""


@dataclass(frozen=True)
class Scores:
    """A completion re-read: one entry per token, and one more for the end of text if asked."""

    misses: list[float]
    """Each token's miss (0: this model, with the request's draw, chooses it there)."""
    logprobs: list[float]
    """Each token's log-probability at temperature 1 (the model's own distribution)."""


def score(
    session: Any,
    cfg: LlamaConfig,
    prompt: Sequence[int],
    completion: Sequence[int],
    params: SamplingParams,
    key: str,
    end_ids: frozenset[int] = frozenset(),
    run_options: Any = None,
    chunk: int = CHUNK_TOKENS,
) -> Scores:
    """Re-read ``completion`` after ``prompt``, as sampled with ``params`` from the random
    stream ``key`` (a ``GenerationRequest``'s); and, if ``end_ids`` are given, the end of
    text after it (of those ids, the one of least miss). ``run_options``: ONNX Runtime's (the
    compute gate's stop)."""
    if not prompt:
        raise ValueError("re-scoring needs a prompt of at least one token")
    context = [*prompt, *completion]
    first = len(prompt) - 1  # the position whose logits choose the first completion token
    last = len(context) - (1 if end_ids else 2)  # the last position whose logits are read
    out = Scores([], [])
    if last < first:
        return out
    past_names, _ = cache_names(cfg.layers)
    cache = [np.zeros((1, cfg.kv_heads, 0, cfg.head_dim), dtype=np.float32) for _ in past_names]
    for start in range(0, last + 1, chunk):
        ids = context[start : start + chunk]
        wanted_from = max(first, start)
        wanted_to = min(last, start + len(ids) - 1)
        feed: dict[str, Any] = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "position_ids": np.arange(start, start + len(ids), dtype=np.int64)[None, :],
            "attention_mask": np.ones((1, start + len(ids)), dtype=np.int64),
            # One row at least (the graph slices from it); a chunk of prompt alone ignores it.
            "logits_from": np.array([min(wanted_from, wanted_to) - start], dtype=np.int64),
        }
        feed.update(zip(past_names, cache, strict=True))
        logits, *cache = session.run(None, feed, run_options)
        if wanted_from > wanted_to:
            continue
        rows = logits[0, : wanted_to - wanted_from + 1]
        top = rows.max(axis=1, keepdims=True)
        log_total = (top + np.log(np.exp(rows - top).sum(axis=1, keepdims=True)))[:, 0]
        for row, lse, p in zip(rows, log_total, range(wanted_from, wanted_to + 1), strict=True):
            # Logits at context position p choose the token at p + 1 (the engine's position).
            targets = [context[p + 1]] if p + 1 < len(context) else sorted(end_ids)
            missed, target = min((miss(row, params, key, p + 1, t), t) for t in targets)
            out.misses.append(missed)
            out.logprobs.append(float(row[target] - lse))
    return out
