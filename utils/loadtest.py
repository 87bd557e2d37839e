"""
Load test a running serve.py: N clients, each sending requests back to back for a
fixed time; prints the request count, errors, throughput and latency percentiles.

    python serve.py --ckpt out/demo/best.pt                  # in another terminal
    python utils/loadtest.py                                       # 8 clients, 60 s, chat completions
    python utils/loadtest.py --seconds 5 --endpoint tool-call      # a quick check

The server runs one model call at a time (the Router is not thread-safe), so with
8 closed-loop clients a request waits for the ~7 ahead of it: throughput is
1 / (time per model call), and the median latency about 8x that time. The run is
bounded: no request starts after --seconds, and each has a --timeout.
"""

import argparse
import http.client
import json
import os
import sys
import threading
import time
from urllib.parse import urlsplit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # run from anywhere: the project's modules live one folder up
from runtime import die  # noqa: E402

REQUESTS = [
    "Where's my order ORD-1234?",
    "What's the weather in Paris right now?",
    "set a timer for 10 minutes for the pasta",
    "hi there, how are you?",
    "is it raining in Tokyo? answer in fahrenheit",
    "track ORD-98765 please",
    "remind me in 25 minutes",
    "what is the capital of Peru?",
]


def percentile(sorted_values, q):
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


def body_for(endpoint, tools, request, max_tokens):
    if endpoint == "tool-call":
        return {"prompt": request, "available_functions": tools, "max_tokens": max_tokens}
    return {"model": "nanotool", "messages": [{"role": "user", "content": request}],
            "tools": tools, "max_tokens": max_tokens}


def client(i, url, path, payloads, deadline, timeout, out, lock):
    """One closed-loop client on a keep-alive connection; appends (latency s, error or None)."""
    conn, n = None, i            # clients start at different requests
    while time.monotonic() < deadline:
        if conn is None:
            conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=timeout)
        body = payloads[n % len(payloads)]
        n += 1
        t0 = time.perf_counter()
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            data = r.read()
            err = None if r.status == 200 else f"HTTP {r.status}: {data[:200].decode('utf-8', 'replace')}"
        except (OSError, http.client.HTTPException) as e:
            err = f"{type(e).__name__}: {e}"
            conn.close()
            conn = None          # reconnect on the next request
        with lock:
            out.append((time.perf_counter() - t0, err))
    if conn is not None:
        conn.close()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base_url", default="http://127.0.0.1:8000", help="the server, without /v1")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--endpoint", choices=["chat", "tool-call"], default="chat")
    p.add_argument("--tools", default=os.path.join(ROOT, "examples", "tools.json"))
    p.add_argument("--max_tokens", type=int, default=64)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    args = p.parse_args(argv)

    if args.clients < 1 or args.seconds <= 0:
        die("--clients and --seconds must be positive")
    url = urlsplit(args.base_url)
    if url.scheme != "http" or not url.hostname:
        die(f"--base_url must look like http://host:port, got {args.base_url!r}")
    try:
        with open(args.tools, encoding="utf-8") as f:
            tools = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        die(f"{args.tools}: cannot read the tools ({e})")
    try:                          # fail in one line if nothing is listening
        conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=10)
        conn.request("GET", "/health")
        health = json.loads(conn.getresponse().read())
        conn.close()
    except (OSError, http.client.HTTPException, ValueError) as e:
        die(f"no server at {args.base_url} ({e}); start one with: python serve.py --ckpt out/demo/best.pt")
    path = "/tool-call" if args.endpoint == "tool-call" else "/v1/chat/completions"
    payloads = [json.dumps(body_for(args.endpoint, tools, r, args.max_tokens)).encode() for r in REQUESTS]
    print(f"loadtest: {args.clients} clients x {args.seconds:g} s -> {args.base_url}{path} "
          f"(model {health.get('model')}, {len(tools)} tools)")

    results, lock = [], threading.Lock()
    t0 = time.monotonic()
    deadline = t0 + args.seconds
    threads = [threading.Thread(target=client, args=(i, url, path, payloads, deadline, args.timeout, results, lock),
                                daemon=True) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0

    lat = sorted(1000 * s for s, err in results if err is None)
    errors = [err for _, err in results if err is not None]
    summary = {"requests": len(results), "ok": len(lat), "errors": len(errors),
               "seconds": round(elapsed, 2), "throughput_rps": round(len(lat) / elapsed, 2),
               "p50_ms": round(percentile(lat, 50), 1), "p90_ms": round(percentile(lat, 90), 1),
               "p99_ms": round(percentile(lat, 99), 1), "max_ms": round(lat[-1], 1) if lat else float("nan")}
    print(f"requests {summary['requests']}  errors {summary['errors']}  time {summary['seconds']} s  "
          f"throughput {summary['throughput_rps']} req/s")
    print(f"latency ms: p50 {summary['p50_ms']}  p90 {summary['p90_ms']}  p99 {summary['p99_ms']}  "
          f"max {summary['max_ms']}")
    if errors:
        print(f"first error: {errors[0]}")
    return summary


if __name__ == "__main__":
    main()
