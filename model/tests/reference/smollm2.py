"""Reference outputs of transformers for SmolLM2-135M-Instruct loaded from its GGUF file.

Run once, by hand, when the prompts change (CI never runs it; it needs PyTorch):

    python model/tests/reference/smollm2.py \
        "$(e2e/models/smollm2.sh)" > model/tests/reference/smollm2.json

(any Python with torch, transformers >= 5 and gguf installed will do). transformers dequantizes
the GGUF tensors to f32 and builds the tokenizer from the file's tokenizer.ggml.* metadata, as
kubetune does, so the two must agree: the same token ids for each text, the same greedy tokens
for each chat prompt, and the top-5 logprobs at every generated step within 1e-3.
"""

import json
import os
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXTS = [
    "Hello, world!",
    "The year 2024 had 366 days; 3.14159 is pi.",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "Ünïcödé: naïve café, 東京, emoji 🚀",
    "<|im_start|>user\nHi<|im_end|>",
    "def f(x):\n    return x ** 2  # square",
]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [
        {"role": "system", "content": "You answer with one word."},
        {"role": "user", "content": "What colour is the sky on a clear day?"},
    ],
    [{"role": "user", "content": "List three fruits."}],
]

NEW_TOKENS = 24
TOP = 5


def main(path):
    directory, name = os.path.split(os.path.abspath(path))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    model.eval()
    texts = [{"text": t, "ids": tokenizer(t, add_special_tokens=True)["input_ids"]} for t in TEXTS]
    chats = []
    for messages in CHATS:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        steps = []
        sequence = torch.tensor([ids])
        with torch.no_grad():
            for _ in range(NEW_TOKENS):
                logits = model(sequence).logits[0, -1].double()
                logprobs = torch.log_softmax(logits, dim=-1)
                values, top = torch.topk(logprobs, TOP)
                token = int(top[0])
                steps.append({"token": token, "top_ids": top.tolist(), "top_logprobs": values.tolist()})
                sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
                if token == tokenizer.eos_token_id:
                    break
        chats.append(
            {
                "messages": messages,
                "prompt": prompt,
                "prompt_ids": ids,
                "steps": steps,
                "text": tokenizer.decode([s["token"] for s in steps], skip_special_tokens=True),
            }
        )
    json.dump(
        {
            "source": "transformers %s, torch %s, from %s" % (transformers.__version__, torch.__version__, name),
            "eos_token_id": tokenizer.eos_token_id,
            "texts": texts,
            "chats": chats,
        },
        sys.stdout,
        indent=1,
        ensure_ascii=False,
    )
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
