"""kubetune-trainer's DPO step vs TRL's DPOTrainer with PEFT, on the same model and the same
random preference pairs (see dpo-run.sh).

Subcommands:
  data MODEL DIR N          write N random pairs: DIR/pairs.jsonl (`preference`, for our
                            trainer), DIR/pairs.trl.jsonl (the same pairs as TRL's standard
                            prompt/chosen/rejected text, rendered as our trainer renders them),
                            and, for the SFT reference on the same tokens, DIR/sft.jsonl
                            (`text`) and DIR/sft.jsonl.ids.json (every chosen and rejected
                            sequence); checks that every sequence is exactly SEQ token ids
  ours TRAINER CONFIG OUT   run our trainer on CONFIG (YAML, method dpo), write its figures
  trl MODEL DIR OUT         train the same LoRA with trl.DPOTrainer + PEFT, write its figures
  report DIR                print the table from DIR/{ours,trl,ours-sft,peft-sft}.json and the ratios

Every step is BATCH pairs (2 x BATCH sequences of SEQ tokens, no padding), LoRA r=16, alpha 32,
no dropout, on all seven projections, AdamW at a constant 1e-4, gradient norm clipped to 1.0,
sigmoid loss with beta 0.1 and no label smoothing, f32 on the CPU. Throughput counts the steps
after the first (warm-up); tokens are those of both sequences of every pair.

The reference: TRL with a PEFT model and no ref_model takes the reference's log-probs with the
adapter disabled, in every step (its default, precompute_ref_log_probs=False): a step is a
no-grad reference forward, then the policy's forward and backward. Ours takes them once before
the first step (the base is frozen) and a step is a no-grad policy forward, then the forward and
backward; the one-time reference pass is reported beside the step rate (`ref s`) and folded into
an amortised rate. PRECOMPUTE_REF=1 makes TRL precompute too (before its timer starts, as ours).
"""

import json
import os
import random
import re
import resource
import subprocess
import sys
import time
from datetime import datetime

BATCH = int(os.environ.get("BATCH", "2"))  # pairs per step
SEQ = int(os.environ.get("SEQ", "256"))  # tokens per sequence (prompt + answer, framing included)
PROMPT = int(os.environ.get("PROMPT", "118"))  # placeholder tokens in each prompt
STEPS = int(os.environ.get("STEPS", "10"))
BETA = 0.1
LR = 1e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Our trainer's default chat format (the benchmark model has no chat template), one token each.
USER, ASSISTANT, END, NL = "<|user|>", "<|assistant|>", "<|end|>", "\n"
# Tokens each sequence adds to its prompt and answer: BOS, <|user|> \n, <|end|> \n
# <|assistant|> \n before the answer; <|end|> \n EOS after it.
FRAMING = 10


def placeholder_ids(model_dir):
    """The tokenizer's `<|tN|>` tokens: one id each, so text made of them tokenizes to exactly
    the ids chosen, on both sides."""
    tok = json.load(open(os.path.join(model_dir, "tokenizer.json")))
    pattern = re.compile(r"^<\|t(\d+)\|>$")
    return sorted(int(pattern.match(t["content"]).group(1)) for t in tok["added_tokens"] if pattern.match(t["content"]))


def text(ids):
    return "".join(f"<|t{i}|>" for i in ids)


def write_data(model_dir, out_dir, n):
    from transformers import AutoTokenizer

    answer = SEQ - PROMPT - FRAMING
    if answer < 1:
        sys.exit(f"SEQ {SEQ} leaves no answer after a {PROMPT}-token prompt and {FRAMING} framing tokens")
    pool = placeholder_ids(model_dir)
    if len(pool) < 100:
        sys.exit(f"{model_dir}: tokenizer has only {len(pool)} placeholder tokens; regenerate the benchmark model")
    rng = random.Random(5)
    draw = lambda k: [rng.choice(pool) for _ in range(k)]  # noqa: E731
    pairs = [(draw(PROMPT), draw(answer), draw(answer)) for _ in range(n)]
    tok = AutoTokenizer.from_pretrained(model_dir)
    # TRL tokenizes `prompt` and `prompt + chosen` as given (adding BOS only if the tokenizer
    # does) and appends EOS to each answer: the prompt carries the framing our trainer renders.
    bos = "" if tok("x")["input_ids"][:1] == [tok.bos_token_id] else tok.bos_token
    ours, trl, sft, sft_ids = [], [], [], []
    for prompt, chosen, rejected in pairs:
        ours.append({"prompt": text(prompt), "chosen": text(chosen), "rejected": text(rejected)})
        rendered = f"{USER}{NL}{text(prompt)}{END}{NL}{ASSISTANT}{NL}"
        trl.append({"prompt": bos + rendered, "chosen": text(chosen) + END + NL, "rejected": text(rejected) + END + NL})
        for a in (chosen, rejected):
            sft.append({"text": rendered + text(a) + END + NL})
            ids = tok(bos + rendered + text(a) + END + NL + tok.eos_token)["input_ids"]
            if len(ids) != SEQ:
                sys.exit(f"a sequence is {len(ids)} tokens, not SEQ={SEQ}: the framing is not what this script assumes")
            sft_ids.append(ids)
    for name, rows in [("pairs.jsonl", ours), ("pairs.trl.jsonl", trl), ("sft.jsonl", sft)]:
        with open(os.path.join(out_dir, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    json.dump(sft_ids, open(os.path.join(out_dir, "sft.jsonl.ids.json"), "w"))


def steady_rate(points):
    """tokens/s between the first and the last (step, tokens, seconds) point."""
    (s0, t0, x0), (s1, t1, x1) = points[0], points[-1]
    return (t1 - t0) / (x1 - x0), s1 - s0


def timestamp(event):
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def run_ours(trainer, config, out):
    """Runs the trainer as a child process; JSON log lines give per-step tokens/s and, from their
    timestamps, how long the one-time reference pass took."""
    start = time.perf_counter()
    proc = subprocess.run([trainer, "--config", config, "--device", "cpu"], stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"trainer failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    points, marks = [], {}
    for line in proc.stderr.splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue
        message = e.get("message")
        if message in ("dataset ready", "reference log-probs ready"):
            marks[message] = timestamp(e)
            if message == "dataset ready" and e.get("truncated"):
                sys.exit(f"the trainer truncated {e['truncated']} pairs: the sequences are longer than SEQ={SEQ}")
        if message == "train":
            step = e["step"]
            tokens = step * 2 * BATCH * SEQ
            points.append((step, tokens, tokens / e["tokens_per_second"]))
    if len(points) < 2 or len(marks) < 2:
        sys.exit(f"trainer logged {len(points)} train steps and {sorted(marks)}; set loggingSteps: 1")
    rate, steps = steady_rate(points)
    ref_s = marks["reference log-probs ready"] - marks["dataset ready"]
    figures = {"tok_s": rate, "steps": steps, "peak_rss_mib": rss_mib, "wall_s": wall,
               "first_step_s": points[0][2], "ref_s": ref_s}
    json.dump(figures, open(out, "w"))
    print(f"  ours  {rate:7.1f} tok/s  peak RSS {rss_mib:6.0f} MiB  reference pass {ref_s:.1f} s", flush=True)


def run_trl(model_dir, data_dir, out):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    import trl
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    rows = [json.loads(line) for line in open(os.path.join(data_dir, "pairs.trl.jsonl"))]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    precompute = os.environ.get("PRECOMPUTE_REF") == "1"
    args = DPOConfig(
        output_dir=os.path.join(os.path.dirname(out), "trl-out"),
        per_device_train_batch_size=BATCH,
        max_steps=STEPS,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,  # as our trainer's maxGradNorm
        optim="adamw_torch",
        beta=BETA,
        loss_type=["sigmoid"],
        label_smoothing=0.0,
        max_length=SEQ,
        precompute_ref_log_probs=precompute,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_dropout=True,
        gradient_checkpointing=False,
    )
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, peft_config=peft)

    counted = []  # tokens of each batch, as the collator hands them over
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        counted.append(int(batch["attention_mask"].sum()))
        if batch["input_ids"].shape != (2 * BATCH, SEQ):
            sys.exit(f"TRL's batch is {tuple(batch['input_ids'].shape)}, not {2 * BATCH} x {SEQ}")
        return batch

    trainer.data_collator = counting
    points = []
    start = time.perf_counter()

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            points.append((state.global_step, sum(counted[:state.global_step]), time.perf_counter() - start))

    trainer.add_callback(Clock())
    trainer.train()
    if len(points) < 2 or any(c != 2 * BATCH * SEQ for c in counted[:STEPS]):
        sys.exit(f"TRL ran {len(points)} steps over batches of {counted[:STEPS]} tokens")
    rate, steps = steady_rate(points)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    figures = {"tok_s": rate, "steps": steps, "peak_rss_mib": rss_mib, "first_step_s": points[0][2],
               "torch": torch.__version__, "trl": trl.__version__, "threads": torch.get_num_threads(),
               "precompute_ref": precompute}
    json.dump(figures, open(out, "w"))
    print(f"  trl   {rate:7.1f} tok/s  peak RSS {rss_mib:6.0f} MiB", flush=True)


def report(d):
    def load(name):
        path = os.path.join(d, name + ".json")
        return json.load(open(path)) if os.path.exists(path) else None

    ours, ref = load("ours"), load("trl")
    sft_ours, sft_peft = load("ours-sft"), load("peft-sft")
    per_pair = 2 * SEQ
    print(f"\n{BATCH} pairs x 2 x {SEQ} tokens a step, LoRA r=16 on {len(TARGETS)} projections, sigmoid, beta {BETA}, "
          f"f32; torch {ref['torch']}, trl {ref['trl']} with {ref['threads']} threads; {os.cpu_count()} cores; "
          f"TRL's reference {'precomputed' if ref['precompute_ref'] else 'in every step'}")
    print(f"{'':22} {'pairs/s':>8} {'tok/s':>8} {'peak RSS MiB':>13} {'ref s':>6} {'tok/s vs TRL':>13} {'RSS vs TRL':>11}")
    for name, r in [("TRL DPOTrainer + PEFT", ref), ("ours DPO", ours)]:
        if r:
            print(f"{name:22} {r['tok_s'] / per_pair:8.2f} {r['tok_s']:8.1f} {r['peak_rss_mib']:13.0f} "
                  f"{r.get('ref_s', 0):6.1f} {r['tok_s'] / ref['tok_s']:12.2f}x {r['peak_rss_mib'] / ref['peak_rss_mib']:10.2f}x")
    if ours:
        tokens = ours["steps"] * 2 * BATCH * SEQ
        amortised = tokens / (tokens / ours["tok_s"] + ours["ref_s"] * ours["steps"] / STEPS)
        print(f"ours with its one-time reference pass spread over the {STEPS} steps: {amortised:.1f} tok/s, "
              f"{amortised / ref['tok_s']:.2f}x TRL")
    for name, dpo, sft in [("ours", ours, sft_ours), ("TRL, against PEFT's SFT loop (bench.py)", ref, sft_peft)]:
        if dpo and sft:
            print(f"{name}: a DPO step costs {sft['tok_s'] / dpo['tok_s']:.2f}x an SFT step on the same tokens "
                  f"(SFT {sft['tok_s']:.1f} tok/s, peak RSS {sft['peak_rss_mib']:.0f} MiB)")


def main():
    cmd = sys.argv[1:]
    if len(cmd) == 4 and cmd[0] == "data":
        write_data(cmd[1], cmd[2], int(cmd[3]))
    elif len(cmd) == 4 and cmd[0] == "ours":
        run_ours(cmd[1], cmd[2], cmd[3])
    elif len(cmd) == 4 and cmd[0] == "trl":
        run_trl(cmd[1], cmd[2], cmd[3])
    elif len(cmd) == 2 and cmd[0] == "report":
        report(cmd[1])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
