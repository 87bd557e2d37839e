"""Constrained decoding (grammar.py + sample.Router.generate_constrained).

Property tests draw random tool schemas (and random valid answers) with
hypothesis; the model is either the toy checkpoint or a stub whose preferences
are set by the test."""

import contextlib
import json
import random

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

import grammar
import sample
import wire
from sample import Router

# derandomized so CI is reproducible; no shrinking, which can take minutes on a failure
SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
                    phases=[Phase.explicit, Phase.reuse, Phase.generate])


@pytest.fixture(scope="module")
def router(toy_ckpt):
    return Router(toy_ckpt)


@contextlib.contextmanager
def schema_only(router):
    """The router's grammar without the span rule (its data holds values to the
    request, span_values), and no call dropped for want of ground in the request
    (sample.ground): for answers whose values the request does not hold."""
    was, router.span_every, router.grounded = router.span_every, False, False
    router.grammars.clear()
    try:
        yield
    finally:
        router.span_every, router.grounded = was, True
        router.grammars.clear()


# -----------------------------------------------------------------------------
# the value automaton, case by case

def accepts(prop, text, node=None, spans=None):
    """Does the value automaton of prop (or node) read " " + text whole? spans: the
    request's (grammar.Spans), for span values."""
    s = grammar.value_start(node or grammar.value_node(prop), spans)
    for b in (" " + text).encode():
        s = grammar.value_step(s, b)
        if s is None:
            return False
    return grammar.value_done(s)


@pytest.mark.parametrize("prop, good, bad", [
    ({"type": "integer"}, ["0", "-5", "12345"], ["012", "1.5", "5e3", "-", "", "five"]),
    ({"type": "number"}, ["0", "-1.5", "2e10", "1.5E-3"], ["1.", ".5", "1e", "01", "1,5"]),
    ({"type": "boolean"}, ["true", "false"], ["tru", "True", "truex", "1"]),
    ({"enum": ["red", "dark blue"]}, ["red", "dark blue"], ["re", "reds", "blue", '"red"']),
    ({"enum": [1, "a", "2"]}, ["1", '"a"', "a", '"2"'], ["2", "b", '"1"']),    # bare as rendered, unless it reads as JSON
    ({"type": "array", "items": {"type": "string"}}, ['[]', '["a"]', '["a\\"b","\\u00e9"]'],
     ['[', '["a",]', '[a]', '["a" ]', '["\\x"]']),
    ({"type": "array", "items": {"type": "integer"}}, ['[1,2,3]'], ['[1,2.5]', '["1"]']),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
      "required": ["a"]}, ['{"a":1}', '{"b":"x","a":2}'], ['{}', '{"b":"x"}', '{"a":1,"a":2}', '{"c":1}']),
    ({"type": "object"}, ['{}', '{"k":[1,{"x":null}]}'], ['{k:1}', '{"k"}']),
    ({"type": "object", "properties": {"a": {"type": "boolean"}}}, ['{}', '{"a":true}'], ['{"a":true,']),
    ({"type": "string"}, ["Paris", "a: b", "[1", "x  y ", "\u00e9", "\u3042", "\u20ac5"],
     ["", "  ", " x", "\tx", "\u00a0x", "\u3000", "\u2028"]),
])
def test_value_automaton(prop, good, bad):
    for text in good:
        assert accepts(prop, text), text
    for text in bad:
        assert not accepts(prop, text), text


def test_grammar_structure():
    tools = wire.normalize_tools([
        {"name": "track_order", "parameters": {"type": "object", "properties": {
            "order_id": {"type": "string"}, "carrier": {"enum": ["ups", "fedex"]}}, "required": ["order_id"]}},
        {"name": "track", "parameters": {"type": "object", "properties": {}}},
    ])
    g = grammar.Grammar(tools)

    def run(syms):
        s = g.start()
        for sym in syms:
            s = g.step(s, sym)
            if s is None:
                return None
        return s

    def text(t):
        return list(t.encode())

    call = [wire.CALL] + text("track_order") + [wire.ARG]
    assert run(call + text(" order_id: X") + [wire.END]).phase == "done"
    assert run(call + text(" carrier: ups") + [wire.END]) is None           # required key missing
    assert run(call + text(" order_id: X") + [wire.ARG] + text(" order_id:")) is None   # key twice
    assert run(call + text(" colour:")) is None                              # not in the schema
    assert run([wire.CALL] + text("track") + [wire.END]).phase == "done"     # a name that prefixes another
    assert run([wire.CALL] + text("trac") + [wire.END]) is None
    assert run([wire.CALL] + text("ship_it")) is None                       # not in the catalogue
    assert run([wire.NOCALL] + text("missing argument: order_id") + [wire.END]).phase == "done"
    assert run([wire.NOCALL] + text("because") ) is None
    # determined text: the rest of the only name that fits, the only key left
    assert g.determined_text(run([wire.CALL] + text("track_"))) == b"order"
    assert g.determined_text(run([wire.CALL] + text("tr"))) == b""          # track or track_order
    assert g.determined_text(run(call + text(" order_id: X") + [wire.ARG])) == b" carrier:"


# -----------------------------------------------------------------------------
# random schemas and answers

NAME = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True)
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=12)
WORD = st.from_regex(r"[a-z]{1,8}( [a-z]{1,6})?", fullmatch=True)


@st.composite
def prop_schemas(draw, depth=0):
    kinds = ["string", "integer", "number", "boolean", "enum_str", "enum_mixed", "array"]
    if depth == 0:
        kinds.append("object")
    kind = draw(st.sampled_from(kinds))
    if kind == "enum_str":
        return {"type": "string", "enum": draw(st.lists(WORD, min_size=1, max_size=4, unique=True))}
    if kind == "enum_mixed":
        return {"enum": draw(st.lists(st.one_of(st.integers(-50, 50), WORD), min_size=1, max_size=4,
                                      unique_by=lambda v: json.dumps(v)))}
    if kind == "array":
        return {"type": "array", "items": draw(st.sampled_from(
            [{"type": "string"}, {"type": "integer"}, {"type": "number"}, {"enum": ["a", "b c"]}]))}
    if kind == "object":
        props = draw(st.dictionaries(NAME, prop_schemas(depth=1), min_size=1, max_size=3))
        req = draw(st.lists(st.sampled_from(sorted(props)), unique=True))
        return {"type": "object", "properties": props, "required": req}
    return {"type": kind}


@st.composite
def catalogues(draw):
    names = draw(st.lists(NAME, min_size=1, max_size=4, unique=True))
    tools = []
    for n in names:
        props = draw(st.dictionaries(NAME, prop_schemas(), max_size=4))
        req = draw(st.lists(st.sampled_from(sorted(props)), unique=True)) if props else []
        tools.append({"name": n, "description": "a tool",
                      "parameters": {"type": "object", "properties": props, "required": req}})
    return wire.normalize_tools(tools)


def value_for(draw, prop):
    if "enum" in prop:
        return draw(st.sampled_from(prop["enum"]))
    t = prop["type"]
    if t == "string":
        return draw(TEXT.filter(lambda s: s.strip() == s))   # the answer's end is stripped
    if t == "integer":
        return draw(st.integers(-10**6, 10**6))
    if t == "number":
        return draw(st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False))
    if t == "boolean":
        return draw(st.booleans())
    if t == "array":
        return [value_for(draw, prop["items"]) for _ in range(draw(st.integers(0, 3)))]
    props = prop["properties"]
    keys = [k for k in props if k in prop["required"] or draw(st.booleans())]
    return {k: value_for(draw, props[k]) for k in keys}


@st.composite
def answers(draw, tools):
    """A valid answer for the catalogue: calls with schema-valid arguments, or a no-call."""
    if draw(st.booleans()):
        return [], draw(st.sampled_from(list(grammar.REASONS)))
    calls = []
    for _ in range(draw(st.integers(1, 2))):
        tool = draw(st.sampled_from(tools))
        params = tool["parameters"]
        keys = [k for k in params["properties"] if k in params["required"] or draw(st.booleans())]
        args = {k: value_for(draw, params["properties"][k]) for k in keys}
        call = {"name": tool["name"], "arguments": args}
        if call not in calls:          # a call is never written twice (sample._Answer.push)
            calls.append(call)
    return calls, None


def test_generated_answers_are_valid():
    """The generators above make what they claim (else the tests below prove little)."""
    @given(st.data())
    @SETTINGS
    def check(data):
        tools = data.draw(catalogues())
        calls, reason = data.draw(answers(tools))
        parsed = wire.parse_answer(wire.render_answer(calls, reason), tools)
        assert wire.validate_answer(parsed, tools) is None
    check()


@given(st.data())
@SETTINGS
def test_every_path_the_grammar_allows_is_valid(router, data):
    """Random choices among the allowed tokens (not only the model's) always end
    in an answer that parses and validates, even when the budget runs out."""
    tools = data.draw(catalogues())
    rng = random.Random(data.draw(st.integers(0, 10**6)))
    router.choose = lambda scores, allowed, out: rng.randrange(len(allowed))    # the step's choice, at random
    try:
        ids, info = router.generate_constrained(tools, "do the thing", max_new_tokens=40)
    finally:
        router.choose = sample.greedy
    assert not info["dead_end"]
    parsed = wire.parse_answer(router.sp.decode(ids), tools)
    assert wire.validate_answer(parsed, tools) is None


@given(st.data())
@SETTINGS
def test_model_answers_under_constraints_are_valid(router, data):
    tools = data.draw(catalogues())
    res = router.answer(tools, data.draw(TEXT), max_new_tokens=40)
    assert res["valid"], (res["text"], res["error"])
    assert 0.0 <= res["confidence"] <= 1.0


class StubModel(torch.nn.Module):
    """Prefers, at every step, the first token of the rest of a target answer
    (tokenized from the text still to come), over random noise. Unconstrained
    greedy decoding therefore writes the target exactly."""

    def __init__(self, router, target_text, n_prompt):
        super().__init__()
        self.config, self.sp, self.n_prompt = router.model.config, router.sp, n_prompt
        self.vocab, self.target = router.vocab, target_text.encode()
        self.history = []
        self.g = torch.Generator().manual_seed(0)

    def head(self, h):
        return h

    def forward(self, idx, cache=None, seg=None):
        return self.hidden(idx, cache)

    tagger = None                                         # no aux heads: nothing to draft from

    def decode(self, idx, cache, prompt=0, first=-1, aux=False):     # GPT.decode's interface
        h = self.hidden(idx, cache)[0]
        out = h[-1] if first == -1 else h[first:]
        return (out, None, None) if aux else out

    def written(self, upto):
        syms = [s for t in self.history[self.n_prompt:upto] for s in self.vocab.symbols(t)]
        return b"".join(s.encode() if isinstance(s, str) else bytes([s]) for s in syms)

    def hidden(self, idx, cache=None):
        start = cache.pos if cache is not None else 0
        if start + idx.size(1) > self.config.block_size:     # as the real model refuses it
            raise RuntimeError(f"sequence of {start + idx.size(1)} tokens exceeds block_size")
        self.history = self.history[:start] + idx[0].tolist()
        if cache is not None:
            cache.pos = start + idx.size(1)
        logits = torch.randn(1, idx.size(1), self.sp.get_piece_size(), generator=self.g)
        for row in range(idx.size(1)):       # every position: what comes after the tokens up to it
            upto = start + row + 1
            if upto < self.n_prompt:
                continue
            written = self.written(upto)
            if self.target.startswith(written) and written != self.target:
                rest = self.target[len(written):]
                try:
                    nxt = self.sp.encode(rest.decode())[0]
                except UnicodeDecodeError:    # in the middle of a character: its next byte
                    nxt = self.sp.piece_to_id(f"<0x{rest[0]:02X}>")
                logits[0, row, nxt] += 20.0
        return logits


@given(st.data())
@SETTINGS
def test_constraints_never_change_a_valid_greedy_answer(router, data):
    """The schema's grammar never changes a greedy answer it allows (values
    drawn at random, so without the span rule, which has its own tests)."""
    tools = data.draw(catalogues())
    calls, reason = data.draw(answers(tools))
    target = wire.render_answer(calls, reason)
    n_prompt = len(router.encode_prompt(tools, "hello"))
    real = router.model
    try:
        with schema_only(router):
            router.model = StubModel(router, target, n_prompt)
            raw = router.sp.decode(router.generate(router.encode_prompt(tools, "hello"), 200))
            router.model = StubModel(router, target, n_prompt)
            ids, _ = router.generate_constrained(tools, "hello", max_new_tokens=200, prefix_cache=False)
    finally:
        router.model = real
    assert raw == target                      # the stub works: greedy writes the target
    assert router.sp.decode(ids) == target    # and the grammar leaves it alone


# -----------------------------------------------------------------------------
# the speed-ups change nothing

def test_prompt_encoding_is_prefix_plus_request(router, toy_data):
    for ex in [json.loads(l) for l in open(f"{toy_data}/test.jsonl")][:10]:
        full = router.sp.encode(wire.render_prompt(ex["tools"], ex["request"]))
        assert router.encode_prompt(ex["tools"], ex["request"]) == full
        assert full[:len(router.encode_prefix(ex["tools"]))] == router.encode_prefix(ex["tools"])


def test_speedups_give_the_same_tokens(router, toy_data):
    items = [json.loads(l) for l in open(f"{toy_data}/test.jsonl")][:4]
    for ex in items:
        runs = {}
        for name, kw in {"no cache": dict(use_cache=False, forced_spans=False, prefix_cache=False),
                         "cache": dict(forced_spans=False, prefix_cache=False),
                         "forced": dict(prefix_cache=False),
                         "prefix cache": dict(speculate=False),
                         "copy speculation": dict()}.items():
            router.generate_constrained(items[0]["tools"], "warm the prefix cache with another request", 8)
            runs[name] = router.generate_constrained(ex["tools"], ex["request"], 24, **kw)
        tokens = {name: ids for name, (ids, _) in runs.items()}
        assert len({tuple(t) for t in tokens.values()}) == 1, tokens
        assert runs["forced"][1]["passes"] <= runs["cache"][1]["passes"]
        conf = [info["confidence"] for _, info in runs.values()]
        assert max(conf) - min(conf) < 1e-4


def test_forced_spans_save_forward_passes(router):
    tools = wire.normalize_tools([{"name": "track_order_status", "parameters": {
        "type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}])
    # the grammar leaves the model: <|call|>/<|nocall|>, the first name token, the value
    router.choose = lambda scores, allowed, out: 0 if out else int((allowed == router.call_id).nonzero()[0])
    try:
        ids, slow = router.generate_constrained(tools, "x", 12, forced_spans=False)
        ids2, fast = router.generate_constrained(tools, "x", 12)
    finally:
        router.choose = sample.greedy
    assert ids == ids2
    assert fast["passes"] < slow["passes"]


def test_int8_router_answers_validly(toy_ckpt):
    r = Router(toy_ckpt, quantize="int8")
    assert any("quantized" in type(m).__module__ for m in r.model.modules())
    tools = wire.normalize_tools([{"name": "ping", "parameters": {"type": "object", "properties": {
        "host": {"type": "string"}}, "required": ["host"]}}])
    assert r.answer(tools, "ping example.com", max_new_tokens=24)["valid"]
    with pytest.raises(ValueError, match="int8"):
        Router(toy_ckpt, quantize="int4")


def test_tool_choice(router):
    tools = wire.normalize_tools([
        {"name": "ping", "parameters": {"type": "object", "properties": {"host": {"type": "string"}},
                                        "required": ["host"]}},
        {"name": "pong", "parameters": {"type": "object", "properties": {}}}])
    first = {}
    for choice in ["auto", "none", "required", "pong"]:
        g = grammar.Grammar(tools, choice)
        first[choice] = {sym for sym in (wire.CALL, wire.NOCALL) if g.step(g.start(), sym)}
    assert first == {"auto": {wire.CALL, wire.NOCALL}, "none": {wire.NOCALL},
                     "required": {wire.CALL}, "pong": {wire.CALL}}
    g = grammar.Grammar(tools, "pong")
    assert g.step(g.step(g.start(), wire.CALL), ord("p")).text == b"p"
    assert g.determined_text(g.step(g.start(), wire.CALL)) == b"pong"     # the only name left
    res = router.answer(tools, "ping example.com", max_new_tokens=24, tool_choice="none")
    assert res["valid"] and not res["calls"]
    res = router.answer(tools, "ping example.com", max_new_tokens=24, tool_choice="pong")
    assert res["valid"] and [c["name"] for c in res["calls"]] == ["pong"] * len(res["calls"]) != []
    with pytest.raises(ValueError, match="not among"):
        router.answer(tools, "x", tool_choice="pang")


def test_copy_speculation_keeps_the_greedy_answer_in_fewer_passes(router):
    """A value copied from the request: guessed from the request and verified in
    one pass instead of one pass per token, with exactly the same tokens."""
    tools = wire.normalize_tools([{"name": "track_order", "parameters": {"type": "object", "properties": {
        "order_id": {"type": "string"}, "note": {"type": "string"}}, "required": ["order_id"]}}])
    request = "where is order ORD-98765-XQ for me and also note leave it at the door please"
    for value in ["ORD-98765-XQ", "ORD-98765-XZ"]:     # copied whole / diverging from the request
        target = wire.render_answer([{"name": "track_order", "arguments": {"order_id": value,
                                                                           "note": "leave it at the door"}}])
        n_prompt = len(router.encode_prompt(tools, request))
        runs = {}
        real = router.model
        try:
            with schema_only(router):         # "ORD-98765-XZ" is no run of the request's words
                for spec in (False, True):
                    router.model = StubModel(router, target, n_prompt)
                    runs[spec] = router.generate_constrained(tools, request, 64, speculate=spec, prefix_cache=False)
                router.model = StubModel(router, target, n_prompt)
                reference = router.decode_reference(tools, request, 64)
        finally:
            router.model = real
        assert router.sp.decode(runs[True][0]) == router.sp.decode(runs[False][0]) == target
        assert runs[True][0] == runs[False][0] == reference
        assert runs[True][1]["passes"] < runs[False][1]["passes"]


def test_guesses_never_run_past_the_context(router):
    """A model copying a long value from the request invites guesses; with the prompt
    filling the context almost to the end, decoding must stop at the budget, not
    feed guesses past the context."""
    tools = wire.normalize_tools([{"name": "note", "parameters": {"type": "object", "properties": {
        "text": {"type": "string"}}, "required": ["text"]}}])
    block = router.model.config.block_size
    words = "abc def ghi " * 400
    real = router.model
    try:
        for n in range(block - 40, block - 15, 3):
            request = router.sp.decode(router.sp.encode(words)[:n - len(router.encode_prefix(tools))])
            n_prompt = len(router.encode_prompt(tools, request))
            router.model = StubModel(router, wire.render_answer([{"name": "note", "arguments": {"text": request}}]),
                                     n_prompt)
            try:
                ids, info = router.generate_constrained(tools, request, 64, prefix_cache=False)
            except ValueError as e:               # no room for an answer: refused up front
                assert "leaves too little room" in str(e)
                continue
            assert info["truncated"]
            # every token but the closing <|end|> went through the model
            assert n_prompt + len(ids) - 1 <= block and ids[-1] == router.end_id
    finally:
        router.model = real


# -----------------------------------------------------------------------------
# span values: a value copied from the request is a run of its whole words

def accepts_span(node, request, text):
    return accepts(None, text, node, grammar.Spans(request))


@pytest.mark.parametrize("prop, request_text, good, bad", [
    ({"type": "string"}, "add milk and eggs to my shopping list",
     ["milk", "milk and eggs", "eggs", "list"], ["c milk", "cggs", "ilk", "mil", "milk ", "Milk"]),
    ({"type": "string"}, 'play "Our Starlit Journey" please, in La Paz?',
     ["Our Starlit Journey", "La Paz", "please"], ["Our Starlit Journe", '"Our', "La Paz?", "please,"]),
    ({"type": "string"}, "remind me at 7:30 p.m.: pay the ticket in the U.S. now.",
     ["7:30 p.m.", "pay the ticket", "U.S.", "now"], ["now.", "p.m.:", "ticket in the U.S. now."]),
    ({"type": "string"}, "text #general and @mia about ORD-1234",
     ["#general", "@mia", "ORD-1234", "1234", "general"], ["ORD-", "#gen"]),
    ({"type": "array", "items": {"type": "string"}}, "add milk and eggs to my shopping list",
     ['["milk","eggs"]', '["milk and eggs"]'], ['[]', '["c milk","cggs"]', '["mil"]', '["milk"', '["milk\\u0020"]']),
    ({"type": "integer"}, "set the volume to 90 for 107 min", ["90", "107"], ["9", "10", "5", "-90"]),
    # digits glued to letters are part of a word (an order id), never a number of their own
    ({"type": "integer"}, "return order A6736344 for $20, the 20-minute one", ["20"], ["6736344", "736344", "4"]),
    # a value never runs past the end of a sentence or clause; an abbreviation's period is none
    ({"type": "string"}, "free time on September 25. Then look in St. Louis; call Mr. O'Connor! ok?",
     ["September 25", "Then look in St. Louis", "call Mr. O'Connor", "ok"],
     ["September 25. Then", "St. Louis; call", "O'Connor! ok", "25. Then look"]),
    # numbers the request states in words are stated numbers too, each compound whole
    ({"type": "integer"}, "turn it down to ninety-five percent, timer for one hundred and five",
     ["95", "105"], ["9", "5", "59", "96", "90", "100", "1"]),
    ({"type": "number"}, "a=1, b=-3, c=2.5", ["1", "-3", "2.5", "3"], ["2", "-1", "25"]),
])
def test_span_values_are_runs_of_whole_request_words(prop, request_text, good, bad):
    node = grammar.spanned(grammar.value_node(prop))
    for text in good:
        assert accepts_span(node, request_text, text), text
    for text in bad:
        assert not accepts_span(node, request_text, text), text


def test_a_number_is_never_cut_inside_one_the_request_writes():
    """Any number value (span key or not) may not stop inside a number the
    request writes in digits; converted numbers stay free."""
    node = grammar.value_node({"type": "integer"})
    assert not accepts_span(node, "volume 90 in 2 hours", "9")
    for text in ["90", "2", "120", "7"]:
        assert accepts_span(node, "volume 90 in 2 hours", text), text


def test_span_keys_are_the_grammars_and_the_request_binds_them(router):
    """Only the span keys are held to the request, and only once a request is
    known; the trie walk's allowed tokens are exactly those that stay inside."""
    tools = [{"name": "add_items", "description": "", "parameters": {"type": "object", "properties": {
        "items": {"type": "array", "items": {"type": "string"}}, "note": {"type": "string"}}}}]
    g = grammar.Grammar(tools, span_keys={("add_items", "items")})
    v = router.vocab

    def walk(state, text):
        for b in text.encode():
            state = g.step(state, b)
            if state is None:
                return None
        return state

    s = g.start("add milk and eggs to my list")
    for sym in (wire.CALL, *b"add_items"):
        s = g.step(s, sym)
    s = g.step(s, wire.ARG)
    in_items = walk(s, ' items: ["')
    for t in v.allowed(g, in_items).tolist():
        text = v.token_bytes[t].decode("utf-8", "replace") if v.token_bytes[t] else ""
        assert "add milk and eggs to my list".find(text.split('"')[0]) >= 0, text
    assert len(v.allowed(g, in_items)) > 0
    free = walk(s, " note:")           # not a span key: free text
    assert walk(free, " anything at all") is not None
    # without a request, the span key is a plain array of strings
    s0 = g.start()
    for sym in (wire.CALL, *b"add_items"):
        s0 = g.step(s0, sym)
    assert walk(g.step(s0, wire.ARG), ' items: ["cggs"]') is not None
    assert walk(s, ' items: ["cggs"]') is None


def test_word_cores_are_the_words_a_value_is_made_of():
    text = ' play "Our Starlit Journey" at 7:30 p.m.: in La Paz? #general'
    words = [text.encode()[a:z].decode() for a, z in grammar.word_cores(text)]
    assert words == ["play", "Our", "Starlit", "Journey", "at", "7:30", "p.m.", "in", "La", "Paz", "#general"]
    spans = grammar.Spans(text)
    for a, _ in grammar.word_cores(text):            # every word may begin a value
        assert a - 1 in spans.starts                  # (Spans reads the text without its leading space)
    # a possessive's "s" is a word of its own, so both "Nicole Clark" (the contact of
    # "Nicole Clark's texts") and "Macy's" are runs of whole words the tagger can mark
    text = " read Nicole Clark's texts from Macy's"
    words = [text.encode()[a:z].decode() for a, z in grammar.word_cores(text)]
    assert words == ["read", "Nicole", "Clark", "s", "texts", "from", "Macy", "s"]
    spans = grammar.Spans(text)
    for a, z in grammar.word_cores(text):
        assert a - 1 in spans.starts and z - 1 in spans.ends
    # offsets are bytes of the UTF-8 text, also after letters of more than one byte
    text = " café at Zürich's #grün"
    words = [text.encode()[a:z].decode() for a, z in grammar.word_cores(text)]
    assert words == ["café", "at", "Zürich", "s", "#grün"]
    spans = grammar.Spans(text)
    for a, z in grammar.word_cores(text):
        assert a - 1 in spans.starts and z - 1 in spans.ends


def test_word_numbers():
    """Each number a text writes in words, its compound whole: "fifty-one" is 51,
    never 50 (a value the decoder once wrote for "volume fifty-one")."""
    assert grammar.word_numbers("Turn the sound down to ninety-five percent.") == {95}
    assert grammar.word_numbers("Make it volume fifty-one") == {51}
    assert grammar.word_numbers("one hundred and five minutes") == {105}
    assert grammar.word_numbers("one hundred and then some") == {100}
    assert grammar.word_numbers("six twenty, eighteen") == {6, 20, 18}
    assert grammar.word_numbers("twenty, six") == {20, 6}
    assert grammar.word_numbers("someone is gone") == set()


def _takes(node, spans, text):
    s = grammar.value_start(node, spans)
    for b in (" " + text).encode():
        s = grammar.value_step(s, b)
        if s is None:
            return False
    return grammar.value_done(s)


def test_held_numbers_keep_the_numbers_their_runs_state_in_words():
    """A number argument held to its tagged runs may be a number those runs
    write in words, and only that: "sixty-four minute" held -> 64, not the 103
    another clause writes in digits."""
    request = "fit a sixty-four minute call the 3rd. Also an opening of 103 minutes"
    spans = grammar.Spans(request)
    at = lambda w: (request.index(w), request.index(w) + len(w))
    spans.hold({"duration": [at("sixty-four")]})
    node = grammar.spanned(grammar.value_node({"type": "integer"}))
    assert _takes(node, spans.for_key("duration"), "64")
    assert not _takes(node, spans.for_key("duration"), "103")
    assert not _takes(node, spans.for_key("duration"), "60")
    assert _takes(node, spans, "103") and not _takes(node, spans, "60")


def test_a_span_value_never_writes_itself_into_a_dead_end():
    """After "23" of "... November 23?" the '?' is refused: from it a value could
    neither end (no word end) nor go on (the request ends), and the decoder,
    stuck, would have cut the whole call (seen on the demo)."""
    spans = grammar.Spans("what's my schedule for November 23?")
    node = grammar.spanned(grammar.value_node({"type": "string"}))
    assert _takes(node, spans, "November 23") and _takes(node, spans, "23")
    state = grammar.value_start(node, spans)
    for b in " 23".encode():
        state = grammar.value_step(state, b)
    assert grammar.value_step(state, ord("?")) is None
    assert ord("?") not in spans.next_bytes(spans.go_on(spans.go_on(None, ord("2")), ord("3")))


def test_a_tool_whose_required_value_the_request_cannot_hold_is_not_offered():
    """Grammar.blocked: snooze's minutes are a number the request must state; with
    none stated the tool is not a name the call may take (it would be a dead end),
    and with every tool blocked no call opens at all; an optional key with nothing
    to copy is not offered either."""
    tools = [{"name": "snooze", "parameters": {"type": "object", "properties": {"minutes": {"type": "integer"}},
                                               "required": ["minutes"]}},
             {"name": "note", "parameters": {"type": "object", "properties": {
                 "text": {"type": "string"}, "count": {"type": "integer"}}, "required": ["text"]}}]
    keys = {("snooze", "minutes"), ("note", "text"), ("note", "count")}
    g = grammar.Grammar([wire.normalize_tool(t) for t in tools], span_keys=keys)

    def names(request):
        s = g.step(g.start(request), wire.CALL)
        return set() if s is None else {c.decode() for c in g._candidates(s)}
    assert names("snooze the alarm") == {"note"}
    assert names("snooze 10 minutes") == {"snooze", "note"}
    s = g.start("snooze the alarm")
    for sym in [wire.CALL, *b"note", wire.ARG, *b" text:", *b" alarm"]:
        s = g.step(s, sym)
    assert g.step(s, wire.ARG) is None and g.step(s, wire.END) is not None     # no count to write
    only = grammar.Grammar([wire.normalize_tool(tools[0])], span_keys=keys)
    assert only.step(only.start("snooze the alarm"), wire.CALL) is None
    assert only.step(only.start("snooze the alarm"), wire.NOCALL) is not None


def test_a_list_says_its_items_in_request_order_each_once():
    """A list of request words holds its items in the order the request says
    them, each begun after the last one ended: never "dog leash" three times for
    "electric toothbrush, aluminum foil and dog leash"; each item still a span."""
    request = "put electric toothbrush, aluminum foil and dog leash on my list"
    spans = grammar.Spans(request)
    node = grammar.spanned(grammar.value_node({"type": "array", "items": {"type": "string"}}))
    assert _takes(node, spans, '["electric toothbrush","aluminum foil","dog leash"]')
    assert _takes(node, spans, '["dog leash"]')
    for bad in ('[]', '["dog leash","dog leash"]', '["dog leash","aluminum foil"]', '["foil","aluminum foil"]',
                '["dog lea"]', '["dog leash",]'):
        assert not _takes(node, spans, bad), bad
    # after the last word of the request nothing is left: a comma is refused at once
    state = grammar.value_start(node, spans)
    for b in ' ["my list"'.encode():
        state = grammar.value_step(state, b)
    assert grammar.value_step(state, ord(",")) is None and grammar.value_step(state, ord("]")) is not None


def test_held_in_order_values_take_the_tagged_runs_one_after_another():
    """Held in order (Router.runs_in_order), a key's values are its tagged runs
    in request order, each taken once: the first call's duration is the first
    run; a list is the next runs in a row and does not end where its next run
    is joined on by "and" or a comma alone; a run that follows after other
    words opens the next list."""
    request = "fit a sixty-four minute call, then 103 minutes. Add eggs, milk and jam; then tea to the list"
    spans = grammar.Spans(request)
    at = lambda w: (request.index(w), request.index(w) + len(w))
    spans.hold({"duration": [at("103"), at("sixty-four")],
                "items": [at("eggs"), at("milk"), at("jam"), at("tea")]}, in_order=True)
    num = grammar.spanned(grammar.value_node({"type": "integer"}))
    lst = grammar.spanned(grammar.value_node({"type": "array", "items": {"type": "string"}}))
    assert _takes(num, spans.for_key("duration"), "64") and not _takes(num, spans.for_key("duration"), "103")
    after = spans.took("duration", b" 64")
    assert _takes(num, after.for_key("duration"), "103") and not _takes(num, after.for_key("duration"), "64")
    assert not after.took("duration", b" 103").runs.get("duration")     # all taken: the key is free again
    held = spans.for_key("items", listed=True)
    assert _takes(lst, held, '["eggs","milk","jam"]')
    for bad in ('["eggs","milk"]', '["eggs"]', '["milk","jam"]', '["eggs","jam"]', '["eggs","milk","jam","tea"]'):
        assert not _takes(lst, held, bad), bad
    rest = spans.took("items", b' ["eggs","milk","jam"]')
    assert _takes(lst, rest.for_key("items", listed=True), '["tea"]')
    # not in order (runs_in_order off): any run not taken yet, each once
    free = grammar.Spans(request)
    free.hold({"duration": [at("sixty-four"), at("103")]})
    assert _takes(num, free.for_key("duration"), "103")
    assert _takes(num, free.took("duration", b" 103").for_key("duration"), "64")
    assert not _takes(num, free.took("duration", b" 103").for_key("duration"), "103")


def test_joined():
    assert grammar.joined(b", ") and grammar.joined(b" and ") and grammar.joined(b", and ") and grammar.joined(b" ")
    assert not grammar.joined(b" on my list, then add ") and not grammar.joined(b"; ") and not grammar.joined(b". ")


def test_held_spans_take_only_the_tagged_runs():
    """Spans.hold: a key's values are held to the runs the tagger marked for it,
    each whole; a key with no run stays free among the request's words."""
    request = "add rain jacket and bath mat to the list"
    spans = grammar.Spans(request)
    at = lambda w: (request.index(w), request.index(w) + len(w))
    spans.hold({"items": [at("rain jacket"), at("bath mat")]})
    node = grammar.spanned(grammar.value_node({"type": "array", "items": {"type": "string"}}))

    def takes(key, text):
        s = grammar.value_start(node, spans.for_key(key))
        for b in (" " + text).encode():
            s = grammar.value_step(s, b)
            if s is None:
                return False
        return grammar.value_done(s)
    assert takes("items", '["rain jacket","bath mat"]') and takes("items", '["bath mat"]')
    for bad in ('["rain"]', '["jacket and bath mat"]', '["rain jacket and bath mat"]', '["list"]', '["mat"]'):
        assert not takes("items", bad), bad
    assert takes("other", '["list"]') and takes("other", '["rain jacket and bath"]')


def test_a_request_word_is_copied_once():
    """Spans.took: the words a value copied are taken, for every later value of
    any key and any call: a phone number, a name or a number the request says
    once is written once ("save Gloria Chevalier, number 730-329-1991" cannot
    give a second add_contact the same phone, nor a city the contact's name). A
    text said twice may be copied twice. A number is taken only where its words
    are certain: "6" of "6:15" is not taken by "six minutes"."""
    contact = {"name": "add_contact", "parameters": {"type": "object", "properties": {
        "name": {"type": "string"}, "phone": {"type": "string"}}, "required": ["name", "phone"]}}
    volume = {"name": "set_volume", "parameters": {"type": "object", "properties": {
        "level": {"type": "integer"}}, "required": ["level"]}}
    keys = {("add_contact", "name"), ("add_contact", "phone"), ("set_volume", "level")}
    g = grammar.Grammar([wire.normalize_tool(t) for t in (contact, volume)], span_keys=keys)

    def write(request, answer):
        """Step the grammar through answer (calls as [name, [(key, value), ...]]): the
        state, or None where it refuses."""
        s = g.start(request)
        for i, (name, args) in enumerate(answer):
            s = g.step(s, wire.CALL)
            for sym in [*name.encode()] + [x for k, v in args for x in [wire.ARG, *f" {k}: {v}".encode()]]:
                s = s and g.step(s, sym)
            if s is None:
                return None
        return g.step(s, wire.END)
    request = "Could you save Gloria Chevalier as a contact? Number is 730-329-1991."
    first = ("add_contact", [("name", "Gloria Chevalier"), ("phone", "730-329-1991")])
    assert write(request, [first]) is not None
    assert write(request, [first, ("add_contact", [("name", "Number"), ("phone", "730-329-1991")])]) is None
    assert write(request, [first, ("add_contact", [("name", "Chevalier"), ("phone", "Number")])]) is None
    twice = "save Bo Li at 555-0100, then save Bo Li again at 555-0199"
    assert write(twice, [("add_contact", [("name", "Bo Li"), ("phone", "555-0100")]),
                         ("add_contact", [("name", "Bo Li"), ("phone", "555-0199")])]) is not None
    said = "73 percent volume, then set it to seventy-five"
    assert write(said, [("set_volume", [("level", "73")]), ("set_volume", [("level", "75")])]) is not None
    assert write(said, [("set_volume", [("level", "73")]), ("set_volume", [("level", "73")])]) is None
    # where the words of a number are not certain, nothing is taken
    spans = grammar.Spans("wake me at 6:15 and snooze it six minutes")
    assert spans.took("minutes", b" 6").taken == frozenset()
    assert spans.took("time", b" 6:15").taken == frozenset(range(11, 15))
    num = grammar.spanned(grammar.value_node({"type": "integer"}))
    assert _takes(num, spans.took("time", b" 6:15"), "6")        # "six" is still there


def test_runs_held_per_tool_go_to_their_own_calls_only():
    """Spans.hold by (tool, key): "7:45 pm" tagged for cancel_alarm's time cannot be
    create_event's (optional) time; a tool with no run of a key waits (nothing to
    copy) while another tool's run of that key, or any run surely another tool's
    (Spans.waiting), is left, unless the key is one it requires, and is free once
    it is taken."""
    request = "save chimney inspection on Friday, then alarm at 7:45 pm, cancel it"
    spans = grammar.Spans(request)
    at = lambda w: (request.index(w), request.index(w) + len(w))
    spans.hold({(b"create_event", "title"): [at("chimney inspection")], (b"cancel_alarm", "time"): [at("7:45 pm")]})
    node = grammar.spanned(grammar.value_node({"type": "string"}))
    assert spans.by_tool
    assert _takes(node, spans.for_key("time", tool=b"cancel_alarm"), "7:45 pm")
    assert not _takes(node, spans.for_key("time", tool=b"create_event"), "7:45 pm")
    assert not _takes(node, spans.for_key("time", tool=b"create_event"), "Friday")
    assert _takes(node, spans.for_key("title", tool=b"create_event"), "chimney inspection")
    # an optional argument with no run of its own while another tool's run waits: nothing
    # (that call is still to be written; "play the album Abbey Road and turn off the kitchen
    # lights" -> no artist "kitchen lights")
    assert not _takes(node, spans.for_key("date", tool=b"create_event"), "Friday")
    titled = spans.took("title", b' "chimney inspection"', b"create_event")
    assert _takes(node, titled.for_key("date", tool=b"cancel_alarm"), "Friday")    # no other tool's run waits: free
    # a required argument may take another tool's run: the call stays possible
    assert _takes(node, spans.for_key("time", tool=b"set_alarm", required=True), "7:45 pm")
    assert not _takes(node, spans.for_key("time", tool=b"set_alarm", required=True), "Friday")
    after = spans.took("time", b' "7:45 pm"', b"cancel_alarm")
    assert _takes(node, after.for_key("time", tool=b"create_event"), "Friday")


def test_no_untagged_value_begins_at_a_word_the_tagger_is_sure_is_none():
    """Spans.hush: a value held to no run cannot begin at a hushed word ("find 113
    open minutes" -> no date "minutes"); a tagged run still may, and so may a
    word not hushed; a key left with nothing to copy is blocked."""
    request = "check my calendar for May 28 and find 113 open minutes"
    spans = grammar.Spans(request)
    spans.hold({"date": [(request.index("May 28"), request.index("May 28") + 6)]})
    spans.hush([(request.index(w), request.index(w) + len(w))
                for w in ("check", "calendar", "for", "and", "find", "open", "minutes")])
    node = grammar.spanned(grammar.value_node({"type": "string"}))
    assert _takes(node, spans.for_key("date"), "May 28")
    free = spans.took("date", b' "May 28"').for_key("date")          # the run taken: free again
    assert not _takes(node, free, "minutes") and not _takes(node, free, "open minutes")
    assert _takes(node, free, "my calendar")                          # "my" is not hushed
    items = grammar.spanned(grammar.value_node({"type": "array", "items": {"type": "string"}}))
    assert not _takes(items, free, '["minutes"]') and _takes(items, free, '["my"]')

    # a word's starts inside it are hushed with it ("open-ended": not "ended" either)
    request = "find 113 open-ended minutes"
    spans = grammar.Spans(request)
    spans.hush([(request.index("open-ended"), request.index("open-ended") + 10)])
    assert not _takes(node, spans, "ended") and not _takes(node, spans, "open-ended minutes")
    assert _takes(node, spans, "minutes")


def test_a_call_whose_required_value_could_only_copy_its_other_values_words_is_blocked():
    """Runs held per tool: a required value free to copy any words (its run taken by
    another call) may not copy the words held for the same call's other values, which
    will be taken by then. "put Golden Gold on the The Highway Song playlist", the
    playlist's run taken by play_playlist: add_song_to_playlist could write its song
    and then find nothing left for its playlist (a dead end), so it is not offered."""
    tools = [{"name": "add_song_to_playlist", "description": "", "parameters": {"type": "object", "properties": {
                 "song": {"type": "string"}, "playlist": {"type": "string"}}, "required": ["song", "playlist"]}},
             {"name": "play_playlist", "description": "", "parameters": {"type": "object", "properties": {
                 "playlist": {"type": "string"}}, "required": ["playlist"]}}]
    keys = {("add_song_to_playlist", "song"), ("add_song_to_playlist", "playlist"), ("play_playlist", "playlist")}
    g = grammar.Grammar([wire.normalize_tool(t) for t in tools], span_keys=keys)
    request = "put Golden Gold on the The Highway Song playlist"
    at = lambda w: (request.index(w), request.index(w) + len(w))
    spans = grammar.Spans(request)
    spans.hold({(b"add_song_to_playlist", "song"): [at("Golden Gold")],
                (b"add_song_to_playlist", "playlist"): [at("The Highway Song")]})
    spans.hush([at(w) for w in ("put", "on", "the", "playlist")])
    assert g.blocked(spans)[0] == frozenset()
    after = spans.took("playlist", b' "The Highway Song"', b"play_playlist")
    assert b"add_song_to_playlist" in g.blocked(after)[0]
    # with a word of its own left for the playlist, the call stays possible
    spans.hush([at(w) for w in ("put", "on", "the")])
    after = spans.took("playlist", b' "The Highway Song"', b"play_playlist")
    assert b"add_song_to_playlist" not in g.blocked(after)[0]
    # an optional value's run is not set aside: it may be left out ("kitchen" tagged
    # as a colour can still be the room)
    light = [{"name": "set_light", "description": "", "parameters": {"type": "object", "properties": {
        "room": {"type": "string"}, "color": {"type": "string"}}, "required": ["room"]}}]
    g = grammar.Grammar([wire.normalize_tool(t) for t in light], span_keys={("set_light", "room"), ("set_light", "color")})
    request = "set light in kitchen"
    spans = grammar.Spans(request)
    spans.hold({(b"set_light", "color"): [at("kitchen")]})
    spans.hush([at(w) for w in ("set", "light", "in")])
    assert g.blocked(spans)[0] == frozenset()
