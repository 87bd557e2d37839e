"""teacher.py against local fake Gemini / OpenAI servers (tests/fake_servers.py),
through the real SDKs: no network, tiny backoff, whole file in a few seconds."""

import json
import signal
import threading
import time

import pytest

import teacher
import wire
from fake_servers import Fake

WEATHER = {"name": "get_weather", "description": "Current weather for a city.",
           "parameters": {"type": "object",
                          "properties": {"city": {"type": "string"},
                                         "days": {"type": "integer"},
                                         "units": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                                         "alerts": {"type": "boolean"}},
                          "required": ["city"]}}
TOOLS = [WEATHER]
FAST = dict(concurrency=4, rps=1000.0, max_retries=3, backoff=0.01, progress=False)


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
        assert path.endswith("/models/gemini-2.5-flash:generateContent")
        assert headers["x-goog-api-key"] == "test-key"
        assert body["toolConfig"]["functionCallingConfig"]["mode"] == "AUTO"
        assert body["generationConfig"]["temperature"] == 0
        assert body["tools"][0]["functionDeclarations"][0]["name"] == "get_weather"
        assert "chit-chat" in body["systemInstruction"]["parts"][0]["text"]
        assert fake.teacher.id == "gemini:gemini-2.5-flash"
    else:
        assert path == "/v1/chat/completions"
        assert headers["authorization"] == "Bearer test-key"
        assert body["tool_choice"] == "auto" and body["temperature"] == 0
        assert body["tools"] == [{"type": "function", "function": WEATHER}]
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
        assert fake.teacher.id == "openai:gpt-4o-mini"


def test_ask_classifies_http_errors(fake):
    for code, err in [(429, teacher.RetryableError), (503, teacher.RetryableError),
                      (400, teacher.PermanentError), (404, teacher.PermanentError)]:
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
