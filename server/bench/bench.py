"""kubetune-server vs HF transformers `generate` on the same model (see run.sh).

Subcommands:
  server URL OUT PID  load a running kubetune-server (process PID, for its peak RSS) at each
                     concurrency, write figures to OUT
  hf MODEL OUT [int8]  run transformers generate (PyTorch CPU) at each batch size, write
                     figures; with int8, after PyTorch's dynamic int8 quantization of every Linear
  report S H TITLE print both side by side with the ratios and the issue's goals

Every request is a 128-token prompt of token ids (the same ids for both) and asks for exactly
128 new tokens (ignore_eos on the server, min_new_tokens in transformers), greedy.

DEVICE=cuda (e2e/gpu/check.sh): transformers runs in bf16 on the GPU, and both sides report
their peak GPU memory (e2e/bench/gpu_memory.py; the server's from GPU_BASELINE_MIB, the GPU's
used memory before it started).
"""

import json
import os
import random
import sys
import threading
import time
import urllib.request

PROMPT_TOKENS = int(os.environ.get("PROMPT_TOKENS", "128"))
NEW_TOKENS = int(os.environ.get("NEW_TOKENS", "128"))
CONCURRENCY = [int(c) for c in os.environ.get("CONCURRENCY", "1 4 16").split()]
# Ids past the tiny model's special tokens (0..6), the same for both sides.
FIRST_ID, VOCAB = 7, 8192
DEVICE = os.environ.get("DEVICE", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "e2e", "bench"))


def prompts(n):
    rng = random.Random(5)
    return [[rng.randrange(FIRST_ID, VOCAB) for _ in range(PROMPT_TOKENS)] for _ in range(n)]


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


# ---- server load ----------------------------------------------------------------------------

def one_request(url, prompt):
    """Streams one completion; returns (seconds to the first text chunk, tokens, seconds)."""
    body = json.dumps({
        "model": "bench", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    start = time.perf_counter()
    ttft, tokens = None, 0
    with urllib.request.urlopen(req, timeout=600) as resp:
        for line in resp:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            if ttft is None:
                ttft = time.perf_counter() - start
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft, tokens, time.perf_counter() - start


def load_at(url, concurrency, rounds):
    """`concurrency` clients, each sending `rounds` requests back to back."""
    work = prompts(concurrency * rounds)
    results, errors = [], []
    lock = threading.Lock()

    def client(i):
        for r in range(rounds):
            try:
                out = one_request(url, work[i * rounds + r])
            except Exception as e:  # reported, not fatal: the figures say how many failed
                with lock:
                    errors.append(str(e))
                continue
            with lock:
                results.append(out)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttfts = [r[0] for r in results if r[0] is not None]
    tokens = sum(r[1] for r in results)
    return {
        "concurrency": concurrency, "requests": len(results), "errors": errors[:3], "failed": len(errors),
        "tokens": tokens, "seconds": wall, "tok_s": tokens / wall,
        "ttft_p50": percentile(ttfts, 50) if ttfts else None, "ttft_p99": percentile(ttfts, 99) if ttfts else None,
    }


def peak_rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_server(url, out, pid):
    one_request(url, prompts(1)[0])  # warm-up
    figures = []
    for c in CONCURRENCY:
        # Enough requests for a steady state without letting the slowest case run for minutes.
        rounds = 3 if c == 1 else 2
        figures.append(load_at(url, c, rounds))
        print(f"  server  c={c:<3} {figures[-1]['tok_s']:8.1f} tok/s", flush=True)
    result = {"runs": figures, "peak_rss_mib": peak_rss_mib(pid)}
    if DEVICE != "cpu":
        from gpu_memory import used_mib
        result["gpu_mib_after"] = used_mib() - float(os.environ.get("GPU_BASELINE_MIB", "0"))
    json.dump(result, open(out, "w"))


# ---- transformers -----------------------------------------------------------------------------

def run_hf(model_dir, out, quantize="none"):
    import resource
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(DEVICE).eval()
    if quantize == "int8":
        # PyTorch's own weight int8 for CPU inference (dynamic quantization of every Linear:
        # int8 weights, activations quantized per call), the like-for-like reference for
        # `kubetune-server --quantize int8`.
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)

    def generate(batch, new_tokens):
        ids = torch.tensor(prompts(batch), device=DEVICE)
        with torch.inference_mode():
            start = time.perf_counter()
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=2,
            )
            out = out.cpu()  # waits for the GPU
            seconds = time.perf_counter() - start
        return (out.shape[1] - ids.shape[1]) * batch, seconds

    generate(1, 4)  # warm-up
    figures = []
    for b in CONCURRENCY:
        # Time to first token: prefill of the whole batch plus one step.
        ttfts = [generate(b, 1)[1] for _ in range(5 if b == 1 else 3)]
        tokens, seconds = 0, 0.0
        for _ in range(2 if b == 1 else 1):
            t, s = generate(b, NEW_TOKENS)
            tokens, seconds = tokens + t, seconds + s
        figures.append({
            "concurrency": b, "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds,
            "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
        })
        print(f"  hf      b={b:<3} {figures[-1]['tok_s']:8.1f} tok/s", flush=True)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"runs": figures, "peak_rss_mib": rss_mib, "torch": torch.__version__, "threads": torch.get_num_threads()}
    if DEVICE != "cpu":
        result["torch_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    json.dump(result, open(out, "w"))


# ---- report -----------------------------------------------------------------------------------

def ms(x):
    return "-" if x is None else f"{x * 1000:.0f}"


def report(server_file, hf_file, title):
    s, h = json.load(open(server_file)), json.load(open(hf_file))
    print(f"\n== {title}")
    print(f"prompt {PROMPT_TOKENS} tokens, {NEW_TOKENS} new tokens, greedy; "
          f"torch {h['torch']} with {h['threads']} threads; load average {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} cores")
    print(f"{'conc':>4} | {'server tok/s':>12} {'TTFT p50/p99 ms':>16} | {'hf tok/s':>9} {'TTFT p50/p99 ms':>16} | {'tok/s ratio':>11}")
    by_c = {r["concurrency"]: r for r in h["runs"]}
    ratios = {}
    for r in s["runs"]:
        c = r["concurrency"]
        hf = by_c.get(c)
        ratio = r["tok_s"] / hf["tok_s"] if hf else None
        ratios[c] = ratio
        failed = f"  ({r['failed']} failed: {r['errors']})" if r["failed"] else ""
        print(f"{c:>4} | {r['tok_s']:>12.1f} {ms(r['ttft_p50']) + '/' + ms(r['ttft_p99']):>16} | "
              f"{hf['tok_s'] if hf else 0:>9.1f} {(ms(hf['ttft_p50']) + '/' + ms(hf['ttft_p99'])) if hf else '-':>16} | "
              f"{ratio:>10.2f}x{failed}")
    print(f"peak RSS: server {s.get('peak_rss_mib', 0):.0f} MiB, transformers {h['peak_rss_mib']:.0f} MiB "
          f"(ratio {s.get('peak_rss_mib', 0) / h['peak_rss_mib']:.2f})")
    goals = [(1, 3.0, "single stream >= 3x transformers batch 1"), (16, 2.0, "concurrency 16 >= 2x transformers batch 16")]
    for c, want, what in goals:
        got = ratios.get(c)
        if got is not None:
            print(f"goal {what}: {got:.2f}x {'met' if got >= want else 'NOT met'}")


def main():
    cmd = sys.argv[1:]
    if len(cmd) == 4 and cmd[0] == "server":
        run_server(cmd[1], cmd[2], cmd[3])
    elif len(cmd) in (3, 4) and cmd[0] == "hf":
        run_hf(*cmd[1:])
    elif len(cmd) == 4 and cmd[0] == "report":
        report(cmd[1], cmd[2], cmd[3])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
