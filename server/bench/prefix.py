"""What prefix caching buys (see prefix.sh). Standard library only.

Subcommands (URL is a running kubetune-server serving the model as "bench"):
  ttft URL SYSTEM_TOKENS ROUNDS OUT
      1 + ROUNDS streamed completions, one at a time, whose prompts are the same
      SYSTEM_TOKENS-token prefix followed by a 16-token question of their own, max_tokens 1.
      Writes the time to first token of each of the last ROUNDS (the first one fills the cache),
      their median, and the server's vllm:prefix_cache_queries/hits counters to OUT (JSON).
  report OFF ON
      The two runs side by side, with the ratio of the median times to first token.
"""

import http.client
import json
import random
import statistics
import sys
import time
import urllib.parse

# /metrics reading, shared with the scheduler benchmark beside this file.
from scheduler import metric

FIRST_ID, VOCAB = 7, 8192
QUESTION = 16


def first_token_s(url, prompt):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = {"model": "bench", "prompt": prompt, "max_tokens": 1, "temperature": 0,
            "ignore_eos": True, "stream": True}
    sent = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise SystemExit(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    for line in resp:
        if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
            first = time.perf_counter()
            conn.close()
            return first - sent
    raise SystemExit("the stream ended without a token")


def ttft(url, system_tokens, rounds, out):
    rng = random.Random(7)
    system = [rng.randrange(FIRST_ID, VOCAB) for _ in range(system_tokens)]
    times = []
    for i in range(1 + rounds):
        question = [rng.randrange(FIRST_ID, VOCAB) for _ in range(QUESTION)]
        t = first_token_s(url, system + question)
        if i > 0:
            times.append(t)
    figures = {
        "system_tokens": system_tokens,
        "prompt_tokens": system_tokens + QUESTION,
        "ttft_s": times,
        "median_ttft_s": statistics.median(times),
        "prefix_cache_queries": metric(url, "vllm:prefix_cache_queries_total"),
        "prefix_cache_hits": metric(url, "vllm:prefix_cache_hits_total"),
    }
    json.dump(figures, open(out, "w"), indent=1)
    print(json.dumps(figures))


def report(off_file, on_file):
    off, on = (json.load(open(f)) for f in (off_file, on_file))
    print(f"Time to first token of a {on['prompt_tokens']}-token prompt whose first "
          f"{on['system_tokens']} tokens an earlier request sent (median of {len(on['ttft_s'])})")
    print(f"{'prefix cache off':>18} {'on':>10} {'ratio':>7}   hits / queries (tokens, on)")
    ratio = on["median_ttft_s"] / off["median_ttft_s"]
    print(f"{off['median_ttft_s'] * 1000:>15.0f} ms {on['median_ttft_s'] * 1000:>7.0f} ms "
          f"{ratio:>6.3f}x   {on['prefix_cache_hits']:.0f} / {on['prefix_cache_queries']:.0f}")


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "ttft":
        ttft(args[0], int(args[1]), int(args[2]), args[3])
    elif cmd == "report":
        report(*args)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
