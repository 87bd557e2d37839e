"""Local stand-ins for the Gemini and OpenAI HTTP APIs, so teacher.py is tested
through the real SDKs and the real wire protocols without a network.

They are as strict as the real services where teacher.py could go wrong
(provider documentation and SDK sources as of 2026-12-01):
  - unknown model names are a 404; a model past its shutdown is served by its
    replacement (Gemini routes gemini-2.5-flash to gemini-3.5-flash-lite), and every
    answer reports the model that really answered (Gemini `modelVersion`, OpenAI a
    dated snapshot in `model`);
  - tool names outside the provider's pattern and `$ref`s that point nowhere are a 400;
  - OpenAI: reasoning models refuse function tools on Chat Completions unless
    reasoning_effort is "none", and refuse a temperature other than 1 unless it is
    "none"; older models refuse reasoning_effort itself; tool_choice must name a tool
    that is there;
  - Gemini: allowedFunctionNames only with mode ANY, and only declared names;
  - Gemini API versions: each path answers as its version does. /v1beta takes the
    whole request teacher.py sends. /v1 takes only what the published v1
    GenerateContentRequest has (googleapis google/ai/generativelanguage/v1/
    generative_service.proto, read at its 2026-08-22 snapshot: model, contents,
    safetySettings, generationConfig), so tools, toolConfig and systemInstruction
    are a 400 "Invalid JSON payload received. Unknown name ...", as other projects
    met it; and the -latest aliases are a 404 there (google-genai 3.0 release notes:
    they "exist only on v1beta"). Google's API-versions page (2026) lists function
    calling under v1 too without saying which fields carry it: where the two
    disagree this fake follows the proto, and tests pin the version the code sends.

Each server answers by a small rule ("weather in X" -> get_weather(city=X),
anything else -> a text reason), unless a test scripted the next behaviours for a
request text:
  ("status", code)           an error with that HTTP code
  ("sleep", seconds)         answer late (then by the rule)
  ("call", name, args), ("calls", [(name, args), ...]), ("text", str)
  ("raw_args", str)          OpenAI: arguments as this exact JSON string
  ("obj_args", args)         OpenAI: arguments as an object, as some compatible servers do
  ("rate_limit", seconds)    429 with the provider's wait hint (OpenAI retry-after
                             headers, Gemini RetryInfo.retryDelay)
  ("quota",)                 429, quota exhausted (OpenAI insufficient_quota, Gemini a
                             per-day QuotaFailure, which Google sends with a short RetryInfo too)
  ("blocked", reason)        Gemini: promptFeedback.blockReason, no candidates;
                             OpenAI: 400 invalid_prompt
  ("finish", reason)         Gemini finishReason / OpenAI finish_reason other than a normal stop
  ("refusal", text)          OpenAI: message.refusal
Setting fake.every to a behaviour applies it to every request from then on (a quota
that runs out mid-run: on_request(fake) runs after each request is counted).
Under a forced tool choice (Gemini ANY, OpenAI required or a named tool) a text
answer becomes a call of the first allowed tool, as the services never answer text then.
It counts the requests it received per user text.
"""

import json
import re
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# name -> the model that answers (what the response reports). From the providers'
# model lists; the OpenAI snapshot dates are illustrative.
GEMINI_MODELS = {
    "gemini-3.8-flash": "gemini-3.8-flash", "gemini-3.7-flash": "gemini-3.7-flash",
    "gemini-3.6-flash": "gemini-3.6-flash", "gemini-3.5-flash": "gemini-3.5-flash",
    "gemini-3.5-flash-lite": "gemini-3.5-flash-lite", "gemini-3.1-flash-lite": "gemini-3.1-flash-lite",
    "gemini-3.1-pro-preview": "gemini-3.1-pro-preview", "gemini-2.5-flash-lite": "gemini-2.5-flash-lite",
    "gemini-flash-latest": "gemini-3.8-flash", "gemini-flash-lite-latest": "gemini-3.5-flash-lite",
    # shut down 2026-12-01; requests are routed to the replacement
    "gemini-2.5-flash": "gemini-3.5-flash-lite", "gemini-2.5-pro": "gemini-3.8-flash",
}
# Gemini API version -> the top-level generateContent fields it takes (None: all the
# SDK sends), and the model aliases that exist only on v1beta
GEMINI_VERSION_FIELDS = {"v1beta": None, "v1": {"contents", "safetySettings", "generationConfig"}}
GEMINI_BETA_ONLY = {"gemini-flash-latest", "gemini-flash-lite-latest", "gemini-pro-latest"}
# name -> (snapshot reported, default reasoning effort or None for a non-reasoning
# model, whether "none" is accepted). OpenAI's deployment checklist (2026): GPT-6 Sol
# and Luna take function tools on Chat Completions only with reasoning_effort "none";
# GPT-6 Astra and GPT-6.1 Sol need the Responses API for tool calling (6.1 Sol has no
# "none"; for Astra the docs say only that, modelled the same way).
OPENAI_MODELS = {
    "gpt-6-luna": ("gpt-6-luna-2026-09-22", "medium", True),
    "gpt-6-sol": ("gpt-6-sol-2026-09-22", "medium", True),
    "gpt-6-astra": ("gpt-6-astra-2026-09-22", "medium", False),
    "gpt-6.1-sol": ("gpt-6.1-sol-2026-10-20", "medium", False),
    "gpt-5.6-luna": ("gpt-5.6-luna-2026-07-09", "medium", True),
    "gpt-5.4-mini": ("gpt-5.4-mini-2026-03-17", "none", True),
    "gpt-4.1-mini": ("gpt-4.1-mini-2025-04-14", None, False),
    "gpt-4o-mini": ("gpt-4o-mini-2024-07-18", None, False),
}
# announced shutdowns (provider deprecation pages, read 2026-12-01)
SHUTDOWN = {"gemini-2.5-flash": "2026-12-01", "gemini-2.5-pro": "2026-12-01",
            "gemini-2.5-flash-lite": "2026-07-22", "gpt-4o-mini": "2027-01-14",
            "gpt-4.1-mini": "2027-01-14", "gpt-5.6-luna": "2027-06-01"}

GEMINI_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:\-]{0,127}$")
OPENAI_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


def rule(text):
    """Default answer for a request text: a call, or a no-call reason."""
    m = re.search(r"weather in ([A-Z][\w ]*?)(?:[.?!]|$)", text)
    if m:
        return ("call", "get_weather", {"city": m.group(1)})
    return ("text", "Chit-chat.")


def dangling_ref(schema):
    """The first local $ref in a JSON Schema that resolves to nothing, else None."""
    def walk(node):
        if isinstance(node, list):
            return next((r for r in map(walk, node) if r), None)
        if not isinstance(node, dict):
            return None
        ref = node.get("$ref")
        if isinstance(ref, str):
            target = schema
            for part in ref.lstrip("#").strip("/").split("/") if ref != "#" else []:
                target = target.get(part) if isinstance(target, dict) else None
            if not ref.startswith("#") or target is None:
                return ref
        return next((r for r in map(walk, node.values()) if r), None)
    return walk(schema)


class Refuse(Exception):
    """A request the real service would refuse: (HTTP code, error body, headers)."""

    def __init__(self, code, body, headers=None):
        super().__init__(code)
        self.code, self.body, self.headers = code, body, headers or {}


def openai_error(code, message, type_="invalid_request_error", param=None, err_code=None, headers=None):
    return Refuse(code, {"error": {"message": message, "type": type_, "param": param, "code": err_code}}, headers)


def gemini_error(code, message, status, details=None):
    body = {"error": {"code": code, "message": message, "status": status}}
    if details:
        body["error"]["details"] = details
    return Refuse(code, body)


class Fake:
    """One running server. url is its base URL; script[text] is a list of behaviours
    used (front first) before falling back to rule(); counts[text] = requests seen."""

    def __init__(self, kind):
        self.kind, self.script, self.counts, self.requests = kind, defaultdict(list), Counter(), []
        self.lock, self.on_request, self.every = threading.Lock(), None, None
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
            m = re.fullmatch(r"/(v1|v1beta)/models/([\w.\-]+):generateContent", h.path)
            version, model = (m.group(1), m.group(2)) if m else (None, None)
            text = body["contents"][0]["parts"][0]["text"]
        else:
            m = h.path == "/v1/chat/completions"
            model = body.get("model")
            text = body["messages"][-1]["content"]
        with self.lock:
            self.counts[text] += 1
            self.requests.append((h.path, dict(h.headers), body))
            step = self.every or (self.script[text].pop(0) if self.script[text] else rule(text))
        if self.on_request:
            self.on_request(self)
        if not m:
            return self.send(h, 404, {"error": {"code": 404, "message": f"no route {h.path}"}})
        try:
            if self.kind == "gemini":
                forced = self.check_gemini(model, body, version)
            else:
                forced = self.check_openai(model, body)
            if step[0] == "sleep":
                time.sleep(step[1])
                step = rule(text)
            if forced is not None and step[0] == "text":
                step = ("call", forced, {})
            reply = (self.gemini if self.kind == "gemini" else self.openai)(step, model)
        except Refuse as r:
            return self.send(h, r.code, r.body, r.headers)
        self.send(h, 200, reply)

    def send(self, h, code, obj, headers=None):
        data = json.dumps(obj).encode()
        try:
            h.send_response(code)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and left

    # -------------------------------------------------------------------------
    # what each service refuses before the model runs; -> the tool a forced
    # tool choice allows first, or None

    @staticmethod
    def check_gemini(model, body, version="v1beta"):
        if model not in GEMINI_MODELS or (version != "v1beta" and model in GEMINI_BETA_ONLY):
            raise gemini_error(404, f"models/{model} is not found for API version {version}, or is not "
                               "supported for generateContent. Call ListModels to see the list of "
                               "available models and their supported methods.", "NOT_FOUND")
        fields = GEMINI_VERSION_FIELDS[version]
        unknown = [k for k in body if fields is not None and k not in fields]
        if unknown:   # Google's JSON-to-proto parser: one line and one violation per field
            lines = [f'Invalid JSON payload received. Unknown name "{k}": Cannot find field.' for k in unknown]
            raise gemini_error(400, "\n".join(lines), "INVALID_ARGUMENT", [
                {"@type": "type.googleapis.com/google.rpc.BadRequest",
                 "fieldViolations": [{"description": line} for line in lines]}])
        decls = [d for t in body.get("tools", []) for d in t.get("functionDeclarations", [])]
        for i, d in enumerate(decls):
            if not GEMINI_NAME.match(d.get("name", "")):
                raise gemini_error(400, f"* GenerateContentRequest.tools[0].function_declarations[{i}].name: "
                                   "Invalid function name. Must start with a letter or an underscore. Must be "
                                   "alphameric (a-z, A-Z, 0-9), underscores (_), dots (.), colons (:), or "
                                   "dashes (-), with a maximum length of 128.", "INVALID_ARGUMENT")
            ref = dangling_ref(d.get("parametersJsonSchema", {}))
            if ref:
                raise gemini_error(400, f"* GenerateContentRequest.tools[0].function_declarations[{i}]"
                                   f".parameters_json_schema: $ref {ref} could not be resolved", "INVALID_ARGUMENT")
        fcc = body.get("toolConfig", {}).get("functionCallingConfig", {})
        mode, allowed = fcc.get("mode", "AUTO"), fcc.get("allowedFunctionNames")
        if allowed is not None:
            if mode != "ANY":
                raise gemini_error(400, "* GenerateContentRequest.tool_config.function_calling_config."
                                   "allowed_function_names: only allowed when mode is ANY.", "INVALID_ARGUMENT")
            unknown = set(allowed) - {d["name"] for d in decls}
            if unknown:
                raise gemini_error(400, f"allowed_function_names contains {sorted(unknown)[0]}, which is not "
                                   "a declared function.", "INVALID_ARGUMENT")
        if mode == "ANY":
            return (allowed or [d["name"] for d in decls])[0]
        return None

    @staticmethod
    def check_openai(model, body):
        if model not in OPENAI_MODELS:
            raise openai_error(404, f"The model `{model}` does not exist or you do not have access to it.",
                               err_code="model_not_found")
        tools = body.get("tools") or []
        for i, t in enumerate(tools):
            fn = t.get("function", {})
            if not OPENAI_NAME.match(fn.get("name", "")):
                raise openai_error(400, f"Invalid 'tools[{i}].function.name': string does not match pattern. "
                                   "Expected a string that matches the pattern '^[a-zA-Z0-9_-]+$'.",
                                   param=f"tools[{i}].function.name", err_code="invalid_value")
            ref = dangling_ref(fn.get("parameters", {}))
            if ref:
                raise openai_error(400, f"Invalid schema for function '{fn['name']}': reference {ref} "
                                   "can't be resolved.", param=f"tools[{i}].function.parameters",
                                   err_code="invalid_function_parameters")
        _, default_effort, takes_none = OPENAI_MODELS[model]
        effort = body.get("reasoning_effort", default_effort)
        if default_effort is None and "reasoning_effort" in body:
            raise openai_error(400, "Unsupported parameter: 'reasoning_effort' is not supported with this model.",
                               param="reasoning_effort", err_code="unsupported_parameter")
        if effort == "none" and not takes_none:
            raise openai_error(400, "Unsupported value: 'reasoning_effort' does not support 'none' with this "
                               "model.", param="reasoning_effort", err_code="unsupported_value")
        if default_effort is not None and tools and effort != "none":
            raise openai_error(400, f"Function tools with reasoning_effort are not supported for {model} in "
                               "/v1/chat/completions. To use function tools, use /v1/responses or set "
                               "reasoning_effort to 'none'.", param="reasoning_effort")
        temp = body.get("temperature")
        if default_effort is not None and temp is not None and temp != 1 and effort != "none":
            raise openai_error(400, f"Unsupported value: 'temperature' does not support {temp} with this model. "
                               "Only the default (1) value is supported.", param="temperature",
                               err_code="unsupported_value")
        choice = body.get("tool_choice", "auto")
        names = [t["function"]["name"] for t in tools]
        if isinstance(choice, dict):
            name = choice.get("function", {}).get("name")
            if name not in names:
                raise openai_error(400, f"Invalid value for 'tool_choice': function '{name}' is not among the "
                                   "tools.", param="tool_choice", err_code="invalid_value")
            return name
        if choice not in ("auto", "none", "required"):
            raise openai_error(400, f"Invalid value: '{choice}'.", param="tool_choice", err_code="invalid_value")
        return names[0] if choice == "required" and names else None

    # -------------------------------------------------------------------------
    # answers

    @staticmethod
    def gemini(step, model):
        version = GEMINI_MODELS[model]
        usage = {"promptTokenCount": 50, "candidatesTokenCount": 5, "totalTokenCount": 55}
        if step[0] == "rate_limit":
            raise gemini_error(429, f"Resource has been exhausted. Please retry in {step[1]}s.", "RESOURCE_EXHAUSTED", [
                {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [
                    {"quotaMetric": "generativelanguage.googleapis.com/generate_content_paid_tier_requests",
                     "quotaId": "GenerateRequestsPerMinutePerProjectPerModel", "quotaValue": "1000"}]},
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{step[1]}s"}])
        if step[0] == "quota":
            raise gemini_error(429, "You exceeded your current quota, please check your plan and billing "
                               "details.\n* Quota exceeded for metric: generativelanguage.googleapis.com/"
                               f"generate_content_free_tier_requests, limit: 250, model: {version}\n"
                               "Please retry in 7.5s.", "RESOURCE_EXHAUSTED", [
                {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [
                    {"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                     "quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier", "quotaValue": "250"}]},
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}])
        if step[0] == "status":
            raise gemini_error(step[1], f"fake {step[1]}", "RESOURCE_EXHAUSTED" if step[1] == 429 else "ERROR")
        if step[0] == "blocked":
            return {"promptFeedback": {"blockReason": step[1], "safetyRatings": [
                        {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}]},
                    "usageMetadata": {"promptTokenCount": 50, "totalTokenCount": 50},
                    "modelVersion": version, "responseId": "fake-1"}
        finish, extra = "STOP", {}
        if step[0] == "finish":
            finish = step[1]
            if finish == "MALFORMED_FUNCTION_CALL":
                extra["finishMessage"] = "Malformed function call: print(default_api.get_weather(city="
            parts = [{"text": "The weather in"}] if finish == "MAX_TOKENS" else None
        elif step[0] == "call":
            parts = [{"functionCall": {"name": step[1], "args": step[2]}}]
        elif step[0] == "calls":
            parts = [{"functionCall": {"name": n, "args": a}} for n, a in step[1]]
        else:
            parts = [{"text": step[1]}]
        candidate = {"finishReason": finish, "index": 0, **extra}
        if parts:
            candidate["content"] = {"role": "model", "parts": parts}
        return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": version, "responseId": "fake-1"}

    @staticmethod
    def openai(step, model):
        if step[0] == "rate_limit":
            raise openai_error(429, f"Rate limit reached for {model} on requests per min (RPM): Limit 500, "
                               f"Used 500, Requested 1. Please try again in {step[1]}s.", type_="requests",
                               err_code="rate_limit_exceeded",
                               headers={"retry-after": str(int(step[1])), "retry-after-ms": str(int(step[1] * 1000)),
                                        "x-ratelimit-remaining-requests": "0"})
        if step[0] == "quota":
            raise openai_error(429, "You exceeded your current quota, please check your plan and billing "
                               "details. For more information on this error, read the docs: "
                               "https://platform.openai.com/docs/guides/error-codes/api-errors.",
                               type_="insufficient_quota", err_code="insufficient_quota")
        if step[0] == "status":
            raise openai_error(step[1], f"fake {step[1]}", type_="server_error" if step[1] >= 500 else "error")
        if step[0] == "blocked":
            raise openai_error(400, "Invalid prompt: your prompt was flagged as potentially violating our "
                               "usage policy.", err_code="invalid_prompt")
        message, finish = {"role": "assistant", "content": None, "refusal": None}, "stop"
        if step[0] in ("call", "calls", "raw_args", "obj_args"):
            calls = [(step[1], step[2])] if step[0] == "call" else step[1] if step[0] == "calls" \
                else [("get_weather", step[1])]
            message["tool_calls"] = [
                {"id": f"call_{i}", "type": "function",
                 "function": {"name": n, "arguments": a if isinstance(a, str) or step[0] == "obj_args"
                              else json.dumps(a)}}
                for i, (n, a) in enumerate(calls)]
            finish = "tool_calls"
        elif step[0] == "finish":
            finish = step[1]
            message["content"] = "The weather in" if finish == "length" else None
        elif step[0] == "refusal":
            message["refusal"] = step[1]
        else:
            message["content"] = step[1]
        return {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                "model": OPENAI_MODELS[model][0], "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": {"prompt_tokens": 50, "completion_tokens": 5, "total_tokens": 55}}
