"""
Load test a running serve.py: N clients, each sending requests back to back for a
fixed time; prints the request count, errors, throughput and latency percentiles.

    python serve.py --ckpt out/demo/best.pt                  # in another terminal
    python utils/loadtest.py                                       # 8 clients, 60 s, chat completions
    python utils/loadtest.py --seconds 5 --endpoint tool-call      # a quick check
    python utils/loadtest.py --stream                              # chat completions, streamed (SSE)
    python utils/loadtest.py --big_clients 2                       # + 2 clients sending ~1 MB bodies
    python utils/loadtest.py --clients 1 --model_ckpt out/demo/best.pt   # + the model alone, same requests

The server runs one model call at a time (the Router is not thread-safe), so with
8 closed-loop clients a request waits for the ~7 ahead of it: throughput is
1 / (time per model call), and the median latency about 8x that time. The run is
bounded: no request starts after --seconds, and each has a --timeout.

Meanwhile a prober GETs /health every --health_every seconds and reports its latency:
what a load balancer's health check sees. --big_clients adds clients that send, back
to back, a body of --big_tools small tools (4,000: ~0.9 MB, the body that stalled the
server for seconds in issue 17); their answers (4xx expected: over the tool limit) are
counted apart, and the prober and the normal clients show whether they hold anyone up.

--model_ckpt loads the server's checkpoint here and first times Router.answer on the
same requests in this process (--model_rounds rounds, the server idle meanwhile):
the model alone. The server's overhead is then the HTTP p50 minus the model's p50,
and the model-only rate (requests / seconds of Router.answer) is what the clients'
throughput is held against.
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


def body_for(endpoint, tools, request, max_tokens, stream=False):
    if endpoint == "tool-call":
        return {"prompt": request, "available_functions": tools, "max_tokens": max_tokens}
    body = {"model": "nanotool", "messages": [{"role": "user", "content": request}],
            "tools": tools, "max_tokens": max_tokens}
    return dict(body, stream=True) if stream else body


def big_body(n_tools):
    """Issue 17's stalling request: one user message and n_tools small tools."""
    tools = [{"type": "function", "function": {"name": f"tool_{i}", "description": f"Tool number {i}.",
                                               "parameters": {"type": "object", "properties": {
                                                   "x": {"type": "string", "description": "A value."}}}}}
             for i in range(n_tools)]
    return json.dumps({"model": "nanotool", "messages": [{"role": "user", "content": REQUESTS[0]}],
                       "tools": tools}).encode()


def client(i, url, path, payloads, deadline, timeout, out, lock, ok=(200,)):
    """One closed-loop client on a keep-alive connection; appends (latency s, error or
    None, status). A streamed answer must end with the [DONE] event."""
    conn, n = None, i            # clients start at different requests
    while time.monotonic() < deadline:
        if conn is None:
            conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=timeout)
        body = payloads[n % len(payloads)]
        n += 1
        t0 = time.perf_counter()
        status = None
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            data = r.read()
            status = r.status
            err = None if r.status in ok else f"HTTP {r.status}: {data[:200].decode('utf-8', 'replace')}"
            if err is None and r.getheader("content-type", "").startswith("text/event-stream") \
                    and not data.endswith(b"data: [DONE]\n\n"):
                err = "stream did not end with [DONE]"
        except (OSError, http.client.HTTPException) as e:
            err = f"{type(e).__name__}: {e}"
            conn.close()
            conn = None          # reconnect on the next request
        with lock:
            out.append((time.perf_counter() - t0, err, status))
    if conn is not None:
        conn.close()


def prober(url, every, deadline, timeout, out):
    """GET /health every `every` seconds on its own connection; appends (latency s, error)."""
    conn = None
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        try:
            conn = conn or http.client.HTTPConnection(url.hostname, url.port or 80, timeout=timeout)
            conn.request("GET", "/health")
            r = conn.getresponse()
            r.read()
            err = None if r.status == 200 else f"HTTP {r.status}"
        except (OSError, http.client.HTTPException) as e:
            err, conn = f"{type(e).__name__}: {e}", None
        dt = time.perf_counter() - t0
        out.append((dt, err))
        time.sleep(max(0.0, every - dt))


def latency_summary(prefix, seconds):
    lat = sorted(1000 * s for s in seconds)
    return {f"{prefix}p50_ms": round(percentile(lat, 50), 1), f"{prefix}p90_ms": round(percentile(lat, 90), 1),
            f"{prefix}p99_ms": round(percentile(lat, 99), 1),
            f"{prefix}max_ms": round(lat[-1], 1) if lat else float("nan")}


def time_model(ckpt, data_dir, tools, max_tokens, rounds):
    """Router.answer on REQUESTS in this process, after one warm-up round ->
    {"model_p50_ms", "model_rps"}: the model alone, without HTTP."""
    import wire
    from sample import Router
    router = Router(ckpt, data_dir)
    tools = wire.normalize_tools(tools)      # as the server's request checks hand them on
    for r in REQUESTS:
        router.answer(tools, r, max_tokens)
    lat = []
    for _ in range(rounds):
        for r in REQUESTS:
            t = time.perf_counter()
            router.answer(tools, r, max_tokens)
            lat.append(time.perf_counter() - t)
    return {"model_p50_ms": round(1000 * percentile(sorted(lat), 50), 2), "model_rps": round(len(lat) / sum(lat), 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base_url", default="http://127.0.0.1:8000", help="the server, without /v1")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--endpoint", choices=["chat", "tool-call"], default="chat")
    p.add_argument("--tools", default=os.path.join(ROOT, "examples", "tools.json"))
    p.add_argument("--max_tokens", type=int, default=64)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--stream", action="store_true", help="chat completions with \"stream\": true")
    p.add_argument("--health_every", type=float, default=0.05, help="seconds between /health probes (0: none)")
    p.add_argument("--big_clients", type=int, default=0, help="extra clients sending large bodies")
    p.add_argument("--big_tools", type=int, default=4000, help="tools in each large body")
    p.add_argument("--model_ckpt", default=None, help="also time the model alone on the same requests (see above)")
    p.add_argument("--data_dir", default=None, help="with --model_ckpt: default, the checkpoint's")
    p.add_argument("--model_rounds", type=int, default=20, help="with --model_ckpt: rounds of the 8 requests")
    args = p.parse_args(argv)

    if args.clients < 1 or args.seconds <= 0 or args.big_clients < 0 or args.health_every < 0:
        die("--clients and --seconds must be positive, --big_clients and --health_every not negative")
    if args.stream and args.endpoint != "chat":
        die("--stream is for --endpoint chat")
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
    payloads = [json.dumps(body_for(args.endpoint, tools, r, args.max_tokens, args.stream)).encode()
                 for r in REQUESTS]
    big = [big_body(args.big_tools)] if args.big_clients else []
    print(f"loadtest: {args.clients} clients x {args.seconds:g} s -> {args.base_url}{path}"
          f"{' (streamed)' if args.stream else ''} (model {health.get('model')}, {len(tools)} tools)"
          + (f"; + {args.big_clients} clients sending {len(big[0]):,}-byte bodies ({args.big_tools} tools)"
             if big else ""))

    model = time_model(args.model_ckpt, args.data_dir, tools, args.max_tokens, args.model_rounds) \
        if args.model_ckpt else {}
    if model:
        print(f"model alone: p50 {model['model_p50_ms']} ms, {model['model_rps']} req/s "
              f"({len(REQUESTS) * args.model_rounds} Router.answer calls in this process)")

    results, big_results, probes, lock = [], [], [], threading.Lock()
    t0 = time.monotonic()
    deadline = t0 + args.seconds
    threads = [threading.Thread(target=client, args=(i, url, path, payloads, deadline, args.timeout, results, lock),
                                daemon=True) for i in range(args.clients)]
    # a large body's answer is a 4xx (over the tool limit) or a 200: either is "served"
    threads += [threading.Thread(target=client, args=(i, url, "/v1/chat/completions", big, deadline, args.timeout,
                                                      big_results, lock, range(200, 500)), daemon=True)
                for i in range(args.big_clients)]
    if args.health_every:
        threads.append(threading.Thread(target=prober, args=(url, args.health_every, deadline, args.timeout, probes),
                                        daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0

    ok = [s for s, err, _ in results if err is None]
    errors = [err for _, err, _ in results if err is not None]
    summary = {"requests": len(results), "ok": len(ok), "errors": len(errors),
               "seconds": round(elapsed, 2), "throughput_rps": round(len(ok) / elapsed, 2),
               **latency_summary("", ok)}
    print(f"requests {summary['requests']}  errors {summary['errors']}  time {summary['seconds']} s  "
          f"throughput {summary['throughput_rps']} req/s")
    print(f"latency ms: p50 {summary['p50_ms']}  p90 {summary['p90_ms']}  p99 {summary['p99_ms']}  "
          f"max {summary['max_ms']}")
    if probes:
        summary.update(health_probes=len(probes), health_errors=sum(err is not None for _, err in probes),
                       **latency_summary("health_", [s for s, err in probes if err is None]))
        print(f"/health ms: p50 {summary['health_p50_ms']}  p99 {summary['health_p99_ms']}  "
              f"max {summary['health_max_ms']}  ({summary['health_probes']} probes, "
              f"{summary['health_errors']} errors)")
    if big:
        statuses = {}
        for _, _, st in big_results:
            statuses[st] = statuses.get(st, 0) + 1
        summary.update(big_requests=len(big_results), big_statuses=statuses,
                       big_errors=sum(err is not None for _, err, _ in big_results),
                       **latency_summary("big_", [s for s, err, _ in big_results if err is None]))
        print(f"large bodies: {summary['big_requests']} sent, statuses {statuses}, p50 {summary['big_p50_ms']} ms, "
              f"max {summary['big_max_ms']} ms")
    if model and ok:
        summary.update(model, overhead_p50_ms=round(summary["p50_ms"] - model["model_p50_ms"], 2),
                       rate_vs_model=round(summary["throughput_rps"] / model["model_rps"], 3))
        print(f"server overhead: p50 {summary['overhead_p50_ms']} ms (HTTP p50 - model p50); throughput "
              f"{summary['rate_vs_model']:.0%} of the model-only rate")
    if errors:
        print(f"first error: {errors[0]}")
    return summary


if __name__ == "__main__":
    main()
