"""Local stand-ins for the Gemini and OpenAI HTTP APIs, so teacher.py is tested
through the real SDKs and the real wire protocols without a network.

Each server answers by a small rule ("weather in X" -> get_weather(city=X),
anything else -> a text reason), unless a test scripted the next behaviours
for a request text: ("status", code), ("sleep", seconds), ("call", name, args),
("text", str), ("raw_args", str) for OpenAI's JSON-string arguments.
It counts the requests it received per user text.
"""

import json
import re
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def rule(text):
    """Default answer for a request text: a call, or a no-call reason."""
    m = re.search(r"weather in ([A-Z][\w ]*?)(?:[.?!]|$)", text)
    if m:
        return ("call", "get_weather", {"city": m.group(1)})
    return ("text", "Chit-chat.")


class Fake:
    """One running server. url is its base URL; script[text] is a list of behaviours
    used (front first) before falling back to rule(); counts[text] = requests seen."""

    def __init__(self, kind):
        self.kind, self.script, self.counts, self.requests = kind, defaultdict(list), Counter(), []
        self.lock, self.on_request = threading.Lock(), None
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.handle(self, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        host, port = self.server.server_address
        self.url = f"http://{host}:{port}" + ("/v1" if kind == "openai" else "")
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def handle(self, h, body):
        if self.kind == "gemini":
            ok_path = re.fullmatch(r"/v1(beta)?/models/[\w.\-]+:generateContent", h.path)
            text = body["contents"][0]["parts"][0]["text"]
        else:
            ok_path = h.path == "/v1/chat/completions"
            text = body["messages"][-1]["content"]
        with self.lock:
            self.counts[text] += 1
            self.requests.append((h.path, dict(h.headers), body))
            step = self.script[text].pop(0) if self.script[text] else rule(text)
        if self.on_request:
            self.on_request(self)
        if not ok_path:
            return self.send(h, 404, {"error": {"code": 404, "message": f"no route {h.path}"}})
        if step[0] == "sleep":
            time.sleep(step[1])
            step = rule(text)
        if step[0] == "status":
            code = step[1]
            return self.send(h, code, {"error": {"code": code, "message": f"fake {code}",
                                                 "status": "RESOURCE_EXHAUSTED" if code == 429 else "ERROR"}})
        self.send(h, 200, (self.gemini if self.kind == "gemini" else self.openai)(step, body))

    def send(self, h, code, obj):
        data = json.dumps(obj).encode()
        try:
            h.send_response(code)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and left

    @staticmethod
    def gemini(step, body):
        if step[0] == "call":
            parts = [{"functionCall": {"name": step[1], "args": step[2]}}]
        elif step[0] == "calls":
            parts = [{"functionCall": {"name": n, "args": a}} for n, a in step[1]]
        else:
            parts = [{"text": step[1]}]
        return {"candidates": [{"content": {"role": "model", "parts": parts},
                                "finishReason": "STOP", "index": 0}],
                "usageMetadata": {"promptTokenCount": 50, "candidatesTokenCount": 5,
                                  "totalTokenCount": 55},
                "modelVersion": "gemini-2.5-flash", "responseId": "fake-1"}

    @staticmethod
    def openai(step, body):
        message = {"role": "assistant", "content": None, "refusal": None}
        if step[0] in ("call", "calls", "raw_args"):
            calls = [(step[1], step[2])] if step[0] == "call" else step[1] if step[0] == "calls" \
                else [("get_weather", step[1])]
            message["tool_calls"] = [
                {"id": f"call_{i}", "type": "function",
                 "function": {"name": n, "arguments": a if isinstance(a, str) else json.dumps(a)}}
                for i, (n, a) in enumerate(calls)]
            finish = "tool_calls"
        else:
            message["content"] = step[1]
            finish = "stop"
        return {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                "model": body["model"], "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": {"prompt_tokens": 50, "completion_tokens": 5, "total_tokens": 55}}
