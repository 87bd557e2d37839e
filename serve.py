"""
Serve a trained router over HTTP: a small JSON endpoint and an OpenAI-compatible
chat-completions endpoint (streamed or not), so any OpenAI client or agent framework
can use the model to pick tool calls.

    python serve.py --ckpt out/demo/best.pt                        # http://127.0.0.1:8000
    python serve.py --ckpt out/demo/best.pt --quantize int8 --port 8080
    python serve.py --ckpt out/demo/best.pt --fallback openai --fallback_below 0.5   # needs OPENAI_API_KEY
    python serve.py --ckpt out/demo/best.pt --log_requests out/traffic.jsonl        # answers -> training data
    python serve.py --ckpt out/general/best.pt --retrieve_k 0     # long catalogues whole (default: 8 tools kept)

    curl -s localhost:8000/tool-call -H 'Content-Type: application/json' -d '{"prompt": "Where is my order ORD-1234?", "available_functions": [{"name": "track_order", "description": "Get the status of an order", "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}], "max_tokens": 64}'

Endpoints
    POST /tool-call            {"prompt", "available_functions", "max_tokens"?, "tool_choice"?} ->
                               {"function_name", "parameters", "confidence", "calls", "no_tool_reason", "model"}
    POST /v1/chat/completions  OpenAI chat completions, n=1; "stream": true sends server-sent events
    GET  /v1/models            the one model id;   GET /health

The chat endpoint fronts a router, not a chat model:
  - the model answers the LAST user message only (earlier turns are not read);
  - if the last message is a tool result, the router's job for that turn is done: it
    answers finish_reason "stop" with the tool result(s) as content, without the model;
  - no tools -> the no-call "no tool fits", without the model; a model with a compiled
    catalogue answers from all of its own tools instead, and refuses (400) a tool it was
    not compiled with or whose schema differs;
  - finish_reason: "tool_calls" for calls, "stop" for a no-call (its reason is the
    content), "length" whenever the token budget cut the answer (what was complete by
    then is kept: the calls before the cut, or a decline "no tool fits");
  - identical calls in one answer are sent once;
  - a catalogue in the prompt longer than --retrieve_k tools (default 8): the model sees
    only the k most related to the request (retrieve.py), fewer when they would not
    leave room for an answer in its context, and a tool tool_choice names;
    x_nanotool.retrieved lists them. A compiled model never retrieves;
  - decoding is greedy and constrained. temperature, top_p, seed, frequency_penalty and
    presence_penalty are checked (a bad value is a 400) and have no effect; logprobs /
    top_logprobs give the model's own log-probabilities of its answer tokens; stop cuts
    the text content (never a call); response_format json_*, logit_bias, functions,
    audio and n > 1 are refused. Fields the server does not use are listed in
    x_nanotool.ignored;
  - any "model" is answered by this one (the response names who answered), so an app
    changes only its base URL; with --strict_model another id gets a 404;
  - "stream": true: the answer is decided first (one routing decision, tens of ms),
    then sent as OpenAI chunks: the role, each call's id and name, its arguments, the
    finish reason, the usage if stream_options.include_usage, then [DONE].

Fallback (off by default): with --fallback gemini|openai, an answer whose confidence is
below --fallback_below (or that ran out of tokens) is asked of that teacher
(teacher.py); tool_choice "none" never is. The teacher's answer is used if it
passes teacher.clean_answer and honours tool_choice; otherwise (or on any teacher error)
the local answer stands. Every response has "x_nanotool": {"answered_by", "confidence",
...}; "confidence" is always the local model's.

Requests are checked in full before anything runs, against limits that keep every check
short: a body over --max_request_bytes (413), JSON nested over 32 levels, over 256 tools
or 10,000 JSON values in them, numbers Python cannot hold, lone surrogates, names and
enum values the answer format cannot carry, a "$ref" that cannot be inlined and regex patterns that can take
exponential time. A large body is checked in a separate process, so neither the event
loop (and /health) nor the model waits for it.

Errors are OpenAI-style {"error": {"message", "type", "param", "code"}}: 4xx for anything
wrong with the request, never a traceback.

--log_requests PATH appends one JSON line per routing decision that is a usable label
(tool_choice auto, not cut by the token budget, not an invalid answer): the tools, the
request, the answer, who answered and the confidence, in the OpenAI chat form that
`data.py --import` reads. It stores your users' requests: off by default.
"""

import argparse
import asyncio
import functools
import json
import multiprocessing
import os
import sys
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import wire
from request_checks import (CHOICES, INLINE_BYTES, BadRequest, error_body, parse_chat, parse_flat,
                            read_body)
from runtime import die
from teacher import clean_answer


# -----------------------------------------------------------------------------
# the model's own probabilities of its answer (logprobs)

def answer_with_logprobs(router, tools, request, max_tokens, choice, top):
    """Router.answer's result, with "logprobs": one OpenAI logprob entry per answer token
    (the wire-format tokens: <|call|>, the name's pieces, ...). The log-probability is
    the model's own over the whole vocabulary (no grammar mask), from the decoder's
    logits with the prompt's blocks as decoding ran them (Router.answer), with the
    `top` likeliest tokens at each position."""
    res = router.answer(tools, request, max_tokens, constrain=True, tool_choice=choice, top_logprobs=top)
    res["logprobs"] = [dict(token_entry(router.sp, i, lp), top_logprobs=[token_entry(router.sp, k, v) for k, v in best])
                       for i, lp, best in res["logprobs"]]
    return res


def token_entry(sp, i, logprob):
    """OpenAI's {token, logprob, bytes} for one sentencepiece id."""
    piece = sp.id_to_piece(i)
    if sp.is_byte(i):              # <0xE2>: one byte of a character split by byte fallback
        return {"token": piece, "logprob": logprob, "bytes": [int(piece[3:5], 16)]}
    text = piece.replace("\u2581", " ")
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


# -----------------------------------------------------------------------------
# responses: pure functions of an answer dict
# (answer: calls, reason, confidence, answered_by, prompt_tokens, completion_tokens,
#  finish_reason, + extras)

def extension(ans):
    keys = ("answered_by", "confidence", "latency_ms", "truncated", "local_error", "fallback_error", "note",
            "duplicates_dropped", "ignored", "retrieved")
    return {k: ans[k] for k in keys if k in ans}


def finish_of(ans):
    return ans.get("finish_reason") or ("length" if ans.get("truncated") else
                                        "tool_calls" if ans["calls"] else "stop")


def chat_response(ans, stop=()):
    finish = finish_of(ans)
    if ans["calls"]:
        message = {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in ans["calls"]]}
    else:
        content = ans["reason"]
        cuts = [content.find(s) for s in stop if s in content]
        if cuts:                  # stop applies to text: the content ends before the first one
            content, finish = content[:min(cuts)], "stop"
        message = {"role": "assistant", "content": content}
    usage = {"prompt_tokens": ans["prompt_tokens"], "completion_tokens": ans["completion_tokens"],
             "total_tokens": ans["prompt_tokens"] + ans["completion_tokens"]}
    logprobs = {"content": ans["logprobs"], "refusal": None} if ans.get("logprobs") is not None else None
    return {"id": "chatcmpl-" + uuid.uuid4().hex[:24], "object": "chat.completion",
            "created": int(time.time()), "model": ans["answered_by"],
            "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}],
            "usage": usage, "x_nanotool": extension(ans)}


def stream_events(resp, include_usage):
    """A chat.completion (chat_response's dict) -> the server-sent events that stream it,
    in OpenAI's chunk format: the role, then each call's id, type and name with empty
    arguments followed by its arguments (or the text content), then the finish reason,
    the usage (if asked for), and [DONE]."""
    base = {"id": resp["id"], "object": "chat.completion.chunk", "created": resp["created"],
            "model": resp["model"], "system_fingerprint": None}
    choice = resp["choices"][0]
    msg, logprobs = choice["message"], choice["logprobs"]

    def chunk(delta, finish=None, lp=None, **extra):
        c = dict(base, choices=[{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}], **extra)
        if include_usage:
            c["usage"] = None     # OpenAI: null on every chunk but the last
        return c

    calls = msg.get("tool_calls") or []
    events = [chunk({"role": "assistant", "content": None if calls else ""})]
    for i, tc in enumerate(calls):
        fn = tc["function"]
        events.append(chunk({"tool_calls": [{"index": i, "id": tc["id"], "type": "function",
                                             "function": {"name": fn["name"], "arguments": ""}}]},
                            lp=logprobs if i == 0 else None))
        events.append(chunk({"tool_calls": [{"index": i, "function": {"arguments": fn["arguments"]}}]}))
    if not calls and msg["content"]:
        events.append(chunk({"content": msg["content"]}, lp=logprobs))
    events.append(chunk({}, finish=choice["finish_reason"], x_nanotool=resp["x_nanotool"]))
    if include_usage:
        events.append(dict(base, choices=[], usage=resp["usage"]))
    return [f"data: {json.dumps(e, ensure_ascii=False)}\n\n" for e in events] + ["data: [DONE]\n\n"]


def tool_call_response(ans):
    first = ans["calls"][0] if ans["calls"] else None
    return {"function_name": first["name"] if first else None,
            "parameters": first["arguments"] if first else None,
            "confidence": ans["confidence"], "calls": ans["calls"], "no_tool_reason": ans["reason"],
            "model": ans["answered_by"], "x_nanotool": extension(ans)}


# -----------------------------------------------------------------------------
# the answer's policy: pure functions from what the model (and the teacher) said
# to what is sent, so each rule is tested without a server

def dedupe(calls):
    """Identical calls (same name, same arguments) once each, in order."""
    seen, out = set(), []
    for c in calls:
        key = json.dumps([c["name"], c["arguments"]], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def local_answer(res, n_prompt):
    """A Router.answer result -> an answer dict. An invalid answer (the grammar should
    make it unreachable) is never sent on: it becomes a no-call with its local_error."""
    ans = {"calls": res["calls"], "reason": res["reason"], "confidence": res["confidence"],
           "truncated": res["truncated"], "prompt_tokens": n_prompt, "completion_tokens": res["tokens"],
           "logprobs": res.get("logprobs")}
    if res.get("retrieved") is not None:
        ans["retrieved"] = res["retrieved"]
    if not res["valid"]:
        ans.update(calls=[], reason=wire.REASON_NO_TOOL, local_error=res["error"])
    return ans


def no_tool_answer(n_prompt):
    """Nothing could be called: the no-call, without asking the model."""
    return {"calls": [], "reason": wire.REASON_NO_TOOL, "confidence": 1.0, "truncated": False,
            "prompt_tokens": n_prompt, "completion_tokens": 0, "note": "no tools given: answered without the model"}


def tool_result_answer(result, n_prompt, model_id):
    """The last message is a tool result: the call was made, routing that turn is done.
    (A chat model would now write prose from the result; this one passes it on.)"""
    return {"calls": [], "reason": result, "confidence": None, "answered_by": model_id, "prompt_tokens": n_prompt,
            "completion_tokens": 0, "finish_reason": "stop", "note": "last message is a tool result: nothing to route"}


def wants_teacher(ans, choice, below):
    """Whether a local answer is asked of the fallback teacher: unsure (confidence
    under `below`), cut by the token budget, or invalid; never for tool_choice none."""
    return choice != "none" and (ans["confidence"] < below or ans["truncated"] or "local_error" in ans)


def settle(ans, model_id, choice="auto", parallel=True, teacher=None):
    """The answer as sent. ans: local_answer's or no_tool_answer's dict; teacher: None
    (not asked) or (its id, its answer or None, why not used). The teacher's answer,
    when it has one, replaces the local calls (the local tokens' logprobs do not
    describe it); identical calls go once; finish_reason is "length" when the local
    answer was cut by the budget, else "tool_calls" or "stop"; parallel False keeps
    the first call. -> (answer to send, answer to log as a training label or None):
    a label is a tool_choice auto decision that was not cut and not invalid, with
    all its calls."""
    ans = dict(ans, answered_by=model_id)
    if teacher is not None:
        teacher_id, better, why = teacher
        if better is not None:
            ans.update(calls=better["calls"], reason=better["reason"], answered_by=teacher_id, logprobs=None)
        else:
            ans["fallback_error"] = why
    calls = dedupe(ans["calls"])
    if len(calls) < len(ans["calls"]):
        ans["duplicates_dropped"] = len(ans["calls"]) - len(calls)
    local = ans["answered_by"] == model_id
    cut = local and ans["truncated"]
    ans.update(calls=calls, finish_reason="length" if cut else "tool_calls" if calls else "stop")
    used_model = "note" not in ans                     # no_tool_answer decided nothing
    label = used_model and choice == "auto" and not cut and not (local and "local_error" in ans)
    return dict(ans, calls=calls if parallel else calls[:1]), ans if label else None


# -----------------------------------------------------------------------------
# learning from traffic: answers as training examples

class RequestLog:
    """Appends one JSON line per usable answer, in the OpenAI chat form formats.py reads
    ({"messages", "tools"}), with what the training data should know in "x_nanotool"."""

    def __init__(self, path):
        self.path, self.lock, self.failed = path, threading.Lock(), False
        open(path, "a", encoding="utf-8").close()     # fail at start, not on the first request

    def write(self, tools, request, ans, model_id, endpoint):
        assistant = {"role": "assistant", "content": None if ans["calls"] else ans["reason"]}
        if ans["calls"]:
            assistant["tool_calls"] = [{"id": f"call_{i}", "type": "function", "function": {
                "name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
                for i, c in enumerate(ans["calls"])]
        line = json.dumps({
            "messages": [{"role": "user", "content": request}, assistant],
            "tools": [{"type": "function", "function": t} for t in tools],
            "x_nanotool": {"time": round(time.time(), 3), "endpoint": endpoint, "model": model_id,
                           "answered_by": ans["answered_by"], "confidence": ans["confidence"],
                           "finish_reason": finish_of(ans)}}, ensure_ascii=False)
        try:
            with self.lock, open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError as e:       # a full disk must not fail the request; say it once
            if not self.failed:
                print(f"serve: cannot append to {self.path} ({e}); requests are not being logged", file=sys.stderr)
            self.failed = True


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


class Checker:
    """Parses and checks request bodies: a small one inline (well under a millisecond),
    a large one in a process of its own. A body at the limits takes up to ~1 s of
    schema checks; on the event loop that would hold up every request, and on a
    thread nearly so: the check holds the GIL, and the model, which gives the GIL up
    around every torch op, waits up to 5 ms to get it back each time (measured: 2
    clients sending 0.8 MB bodies cut the others' throughput 18-fold)."""

    def __init__(self, max_request_bytes):
        self.limit, self.pool = max_request_bytes, None

    async def __call__(self, request, parse):
        body = await read_body(request, self.limit)
        if len(body) <= INLINE_BYTES:
            return parse(body)
        if self.pool is None:      # started on first use (~1 s); "spawn": forking a process
            # that runs torch threads can deadlock the child
            self.pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        pool = self.pool
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, parse, body)
        except BrokenProcessPool:  # the process died (killed?): a new one for the next request
            if self.pool is pool:
                self.pool = None
            raise

    def close(self):               # waited for: a process left behind would outlive the server
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


async def on_bad_request(request, e):
    return JSONResponse(error_body(e.message, e.status, e.param, e.code), e.status)


async def on_http_error(request, e):          # unknown path, wrong method: same error shape
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
    return JSONResponse(error_body(f"{request.method} {request.url.path}: {e.detail}", e.status_code, code=code),
                        e.status_code, headers=getattr(e, "headers", None))


async def on_crash(request, e):               # a bug: say so in one line (the log has the traceback)
    return JSONResponse(error_body(f"internal error ({type(e).__name__}: {e})", 500, code="internal_error"), 500)


async def in_thread(fn, *args):
    """fn(*args) on a worker thread, off the event loop: for work that waits (the
    teacher's network call) or may take long (tokenizing a tool result of up to a
    megabyte)."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def refused(e):
    """The Router's ValueError (a prompt that does not fit the context, ...) as a 400."""
    return BadRequest(str(e), "messages", code="context_length_exceeded" if "context" in str(e) else "invalid_value")


def create_app(router, model_id="nanotool", teacher=None, fallback_below=0.0,
               max_new_tokens=128, max_request_bytes=1_000_000, log_requests=None, strict_model=False):
    """The FastAPI app around one loaded Router. teacher: None, or an object with .id and
    .ask(tools, request, tool_choice) -> {"calls", "text"} (teacher.make_teacher gives one).
    log_requests: a JSONL path for the answers (see RequestLog), or None."""
    # The Router is not thread-safe (its KV prefix cache is rewound by every request):
    # model calls take turns, in arrival order, on the event loop's own thread. A model
    # thread cost two thread switches and a GIL hand-over per request (~2 ms measured
    # on a busy 2-core machine, docs/serving.md); between two turns the loop serves what
    # has arrived meanwhile (/health, parsing): /health waits for a few answers at most.
    turn = asyncio.Lock()
    checked, log = Checker(max_request_bytes), RequestLog(log_requests) if log_requests else None
    context, compiled = router.model.config.block_size, router.catalogue is not None
    health_info = {"status": "ok", "model": model_id, "context": context,
                   "compiled_tools": len(router.catalogue) if compiled else None,
                   "fallback": getattr(teacher, "id", None), "fallback_below": fallback_below if teacher else None}
    model_list = {"object": "list", "data": [{"id": model_id, "object": "model", "created": int(time.time()),
                                              "owned_by": "nanotool"}]}

    @asynccontextmanager
    async def lifespan(app):
        yield
        checked.close()

    app = FastAPI(title="nanotool", lifespan=lifespan, exception_handlers={
        BadRequest: on_bad_request, StarletteHTTPException: on_http_error, Exception: on_crash})

    def run_local(tools, request, choice, max_tokens, top):
        if top is None:
            res = router.answer(tools, request, max_tokens, constrain=True, tool_choice=choice)
        else:
            res = answer_with_logprobs(router, tools, request, max_tokens, choice, top)
        kept = res.get("retrieved")      # the tools the model saw, when retrieval cut the catalogue
        res["prompt_tokens"] = len(router.encode_prompt(tools if kept is None else
                                                        [t for t in tools if t["name"] in kept], request))
        return res

    def count_prompt(tools, text):
        return len(router.encode_prompt(tools, text))

    async def route(job, endpoint="chat"):
        """One routing decision -> answer dict (see settle and chat_response)."""
        t0 = time.perf_counter()
        # a compiled model with no tools named answers from its whole catalogue
        tools, request, choice = job["tools"] or (router.catalogue if compiled else []), job["text"], job["choice"]
        reply = None
        if not tools:
            ans = no_tool_answer(await in_thread(count_prompt, tools, request))
        else:
            async with turn:
                await asyncio.sleep(0)     # one pass of the loop before this model call
                try:
                    res = run_local(tools, request, choice, job["max_tokens"], job.get("top_logprobs"))
                except ValueError as e:    # the prompt does not fit the context, ...
                    raise refused(e) from None
            ans = local_answer(res, res["prompt_tokens"])
            if teacher is not None and wants_teacher(ans, choice, fallback_below):
                reply = (teacher.id, *await in_thread(ask_teacher, teacher, tools, request, choice))
        ans, label = settle(ans, model_id, choice, job.get("parallel", True), reply)
        if label is not None and log is not None:
            log.write(tools, request, label, model_id, endpoint)
        ans["latency_ms"] = round(1000 * (time.perf_counter() - t0), 2)
        return ans

    @app.get("/health")
    async def health():
        return health_info

    @app.get("/v1/models")
    async def models():
        return model_list

    # The POST endpoints return a finished JSONResponse: handed a dict, FastAPI would
    # first walk it with jsonable_encoder, a quarter of the app's time per request.
    @app.post("/tool-call")
    async def tool_call(request: Request):
        job = await checked(request, functools.partial(parse_flat, cap=max_new_tokens, context=context,
                                                       compiled=compiled))
        return JSONResponse(tool_call_response(await route(job, endpoint="tool-call")))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        job = await checked(request, functools.partial(parse_chat, cap=max_new_tokens, context=context,
                                                       only_model=model_id if strict_model else None,
                                                       compiled=compiled))
        if job["tool_result"] is not None:
            n = await in_thread(count_prompt, job["tools"], job["tool_result"])
            ans = tool_result_answer(job["tool_result"], n, model_id)
        else:
            ans = await route(job)
        if job["ignored"]:
            ans["ignored"] = job["ignored"]
        resp = chat_response(ans, job["stop"])
        if job["stream"]:
            return StreamingResponse(iter(stream_events(resp, job["include_usage"])), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(resp)

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
    p.add_argument("--strict_model", action="store_true",
                   help="answer 404 to a request naming another model (default: any model name is served)")
    p.add_argument("--max_new_tokens", type=int, default=128, help="answer token budget; caps max_tokens")
    p.add_argument("--max_request_bytes", type=int, default=1_000_000, help="larger bodies get a 413")
    p.add_argument("--fallback", choices=["gemini", "openai"], default=None,
                   help="send low-confidence answers to this teacher (off by default)")
    p.add_argument("--fallback_below", type=float, default=0.5, help="confidence threshold for --fallback")
    p.add_argument("--fallback_model", default=None, help="teacher model (default: teacher.py's)")
    p.add_argument("--fallback_base_url", default=None, help="teacher API base URL (default: the vendor's)")
    p.add_argument("--fallback_timeout", type=float, default=30.0, help="seconds per teacher request")
    p.add_argument("--fallback_api_version", default=None,
                   help="Gemini API version (default: v1beta, the one the teacher's requests are written for)")
    p.add_argument("--log_requests", default=None, metavar="PATH",
                   help="append usable answers (with the users' requests) as JSONL for data.py --import")
    p.add_argument("--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--retrieve_k", type=int, default=8,
                   help="a catalogue in the prompt longer than this: only its k tools most related "
                   "to the request (retrieve.py); 0 = all")
    args = p.parse_args(argv)

    if args.max_new_tokens < 1 or args.max_request_bytes < 1:
        die("--max_new_tokens and --max_request_bytes must be positive")
    if args.retrieve_k < 0:
        die(f"--retrieve_k is a number of tools (0 = all), got {args.retrieve_k}")
    if not 0.0 <= args.fallback_below <= 1.0:
        die(f"--fallback_below is a confidence between 0 and 1, got {args.fallback_below}")
    teacher = None
    if args.fallback:
        from teacher import TeacherError, make_teacher
        try:
            teacher = make_teacher(args.fallback, args.fallback_model, args.fallback_base_url,
                                   timeout=args.fallback_timeout, api_version=args.fallback_api_version)
        except TeacherError as e:
            die(str(e))
    from model import CheckpointError
    from sample import Router
    try:
        router = Router(args.ckpt, args.data_dir, args.device, args.quantize, args.retrieve_k)
    except (CheckpointError, ValueError, OSError) as e:
        die(str(e))
    model_id = args.model_name or "nanotool-" + os.path.basename(os.path.dirname(os.path.abspath(args.ckpt)))
    try:
        app = create_app(router, model_id, teacher, args.fallback_below, args.max_new_tokens,
                         args.max_request_bytes, args.log_requests, args.strict_model)
    except OSError as e:
        die(f"--log_requests {args.log_requests}: cannot append to it ({e.strerror})")
    fallback = f"{teacher.id} below {args.fallback_below}" if teacher else "off"
    print(f"serve: {model_id} from {args.ckpt} (context {router.model.config.block_size}) on "
          f"http://{args.host}:{args.port}; config {json.dumps(vars(args))}; fallback {fallback}")
    import uvicorn
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
