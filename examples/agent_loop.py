"""
A complete tool-calling loop with the official openai client against a local serve.py:
the model picks the call, this script runs a plain Python function, sends the result
back as a tool message, and prints what happened.

    python serve.py --ckpt out/demo/best.pt                  # in another terminal
    python examples/agent_loop.py --prompt "Where's my order ORD-1234?"
    python examples/agent_loop.py --prompt "What's the weather in Paris?" --tool_choice required
    python examples/agent_loop.py --stream     # the same loop over streamed answers (server-sent events)

The server is a router, not a chat model: once the last message is a tool result it
answers finish_reason "stop" with that result as content, so the loop ends there. With
a chat model behind the same API the loop would be the same; only that last message
would be prose.
"""

import argparse
import json
import sys

from openai import APIConnectionError, APIStatusError, OpenAI

# -----------------------------------------------------------------------------
# the "real" functions the model may call: plain Python, fake data


def track_order(order_id):
    status = ["processing", "shipped", "out for delivery", "delivered"][sum(map(ord, order_id)) % 4]
    return {"order_id": order_id, "status": status}


def get_current_weather(city, unit="celsius"):
    temp = 5 + sum(map(ord, city)) % 25            # deterministic, so runs are comparable
    return {"city": city, "temperature": temp if unit == "celsius" else round(temp * 9 / 5 + 32),
            "unit": unit, "conditions": "partly cloudy"}


def set_timer(minutes, label=None):
    return {"timer": f"{minutes} min", "label": label, "started": True}


FUNCTIONS = {f.__name__: f for f in (track_order, get_current_weather, set_timer)}

TOOLS = [
    {"type": "function", "function": {
        "name": "track_order", "description": "Get the shipping status of an order.",
        "parameters": {"type": "object", "properties": {
            "order_id": {"type": "string", "description": "Order number, e.g. ORD-1234."}},
            "required": ["order_id"]}}},
    {"type": "function", "function": {
        "name": "get_current_weather", "description": "Get the weather conditions in a city right now.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name."},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "set_timer", "description": "Start a countdown timer for a number of minutes.",
        "parameters": {"type": "object", "properties": {
            "minutes": {"type": "integer", "description": "Timer length in minutes."},
            "label": {"type": "string", "description": "What the timer is for."}},
            "required": ["minutes"]}}},
]


def run_tool(name, arguments):
    """Call the Python function; a failure becomes the tool's result, as an agent would report it."""
    fn = FUNCTIONS.get(name)
    if fn is None:
        return {"error": f"no function {name!r}"}
    try:
        return fn(**arguments)
    except TypeError as e:     # arguments that do not fit the signature
        return {"error": str(e)}


def complete(client, stream, **request):
    """One chat completion -> (model, finish_reason, content, [{"id", "name", "arguments"}]).
    Streamed, the answer comes as chunks: the role, then for each call its id and name
    (arguments "") and then its arguments, keyed by the call's index; the last chunk
    carries the finish reason."""
    if not stream:
        r = client.chat.completions.create(**request)
        msg = r.choices[0].message
        calls = [{"id": tc.id, "name": tc.function.name, "arguments": tc.function.arguments}
                 for tc in msg.tool_calls or []]
        return r.model, r.choices[0].finish_reason, msg.content, calls
    model, finish, content, calls = None, None, "", {}
    for chunk in client.chat.completions.create(stream=True, **request):
        model = chunk.model
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = tc.id or call["id"]
            call["name"] += tc.function.name or ""
            call["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return model, finish, content or None, [calls[i] for i in sorted(calls)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base_url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--prompt", default="Where's my order ORD-1234?")
    p.add_argument("--model", default=None, help="default: the first model the server lists")
    p.add_argument("--tool_choice", default="auto", choices=["auto", "required", "none"],
                   help="for the first turn (later turns, after a tool result, are auto)")
    p.add_argument("--max_turns", type=int, default=4)
    p.add_argument("--stream", action="store_true", help="stream each answer (same output)")
    args = p.parse_args(argv)

    def die(msg):
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)

    client = OpenAI(base_url=args.base_url, api_key="local", max_retries=0, timeout=60)
    try:
        model = args.model or client.models.list().data[0].id
    except APIConnectionError:
        die(f"no server at {args.base_url}; start one with: python serve.py --ckpt out/demo/best.pt")
    messages = [{"role": "user", "content": args.prompt}]
    print(f"user: {args.prompt}")
    for turn in range(args.max_turns):
        try:
            answered_by, finish, content, calls = complete(client, args.stream, model=model, messages=messages,
                                                           tools=TOOLS,
                                                           tool_choice=args.tool_choice if turn == 0 else "auto")
        except (APIConnectionError, APIStatusError) as e:
            die(f"the server refused the request: {e}")
        if not calls:
            print(f"assistant [{answered_by}, finish_reason {finish}]: {content}")
            return
        # the assistant turn goes back into the history exactly as it came, then one
        # tool message per call, matched by its id
        messages.append({"role": "assistant", "content": content, "tool_calls": [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in calls]})
        for c in calls:
            arguments = json.loads(c["arguments"])
            print(f"assistant [{answered_by}] calls {c['name']}({json.dumps(arguments, ensure_ascii=False)})")
            result = run_tool(c["name"], arguments)
            print(f"tool {c['name']} -> {json.dumps(result, ensure_ascii=False)}")
            messages.append({"role": "tool", "tool_call_id": c["id"], "content": json.dumps(result, ensure_ascii=False)})
    print(f"(stopped after --max_turns {args.max_turns})")


if __name__ == "__main__":
    main()
