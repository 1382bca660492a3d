"""A streamed chat completion: OpenAI's ``chat.completion.chunk`` events, from a car's progress.

The car reports the tokens generated so far (its progress, after every step of a streamed
request); each report becomes one chunk holding the text those tokens add. Text that may still
change is held back: a trailing U+FFFD (a character whose UTF-8 bytes are split across tokens)
and a tail that could be the start of a stop sequence (a stop sequence is never sent: the text
is cut before it, as in the final result). Tokens must extend what was streamed — a car that
continues another's generation reports the earlier tokens too — or the report is refused.

Events, as OpenAI sends them: a first chunk with ``delta: {"role": "assistant", "content": ""}``,
content chunks, a chunk with ``delta: {}`` and the ``finish_reason``, and with
``stream_options.include_usage`` a last chunk with empty ``choices`` and the ``usage`` (every
chunk before it has ``"usage": null``). The API adds ``data: [DONE]``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from idlefleet.workloads.base import OnlineStream

__all__ = ["ChatStream", "held_back"]


def held_back(text: str, stops: Sequence[str]) -> str:
    """The part of ``text`` that cannot change any more: before any stop sequence in it, less a
    tail that could begin one, less trailing U+FFFD (an incomplete character)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    if found:
        return text[: min(found)]
    keep = len(text)
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                keep = min(keep, len(text) - n)
                break
    text = text[:keep]
    return text.rstrip("\ufffd")


class ChatStream(OnlineStream):
    def __init__(
        self,
        completion_id: str,
        model: str,
        tokenizer: Any,
        stops: Sequence[str],
        include_usage: bool,
        parse: Any,
    ) -> None:
        self.completion_id = completion_id
        self.model = model
        self.created = int(time.time())
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.include_usage = include_usage
        self._parse = parse
        self.tokens: list[int] = []
        """Every token reported so far."""
        self.sent = ""
        """The text streamed so far."""

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def start(self) -> list[dict[str, Any]]:
        return [self._chunk({"role": "assistant", "content": "", "refusal": None})]

    def _extend(self, tokens: list[int]) -> None:
        if tokens[: len(self.tokens)] != self.tokens:
            raise ValueError(
                f"the tokens reported do not continue the {len(self.tokens)} streamed already"
            )
        self.tokens = tokens

    def _content(self, text: str) -> list[dict[str, Any]]:
        if not text.startswith(self.sent):
            raise ValueError("the text does not continue what was streamed already")
        delta = text[len(self.sent) :]
        self.sent = text
        return [self._chunk({"content": delta})] if delta else []

    def progress(self, data: bytes) -> list[dict[str, Any]]:
        tokens = json.loads(data)["tokens"]  # checked by check_progress
        self._extend(list(tokens))
        text = held_back(self.tokenizer.decode(self.tokens), self.stops)
        if not text.startswith(self.sent):
            return []  # cannot happen for byte-level BPE; wait for the result
        return self._content(text)

    def result(self, data: bytes, tokens: int) -> list[dict[str, Any]]:
        parsed = self._parse(data)
        if isinstance(parsed, str):
            raise ValueError(parsed)
        self._extend(list(parsed.tokens))
        events = self._content(parsed.text)
        events.append(self._chunk({}, parsed.finish_reason))
        if self.include_usage:
            completion = len(parsed.tokens)
            events.append(
                {
                    "id": self.completion_id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model,
                    "system_fingerprint": None,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": parsed.prompt_tokens,
                        "completion_tokens": completion,
                        "total_tokens": parsed.prompt_tokens + completion,
                    },
                }
            )
        return events
