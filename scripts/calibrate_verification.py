"""Calibrate the embeddings workload's verification tolerances on real texts and real graphs.

Verification re-runs a finished request on another car and compares the two cars' vectors of
each input by cosine (``workloads.embeddings``: ``SAME_CLASS_MIN_COSINE`` between cars of one
hardware class, ``CROSS_CLASS_MIN_COSINE`` between classes). This script measures, on a corpus
of texts that ship with the repository (the MiniLM reference inputs: short, long, multilingual,
emoji, code; and the headings, sentences and paragraphs of the README, the docs and the
package's docstrings), the cosine between the car's vector of an input (computed in a batch of
32 shuffled inputs padded to its longest, on two threads) and:

- honest, same class: the input embedded alone on one thread (the verifier batches otherwise);
  and alone through the unoptimised graph, whose other kernels stand in for another CPU's;
- honest, other class: the fp16 graph (weights rounded to float16; ``--precision fp16``) alone;
- for reference, classes this machine cannot run: the fp32 graph with every operator's output
  rounded to float16 or to bfloat16 (an emulation of a GPU computing at that precision);
- cheats: the first 3 of MiniLM's 6 layers (``models.minilm.build_truncated_minilm``), a random
  unit vector, another input's vector, the vector with a few components replaced by random
  values of their typical size, and the vector truncated and zero-padded, re-normalised.

It prints, per comparison, the minimum, percentiles and maximum of the cosine, the largest
``1 - cosine``, and how many pass each tolerance in force; ``--json FILE`` writes them. About
8 minutes on 2 cores. The corpus follows the repository's text, so another commit gives
slightly other figures.

    .venv/bin/python scripts/calibrate_verification.py --json /tmp/calibration.json
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from idlefleet.agent.runtime import RUNTIME, load_tokenizer
from idlefleet.models.cache import ModelCache, ensure_minilm
from idlefleet.models.minilm import EMBEDDING_DIM, build_truncated_minilm, default_model_dir
from idlefleet.workloads.embeddings import CROSS_CLASS_MIN_COSINE, SAME_CLASS_MIN_COSINE

ROOT = Path(__file__).resolve().parents[1]
BATCH = 32
PERCENTILES = (0.1, 1, 5, 50, 95, 99)


def corpus(limit: int, seed: int) -> list[str]:
    """Varied texts from the repository: the reference inputs, then the prose of the README,
    the docs and the package's docstrings as headings, sentences and whole paragraphs;
    deduplicated, ``limit`` of them."""
    reference = json.loads((ROOT / "tests" / "data" / "minilm_reference.json").read_text())
    texts: list[str] = list(reference["inputs"])
    documents = [
        re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.DOTALL)
        for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    ]
    for module in sorted((ROOT / "src" / "idlefleet").rglob("*.py")):
        tree = ast.parse(module.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                documents.append(ast.get_docstring(node) or "")
    prose: list[str] = []
    for text in documents:
        for block in re.split(r"\n\s*\n", text):
            lines = [ln for ln in block.splitlines() if not ln.lstrip().startswith("|")]
            paragraph = " ".join(ln.strip().lstrip("#-* ").strip() for ln in lines).strip()
            if len(paragraph) < 3:
                continue
            prose.append(paragraph)
            prose.extend(s for s in re.split(r"(?<=[.!?])\s+", paragraph) if len(s) > 2)
    rng = np.random.default_rng(seed)
    rng.shuffle(prose)
    texts.extend(prose)
    return list(dict.fromkeys(texts))[:limit]


def session(model: bytes, threads: int, optimise: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimise
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def round_activations(model: onnx.ModelProto, to: int) -> bytes:
    """The graph with every float tensor a node makes rounded to ``to`` (FLOAT16, BFLOAT16)
    and back: a CPU emulation of a runtime that stores activations at that precision."""
    inferred = onnx.shape_inference.infer_shapes(model)
    floats = {
        v.name
        for v in [*inferred.graph.value_info, *inferred.graph.output]
        if v.type.tensor_type.elem_type == TensorProto.FLOAT
    }
    nodes = []
    for node in inferred.graph.node:
        nodes.append(node)
        for i, name in enumerate(node.output):
            if name in floats:
                node.output[i] = f"{name}/exact"
                nodes.append(helper.make_node("Cast", [f"{name}/exact"], [f"{name}/low"], to=to))
                nodes.append(helper.make_node("Cast", [f"{name}/low"], [name], to=1))
    del inferred.graph.node[:]
    inferred.graph.node.extend(nodes)
    del inferred.graph.value_info[:]
    return inferred.SerializeToString()


class Embed:
    """Vectors of texts through one session, in batches of ``batch`` in the given order
    (padded to each batch's longest: the car's worst case), or one by one."""

    def __init__(self, sess: ort.InferenceSession, tokenizer: Any) -> None:
        self.sess = sess
        self.tokenizer = tokenizer

    def __call__(self, texts: Sequence[str], batch: int = 1) -> np.ndarray:
        out = []
        for start in range(0, len(texts), batch):
            encodings = self.tokenizer.encode_batch(list(texts[start : start + batch]))
            feed = {
                "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            }
            out.append(self.sess.run(["sentence_embedding"], feed)[0])
        return np.concatenate(out).astype(np.float64)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def perturbed(v: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` components of each row replaced by random values of a component's typical size."""
    out = v.copy()
    for row in out:
        row[rng.choice(EMBEDDING_DIM, k, replace=False)] = rng.normal(0, EMBEDDING_DIM**-0.5, k)
    return unit(out)


def truncated(v: np.ndarray, keep: int) -> np.ndarray:
    out = v.copy()
    out[:, keep:] = 0
    return unit(out)


def summary(c: np.ndarray) -> dict[str, Any]:
    gap = 1.0 - c
    return {
        "n": len(c),
        "min": float(c.min()),
        **{f"p{p:g}": float(np.percentile(c, p)) for p in PERCENTILES},
        "max": float(c.max()),
        "max_1_minus_cos": float(gap.max()),
        "median_1_minus_cos": float(np.median(gap)),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--limit", type=int, default=1000, help="texts in the corpus")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--cache-dir", type=Path, help="model cache (default: a temporary one)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    texts = corpus(args.limit, args.seed)
    rng = np.random.default_rng(args.seed)
    model_dir = default_model_dir()
    tokenizer = load_tokenizer(model_dir)
    lengths = [sum(e.attention_mask) for e in tokenizer.encode_batch(texts)]
    print(
        f"corpus: {len(texts)} texts, {min(lengths)}-{max(lengths)} tokens "
        f"(median {int(np.median(lengths))}); {RUNTIME}, CPUExecutionProvider"
    )

    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or Path(tmp)
        fp32, fp16 = (
            ModelCache(cache).get(ensure_minilm(cache, model_dir, p)[0]) for p in ("fp32", "fp16")
        )

        def alone(graph: bytes, optimise: bool = True) -> Callable[[], np.ndarray]:
            """Each text embedded alone on one thread, as a verifier runs a probe."""
            return lambda: Embed(session(graph, 1, optimise), tokenizer)(texts)

        # The car: shuffled batches of 32, each padded to its longest input, on two threads.
        order = rng.permutation(len(texts))
        car = np.empty((len(texts), EMBEDDING_DIM))
        car[order] = Embed(session(fp32, 2), tokenizer)([texts[i] for i in order], BATCH)
        emulated = onnx.load_from_string(fp32)

        answers: dict[str, Callable[[], np.ndarray]] = {
            "same class: fp32 alone, 1 thread": alone(fp32),
            "same class, other kernels: unfused graph alone": alone(fp32, optimise=False),
            "other class: fp16 weights alone": alone(fp16),
            "emulated: fp16 activations alone": alone(
                round_activations(emulated, TensorProto.FLOAT16), optimise=False
            ),
            "emulated: bf16 activations alone": alone(
                round_activations(emulated, TensorProto.BFLOAT16), optimise=False
            ),
            "cheat: first 3 of 6 layers": alone(build_truncated_minilm(model_dir, 3)),
            "cheat: random unit vector": lambda: unit(
                rng.standard_normal((len(texts), EMBEDDING_DIM))
            ),
            "cheat: another input's vector": lambda: car[
                (np.arange(len(texts)) + rng.integers(1, len(texts), len(texts))) % len(texts)
            ],
            **{
                f"cheat: {k} of 384 components replaced": partial(perturbed, car, k, rng)
                for k in (1, 4, 16)
            },
            **{
                f"cheat: first {keep} components, rest zero": partial(truncated, car, keep)
                for keep in (352, 192)
            },
        }
        figures = {}
        for name, answer in answers.items():
            took = time.perf_counter()
            c = cosines(car, answer())
            print(f"  {name}: {time.perf_counter() - took:.1f} s", flush=True)
            figures[name] = {
                **summary(c),
                "accepted_same_class": float(np.mean(c >= SAME_CLASS_MIN_COSINE)),
                "accepted_cross_class": float(np.mean(c >= CROSS_CLASS_MIN_COSINE)),
            }

    tolerances = {
        "SAME_CLASS_MIN_COSINE": SAME_CLASS_MIN_COSINE,
        "CROSS_CLASS_MIN_COSINE": CROSS_CLASS_MIN_COSINE,
    }
    width = max(len(n) for n in figures)
    print(f"\ncosine to the car's vector (batch of {BATCH}, 2 threads), {len(texts)} texts")
    print(
        f"{'':{width}}  {'min':>10} {'p1':>10} {'p50':>10} {'max':>10}  {'max 1-cos':>9}"
        "  accepted: same / cross class"
    )
    for name, f in figures.items():
        print(
            f"{name:{width}}  {f['min']:10.7f} {f['p1']:10.7f} {f['p50']:10.7f} {f['max']:10.7f}"
            f"  {f['max_1_minus_cos']:9.1e}"
            f"  {f['accepted_same_class']:6.1%} / {f['accepted_cross_class']:6.1%}"
        )
    print(f"\nin force: {tolerances}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "runtime": RUNTIME,
                    "texts": len(texts),
                    "batch": BATCH,
                    "seed": args.seed,
                    "tolerances": tolerances,
                    "cosine": figures,
                },
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
    print(f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
