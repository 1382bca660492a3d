"""Chat completions (``/v1/chat/completions``): the second workload (issue #11, in progress).

- request: an OpenAI chat body (``request.validate_chat_body``); the coordinator renders the
  model's chat template and tokenizes it, so the context window is checked where the request
  enters and the car gets token ids. Payload: ``{"prompt": [ids], "max_tokens", "temperature",
  "top_p", "seed", "stop", "nonce"}`` (the nonce keys the random stream when there is no seed).
- result: UTF-8 JSON ``{"tokens": [ids], "text", "finish_reason", "prompt_tokens"}`` — the
  completion's tokens (the end-of-text token left out), its text (cut before a stop sequence)
  and why it ended (``stop`` or ``length``).
- check, before a commit: a JSON object of that shape, no more tokens than ``max_tokens`` (and
  exactly that many when it ended for ``length``), every id in the vocabulary, the text what
  the tokens decode to (or, for a stop sequence, a prefix of it), the prompt's length as sent.
- verification (``verify.py``): a probe is the whole completion, re-read teacher-forced on
  another car in one prefill; its answer says, per token, how far the request's own random draw
  fell from it in that car's model. Agreement: within one hardware class every token and the
  end of text where the draw fell (but for float noise), across classes all but a few close to
  it. Never a comparison of text. ``work`` counts in prefilled tokens (``DECODE_WEIGHT``).
- render: OpenAI's ``chat.completion`` object.
- cost: the prompt's tokens plus ``max_tokens``.

The car's side is ``runner.py`` (a continuous-batching engine on the model's ONNX graph, built
from the GGUF once and cached by sha256); its generations report their tokens so far as
progress, so a car that leaves mid-sentence loses nothing (another continues from there).
"""

from __future__ import annotations

import functools
import json
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from idlefleet.coordinator.errors import InvalidRequest
from idlefleet.coordinator.openai_format import derived_id
from idlefleet.models.catalog import SMOLLM2, resolve_model
from idlefleet.models.gguf_llama import GGUFModel, smollm2_path
from idlefleet.workloads.base import Cost, OnlineStream, Planned, Probe, UnitRunner, Workload
from idlefleet.workloads.chat import verify
from idlefleet.workloads.chat.request import ChatJob, validate_chat_body

if TYPE_CHECKING:
    from idlefleet.coordinator.store.base import StoredRequest

__all__ = ["CHAT", "DECODE_WEIGHT", "DEFAULT_MAX_TOKENS", "ChatWorkload"]

DEFAULT_SLOTS = 32
"""Sequences a car decodes together. On one thread, 96 requests of 64-128 new tokens: 16 slots
119.5 tokens/s, 32 slots 130.5, 48 slots 130.8. The key/value cache of a typical request
(~200 tokens) is ~9 MB, of a full 8k context 377 MB: memory, not speed, bounds slots on a car
that takes long requests."""
DEFAULT_MAX_TOKENS = 2048
"""Completion tokens when the request names no limit (OpenAI's is the context window; a unit
of such requests would be unbounded, so ours is this, and never more than the window allows)."""
FINISH_REASONS = ("stop", "length")
DECODE_WEIGHT = 3
"""A generated token's compute in prefilled tokens: a car decoding 32 sequences together on
one thread took 2.4-3.4 times as long per token as a prefill of one sequence (greedy, 64-128
new tokens), 4.7 times sampling at temperature 1 (the sampler sorts the vocabulary per token).
The lower figure: verification's overhead is overstated rather than under."""


@dataclass(frozen=True)
class _Model:
    """What the coordinator needs of a chat model: tokenizer, template, limits."""

    tokenizer: Any
    template: Any
    context: int
    vocab: int


@functools.cache
def _model(model: str) -> _Model:
    gguf = GGUFModel(_PATHS[model]())
    return _Model(gguf.tokenizer(), gguf.chat_template(), gguf.config.context, gguf.config.vocab)


_PATHS = {SMOLLM2.id: smollm2_path}
"""Each chat model's GGUF (the catalogue's chat models)."""


@dataclass(frozen=True)
class _Parsed:
    tokens: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int


class ChatWorkload(Workload):
    kind = "chat"
    endpoint = "/v1/chat/completions"

    def canonical_model(self, name: str) -> str | None:
        info = resolve_model(name, self.kind)
        return info.id if info is not None and info.id in _PATHS else None

    def models(self) -> tuple[str, ...]:
        return tuple(_PATHS)

    def plan(self, body: object) -> Planned:
        job = validate_chat_body(body, self.canonical_model)
        model = _model(job.model)
        text = model.template.render([{"role": r, "content": c} for r, c in job.messages])
        prompt = list(model.tokenizer.encode(text, add_special_tokens=False).ids)
        room = model.context - len(prompt)
        wanted = job.max_tokens if job.max_tokens is not None else 1
        if room < wanted:
            raise InvalidRequest(
                f"This model's maximum context length is {model.context} tokens. However, your "
                f"messages resulted in {len(prompt)} tokens"
                + (
                    f" and you asked for {job.max_tokens} completion tokens"
                    if job.max_tokens
                    else ""
                )
                + ". Please reduce the length of the messages or completion.",
                code="context_length_exceeded",
                param="messages",
            )
        max_tokens = job.max_tokens or min(room, DEFAULT_MAX_TOKENS)
        nonce = secrets.token_hex(8)
        payload = {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": job.temperature,
            "top_p": job.top_p,
            "seed": job.seed,
            "stop": list(job.stop),
            # Keys the random stream when there is no seed: the same on every car.
            "nonce": nonce,
        }
        cost = Cost(
            inputs=1,
            input_bytes=len(text.encode("utf-8", "surrogatepass")),
            tokens=len(prompt) + max_tokens,
            compute=len(prompt) + max_tokens,
        )
        # options: the nonce, from which a batch's completion ids are derived (the same on a render
        # again after a crash, different for every request).
        return Planned(model=job.model, payload=payload, options=nonce, cost=cost, job=job)

    # -- results -------------------------------------------------------------------------------
    def expectation(self, payload: Any) -> tuple[int, int] | verify.ProbeLimits:
        """(prompt tokens, max_tokens); of a probe, its answer's entries and tokens read."""
        if verify.is_probe(payload):
            return verify.limits_of(payload)
        return len(payload["prompt"]), int(payload["max_tokens"])

    def check(
        self,
        model: str,
        seqs: Sequence[int],
        expected: Sequence[Any],
        sizes: Sequence[int],
        tokens: Sequence[int],
        data: bytes,
    ) -> str | None:
        if model not in _PATHS:
            return f"model {model} is not a chat model"
        start = 0
        for seq, limits, size, used in zip(seqs, expected, sizes, tokens, strict=True):
            raw = data[start : start + size]
            start += size
            problem = _check_item(_model(model), raw, limits, used)
            if problem:
                return f"request {seq}: {problem}"
        return None

    def check_progress(
        self,
        model: str,
        seqs: Sequence[int],
        expected: Sequence[Any],
        sizes: Sequence[int],
        data: bytes,
    ) -> str | None:
        """Progress is ``{"tokens": [ids]}``: the generation so far, within its budget."""
        if model not in _PATHS:
            return f"model {model} is not a chat model"
        vocab = _model(model).vocab
        start = 0
        for seq, limits, size in zip(seqs, expected, sizes, strict=True):
            raw = data[start : start + size]
            start += size
            if isinstance(limits, verify.ProbeLimits):
                return f"request {seq}: a probe reports no progress"
            try:
                value = json.loads(raw)
            except (ValueError, RecursionError):
                return f"request {seq}: progress is not JSON"
            tokens = (
                value.get("tokens")
                if isinstance(value, dict) and set(value) == {"tokens"}
                else None
            )
            if not isinstance(tokens, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in tokens
            ):
                return f'request {seq}: progress must be {{"tokens": [ids of the vocabulary]}}'
            if limits is not None and len(tokens) > limits[1]:
                return f"request {seq}: {len(tokens)} tokens of progress, max_tokens is {limits[1]}"
        return None

    # -- verification --------------------------------------------------------------------------
    def work(self, payload: Any, result: bytes) -> int:
        """In prefilled tokens (a probe's unit: it reads prompt + completion in one prefill):
        the prompt's, and ``DECODE_WEIGHT`` for each token of the completion."""
        parsed = _parse(result)
        prompt = payload.get("prompt") if isinstance(payload, dict) else None
        made = 0 if isinstance(parsed, str) else len(parsed.tokens)
        return (len(prompt) if isinstance(prompt, list) else 0) + DECODE_WEIGHT * made

    def probe(self, payload: Any, result: bytes, pick: int) -> Probe:
        """The whole completion, to be re-read (``verify.py``); ``pick`` is not needed."""
        parsed = _parse(result)
        if isinstance(parsed, str):
            raise ValueError(f"a probe needs a finished chat request: {parsed}")
        return verify.make_probe(payload, result, parsed.tokens, parsed.finish_reason)

    def agree(
        self, model: str, probe: Any, reference: bytes, answer: bytes, same_class: bool
    ) -> bool:
        if model not in _PATHS:
            return False
        tokenizer = _model(model).tokenizer
        return verify.agree(tokenizer, probe, reference, answer, same_class, _parse)

    # -- responses -----------------------------------------------------------------------------
    def render_batch(self, requests: Sequence[StoredRequest]) -> Mapping[int, bytes]:
        created = int(time.time())
        bodies: dict[int, bytes] = {}
        for req in requests:
            if req.state != "done" or req.result is None:
                continue
            parsed = _parse(req.result)
            if isinstance(parsed, str):
                continue  # checked at commit: cannot happen
            completion_id = "chatcmpl-" + derived_id("", req.options, req.seq)[:24]
            bodies[req.seq] = orjson.dumps(_completion(completion_id, created, req.model, parsed))
        return bodies

    def usage(self, result: bytes, tokens: int) -> tuple[int, int]:
        parsed = _parse(result)
        if isinstance(parsed, str):
            raise ValueError(parsed)
        return parsed.prompt_tokens, len(parsed.tokens)

    def render_online(self, planned: Planned, result: bytes, tokens: int) -> dict[str, Any]:
        parsed = _parse(result)
        if isinstance(parsed, str):
            raise ValueError(parsed)
        job: ChatJob = planned.job
        completion_id = "chatcmpl-" + derived_id("", job.model, time.time_ns())[:24]
        return _completion(completion_id, int(time.time()), job.model, parsed)

    def stream_online(self, planned: Planned) -> OnlineStream | None:
        from idlefleet.workloads.chat.stream import ChatStream

        job: ChatJob = planned.job
        if not job.stream:
            return None
        completion_id = "chatcmpl-" + derived_id("", planned.options, time.time_ns())[:24]
        return ChatStream(
            completion_id,
            job.model,
            _model(job.model).tokenizer,
            job.stop,
            job.include_usage,
            _parse,
        )

    # -- the car -------------------------------------------------------------------------------
    def model_files(self, model: str) -> dict[str, Path]:
        path = _PATHS[model]()
        return {path.name: path}

    def provision(self, model: str, cache_dir: Path, source: Path | None = None) -> None:
        from idlefleet.models.cache import ensure_llama

        ensure_llama(cache_dir, model, self._gguf(model, source))

    def _gguf(self, model: str, source: Path | None) -> Path:
        if source is None:
            return _PATHS[model]()
        (name,) = self.model_files(model)  # a release holds the GGUF under its package name
        return source / name

    def runner(
        self, model: str, cache_dir: Path, threads: int, source: Path | None = None
    ) -> UnitRunner:
        import onnxruntime as ort

        from idlefleet.models.cache import ModelCache, ensure_llama
        from idlefleet.workloads.chat.runner import ChatRunner

        path = self._gguf(model, source)
        sha, _ = ensure_llama(cache_dir, model, path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The bytes just hashed, not the path: the session runs the graph whose sha256 we know.
        session = ort.InferenceSession(
            ModelCache(cache_dir).get(sha), options, providers=["CPUExecutionProvider"]
        )
        gguf = GGUFModel(path)
        return ChatRunner(
            model,
            session,
            gguf.config,
            gguf.tokenizer(),
            frozenset({gguf.eos_id}),
            slots=DEFAULT_SLOTS,
        )


def encode_result(
    tokens: Sequence[int], text: str, finish_reason: str, prompt_tokens: int
) -> bytes:
    """A finished generation as the car sends it (what ``check`` reads)."""
    return json.dumps(
        {
            "tokens": list(tokens),
            "text": text,
            "finish_reason": finish_reason,
            "prompt_tokens": prompt_tokens,
        },
        ensure_ascii=False,
    ).encode("utf-8")


def _parse(raw: bytes) -> _Parsed | str:
    """The result, or why it is not one."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return "result is not JSON"
    if not isinstance(value, dict) or set(value) != {
        "tokens",
        "text",
        "finish_reason",
        "prompt_tokens",
    }:
        return "result must be an object of tokens, text, finish_reason and prompt_tokens"
    tokens, text = value["tokens"], value["text"]
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in tokens
    ):
        return "tokens must be a list of integers"
    if not isinstance(text, str):
        return "text must be a string"
    if value["finish_reason"] not in FINISH_REASONS:
        return f"finish_reason must be one of {', '.join(FINISH_REASONS)}"
    prompt = value["prompt_tokens"]
    if not isinstance(prompt, int) or isinstance(prompt, bool):
        return "prompt_tokens must be an integer"
    return _Parsed(tokens, text, value["finish_reason"], prompt)


def _check_item(model: _Model, raw: bytes, limits: Any, used: int) -> str | None:
    """Why ``raw`` cannot be the result of a request (or the answer to a probe) with these
    limits (None: not known here, either may be), or None."""
    if isinstance(limits, verify.ProbeLimits):
        return verify.check_answer(limits, raw, used)
    parsed = _parse(raw)
    if isinstance(parsed, str):
        if limits is None and verify.check_answer(None, raw, used) is None:
            return None
        return parsed
    return _check_one(model, parsed, limits, used)


def _check_one(model: _Model, parsed: _Parsed, limits: Any, used: int) -> str | None:
    if limits is not None:
        prompt_tokens, max_tokens = limits
        if parsed.prompt_tokens != prompt_tokens:
            return f"prompt_tokens {parsed.prompt_tokens}, the prompt has {prompt_tokens}"
        if len(parsed.tokens) > max_tokens:
            return f"{len(parsed.tokens)} tokens, max_tokens is {max_tokens}"
        if parsed.finish_reason == "length" and len(parsed.tokens) != max_tokens:
            return f"finish_reason length after {len(parsed.tokens)} of {max_tokens} tokens"
    if any(not 0 <= t < model.vocab for t in parsed.tokens):
        return "a token id outside the vocabulary"
    if used != parsed.prompt_tokens + len(parsed.tokens):
        return f"reports {used} tokens for {parsed.prompt_tokens} + {len(parsed.tokens)}"
    decoded = model.tokenizer.decode(parsed.tokens)
    if parsed.text != decoded and not (
        parsed.finish_reason == "stop" and decoded.startswith(parsed.text)
    ):
        return "text is not what the tokens decode to"
    return None


def _completion(completion_id: str, created: int, model: str, parsed: _Parsed) -> dict[str, Any]:
    """OpenAI's ``chat.completion`` object."""
    completion = len(parsed.tokens)
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": parsed.text, "refusal": None},
                "logprobs": None,
                "finish_reason": parsed.finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": parsed.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": parsed.prompt_tokens + completion,
        },
        "system_fingerprint": None,
    }


CHAT = ChatWorkload()
