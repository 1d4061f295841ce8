"""The summary of e2e/gpu/check.sh: one JSON object (also written to OUT/summary.json), then a
table with the ratios against PyTorch + PEFT and transformers, and issue 16's goals.

  report.py OUT DEVICE
"""

import json
import os
import sys

# The training runs, PEFT's before ours under each setting, in the table's order.
RUNS = ["peft", "ours-lora", "ours-qlora", "peft-ckpt", "ours-lora-ckpt", "ours-qlora-ckpt",
        "peft-dropout", "ours-lora-dropout"]


def reference(tag):
    """PEFT's run under the setting of `tag`: checkpointed, with dropout, or plain."""
    for setting in ("ckpt", "dropout"):
        if tag.endswith(setting):
            return f"peft-{setting}"
    return "peft"


def load(path):
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None


def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def training(out, name):
    d = os.path.join(out, f"train-{name}")
    if not os.path.isdir(d):
        return None
    runs = {tag: load(os.path.join(d, f"{tag}.json")) for tag in RUNS}
    mem = "peak_gpu_mib" if any(r and "peak_gpu_mib" in r for r in runs.values()) else "peak_rss_mib"
    rows = {}
    for tag, r in runs.items():
        ref = runs[reference(tag)]
        rows[tag] = None if r is None else {
            "tok_s": round(r["tok_s"], 1), mem: round(r.get(mem, 0)),
            "tok_s_vs_peft": ratio(r["tok_s"], ref and ref["tok_s"]),
            "mem_vs_peft": ratio(r.get(mem), ref and ref.get(mem)),
        }
    lora, qlora = runs["ours-lora"], runs["ours-qlora"]
    rows["qlora_mem_vs_lora"] = ratio(qlora and qlora.get(mem), lora and lora.get(mem))
    rows["memory"] = mem
    return rows


def serving(out):
    ours, hf = load(os.path.join(out, "serve-ours.json")), load(os.path.join(out, "serve-hf.json"))
    if not ours:
        return None
    by_c = {r["concurrency"]: r for r in (hf or {}).get("runs", [])}
    rows = {}
    for r in ours["runs"]:
        h = by_c.get(r["concurrency"])
        rows[f"c{r['concurrency']}"] = {
            "tok_s": round(r["tok_s"], 1), "ttft_p50_ms": r["ttft_p50"] and round(r["ttft_p50"] * 1000, 1),
            "failed": r["failed"], "hf_tok_s": h and round(h["tok_s"], 1),
            "hf_ttft_p50_ms": h and round(h["ttft_p50"] * 1000, 1), "tok_s_vs_hf": ratio(r["tok_s"], h and h["tok_s"]),
        }
    rows["server_gpu_mib"] = ours.get("gpu_mib_after")
    rows["hf_max_allocated_mib"] = (hf or {}).get("torch_max_allocated_mib")
    return rows


def profile(out):
    ours, reference = load(os.path.join(out, "profile-ours.json")), load(os.path.join(out, "profile-torch.json"))
    if not ours:
        return None
    ref = (reference or {}).get("ms", {})
    # In the layer's order (layer_profile.py's), then any piece only we time.
    names = [n for n in ref if n in ours["ms"]] + [n for n in ours["ms"] if n not in ref]
    return {name: {"ms": round(ours["ms"][name], 3), "torch_ms": ref.get(name) and round(ref[name], 3),
                   "speed_vs_torch": ratio(ref.get(name), ours["ms"][name])} for name in names}


def main():
    out, device = sys.argv[1], sys.argv[2]
    gpu = open(os.path.join(out, "gpu.txt")).read().strip() if os.path.exists(os.path.join(out, "gpu.txt")) else None
    summary = {"device": device, "gpu": gpu, "correctness": load(os.path.join(out, "correctness.json")),
               "training": {n: training(out, n) for n in ["bench", "large"]}, "profile": profile(out),
               "serving": serving(out)}
    goals = {}
    for name, t in summary["training"].items():
        if t and t.get("ours-lora"):
            goals[f"{name}: LoRA tok/s >= 1.0x PEFT"] = t["ours-lora"]["tok_s_vs_peft"]
            goals[f"{name}: LoRA memory <= 1.0x PEFT"] = t["ours-lora"]["mem_vs_peft"]
    large = summary["training"].get("large")
    if large:
        goals["large: QLoRA memory <= 0.5x our LoRA"] = large["qlora_mem_vs_lora"]
    if summary["serving"] and summary["serving"].get("c16"):
        goals["serving c16 >= 2x transformers"] = summary["serving"]["c16"]["tok_s_vs_hf"]
    summary["goals"] = goals
    json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
    print(json.dumps(summary))

    c = summary["correctness"]
    print(f"\n{device} {gpu or ''}")
    if c:
        for base in ["dense", "nf4"]:
            f = c.get(base, {})
            print(f"correctness {base:5}: logits rel err {f.get('logits_rel_err', float('nan')):.4f}, greedy agree "
                  f"{f.get('greedy_agreement', float('nan')):.3f}, loss rel err {f.get('loss_rel_err', float('nan')):.5f}, "
                  f"max gradient rel err {f.get('gradient_rel_err_max', float('nan')):.4f}")
        print(f"dropout masks: {c.get('dropout_mask_mismatch', 'not checked')} of the device's differ from the host's")
        print(f"correctness: {'PASS' if c.get('pass') else 'FAIL'} (bounds {c.get('bounds')})")
    else:
        print("correctness: no result")
    for name, t in summary["training"].items():
        if not t:
            continue
        mem = t["memory"]
        print(f"\ntraining, {name} shape ({mem})")
        print(f"{'run':17} {'tok/s':>9} {'MiB':>7} {'tok/s vs PEFT':>14} {'mem vs PEFT':>12}")
        for tag in RUNS:
            r = t.get(tag)
            if r:
                print(f"{tag:17} {r['tok_s']:9.1f} {r[mem]:7} {r['tok_s_vs_peft'] or 0:13.2f}x {r['mem_vs_peft'] or 0:11.2f}x")
            else:
                print(f"{tag:17} {'no result':>9}")  # failed, or not in RUNS
        print(f"QLoRA memory / LoRA memory: {t['qlora_mem_vs_lora']}")
    p = summary["profile"]
    if p:
        print("\none layer's pieces, forward and backward, ms (speed vs PyTorch: its ms / ours)")
        print(f"{'piece':12} {'ours':>9} {'PyTorch':>9} {'speed':>7}")
        for name, r in p.items():
            torch_ms = f"{r['torch_ms']:9.3f}" if r["torch_ms"] is not None else f"{'-':>9}"
            print(f"{name:12} {r['ms']:9.3f} {torch_ms} {r['speed_vs_torch'] or 0:6.2f}x")
    s = summary["serving"]
    if s:
        print("\nserving (128-token prompts, 128 new tokens, greedy)")
        for k in ["c1", "c16"]:
            r = s.get(k)
            if r:
                print(f"{k:4} ours {r['tok_s']:8.1f} tok/s TTFT {r['ttft_p50_ms']} ms | transformers {r['hf_tok_s']} tok/s "
                      f"TTFT {r['hf_ttft_p50_ms']} ms | {r['tok_s_vs_hf']}x")
    print("\ngoals:", json.dumps(goals))


if __name__ == "__main__":
    main()
