"""Verification of chat completions (issue #13): teacher-forced re-scoring on another car.

Sampled text is never compared: two honest cars' generations part at the first token their
numbers disagree on. Another car re-reads the completion the first car returned instead, in
one prefill of prompt + completion (``idlefleet.llm.scoring``), and says for every token how
far the request's own random draw for that position fell from it in its model's distribution:
the token's *miss* (``idlefleet.llm.sampling.miss``). The draw is a function of the request
alone (seed or nonce, and position), so an honest token misses by nothing within a hardware
class (but for float noise) and by about as much as two cars' distributions differ across
classes; a token that model would not have drawn there (another model's, another prompt's, a
random one) misses by about the probability between them.

Why not ranks (is the token in the verifier's top-k)? An honest sampled token may rank far
down: of 16,180 tokens generated at 128 at most and re-read, 20.7% of those sampled at
temperature 1 (top_p 1) ranked 16th or lower, one 11,377th; at 0.7, 2.4% (921st at worst); at
1 with top_p 0.9, 10% (728th); greedy, all first. Per completion at temperature 1, up to 41% of
the tokens ranked 16th or lower, while a model of half the layers sampling the same requests
had 18-33%: it looks more honest by rank than the model itself. The draw tells them apart, at
any temperature.

- probe: the request's payload (every field as sent) plus ``"completion": [ids]`` and
  ``"finish_reason"`` from the result. ``pick`` is not used: a part of a completion costs its
  whole prefix anyway, and a completion cut short shows only at its end. ``reference``: the
  result as committed; ``work``: the tokens the prefill reads (prompt + completion).
- answer: UTF-8 JSON ``{"misses": [...], "logprobs": [...]}``, one entry per completion token
  and, after ``stop``, one more for the end-of-text token after the last. Misses: sampled, in
  probability (0 to 1); greedy, the top logit minus the token's; rounded to 1e-6. Logprobs: the
  token's log-probability at temperature 1, rounded to 1e-4: work only a car that ran the model
  can do, so that two answers can be compared (a tie-break between verifiers), where a car that
  answers zeros without running anything fails. Against a result alone such an answer passes:
  a canary catches it only if its reference is an answer two cars agreed on, not the result.
- agree, against a result: at most ``allowed + share x n`` of its n tokens miss by more than
  the tolerance, and the end of text (if it ended there) not at all (:data:`SAME_CLASS`,
  :data:`CROSS_CLASS`); a stop-string end where the runner would have ended, at the first
  token whose text completes one. Against another answer (a tie-break): the same entries, their
  logprobs and misses as close as two verifiers' (:data:`SAME_CLASS_ANSWERS`,
  :data:`CROSS_CLASS_ANSWERS`).

Measured on SmolLM2-135M-Instruct (the fp32 ONNX graph on CPU), 24 prompts, 128 new tokens at
most, at temperature 0, 0.7 and 1 with top_p 1 and 0.9 (and 2); cheats made of those: random
tokens, another prompt's completion, a completion cut in half claiming ``stop``, a sample at
temperature 2, a model of half the layers, a model whose weights carry 10% noise, the right
model with another random stream. See the constants for the figures.

Cost: re-reading is cheaper than generating, not by orders of magnitude on a CPU car, where
decoding 32 sequences together is matrix work too (TOPLOC's "100x" is a GPU's, whose decoding
is bound by memory). 32 requests of 64-128 new tokens, one thread (on a 2-core machine shared
with other work): the probes took 0.49-0.65 of the generations' time greedy (4 runs) and
0.39-0.40 sampled at temperature 1 (2 runs: the engine's sampler sorts the vocabulary for
every token), a bare prefill 0.39-0.53 and 0.30-0.31; the logits of every completion position
and the misses add 24-32% to the prefill. The coordinator's probe rate sets the overhead;
``Probe.work`` and ``ChatWorkload.work`` count prefilled tokens, so that its figures are
shares of compute.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from idlefleet.workloads.base import Probe

__all__ = [
    "BYTES_PER_ENTRY",
    "CROSS_CLASS",
    "CROSS_CLASS_ANSWERS",
    "SAME_CLASS",
    "SAME_CLASS_ANSWERS",
    "Answer",
    "ProbeLimits",
    "Tolerance",
    "agree",
    "check_answer",
    "encode_answer",
    "is_probe",
    "limits_of",
    "make_probe",
    "parse_answer",
]


@dataclass(frozen=True)
class Tolerance:
    """How far apart two things may be and still agree, per entry: a sampled token's miss (or
    the difference of two answers' misses) in probability, a greedy one's in logits, and (two
    answers only) their logprobs. At most ``allowed + share x n`` of n tokens may be farther;
    the end of text never."""

    miss: float
    gap: float
    share: float = 0.0
    allowed: int = 0
    logprob: float = 0.0


SAME_CLASS = Tolerance(miss=1e-3, gap=0.01)
"""A result against an answer of one hardware class: every token and the end as the answer's
model would have chosen them. Measured: 16,346 honest tokens (144 completions at temperature
0, 0.7, 1, 2) re-read on the same graph: every greedy gap 0, every sampled miss at most 9.1e-5
(a prefill and a batched decode sum in another order): all agreed. All 694 cheats refused:
each had a token or its end missing by 0.0055 or more (greedy: 3.8 logits or more)."""
CROSS_CLASS = Tolerance(miss=0.02, gap=0.1, share=0.05, allowed=1)
"""Across classes. Measured with the weights rounded to fp16 and to bf16 (relative errors
≤ 4.9e-4 and ≤ 3.9e-3: stand-ins for other precisions) generating, re-read by the fp32 graph
(120 completions, 10,030 tokens): at most 1.0% (fp16) and 4.2% (bf16) of a completion's
sampled tokens missed by more than 0.02, the largest by 0.36; greedy gaps at most 0.017; every
end within 0.009. All agreed, and the 144 honest fp32 ones. Refused: all 480 random,
other-prompt, temperature-2, half-model and noisy-model completions (the closest: 8 of another
prompt's 128 tokens missed, 7 allowed); 115 of 118 cut short claiming ``stop`` (3 were cut
where the end of text was within 0.02 of the draw); 95 of 96 from another random stream."""
SAME_CLASS_ANSWERS = Tolerance(miss=1e-3, gap=1e-3, logprob=1e-3)
"""Two answers of one class: the same computation (a thread count may change the last bits)."""
CROSS_CLASS_ANSWERS = Tolerance(miss=0.1, gap=0.25, share=0.05, allowed=1, logprob=0.25)
"""Two answers across classes. Measured (72 completions, honest and cheats, re-read by the
fp32, fp16 and bf16 graphs): logprobs at most 0.092 apart; misses more than 0.1 apart at 4.3%
of a completion's tokens at most, greedy gaps at most 0.098 apart. An answer of zeros is far
off: half the honest logprobs are below -1.06."""

BYTES_PER_ENTRY = 24
"""An answer's bytes per entry at most: a miss (≤ 9 characters, e.g. ``12.345678``), a logprob
(≤ 9: ``-123.4567``) and two commas."""


@dataclass(frozen=True)
class ProbeLimits:
    """What checking an answer needs to know of its probe (its ``expectation``)."""

    entries: int
    """Completion tokens, plus one for the end after ``stop``."""
    tokens: int
    """Tokens the prefill reads (what the car reports): prompt + completion."""


@dataclass(frozen=True)
class Answer:
    misses: list[float]
    logprobs: list[float]


def is_probe(payload: Any) -> bool:
    return isinstance(payload, dict) and "completion" in payload


def make_probe(payload: Any, result: bytes, tokens: Sequence[int], finish_reason: str) -> Probe:
    """The probe of a finished request: its payload, its committed ``result`` and the tokens
    and finish reason read from it."""
    prompt = payload.get("prompt") if isinstance(payload, dict) else None
    if not isinstance(prompt, list) or not prompt or is_probe(payload):
        raise ValueError("a probe needs a finished chat request")
    probe_payload = {**payload, "completion": list(tokens), "finish_reason": finish_reason}
    return Probe(probe_payload, result, len(prompt) + len(tokens))


def limits_of(probe: Any) -> ProbeLimits:
    completion = probe["completion"]
    end = 1 if probe.get("finish_reason") == "stop" else 0
    return ProbeLimits(len(completion) + end, len(probe["prompt"]) + len(completion))


def encode_answer(misses: Sequence[float], logprobs: Sequence[float]) -> bytes:
    """An answer as the verifying car sends it (what ``check_answer`` and ``agree`` read)."""
    return json.dumps(
        {
            "misses": [round(float(m), 6) for m in misses],
            "logprobs": [round(float(lp), 4) for lp in logprobs],
        },
        separators=(",", ":"),
    ).encode("ascii")


def parse_answer(raw: bytes) -> Answer | str:
    """The answer, or why it is not one."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return "answer is not JSON"
    if not isinstance(value, dict) or set(value) != {"misses", "logprobs"}:
        return "an answer must be an object of misses and logprobs"
    misses, logprobs = value["misses"], value["logprobs"]
    if not _finite(misses) or not _finite(logprobs):
        return "misses and logprobs must be lists of finite numbers"
    if any(m < 0 for m in misses) or any(lp > 0 for lp in logprobs):
        return "misses must be at least 0 and logprobs at most 0"
    if len(misses) != len(logprobs):
        return f"{len(misses)} misses for {len(logprobs)} logprobs"
    return Answer([float(m) for m in misses], [float(lp) for lp in logprobs])


def check_answer(limits: ProbeLimits | None, raw: bytes, used: int) -> str | None:
    """Why ``raw`` cannot be an answer to a probe of these limits (None: not known), or None."""
    answer = parse_answer(raw)
    if isinstance(answer, str):
        return answer
    if limits is None:
        return None
    if len(answer.misses) != limits.entries:
        return f"{len(answer.misses)} entries, the probe has {limits.entries}"
    if used != limits.tokens:
        return f"reports {used} tokens, the probe reads {limits.tokens}"
    return None


def agree(
    tokenizer: Any,
    probe: Any,
    reference: bytes,
    answer: bytes,
    same_class: bool,
    parse_result: Callable[[bytes], Any],
) -> bool:
    """Whether ``answer`` confirms ``reference``: a committed result (``parse_result`` reads
    it: tokens and finish reason) or another car's answer to the same probe."""
    if not is_probe(probe):
        return False
    given = parse_answer(answer)
    if isinstance(given, str) or len(given.misses) != limits_of(probe).entries:
        return False
    greedy = float(probe.get("temperature", 1.0)) == 0.0
    other = parse_answer(reference)
    if not isinstance(other, str):
        tolerance = SAME_CLASS_ANSWERS if same_class else CROSS_CLASS_ANSWERS
        return _answers_agree(other, given, tolerance, greedy)
    result = parse_result(reference)
    if isinstance(result, str) or (result.tokens, result.finish_reason) != (
        probe["completion"],
        probe["finish_reason"],
    ):
        return False
    tolerance = SAME_CLASS if same_class else CROSS_CLASS
    bound = tolerance.gap if greedy else tolerance.miss
    n = len(result.tokens)
    if result.finish_reason == "stop":
        ended_on = _stop_string_end(tokenizer, result.tokens, probe.get("stop") or [])
        if ended_on is False:
            return False  # a stop string claimed past where the runner would have ended
        if ended_on is None and given.misses[n] > bound:
            return False  # an end of text the model would not have drawn there
    missed = sum(m > bound for m in given.misses[:n])
    return missed <= tolerance.allowed + tolerance.share * n


def _stop_string_end(tokenizer: Any, tokens: Sequence[int], stops: Sequence[str]) -> bool | None:
    """None: no stop string in the completion's text (it ended on the end of text); True: the
    last token completes the first one, as the runner ends; False: one was complete before the
    last token (the runner would have ended there)."""
    if not stops or not any(s in tokenizer.decode(list(tokens)) for s in stops):
        return None
    return not any(s in tokenizer.decode(list(tokens[:-1])) for s in stops)


def _answers_agree(a: Answer, b: Answer, tolerance: Tolerance, greedy: bool) -> bool:
    if len(a.misses) != len(b.misses):
        return False
    if any(abs(x - y) > tolerance.logprob for x, y in zip(a.logprobs, b.logprobs, strict=True)):
        return False
    bound = tolerance.gap if greedy else tolerance.miss
    apart = sum(abs(x - y) > bound for x, y in zip(a.misses, b.misses, strict=True))
    return apart <= tolerance.allowed + tolerance.share * len(a.misses)


def _finite(values: Any) -> bool:
    return isinstance(values, list) and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values
    )
