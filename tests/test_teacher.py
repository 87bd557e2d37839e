"""teacher.py against local fake Gemini / OpenAI servers (tests/fake_servers.py),
through the real SDKs: no network, tiny backoff (or a recorded one: nothing sleeps
for the seconds a server asks for), whole file in a few seconds."""

import json
import re
import signal
import threading
import time

import pytest

import teacher
import wire
import fake_servers
from fake_servers import Fake

WEATHER = {"name": "get_weather", "description": "Current weather for a city.",
           "parameters": {"type": "object",
                          "properties": {"city": {"type": "string"},
                                         "days": {"type": "integer"},
                                         "units": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                                         "alerts": {"type": "boolean"}},
                          "required": ["city"]}}
TOOLS = [WEATHER]
FAST = dict(concurrency=4, rps=1000.0, max_retries=3, backoff=0.01, max_delay=0.05, progress=False)


@pytest.fixture(params=["gemini", "openai"])
def fake(request):
    f = Fake(request.param)
    f.teacher = teacher.make_teacher(request.param, base_url=f.url, api_key="test-key", timeout=2.0)
    yield f
    f.close()


def run(fake, requests, tmp_path, **kw):
    items = [{"tools": TOOLS, "request": r} for r in requests]
    return teacher.label(items, fake.teacher, str(tmp_path / "cache.jsonl"), **{**FAST, **kw})


def cache_lines(tmp_path):
    with open(tmp_path / "cache.jsonl", encoding="utf-8") as f:
        return f.read().splitlines()


# -----------------------------------------------------------------------------
# one request through each SDK

def test_ask_speaks_the_real_protocol(fake):
    answer = fake.teacher.ask(TOOLS, "What's the weather in Paris?")
    assert answer["calls"] == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    path, headers, body = fake.requests[0]
    if fake.kind == "gemini":
        assert path == "/v1beta/models/gemini-3.5-flash-lite:generateContent"   # the version it was written for
        assert headers["x-goog-api-key"] == "test-key"
        assert body["toolConfig"]["functionCallingConfig"] == {"mode": "AUTO"}
        assert "temperature" not in body.get("generationConfig", {})   # only when asked for
        assert body["tools"][0]["functionDeclarations"][0]["name"] == "get_weather"
        assert "chit-chat" in body["systemInstruction"]["parts"][0]["text"]
        assert fake.teacher.id == "gemini:gemini-3.5-flash-lite"
    else:
        assert path == "/v1/chat/completions"
        assert headers["authorization"] == "Bearer test-key"
        assert body["tool_choice"] == "auto" and "temperature" not in body
        assert body["reasoning_effort"] == "none"     # gpt-6-luna takes function tools only so
        assert body["tools"] == [{"type": "function", "function": WEATHER}]
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
        assert fake.teacher.id == "openai:gpt-6-luna"


def test_ask_classifies_http_errors(fake):
    for code, err in [(429, teacher.RetryableError), (503, teacher.RetryableError),
                      (400, teacher.PermanentError), (404, teacher.StopRun)]:
        fake.script["x"].append(("status", code))
        with pytest.raises(err, match=str(code)):
            fake.teacher.ask(TOOLS, "x")
    assert fake.counts["x"] == 4  # the SDKs' own retries are off


# -----------------------------------------------------------------------------
# label(): calls, reasons, rejections, retries

def test_label_call_and_reasons(fake, tmp_path, capsys):
    fake.script["hi there"].append(("text", "Chit-chat."))
    fake.script["what's the forecast?"].append(("text", "Missing argument: City"))
    fake.script["weather please for zip 12345"].append(("text", "missing argument: zip"))
    fake.script["book me a taxi"].append(("text", "Sure, I can help with that!"))
    fake.script["is water wet?"].append(("text", '"Information request."'))
    fake.script["Oslo and Rome weather"].append(
        ("calls", [("get_weather", {"city": "Oslo"}), ("get_weather", {"city": "Rome", "days": 2})]))
    reqs = ["What's the weather in Paris?", "hi there", "what's the forecast?",
            "weather please for zip 12345", "book me a taxi", "is water wet?", "Oslo and Rome weather"]
    results, stats = run(fake, reqs, tmp_path)
    reported = {"gemini": "gemini-3.5-flash-lite", "openai": "gpt-6-luna-2026-09-22"}[fake.kind]
    assert [r and r.pop("model") for r in results] == [reported] * 3 + [None, None] + [reported] * 2
    assert results[0] == {"calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}], "reason": None}
    assert results[1] == {"calls": [], "reason": "chit-chat"}
    assert results[2] == {"calls": [], "reason": "missing argument: city"}
    assert results[3] is None  # "zip" is not a parameter of any tool
    assert results[4] is None  # free text is not a reason
    assert results[5] == {"calls": [], "reason": "information request"}
    assert [c["arguments"] for c in results[6]["calls"]] == [{"city": "Oslo"}, {"city": "Rome", "days": 2}]
    assert stats["ok"] == 5 and stats["no_reason"] == 2 and stats["sent"] == 7
    out = capsys.readouterr().out
    assert "teacher: 7 items, 0 cached, 7 sent (0 retries); accepted 5" in out and "no_reason 2" in out


def test_rate_limit_then_success_is_retried_and_counted(fake, tmp_path):
    fake.script["What's the weather in Oslo?"] += [("status", 429), ("status", 500)]
    results, stats = run(fake, ["What's the weather in Oslo?"], tmp_path)
    assert results[0]["calls"][0]["arguments"] == {"city": "Oslo"}
    assert fake.counts["What's the weather in Oslo?"] == 3
    assert (stats["sent"], stats["retries"], stats["ok"], stats["failed"]) == (3, 2, 1, 0)


def test_malformed_and_invalid_answers_are_rejected_and_counted(fake, tmp_path):
    reqs = ["weather in Rome?", "weather in Lima?", "weather in Kyiv?", "weather in Baku?"]
    fake.script[reqs[0]].append(("call", "get_wether", {"city": "Rome"}))
    fake.script[reqs[1]].append(("call", "get_weather", {"city": "Lima", "days": "three"}))
    fake.script[reqs[2]].append(("call", "get_weather", {"city": "Berlin"}))
    if fake.kind == "openai":
        fake.script[reqs[3]].append(("raw_args", '{"city": "Baku"'))  # cut-off JSON
    else:
        fake.script[reqs[3]].append(("call", "get_weather", {"town": "Baku"}))
    results, stats = run(fake, reqs, tmp_path)
    assert results == [None] * 4
    assert stats["unknown_tool"] == 1 and stats["ungrounded"] == 1
    if fake.kind == "openai":
        assert stats["schema_invalid"] == 1 and stats["malformed"] == 1
    else:
        assert stats["schema_invalid"] == 2
    # raw answers are cached all the same: cleaning rules may change later
    assert len(cache_lines(tmp_path)) == 4


def test_timeout_is_retried_then_fails_without_caching(fake, tmp_path):
    fake.teacher = teacher.make_teacher(fake.kind, base_url=fake.url, api_key="k", timeout=0.3)
    fake.script["weather in Quito?"].append(("sleep", 0.6))
    fake.script["weather in Accra?"] += [("sleep", 0.6)] * 2
    results, stats = run(fake, ["weather in Quito?", "weather in Accra?"], tmp_path, max_retries=1)
    assert results[0]["calls"][0]["arguments"] == {"city": "Quito"}
    assert results[1] is None
    assert (stats["ok"], stats["failed"], stats["sent"], stats["retries"]) == (1, 1, 4, 2)
    # the failure was not cached: a later run asks again, and only for it
    results, stats = run(fake, ["weather in Quito?", "weather in Accra?"], tmp_path)
    assert results[1]["calls"][0]["arguments"] == {"city": "Accra"}
    assert (stats["cached"], stats["sent"], fake.counts["weather in Accra?"]) == (1, 1, 3)


def test_permanent_error_is_not_retried_nor_cached(fake, tmp_path, capsys):
    fake.script["weather in Doha?"].append(("status", 400))
    results, stats = run(fake, ["weather in Doha?"], tmp_path)
    assert results == [None] and (stats["failed"], stats["sent"], stats["retries"]) == (1, 1, 0)
    assert "first failure" in capsys.readouterr().out and cache_lines(tmp_path) == []


# -----------------------------------------------------------------------------
# the cache: resume, dedupe, truncation

CITIES = ["Paris", "Oslo", "Rome", "Lima", "Kyiv", "Baku", "Quito", "Accra", "Doha", "Hanoi",
          "Cairo", "Dakar"]


def test_interrupted_run_resumes_and_pays_once(fake, tmp_path):
    reqs = [f"weather in {c}?" for c in CITIES]
    main = threading.main_thread().ident

    def ctrl_c_after_four(f):
        if len(f.requests) == 4:
            signal.pthread_kill(main, signal.SIGINT)  # a real Ctrl-C to the main thread

    fake.on_request = ctrl_c_after_four
    # a process started in the background (nohup, some CI runners) ignores SIGINT;
    # Ctrl-C must raise here whatever the parent did
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run(fake, reqs, tmp_path, concurrency=2, rps=50.0)
    finally:
        signal.signal(signal.SIGINT, old)
    fake.on_request = None
    answered = len(cache_lines(tmp_path))
    assert 4 <= answered < len(reqs)  # everything the server answered is on disk
    results, stats = run(fake, reqs, tmp_path)
    assert all(r is not None for r in results)
    assert (stats["cached"], stats["sent"]) == (answered, len(reqs) - answered)
    assert set(fake.counts) == set(reqs) and all(n == 1 for n in fake.counts.values())


def test_half_then_all_sends_each_request_once(fake, tmp_path):
    reqs = [f"weather in {c}?" for c in CITIES]
    _, s1 = run(fake, reqs[:6], tmp_path)
    _, s2 = run(fake, reqs, tmp_path)
    assert (s1["sent"], s2["cached"], s2["sent"], s2["ok"]) == (6, 6, 6, 12)
    assert all(fake.counts[r] == 1 for r in reqs)


def test_identical_items_are_sent_once(fake, tmp_path):
    results, stats = run(fake, ["weather in Oslo?"] * 5 + ["hello"], tmp_path, progress=True)
    assert fake.counts["weather in Oslo?"] == 1 and stats["sent"] == 2 and stats["ok"] == 6
    assert results[0] == results[4]


def test_cache_tolerates_a_truncated_last_line(fake, tmp_path):
    run(fake, ["weather in Oslo?"], tmp_path)
    run(fake, ["weather in Rome?"], tmp_path)
    path = tmp_path / "cache.jsonl"
    text = path.read_text()
    path.write_text(text[: len(text) - 15])  # killed mid-write: second line cut
    _, stats = run(fake, ["weather in Oslo?", "weather in Rome?"], tmp_path)
    assert (stats["cached"], stats["sent"], stats["ok"]) == (1, 1, 2)
    _, stats = run(fake, ["weather in Oslo?", "weather in Rome?"], tmp_path)
    assert (stats["cached"], stats["sent"]) == (2, 0)  # the re-asked answer landed on a clean line
    assert fake.counts["weather in Rome?"] == 2


def test_cache_key_depends_on_teacher_request_and_tools():
    k = teacher.cache_key("gemini:m", "hi", TOOLS)
    assert k == teacher.cache_key("gemini:m", "hi", json.loads(json.dumps(TOOLS)))
    assert len({k, teacher.cache_key("openai:m", "hi", TOOLS), teacher.cache_key("gemini:m", "hi!", TOOLS),
                teacher.cache_key("gemini:m", "hi", [])}) == 4


# -----------------------------------------------------------------------------
# cleaning rules

TOOLS_N = wire.normalize_tools(TOOLS)


def clean(args, request, name="get_weather"):
    return teacher.clean_answer({"calls": [{"name": name, "arguments": args}], "text": None}, TOOLS_N, request)


def test_clean_rejects_ungrounded_values():
    assert clean({"city": "Paris"}, "weather in paris") == (
        {"calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}], "reason": None}, None)
    assert clean({"city": "Paris, France"}, "weather in Paris") == (None, "ungrounded")


def test_clean_enum_values_need_not_be_in_the_text():
    result, problem = clean({"city": "Oslo", "units": "celsius"}, "Oslo weather in degrees C")
    assert problem is None and result["calls"][0]["arguments"]["units"] == "celsius"
    assert clean({"city": "Oslo", "units": "kelvin"}, "Oslo weather in kelvin") == (None, "schema_invalid")


def test_clean_coerces_type_slips_and_drops_nulls():
    result, problem = clean({"city": "Oslo", "days": "3", "alerts": "True", "units": None},
                            "Oslo weather for 3 days with alerts")
    assert problem is None
    assert result["calls"][0]["arguments"] == {"city": "Oslo", "days": 3, "alerts": True}
    assert clean({"city": "Oslo", "days": 3.0}, "Oslo, 3 days")[0]["calls"][0]["arguments"]["days"] == 3
    assert clean({"city": "Oslo", "days": "3.5"}, "Oslo 3.5 days") == (None, "schema_invalid")


def test_clean_malformed_answers():
    assert clean("not a dict", "x") == (None, "malformed")
    assert teacher.clean_answer({"calls": "nope"}, TOOLS_N, "x") == (None, "malformed")
    assert teacher.clean_answer({"calls": [{"name": None, "arguments": None}]}, TOOLS_N, "x") == (None, "malformed")
    assert teacher.clean_answer({"calls": [], "text": None}, TOOLS_N, "x") == (None, "no_reason")


# -----------------------------------------------------------------------------
# configuration and the rate limiter

@pytest.mark.parametrize("kind, var", [("gemini", "GEMINI_API_KEY"), ("openai", "OPENAI_API_KEY")])
def test_missing_api_key_names_the_variable(kind, var, monkeypatch):
    for v in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(teacher.TeacherError, match=var):
        teacher.make_teacher(kind)
    monkeypatch.setenv(var, "from-env")
    assert teacher.make_teacher(kind).id.startswith(kind + ":")


def test_unknown_teacher_kind_and_env_base_url(monkeypatch):
    with pytest.raises(teacher.TeacherError, match="claude"):
        teacher.make_teacher("claude", api_key="k")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    t = teacher.make_teacher("openai", api_key="k", model="m")
    assert str(t.client.base_url).startswith("http://127.0.0.1:9/v1") and t.id == "openai:m"


def test_rate_limiter_spaces_request_starts():
    limiter = teacher.RateLimiter(50.0)
    t0 = time.monotonic()
    threads = [threading.Thread(target=limiter.wait) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - t0 >= 5 / 50.0 * 0.9


# -----------------------------------------------------------------------------
# the services as they are: current models, unfinished answers, the servers' wait
# hints, quotas, settings, schemas, tool names, tool_choice (issue 18)

def test_default_models_are_current():
    """Neither default may be past or near an announced shutdown, and both must be
    names the services know (the fakes hold the providers' lists)."""
    known = {"gemini": fake_servers.GEMINI_MODELS, "openai": fake_servers.OPENAI_MODELS}
    for kind, (_, default, _) in teacher.TEACHERS.items():
        assert default in known[kind], default
        assert default not in fake_servers.SHUTDOWN, f"{default} shuts down {fake_servers.SHUTDOWN[default]}"
        assert teacher.make_teacher(kind, api_key="k").id == f"{kind}:{default}"


def test_the_model_that_answered_is_stored_with_the_answer(fake, tmp_path, capsys):
    # Google routes the shut-down gemini-2.5-flash to gemini-3.5-flash-lite; OpenAI
    # answers an alias with a dated snapshot
    model = {"gemini": "gemini-2.5-flash", "openai": "gpt-6-luna"}[fake.kind]
    reported = {"gemini": "gemini-3.5-flash-lite", "openai": "gpt-6-luna-2026-09-22"}[fake.kind]
    fake.teacher = teacher.make_teacher(fake.kind, model=model, base_url=fake.url, api_key="k")
    results, _ = run(fake, ["weather in Oslo?", "hello"], tmp_path)
    assert [r["model"] for r in results] == [reported, reported]
    assert all(json.loads(line)["answer"]["model"] == reported for line in cache_lines(tmp_path))
    assert f"answered by {reported} 2" in capsys.readouterr().out
    results, stats = run(fake, ["weather in Oslo?"], tmp_path)       # and from the cache
    assert stats["sent"] == 0 and results[0]["model"] == reported


UNFINISHED = {
    "gemini": {"weather in Oslo?": ("blocked", "SAFETY"), "weather in Rome?": ("finish", "MAX_TOKENS"),
               "weather in Lima?": ("finish", "MALFORMED_FUNCTION_CALL"), "weather in Kyiv?": ("finish", "SAFETY")},
    "openai": {"weather in Oslo?": ("refusal", "I can't help with that."), "weather in Rome?": ("finish", "length"),
               "weather in Lima?": ("finish", "content_filter")},
}
KINDS = {"gemini": {"blocked:SAFETY": 1, "finish:MAX_TOKENS": 1, "finish:MALFORMED_FUNCTION_CALL": 1,
                    "finish:SAFETY": 1},
         "openai": {"refusal": 1, "finish:length": 1, "finish:content_filter": 1}}


def test_blocks_truncations_and_refusals_are_counted_and_asked_again(fake, tmp_path, capsys):
    script = UNFINISHED[fake.kind]
    for text, step in script.items():
        fake.script[text].append(step)
    reqs = list(script) + ["weather in Baku?"]
    results, stats = run(fake, reqs, tmp_path)
    assert results[:-1] == [None] * len(script) and results[-1]["calls"][0]["arguments"] == {"city": "Baku"}
    assert stats["not_final"] == KINDS[fake.kind] and stats["ok"] == 1 and stats["no_reason"] == 0
    assert len(cache_lines(tmp_path)) == len(reqs)       # paid for, so kept, but not as final
    out = capsys.readouterr().out
    assert f"not final {len(script)} (" in out and "asked again on the next run" in out
    for kind in KINDS[fake.kind]:
        assert f"{kind} 1" in out
    results, stats = run(fake, reqs, tmp_path)           # a re-run asks those again, and only those
    assert all(r is not None for r in results) and stats["not_final"] == {}
    assert (stats["cached"], stats["sent"]) == (1, len(script))
    assert [fake.counts[r] for r in reqs] == [2] * len(script) + [1]


def test_an_answer_that_never_finishes_is_given_up_after_the_limit(fake, tmp_path, capsys):
    step = {"gemini": ("finish", "SAFETY"), "openai": ("finish", "content_filter")}[fake.kind]
    fake.script["weather in Oslo?"] += [step] * 5
    for _ in range(3):
        results, stats = run(fake, ["weather in Oslo?"], tmp_path, max_unfinished=2)
    assert results == [None] and fake.counts["weather in Oslo?"] == 2
    assert stats["sent"] == 0 and stats["given_up"] == 1 and "given up 1" in capsys.readouterr().out


def test_retries_wait_as_long_as_the_server_asks(fake, tmp_path):
    fake.script["weather in Oslo?"] += [("rate_limit", 7)]
    waits = []
    results, stats = run(fake, ["weather in Oslo?"], tmp_path, max_delay=60.0, pause=waits.append)
    assert results[0]["calls"][0]["arguments"] == {"city": "Oslo"} and stats["retries"] == 1
    assert len(waits) == 1 and 7 <= waits[0] <= 7 * 1.25   # Retry-After / RetryInfo, plus jitter


def test_retry_delay_is_exponential_with_jitter_and_capped():
    delays = [teacher.retry_delay(a, None, 2.0, 60.0) for a in range(8) for _ in range(20)]
    for a in range(5):       # 2, 4, 8, 16, 32 s, each stretched by up to a quarter
        assert all(2.0 * 2 ** a <= d <= 2.5 * 2 ** a for d in delays[20 * a:20 * a + 20])
    assert len(set(delays[:20])) > 1                      # jittered: workers do not retry in lockstep
    assert max(delays) == 60.0 and delays[-20:] == [60.0] * 20
    assert teacher.retry_delay(0, 30.0, 2.0, 60.0) >= 30.0 and teacher.retry_delay(0, 600.0, 2.0, 60.0) == 60.0


def test_exhausted_quota_stops_the_run_keeps_what_was_paid_and_a_rerun_continues(fake, tmp_path):
    reqs = [f"weather in {c}?" for c in CITIES[:6]]
    fake.script[reqs[2]].append(("quota",))
    with pytest.raises(teacher.StopRun) as e:
        run(fake, reqs, tmp_path, concurrency=1)
    msg = str(e.value)
    assert "quota exhausted" in msg and "\n" not in msg and "2 of 6 answers" in msg and "again once the quota is back" in msg
    assert fake.counts[reqs[2]] == 1                       # not retried: it will not get better today
    assert not any(fake.counts[r] for r in reqs[3:])       # and nothing more is sent
    assert len(cache_lines(tmp_path)) == 2
    results, stats = run(fake, reqs, tmp_path)             # the quota is back
    assert all(r is not None for r in results) and (stats["cached"], stats["sent"]) == (2, 4)


def test_unknown_model_stops_the_run_at_the_first_request(fake, tmp_path):
    fake.teacher = teacher.make_teacher(fake.kind, model="no-such-model", base_url=fake.url, api_key="k")
    with pytest.raises(teacher.StopRun, match="no-such-model"):
        run(fake, [f"weather in {c}?" for c in CITIES[:4]], tmp_path, concurrency=1)
    assert sum(fake.counts.values()) == 1


def test_sampling_parameters_are_sent_only_when_set(fake):
    fake.teacher.ask(TOOLS, "weather in Oslo?")
    t = teacher.make_teacher(fake.kind, base_url=fake.url, api_key="k", temperature=0.2)
    t.ask(TOOLS, "weather in Oslo?")
    bodies = [b for _, _, b in fake.requests]
    if fake.kind == "gemini":
        assert [b.get("generationConfig", {}).get("temperature") for b in bodies] == [None, 0.2]
    else:
        assert "temperature" not in bodies[0] and bodies[1]["temperature"] == 0.2


def test_openai_reasoning_effort_follows_the_model(tmp_path):
    """OpenAI's reasoning models take function tools on Chat Completions only with
    reasoning_effort "none"; its older models refuse the parameter itself."""
    f = Fake("openai")
    try:
        for model, sent in [("gpt-6-luna", "none"), ("gpt-5.4-mini", "none"), ("gpt-4o-mini", None)]:
            t = teacher.make_teacher("openai", model=model, base_url=f.url, api_key="k")
            assert t.ask(TOOLS, "weather in Oslo?")["calls"]
            assert f.requests[-1][2].get("reasoning_effort") == sent
        t = teacher.make_teacher("openai", model="gpt-6-luna", base_url=f.url, api_key="k", reasoning_effort="low")
        with pytest.raises(teacher.StopRun, match=r"reasoning_effort.*set reasoning_effort to 'none'"):
            teacher.label([{"tools": TOOLS, "request": "weather in Oslo?"}] * 1, t, str(tmp_path / "c.jsonl"), **FAST)
    finally:
        f.close()


ROUTE = {"name": "plan_route", "description": "Plan a route through some cities.",
         "parameters": {"type": "object", "$defs": {"Stop": {"type": "string", "description": "A city."}},
                        "properties": {"stops": {"type": "array", "items": {"$ref": "#/$defs/Stop"}}},
                        "required": ["stops"]}}


def test_a_tool_with_refs_is_labelled(fake, tmp_path):
    fake.script["route via Oslo and Rome"].append(("call", "plan_route", {"stops": ["Oslo", "Rome"]}))
    results, stats = teacher.label([{"tools": [ROUTE], "request": "route via Oslo and Rome"}], fake.teacher,
                                   str(tmp_path / "cache.jsonl"), **FAST)
    assert results[0]["calls"] == [{"name": "plan_route", "arguments": {"stops": ["Oslo", "Rome"]}}]
    assert "$ref" not in json.dumps(fake.requests[0][2])   # sent resolved, so any service reads it


def test_tool_names_the_provider_refuses_are_mapped_or_refused_before_the_first_request(fake, tmp_path):
    """wire.py (and invent.py's dotted style) allow "api.x"; OpenAI answers 400 to a dot
    on every item, so its teacher sends "api_x" and maps the calls back; a name that
    cannot be mapped is one error before anything is sent."""
    dotted = dict(WEATHER, name="weather.get")
    sent_as = {"gemini": "weather.get", "openai": "weather_get"}[fake.kind]
    fake.script["weather in Oslo?"].append(("call", sent_as, {"city": "Oslo"}))
    results, _ = teacher.label([{"tools": [dotted], "request": "weather in Oslo?"}], fake.teacher,
                               str(tmp_path / "cache.jsonl"), **FAST)
    assert results[0]["calls"] == [{"name": "weather.get", "arguments": {"city": "Oslo"}}]
    body = fake.requests[0][2]
    assert (body["tools"][0]["functionDeclarations"][0]["name"] if fake.kind == "gemini"
            else body["tools"][0]["function"]["name"]) == sent_as
    if fake.kind == "openai":
        clash = [dotted, dict(WEATHER, name="weather_get")]
        with pytest.raises(teacher.TeacherError, match=r"'weather\.get' and 'weather_get' are both sent .* as 'weather_get'"):
            teacher.label([{"tools": clash, "request": "hello"}], fake.teacher, str(tmp_path / "c2.jsonl"), **FAST)
        assert sum(fake.counts.values()) == 1


def test_openai_compatible_arguments_as_an_object_are_read(tmp_path):
    f = Fake("openai")
    f.teacher = teacher.make_teacher("openai", base_url=f.url, api_key="k")
    try:
        f.script["weather in Oslo?"].append(("obj_args", {"city": "Oslo", "days": 2}))
        results, stats = run(f, ["weather in Oslo?"], tmp_path)
        assert results[0]["calls"] == [{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}]
    finally:
        f.close()


def test_serve_fallback_asks_with_the_clients_tool_choice(fake):
    import serve
    time_tool = {"name": "get_time", "description": "Local time in a city.",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    tools = wire.normalize_tools([WEATHER, time_tool])
    fake.script["time in Oslo?"] += [("call", "get_time", {"city": "Oslo"})] * 2
    for choice in ("get_time", "required"):
        answer, why = serve.ask_teacher(fake.teacher, tools, "time in Oslo?", choice)
        assert why is None and answer["calls"] == [{"name": "get_time", "arguments": {"city": "Oslo"}}]
    named, required = fake.requests[0][2], fake.requests[1][2]
    if fake.kind == "gemini":
        assert named["toolConfig"]["functionCallingConfig"] == {"mode": "ANY", "allowedFunctionNames": ["get_time"]}
        assert required["toolConfig"]["functionCallingConfig"] == {
            "mode": "ANY", "allowedFunctionNames": ["get_weather", "get_time"]}
    else:
        assert named["tool_choice"] == {"type": "function", "function": {"name": "get_time"}}
        assert required["tool_choice"] == "required"
    fake.script["hello"].append(("blocked", "SAFETY"))  # a blocked or refused answer is not used
    answer, why = serve.ask_teacher(fake.teacher, tools, "hello", "auto")
    assert answer is None and ("blocked:SAFETY" in why if fake.kind == "gemini" else "invalid_prompt" in why)


# -----------------------------------------------------------------------------
# the SDK versions a fresh install gets (issue 24): google-genai 3 sends to the
# Gemini API's v1 unless told otherwise; requirements.txt bounds the SDKs

def post_json(url, body):
    """(HTTP status, parsed body) of a raw POST: the fake checked without any SDK."""
    import urllib.error
    import urllib.request
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_fake_gemini_answers_each_api_version_as_the_service_does():
    """v1beta takes tools, toolConfig and systemInstruction; v1 (as its published
    proto has it) refuses them by name and does not know the -latest aliases."""
    f = Fake("gemini")
    try:
        plain = {"contents": [{"role": "user", "parts": [{"text": "weather in Oslo?"}]}]}
        full = dict(plain, systemInstruction={"parts": [{"text": "be brief"}]},
                    tools=[{"functionDeclarations": [{"name": "get_weather", "description": "d",
                                                      "parametersJsonSchema": {"type": "object"}}]}],
                    toolConfig={"functionCallingConfig": {"mode": "AUTO"}})
        model = "gemini-3.5-flash-lite"
        assert post_json(f"{f.url}/v1beta/models/{model}:generateContent", full)[0] == 200
        assert post_json(f"{f.url}/v1/models/{model}:generateContent", plain)[0] == 200
        code, body = post_json(f"{f.url}/v1/models/{model}:generateContent", full)
        assert code == 400 and body["error"]["status"] == "INVALID_ARGUMENT"
        for name in ("systemInstruction", "tools", "toolConfig"):
            assert f'Unknown name "{name}": Cannot find field.' in body["error"]["message"]
        assert post_json(f"{f.url}/v1beta/models/gemini-flash-latest:generateContent", plain)[0] == 200
        code, body = post_json(f"{f.url}/v1/models/gemini-flash-latest:generateContent", plain)
        assert code == 404 and "API version v1," in body["error"]["message"]
    finally:
        f.close()


def test_gemini_requests_go_to_the_api_version_they_were_written_for(monkeypatch):
    """google-genai 3 defaults the Gemini Developer API to v1, where function
    declarations and toolConfig are not taken: the teacher pins v1beta, whatever the
    SDK's default or GOOGLE_GENAI_API_VERSION say."""
    monkeypatch.delenv("GOOGLE_GENAI_API_VERSION", raising=False)
    f = Fake("gemini")
    try:
        t = teacher.make_teacher("gemini", base_url=f.url, api_key="k")
        assert t.ask(TOOLS, "weather in Oslo?")["calls"] == [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
        monkeypatch.setenv("GOOGLE_GENAI_API_VERSION", "v1")
        teacher.make_teacher("gemini", base_url=f.url, api_key="k").ask(TOOLS, "weather in Rome?")
        assert [p for p, _, _ in f.requests] == ["/v1beta/models/gemini-3.5-flash-lite:generateContent"] * 2
    finally:
        f.close()


def test_gemini_api_version_flag_and_a_version_that_refuses_the_request_stops_the_run(tmp_path):
    f = Fake("gemini")
    try:
        t = teacher.make_teacher("gemini", base_url=f.url, api_key="k", api_version="v1")
        assert t.id == "gemini:gemini-3.5-flash-lite"      # same model, same cache keys
        with pytest.raises(teacher.StopRun) as e:
            teacher.label([{"tools": TOOLS, "request": f"weather in {c}?"} for c in CITIES[:4]], t,
                          str(tmp_path / "c.jsonl"), **{**FAST, "concurrency": 1})
        msg = str(e.value)
        assert 'Unknown name "tools"' in msg and "api_version v1" in msg and "v1beta" in msg
        assert [p for p, _, _ in f.requests] == ["/v1/models/gemini-3.5-flash-lite:generateContent"]
        with pytest.raises(teacher.TeacherError, match="api_version"):
            teacher.make_teacher("openai", api_key="k", api_version="v1")
        with pytest.raises(teacher.TeacherError, match="api_version"):
            teacher.make_teacher("gemini", api_key="k", api_version="v1beta?x=1")
    finally:
        f.close()


SDKS = {"google-genai": "google.genai", "openai": "openai"}


def test_installed_sdks_are_inside_the_requirement_bounds():
    """Each SDK is bounded to the major the code is tested with, the installed one
    is inside the bounds, and the teacher's code paths import and build a client."""
    import importlib.metadata
    import os
    from packaging.requirements import Requirement
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "requirements.txt")
    with open(path, encoding="utf-8") as fh:
        reqs = {r.name: r for r in (Requirement(line.split("#")[0].strip()) for line in fh
                                    if line.split("#")[0].strip())}
    for dist in SDKS:
        spec = reqs[dist].specifier
        assert any(s.operator == "<" for s in spec), f"{dist}: no upper bound in requirements.txt ({spec or 'none'})"
        installed = importlib.metadata.version(dist)
        assert spec.contains(installed), f"{dist} {installed} is installed, requirements.txt asks for {spec}"
    for kind in ("gemini", "openai"):
        t = teacher.make_teacher(kind, api_key="k", base_url="http://127.0.0.1:9")
        assert t.client is not None
    assert teacher._transport_errors()              # httpx2 (google-genai 3, openai 3) is found


@pytest.mark.parametrize("model", sorted(fake_servers.OPENAI_MODELS))
def test_openai_teacher_sends_an_effort_the_model_takes_with_function_tools(model):
    """Each model either gets a reasoning_effort it takes with function tools on
    Chat Completions (or none at all), or is refused before any request, with the
    reason, when Chat Completions takes no effort with tools for it."""
    f = Fake("openai")
    try:
        _, default, takes_none = fake_servers.OPENAI_MODELS[model]
        if default is not None and not takes_none:     # Chat Completions never takes its tools
            with pytest.raises(teacher.TeacherError, match=rf"{re.escape(model)}.*Responses API"):
                teacher.make_teacher("openai", model=model, base_url=f.url, api_key="k")
            assert f.requests == []
            return
        t = teacher.make_teacher("openai", model=model, base_url=f.url, api_key="k")
        assert t.ask(TOOLS, "weather in Oslo?")["calls"]
        assert f.requests[-1][2].get("reasoning_effort") == (None if default is None else "none")
    finally:
        f.close()


@pytest.mark.parametrize("model, effort", [
    ("gpt-4o-mini", None), ("gpt-4.1", None), ("o3", None), ("o4-mini", None),
    ("gpt-5", None), ("gpt-5-mini", None),             # before 5.1: no "none"; tools take any effort
    ("gpt-5.1", "none"), ("gpt-5.4-mini", "none"), ("gpt-5.6-luna", "none"), ("gpt-6-luna", "none"),
    ("gpt-6-sol", "none"), ("openai/gpt-6-luna", "none"), ("ft:gpt-4o-mini:org::abc", None),
    ("llama-3.3-70b", None),
])
def test_openai_reasoning_default_per_model(model, effort):
    assert teacher.openai_reasoning_default(model) == effort


@pytest.mark.parametrize("model", ["gpt-6.1-sol", "gpt-6.2-sol", "gpt-6-astra", "gpt-5-pro", "gpt-5.4-pro"])
def test_models_whose_tools_need_the_responses_api_are_refused_up_front(model):
    with pytest.raises(teacher.TeacherError, match="Responses API"):
        teacher.make_teacher("openai", model=model, api_key="k")
    # an explicit effort is the user's call (an OpenAI-compatible proxy may bridge it)
    assert teacher.make_teacher("openai", model=model, api_key="k", reasoning_effort="low").reasoning_effort == "low"
