"""
Label (tools, request) pairs with a cloud "teacher" model (Gemini or OpenAI), so
data.py can train the small model on a big model's answers:

    results, stats = label(items, make_teacher("gemini"), "data/teacher_cache.jsonl")

Answers cost money, so each raw answer is appended to a JSONL cache as soon as it
arrives: an interrupted run loses nothing already paid for, a re-run sends only
what is missing, and the cleaning rules can change without asking again.
"""

import functools
import hashlib
import json
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

from tqdm import tqdm

import wire

SYSTEM_PROMPT = (
    "You are a function-calling assistant. Call the tool (or tools) that fulfil the "
    "user's request: if the request asks for several actions, make one call per action. "
    "Copy argument values from the request exactly as the user wrote them; do not "
    "translate, reformat, complete or invent them, and leave out optional arguments the "
    "user did not give. If no call is right, do not call anything and reply with exactly "
    "one of these, and nothing else:\n"
    f"{wire.REASON_CHITCHAT}\n"
    f"{wire.REASON_INFO}\n"
    f"{wire.REASON_MISSING}<parameter name>\n"
    f"{wire.REASON_NO_TOOL}\n"
    f"Use '{wire.REASON_CHITCHAT}' for small talk, '{wire.REASON_INFO}' for a question you "
    f"could answer without a tool, '{wire.REASON_MISSING}<parameter name>' when the right "
    "tool needs a required argument the user did not give, and "
    f"'{wire.REASON_NO_TOOL}' when the user wants an action no tool performs."
)
PROBLEMS = ["malformed", "unknown_tool", "schema_invalid", "ungrounded", "no_reason", "failed"]


class TeacherError(RuntimeError):
    """A configuration problem (no API key, unknown teacher): fix it and re-run."""


class RetryableError(RuntimeError):
    """Worth asking again later: rate limit, server error, timeout, lost connection."""


class PermanentError(RuntimeError):
    """The request itself was refused (4xx); asking again will not help."""


# -----------------------------------------------------------------------------
# teachers: one raw request each, no retries (label() owns the retry loop)

def _transport_errors():
    """httpx's network and timeout errors, from whichever httpx the SDK uses."""
    import importlib.util
    return tuple(__import__(m).TransportError for m in ("httpx", "httpx2") if importlib.util.find_spec(m))


def _status_error(who, code, message):
    """Rate limits and server errors pass; any other 4xx will not."""
    err = RetryableError if code in (408, 429) or code >= 500 else PermanentError
    return err(f"{who} {code}: {message}")


class GeminiTeacher:
    def __init__(self, model, api_key, base_url=None, timeout=30.0):
        from google import genai
        from google.genai import types
        self.types, self.model, self.id = types, model, f"gemini:{model}"
        self.client = genai.Client(api_key=api_key, vertexai=False, http_options=types.HttpOptions(
            base_url=base_url, timeout=int(timeout * 1000),
            retry_options=types.HttpRetryOptions(attempts=1)))

    def ask(self, tools, request):
        from google.genai import errors
        t = self.types
        decls = [t.FunctionDeclaration(name=x["name"], description=x["description"],
                                       parameters_json_schema=x["parameters"]) for x in tools]
        config = t.GenerateContentConfig(
            system_instruction=SYSTEM_PROMPT, temperature=0,
            tools=[t.Tool(function_declarations=decls)],
            automatic_function_calling=t.AutomaticFunctionCallingConfig(disable=True),
            tool_config=t.ToolConfig(function_calling_config=t.FunctionCallingConfig(
                mode=t.FunctionCallingConfigMode.AUTO)))
        try:
            r = self.client.models.generate_content(model=self.model, contents=request, config=config)
        except errors.APIError as e:
            raise _status_error("gemini", e.code or 0, e.message) from e
        except _transport_errors() as e:
            raise RetryableError(f"gemini: {type(e).__name__}: {e}") from e
        calls = [{"name": fc.name, "arguments": fc.args if fc.args is not None else {}}
                 for fc in r.function_calls or []]
        parts = (r.candidates[0].content.parts or []) if r.candidates and r.candidates[0].content else []
        text = "".join(p.text for p in parts if p.text and not p.thought) or None
        return {"calls": calls, "text": text}


class OpenAITeacher:
    def __init__(self, model, api_key, base_url=None, timeout=30.0):
        import openai
        self.model, self.id = model, f"openai:{model}"
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0)

    def ask(self, tools, request):
        import openai
        try:
            r = self.client.chat.completions.create(
                model=self.model, temperature=0, tool_choice="auto",
                messages=[{"role": "system", "content": SYSTEM_PROMPT},
                          {"role": "user", "content": request}],
                tools=[{"type": "function", "function": x} for x in tools])
        except openai.APIConnectionError as e:  # includes APITimeoutError
            raise RetryableError(f"openai: {type(e).__name__}: {e}") from e
        except openai.APIStatusError as e:
            raise _status_error("openai", e.status_code, e.message) from e
        if not r.choices:
            return {"calls": [], "text": None}
        msg = r.choices[0].message
        calls = []
        for tc in msg.tool_calls or []:
            fn = getattr(tc, "function", None)  # a custom (non-function) tool call has none
            try:
                args = json.loads(fn.arguments or "{}")
            except (AttributeError, json.JSONDecodeError):
                args = getattr(fn, "arguments", None)  # kept raw: clean_answer calls it malformed
            calls.append({"name": getattr(fn, "name", None), "arguments": args})
        return {"calls": calls, "text": msg.content}


TEACHERS = {"gemini": (GeminiTeacher, "gemini-2.5-flash", ["GEMINI_API_KEY", "GOOGLE_API_KEY"]),
            "openai": (OpenAITeacher, "gpt-4o-mini", ["OPENAI_API_KEY"])}


def make_teacher(kind, model=None, base_url=None, api_key=None, timeout=30.0):
    """kind 'gemini' or 'openai'; the API key comes from the argument or the environment."""
    if kind not in TEACHERS:
        raise TeacherError(f"unknown teacher {kind!r}: expected one of {', '.join(TEACHERS)}")
    cls, default_model, env = TEACHERS[kind]
    api_key = api_key or next((os.environ[v] for v in env if os.environ.get(v)), None)
    if not api_key:
        raise TeacherError(f"no API key for the {kind} teacher: set {' or '.join(env)}")
    if kind == "openai" and base_url is None:
        base_url = os.environ.get("OPENAI_BASE_URL") or None
    return cls(model or default_model, api_key, base_url=base_url, timeout=timeout)


# -----------------------------------------------------------------------------
# cleaning: a raw answer -> a training target, or the reason it is rejected

def coerce(value, prop):
    """Undo the type slips teachers make: "5" for an integer, "true" for a boolean,
    5.0 for an integer, 1234 for a string (ids)."""
    types = prop.get("type", [])
    types = set(types if isinstance(types, list) else [types])
    if isinstance(value, list) and isinstance(prop.get("items"), dict):
        return [coerce(v, prop["items"]) for v in value]
    if isinstance(value, str) and "string" not in types:
        s = value.strip()
        if types & {"integer", "number"} and re.fullmatch(r"-?\d+", s):
            return int(s)
        if "number" in types and re.fullmatch(r"-?\d*\.\d+", s):
            return float(s)
        if "boolean" in types and s.lower() in ("true", "false"):
            return s.lower() == "true"
    if isinstance(value, float) and "integer" in types and value.is_integer():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and types == {"string"} and "enum" not in prop:
        return str(value)
    return value


def ungrounded(request, args, props):
    """The first string value (or list item) not found in the request, else None.
    Enum values come from the schema, so they need not be in the text."""
    low = request.lower()
    for k, v in args.items():
        prop = props.get(k, {})
        items = v if isinstance(v, list) else [v]
        enum = (prop.get("items") or {}).get("enum", []) if isinstance(v, list) else prop.get("enum", [])
        for item in items:
            if isinstance(item, str) and item not in enum and item.lower() not in low:
                return item
    return None


def clean_answer(answer, tools, request):
    """Raw answer {"calls", "text"} -> ({"calls", "reason"}, None) or (None, problem)."""
    by_name = {t["name"]: t for t in tools}
    calls = answer.get("calls") if isinstance(answer, dict) else None
    if not isinstance(calls, list):
        return None, "malformed"
    if not calls:
        text = answer.get("text") if isinstance(answer.get("text"), str) else ""
        reason = text.strip().strip("\"'`").strip().lower().rstrip(".").strip()
        kind = wire.reason_kind(reason)
        if kind == "missing argument":  # must name a required parameter; restore its spelling
            name = reason[len(wire.REASON_MISSING):].strip().strip("\"'`")
            req = {r.lower(): r for t in tools for r in t["parameters"].get("required", [])}
            if name not in req:
                return None, "no_reason"
            reason = wire.REASON_MISSING + req[name]
        elif kind == "other":
            return None, "no_reason"
        return {"calls": [], "reason": reason}, None
    out = []
    for c in calls:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) \
                or not isinstance(c.get("arguments"), dict):
            return None, "malformed"
        tool = by_name.get(c["name"])
        if tool is None:
            return None, "unknown_tool"
        props = tool["parameters"].get("properties", {})
        args = {k: coerce(v, props.get(k, {})) for k, v in c["arguments"].items() if v is not None}
        call = {"name": c["name"], "arguments": args}
        if wire.validate_call(call, by_name):
            return None, "schema_invalid"
        if ungrounded(request, args, props) is not None:
            return None, "ungrounded"
        out.append(call)
    return {"calls": out, "reason": None}, None


# -----------------------------------------------------------------------------
# the cache: one JSONL line per answered request

def cache_key(teacher_id, request, tools):
    blob = json.dumps([teacher_id, request, tools], sort_keys=True, ensure_ascii=False,
                      separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def load_cache(path):
    """key -> raw answer. A line that does not parse (a run killed mid-write) is skipped."""
    out = {}
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
                out[rec["key"]] = rec["answer"]
            except (json.JSONDecodeError, KeyError, TypeError):
                pass
    return out


def _open_for_append(path):
    """Append mode, first ending a truncated last line so the next record starts clean."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    f = open(path, "a+", encoding="utf-8")
    if f.tell() > 0:
        f.seek(f.tell() - 1)
        if f.read(1) != "\n":
            f.write("\n")
    return f


# -----------------------------------------------------------------------------
# labelling: concurrent, rate-limited, retried, cached

class RateLimiter:
    """At most rps request starts per second, shared by all worker threads."""

    def __init__(self, rps):
        self.interval, self.next, self.lock = 1.0 / rps if rps else 0.0, 0.0, threading.Lock()

    def wait(self):
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.interval
        time.sleep(max(0.0, start - now))


def _ask_with_retries(teacher, tools, request, limiter, stop, max_retries, backoff):
    """-> (raw answer or None, HTTP attempts, error message or None)."""
    for attempt in range(max_retries + 1):
        limiter.wait()
        if stop.is_set():
            return None, attempt, "interrupted"
        try:
            return teacher.ask(tools, request), attempt + 1, None
        except RetryableError as e:
            if attempt == max_retries:
                return None, attempt + 1, str(e)
            stop.wait(backoff * 2 ** attempt * (1 + 0.1 * random.random()))  # wakes on Ctrl-C
        except PermanentError as e:
            return None, attempt + 1, str(e)
        except Exception as e:  # an unreadable response must not kill a long paid run
            return None, attempt + 1, f"{type(e).__name__}: {e}"


def label(items, teacher, cache_path, concurrency=4, rps=5.0, max_retries=5, backoff=1.0, progress=True):
    """items: [{"tools", "request"}] -> (results in the same order, stats). A result is
    {"calls", "reason"} for an accepted answer, None for a rejected or failed one."""
    # Items share a few tool lists, and checking a schema costs milliseconds: do each once.
    normalize = functools.lru_cache(maxsize=None)(lambda s: wire.normalize_tools(json.loads(s)))
    tools = [normalize(json.dumps(it["tools"], sort_keys=True)) for it in items]
    keys = [cache_key(teacher.id, it["request"], t) for it, t in zip(items, tools)]
    answers = load_cache(cache_path)
    stats = dict(items=len(items), cached=sum(k in answers for k in keys), sent=0, retries=0, ok=0,
                 **{p: 0 for p in PROBLEMS})
    todo = {}  # key -> indices of the items that share it: identical items are sent once
    for i, k in enumerate(keys):
        if k not in answers:
            todo.setdefault(k, []).append(i)
    errors = []
    limiter, stop = RateLimiter(rps), threading.Event()
    bar = tqdm(total=len(items), initial=stats["cached"], desc="teacher", disable=not progress)
    with _open_for_append(cache_path) as cache, ThreadPoolExecutor(max(1, concurrency)) as pool:
        futures = {pool.submit(_ask_with_retries, teacher, tools[ix[0]], items[ix[0]]["request"],
                               limiter, stop, max_retries, backoff): k for k, ix in todo.items()}
        recorded = set()

        def record(fut):
            """Main thread only: count the attempts, append a new answer to the cache."""
            key = futures[fut]
            if key in recorded or fut.cancelled():
                return
            answer, attempts, error = fut.result()
            recorded.add(key)
            stats["sent"] += attempts
            stats["retries"] += max(0, attempts - 1)
            if answer is not None:
                rec = {"key": key, "teacher": teacher.id, "request": items[todo[key][0]]["request"],
                       "answer": answer}
                cache.write(json.dumps(rec, ensure_ascii=False) + "\n")  # one write: no torn line
                cache.flush()
                answers[key] = answer
            elif error != "interrupted":
                errors.append(error)
            bar.update(len(todo[key]))

        try:
            for fut in as_completed(futures):
                record(fut)
        except BaseException:
            # Stop sending, but keep every answer already in flight: it is paid for.
            stop.set()
            for fut in futures:
                fut.cancel()
            for fut in futures:
                record(fut)
            raise
        finally:
            bar.close()

    results = []
    for it, t, k in zip(items, tools, keys):
        if k not in answers:
            results.append(None)
            stats["failed"] += 1
            continue
        result, problem = clean_answer(answers[k], t, it["request"])
        results.append(result)
        stats[problem or "ok"] += 1
    print(f"teacher: {stats['items']} items, {stats['cached']} cached, {stats['sent']} sent "
          f"({stats['retries']} retries); accepted {stats['ok']}; rejected: "
          + ", ".join(f"{p} {stats[p]}" for p in PROBLEMS)
          + (f" (first failure: {errors[0]})" if errors else ""))
    return results, stats
