"""Writes a seeded random LoRA adapter for a model directory, in PEFT layout with the
registry's manifest.json beside it, so that `kubetune-server --adapter NAME=DIR` serves it.

Standard library only (the client suite's venv holds nothing but `openai`): the safetensors
file is written by hand, as its format is a length-prefixed JSON header and raw tensors.

    python3 write_adapter.py --model MODEL_DIR --out DIR --name NAME --version N --base BASE
"""

import argparse
import datetime
import hashlib
import json
import os
import random
import struct

TARGETS = ("q_proj", "v_proj")


def shapes(config, module):
    """(fan_in, out) of a projection, as kubetune_model::lora::TargetModule::shape has them."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads") or heads
    return {
        "q_proj": (hidden, heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
    }[module]


def safetensors(tensors):
    """The bytes of a safetensors file holding F32 `tensors`: {name: (shape, flat values)}."""
    header, data = {}, bytearray()
    for name, (shape, values) in sorted(tensors.items()):
        start = len(data)
        data += struct.pack(f"<{len(values)}f", *values)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [start, len(data)]}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + bytes(data)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--version", type=int, required=True)
    p.add_argument("--base", required=True, help="the base model's served name")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()

    with open(os.path.join(a.model, "config.json")) as f:
        config = json.load(f)
    rng = random.Random(a.seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module in TARGETS:
            fan_in, out = shapes(config, module)
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}.lora_{{}}.weight"
            # B non-zero, unlike PEFT's initialisation, so the adapter changes the output.
            tensors[key.format("A")] = ((a.rank, fan_in), [rng.uniform(-0.3, 0.3) for _ in range(a.rank * fan_in)])
            tensors[key.format("B")] = ((out, a.rank), [rng.uniform(-0.3, 0.3) for _ in range(out * a.rank)])
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": a.rank,
        "lora_alpha": 2 * a.rank,
        "lora_dropout": 0.0,
        "target_modules": list(TARGETS),
        "base_model_name_or_path": a.base,
        "bias": "none",
    }
    files = {
        "adapter_config.json": json.dumps(peft_config, indent=2).encode(),
        "adapter_model.safetensors": safetensors(tensors),
    }
    os.makedirs(a.out, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(a.out, name), "wb") as f:
            f.write(data)
    # What the registry writes for a version (storage/src/manifest.rs): the server loads only
    # adapters whose files match one.
    manifest = {
        "schema": 1,
        "name": a.name,
        "version": a.version,
        "files": {n: {"sha256": "sha256:" + hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in files.items()},
        "base_model": {"uri": a.base},
        "dataset": {"uri": "file:///data/train.jsonl"},
        "hyperparameters": {},
        "metrics": {},
        "created_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    with open(os.path.join(a.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)


if __name__ == "__main__":
    main()
