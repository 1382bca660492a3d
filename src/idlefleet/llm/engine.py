"""Many sequences decoded together (continuous batching) on the llama ONNX graph.

Each :meth:`Engine.step` first admits waiting sequences into free slots — each is prefilled
alone (its prompt plus any tokens it already has, e.g. from a car that left mid-sentence) and
its first new token chosen — then runs ONE decode call for every sequence that was already
running, and chooses each one's next token. A sequence that finishes (end of text, a stop
token, its token budget) leaves at once and its slot is refilled on the next step.

The batch's key/value cache is one array per layer, [live sequences, kv heads, columns, head
dim], right-aligned: every sequence's latest token is in the last column, shorter ones are
padded on the left and the padding masked out (``attention_mask``); positions for RoPE are kept
per sequence, so where a token sits in the cache does not matter. Columns that are padding for
every sequence are dropped after each step.

Tokens are chosen by :func:`idlefleet.llm.sampling.choose`, keyed by (seed, sequence id,
position): the same sequence gives the same tokens whatever it is batched with, and a sequence
continued from a prefix gives what the uninterrupted run would have (up to float near-ties).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from idlefleet.llm.sampling import SamplingParams, choose
from idlefleet.models.gguf_llama import LlamaConfig
from idlefleet.models.llama_onnx import cache_names

__all__ = ["Engine", "GenerationRequest", "Token"]

FinishReason = Literal["stop", "length"]


@dataclass
class GenerationRequest:
    """One sequence to generate."""

    id: str
    prompt: list[int]
    max_new_tokens: int
    """Tokens to generate at most, counting ``prefix``."""
    params: SamplingParams = field(default_factory=SamplingParams)
    prefix: list[int] = field(default_factory=list)
    """Tokens already generated (by a car that stopped): generation continues after them."""
    stop_ids: frozenset[int] = frozenset()
    """Tokens that end the sequence (end of text); they are not part of the output."""
    key: str = ""
    """Keys the random stream with the seed (default: the id). It must be the same on every car
    that runs this request, so that a generation that moves continues as it would have."""

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError("a generation needs a prompt of at least one token")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")


@dataclass(frozen=True)
class Token:
    """What a step produced for one sequence: a new token (None if the sequence ended on a
    stop token) and, if it ended, why."""

    request: str
    token: int | None
    position: int
    finish_reason: FinishReason | None = None


@dataclass
class _Live:
    request: GenerationRequest
    generated: list[int]
    next_token: int
    """Chosen, not yet fed to the model."""


class Engine:
    """Continuous batching of :class:`GenerationRequest`s (one thread: not thread-safe)."""

    def __init__(
        self,
        session: Any,
        cfg: LlamaConfig,
        slots: int = 8,
        run_options: Any = None,
    ) -> None:
        self.session = session
        self.cfg = cfg
        self.slots = slots
        self.run_options = run_options
        self._past, _ = cache_names(cfg.layers)
        self._waiting: list[GenerationRequest] = []
        self._live: list[_Live] = []
        self._cache: list[np.ndarray] = self._empty(0, 0)
        self._mask = np.zeros((0, 0), dtype=np.int64)

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._live)

    def add(self, request: GenerationRequest) -> None:
        self._waiting.append(request)

    def cancel(self, request_id: str) -> None:
        """Drop a sequence, waiting or running (its tokens so far were already reported)."""
        self._waiting = [r for r in self._waiting if r.id != request_id]
        keep = [i for i, live in enumerate(self._live) if live.request.id != request_id]
        self._keep_rows(keep)

    def step(self) -> list[Token]:
        """Admit waiting sequences into free slots, then one decode step for the others."""
        out: list[Token] = []
        keep = list(range(len(self._live)))
        if self._live:
            decoded, keep = self._decode()
            out += decoded
        joining: list[tuple[_Live, list[np.ndarray]]] = []
        while self._waiting and len(keep) + len(joining) < self.slots:
            tokens, joined = self._admit(self._waiting.pop(0))
            out += tokens
            if joined is not None:
                joining.append(joined)
        self._regroup(keep, joining)
        return out

    # -- internals -----------------------------------------------------------------------------
    def _empty(self, batch: int, columns: int) -> list[np.ndarray]:
        shape = (batch, self.cfg.kv_heads, columns, self.cfg.head_dim)
        return [np.zeros(shape, dtype=np.float32) for _ in self._past]

    def _run(self, ids: Any, positions: Any, mask: np.ndarray, cache: list[np.ndarray]) -> Any:
        ids = np.asarray(ids, dtype=np.int64)
        feed: dict[str, Any] = {
            "input_ids": ids,
            "position_ids": np.asarray(positions, dtype=np.int64),
            "attention_mask": mask,
            "logits_from": np.array([ids.shape[1] - 1], dtype=np.int64),  # the last only
        }
        feed.update(zip(self._past, cache, strict=True))
        return self.session.run(None, feed, self.run_options)

    def _admit(
        self, request: GenerationRequest
    ) -> tuple[list[Token], tuple[_Live, list[np.ndarray]] | None]:
        """Prefill one sequence and choose its first token: the token, and the sequence with
        its cache if it goes on (it joins the batch in ``_regroup``)."""
        context = request.prompt + request.prefix
        if len(request.prefix) >= request.max_new_tokens:
            return [Token(request.id, None, len(context), "length")], None
        mask = np.ones((1, len(context)), dtype=np.int64)
        logits, *cache = self._run([context], [list(range(len(context)))], mask, self._empty(1, 0))
        live = _Live(request, list(request.prefix), -1)
        token = self._choose(live, logits[0, -1], len(context))
        return [token], ((live, cache) if token.finish_reason is None else None)

    def _decode(self) -> tuple[list[Token], list[int]]:
        """One decode call for every running sequence: the tokens, and the rows that go on."""
        positions = [[len(live.request.prompt) + len(live.generated) - 1] for live in self._live]
        ids = [[live.next_token] for live in self._live]
        self._mask = np.concatenate(
            [self._mask, np.ones((len(self._live), 1), dtype=np.int64)], axis=1
        )
        logits, *self._cache = self._run(ids, positions, self._mask, self._cache)
        out: list[Token] = []
        keep: list[int] = []
        for row, live in enumerate(self._live):
            token = self._choose(live, logits[row, -1], positions[row][0] + 1)
            out.append(token)
            if token.finish_reason is None:
                keep.append(row)
        return out, keep

    def _choose(self, live: _Live, logits: np.ndarray, position: int) -> Token:
        """Choose the token at ``position``; record it, or finish the sequence."""
        request = live.request
        token = choose(logits, request.params, request.key or request.id, position)
        if token in request.stop_ids:
            return Token(request.id, None, position, "stop")
        live.generated.append(token)
        live.next_token = token
        if len(live.generated) >= request.max_new_tokens:
            return Token(request.id, token, position, "length")
        return Token(request.id, token, position)

    def _regroup(self, keep: list[int], joining: list[tuple[_Live, list[np.ndarray]]]) -> None:
        """The batch after a step: the rows in ``keep`` and the sequences ``joining``, each
        right-aligned, leading columns that are padding for every row dropped — one new array
        per cache tensor, whatever changed (a copy per change was ~10% of a step)."""
        rows = len(self._live)
        if len(keep) == rows and not joining:
            self._trim()
            return
        if not keep and not joining:
            self._live = []
            self._trim()
            return
        mask = self._mask[keep] if keep else np.zeros((0, 0), dtype=np.int64)
        used = np.flatnonzero(mask.any(axis=0)) if keep else np.zeros(0, dtype=np.int64)
        start = int(used[0]) if used.size else mask.shape[1]
        old_width = mask.shape[1] - start
        width = max([old_width, *(c[0].shape[2] for _, c in joining)])
        total = len(keep) + len(joining)
        new_mask = np.zeros((total, width), dtype=np.int64)
        new_mask[: len(keep), width - old_width :] = mask[:, start:]
        for r, (_, cache) in enumerate(joining, start=len(keep)):
            new_mask[r, width - cache[0].shape[2] :] = 1
        index = np.asarray(keep, dtype=np.int64)
        whole = len(keep) == rows  # no row left: the old rows go over in one slice
        grouped: list[np.ndarray] = []
        for layer, old in enumerate(self._cache):
            new = np.zeros((total, *old.shape[1:2], width, old.shape[3]), dtype=old.dtype)
            if keep:
                kept = old[:, :, start:] if whole else old[index, :, start:]
                new[: len(keep), :, width - old_width :] = kept
            for r, (_, cache) in enumerate(joining, start=len(keep)):
                own = cache[layer]
                new[r, :, width - own.shape[2] :] = own[0]
            grouped.append(new)
        self._cache = grouped
        self._mask = new_mask
        self._live = [self._live[i] for i in keep] + [live for live, _ in joining]

    def _keep_rows(self, rows: Seq[int]) -> None:
        self._live = [self._live[i] for i in rows]
        index = np.asarray(rows, dtype=np.int64)
        self._cache = [c[index] for c in self._cache]
        self._mask = self._mask[index]

    def _trim(self) -> None:
        """Drop leading columns that are padding for every sequence."""
        if not self._live:
            self._cache = self._empty(0, 0)
            self._mask = np.zeros((0, 0), dtype=np.int64)
            return
        used = np.flatnonzero(self._mask.any(axis=0))
        start = int(used[0]) if used.size else self._mask.shape[1]
        if start:
            self._cache = [np.ascontiguousarray(c[:, :, start:]) for c in self._cache]
            self._mask = self._mask[:, start:]
