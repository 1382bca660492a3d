"""Run the MiniLM sentence-embedding model on an agent: tokenizer plus ONNX Runtime session.

An `Embedder` turns texts into L2-normalised 384-d vectors that match sentence-transformers'
`all-MiniLM-L6-v2`. Inputs are sorted by token length and run in micro-batches, so each batch is
padded only to its own longest member; results are put back in input order. Running batch by
batch also gives a caller (the work-unit loop, when a lease is revoked or the car is about to
drive off) two places to stop: between batches, and inside a batch via ONNX Runtime's
`RunOptions.terminate`. Either way the caller sees our `InferenceCancelled`, never an ORT error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from idlefleet.models import minilm
from idlefleet.models.cache import ModelCache, ensure_minilm

__all__ = [
    "DEFAULT_MICRO_BATCH",
    "RUNTIME",
    "EmbedResult",
    "Embedder",
    "InferenceCancelled",
    "load_tokenizer",
]

RUNTIME = f"onnxruntime {ort.__version__}"
"""The inference runtime and its version, as a car reports it (``Hardware.runtime``)."""
DEFAULT_MICRO_BATCH = 32
DEFAULT_MAX_BATCH_TOKENS = 2048
"""Padded tokens per micro-batch. ONNX Runtime can stop a run only between graph nodes, and a
node's time grows with the batch's tokens: 32 inputs of 256 tokens made single nodes of up to
300 ms, too slow to stop a run when the driver comes back. Capping the tokens keeps each node
short; long inputs lose nothing by it (they ran no faster per input in batches of 32)."""


class InferenceCancelled(Exception):
    """The caller asked (through `RunOptions.terminate`) for the embedding run to stop.

    ``done`` marks the texts whose vectors were finished before the stop; their rows in
    ``partial`` are valid (the others are not), so a caller can still keep that work.
    """

    def __init__(
        self, message: str, partial: EmbedResult | None = None, done: np.ndarray | None = None
    ) -> None:
        super().__init__(message)
        self.partial = partial
        self.done = done


@dataclass(frozen=True)
class EmbedResult:
    """Embeddings for one `Embedder.embed` call, in the order the texts were given."""

    vectors: np.ndarray  # float32 [n, EMBEDDING_DIM], each row L2-normalised
    token_counts: list[int]  # tokens per text after truncation, including [CLS] and [SEP]


def load_tokenizer(model_dir: Path) -> Tokenizer:
    """The model's WordPiece tokenizer, configured as sentence-transformers uses it."""
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    # tokenizer.json ships with fixed padding and truncation at 128; sentence-transformers pads
    # to the longest input and truncates at 256 (see FIELD-NOTES: ~13x throughput, and long
    # inputs would otherwise differ from the reference).
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    tokenizer.enable_truncation(minilm.MAX_SEQ_LENGTH)
    return tokenizer


class Embedder:
    """Sentence embeddings with all-MiniLM-L6-v2 on ONNX Runtime (CPU)."""

    def __init__(
        self,
        session: ort.InferenceSession,
        tokenizer: Tokenizer,
        *,
        model_sha256: str,
        precision: str = "fp32",
        micro_batch: int = DEFAULT_MICRO_BATCH,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    ) -> None:
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        padding = tokenizer.padding
        # Each micro-batch is padded by the tokenizer itself, so it must pad to the batch's
        # longest input and on the right: the graph numbers positions 0..S-1 whatever the mask
        # says, so left padding would shift every real token's position embedding.
        if padding is None or padding["length"] is not None or padding["direction"] != "right":
            raise ValueError(f"tokenizer must pad right to the longest input, got {padding}")
        self._session = session
        self._tokenizer = tokenizer
        # An unpadded twin for counting and sorting: encoding a whole call with padding would
        # hold n x longest tokens in memory; this holds only the real ones.
        self._counter = Tokenizer.from_str(tokenizer.to_str())
        self._counter.no_padding()
        self.model_sha256 = model_sha256
        self.precision = precision
        """What the graph's weights are stored at (``minilm.PRECISIONS``)."""
        self.micro_batch = micro_batch
        self.max_batch_tokens = max_batch_tokens

    @classmethod
    def load(
        cls,
        cache_root: Path,
        threads: int = 1,
        *,
        micro_batch: int = DEFAULT_MICRO_BATCH,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        model_dir: Path | None = None,
        precision: str = "fp32",
    ) -> Embedder:
        """Build or reuse the cached graph under `cache_root`, its weights at ``precision``
        (``minilm.PRECISIONS``), and open a session on it."""
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        model_dir = minilm.default_model_dir() if model_dir is None else Path(model_dir)
        sha, _ = ensure_minilm(cache_root, model_dir, precision)
        # Load the bytes we have just hashed rather than the path, so the session is certain
        # to run the graph whose sha256 we report.
        model_bytes = ModelCache(cache_root).get(sha)

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # The graph is a single chain of ops: inter-op parallelism would only add threads.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        return cls(
            session,
            load_tokenizer(model_dir),
            model_sha256=sha,
            precision=precision,
            micro_batch=micro_batch,
            max_batch_tokens=max_batch_tokens,
        )

    @property
    def provider(self) -> str:
        """The execution provider the session runs on (``Hardware.provider``): the one ORT
        chose, which is not always the one asked for."""
        return str(self._session.get_providers()[0])

    def _encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Model inputs for one micro-batch, padded to its longest text."""
        encodings = self._tokenizer.encode_batch(texts)
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        }

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens each text becomes after truncation, including [CLS] and [SEP]."""
        return [len(e.ids) for e in self._counter.encode_batch(list(texts))]

    def embed(
        self,
        texts: Sequence[str],
        run_options: ort.RunOptions | None = None,
        token_counts: Sequence[int] | None = None,
    ) -> EmbedResult:
        """Embed `texts`; set `run_options.terminate = True` from any thread to cancel.

        ``token_counts`` (from `count_tokens`) saves counting again; tokenising is the one
        part of a run that cannot be interrupted, so a caller that has counted should pass it.
        Raises `InferenceCancelled` if the run is terminated, before or during any micro-batch.
        """
        if isinstance(texts, str):
            # A bare string is a Sequence[str] of characters; embedding each letter is never
            # what the caller meant.
            raise TypeError("embed() takes a sequence of texts, not a single str")
        texts = list(texts)
        if token_counts is not None and len(token_counts) != len(texts):
            raise ValueError("token_counts must have one entry per text")
        counts = list(token_counts) if token_counts is not None else self.count_tokens(texts)
        # Stable sort, so equal-length texts keep their relative order and results are
        # reproducible batch for batch.
        order = np.argsort(np.asarray(counts, dtype=np.int64), kind="stable")
        vectors = np.zeros((len(texts), minilm.EMBEDDING_DIM), dtype=np.float32)
        done = np.zeros(len(texts), dtype=bool)

        for batch_slice in self.micro_batches([counts[i] for i in order]):
            rows = order[batch_slice]
            if run_options is not None and run_options.terminate:
                raise InferenceCancelled(
                    "embedding cancelled between micro-batches", EmbedResult(vectors, counts), done
                )
            feed = self._encode([texts[i] for i in rows])
            try:
                (batch,) = self._session.run(["sentence_embedding"], feed, run_options)
            except Exception as exc:
                # ORT signals termination with a generic runtime error; the flag, not the
                # message text, is what tells a cancellation apart from a real failure.
                if run_options is not None and run_options.terminate:
                    raise InferenceCancelled(
                        "embedding cancelled during a micro-batch",
                        EmbedResult(vectors, counts),
                        done,
                    ) from exc
                raise
            vectors[rows] = batch
            done[rows] = True

        return EmbedResult(vectors, counts)

    def micro_batches(self, sorted_counts: Sequence[int]) -> list[slice]:
        """Split texts sorted by token count into runs of at most ``micro_batch`` texts and
        ``max_batch_tokens`` padded tokens (a text longer than the budget runs alone)."""
        batches = []
        start = 0
        while start < len(sorted_counts):
            end = start + 1
            while (
                end < len(sorted_counts)
                and end - start < self.micro_batch
                and sorted_counts[end] * (end - start + 1) <= self.max_batch_tokens
            ):
                end += 1
            batches.append(slice(start, end))
            start = end
        return batches
