import json

from formats import fix_types, import_jsonl, to_schema_tool

XLAM_TOOLS = [{"name": "get_weather", "description": "Current weather.",
               "parameters": {"city": {"type": "str", "description": "City name."},
                              "days": {"type": "int, optional", "default": 1},
                              "units": {"type": "List[str], optional"}}}]
CHAT_TOOLS = [{"type": "function", "function": {
    "name": "send_message", "description": "Send a text.",
    "parameters": {"type": "object", "properties": {"to": {"type": "string"}, "text": {"type": "string"}},
                   "required": ["to", "text"]}}}]


def write(tmp_path, rows):
    p = tmp_path / "in.jsonl"
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(p)


def test_xlam_dialect_becomes_json_schema():
    t = to_schema_tool(XLAM_TOOLS[0])
    props = t["parameters"]["properties"]
    assert props["city"]["type"] == "string" and props["days"]["type"] == "integer"
    assert props["units"] == {"type": "array", "items": {"type": "string"}}
    assert t["parameters"]["required"] == ["city"]


def test_bfcl_type_names_are_fixed_all_the_way_down():
    s = fix_types({"type": "dict", "properties": {"a": {"type": "float"}, "b": {"type": "tuple", "items": {"type": "any"}},
                                                  "c": {"type": "dict", "properties": {"d": {"type": "boolean"}}}}})
    assert s["type"] == "object"
    assert s["properties"]["a"]["type"] == "number" and s["properties"]["b"]["type"] == "array"
    assert "type" not in s["properties"]["b"]["items"]
    assert s["properties"]["c"]["type"] == "object" and s["properties"]["c"]["properties"]["d"]["type"] == "boolean"


def test_import_both_forms_and_count_bad_lines(tmp_path):
    rows = [
        # xLAM: tools and answers as JSON strings
        {"query": "weather in Oslo for 3 days", "tools": json.dumps(XLAM_TOOLS),
         "answers": json.dumps([{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}])},
        # OpenAI chat, with a system turn and JSON-string arguments
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "text Ann hi"},
                      {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
                          "name": "send_message", "arguments": json.dumps({"to": "Ann", "text": "hi"})}}]}],
         "tools": CHAT_TOOLS},
        # OpenAI chat no-call with one of our reasons
        {"messages": [{"role": "user", "content": "hello!"}, {"role": "assistant", "content": "chit-chat"}],
         "tools": CHAT_TOOLS},
        "{not json",
        [1, 2],
        {"query": "weather", "tools": json.dumps(XLAM_TOOLS),
         "answers": json.dumps([{"name": "get_weather", "arguments": {"city": 5}}])},      # wrong type
        {"query": "weather", "tools": json.dumps(XLAM_TOOLS),
         "answers": json.dumps([{"name": "nope", "arguments": {}}])},                      # unknown tool
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hi there!"}],
         "tools": CHAT_TOOLS},                                                            # no usable reason
        {"messages": [{"role": "user", "content": "hi"}], "tools": CHAT_TOOLS},            # no answer
        {"query": "x", "tools": json.dumps([{"name": "bad tool name!", "parameters": {}}]), "answers": "[]"},
    ]
    exs, counts = import_jsonl(write(tmp_path, rows))
    assert counts == {"ok": 3, "not_json": 1, "bad_shape": 1, "invalid_call": 2, "no_call_reason": 1,
                      "no_assistant_turn": 1, "bad_tool": 1}
    assert exs[0]["calls"] == [{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}]
    assert exs[1]["request"] == "text Ann hi" and exs[1]["calls"][0]["arguments"] == {"to": "Ann", "text": "hi"}
    assert exs[2]["calls"] == [] and exs[2]["reason"] == "chit-chat"
