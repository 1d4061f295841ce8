"""PyTorch + PEFT's side of e2e/bench/step-memory.sh: the resident memory of one training step.

  step_memory.py MODEL_DIR BATCH SEQ [--checkpointing] [--dropout P]

Loads the model in bf16 on the CPU with PEFT's LoRA (r=16, alpha 32, dropout P (0), all seven
projections; PEFT keeps the adapter in f32, its mixed precision on a GPU), runs one forward and
backward of BATCH x SEQ tokens, and prints one JSON object with the resident memory before the
step and its peak above that during the step (Linux's high-water mark, reset before the step),
as model/examples/step_memory.rs measures ours.
"""

import json
import sys
import time


def resident():
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmHWM"], fields["VmRSS"]


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    model_dir, batch, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    flags = sys.argv[4:]
    checkpointing = "--checkpointing" in flags
    dropout = float(flags[flags.index("--dropout") + 1]) if "--dropout" in flags else 0.0
    known = {"--checkpointing", "--dropout"} | ({flags[flags.index("--dropout") + 1]} if "--dropout" in flags else set())
    if set(flags) - known:
        sys.exit(f"unknown arguments {sorted(set(flags) - known)}\n{__doc__}")

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=targets))
    model.train()
    vocab = model.config.vocab_size
    ids = torch.tensor([(i * 7919 + 13) % vocab for i in range(batch * seq)]).reshape(batch, seq)

    _, before = resident()
    open("/proc/self/clear_refs", "w").write("5")
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    seconds = time.perf_counter() - start
    high_water, _ = resident()
    mib = lambda b: round(b / 2**20, 1)
    print(json.dumps({
        "dtype": "bf16", "checkpointing": checkpointing, "dropout": dropout, "tokens": batch * seq,
        "loss_per_token": loss.item(), "resident_before_mib": mib(before),
        "resident_step_peak_mib": mib(high_water - before), "seconds": round(seconds, 2),
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
