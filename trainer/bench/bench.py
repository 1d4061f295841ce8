"""kubetune-trainer vs PyTorch + PEFT on the same model and the same random data (see run.sh).

Subcommands:
  data MODEL OUT N          write N random training sequences as `text` JSONL for our trainer,
                            and OUT.ids.json with the same token ids for PEFT
  ours TRAINER CONFIG OUT   run our trainer on CONFIG (YAML), write its figures to OUT
  peft MODEL IDS OUT        train the same LoRA with PEFT on the ids, write its figures to OUT
                            (GRAD_CKPT=1: with HF gradient checkpointing)
  report DIR                print the table from DIR/{ours,qlora,peft}{,-ckpt}.json, the ratios
                            and the issue's goals

Every step is one batch of BATCH x SEQ tokens (4 x 256), LoRA r=16, alpha 32, no dropout, on
all seven projections, AdamW, f32. Throughput counts the steps after the first (warm-up).

DEVICE=cuda runs both sides on the GPU (e2e/gpu/check.sh): PEFT with the base in bf16 and its
adapters in f32 (PEFT's default mixed precision), ours with --device cuda (the same split), and
each side's peak GPU memory is read by e2e/bench/gpu_memory.py.
"""

import json
import os
import random
import re
import resource
import subprocess
import sys
import time

BATCH = int(os.environ.get("BATCH", "4"))
SEQ = int(os.environ.get("SEQ", "256"))
STEPS = int(os.environ.get("STEPS", "12"))
LR = 1e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEVICE = os.environ.get("DEVICE", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "e2e", "bench"))


def gpu_memory():
    """Samples the GPU's memory on a GPU run; a no-op context elsewhere."""
    import contextlib
    if DEVICE == "cpu":
        return contextlib.nullcontext()
    from gpu_memory import GpuMemory
    return GpuMemory()


def placeholder_ids(model_dir):
    """The tokenizer's `<|tN|>` tokens: each is one token id, so text made of them tokenizes to
    exactly the ids we chose, for both sides."""
    tok = json.load(open(os.path.join(model_dir, "tokenizer.json")))
    pattern = re.compile(r"^<\|t(\d+)\|>$")
    return sorted(t["id"] for t in tok["added_tokens"] if pattern.match(t["content"]))


def write_data(model_dir, out, n):
    pool = placeholder_ids(model_dir)
    if len(pool) < 100:
        sys.exit(f"{model_dir}: tokenizer has only {len(pool)} placeholder tokens; regenerate the benchmark model")
    rng = random.Random(3)
    # One more than SEQ: the trainer adds BOS and EOS and truncates to maxSeqLength = SEQ.
    seqs = [[rng.choice(pool) for _ in range(SEQ + 1)] for _ in range(n)]
    with open(out, "w") as f:
        for s in seqs:
            f.write(json.dumps({"text": "".join(f"<|t{i}|>" for i in s)}) + "\n")
    json.dump([s[:SEQ] for s in seqs], open(out + ".ids.json", "w"))


def steady_rate(points):
    """tokens/s between the first and the last (step, tokens, seconds) point."""
    (s0, t0, x0), (s1, t1, x1) = points[0], points[-1]
    return (t1 - t0) / (x1 - x0), s1 - s0


def run_ours(trainer, config, out):
    """Runs the trainer as a child process; JSON log lines give per-step tokens/s."""
    start = time.perf_counter()
    with gpu_memory() as gpu:
        proc = subprocess.run([trainer, "--config", config, "--device", DEVICE], stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"trainer failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    points = []
    for line in proc.stderr.splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue
        if e.get("message") == "train":
            step = e["step"]
            tokens = step * BATCH * SEQ
            points.append((step, tokens, tokens / e["tokens_per_second"]))
    if len(points) < 2:
        sys.exit(f"trainer logged {len(points)} train steps; set loggingSteps: 1")
    rate, steps = steady_rate(points)
    figures = {"tok_s": rate, "steps": steps, "peak_rss_mib": rss_mib, "wall_s": wall, "first_step_s": points[0][2]}
    if gpu is not None:
        figures["peak_gpu_mib"] = gpu.peak_mib
    json.dump(figures, open(out, "w"))
    print(f"  ours  {rate:7.1f} tok/s  peak RSS {rss_mib:6.0f} MiB  peak GPU {figures.get('peak_gpu_mib', 0):6.0f} MiB",
          flush=True)


def run_peft(model_dir, ids_file, out):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    on_gpu = DEVICE != "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    gpu = gpu_memory()
    gpu.__enter__()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(DEVICE)
    checkpointing = os.environ.get("GRAD_CKPT") == "1"
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    dropout = float(os.environ.get("DROPOUT", "0"))  # as the config's lora.dropout on our side
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=TARGETS))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    seqs = json.load(open(ids_file))
    points = []
    start = time.perf_counter()
    for step in range(1, STEPS + 1):
        rows = [seqs[((step - 1) * BATCH + i) % len(seqs)] for i in range(BATCH)]
        ids = torch.tensor(rows, device=DEVICE)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # as our trainer (maxGradNorm 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # waits for the GPU, as our trainer's logged loss does
        points.append((step, step * BATCH * SEQ, time.perf_counter() - start))
    gpu.__exit__(None, None, None)
    rate, steps = steady_rate(points)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    figures = {"tok_s": rate, "steps": steps, "peak_rss_mib": rss_mib, "first_step_s": points[0][2],
               "torch": torch.__version__, "threads": torch.get_num_threads()}
    if on_gpu:
        figures["peak_gpu_mib"] = gpu.peak_mib
        figures["torch_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    json.dump(figures, open(out, "w"))
    print(f"  peft  {rate:7.1f} tok/s  peak RSS {rss_mib:6.0f} MiB  peak GPU {figures.get('peak_gpu_mib', 0):6.0f} MiB",
          flush=True)


def report(d):
    def load(name):
        path = os.path.join(d, name + ".json")
        return json.load(open(path)) if os.path.exists(path) else None

    p, pc = load("peft"), load("peft-ckpt")
    rows = [("PyTorch+PEFT", p, p), ("ours LoRA", load("ours"), p), ("ours QLoRA", load("qlora"), p),
            ("PEFT, ckpt", pc, pc), ("ours LoRA, ckpt", load("ours-ckpt"), pc), ("ours QLoRA, ckpt", load("qlora-ckpt"), pc)]
    print(f"\nbatch {BATCH} x {SEQ} tokens, LoRA r=16 on {len(TARGETS)} projections, f32; "
          f"torch {p['torch']} with {p['threads']} threads; {os.cpu_count()} cores; "
          "ckpt = gradient checkpointing, compared with PEFT under the same setting")
    print(f"{'':17} {'tok/s':>8} {'peak RSS MiB':>13} {'tok/s vs PEFT':>14} {'RSS vs PEFT':>12}")
    for name, r, ref in rows:
        if r and ref:
            print(f"{name:17} {r['tok_s']:8.1f} {r['peak_rss_mib']:13.0f} "
                  f"{r['tok_s'] / ref['tok_s']:13.2f}x {r['peak_rss_mib'] / ref['peak_rss_mib']:11.2f}x")

    def goals(label, ours, qlora, ref):
        if not (ours and qlora and ref):
            return
        speed, mem = ours["tok_s"] / ref["tok_s"], ours["peak_rss_mib"] / ref["peak_rss_mib"]
        qmem = qlora["peak_rss_mib"] / ours["peak_rss_mib"]
        print(f"{label}: goal LoRA tok/s >= 1.3x PEFT: {speed:.2f}x {'met' if speed >= 1.3 else 'NOT met'}; "
              f"LoRA peak RSS <= 0.5x PEFT: {mem:.2f}x {'met' if mem <= 0.5 else 'NOT met'}; "
              f"QLoRA peak RSS <= 0.6x LoRA: {qmem:.2f}x {'met' if qmem <= 0.6 else 'NOT met'}")

    goals("both plain", load("ours"), load("qlora"), p)
    goals("both checkpointed", load("ours-ckpt"), load("qlora-ckpt"), pc)
    goals("ours checkpointed vs plain PEFT", load("ours-ckpt"), load("qlora-ckpt"), p)


def main():
    cmd = sys.argv[1:]
    if len(cmd) == 4 and cmd[0] == "data":
        write_data(cmd[1], cmd[2], int(cmd[3]))
    elif len(cmd) == 4 and cmd[0] == "ours":
        run_ours(cmd[1], cmd[2], cmd[3])
    elif len(cmd) == 4 and cmd[0] == "peft":
        run_peft(cmd[1], cmd[2], cmd[3])
    elif len(cmd) == 2 and cmd[0] == "report":
        report(cmd[1])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
