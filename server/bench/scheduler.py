"""What block-allocated KV and chunked prefill buy (see scheduler.sh). Standard library only.

Subcommands (URL is a running kubetune-server serving the model as "bench"):
  concurrency URL N CONTEXT KV_BYTES_PER_TOKEN BUDGET_BYTES
      N streaming chat requests without max_tokens at once; once every one has produced
      tokens, reads vllm:num_requests_running and vllm:kv_cache_usage_perc from /metrics, then
      closes them. Prints the figures beside what reserving prompt + max_tokens (the whole
      context) up front admits: floor(budget / (context x bytes per token)).
  gap URL LONG_TOKENS OUT
      One stream of 96 tokens; once it runs, a completion with a LONG_TOKENS-token prompt
      arrives. Writes the stream's largest gap between two tokens while the long prompt was
      being prefilled, its median gap, and the long prompt's time to first token to OUT (JSON).
  report UNCHUNKED CHUNKED
      The two gap runs side by side, with ratios.
"""

import http.client
import json
import random
import statistics
import sys
import threading
import time
import urllib.parse
import urllib.request

FIRST_ID, VOCAB = 7, 8192


def connect(url):
    u = urllib.parse.urlparse(url)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=600)


def open_stream(url, path, body):
    """Sends a streaming request; returns (connection, response) to read SSE lines from."""
    conn = connect(url)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise SystemExit(f"{path}: HTTP {resp.status}: {resp.read()[:300]!r}")
    return conn, resp


def tokens_of(resp):
    """Yields (time, text) per content chunk of an SSE response."""
    for line in resp:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        for choice in chunk.get("choices", []):
            text = choice.get("delta", {}).get("content") or choice.get("text")
            if text:
                yield time.perf_counter(), text


def metric(url, name):
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    raise SystemExit(f"/metrics has no {name}")


def concurrency(url, n, context, kv_bytes, budget):
    started = threading.Barrier(n + 1)
    streams = []
    lock = threading.Lock()

    def client(i):
        body = {
            "model": "bench", "stream": True, "temperature": 0,
            "messages": [{"role": "user", "content": f"request {i}: tell me a long story"}],
        }
        conn, resp = open_stream(url, "/v1/chat/completions", body)
        with lock:
            streams.append(conn)
        seen = 0
        for _ in tokens_of(resp):
            seen += 1
            if seen == 8:
                started.wait()
                break

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    started.wait(timeout=600)
    running = metric(url, "vllm:num_requests_running")
    usage = metric(url, "vllm:kv_cache_usage_perc")
    for conn in streams:
        conn.close()
    reserved = budget // (context * kv_bytes)
    print(f"{n} chat requests without max_tokens, context {context}, KV budget {budget >> 20} MiB "
          f"({kv_bytes} bytes a token)")
    print(f"  running together: {running:.0f}   KV budget held: {usage:.1%}")
    print(f"  reserving prompt + max_tokens up front (the previous design) admits {reserved} at once: "
          f"{running / max(reserved, 1):.1f}x")


def gap(url, long_tokens, out):
    times = []
    running = threading.Event()

    def stream():
        body = {"model": "bench", "prompt": [FIRST_ID + i for i in range(16)], "max_tokens": 96,
                "temperature": 0, "ignore_eos": True, "stream": True}
        conn, resp = open_stream(url, "/v1/completions", body)
        for t, _ in tokens_of(resp):
            times.append(t)
            if len(times) == 4:
                running.set()
        conn.close()

    s = threading.Thread(target=stream, daemon=True)
    s.start()
    running.wait(timeout=600)
    rng = random.Random(3)
    prompt = [rng.randrange(FIRST_ID, VOCAB) for _ in range(long_tokens)]
    sent = time.perf_counter()
    conn, resp = open_stream(url, "/v1/completions", {
        "model": "bench", "prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True})
    first = next(tokens_of(resp))[0]
    conn.close()
    s.join(timeout=600)
    gaps = [b - a for a, b in zip(times, times[1:])]
    during = [b - a for a, b in zip(times, times[1:]) if b > sent and a < first]
    figures = {
        "long_prompt_tokens": long_tokens,
        "long_ttft_s": first - sent,
        "max_gap_during_prefill_s": max(during) if during else None,
        "median_gap_s": statistics.median(gaps),
        "stream_tokens": len(times),
    }
    json.dump(figures, open(out, "w"), indent=1)
    print(json.dumps(figures))


def report(unchunked_file, chunked_file):
    u, c = (json.load(open(f)) for f in (unchunked_file, chunked_file))
    ms = lambda s: "-" if s is None else f"{s * 1000:.0f} ms"
    print(f"A stream's tokens while a {c['long_prompt_tokens']}-token prompt is prefilled")
    print(f"{'':34} {'whole prompt':>14} {'chunked':>14} {'ratio':>7}")
    for key, label in [("max_gap_during_prefill_s", "largest gap between two tokens"),
                       ("median_gap_s", "median gap"),
                       ("long_ttft_s", "long prompt's first token")]:
        ratio = "" if not (u[key] and c[key]) else f"{c[key] / u[key]:.2f}x"
        print(f"{label:34} {ms(u[key]):>14} {ms(c[key]):>14} {ratio:>7}")


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "concurrency":
        concurrency(args[0], *map(int, args[1:]))
    elif cmd == "gap":
        gap(args[0], int(args[1]), args[2])
    elif cmd == "report":
        report(*args)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
