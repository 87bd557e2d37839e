"""
The offline synthetic generator behind data.py: tool catalogue + value pools ->
(tools, request, gold answer) examples. No network, no teacher: the gold answer
is known by construction because we fill the request template ourselves.

assets/catalogue.json holds hand-written tools, each with request templates whose
{placeholders} name the tool's parameters and a value KIND per parameter;
assets/values.json holds the word pools the kinds draw from. Thousands of
distinct values (names, cities, ids, free text) make copying from the request the
only way to fit the data; a small model memorises a handful of values instead.

Example kinds (KIND_SHARES, the defaults of Generator.sample and .sibling):
    single     one call of the target tool                         60%
    multi      2-3 calls in one request, same or different tools   24%
    chitchat / info / missing / notool    no call, with a reason   16%

Copied values are runs of whole request words (word_span): every string value,
every list item and every number the request writes in digits appears in the
request as whole words, never glued to a quote, "$" or "#", never differing in
case; the decoder can then keep values to such runs. value_classes() checks it
per value (span / converted / bad) and the data card counts it.
"""

import json
import re

from invent import VERBS, noisy, number_words, rephrase_tool, words_of
from wire import (REASON_CHITCHAT, REASON_INFO, REASON_MISSING, REASON_NO_TOOL, clean,
                  normalize_tool)

PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
KIND_SHARES = {"single": 0.60, "multi": 0.24, "chitchat": 0.04, "info": 0.04,
               "missing": 0.05, "notool": 0.03}


class CatalogueError(ValueError):
    pass


def load_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_catalogue(path):
    """-> list of entries: {domain, tool (bare wire form), slots, requests,
    paraphrases, missing}. `paraphrases` are more wordings of a tool, written apart
    from `requests`; a compiled catalogue trains on them and never tests on them."""
    data = load_json(path)
    entries = []
    for i, t in enumerate(data["tools"]):
        tool = normalize_tool({k: t[k] for k in ("name", "description", "parameters")}, i)
        props = tool["parameters"]["properties"]
        missing_slots = set(props) - set(t.get("slots", {}))
        if missing_slots:
            raise CatalogueError(f"tool '{tool['name']}': no slot kind for {sorted(missing_slots)}")
        entries.append({"domain": t["domain"], "tool": tool, "slots": t["slots"],
                        "requests": t["requests"], "paraphrases": t.get("paraphrases", []),
                        "missing": t.get("missing", {}),
                        "heldout": bool(t.get("heldout", False))})
    return entries


# -----------------------------------------------------------------------------
# values: kind -> (text inserted in the request, value in the call)

class ValueMaker:

    def __init__(self, pools):
        self.p = pools

    def make(self, rng, kind, prop):
        """-> (text shown in the request, value in the call) for one parameter of
        slot kind `kind` and schema `prop` (rng first, as in Generator.make)."""
        p, c = self.p, rng.choice
        if kind == "enum":
            v = c(prop["enum"])
            return str(v), v
        if kind.startswith("int:"):
            lo, hi = map(int, kind.split(":")[1:])
            v = rng.randint(lo, hi)
            if v < 100 and rng.random() < 0.15:   # "twenty-five minutes"
                return number_words(v), v
            return str(v), v
        if kind.startswith("number:"):
            lo, hi = map(float, kind.split(":")[1:])
            v = round(rng.uniform(lo, hi), rng.choice([0, 1, 2]))
            v = int(v) if v == int(v) else v
            return str(v), v
        if kind == "amount":
            # whole, or with cents not ending in 0: the request shows the value as the
            # answer writes it ("12.35"; "12.50" would be copied as 12.5, not a span)
            if rng.random() < 0.5:
                v = rng.randint(1, 500)
            else:
                v = round(rng.randint(1, 1999) + rng.choice([c for c in range(1, 100) if c % 10]) / 100, 2)
            return json.dumps(v), v
        if kind.startswith("list:"):
            items = list(dict.fromkeys(rng.sample(p[kind[5:]], rng.randint(1, 3))))
            text = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
            return text, items
        text = self._text(kind, rng, c, p)
        if prop.get("type") == "array":
            return text[0], text[1]
        return text, text

    def _text(self, kind, rng, c, p):
        if kind == "first_name":
            return c(p["first_names"])
        if kind in ("person", "contact"):
            return c(p["first_names"]) + (" " + c(p["last_names"]) if rng.random() < 0.6 else "")
        if kind == "email":
            local = f"{c(p['first_names'])}{c(['.', '_', ''])}{c(p['last_names'])}"
            local = re.sub(r"[^a-z0-9._]", "", local.lower()) or "user"
            return f"{local}@{c(p['email_domains'])}"
        if kind == "phone":
            d = [str(rng.randint(0, 9)) for _ in range(10)]
            return c([f"{''.join(d[:3])}-{''.join(d[3:6])}-{''.join(d[6:])}",
                      f"+1 {''.join(d[:3])} {''.join(d[3:6])} {''.join(d[6:])}",
                      "".join(d)])
        if kind == "city":
            return c(p["cities"])
        if kind == "country":
            return c(p["countries"])
        if kind == "address":
            return f"{rng.randint(1, 9999)} {c(p['streets'])}"
        if kind == "place":
            return c(p["place_names"])
        if kind == "order_id":
            return c(["ORD-", "ORD", "#", "A", ""]) + str(rng.randint(1000, 9999999))
        if kind == "code":
            alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
            return "".join(c(alphabet) for _ in range(rng.randint(5, 8)))
        if kind == "time":
            h, m = rng.randint(1, 12), c([0, 0, 15, 30, 45, rng.randint(0, 59)])
            if rng.random() < 0.3:
                return f"{rng.randint(0, 23):02d}:{m:02d}"
            ampm = c(["am", "pm", "AM", "PM", "a.m.", "p.m."])
            return f"{h}:{m:02d} {ampm}" if m or rng.random() < 0.3 else f"{h} {ampm}"
        if kind == "date":
            if rng.random() < 0.5:
                return c(p["dates"])
            mon, day = c(MONTHS), rng.randint(1, 28)
            return c([f"{mon} {day}", f"{day} {mon}", f"2026-{MONTHS.index(mon) + 1:02d}-{day:02d}"])
        if kind == "day":
            return c(p["days"])
        if kind == "url":
            host = re.sub(r"[^a-z0-9]", "", c(p["title_nouns"]).lower()) or "site"
            return f"{c(['https://', 'http://', 'www.', ''])}{host}.{c(['com', 'org', 'io', 'net', 'dev'])}" \
                   + c(["", "", f"/{c(p['words']).lower()}"])
        if kind in ("song", "album", "playlist", "movie", "podcast", "title"):
            title = f"{c(p['title_adjectives'])} {c(p['title_nouns'])}"
            if rng.random() < 0.3:
                title = c(["The ", "My ", "Our "]) + title
            return title.title() if rng.random() < 0.8 else title.lower()
        if kind == "artist":
            return c(p["artists"])
        if kind == "currency":
            return c(p["currencies"])
        simple = {"message": "messages", "subject": "subjects", "note": "notes",
                  "query": "queries", "product": "products", "room": "rooms",
                  "device": "devices", "event": "events", "dish": "dishes",
                  "ticker": "tickers", "language": "languages", "word": "words"}
        if kind in simple:
            return c(p[simple[kind]])
        if kind in p:   # any other kind names a pool of values.json directly
            return c(p[kind])
        if kind == "list_of_product":
            items = rng.sample(p["products"], rng.randint(1, 3))
            text = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
            return text, items
        raise CatalogueError(f"unknown value kind {kind!r}")


def fill(template, entry, maker, rng):
    """A request template -> (request text, arguments). Placeholders take fresh
    values; object templates may add constant arguments implied by the wording."""
    if isinstance(template, dict):
        text, args = template["text"], dict(template.get("args", {}))
    else:
        text, args = template, {}
    props = entry["tool"]["parameters"]["properties"]

    def sub(m):
        name = m.group(1)
        shown, value = maker.make(rng, entry["slots"][name], props[name])
        args[name] = value
        return shown
    return PLACEHOLDER.sub(sub, text), args


def grounded(request, args):
    """Every string value (and every list item) must appear in the request text."""
    low = request.lower()
    for v in args.values():
        for item in (v if isinstance(v, list) else [v]):
            if isinstance(item, str) and item.lower() not in low:
                return False
    return True


# -----------------------------------------------------------------------------
# copied values: runs of whole request words?

def word_span(text, value):
    """Is `value` a run of whole words of `text`? It must begin where a word
    begins (the start, or after whitespace) and end where a word ends or before
    punctuation: "Oslo" in "in Oslo?" and "20" in "a 20-minute timer" are, "Journey"
    in '"Our Starlit Journey"' is ("Journey" then a quote), "Our" there is not (a
    quote is glued before it), nor "10" in "107". The generator keeps to this
    stricter rule so that a value also begins on a token that begins a word; the
    decoder's rule (grammar.Spans) takes every value this one does, and a value
    after a quote or a '$' besides."""
    if not value or value != value.strip():
        return False
    # A value ending in punctuation ("5 p.m.") must end the word: the tokenizer may
    # merge it with punctuation after it ("p.m.:" -> "p", ".", "m", ".:").
    end_ok = (lambda ch: ch.isspace()) if not value[-1].isalnum() else (lambda ch: not ch.isalnum())
    i = text.find(value)
    while i >= 0:
        j = i + len(value)
        if (i == 0 or text[i - 1].isspace()) and (j == len(text) or end_ok(text[j])):
            return True
        i = text.find(value, i + 1)
    return False


def classify_value(request, value, prop):
    """One gold argument value (or list item) -> (class, cause). Classes:
        span       a string, or a number in digits, that is a run of whole request words
        converted  typed by the schema and derived, not copied: a bool, an enum value,
                   a number the request gives in words (or does not give at all)
        bad        a value the span rule needs copied that is not a span; cause says why
    """
    if isinstance(value, bool) or "enum" in prop or isinstance(value, (dict, type(None))):
        return "converted", "bool" if isinstance(value, bool) else "enum" if "enum" in prop else "other"
    if isinstance(value, (int, float)):
        text = json.dumps(value)        # as the answer writes it (wire.render_value)
        if word_span(request, text):
            return "span", "number"
        words = isinstance(value, int) and number_words(value)
        # "three-minute" states 3, "twenty-five" does not state 20
        if words and re.search(r"(?<![\w-])" + re.escape(words) + r"(?![\w]|-(?:one|two|three|four|five|six|seven|"
                               r"eight|nine)\b)", request.lower()):
            return "converted", "number in words"
        if text in request:
            return "bad", "number glued to other characters"
        if any(float(d) == value for d in re.findall(r"\d+(?:\.\d+)?", request)):
            return "bad", "number written differently"    # "12.50" for 12.5
        return "converted", "number not in the request"
    if not isinstance(value, str):
        return "converted", "other"
    if word_span(request, value):
        return "span", "string"
    low = request.lower()
    if word_span(low, value.lower()):
        return "bad", "case differs"
    if value in request:
        return "bad", "glued to punctuation or letters"
    if re.search(r",| and ", value):
        return "bad", "list joined into one item"
    if value.lower() in low:
        return "bad", "case differs, glued"
    return "bad", "not in the request"


def value_classes(ex, tools):
    """Every gold argument value of an example (each list item on its own) ->
    [(tool, key, value, class, cause)]. tools: the schemas by name (an example's
    own list, or a compiled catalogue)."""
    by_name = tools if isinstance(tools, dict) else {t["name"]: t for t in tools}
    request = clean(ex["request"].strip())
    out = []
    for c in ex["calls"]:
        props = by_name.get(c["name"], {}).get("parameters", {}).get("properties", {})
        for k, v in c["arguments"].items():
            prop = props.get(k, {})
            items, iprop = (v, prop.get("items", {})) if isinstance(v, list) else ([v], prop)
            for item in items:
                cls, cause = classify_value(request, item, iprop)
                if isinstance(v, list) and isinstance(item, str) and re.search(r",| and ", item):
                    cls, cause = "bad", "list item with a list joint in it"   # "Uber and Lyft": one item or two?
                out.append((c["name"], k, item, cls, cause))
    return out


def count_value_classes(examples, catalogue=None):
    """-> {"span": n, "converted": n, "bad": n} over the gold values of examples
    (an example without "tools" is about `catalogue`, the compiled tools)."""
    counts = {"span": 0, "converted": 0, "bad": 0}
    for ex in examples:
        for *_, cls, _ in value_classes(ex, ex.get("tools", catalogue or [])):
            counts[cls] += 1
    return counts


def spans_ok(request, calls, tools):
    """No bad value: every value the span rule needs copied is a run of whole
    words of the request (tools: the schemas of the calls' tools)."""
    return all(cls != "bad" for *_, cls, _ in value_classes({"request": request, "calls": calls}, tools))


def names_object(entry, request):
    """Does the request name what an invented or user tool acts on, every word of
    its object ("gym membership" for cancel_membership)? Then that tool might
    serve it. Hand-written tools are listed by hand instead (out_of_scope_fits)."""
    if entry["domain"] not in ("invented", "user"):
        return False
    words = entry["object"].split() if entry.get("object") else words_of(entry["tool"]["name"])
    if len(words) > 1 and words[0] in VERBS and not entry.get("object"):
        words = words[1:]
    said = {w.rstrip("s") for w in re.findall(r"[a-z]+", request.lower())}
    return bool(words) and all(w.rstrip("s") in said for w in words)


def _value_texts(args):
    return [x if isinstance(x, str) else json.dumps(x) for v in args.values()
            for x in (v if isinstance(v, list) else [v]) if not isinstance(x, bool)]


# -----------------------------------------------------------------------------
# examples

INNER_CASE = 1 / 30   # how often vary flips the case of a word inside a sentence


def vary(text, rng, calls=(), inner=INNER_CASE):
    """Light surface variation: the case of a word's first letter (people write
    "Remove ..." and "remove ..." alike, so neither reads as the start of a name):
    a sentence's first word one time in five, any other word not in a value of
    `calls` with probability `inner` (one time in thirty); end punctuation. A
    word after an abbreviation with inner periods ("p.m.") does not start a sentence."""
    keep = {w for c in calls for t in _value_texts(c["arguments"]) for w in t.split()}
    words = text.split(" ")
    for i, w in enumerate(words):
        prev = words[i - 1] if i else ""
        starts = i == 0 or (prev[-1:] in ".?!" and "." not in prev[:-1])
        plain = w[:1].isalpha() and (w[1:].islower() or len(w) == 1) and "." not in w[:-1] \
            and w != "I" and not w.startswith("I'")
        if plain and rng.random() < (0.2 if starts else 0.0 if w in keep else inner):
            words[i] = (w[0].lower() if w[0].isupper() else w[0].upper()) + w[1:]
    text = " ".join(words)
    if rng.random() < 0.15 and text[-1:] in ".?!":
        text = text[:-1]
    return text


def join_requests(parts, rng, args=None):
    """Two or three requests -> one sentence with connectors. args[i]: the
    arguments of part i's call. A part that ends with a value is not followed by
    "and" ("add chips and turn off the lamp" reads as a third item) but by a clear
    break; a part that begins with a value keeps its capital."""
    texts = [_value_texts(a) for a in args] if args else [[] for _ in parts]
    out = parts[0].rstrip(".!? ")
    for i, part in enumerate(parts[1:]):
        last = i == len(parts) - 2
        first = part.split(" ")[0]
        if first[:1].isupper() and first[1:].islower() and not (first == "I" or first.startswith("I'")) \
                and not any(t and part.startswith(t) for t in texts[i + 1]):
            part = part[0].lower() + part[1:]          # "Play ..." -> "..., then play ..."
        if any(t and parts[i].rstrip(".!? ").endswith(t) for t in texts[i]):
            conn = rng.choice([". Also ", "; ", ". Then "])
        else:
            conn = rng.choice([" and ", ", and ", ", then ", ". Also ", " and also ", "; "]) if last \
                else rng.choice([", ", "; "])
        out += conn + (part if last else part.rstrip(".!? "))
    return out


class Generator:
    """Makes examples from a catalogue; `tools_allowed` restricts which tools may
    appear (held-out tools never appear in training, not even as distractors).

    invented: entries made by invent.py; with probability p_invented the target
    (and each distractor) comes from them. noise: typos and spoken fillers in
    some requests, reworded tool descriptions, same-domain (near-duplicate)
    distractors; on for every split, so the test measures the same thing."""

    def __init__(self, entries, pools, min_tools=1, max_tools=10, invented=(), p_invented=0.0,
                 noise=True):
        self.entries = entries
        self.by_name = {e["tool"]["name"]: e for e in entries}
        self.pools = pools
        self.maker = ValueMaker(pools)
        self.min_tools, self.max_tools = min_tools, max_tools
        self.invented, self.p_invented = list(invented), p_invented
        self.noise = noise
        self.inner_case = INNER_CASE    # vary's case flips inside a sentence (data.py --case_flips: training's)

    def _vary(self, text, rng, calls=()):
        """vary at this generator's rate of case flips inside a sentence."""
        return vary(text, rng, calls, self.inner_case)

    def _toolset(self, rng, targets, allowed, exclude_domains=()):
        """targets + distractors, shuffled; min_tools..max_tools in total.
        A third of the time the distractors come from the targets' own domains
        first, so near-duplicate tools sit side by side."""
        n = rng.randint(max(self.min_tools, len(targets)), max(self.max_tools, len(targets)))
        names = {t["tool"]["name"] for t in targets}
        ok = lambda e: e["tool"]["name"] not in names and e["domain"] not in exclude_domains
        pool = [e for e in allowed if ok(e)]
        k = n - len(targets)
        chosen = list(targets)
        if self.noise and rng.random() < 0.33:
            domains = {t["domain"] for t in targets} - {"invented"}
            near = [e for e in pool if e["domain"] in domains]
            chosen += rng.sample(near, min(len(near), k))
            pool = [e for e in pool if e not in chosen]
        if self.invented and self.p_invented:
            k_inv = sum(rng.random() < self.p_invented for _ in range(n - len(chosen)))
            objs = {t.get("object") for t in targets} - {None}
            inv = [e for e in rng.sample(self.invented, min(len(self.invented), k_inv + len(targets)))
                   if ok(e) and e["object"] not in objs]
            chosen += inv[:k_inv]
        chosen += rng.sample(pool, min(len(pool), n - len(chosen)))
        rng.shuffle(chosen)
        if self.noise:
            chosen = [rephrase_tool(e, rng) if rng.random() < 0.3 else e for e in chosen]
        return chosen

    def _template(self, templates, rng):
        t = rng.choice(templates)
        return noisy(t, rng) if self.noise else t

    def _call(self, entry, rng):
        """-> (request, call) whose copied values are runs of whole request words;
        values are drawn again when one is not ("p.m." before a colon)."""
        tools = {entry["tool"]["name"]: entry["tool"]}
        for _ in range(20):
            templates = entry["requests"] + entry.get("paraphrases", [])
            request, args = fill(self._template(templates, rng), entry, self.maker, rng)
            call = {"name": entry["tool"]["name"], "arguments": args}
            if spans_ok(request, [call], tools):
                return request, call
        raise CatalogueError(f"tool '{entry['tool']['name']}': could not make a request whose values are "
                             "whole words of it (a template glues a {placeholder} to other characters?)")

    def _target(self, rng, pool):
        if self.invented and rng.random() < self.p_invented:
            return rng.choice(self.invented)
        return rng.choice(pool)

    def make(self, rng, kind, targets, allowed, fixed=None):
        """One example of the given kind. targets: entries the request is about
        (ignored for chitchat/info); allowed: entries usable as distractors;
        fixed: use exactly these entries as the tool list (see sibling())."""
        schemas = {e["tool"]["name"]: e["tool"] for e in targets}
        if kind == "single":
            request, call = self._call(targets[0], rng)
            text = self._vary(request, rng, [call])
            # "p.m." lost its dot, or a value that begins the request lost its capital
            text = text if spans_ok(text, [call], schemas) else request
            return self._ex(kind, self._tools(fixed, rng, targets[:1], allowed), text, [call])
        if kind == "multi":
            reqs, calls = zip(*(self._call(e, rng) for e in targets))
            uniq = list({e["tool"]["name"]: e for e in targets}.values())
            text = join_requests(list(reqs), rng, [c["arguments"] for c in calls])
            if not spans_ok(text, list(calls), schemas):   # a value ended in "!" or "?"
                text = " ".join(reqs)
            varied = self._vary(text, rng, calls)
            text = varied if spans_ok(varied, list(calls), schemas) else text
            return self._ex(kind, self._tools(fixed, rng, uniq, allowed), text, list(calls))
        if kind == "chitchat":
            return self._ex(kind, self._tools(fixed, rng, [], allowed), self._vary(rng.choice(self.pools["chitchat"]), rng),
                            [], REASON_CHITCHAT)
        if kind == "info":
            # a search tool could answer a general question, so none is offered
            tools = self._tools(fixed, rng, [], allowed, exclude_domains={"search"})
            return self._ex(kind, tools, self._vary(rng.choice(self.pools["info_requests"]), rng), [], REASON_INFO)
        if kind == "missing":
            e = targets[0]
            arg = rng.choice(sorted(e["missing"]))
            request, _ = fill(self._template(e["missing"][arg], rng), e, self.maker, rng)
            return self._ex(kind, self._tools(fixed, rng, [e], allowed), self._vary(request, rng), [],
                            REASON_MISSING + arg)
        if kind == "notool":
            # either an action no catalogue tool does, or a catalogue request whose
            # tool (and every tool of its domain) is absent from the list
            if rng.random() < 0.5:
                return self._out_of_scope(rng, self._tools(fixed, rng, [], allowed))
            # a web search could look up what most requests ask, so none is offered
            e = targets[0]
            request, _ = self._call(e, rng)
            tools = self._tools(fixed, rng, [], allowed, exclude_domains={e["domain"], "search"})
            return self._ex(kind, tools, self._vary(request, rng), [], REASON_NO_TOOL)
        raise ValueError(f"unknown example kind {kind!r}")

    def _out_of_scope(self, rng, entries):
        """A no-call example over `entries`: an out-of-scope request that none of
        them could serve, not even by asking for a missing value. values.json
        lists the hand-written tools that could serve each request ("block this
        phone number": block_number, so with it offered that is a missing value,
        not "no tool fits"); an invented or user tool could when the request names
        its object ("cancel my gym membership": cancel_membership)."""
        fits = self.pools.get("out_of_scope_fits", {})
        names = {e["tool"]["name"] for e in entries}
        ok = [r for r in self.pools["out_of_scope"]
              if not names & set(fits.get(r, ())) and not any(names_object(e, r) for e in entries)]
        if not ok:     # every one could be served: chit-chat instead
            return self._ex("chitchat", entries, self._vary(rng.choice(self.pools["chitchat"]), rng), [], REASON_CHITCHAT)
        return self._ex("notool", entries, rng.choice(ok), [], REASON_NO_TOOL)

    def _tools(self, fixed, rng, *args, **kw):
        return list(fixed) if fixed is not None else self._toolset(rng, *args, **kw)

    @staticmethod
    def _ex(kind, entries, request, calls, reason=None):
        # _entries: the tool list as catalogue entries, for sibling(); data.py drops it
        return {"kind": kind, "tools": [e["tool"] for e in entries], "request": request, "calls": calls,
                "reason": reason, "_entries": entries}

    def sibling(self, rng, entries, allowed, shares=KIND_SHARES):
        """Another example over exactly the same tool list (train.py can then run
        the shared tool prefix once for several requests, see --share_prefix)."""
        if not entries:    # every tool was excluded from the first example's list: only chit-chat fits
            return self._ex("chitchat", [], self._vary(rng.choice(self.pools["chitchat"]), rng), [], REASON_CHITCHAT)
        kind = rng.choices(list(shares), weights=list(shares.values()))[0]
        domains = {e["domain"] for e in entries}
        if kind == "missing":
            cands = [e for e in entries if e["missing"]]
            if not cands:
                kind = "single"
        if kind == "info" and "search" in domains:
            kind = "chitchat"
        if kind == "single":
            return self.make(rng, kind, [rng.choice(entries)], allowed, entries)
        if kind == "multi":
            first = rng.choice(entries)
            n = rng.choice([2, 2, 2, 3])
            targets = [first] * n if rng.random() < 0.3 or len(entries) == 1 \
                else [first] + rng.sample([e for e in entries if e is not first], min(n - 1, len(entries) - 1))
            return self.make(rng, kind, targets, allowed, entries)
        if kind == "missing":
            return self.make(rng, kind, [rng.choice(cands)], allowed, entries)
        if kind == "notool":
            others = [e for e in allowed if e["domain"] not in domains] if "search" not in domains else []
            if others and rng.random() < 0.5:
                e = rng.choice(others)
                request, _ = self._call(e, rng)
                return self._ex(kind, entries, self._vary(request, rng), [], REASON_NO_TOOL)
            return self._out_of_scope(rng, entries)
        return self.make(rng, kind, [], allowed, entries)

    def sample(self, rng, targets_pool, allowed, shares=KIND_SHARES):
        """Draw a kind by its share, targets from targets_pool (or the invented
        tools), make the example."""
        kind = rng.choices(list(shares), weights=list(shares.values()))[0]
        first = self._target(rng, targets_pool)
        if kind == "missing":
            while not first["missing"]:
                first = self._target(rng, targets_pool)
        if kind == "multi":
            n = rng.choice([2, 2, 2, 3])
            if rng.random() < 0.3:   # the same tool several times
                targets = [first] * n
            else:
                others = [self._target(rng, allowed) for _ in range(n - 1)]
                targets = [first] + [e for e in others if e is not first]
            return self.make(rng, kind, targets, allowed)
        return self.make(rng, kind, [first], allowed)
