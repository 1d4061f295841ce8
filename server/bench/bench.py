"""kubetune-server vs HF transformers `generate` on the same model (see run.sh).

Subcommands:
  server URL OUT PID  load a running kubetune-server (process PID, for its peak RSS) at each
                     concurrency, write figures to OUT
  hf MODEL OUT [int8]  run transformers generate (PyTorch CPU) at each batch size, write
                     figures; with int8, after PyTorch's dynamic int8 quantization of every Linear
  report S H TITLE print both side by side with the ratios and the issue's goals
  merge OUT IN...   one figures file from runs of one side at different concurrency levels
  adapters MODEL DIR N  write N random PEFT LoRA adapters for MODEL into DIR/a0 ... DIR/a<N-1>

By default every request is a 128-token prompt of token ids (the same ids for both) and asks
for exactly 128 new tokens (ignore_eos on the server, min_new_tokens in transformers), greedy.
run.sh's other cases change that through the environment:
  PROMPT_TOKENS, NEW_TOKENS  prompt length; new tokens, or `default`: the request names no
                             max_tokens and runs to the model's context (CONTEXT tokens), which
                             transformers is asked for as max_new_tokens
  CONCURRENCY, ROUNDS        streams (transformers: batch sizes); requests each stream sends
  SAMPLING=top_p             temperature 0.8, top_p 0.95, no top-k, on both sides
  ADAPTERS=N, ADAPTER_DIR    request i names adapter a<k> (k drawn per request, seeded, the same
                             on both sides): the server serves them by name; transformers loads
                             all N from ADAPTER_DIR/a<k> into PEFT and generates each batch with
                             mixed `adapter_names`

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
# None: requests without max_tokens, which run to the end of the context.
NEW_TOKENS = None if os.environ.get("NEW_TOKENS") == "default" else int(os.environ.get("NEW_TOKENS", "128"))
CONTEXT = int(os.environ.get("CONTEXT", "512"))
CONCURRENCY = [int(c) for c in os.environ.get("CONCURRENCY", "1 4 16").split()]
ROUNDS = os.environ.get("ROUNDS")
SAMPLING = os.environ.get("SAMPLING", "greedy")
if SAMPLING not in ("greedy", "top_p"):
    sys.exit(f"SAMPLING={SAMPLING}: greedy or top_p")
TEMPERATURE, TOP_P = 0.8, 0.95
ADAPTERS = int(os.environ.get("ADAPTERS", "0"))
# Ids past the tiny model's special tokens (0..6), the same for both sides.
FIRST_ID, VOCAB = 7, 8192
DEVICE = os.environ.get("DEVICE", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "e2e", "bench"))


def prompt(k):
    """Prompt number k: its own random ids, so that no two prompts share a prefix (the server's
    prefix cache would otherwise skip the prefill of repeated ones, which transformers does
    not cache)."""
    rng = random.Random(5 + 7919 * k)
    return [rng.randrange(FIRST_ID, VOCAB) for _ in range(PROMPT_TOKENS)]


def prompts(n):
    return [prompt(k) for k in range(n)]


# Requests without max_tokens are chat requests: in OpenAI's API (and vLLM's, and ours) a
# completion without max_tokens stops at 16 tokens, while a chat reply may run to the end of
# the context. The message is words, which run.sh's copy of the model renders with a chat
# template that transformers applies the same way.
CHAT = NEW_TOKENS is None
WORDS = "the a model serves adapters tokens cluster request batch memory context prompt".split()


def chat_message(k):
    rng = random.Random(3 + 7919 * k)
    return [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(PROMPT_TOKENS // 4))}]


def adapter_of(n):
    """The adapter each of the first n requests names (None without ADAPTERS)."""
    if not ADAPTERS:
        return [None] * n
    rng = random.Random(11)
    return [f"a{rng.randrange(ADAPTERS)}" for _ in range(n)]


def rounds_at(concurrency):
    # Enough requests for a steady state without letting the slowest case run for minutes.
    return int(ROUNDS) if ROUNDS else (3 if concurrency == 1 else 2)


def describe():
    if CHAT:
        prompt = f"chat message of {PROMPT_TOKENS // 4} words"
        new = f"no max_tokens (runs to the end of the {CONTEXT}-token context)"
    else:
        prompt, new = f"prompt {PROMPT_TOKENS} tokens", f"{NEW_TOKENS} new tokens"
    sampling = "greedy" if SAMPLING == "greedy" else f"sampled (temperature {TEMPERATURE}, top_p {TOP_P})"
    adapters = f", requests spread over {ADAPTERS} adapters" if ADAPTERS else ""
    return f"{prompt}, {new}, {sampling}{adapters}"


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


# ---- server load ----------------------------------------------------------------------------

def one_request(url, k, adapter=None):
    """Streams completion number k; returns (seconds to the first text chunk, tokens, seconds,
    prompt tokens)."""
    body = {
        "model": adapter or "bench", "temperature": 0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }
    if CHAT:
        body["messages"] = chat_message(k)
    else:
        body["prompt"] = prompt(k)
    if NEW_TOKENS is not None:
        body["max_tokens"] = NEW_TOKENS
    if SAMPLING == "top_p":
        body.update(temperature=TEMPERATURE, top_p=TOP_P)
    body = json.dumps(body).encode()
    path = "/v1/chat/completions" if CHAT else "/v1/completions"
    req = urllib.request.Request(url + path, body, {"Content-Type": "application/json"})
    start = time.perf_counter()
    ttft, tokens, prompt_tokens = None, 0, 0
    with urllib.request.urlopen(req, timeout=600) as resp:
        for line in resp:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            if ttft is None:
                ttft = time.perf_counter() - start
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
                prompt_tokens = chunk["usage"]["prompt_tokens"]
    return ttft, tokens, time.perf_counter() - start, prompt_tokens


def load_at(url, concurrency, rounds, first):
    """`concurrency` clients, each sending `rounds` requests back to back, prompts number
    first, first + 1, ..."""
    work = list(range(first, first + concurrency * rounds))
    adapters = adapter_of(concurrency * rounds)
    results, errors = [], []
    lock = threading.Lock()

    def client(i):
        for r in range(rounds):
            try:
                out = one_request(url, work[i * rounds + r], adapters[i * rounds + r])
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
        "prompt_tokens": [min(r[3] for r in results), max(r[3] for r in results)] if results else None,
        "load": os.getloadavg()[0],
    }


def peak_rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_server(url, out, pid):
    # Warm-up with a prompt no measured request sends (on the base model: adapters are loaded
    # when first named, as they would be in service).
    one_request(url, 1_000_000)
    figures, first = [], 0
    for c in CONCURRENCY:
        figures.append(load_at(url, c, rounds_at(c), first))
        first += c * rounds_at(c)
        r = figures[-1]
        print(f"  server  c={c:<3} {r['tok_s']:8.1f} tok/s, prompts of {r['prompt_tokens']} tokens, "
              f"{r['tokens'] / max(1, r['requests']):.0f} new tokens a request", flush=True)
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

    if ADAPTERS:
        from peft import PeftModel
        adapter_dir = os.environ["ADAPTER_DIR"]
        model = PeftModel.from_pretrained(model, f"{adapter_dir}/a0", adapter_name="a0")
        for k in range(1, ADAPTERS):
            model.load_adapter(f"{adapter_dir}/a{k}", adapter_name=f"a{k}")
        model.eval()
    sampling = {"do_sample": False}
    if SAMPLING == "top_p":
        sampling = {"do_sample": True, "temperature": TEMPERATURE, "top_p": TOP_P, "top_k": 0}

    # Chat requests: the model's chat template, applied by transformers.
    chat_ids = None
    if CHAT:
        from transformers import AutoTokenizer
        chat_ids = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
            chat_message(0), add_generation_prompt=True, tokenize=True, return_dict=False)

    def new_per_request():
        return CONTEXT - len(chat_ids) if CHAT else NEW_TOKENS

    def generate(batch, new_tokens, adapters=None):
        ids = torch.tensor([chat_ids] * batch if CHAT else prompts(batch), device=DEVICE)
        extra = {"adapter_names": adapters} if adapters else {}
        with torch.inference_mode():
            start = time.perf_counter()
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), **sampling,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=2, **extra,
            )
            out = out.cpu()  # waits for the GPU
            seconds = time.perf_counter() - start
        return (out.shape[1] - ids.shape[1]) * batch, seconds

    generate(1, 4, adapter_of(1)[0:1] if ADAPTERS else None)  # warm-up
    figures = []
    for b in CONCURRENCY:
        rounds = int(ROUNDS) if ROUNDS else (2 if b == 1 else 1)
        adapters = adapter_of(b * rounds)
        batch_adapters = [adapters[r * b:(r + 1) * b] if ADAPTERS else None for r in range(rounds)]
        # Time to first token: prefill of the whole batch plus one step.
        ttfts = [generate(b, 1, batch_adapters[0])[1] for _ in range(5 if b == 1 else 3)]
        tokens, seconds = 0, 0.0
        for r in range(rounds):
            t, s = generate(b, new_per_request(), batch_adapters[r])
            tokens, seconds = tokens + t, seconds + s
        figures.append({
            "concurrency": b, "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds,
            "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
            "load": os.getloadavg()[0],
        })
        print(f"  hf      b={b:<3} {figures[-1]['tok_s']:8.1f} tok/s", flush=True)
    if CHAT:
        print(f"  hf      chat prompt {len(chat_ids)} tokens, {new_per_request()} new tokens", flush=True)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"runs": figures, "peak_rss_mib": rss_mib, "torch": torch.__version__, "threads": torch.get_num_threads()}
    if DEVICE != "cpu":
        result["torch_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    json.dump(result, open(out, "w"))


def merge(out, parts):
    """One figures file from several runs of one side (one concurrency level each): their runs
    in order, the largest peak RSS, the rest from the first."""
    merged = None
    for part in parts:
        figures = json.load(open(part))
        if merged is None:
            merged = figures
            continue
        merged["runs"] += figures["runs"]
        merged["peak_rss_mib"] = max(merged["peak_rss_mib"], figures["peak_rss_mib"])
    json.dump(merged, open(out, "w"))


def make_adapters(model_dir, out_dir, n):
    """n random LoRA adapters (r 8 on the attention projections) for model_dir, saved by PEFT as
    out_dir/a0 ... a<n-1>. B is random too, unlike PEFT's training init, so that every adapter
    changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        init_lora_weights=False)
    model = get_peft_model(base, config)
    for k in range(n):
        torch.manual_seed(100 + k)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0.0, 0.02)
        model.save_pretrained(f"{out_dir}/a{k}")


# ---- report -----------------------------------------------------------------------------------

def ms(x):
    return "-" if x is None else f"{x * 1000:.0f}"


def load(run):
    return f"{run['load']:.1f}" if "load" in run else "-"


def report(server_file, hf_file, title):
    s, h = json.load(open(server_file)), json.load(open(hf_file))
    print(f"\n== {title}")
    print(f"{describe()}; torch {h['torch']} with {h['threads']} threads on {os.cpu_count()} cores; "
          f"load: the 1-minute load average as each run ended")
    print(f"{'conc':>4} | {'server tok/s':>12} {'TTFT p50/p99 ms':>16} {'load':>5} | "
          f"{'hf tok/s':>9} {'TTFT p50/p99 ms':>16} {'load':>5} | {'tok/s ratio':>11}")
    by_c = {r["concurrency"]: r for r in h["runs"]}
    ratios = {}
    for r in s["runs"]:
        c = r["concurrency"]
        hf = by_c.get(c)
        ratio = r["tok_s"] / hf["tok_s"] if hf else None
        ratios[c] = ratio
        failed = f"  ({r['failed']} failed: {r['errors']})" if r["failed"] else ""
        print(f"{c:>4} | {r['tok_s']:>12.1f} {ms(r['ttft_p50']) + '/' + ms(r['ttft_p99']):>16} {load(r):>5} | "
              f"{hf['tok_s'] if hf else 0:>9.1f} {(ms(hf['ttft_p50']) + '/' + ms(hf['ttft_p99'])) if hf else '-':>16} "
              f"{load(hf) if hf else '-':>5} | {ratio:>10.2f}x{failed}")
    print(f"peak RSS: server {s.get('peak_rss_mib', 0):.0f} MiB, transformers {h['peak_rss_mib']:.0f} MiB "
          f"(ratio {s.get('peak_rss_mib', 0) / h['peak_rss_mib']:.2f})")
    # The issue's goals are for its case: 128-token prompts, 128 new tokens, greedy, no adapters.
    issue_case = (PROMPT_TOKENS, NEW_TOKENS, SAMPLING, ADAPTERS) == (128, 128, "greedy", 0)
    goals = [(1, 3.0, "single stream >= 3x transformers batch 1"), (16, 2.0, "concurrency 16 >= 2x transformers batch 16")]
    goals = goals if issue_case else []
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
    elif len(cmd) >= 3 and cmd[0] == "merge":
        merge(cmd[1], cmd[2:])
    elif len(cmd) == 4 and cmd[0] == "adapters":
        make_adapters(cmd[1], cmd[2], int(cmd[3]))
    elif len(cmd) == 4 and cmd[0] == "report":
        report(cmd[1], cmd[2], cmd[3])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
