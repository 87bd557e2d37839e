"""
Serve a trained router over HTTP: a small JSON endpoint and an OpenAI-compatible
chat-completions endpoint, so any OpenAI client can use the model to pick tool calls.

    python serve.py --ckpt out/demo/best.pt                        # http://127.0.0.1:8000
    python serve.py --ckpt out/demo/best.pt --quantize int8 --port 8080
    python serve.py --ckpt out/demo/best.pt --fallback openai --fallback_below 0.5   # needs OPENAI_API_KEY

    curl -s localhost:8000/tool-call -H 'Content-Type: application/json' -d '{"prompt": "Where is my order ORD-1234?", "available_functions": [{"name": "track_order", "description": "Get the status of an order", "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}], "max_tokens": 64}'

Endpoints
    POST /tool-call            {"prompt", "available_functions", "max_tokens"?, "tool_choice"?} ->
                               {"function_name", "parameters", "confidence", "calls", "no_tool_reason", "model"}
    POST /v1/chat/completions  OpenAI chat completions (no streaming, n=1)
    GET  /v1/models            the one model id;   GET /health

The chat endpoint fronts a router, not a chat model:
  - the model answers the LAST user message only (earlier turns are not read);
  - if the last message is a tool result, the router's job for that turn is done: it
    answers finish_reason "stop" with the tool result(s) as content, without the model;
  - no tools -> the no-call "no tool fits", without the model;
  - a call -> finish_reason "tool_calls"; a no-call -> "stop" with the reason as content,
    or "length" if the token budget ran out before any call was complete (the router
    then declines with "no tool fits", even under tool_choice required or a name);
  - decoding is greedy and constrained: temperature, top_p, ... are ignored, and the
    request's "model" is not checked (the response names the model that answered).

Fallback (off by default): with --fallback gemini|openai, an answer whose confidence is
below --fallback_below (or that ran out of tokens) is asked of that teacher
(teacher.py); tool_choice "none" never is. The teacher's answer is used if it
passes teacher.clean_answer and honours tool_choice; otherwise (or on any teacher error)
the local answer stands. Every response has "x_nanotool": {"answered_by", "confidence",
...}; "confidence" is always the local model's.

Errors are OpenAI-style {"error": {"message", "type", "param"}}: 4xx for anything wrong
with the request (413 for a body over --max_request_bytes), never a traceback.
"""

import argparse
import asyncio
import functools
import json
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import wire
from teacher import clean_answer

ROLES = ("system", "developer", "user", "assistant", "tool")
CHOICES = ("auto", "none", "required")


class BadRequest(Exception):
    """Anything wrong with a request; becomes a 4xx whose message names the problem."""

    def __init__(self, message, param=None, status=400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def error_body(message, status, param=None):
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def kind_of(v):
    """JSON type name of a value, for error messages."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "an integer", float: "a number", type(None): "null"}
    return names.get(type(v), type(v).__name__)


# -----------------------------------------------------------------------------
# request parsing: explicit checks, so every message says which field is wrong

async def read_json(request, limit):
    """The body as a JSON object. The size is checked before reading when the client
    sends Content-Length, and while reading when it does not (chunked uploads)."""
    too_big = BadRequest(f"request body is over the limit of {limit} bytes (--max_request_bytes)", status=413)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    if not body.strip():
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        data = json.loads(bytes(body))
    except UnicodeDecodeError:   # json.loads(bytes) decodes first
        raise BadRequest("request body is not valid UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise BadRequest(f"request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:       # e.g. 100,000 nested '[': the stdlib parser recurses
        raise BadRequest("request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise BadRequest(f"request body must be a JSON object, got {kind_of(data)}")
    return data


def parse_max_tokens(body, keys, cap):
    """The first of keys that is set, as a positive int capped at the server's limit."""
    for key in keys:
        v = body.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise BadRequest(f"'{key}' must be a positive integer, got {json.dumps(v)[:40]}", key)
        return min(v, cap)
    return cap


@functools.lru_cache(maxsize=64)
def _normalize(blob):
    # Clients resend the same catalogue with every request, and checking the schemas
    # costs milliseconds: do each catalogue once. (No sort_keys: the order of the
    # properties is the order the model sees the arguments in.)
    return wire.normalize_tools(json.loads(blob))


def parse_tools(raw, param):
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise BadRequest(f"'{param}' must be a list of tool definitions, got {kind_of(raw)}", param)
    try:
        return _normalize(json.dumps(raw))
    except wire.ToolError as e:
        raise BadRequest(f"{param}: {e}", param) from None
    except (TypeError, AttributeError) as e:   # wire.py misses a few shapes, e.g. "type": {...}
        raise BadRequest(f"{param}: malformed tool definition ({type(e).__name__}: {e})", param) from None


def parse_tool_choice(raw, tools):
    """OpenAI's tool_choice -> what Router.answer takes: auto | none | required | a tool name."""
    if raw is None:
        return "auto"
    if isinstance(raw, str) and raw in CHOICES:
        choice = raw
    elif isinstance(raw, dict) and raw.get("type") == "function" and isinstance(raw.get("function"), dict) \
            and isinstance(raw["function"].get("name"), str):
        choice = raw["function"]["name"]
        if choice not in {t["name"] for t in tools}:
            raise BadRequest(f"tool_choice names {choice!r}, which is not among the tools", "tool_choice")
    else:
        raise BadRequest("tool_choice must be 'auto', 'none', 'required' or "
                         f'{{"type": "function", "function": {{"name": ...}}}}; got {json.dumps(raw)[:60]}',
                         "tool_choice")
    if choice != "auto" and choice != "none" and not tools:
        raise BadRequest(f"tool_choice {json.dumps(raw)[:60]} needs tools, and none were given", "tool_choice")
    return choice


def message_text(m, i):
    """A message's content as text: a string, or its text parts joined."""
    c = m.get("content")
    if c is None or isinstance(c, str):
        return c or ""
    if not isinstance(c, list):
        raise BadRequest(f"messages[{i}].content must be a string or a list of text parts, "
                         f"got {kind_of(c)}", "messages")
    texts = []
    for j, part in enumerate(c):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise BadRequest(f'messages[{i}].content[{j}]: only {{"type": "text", "text": "..."}} parts '
                             "are supported", "messages")
        texts.append(part["text"])
    return " ".join(texts)     # requests are single-line text in training


def parse_messages(raw):
    """-> (the last user message's text, None), or (None, the trailing tool results)
    when the last message is a tool result."""
    if not isinstance(raw, list) or not raw:
        raise BadRequest("'messages' must be a non-empty list of messages", "messages")
    texts = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object, got {kind_of(m)}", "messages")
        if m.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}; "
                             f"got {json.dumps(m.get('role'))[:40]}", "messages")
        texts.append(message_text(m, i))
    if raw[-1]["role"] == "tool":
        n = len(raw)
        while n > 0 and raw[n - 1]["role"] == "tool":   # parallel calls give several results
            n -= 1
        return None, "\n".join(texts[n:]) or "done"
    users = [i for i, m in enumerate(raw) if m["role"] == "user"]
    if not users:
        raise BadRequest("'messages' has no user message; the model answers the last one", "messages")
    if not texts[users[-1]].strip():
        raise BadRequest(f"messages[{users[-1]}]: the last user message is empty", "messages")
    return texts[users[-1]], None


# -----------------------------------------------------------------------------
# responses: pure functions of an answer dict
# (answer: calls, reason, confidence, answered_by, prompt_tokens, completion_tokens, + extras)

def extension(ans):
    keys = ("answered_by", "confidence", "latency_ms", "truncated", "local_error", "fallback_error", "note")
    return {k: ans[k] for k in keys if k in ans}


def chat_response(ans):
    if ans["calls"]:
        message = {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in ans["calls"]]}
        finish = "tool_calls"
    else:    # "length": the token budget ran out before the answer was complete
        message = {"role": "assistant", "content": ans["reason"]}
        finish = "length" if ans.get("truncated") else "stop"
    usage = {"prompt_tokens": ans["prompt_tokens"], "completion_tokens": ans["completion_tokens"],
             "total_tokens": ans["prompt_tokens"] + ans["completion_tokens"]}
    return {"id": "chatcmpl-" + uuid.uuid4().hex[:24], "object": "chat.completion",
            "created": int(time.time()), "model": ans["answered_by"],
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": usage, "x_nanotool": extension(ans)}


def tool_call_response(ans):
    first = ans["calls"][0] if ans["calls"] else None
    return {"function_name": first["name"] if first else None,
            "parameters": first["arguments"] if first else None,
            "confidence": ans["confidence"], "calls": ans["calls"], "no_tool_reason": ans["reason"],
            "model": ans["answered_by"], "x_nanotool": extension(ans)}


# -----------------------------------------------------------------------------
# the app

def ask_teacher(teacher, tools, request, choice):
    """-> (answer {"calls", "reason"}, None) or (None, why it is not used)."""
    if choice not in CHOICES:          # a named tool: the teacher sees only that one
        tools = [t for t in tools if t["name"] == choice]
    try:                               # the teacher is held to the client's own tool_choice
        raw = teacher.ask(tools, request, tool_choice=choice)
    except Exception as e:             # whatever the teacher does, the local answer stands
        return None, f"{type(e).__name__}: {e}"
    ans, problem = clean_answer(raw, tools, request)
    if problem:
        return None, f"teacher answer rejected ({problem})"
    if choice != "auto" and not ans["calls"]:
        return None, f"teacher answered no call; tool_choice {choice!r} needs one"
    return ans, None


def create_app(router, model_id="nanotool", teacher=None, fallback_below=0.0,
               max_new_tokens=128, max_request_bytes=1_000_000):
    """The FastAPI app around one loaded Router. teacher: None, or an object with .id and
    .ask(tools, request, tool_choice) -> {"calls", "text"} (teacher.make_teacher gives one)."""
    # The Router is not thread-safe (its KV prefix cache is rewound and overwritten by
    # every request), so all model calls run on this one thread, in arrival order. The
    # event loop stays free to parse requests and answer /health meanwhile.
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        yield
        worker.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="nanotool", lifespan=lifespan)

    def run_local(tools, request, choice, max_tokens):
        res = router.answer(tools, request, max_tokens, constrain=True, tool_choice=choice)
        res["prompt_tokens"] = len(router.encode_prompt(tools, request))
        return res

    async def route(tools, request, choice, max_tokens, parallel=True):
        """One routing decision -> answer dict (see chat_response)."""
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        if not tools:      # nothing could be called: no need to ask the model
            ans = {"calls": [], "reason": wire.REASON_NO_TOOL, "confidence": 1.0, "prompt_tokens": 0,
                   "completion_tokens": 0, "note": "no tools given: answered without the model"}
        else:
            try:
                res = await loop.run_in_executor(worker, run_local, tools, request, choice, max_tokens)
            except ValueError as e:    # the prompt does not fit the context, ...
                raise BadRequest(str(e)) from None
            ans = {"calls": res["calls"], "reason": res["reason"], "confidence": res["confidence"],
                   "truncated": res["truncated"], "prompt_tokens": res["prompt_tokens"],
                   "completion_tokens": res["tokens"]}
            if not res["valid"]:       # the grammar should make this unreachable; never send it on
                ans.update(calls=[], reason=wire.REASON_NO_TOOL, local_error=res["error"])
        ans["answered_by"] = model_id
        if teacher is not None and tools and choice != "none" and (ans["confidence"] < fallback_below
                                                                   or ans["truncated"] or "local_error" in ans):
            # a network call: off the model thread, so other requests keep being served
            better, why = await loop.run_in_executor(None, ask_teacher, teacher, tools, request, choice)
            if better is not None:
                ans.update(calls=better["calls"], reason=better["reason"], answered_by=teacher.id)
            else:
                ans["fallback_error"] = why
        if not parallel:
            ans["calls"] = ans["calls"][:1]
        ans["latency_ms"] = round(1000 * (time.perf_counter() - t0), 2)
        return ans

    @app.exception_handler(BadRequest)
    async def on_bad_request(request, e):
        return JSONResponse(error_body(e.message, e.status, e.param), e.status)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, e):      # unknown path, wrong method: same error shape
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {e.detail}", e.status_code),
                            e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def on_crash(request, e):           # a bug: say so in one line (the log has the traceback)
        return JSONResponse(error_body(f"internal error ({type(e).__name__}: {e})", 500), 500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "context": router.model.config.block_size,
                "fallback": getattr(teacher, "id", None), "fallback_below": fallback_below if teacher else None}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "nanotool"}]}

    @app.post("/tool-call")
    async def tool_call(request: Request):
        body = await read_json(request, max_request_bytes)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadRequest(f"'prompt' must be a non-empty string, got {json.dumps(prompt)[:40]}", "prompt")
        if "available_functions" not in body:
            raise BadRequest("'available_functions' is missing: give a list of tool definitions "
                             "(an empty list means no tool can be called)", "available_functions")
        tools = parse_tools(body["available_functions"], "available_functions")
        choice = parse_tool_choice(body.get("tool_choice"), tools)
        max_tokens = parse_max_tokens(body, ["max_tokens"], max_new_tokens)
        return tool_call_response(await route(tools, prompt, choice, max_tokens))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_json(request, max_request_bytes)
        if body.get("stream"):
            raise BadRequest("stream=true is not supported: the answer is one tool decision", "stream")
        if body.get("n") not in (None, 1):
            raise BadRequest(f"'n' must be 1, got {json.dumps(body.get('n'))[:20]}", "n")
        if not isinstance(body.get("model", ""), str):
            raise BadRequest(f"'model' must be a string, got {kind_of(body['model'])}", "model")
        parallel = body.get("parallel_tool_calls", True)
        if not isinstance(parallel, bool):
            raise BadRequest(f"'parallel_tool_calls' must be a boolean, got {kind_of(parallel)}",
                             "parallel_tool_calls")
        text, tool_result = parse_messages(body.get("messages"))
        tools = parse_tools(body.get("tools"), "tools")
        choice = parse_tool_choice(body.get("tool_choice"), tools)
        max_tokens = parse_max_tokens(body, ["max_completion_tokens", "max_tokens"], max_new_tokens)
        if tool_result is not None:
            # The call was made and its result is in: routing that turn is done. (A chat
            # model would now write prose from the result; this one passes it on.)
            return chat_response({"calls": [], "reason": tool_result, "confidence": None,
                                  "answered_by": model_id, "prompt_tokens": 0, "completion_tokens": 0,
                                  "note": "last message is a tool result: nothing to route"})
        return chat_response(await route(tools, text, choice, max_tokens, parallel))

    return app


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out/demo/best.pt")
    p.add_argument("--data_dir", default=None, help="default: the one recorded in the checkpoint")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quantize", choices=["int8"], default=None, help="int8 linear layers (CPU)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model_name", default=None, help="model id in responses (default: nanotool-<ckpt dir>)")
    p.add_argument("--max_new_tokens", type=int, default=128, help="answer token budget; caps max_tokens")
    p.add_argument("--max_request_bytes", type=int, default=1_000_000, help="larger bodies get a 413")
    p.add_argument("--fallback", choices=["gemini", "openai"], default=None,
                   help="send low-confidence answers to this teacher (off by default)")
    p.add_argument("--fallback_below", type=float, default=0.5, help="confidence threshold for --fallback")
    p.add_argument("--fallback_model", default=None, help="teacher model (default: teacher.py's)")
    p.add_argument("--fallback_base_url", default=None, help="teacher API base URL (default: the vendor's)")
    p.add_argument("--fallback_timeout", type=float, default=30.0, help="seconds per teacher request")
    p.add_argument("--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = p.parse_args(argv)

    def die(msg):
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)

    if args.max_new_tokens < 1 or args.max_request_bytes < 1:
        die("--max_new_tokens and --max_request_bytes must be positive")
    if not 0.0 <= args.fallback_below <= 1.0:
        die(f"--fallback_below is a confidence between 0 and 1, got {args.fallback_below}")
    teacher = None
    if args.fallback:
        from teacher import TeacherError, make_teacher
        try:
            teacher = make_teacher(args.fallback, args.fallback_model, args.fallback_base_url,
                                   timeout=args.fallback_timeout)
        except TeacherError as e:
            die(str(e))
    from model import CheckpointError
    from sample import Router
    try:
        router = Router(args.ckpt, args.data_dir, args.device, args.quantize)
    except (CheckpointError, ValueError, OSError) as e:
        die(str(e))
    model_id = args.model_name or "nanotool-" + os.path.basename(os.path.dirname(os.path.abspath(args.ckpt)))
    app = create_app(router, model_id, teacher, args.fallback_below, args.max_new_tokens, args.max_request_bytes)
    fallback = f"{teacher.id} below {args.fallback_below}" if teacher else "off"
    print(f"serve: {model_id} from {args.ckpt} (context {router.model.config.block_size}) on "
          f"http://{args.host}:{args.port}; config {json.dumps(vars(args))}; fallback {fallback}")
    import uvicorn
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
