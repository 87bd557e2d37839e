"""
Label (tools, request) pairs with a cloud "teacher" model (Gemini or OpenAI), so
data.py can train the small model on a big model's answers:

    results, stats = label(items, make_teacher("gemini"), "data/teacher_cache.jsonl")

Answers cost money, so each raw answer is appended to a JSONL cache as soon as it
arrives: an interrupted run loses nothing already paid for, a re-run sends only
what is missing, and the cleaning rules can change without asking again.

What the real services do, and what this file does about it (read against the
google-genai 3.6 and openai 3.57 SDKs and the providers' pages, 2026-12-01; tested
with google-genai 3.6.1 and openai 3.60.0, requirements.txt keeps both below 4;
tests/fake_servers.py plays each part):
- The Gemini requests (function declarations with parametersJsonSchema, toolConfig,
  systemInstruction) are written for the Gemini API's v1beta. google-genai 3 sends
  to v1 unless told otherwise, and v1's GenerateContentRequest has none of those
  fields, so the client is pinned to v1beta (api_version changes it).
- OpenAI's reasoning models take function tools on Chat Completions only with
  reasoning_effort "none", and some (GPT-6 Astra, GPT-6.1 Sol, the -pro models) not
  at all: the effort is chosen per model, and those models are refused up front.
- Every answer reports the model that gave it, which can differ from the name asked
  for (an alias, a dated snapshot, a retired model routed to its replacement). It is
  stored with the answer, in the cache and in the labels.
- An answer can be unfinished: a blocked prompt (Gemini promptFeedback.blockReason), a
  finish reason other than a normal stop (truncated, safety, a malformed call), a
  refusal. It is kept in the cache (it was paid for) but not as final: a re-run asks
  again, up to max_unfinished times.
- A rate limit says how long to wait (Retry-After headers, Gemini RetryInfo.retryDelay):
  retries wait that long, else back off exponentially with jitter, at most a minute.
- Some refusals will meet every request alike: an exhausted quota (OpenAI
  insufficient_quota, a Gemini per-day quota), a bad key, an unknown model, a setting
  the model refuses. The run stops (StopRun) with one line, after saving what arrived.
- Sampling parameters are sent only when set: OpenAI's reasoning models refuse a
  temperature, and Google advises against changing it on Gemini 3.
"""

import email.utils
import functools
import hashlib
import json
import os
import random
import re
import threading
import time
from collections import Counter
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
# The Gemini API version the requests below are written for. google-genai 3 defaults
# to v1, whose published GenerateContentRequest (googleapis, generativelanguage/v1)
# has no tools, toolConfig or systemInstruction: every request would be a 400.
GEMINI_API_VERSION = "v1beta"
PROBLEMS = ["malformed", "unknown_tool", "schema_invalid", "ungrounded", "no_reason", "failed"]
# OpenAI 400s about these request settings are the same for every item: stop the run
RUN_SETTINGS = {"model", "temperature", "reasoning_effort", "top_p"}


class TeacherError(RuntimeError):
    """A configuration problem (no API key, unknown teacher, a tool name the provider
    refuses): fix it and re-run."""


class StopRun(TeacherError):
    """The service will refuse every request alike (quota exhausted, bad key, unknown
    model, a setting the model refuses): label() stops the whole run."""


class RetryableError(RuntimeError):
    """Worth asking again later: rate limit, server error, timeout, lost connection.
    delay: the seconds the server asked us to wait, if it said."""

    def __init__(self, message, delay=None):
        super().__init__(message)
        self.delay = delay


class PermanentError(RuntimeError):
    """The request itself was refused (4xx); asking again will not help."""


# -----------------------------------------------------------------------------
# teachers: one raw request each, no retries (label() owns the retry loop)
#
# ask(tools, request, tool_choice) -> {"calls", "text", "model", "stop"}: "model" is the
# model that answered, "stop" None for a finished answer, else its kind
# ("blocked:SAFETY", "finish:MAX_TOKENS", "refusal", ...).

def _transport_errors():
    """httpx's network and timeout errors, from whichever httpx the SDK uses."""
    import importlib.util
    return tuple(__import__(m).TransportError for m in ("httpx", "httpx2") if importlib.util.find_spec(m))


def _retry_after(headers):
    """Seconds a server asks us to wait (retry-after-ms, or Retry-After in seconds or
    as an HTTP date), or None."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            return max(0.0, float(headers.get(name)) * scale)
        except (TypeError, ValueError):
            pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(headers.get("retry-after")).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _status_error(who, code, message, delay=None, quota=None, stop=False):
    """An HTTP error -> the exception label() acts on. quota: why the quota counts as
    exhausted (else None); stop: the server refuses something every request shares."""
    message = " ".join(str(message).split())[:400]   # one line, whatever the server sent
    if quota:
        return StopRun(f"{who}: quota exhausted ({quota}): {message}")
    if stop or code in (401, 403, 404):           # bad key, no access, unknown model
        return StopRun(f"{who} {code}: {message}")
    if code in (408, 409, 429) or code >= 500:
        return RetryableError(f"{who} {code}: {message}", delay)
    return PermanentError(f"{who} {code}: {message}")


def _gemini_error(e, api_version=GEMINI_API_VERSION):
    """google.genai APIError -> RetryableError / PermanentError / StopRun, from the
    google.rpc details Google sends: RetryInfo (how long to wait), QuotaFailure (a
    per-day quota will not come back this run), ErrorInfo (a bad key). A top-level
    field the API version does not know ('Unknown name "tools": Cannot find field.',
    with no path after the name) is in every request alike: the run stops."""
    message = " ".join(f"{e.status or 'error'}: {e.message}".split())   # one line
    if e.code == 400 and re.search(r'Unknown name "\w+": Cannot find field', str(e.message)):
        why = (f"they are written for {GEMINI_API_VERSION}" if api_version != GEMINI_API_VERSION
               else "the service has changed what it takes")
        return StopRun(f"gemini 400: api_version {api_version} does not take these requests ({why}): {message}"[:500])
    body = e.details if isinstance(e.details, dict) else {}
    delay, per_day, bad_key = None, None, False
    for d in (body.get("error", body) or {}).get("details") or []:
        kind = str(d.get("@type", "")) if isinstance(d, dict) else ""
        if kind.endswith("RetryInfo"):
            m = re.fullmatch(r"([\d.]+)s", str(d.get("retryDelay", "")))
            delay = float(m.group(1)) if m else None
        elif kind.endswith("QuotaFailure"):
            ids = [str(v.get("quotaId", "")) for v in d.get("violations") or [] if isinstance(v, dict)]
            per_day = next((q for q in ids if "PerDay" in q), per_day)
        elif kind.endswith("ErrorInfo"):
            bad_key |= d.get("reason") == "API_KEY_INVALID"
    header = _retry_after(getattr(getattr(e, "response", None), "headers", None))
    delay = header if header is not None else delay
    return _status_error("gemini", e.code or 0, message, delay, per_day, bad_key)


def _value(x):
    return getattr(x, "value", x)    # an SDK enum -> its wire name


class GeminiTeacher:
    kind = "gemini"

    def check_tools(self, tools):
        """Nothing to refuse: every name wire.NAME_RE lets in (a letter or _, then letters,
        digits, _ . -; at most 64) is one Gemini's FunctionDeclaration.name takes."""

    def __init__(self, model, api_key, base_url=None, timeout=30.0, temperature=None,
                 api_version=GEMINI_API_VERSION):
        from google import genai
        from google.genai import types
        # id (the cache key) leaves out the API version: the same model answers on both
        self.types, self.model, self.id, self.temperature = types, model, f"gemini:{model}", temperature
        self.api_version = api_version
        # The SDK's own retries stay off: label() retries, counts the attempts, honours
        # RetryInfo and stops the whole run on an exhausted quota. An explicit
        # api_version wins over the SDK's default and GOOGLE_GENAI_API_VERSION.
        self.client = genai.Client(api_key=api_key, vertexai=False, http_options=types.HttpOptions(
            base_url=base_url, api_version=api_version, timeout=int(timeout * 1000),
            retry_options=types.HttpRetryOptions(attempts=1)))

    def ask(self, tools, request, tool_choice="auto"):
        """tool_choice: auto | none | required | a tool name (serve.py's fallback passes
        the client's own): a call is forced with mode ANY and the allowed names."""
        from google.genai import errors
        t = self.types
        decls = [t.FunctionDeclaration(name=x["name"], description=x["description"],
                                       parameters_json_schema=x["parameters"]) for x in tools]
        if tool_choice in ("auto", "none"):
            fcc = t.FunctionCallingConfig(mode=t.FunctionCallingConfigMode(tool_choice.upper()))
        else:
            names = [x["name"] for x in tools] if tool_choice == "required" else [tool_choice]
            fcc = t.FunctionCallingConfig(mode=t.FunctionCallingConfigMode.ANY, allowed_function_names=names)
        config = t.GenerateContentConfig(
            system_instruction=SYSTEM_PROMPT, tools=[t.Tool(function_declarations=decls)],
            automatic_function_calling=t.AutomaticFunctionCallingConfig(disable=True),
            tool_config=t.ToolConfig(function_calling_config=fcc),
            **({"temperature": self.temperature} if self.temperature is not None else {}))
        try:
            r = self.client.models.generate_content(model=self.model, contents=request, config=config)
        except errors.APIError as e:
            raise _gemini_error(e, self.api_version) from e
        except _transport_errors() as e:
            raise RetryableError(f"gemini: {type(e).__name__}: {e}") from e
        stop = None
        cand = r.candidates[0] if r.candidates else None
        if r.prompt_feedback is not None and r.prompt_feedback.block_reason:
            stop = f"blocked:{_value(r.prompt_feedback.block_reason)}"
        elif cand is None:
            stop = "empty"
        elif cand.finish_reason and _value(cand.finish_reason) != "STOP":
            stop = f"finish:{_value(cand.finish_reason)}"
        calls = [{"name": fc.name, "arguments": fc.args if fc.args is not None else {}}
                 for fc in r.function_calls or []]
        parts = (cand.content.parts or []) if cand and cand.content else []
        text = "".join(p.text for p in parts if p.text and not p.thought) or None
        return {"calls": calls, "text": text, "model": r.model_version or self.model, "stop": stop}


class OpenAITeacher:
    kind = "openai"

    @staticmethod
    def aliases(tools):
        """name -> the name OpenAI is sent. It takes 1-64 letters, digits, _ and - only,
        while wire.py (like Gemini and MCP-style catalogues) allows dots, and invent.py
        makes dotted names on purpose: a dot is sent as "_", and the calls mapped back.
        Raises TeacherError (before any request) when an alias is another tool's name."""
        out = {t["name"]: t["name"].replace(".", "_") for t in tools}
        seen = {}
        for name, alias in out.items():
            if not re.fullmatch(r"[A-Za-z0-9_\-]{1,64}", alias):
                raise TeacherError(f"tool '{name}': the openai teacher accepts tool names of 1-64 letters, "
                                   "digits, _ and - only; rename the tool")
            if alias in seen:
                raise TeacherError(f"tools '{seen[alias]}' and '{name}' are both sent to the openai teacher as "
                                   f"'{alias}' (it refuses dots in names); rename one")
            seen[alias] = name
        return out

    check_tools = aliases

    def __init__(self, model, api_key, base_url=None, timeout=30.0, temperature=None, reasoning_effort=None):
        import openai
        self.model, self.id = model, f"openai:{model}"
        self.temperature, self.reasoning_effort = temperature, reasoning_effort
        # max_retries=0: label() retries, honouring the same retry-after headers the
        # client would, and stops the whole run on insufficient_quota.
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0)

    def ask(self, tools, request, tool_choice="auto"):
        import openai
        alias = self.aliases(tools)
        back = {a: n for n, a in alias.items()}
        settings = {}
        if self.temperature is not None:
            settings["temperature"] = self.temperature
        if self.reasoning_effort is not None:
            settings["reasoning_effort"] = self.reasoning_effort
        if tool_choice not in ("auto", "none", "required"):
            tool_choice = {"type": "function", "function": {"name": alias.get(tool_choice, tool_choice)}}
        if tools:                       # OpenAI refuses an empty list, and a tool_choice without one
            settings["tools"] = [{"type": "function", "function": {**x, "name": alias[x["name"]]}} for x in tools]
            settings["tool_choice"] = tool_choice
        try:
            r = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "system", "content": SYSTEM_PROMPT},
                                            {"role": "user", "content": request}], **settings)
        except openai.APIConnectionError as e:  # includes APITimeoutError
            raise RetryableError(f"openai: {type(e).__name__}: {e}") from e
        except openai.APIStatusError as e:
            message = (e.body.get("message") if isinstance(e.body, dict) else None) or e.message
            quota = "insufficient_quota" if "insufficient_quota" in (e.code, e.type) else None
            if not quota:
                message = f"{e.code or e.type or 'error'}{f' ({e.param})' if e.param else ''}: {message}"
            raise _status_error("openai", e.status_code, message, _retry_after(e.response.headers), quota,
                                e.status_code == 400 and e.param in RUN_SETTINGS) from e
        if not r.choices:
            return {"calls": [], "text": None, "model": r.model or self.model, "stop": "empty"}
        choice, msg = r.choices[0], r.choices[0].message
        stop = "refusal" if getattr(msg, "refusal", None) else \
            f"finish:{choice.finish_reason}" if choice.finish_reason in ("length", "content_filter") else None
        calls = []
        for tc in msg.tool_calls or []:
            fn = getattr(tc, "function", None)  # a custom (non-function) tool call has none
            args = getattr(fn, "arguments", None)
            if isinstance(args, str):           # some compatible servers send an object: used as it is
                try:
                    args = json.loads(args or "{}")
                except json.JSONDecodeError:
                    pass                        # kept raw: clean_answer calls it malformed
            name = getattr(fn, "name", None)
            calls.append({"name": back.get(name, name), "arguments": args})
        return {"calls": calls, "text": msg.content, "model": r.model or self.model, "stop": stop}


# kind -> (class, default model, API key variables). The defaults are the providers'
# own replacements for the gemini-2.5-flash and gpt-4o-mini used before (shut down on
# 2026-12-01, and shutting down on 2027-01-14): the fast, cheap tier of each.
TEACHERS = {"gemini": (GeminiTeacher, "gemini-3.5-flash-lite", ["GEMINI_API_KEY", "GOOGLE_API_KEY"]),
            "openai": (OpenAITeacher, "gpt-6-luna", ["OPENAI_API_KEY"])}


def openai_reasoning_default(model):
    """The reasoning_effort to send with function tools on Chat Completions: 'none'
    for OpenAI's GPT-5.1-and-later names, else None (not sent). From OpenAI's pages
    (2026): GPT-5.1 takes tools at every effort; from GPT-5.2/5.4 on, and for GPT-6
    Sol and Luna, Chat Completions takes function tools only with 'none' (their default
    is medium). Models before GPT-5.1 (gpt-5, gpt-5-mini, the o-series) have no 'none'
    and take tools at their default; older models, fine-tunes of them and the models of
    other OpenAI-compatible servers do not know the parameter."""
    m = re.search(r"(?:^|/)gpt-(\d+)(?:\.(\d+))?", model)
    return "none" if m and (int(m.group(1)), int(m.group(2) or 0)) >= (5, 1) else None


def openai_chat_tools_refused(model):
    """Why Chat Completions takes function tools from this OpenAI model at no
    reasoning effort, else None. OpenAI (2026): "GPT-6 Astra and GPT-6.1 Sol require
    Responses for tool calling" (6.1 Sol has no 'none'); the -pro models are served
    by the Responses API only. This teacher speaks Chat Completions."""
    m = re.search(r"(?:^|/)gpt-(\d+)(?:\.(\d+))?-([a-z]+)", model)
    if not m:
        return None
    version, family = (int(m.group(1)), int(m.group(2) or 0)), m.group(3)
    if family == "pro":
        return "the -pro models are served by the Responses API only"
    if family == "astra" or (family == "sol" and version >= (6, 1)):
        return "GPT-6 Astra and GPT-6.1 Sol take tools through the Responses API only"
    return None


def make_teacher(kind, model=None, base_url=None, api_key=None, timeout=30.0, temperature=None,
                 reasoning_effort="auto", api_version=None):
    """kind 'gemini' or 'openai'; the API key comes from the argument or the environment.
    temperature: sent only if given. reasoning_effort (OpenAI): 'auto' picks it from the
    model name (openai_reasoning_default) and refuses a model whose tools Chat
    Completions never takes; None never sends it; a value is sent as given.
    api_version (Gemini): default GEMINI_API_VERSION, what the requests are written for."""
    if kind not in TEACHERS:
        raise TeacherError(f"unknown teacher {kind!r}: expected one of {', '.join(TEACHERS)}")
    if api_version is not None and kind != "gemini":
        raise TeacherError("api_version is a Gemini setting; the openai teacher does not take it")
    if api_version is not None and not re.fullmatch(r"v\d+(?:alpha|beta)?\d*", api_version):
        raise TeacherError(f"api_version {api_version!r}: expected a Gemini API version such as "
                           f"{GEMINI_API_VERSION} or v1")
    cls, default_model, env = TEACHERS[kind]
    api_key = api_key or next((os.environ[v] for v in env if os.environ.get(v)), None)
    if not api_key:
        raise TeacherError(f"no API key for the {kind} teacher: set {' or '.join(env)}")
    model = model or default_model
    if kind == "gemini":
        if reasoning_effort not in ("auto", None):
            raise TeacherError("reasoning_effort is an OpenAI setting; the gemini teacher does not take it")
        return cls(model, api_key, base_url=base_url, timeout=timeout, temperature=temperature,
                   api_version=api_version or GEMINI_API_VERSION)
    if base_url is None:
        base_url = os.environ.get("OPENAI_BASE_URL") or None
    if reasoning_effort == "auto":
        why = openai_chat_tools_refused(model)
        if why:   # before any request: every one would be refused alike
            raise TeacherError(f"the openai teacher uses Chat Completions, which takes no function tools from "
                               f"{model} ({why}): use the Responses API, or a model such as gpt-6-luna or "
                               "gpt-6-sol (tools with reasoning_effort 'none')")
        reasoning_effort = openai_reasoning_default(model)
    return cls(model, api_key, base_url=base_url, timeout=timeout, temperature=temperature,
               reasoning_effort=reasoning_effort)


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
    """Raw answer {"calls", "text", ...} -> ({"calls", "reason"}, None) or (None, problem):
    one of PROBLEMS, or the kind of an unfinished answer ("blocked:SAFETY", "refusal", ...)."""
    if isinstance(answer, dict) and answer.get("stop"):
        return None, answer["stop"]
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
    """key -> the raw answers received for it, oldest first (several when earlier ones
    were unfinished). A line that does not parse (a run killed mid-write) is skipped."""
    out = {}
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
                out.setdefault(rec["key"], []).append(rec["answer"])
            except (json.JSONDecodeError, KeyError, TypeError):
                pass
    return out


def final_answer(answers):
    """The finished answer among a key's answers, else None. (Answers cached before
    unfinished ones were told apart have no "stop": they count as finished.)"""
    return next((a for a in reversed(answers) if isinstance(a, dict) and not a.get("stop")), None)


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


def retry_delay(attempt, hint, backoff, max_delay):
    """Seconds to wait before retry number attempt+1: the server's hint if it gave one,
    else backoff * 2**attempt; stretched by up to a quarter at random (workers that
    failed together should not retry together), never more than max_delay."""
    base = hint if hint is not None else backoff * 2 ** attempt
    return min(max_delay, base * (1 + 0.25 * random.random()))


def _ask_with_retries(teacher, tools, request, limiter, stop, max_retries, backoff, max_delay, pause):
    """-> (raw answer or None, HTTP attempts, error: None, a message, or a StopRun)."""
    for attempt in range(max_retries + 1):
        limiter.wait()
        if stop.is_set():
            return None, attempt, "interrupted"
        try:
            return teacher.ask(tools, request), attempt + 1, None
        except RetryableError as e:
            if attempt == max_retries:
                return None, attempt + 1, str(e)
            pause(retry_delay(attempt, e.delay, backoff, max_delay))
        except StopRun as e:
            stop.set()                        # every other request would meet the same refusal
            return None, attempt + 1, e
        except PermanentError as e:
            return None, attempt + 1, str(e)
        except Exception as e:  # an unreadable response must not kill a long paid run
            return None, attempt + 1, f"{type(e).__name__}: {e}"


def label(items, teacher, cache_path, concurrency=4, rps=5.0, max_retries=6, backoff=2.0, max_delay=60.0,
          max_unfinished=3, progress=True, pause=None):
    """items: [{"tools", "request"}] -> (results in the same order, stats). A result is
    {"calls", "reason", "model"} for an accepted answer ("model": the one that answered),
    None for a rejected, unfinished or failed one.

    Retries (rate limits, server errors, timeouts) wait what the server asks, else
    backoff * 2**n, at most max_delay seconds each (6 retries: about 2 minutes, longer
    than a per-minute quota window); pause(seconds) does the waiting (default: a wait
    that Ctrl-C cuts short; tests pass a recorder). An unfinished answer is asked again
    on the next run, until a key has max_unfinished of them. Raises TeacherError before
    the first request for a tool name the provider refuses, and StopRun, once every
    answer in flight is saved, when the service refuses everything alike."""
    # Items share a few tool lists, and checking a schema costs milliseconds: do each once.
    normalize = functools.lru_cache(maxsize=None)(lambda s: wire.normalize_tools(json.loads(s)))
    tools = [normalize(json.dumps(it["tools"], sort_keys=True)) for it in items]
    for t in {id(t): t for t in tools}.values():
        teacher.check_tools(t)
    keys = [cache_key(teacher.id, it["request"], t) for it, t in zip(items, tools)]
    history = load_cache(cache_path)
    todo = {}  # key -> indices of the items that share it: identical items are sent once
    for i, k in enumerate(keys):
        past = history.get(k, [])
        if final_answer(past) is None and len(past) < max_unfinished:
            todo.setdefault(k, []).append(i)
    stats = dict(items=len(items), cached=len(items) - sum(map(len, todo.values())), sent=0, retries=0, ok=0,
                 **{p: 0 for p in PROBLEMS}, not_final={}, given_up=0)
    errors, fatal = [], []
    limiter, stop = RateLimiter(rps), threading.Event()
    pause = pause or stop.wait    # stop.wait: Ctrl-C or a StopRun elsewhere ends the wait
    bar = tqdm(total=len(items), initial=stats["cached"], desc="teacher", disable=not progress)
    with _open_for_append(cache_path) as cache, ThreadPoolExecutor(max(1, concurrency)) as pool:
        futures = {pool.submit(_ask_with_retries, teacher, tools[ix[0]], items[ix[0]]["request"],
                               limiter, stop, max_retries, backoff, max_delay, pause): k for k, ix in todo.items()}
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
            if answer is not None:   # finished or not, it is paid for: kept
                rec = {"key": key, "teacher": teacher.id, "request": items[todo[key][0]]["request"],
                       "answer": answer}
                cache.write(json.dumps(rec, ensure_ascii=False) + "\n")  # one write: no torn line
                cache.flush()
                history.setdefault(key, []).append(answer)
            elif isinstance(error, StopRun):
                fatal.append(error)
                for f in futures:    # nothing queued is sent; what is in flight is kept
                    f.cancel()
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
    if fatal:
        have = sum(k in history for k in keys)
        why = str(fatal[0]).rstrip(". ")
        then = "run the same command again once the quota is back" if "quota exhausted" in why \
            else "fix that and run again"
        raise StopRun(f"teacher stopped: {why}. {have} of {len(items)} answers are saved in {cache_path}; "
                      f"{then} to continue")

    results, models = [], Counter()
    for it, t, k in zip(items, tools, keys):
        past = history.get(k, [])
        answer = final_answer(past) or (past[-1] if past else None)
        if answer is None:
            results.append(None)
            stats["failed"] += 1
            continue
        models[answer.get("model") or "unknown"] += 1
        result, problem = clean_answer(answer, t, it["request"])
        if problem in PROBLEMS:
            stats[problem] += 1
        elif problem:                # unfinished: asked again next run, up to the limit
            stats["not_final"][problem] = stats["not_final"].get(problem, 0) + 1
            stats["given_up"] += len(past) >= max_unfinished
        else:
            stats["ok"] += 1
            result["model"] = answer.get("model")
        results.append(result)
    unfinished = sum(stats["not_final"].values())
    print(f"teacher: {stats['items']} items, {stats['cached']} cached, {stats['sent']} sent "
          f"({stats['retries']} retries); accepted {stats['ok']}; rejected: "
          + ", ".join(f"{p} {stats[p]}" for p in PROBLEMS)
          + (f"; not final {unfinished} (" + ", ".join(f"{k} {n}" for k, n in sorted(stats["not_final"].items()))
             + f"): asked again on the next run, up to {max_unfinished} tries; given up {stats['given_up']}"
             if unfinished else "")
          + "; answered by " + (", ".join(f"{m} {n}" for m, n in models.most_common()) or "nobody")
          + (f" (first failure: {errors[0]})" if errors else ""))
    return results, stats
