"""Asks a kubetune server the held-out questions of a chat dataset twice, once of the base model
and once of the adapter, and prints their answers side by side with an exact-match score for each.

    python3 e2e/demo_compare.py --url http://CLUSTER_IP:8000 --adapter complaint-triage \
        --data examples/data/bank-complaints/heldout.jsonl

The reference answer of each line is its last (assistant) message; the question is every message
before it. Greedy decoding (temperature 0), so a rerun gives the same figures. Standard library only.
"""

import argparse
import concurrent.futures
import json
import sys
import urllib.request


def post(url, body):
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.load(response)


def base_model_id(url, adapter):
    with urllib.request.urlopen(url + "/v1/models", timeout=30) as response:
        ids = [m["id"] for m in json.load(response)["data"]]
    others = [i for i in ids if i != adapter and not i.startswith(adapter + "@")]
    if not others:
        sys.exit("no base model in /v1/models: %s" % ids)
    return others[0]


def answer(url, model, messages, max_tokens):
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    reply = post(url + "/v1/chat/completions", body)
    return reply["choices"][0]["message"]["content"].strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--show", type=int, default=5, help="examples printed side by side")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    url = args.url.rstrip("/")
    with open(args.data) as f:
        examples = [json.loads(line) for line in f if line.strip()]
    base = base_model_id(url, args.adapter)
    jobs = [(model, ex) for ex in examples for model in (base, args.adapter)]
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        answers = list(
            pool.map(lambda job: answer(url, job[0], job[1]["messages"][:-1], args.max_tokens), jobs)
        )
    hits = {base: 0, args.adapter: 0}
    for i, ex in enumerate(examples):
        expected = ex["messages"][-1]["content"].strip()
        got = {base: answers[2 * i], args.adapter: answers[2 * i + 1]}
        for model, text in got.items():
            hits[model] += text == expected
        if i < args.show:
            print("question: %s" % ex["messages"][-2]["content"])
            print("  expected:          %s" % expected)
            print("  base model:        %s" % got[base].replace("\n", " ")[:160])
            print("  with the adapter:  %s" % got[args.adapter].replace("\n", " ")[:160])
    n = len(examples)
    print()
    print("exact match on %d held-out complaints:" % n)
    for label, model in (("base model (%s)" % base, base), ("with the adapter (%s)" % args.adapter, args.adapter)):
        print("  %-60s %3d/%d  (%.0f%%)" % (label, hits[model], n, 100.0 * hits[model] / n))


if __name__ == "__main__":
    main()
