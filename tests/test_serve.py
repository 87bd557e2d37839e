"""serve.py against a live uvicorn server on a free port (in a background thread),
through the official openai client, curl and raw HTTP. The toy model is barely
trained, so the tests assert on the response structure and on what the constrained
decoder guarantees (valid calls, tool_choice honoured), not on which tool it picks.

The toy model never ends a string value (it writes spaces until the budget runs out,
and the router then declines), so the tests that need a call force one of EXTRA's
tools, whose answers always close: no arguments, or an enum. Exact multi-call
shaping, the fallback threshold and the agent loop use a FakeRouter with a scripted
result."""

import asyncio
import http.client
import importlib.util
import json
import math
import os
import shutil
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Literal

import pytest
import uvicorn
from openai import BadRequestError, OpenAI
from pydantic import BaseModel

import serve
import wire
from sample import Router

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "nanotool-toy"
TOOLS = json.load(open(os.path.join(ROOT, "examples", "tools.json")))
EXTRA = [{"type": "function", "function": {"name": "get_time", "description": "The current time.",
                                           "parameters": {"type": "object", "properties": {}}}},
         {"type": "function", "function": {
             "name": "set_mode", "description": "Switch the heater mode.",
             "parameters": {"type": "object", "properties": {"mode": {"type": "string", "enum": ["eco", "boost"]}},
                            "required": ["mode"]}}}]
ALL = TOOLS + EXTRA
BY_NAME = {t["name"]: t for t in wire.normalize_tools(ALL)}
ORDER = "Where is my order ORD-1234?"
CURL_BODY = ('{"prompt": "Where is my order ORD-1234?", "available_functions": [{"name": "track_order", '
             '"description": "Get the status of an order", "parameters": {"type": "object", "properties": '
             '{"order_id": {"type": "string"}}, "required": ["order_id"]}}], "max_tokens": 64}')


class Live:
    """A uvicorn server around app on a free port, in a daemon thread."""

    def __init__(self, app):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))      # the port is ours before the server starts: no race
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)

    def client(self):
        return OpenAI(base_url=self.url + "/v1", api_key="local", max_retries=0, timeout=60)

    def http(self, method, path, body=b"", headers=None):
        """Raw request -> (status, parsed JSON body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r.status, json.loads(data)


class FakeTeacher:
    """Stands in for teacher.make_teacher(...): scripted answers, counts its calls."""

    def __init__(self, answer=None, error=None):
        self.id, self.answer, self.error, self.calls = "fake:teacher", answer, error, 0

    def ask(self, tools, request, tool_choice="auto"):
        self.calls += 1
        if self.error:
            raise self.error
        return self.answer


class FakeRouter:
    """Stands in for sample.Router with a fixed result: answers the toy model will
    not give (two calls) still go through the whole HTTP path."""

    def __init__(self, result):
        self.result, self.model = result, SimpleNamespace(config=SimpleNamespace(block_size=512))
        self.catalogue = None                        # a catalogue-in-the-prompt model, as Router has it

    def answer(self, tools, request, max_new_tokens=128, constrain=True, tool_choice="auto"):
        if isinstance(self.result, Exception):
            raise self.result
        return dict(self.result, calls=list(self.result["calls"]))

    def encode_prompt(self, tools, request):
        return [0] * 7


ORDER_CALL = {"calls": [{"name": "track_order", "arguments": {"order_id": "ORD-1234"}}],
              "reason": None, "valid": True, "error": None, "text": "", "tokens": 9,
              "latency_ms": 1.0, "confidence": 0.9, "truncated": False}
TWO_CALLS = {"calls": [{"name": "track_order", "arguments": {"order_id": "ORD-1"}},
                       {"name": "set_timer", "arguments": {"minutes": 5}}],
             "reason": None, "valid": True, "error": None, "text": "", "tokens": 12,
             "latency_ms": 1.0, "confidence": 0.9, "truncated": False}


@pytest.fixture(scope="module")
def router(toy_ckpt):
    return Router(toy_ckpt)


@pytest.fixture(scope="module")
def live(router):
    # a 24-token budget: the toy model runs every answer to the budget, and this keeps it quick
    server = Live(serve.create_app(router, MODEL, max_new_tokens=24, max_request_bytes=64_000))
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(live):
    return live.client()


def ask(client, content, tools=TOOLS, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                          tools=tools, **kw)


def check_calls(resp, names=None):
    """Every tool call is well formed and validates against its tool; returns the calls.
    finish_reason "length": the token budget cut the answer after these calls."""
    choice = resp.choices[0]
    assert choice.message.content is None
    assert choice.finish_reason == "tool_calls" or (choice.finish_reason == "length" and resp.x_nanotool["truncated"])
    assert choice.message.tool_calls
    calls = []
    for tc in choice.message.tool_calls:
        assert tc.id.startswith("call_") and tc.type == "function"
        args = json.loads(tc.function.arguments)          # a JSON string that parses
        assert isinstance(args, dict)
        assert wire.validate_call({"name": tc.function.name, "arguments": args}, BY_NAME) is None
        assert names is None or tc.function.name in names
        calls.append({"name": tc.function.name, "arguments": args})
    assert len({tc.id for tc in choice.message.tool_calls}) == len(calls)
    return calls


def test_named_tool_choice_gives_valid_calls_of_that_tool(client, router):
    r = ask(client, ORDER, tools=ALL, tool_choice={"type": "function", "function": {"name": "set_mode"}})
    check_calls(r, {"set_mode"})
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    assert r.usage.prompt_tokens == len(router.encode_prompt(list(BY_NAME.values()), ORDER))
    assert 0 < r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    ext = r.x_nanotool
    assert ext["answered_by"] == MODEL and 0 < ext["confidence"] <= 1 and "fallback_error" not in ext
    # a tool without arguments: "{}" (the toy model would call it again and again; the
    # decoder never writes a call twice, so the server has no duplicate to drop)
    r = ask(client, ORDER, tools=ALL, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert check_calls(r, {"get_time"}) == [{"name": "get_time", "arguments": {}}]
    assert not r.x_nanotool.get("duplicates_dropped")
    # a string tool: the toy model never closes the value, so the budget cuts the answer:
    # "length", with the call as far as it was complete, or a decline
    r = ask(client, ORDER, tools=ALL, tool_choice={"type": "function", "function": {"name": "track_order"}})
    c = r.choices[0]
    assert c.finish_reason == "length" and r.x_nanotool["truncated"]
    assert bool(c.message.tool_calls) != bool(c.message.content)


def test_required_gives_calls_and_none_gives_a_reason(client):
    check_calls(ask(client, "hello, nice weather today", tools=EXTRA, tool_choice="required"), {"get_time", "set_mode"})
    r = ask(client, ORDER, tool_choice="none")
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    # the grammar allows only the fixed reasons (or a missing argument by name)
    assert wire.reason_kind(r.choices[0].message.content) != "other"


def test_auto_with_every_role_and_text_parts(client):
    messages = [{"role": "system", "content": "You route requests."},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "chit-chat"},
                {"role": "user", "content": [{"type": "text", "text": "Where is my order"},
                                             {"type": "text", "text": "ORD-1234?"}]}]
    r = client.chat.completions.create(model="anything", messages=messages, tools=ALL, max_tokens=16)
    if r.choices[0].message.tool_calls:
        check_calls(r)
    else:
        assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.content


def test_last_message_a_tool_result_ends_the_turn_without_the_model(client, router):
    messages = [{"role": "user", "content": ORDER},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "track_order", "arguments": '{"order_id": "ORD-1234"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "shipped"}'}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="required")
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert r.choices[0].message.content == '{"status": "shipped"}'
    # usage: no model ran, so nothing was generated; the prompt is what the answer was decided on
    assert r.usage.completion_tokens == 0 and "tool result" in r.x_nanotool["note"]
    assert r.usage.prompt_tokens == len(router.encode_prompt(wire.normalize_tools(TOOLS), '{"status": "shipped"}'))
    two = messages + [{"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "done 2"}]}]
    r = client.chat.completions.create(model=MODEL, messages=two, tools=TOOLS)
    assert r.choices[0].message.content == '{"status": "shipped"}\ndone 2'


def test_no_tools_is_a_no_call_without_the_model(client, router):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ORDER}])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == wire.REASON_NO_TOOL
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(router.encode_prompt([], ORDER)) > 0


def test_multi_call_shaping():
    # The toy model cannot be made to write two calls, so the shaping is tested on a
    # scripted router result: directly, and through HTTP with a FakeRouter.
    ans = dict(TWO_CALLS, answered_by=MODEL, prompt_tokens=7, completion_tokens=12)
    out = serve.chat_response(ans)
    tcs = out["choices"][0]["message"]["tool_calls"]
    assert [tc["function"]["name"] for tc in tcs] == ["track_order", "set_timer"]
    assert [json.loads(tc["function"]["arguments"]) for tc in tcs] == [c["arguments"] for c in TWO_CALLS["calls"]]
    assert len({tc["id"] for tc in tcs}) == 2 and out["choices"][0]["finish_reason"] == "tool_calls"
    flat = serve.tool_call_response(ans)
    assert flat["function_name"] == "track_order" and flat["parameters"] == {"order_id": "ORD-1"}
    assert len(flat["calls"]) == 2 and flat["no_tool_reason"] is None
    cut = serve.chat_response(dict(ans, calls=[], reason=wire.REASON_NO_TOOL, truncated=True))
    assert cut["choices"][0]["finish_reason"] == "length" and cut["choices"][0]["message"]["content"]
    server = Live(serve.create_app(FakeRouter(TWO_CALLS), MODEL))
    try:
        c = server.client()
        r = ask(c, "track ORD-1 and set a 5 minute timer")
        assert [x["name"] for x in check_calls(r)] == ["track_order", "set_timer"]
        r = ask(c, "track ORD-1 and set a 5 minute timer", parallel_tool_calls=False)
        assert [x["name"] for x in check_calls(r)] == ["track_order"]
    finally:
        server.close()


def test_models_health_and_the_curl_example(live):
    models = live.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    status, health = live.http("GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["model"] == MODEL and health["fallback"] is None
    # the README's curl example, byte for byte (curl is on this machine; else the same bytes via http.client)
    if shutil.which("curl"):
        out = subprocess.run(["curl", "-s", f"localhost:{live.port}/tool-call", "-H", "Content-Type: application/json",
                              "-d", CURL_BODY], capture_output=True, text=True, timeout=60, check=True).stdout
        r = json.loads(out)
    else:
        status, r = live.http("POST", "/tool-call", CURL_BODY.encode())
        assert status == 200
    assert set(r) >= {"function_name", "parameters", "confidence", "calls", "no_tool_reason", "model"}
    assert r["model"] == MODEL and 0 < r["confidence"] <= 1
    if r["function_name"] is None:
        assert r["calls"] == [] and r["parameters"] is None and r["no_tool_reason"]
    else:
        assert r["function_name"] == "track_order" and r["calls"][0]["arguments"] == r["parameters"]
        assert "order_id" in r["parameters"] and r["no_tool_reason"] is None
    status, r = live.http("POST", "/tool-call", json.dumps(
        {"prompt": ORDER, "available_functions": EXTRA, "tool_choice": "required"}).encode())
    assert status == 200 and r["function_name"] in ("get_time", "set_mode")


def test_fallback_to_a_fake_teacher(router):
    good = {"calls": [{"name": "track_order", "arguments": {"order_id": "ORD-1234"}}], "text": None}
    teacher = FakeTeacher(good)
    server = Live(serve.create_app(router, MODEL, teacher=teacher, fallback_below=1.01, max_new_tokens=24))
    try:                                              # 1.01: every answer is below it
        c = server.client()
        r = ask(c, ORDER)
        assert teacher.calls == 1 and r.model == "fake:teacher" and r.x_nanotool["answered_by"] == "fake:teacher"
        assert 0 < r.x_nanotool["confidence"] <= 1     # the local model's, which sent it on
        assert check_calls(r) == good["calls"]
        status, flat = server.http("POST", "/tool-call", json.dumps({"prompt": ORDER, "available_functions": TOOLS}).encode())
        assert status == 200 and flat["model"] == "fake:teacher" and flat["parameters"] == {"order_id": "ORD-1234"}
        r = ask(c, ORDER, tool_choice="none")           # no call wanted: nothing to ask
        assert teacher.calls == 2 and r.model == MODEL
        teacher.answer = {"calls": [{"name": "track_order", "arguments": {"order_id": "ORD-999"}}], "text": None}
        r = ask(c, ORDER)                               # not in the request: rejected, local answer stands
        assert r.model == MODEL and "ungrounded" in r.x_nanotool["fallback_error"]
        teacher.answer = good                           # names a tool other than the one required
        r = ask(c, ORDER, tools=ALL, tool_choice={"type": "function", "function": {"name": "set_mode"}})
        assert r.model == MODEL and "unknown_tool" in r.x_nanotool["fallback_error"]
        check_calls(r, {"set_mode"})
        teacher.error = TimeoutError("teacher timed out")
        r = ask(c, ORDER)
        assert r.model == MODEL and "timed out" in r.x_nanotool["fallback_error"]
    finally:
        server.close()


def test_fallback_threshold():
    fake = FakeRouter(ORDER_CALL)
    teacher = FakeTeacher({"calls": [], "text": "No tool fits."})
    server = Live(serve.create_app(fake, MODEL, teacher=teacher, fallback_below=0.5))
    try:
        c = server.client()
        r = ask(c, ORDER)                               # confidence 0.9: kept
        assert teacher.calls == 0 and r.model == MODEL and check_calls(r) == ORDER_CALL["calls"]
        fake.result = dict(ORDER_CALL, confidence=0.3)  # below 0.5: the teacher's no-call wins
        r = ask(c, ORDER)
        assert teacher.calls == 1 and r.model == "fake:teacher" and r.x_nanotool["confidence"] == 0.3
        assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == wire.REASON_NO_TOOL
        status, health = server.http("GET", "/health")
        assert health["fallback"] == "fake:teacher" and health["fallback_below"] == 0.5
    finally:
        server.close()


def test_router_failures_are_contained():
    fake = FakeRouter(dict(ORDER_CALL, valid=False, error="track_order: 'order_id' is a required property"))
    server = Live(serve.create_app(fake, MODEL))
    try:
        c = server.client()
        r = ask(c, ORDER)                       # an invalid answer is never sent on as a call
        assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == wire.REASON_NO_TOOL
        assert "required property" in r.x_nanotool["local_error"]
        fake.result = RuntimeError("CUDA fell over")
        status, body = server.http("POST", CHAT, json.dumps(_chat()).encode())
        assert status == 500 and body["error"]["message"] == "internal error (RuntimeError: CUDA fell over)"
        fake.result = ORDER_CALL                # the model thread survived it
        assert check_calls(ask(c, ORDER)) == ORDER_CALL["calls"]
    finally:
        server.close()


def _chat(**over):
    body = {"model": MODEL, "messages": [{"role": "user", "content": ORDER}], "tools": TOOLS}
    body.update(over)
    return {k: v for k, v in body.items() if v is not None}


def _tool(**over):
    fn = {"name": "lookup", "description": "Look something up.",
          "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}
    fn.update(over)
    return {"type": "function", "function": fn}


def _params(**props):
    return {"type": "object", "properties": props}


def _nest(key, n):
    """A parameter schema n levels deep: objects in objects ("properties") or lists of lists ("items")."""
    p = {"type": "string"}
    for _ in range(n):
        p = {"type": "object", "properties": {"a": p}} if key == "properties" else {"type": "array", "items": p}
    return p


CHAT, FLAT = "/v1/chat/completions", "/tool-call"
LONG = "order " * 3000    # ~3000 tokens against a 512-token context, well under the 64 kB limit:
                          # refused by its length in characters, before it is tokenized
MEDIUM = "order " * 1000  # ~1000 tokens: refused when the model's thread tokenizes it
MALFORMED = [  # (path, body: bytes or a JSON value, expected status, words the message must contain)
    (CHAT, b'{"messages": [', 400, "not valid JSON"),
    (CHAT, b"", 400, "empty"),
    (CHAT, b"[1, 2]", 400, "must be a JSON object"),
    (CHAT, b'"hello"', 400, "must be a JSON object"),
    (CHAT, b"[" * 30000 + b"]" * 30000, 400, "nested too deeply"),
    (CHAT, b'{"messages": "\xff\xfe"}', 400, "UTF-8"),
    (CHAT, b"x" * 70000, 413, "limit"),
    (CHAT, _chat(messages=None), 400, "'messages' must be a non-empty list"),
    (CHAT, _chat(messages="hi"), 400, "'messages' must be a non-empty list"),
    (CHAT, _chat(messages=[]), 400, "'messages' must be a non-empty list"),
    (CHAT, _chat(messages=["hi"]), 400, "messages[0] must be an object"),
    (CHAT, _chat(messages=[{"content": "hi"}]), 400, "messages[0].role"),
    (CHAT, _chat(messages=[{"role": "robot", "content": "hi"}]), 400, "messages[0].role"),
    (CHAT, _chat(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content must be a string"),
    (CHAT, _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     400, "content[0]"),
    (CHAT, _chat(messages=[{"role": "user", "content": [{"type": "text", "text": 7}]}]), 400, "content[0]"),
    (CHAT, _chat(messages=[{"role": "system", "content": "be brief"}]), 400, "no user message"),
    (CHAT, _chat(messages=[{"role": "user", "content": "   "}]), 400, "empty"),
    (CHAT, _chat(messages=[{"role": "user", "content": LONG}]), 400, "context"),
    (CHAT, _chat(tools={"name": "lookup"}), 400, "'tools' must be a list"),
    (CHAT, _chat(tools=[_tool(name=None)]), 400, "missing 'name'"),
    (CHAT, _chat(tools=[_tool(name="bad name!")]), 400, "name must be"),
    (CHAT, _chat(tools=[{"type": "function", "function": "lookup"}]), 400, "'function' must be an object"),
    (CHAT, _chat(tools=[_tool(parameters={"type": "array"})]), 400, "parameters.type must be 'object'"),
    (CHAT, _chat(tools=[_tool(parameters={**_params(q={"type": "string"}), "required": ["id"]})]),
     400, "not among its properties"),
    (CHAT, _chat(tools=[_tool(parameters=_params(q={"type": "strng"}))]), 400, "unknown type"),
    (CHAT, _chat(tools=[_tool(parameters=_params(q={"type": {"x": 1}}))]), 400, "unknown type"),
    (CHAT, _chat(tools=[_tool(parameters=_params(q={"type": "integer", "minimum": "a"}))]), 400, "invalid JSON Schema"),
    (CHAT, _chat(tools=[_tool(), _tool()]), 400, "defined more than once"),
    (CHAT, _chat(tool_choice="sometimes"), 400, "tool_choice must be"),
    (CHAT, _chat(tool_choice={"type": "function"}), 400, "tool_choice must be"),
    (CHAT, _chat(tool_choice={"type": "function", "function": {"name": "fly"}}), 400, "not among the tools"),
    (CHAT, _chat(tools=None, tool_choice="required"), 400, "needs tools"),
    (CHAT, _chat(max_tokens="ten"), 400, "'max_tokens' must be a positive integer"),
    (CHAT, _chat(max_tokens=0), 400, "'max_tokens' must be a positive integer"),
    (CHAT, _chat(max_completion_tokens=True), 400, "'max_completion_tokens' must be a positive integer"),
    (CHAT, _chat(n=3), 400, "'n' must be 1"),
    (CHAT, _chat(model=123), 400, "'model' must be a string"),
    (CHAT, _chat(parallel_tool_calls="yes"), 400, "'parallel_tool_calls' must be a boolean"),
    (FLAT, {"available_functions": TOOLS}, 400, "'prompt' must be a non-empty string"),
    (FLAT, {"prompt": 5, "available_functions": TOOLS}, 400, "'prompt' must be a non-empty string"),
    (FLAT, {"prompt": " ", "available_functions": TOOLS}, 400, "'prompt' must be a non-empty string"),
    (FLAT, {"prompt": ORDER}, 400, "'available_functions' is missing"),
    (FLAT, {"prompt": ORDER, "available_functions": {"name": "x"}}, 400, "must be a list"),
    (FLAT, {"prompt": ORDER, "available_functions": [{"description": "x"}]}, 400, "tool #0: missing 'name'"),
    (FLAT, {"prompt": ORDER, "available_functions": TOOLS, "max_tokens": -5}, 400, "'max_tokens'"),
    (FLAT, {"prompt": LONG, "available_functions": TOOLS}, 400, "context"),
    (CHAT, _chat(messages=[{"role": "user", "content": MEDIUM}]), 400, "context"),
    (FLAT, {"prompt": MEDIUM, "available_functions": TOOLS}, 400, "context"),
    # the eight 500s: deep schemas (both endpoints), 5,000 digits, lone surrogates
    (CHAT, _chat(tools=[_tool(parameters=_params(q=_nest("properties", 100)))]), 400, "nested more than 32 levels"),
    (CHAT, _chat(tools=[_tool(parameters=_params(q=_nest("items", 300)))]), 400, "nested more than 32 levels"),
    (FLAT, {"prompt": ORDER, "available_functions": [_tool(parameters=_params(q=_nest("properties", 100)))]},
     400, "nested more than 32 levels"),
    (FLAT, {"prompt": ORDER, "available_functions": [_tool(parameters=_params(q=_nest("items", 300)))]},
     400, "nested more than 32 levels"),
    (CHAT, json.dumps(_chat())[:-1].encode() + b', "max_tokens": ' + b"9" * 5000 + b"}", 400, "5000 digits"),
    (CHAT, _chat(messages=[{"role": "user", "content": "where is \ud800 ORD-1"}]), 400, "lone surrogate"),
    (CHAT, _chat(tools=[_tool(description="Look \ud800 up")]), 400, "lone surrogate"),
    (FLAT, {"prompt": "where is \udfff", "available_functions": TOOLS}, 400, "lone surrogate"),
    (CHAT, _chat(messages=[{"role": "user", "content": "hi"}, {"role": "tool", "content": "\ud800"}]),
     400, "lone surrogate"),
    (CHAT, json.dumps(_chat(messages=[{"role": "user", "content": "\ud800"}])).encode("utf-16"), 400, "UTF-8"),
    # other numbers JSON or Python cannot carry, and the limits
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "NaN is not a JSON value"),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}', 400, "out of range"),
    (CHAT, _chat(tools=[_tool(name=f"t{i}") for i in range(300)]), 400, "the limit is 256"),
    (CHAT, _chat(tools=[_tool(parameters=_params(q={"enum": [0] * 10_001}))]), 400, "more than 10000 JSON values"),
    # names and values an answer cannot carry: refused, never accepted and then uncallable
    (CHAT, _chat(tools=[_tool(name="get_time\n")]), 400, "name must be"),
    (CHAT, _chat(tools=[_tool(parameters=_params(**{"": {"type": "string"}}))]), 400, "argument name '' is empty"),
    (CHAT, _chat(tools=[_tool(parameters=_params(**{"a:b": {"type": "string"}}))]), 400, "'a:b' contains ':'"),
    (CHAT, _chat(tools=[_tool(parameters=_params(**{"q<|call|>": {"type": "string"}}))]), 400, "special token (<|call|>)"),
    (CHAT, _chat(tools=[_tool(parameters=_params(**{"a\u2581b": {"type": "string"}}))]), 400, "U+2581"),
    (CHAT, _chat(tools=[_tool(parameters=_params(q={"type": "string", "enum": ["eco<|end|>", "boost"]}))]),
     400, "enum value 'eco<|end|>', which contains a special token"),
    (CHAT, _chat(tools=[_tool(parameters=_params(q={"type": "string", "enum": ["", "boost"]}))]), 400, "is empty"),
    (CHAT, _chat(tools=[_tool(parameters=_params(q={"type": "string", "enum": ["eco ", "boost"]}))]),
     400, "ends with white space"),
    (CHAT, _chat(tools=[_tool(parameters=_params(q={"type": "array", "items": {"enum": [1, "<|arg|>"]}}))]),
     400, "special token"),
    (CHAT, _chat(tools=[_tool(parameters=_params(q={"type": "array", "items": {"$ref": "#/$defs/Q"}}))]),
     400, "points to nothing"),
    (CHAT, _chat(tools=[_tool(parameters=_params(q={"type": "string", "pattern": "^(a+)+$"}))]), 400, "exponential"),
    # OpenAI fields: honoured, or checked and refused
    (CHAT, _chat(temperature=3), 400, "'temperature' must be a number from 0 to 2"),
    (CHAT, _chat(temperature="hot"), 400, "'temperature' must be a number"),
    (CHAT, _chat(top_p=1.5), 400, "'top_p' must be a number from 0 to 1"),
    (CHAT, _chat(frequency_penalty=-9), 400, "'frequency_penalty'"),
    (CHAT, _chat(seed="x"), 400, "'seed' must be a 64-bit integer"),
    (CHAT, _chat(seed=2 ** 64), 400, "'seed' must be a 64-bit integer"),
    (CHAT, _chat(stop=5), 400, "'stop' must be"),
    (CHAT, _chat(stop=["a", "b", "c", "d", "e"]), 400, "'stop' must be"),
    (CHAT, _chat(logprobs="yes"), 400, "'logprobs' must be a boolean"),
    (CHAT, _chat(logprobs=True, top_logprobs=21), 400, "'top_logprobs' must be an integer from 0 to 20"),
    (CHAT, _chat(top_logprobs=2), 400, "needs \"logprobs\": true"),
    (CHAT, _chat(response_format={"type": "json_object"}), 400, "'json_object' is not supported"),
    (CHAT, _chat(response_format="text"), 400, "'response_format' must be"),
    (CHAT, _chat(logit_bias={"5": 10}), 400, "'logit_bias' is not supported"),
    (CHAT, _chat(functions=[{"name": "lookup"}]), 400, "deprecated"),
    (CHAT, _chat(modalities=["audio"]), 400, "only text output"),
    (CHAT, _chat(stream="yes"), 400, "'stream' must be a boolean"),
    (CHAT, _chat(stream_options={"include_usage": True}), 400, "only allowed with"),
    (CHAT, _chat(stream=True, stream_options={"include_usage": "yes"}), 400, "'stream_options' must be"),
]
CODES = {"not valid JSON": "invalid_json", "limit": "request_too_large", "context": "context_length_exceeded",
         "nested more than 32 levels": "limit_exceeded", "the limit is 256": "limit_exceeded",
         "name must be": "invalid_tool", "'json_object' is not supported": "unsupported_value",
         "'logit_bias' is not supported": "unsupported_parameter"}   # words -> error.code


def test_malformed_requests_get_a_4xx_with_a_message_then_a_good_one_works(live, client):
    assert len(MALFORMED) >= 90
    for path, body, status, words in MALFORMED:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        got, r = live.http("POST", path, raw)
        what = f"{path} {raw[:80]!r}"
        assert got == status, f"{what}: HTTP {got} {r}"
        assert words in r["error"]["message"], f"{what}: {r}"
        code = r["error"]["code"]
        assert isinstance(code, str) and code and r["error"]["type"] == "invalid_request_error", f"{what}: {r}"
        assert code == CODES.get(words, code), f"{what}: code {code}"
    for method, path, status in [("GET", FLAT, 405), ("POST", "/v1/nope", 404), ("DELETE", "/health", 405)]:
        got, r = live.http(method, path)
        assert got == status and r["error"]["message"] and r["error"]["code"]
    # the same through the openai client: a readable BadRequestError, not a crash
    with pytest.raises(BadRequestError, match="not among the tools"):
        ask(client, ORDER, tool_choice={"type": "function", "function": {"name": "fly"}})
    check_calls(ask(client, ORDER, tools=EXTRA, tool_choice="required"))


def test_chunked_body_over_the_limit_is_refused(live):
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=60)
    conn.request("POST", CHAT, body=iter([b"[" + b"1," * 20000, b"1]"] * 2), encode_chunked=True,
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 413 and "limit" in json.loads(r.read())["error"]["message"]
    conn.close()


def test_concurrent_requests_match_serial_ones(live, client):
    # Model calls share one Router (and its KV prefix cache): serialized, each answer
    # must be the one it gets alone, whatever catalogue ran just before it.
    catalogues = [ALL, EXTRA, TOOLS[:3]]
    jobs = [(catalogues[i % 3], req) for i, req in
            enumerate([ORDER, "weather in Paris", "set a timer for 10 minutes", "hi there", "eco mode", "time?"])]

    def run(job):
        tools, req = job
        m = ask(client, req, tools=tools, max_tokens=16).choices[0].message
        return m.content, [(tc.function.name, tc.function.arguments) for tc in m.tool_calls or []]

    serial = [run(j) for j in jobs]
    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(run, jobs)) == serial


def test_agent_loop_example(capsys):
    spec = importlib.util.spec_from_file_location("agent_loop", os.path.join(ROOT, "examples", "agent_loop.py"))
    agent_loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(agent_loop)
    server = Live(serve.create_app(FakeRouter(ORDER_CALL), MODEL))
    try:
        agent_loop.main(["--base_url", server.url + "/v1", "--prompt", ORDER, "--stream"])
        streamed = capsys.readouterr().out
        agent_loop.main(["--base_url", server.url + "/v1", "--prompt", ORDER])
    finally:
        server.close()
    out = capsys.readouterr().out
    assert streamed == out                         # streamed or not, the same loop and answers
    lines = out.splitlines()
    assert lines[0] == f"user: {ORDER}"
    assert lines[1] == f'assistant [{MODEL}] calls track_order({{"order_id": "ORD-1234"}})'
    assert lines[2].startswith('tool track_order -> {"order_id": "ORD-1234", "status": ')
    assert lines[3] == f"assistant [{MODEL}, finish_reason stop]: " + lines[2].split(" -> ", 1)[1]
    with pytest.raises(SystemExit) as e:           # the server is gone now
        agent_loop.main(["--base_url", server.url + "/v1"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: no server at")


def test_loadtest_runs_against_the_server(live):
    from utils import loadtest
    s = loadtest.main(["--base_url", live.url, "--clients", "2", "--seconds", "1", "--max_tokens", "16"])
    assert s["requests"] >= 2 and s["errors"] == 0 and s["p50_ms"] <= s["p99_ms"] <= s["max_ms"]
    assert s["health_probes"] >= 5 and s["health_errors"] == 0 and s["health_p50_ms"] <= s["health_max_ms"]
    # streamed, with a client sending large bodies (over this server's 64 kB limit: 413s)
    s = loadtest.main(["--base_url", live.url, "--clients", "2", "--seconds", "1", "--max_tokens", "16",
                       "--stream", "--big_clients", "1", "--big_tools", "600"])
    assert s["requests"] >= 2 and s["errors"] == 0 and s["health_errors"] == 0
    assert s["big_requests"] >= 1 and s["big_errors"] == 0 and set(s["big_statuses"]) == {413}


def test_loadtest_times_the_model_alone_on_the_same_requests(live, toy_ckpt):
    from utils import loadtest
    s = loadtest.main(["--base_url", live.url, "--clients", "1", "--seconds", "1", "--max_tokens", "8",
                       "--health_every", "0", "--model_ckpt", toy_ckpt, "--model_rounds", "1"])
    assert s["errors"] == 0 and s["model_p50_ms"] > 0 and s["model_rps"] > 0
    assert s["overhead_p50_ms"] == round(s["p50_ms"] - s["model_p50_ms"], 2)
    assert s["rate_vs_model"] == round(s["throughput_rps"] / s["model_rps"], 3) > 0


def test_cli_starts_the_app_and_bad_flags_are_one_line(toy_ckpt, monkeypatch, capsys):
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(app=app, **kw))
    serve.main(["--ckpt", toy_ckpt, "--port", "8123", "--max_new_tokens", "16"])
    assert started["host"] == "127.0.0.1" and started["port"] == 8123
    server = Live(started["app"])                  # the app main() built, served for real
    try:
        assert server.http("GET", "/health")[1]["model"] == "nanotool-toy"   # from the checkpoint's dir
        r = ask(server.client(), ORDER, tools=EXTRA, tool_choice="required", max_tokens=500)
        assert r.usage.completion_tokens <= 16                               # capped by --max_new_tokens
    finally:
        server.close()
    with pytest.raises(SystemExit) as e:
        serve.main(["--help"])
    assert e.value.code == 0 and "curl -s localhost:8000/tool-call" in capsys.readouterr().out
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    for argv, words in [(["--ckpt", "no/such.pt"], "no such checkpoint"),
                        (["--ckpt", toy_ckpt, "--fallback_below", "2"], "between 0 and 1"),
                        (["--ckpt", toy_ckpt, "--fallback", "openai"], "no API key")]:
        with pytest.raises(SystemExit) as e:
            serve.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error:") and words in err and err.count("\n") == 1


# -----------------------------------------------------------------------------
# streaming, LangChain, the OpenAI fields, the request log, a slow body

FORCE_MODE = {"type": "function", "function": {"name": "set_mode"}}


def sse(live, body):
    """POST a streaming chat request -> (status, content type, the parsed events before [DONE])."""
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=60)
    conn.request("POST", CHAT, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    blocks = text.split("\n\n")
    assert blocks[-2:] == ["data: [DONE]", ""], text[-200:]   # every event is one "data:" line
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks[:-1])
    return r.status, r.getheader("content-type"), [json.loads(b[6:]) for b in blocks[:-2]]


def test_streaming_matches_the_plain_answer(live, client):
    whole = ask(client, ORDER, tools=EXTRA, tool_choice=FORCE_MODE)
    status, ctype, events = sse(live, _chat(tools=EXTRA, tool_choice=FORCE_MODE, stream=True,
                                            stream_options={"include_usage": True}))
    assert status == 200 and ctype.startswith("text/event-stream")
    assert len({e["id"] for e in events}) == 1 and all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    *body, finish, usage = events
    assert finish["choices"][0]["finish_reason"] == whole.choices[0].finish_reason and finish["choices"][0]["delta"] == {}
    assert usage["choices"] == [] and usage["usage"] == whole.usage.model_dump(exclude_none=True)
    assert all(e["usage"] is None for e in events[:-1])     # OpenAI: only the last chunk has it
    # each call: id, type and name with empty arguments, then the arguments
    deltas = [tc for e in body for tc in e["choices"][0]["delta"].get("tool_calls", [])]
    assert deltas[0]["id"].startswith("call_") and deltas[0]["function"] == {"name": "set_mode", "arguments": ""}
    args = "".join(d["function"]["arguments"] for d in deltas if d["index"] == 0)
    assert json.loads(args) == json.loads(whole.choices[0].message.tool_calls[0].function.arguments)
    # the official client's stream=True: the same answer, accumulated
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ORDER}], tools=EXTRA,
                                            tool_choice=FORCE_MODE, stream=True)
    chunks = list(stream)
    calls = {}
    for ch in chunks:
        for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            c = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            c["name"] += tc.function.name or ""
            c["arguments"] += tc.function.arguments or ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
        [(tc.function.name, json.loads(tc.function.arguments)) for tc in whole.choices[0].message.tool_calls]
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    # a no-call streams its reason as content
    status, _, events = sse(live, _chat(tool_choice="none", stream=True))
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert text == ask(client, ORDER, tool_choice="none").choices[0].message.content and text
    assert events[-1]["choices"][0]["finish_reason"] == "stop" and "usage" not in events[-1]


def test_streaming_with_the_official_stream_helper():
    # The helper parses the final completion, and refuses one cut by the token budget
    # (finish_reason "length", which the toy model's forced calls always are): scripted.
    server = Live(serve.create_app(FakeRouter(TWO_CALLS), MODEL))
    try:
        c = server.client()
        with c.chat.completions.stream(model=MODEL, messages=[{"role": "user", "content": ORDER}], tools=TOOLS,
                                       stream_options={"include_usage": True}) as stream:
            kinds = [e.type for e in stream]
            final = stream.get_final_completion()
        assert kinds.count("tool_calls.function.arguments.done") == 2
        assert [(tc.function.name, json.loads(tc.function.arguments)) for tc in final.choices[0].message.tool_calls] \
            == [(x["name"], x["arguments"]) for x in TWO_CALLS["calls"]]
        assert final.choices[0].finish_reason == "tool_calls" and final.usage.completion_tokens == 12
        r = ask(c, ORDER, stream=True, parallel_tool_calls=False)
        assert sum(len(ch.choices[0].delta.tool_calls or []) for ch in r if ch.choices) == 2   # name chunk + args chunk
    finally:
        server.close()


def test_langchain_bind_tools_invoke_and_stream(live):
    from langchain_openai import ChatOpenAI
    llm = ChatOpenAI(base_url=live.url + "/v1", api_key="local", model=MODEL, max_retries=0, timeout=60)
    bound = llm.bind_tools(EXTRA, tool_choice="set_mode")
    msg = bound.invoke(ORDER)
    assert [(c["name"], c["args"]) for c in msg.tool_calls] == [("set_mode", msg.tool_calls[0]["args"])]
    assert msg.tool_calls[0]["args"]["mode"] in ("eco", "boost")
    total = None
    for chunk in bound.stream(ORDER):
        total = chunk if total is None else total + chunk
    assert [(c["name"], c["args"]) for c in total.tool_calls] == [(c["name"], c["args"]) for c in msg.tool_calls]
    assert total.response_metadata["finish_reason"] == msg.response_metadata["finish_reason"]
    # astream_events (async, over the stream) and with_structured_output (a forced tool)

    async def events():
        return [e async for e in bound.astream_events(ORDER, version="v2")]
    evs = asyncio.run(events())
    assert any(e["event"] == "on_chat_model_stream" for e in evs)
    end = [e["data"]["output"] for e in evs if e["event"] == "on_chat_model_end"]
    assert [(c["name"], c["args"]) for c in end[0].tool_calls] == [(c["name"], c["args"]) for c in msg.tool_calls]

    class set_mode(BaseModel):
        """Switch the heater mode."""
        mode: Literal["eco", "boost"]
    assert llm.with_structured_output(set_mode, method="function_calling").invoke(ORDER).mode in ("eco", "boost")
    # usage in the stream (stream_options.include_usage), and a plain text answer
    total = None
    for chunk in ChatOpenAI(base_url=live.url + "/v1", api_key="local", model=MODEL, max_retries=0,
                            stream_usage=True).bind_tools(TOOLS, tool_choice="none").stream(ORDER):
        total = chunk if total is None else total + chunk
    assert total.content and not total.tool_calls and wire.reason_kind(total.content) != "other"
    assert total.usage_metadata["input_tokens"] > 0 and total.usage_metadata["output_tokens"] > 0


def test_logprobs_are_the_models_own(live, client, router):
    r = ask(client, ORDER, tools=EXTRA, tool_choice=FORCE_MODE, logprobs=True, top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    text = b"".join(bytes(e.bytes) for e in entries).decode()
    call = r.choices[0].message.tool_calls[0]
    assert text.startswith(f"{wire.CALL}set_mode{wire.ARG} mode: {json.loads(call.function.arguments)['mode']}")
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True) and tops[0] >= e.logprob
        if e.token in [t.token for t in e.top_logprobs]:
            assert e.logprob in tops
    # the same answer as without logprobs, and the probabilities sum to at most 1 per position
    plain = ask(client, ORDER, tools=EXTRA, tool_choice=FORCE_MODE)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.tool_calls[0].function.arguments == call.function.arguments
    assert all(sum(math.exp(t.logprob) for t in e.top_logprobs) <= 1 + 1e-6 for e in entries)
    # streamed: the entries ride on the first tool-call chunk
    status, _, events = sse(live, _chat(tools=EXTRA, tool_choice=FORCE_MODE, stream=True, logprobs=True))
    lps = [e["choices"][0]["logprobs"] for e in events if e["choices"][0]["logprobs"]]
    assert len(lps) == 1 and [x["logprob"] for x in lps[0]["content"]] == pytest.approx([e.logprob for e in entries])


def test_sampling_fields_are_checked_and_ignored_stop_cuts_text(client):
    base = ask(client, ORDER, tools=EXTRA, tool_choice=FORCE_MODE)
    same = ask(client, ORDER, tools=EXTRA, tool_choice=FORCE_MODE, temperature=1.3, top_p=0.5, seed=7,
               frequency_penalty=0.5, presence_penalty=-1, user="u1", extra_body={"top_k": 5})
    assert same.choices[0].message.tool_calls[0].function.arguments == \
        base.choices[0].message.tool_calls[0].function.arguments
    assert same.x_nanotool["ignored"] == ["frequency_penalty", "presence_penalty", "seed", "temperature",
                                          "top_k", "top_p", "user"]
    reason = ask(client, ORDER, tool_choice="none").choices[0].message.content
    r = ask(client, ORDER, tool_choice="none", stop=[reason[2:4], "zzz"])
    assert r.choices[0].message.content == reason[:2] and r.choices[0].finish_reason == "stop"
    r = ask(client, ORDER, tools=EXTRA, tool_choice=FORCE_MODE, stop=["eco", "boost", "mode"])   # never cuts a call
    assert r.choices[0].message.tool_calls[0].function.arguments == base.choices[0].message.tool_calls[0].function.arguments


def test_unknown_model_is_served_unless_strict(router, client):
    r = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": ORDER}])
    assert r.model == MODEL and r.choices[0].message.content         # the README's drop-in: any name
    server = Live(serve.create_app(router, MODEL, max_new_tokens=8, strict_model=True))
    try:
        status, r = server.http("POST", CHAT, json.dumps(_chat(model="gpt-4o-mini", tool_choice="none")).encode())
        assert status == 404 and r["error"]["code"] == "model_not_found" and "gpt-4o-mini" in r["error"]["message"]
        status, r = server.http("POST", CHAT, json.dumps(_chat(tool_choice="none")).encode())
        assert status == 200 and r["model"] == MODEL
    finally:
        server.close()


def test_duplicates_once_and_length_when_the_budget_cut_the_calls():
    twice = dict(ORDER_CALL, calls=ORDER_CALL["calls"] * 2 + [{"name": "track_order", "arguments": {"order_id": "X"}}])
    fake = FakeRouter(twice)
    server = Live(serve.create_app(fake, MODEL))
    try:
        c = server.client()
        r = ask(c, ORDER)
        assert [json.loads(tc.function.arguments)["order_id"] for tc in r.choices[0].message.tool_calls] == ["ORD-1234", "X"]
        assert r.x_nanotool["duplicates_dropped"] == 1 and r.choices[0].finish_reason == "tool_calls"
        fake.result = dict(ORDER_CALL, truncated=True)      # a value cut by the budget still validates
        r = ask(c, ORDER)
        assert r.choices[0].finish_reason == "length" and r.choices[0].message.tool_calls
    finally:
        server.close()


def test_log_requests_is_training_data_that_imports(tmp_path):
    import formats
    path = tmp_path / "traffic.jsonl"
    fake = FakeRouter(ORDER_CALL)
    teacher = FakeTeacher({"calls": [], "text": "No tool fits."})
    server = Live(serve.create_app(fake, MODEL, teacher=teacher, fallback_below=0.5, log_requests=str(path)))
    try:
        c = server.client()
        ask(c, ORDER)                                                    # logged: the local model's call
        server.http("POST", FLAT, json.dumps({"prompt": ORDER, "available_functions": TOOLS}).encode())   # logged
        fake.result = dict(ORDER_CALL, confidence=0.2)
        ask(c, "where is my parcel?")                                    # logged: the teacher's no-call
        ask(c, ORDER, tool_choice="required")                            # forced: no label for the request alone
        fake.result = dict(ORDER_CALL, truncated=True)
        teacher.error = TimeoutError("down")
        ask(c, ORDER)                                                    # cut by the budget: not a label
        ask(c, ORDER, tools=None)                                        # no tools: nothing was decided
        c.chat.completions.create(model=MODEL, tools=TOOLS, messages=[   # a tool result: nothing was decided
            {"role": "user", "content": ORDER}, {"role": "tool", "tool_call_id": "1", "content": "ok"}])
    finally:
        server.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(x["x_nanotool"]["endpoint"], x["x_nanotool"]["answered_by"]) for x in lines] == \
        [("chat", MODEL), ("tool-call", MODEL), ("chat", "fake:teacher")]
    assert lines[2]["x_nanotool"]["confidence"] == 0.2
    examples, counts = formats.import_jsonl(str(path))
    assert counts == {"ok": 3}
    assert [(e["request"], e["calls"], e["reason"]) for e in examples] == [
        (ORDER, ORDER_CALL["calls"], None), (ORDER, ORDER_CALL["calls"], None),
        ("where is my parcel?", [], wire.REASON_NO_TOOL)]
    assert examples[0]["tools"] == wire.normalize_tools(TOOLS)


def slow_body(tag):
    """250 tools of 10 arguments (170 kB, 9,500 JSON values, within the limits): ~1-2 s
    of schema checks on this machine; answered at the end with the few tools that fit the context."""
    tools = [_tool(name=f"t{i}_{tag}", parameters=_params(**{f"p{j}": {"type": "string", "description": "A value."}
                                                            for j in range(10)})) for i in range(250)]
    return json.dumps(_chat(tools=tools)).encode()


def test_health_and_the_model_answer_while_a_large_body_is_checked(router):
    # The issue: a 1 MB body's schema checks ran on the event loop for 3.5 s, and /health
    # and every other request waited. Now a large body is checked in another process.
    server = Live(serve.create_app(router, MODEL, max_new_tokens=16, max_request_bytes=400_000))
    try:
        warm = _chat(messages=[{"role": "system", "content": "x" * 20_000}, {"role": "user", "content": ORDER}],
                     tools=None)
        assert server.http("POST", CHAT, json.dumps(warm).encode())[0] == 200   # starts the checker process
        done = {}
        slow = threading.Thread(target=lambda: done.update(r=server.http("POST", CHAT, slow_body(time.time()))))
        slow.start()
        time.sleep(0.1)
        t = time.perf_counter()
        status, health = server.http("GET", "/health")
        t_health = time.perf_counter() - t
        status2, r = server.http("POST", CHAT, json.dumps(_chat(tools=EXTRA, tool_choice="required")).encode())
        t_both = time.perf_counter() - t
        overlapped = slow.is_alive()
        slow.join(60)
    finally:
        server.close()
    assert status == 200 and health["status"] == "ok" and status2 == 200 and r["choices"][0]["message"]
    # checked to the end, then answered: 8 retrieved tools of 10 arguments do not fit the context, fewer do
    assert done["r"][0] == 200 and 0 < len(done["r"][1]["x_nanotool"]["retrieved"]) < 8
    assert overlapped, "the large body was checked before the probes ran: make it larger"
    assert t_health < 0.25 and t_both < 1.0, (t_health, t_both)
