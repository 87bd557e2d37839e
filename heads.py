"""
The aux heads' answer (train.py --tagger): a whole answer read off the prompt pass,
as a classic intent/slot tagger reads one, without running the decoder.

    intent head   names the tool (a compiled model: a class per tool; a catalogue in
                  the prompt: a pointer at the tool's name in the catalogue)
    tag head      marks each request token B(-key), I(-key) or O; each tagged run
                  is an argument value, copied from the request
    arg head      (pointer heads only) points at the argument's name in the catalogue

sample.Router runs the prompt with these heads when the model has them and asks
Heads.answer first. The draft stands as the answer when it can (see
Heads.may_answer): measured on ATIS valid that is 88% right against 77% for the
generative decoder of the same model (docs/results.md). Otherwise the draft is
still a guess of the whole answer that the fast decoder verifies in one pass
(sample.verify), which never changes a token.
"""

import itertools
import json
import re
from collections import OrderedDict

import torch
import torch.nn.functional as F

import grammar
import wire
from datadir import NO_CALL, catalogue_positions, piece_lengths, request_words, said_in_words

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
PICK_FLOOR = 0.05     # the least an intent the tags pick must be rated (Heads.draft; demo val, docs/results.md)


def remember(memo, key, make, n):
    """memo[key] (an OrderedDict, most recently used last), made by make() if
    missing; the oldest entries beyond n are dropped."""
    value = memo.pop(key, None)
    if value is None:
        value = make()
    memo[key] = value
    while len(memo) > n:
        memo.popitem(last=False)
    return value


class Heads:
    """The aux heads of a Router's model: draft an answer, decide whether it stands."""

    def __init__(self, router):
        self.r = router
        self.positions = OrderedDict()     # catalogue -> where its names are (pointer heads)
        self.nbytes = piece_lengths(router.sp)
        # which word tag may follow which (the training data's, else BIO's rule)
        self.rules = tag_rules(router.meta["tags"], router.meta.get("tag_moves"), router.meta.get("adjacent_moves"))

    def answer(self, aux, ans, tools, budget):
        """The heads' turn, after the prompt pass: aux = the heads' logits of the
        request (GPT.decode with aux). -> (draft tokens, confidence): the draft is
        pushed onto ans and confidence is a float when it stands as the answer;
        otherwise confidence is None and the draft (maybe []) is only a guess to verify."""
        draft, whole, ans.found, held = self.draft(aux, ans, tools)
        if ans.must_call:           # the tags outvote the intent head's "no call" (draft)
            ans.g = self.r.grammar(tools, "required")
            ans.state = ans.g.start(ans.request)
        elif ans.must_decline and self.r.untagged_declines:    # ... and stand when nothing is tagged
            ans.g = self.r.grammar(tools, "none")
            ans.state = ans.g.start(ans.request)
        # a catalogue in the prompt (hold_general): a value must be a run the pointer
        # heads tagged for its argument; an argument with no such run is not written,
        # a tool that needs one is not offered (grammar.Grammar.blocked), and with no
        # tool left the answer declines ("date" = "you", a flight's origin = "there")
        only_runs = self.r.catalogue is None and self.r.hold_general
        if (held or only_runs) and ans.state.spans is not None:
            text = ans.state.spans.text
            if self.r.catalogue is not None:        # (key, value, its call's tool or None), in request order
                found = sorted((a, z, *(k if isinstance(k, tuple) else (None, k))) for k, runs in held.items()
                               for a, z in runs)
                ans.found_keys = [(k, text[a:z].decode("utf-8"), t and t.decode()) for a, z, t, k in found]
            if self.r.hold_to_tags:
                ans.state.spans.hold(held, in_order=self.r.runs_in_order, only_runs=only_runs)
        if ans.hushed and ans.state.spans is not None:
            ans.state.spans.hush(ans.hushed)
        ans.ask = self.asks_for(ans)
        if draft and whole and self.r.answer_from_heads and len(draft) <= budget and \
                self.may_answer(draft, ans, tools):
            ans.push(draft)
            return draft, self.confidence(aux)
        if not draft and not ans.must_call:
            # no call, say the heads: guess the commonest decline whole, for the decoder to
            # verify in one pass instead of writing its reason a token at a time
            # (test p50 5.7 -> 5.4 ms, the same answers)
            draft = list(self.r.decline_ids)
        return draft, None

    def asks_for(self, ans):
        """A catalogue in the prompt (hold_general): the tool the intent head names
        needs a value the tagger found no run for ("book me a table" and no time
        stated: grammar.Grammar.blocked) -> the tokens of the decline that asks for it,
        as the data answers such requests, or None. The grammar does not let that call
        be written; a decline the answer ends with gives this reason (sample.settle;
        compiled models: sample._Answer.asks_for)."""
        s = ans.state
        if not self.r.asks_general or self.r.catalogue is not None or not self.r.hold_general or \
                ans.intent is None or ans.g.choice != "auto" or s.spans is None:
            return None
        blocked, dead = ans.g.blocked(s.spans)
        name = ans.intent.encode()
        if name not in blocked:
            return None
        key = sorted(dead[name] & ans.g.tools[name]["required"])[0]
        return [self.r.nocall_id] + self.r.vocab.encode_text((wire.REASON_MISSING + key).encode()) + [self.r.end_id]

    def may_answer(self, draft, ans, tools):
        """May the draft stand as the answer? When its tool takes plain strings
        only (what request tags can fill; a number, an enum or a flag is the
        decoder's to write) and the grammar takes it whole, as it was written."""
        try:
            calls = wire.parse_answer(self.r.sp.decode(draft), tools)["calls"]
        except wire.AnswerError:
            return False
        by_name, spans = {t["name"]: t for t in tools}, self.r.spans_of(tools)
        for c in calls:
            props = by_name.get(c["name"], {}).get("parameters", {}).get("properties", {})
            if c["name"] not in by_name or any(not grammar.plain_string(p) and (c["name"], k) not in spans for k, p in props.items()):
                return False
        s = ans.state
        for t in draft:
            s = self.r.vocab.advance(ans.g, s, t)
            if s is None:
                return False
        return s.phase == "done"

    @staticmethod
    def confidence(aux):
        """How sure the heads are of their answer: the smallest probability among
        the intent and each request token's tag."""
        tag_logits, intent_logits, _ = aux
        p = [float(F.softmax(intent_logits.float(), -1).max())]
        if len(tag_logits):
            p.append(float(F.softmax(tag_logits[:, 1:].float(), -1).max(-1).values.min()))
        return min(p)

    def draft(self, aux, ans, tools):
        """A whole answer guessed from the heads: the tool the intent head names,
        with an argument for each run of request words the tagger marks B(-key),
        I(-key)... in request order (a key met again opens the next call of the
        tool; a list's items are its runs joined by a comma or conjunction alone,
        grammar.joined) -> (its
        tokens, whole, every tagged run's text, {key: its runs as byte offsets}
        (a compiled model's)), or ([], False, those texts, those runs) when the
        intent head says no call or names a tool the grammar does not allow here. The tags are read a word at a time
        (on each word's first token) and as a sequence (best_tags), so a value is
        whole words and never split in two. whole is False when a tagged run's key
        is not the tool's: the request asks for more (a second tool), so the draft
        may only be verified, never stand.
        A compiled model's heads name tools and keys as classes; pointer heads (a
        catalogue in the prompt) point at a tool's name and at each argument's name
        in the catalogue (datadir.catalogue_positions)."""
        tag_logits, intent_logits, arg_logits = aux
        if intent_logits is None or tag_logits is None:
            return [], False, [], {}
        meta, g = self.r.meta, ans.g
        if self.r.model.point is None:                     # compiled: classes
            intents = meta.get("intents") or []
            name = intents[int(intent_logits.argmax())] if intents else None
            key_of = lambda tag, j: tag.partition("-")[2]
        else:                                              # pointers into the catalogue
            names, args = self.catalogue_positions(tools)
            cands = [0] + [p for n, p in names.items() if n.encode() in g.tools]   # 0: <|tools|>, no call
            best = cands[int(intent_logits[cands].argmax())]
            name = ans.intent = next((n for n, p in names.items() if p == best and best), None)
            keys = {p: k for (n, k), p in args.items() if n == name}

            def key_of(tag, j):
                if not keys:
                    return None
                ps = list(keys)
                return keys[ps[int(arg_logits[j, ps].argmax())]]
        _, words, text = request_words(self.r.sp, ans.request, self.nbytes, ans.request_ids)
        runs = []
        if words:
            logp = F.log_softmax(tag_logits[[w[0] for w in words], 1:].float(), dim=-1)
            adjacent = [not text[z:a].strip() for (_, _, z), (_, a, _) in zip(words, words[1:])]
            # (a clause break as grammar.Spans finds it: not an abbreviation's period, "St. Louis")
            breaks = self.r.fresh_clauses and (ans.state.spans or grammar.Spans(ans.request)).breaks
            fresh = [bool(breaks) and any(p in breaks for p in range(z - 1, a - 1))
                     for (_, _, z), (_, a, _) in zip(words, words[1:])]
            for w, t in enumerate(best_tags(logp, *self.rules, adjacent, fresh)):      # never "-" for a word
                tag = meta["tags"][t + 1]
                if tag[0] == "I" and runs and runs[-1][2] == w - 1:
                    runs[-1][2] = w
                elif tag[0] in "BI":
                    runs.append([tag, w, w])
            if self.r.hush_o and "O" in meta["tags"] and self.r.model.point is None:     # words sure to be no value
                o = logp[:, meta["tags"].index("O") - 1].exp()
                ans.hushed = [(words[w][1] - 1, words[w][2] - 1) for w in range(len(words)) if float(o[w]) >= self.r.hush_o]
        found = [text[words[a][1]:words[b][2]].decode("utf-8") for _, a, b in runs]
        # a compiled model's tags name the argument, a pointer model's arg head points
        # at it (among every argument of the catalogue: a second call's tool too):
        # its values are held to its runs (byte offsets in the request as
        # grammar.Spans reads it: without the leading space)
        held = {}
        tools_of = self.run_tools(arg_logits, words, runs, key_of, g) if self.r.model.point is None else None
        if self.r.model.point is None:
            for i, (tag, a, b) in enumerate(runs):
                key = key_of(tag, 0)
                for at in [(t.encode(), key) for t in tools_of[i]] if tools_of else [key]:
                    held.setdefault(at, []).append((words[a][1] - 1, words[b][2] - 1))
        elif self.r.hold_general and runs:
            every = list(self.catalogue_positions(tools)[1].items())     # [((tool, key), position)]
            for tag, a, b in runs if every else []:
                at = int(arg_logits[words[a][0], [p for _, p in every]].argmax())
                held.setdefault(every[at][0][1], []).append((words[a][1] - 1, words[b][2] - 1))
        # No call, says the intent head, and the tagger marked nothing: a compiled model's
        # answer is no call (ans.must_decline); the decoder only writes its reason, and
        # a call the language model would make of a stray word cannot be written
        # ("Happy Friday!" -> list_events(date="Friday"))
        ans.must_decline = self.r.model.point is None and name == NO_CALL and not runs and g.choice == "auto"
        tagged = {key_of(tag, 0) for tag, _, _ in runs} if self.r.model.point is None else set()
        # No call, says the intent head; but the tagger marked values (training tags
        # no word of a no-call request) and they fill every required argument of the
        # tool the intent head rates next, taking no key it lacks: the request is a
        # call of that tool ("Send Marilyn a text that says just got to the
        # restaurant"), and the answer must be a call (ans.must_call)
        if name == NO_CALL and runs and self.r.tags_call and g.choice == "auto":
            alt = next(n for n in (meta["intents"][int(i)] for i in intent_logits.argsort(descending=True))
                       if n != NO_CALL)
            t = g.tools.get(alt.encode())
            if t and tagged <= t["args"] and t["required"] <= tagged:
                name, ans.must_call = alt, True
        # The intent head's tool lacks a key the tagger marked, and a tool it rates
        # lower but at least PICK_FLOOR takes every tagged key and has its required
        # ones filled: that tool ("Text Ann: running late" -> send_text_message, not
        # call_contact). (Lower rated, it is a second call's tool far more often:
        # "... and erase choir practice" is not create_event.)
        if self.r.tags_pick and self.r.model.point is None and name != NO_CALL and runs and g.choice == "auto":
            t = g.tools.get(name.encode())
            if t and not tagged <= t["args"]:
                p = F.softmax(intent_logits.float(), -1)
                for i in intent_logits.argsort(descending=True):
                    alt = meta["intents"][int(i)]
                    u = g.tools.get(alt.encode()) if alt != NO_CALL else None
                    if float(p[i]) < PICK_FLOOR:
                        break
                    if u and tagged <= u["args"] and u["required"] <= tagged:
                        name = alt
                        break
        tool = g.tools.get(name.encode()) if name else None
        if tool is None:
            return [], False, found, held
        # each run's call's tool: the intent head's own tool, or with run tools each
        # run's (a request of two tools: "beep at me in 72 minutes; snooze for 6")
        owner = [ts[0] if len(ts) == 1 else name if name in ts else ts[0] for ts in tools_of] if tools_of \
            else [name] * len(runs)
        runs = [[key_of(tag, words[a][0]), a, b] for tag, a, b in runs]
        whole = all(key in g.tools[t.encode()]["args"] for (key, _, _), t in zip(runs, owner)) and \
            set(owner) <= {name}     # else: a second tool's value, or the intent head's tool has none (a call
        # of a tool with no tagged value, "... lamp off" with "lamp" untagged, is the decoder's to write: a draft
        # of two tools, or of a tool the intent head does not name, is verified only)
        runs = [(t, (key, words[a][1], words[b][2])) for (key, a, b), t in zip(runs, owner)
                if key in g.tools[t.encode()]["args"]]
        calls = []
        for t, group in itertools.groupby(runs, key=lambda r: r[0]):
            props = next(u for u in tools if u["name"] == t)["parameters"].get("properties", {})
            for part in segment([r for _, r in group], text, {k for k, p in props.items() if p.get("type") == "array"},
                                self.r.split_at_clauses):
                call = {"name": t, "arguments": {}}
                for key, a, b in part:
                    value, kind = text[a:b].decode("utf-8"), (props.get(key) or {}).get("type")
                    if kind == "array":
                        call["arguments"].setdefault(key, []).append(value)
                    elif kind in ("integer", "number") and NUMBER.fullmatch(value):
                        call["arguments"][key] = json.loads(value)
                    elif kind in ("integer", "number") and said_in_words(value):
                        call["arguments"][key] = min(grammar.word_numbers(value))     # "seventy" -> 70
                    else:
                        call["arguments"][key] = value
                calls.append(call)
        return self.r.sp.encode(wire.render_answer(calls or [{"name": name, "arguments": {}}])), whole, found, held

    def run_tools(self, each, words, runs, key_of, g):
        """A compiled model's tools for each tagged run (Router.tools_per_run; the
        intent head read at every request token, GPTConfig.intent_vote): among
        the tools the grammar allows that take the run's key, the one its words
        rate highest (each: (T, n_intents) log-probabilities; a word read on its
        first token, as its tag), when its words give it at least
        Router.run_tool_sure of those tools' probability on average; otherwise
        all of them (any may take the run) -> [[tool name, ...] best first] per
        run, or None."""
        if each is None or not runs or not self.r.tools_per_run:
            return None
        intents, out = self.r.meta["intents"], []
        for tag, a, b in runs:
            key = key_of(tag, 0)
            cands = [i for i, n in enumerate(intents) if n != NO_CALL and n.encode() in g.tools and
                     key in g.tools[n.encode()]["args"]]
            if not cands:
                return None
            p = F.softmax(each[[words[w][0] for w in range(a, b + 1)]][:, cands], -1).mean(0)
            order = [intents[cands[int(i)]] for i in p.argsort(descending=True)]
            out.append(order[:1] if float(p.max()) >= self.r.run_tool_sure else order)
        return out

    def catalogue_positions(self, tools):
        """datadir.catalogue_positions of a catalogue, kept for the last 32."""
        key = json.dumps([t["name"] for t in tools] + [wire.render_prefix(tools)])
        return remember(self.positions, key, lambda: catalogue_positions(self.r.sp, tools), 32)


CLAUSE = re.compile(r"[.;!?]|\b(?:then|also)\b", re.I)


def clause_break(gap):
    """How strongly the bytes between two runs part them: 2 a sentence end, ";",
    "then" or "also"; 1 a comma; 0 none."""
    gap = gap.decode("utf-8", "replace")
    return 2 if CLAUSE.search(gap) else 1 if "," in gap else 0


def segment(runs, text, lists=(), at_clauses=True):
    """A tool's tagged runs [(key, start, end)] (byte offsets in text, request
    order) -> the calls they are, each a list of runs. A run belongs to the call
    being filled unless that call has its key already (a list's key: unless the
    run follows its last item joined by a comma or conjunction alone); then a
    call ends. Where it ends (at_clauses): at the strongest break between the
    call's run of that key and the new run (a sentence end, ";", "then" or
    "also" over a comma over none), the latest of equals: "play starlit palace,
    then start the Sable & Rye record rusty skyline" -> the artist goes with
    the second album, not the first."""
    calls = []
    for run in runs:
        key, a, _ = run
        call = calls[-1] if calls else None
        if call is not None and any(k == key for k, _, _ in call):
            if key in lists and call[-1][0] == key and grammar.joined(text[call[-1][2]:a]):
                call.append(run)
                continue
            j = max(i for i, (k, _, _) in enumerate(call) if k == key)
            cut = len(call)       # the gaps: before each run after the key's, and before this one
            if at_clauses:
                gaps = [text[r[2]:nxt[1]] for r, nxt in zip(call[j:], call[j + 1:] + [run])]
                cut = j + 1 + max(range(len(gaps)), key=lambda i: (clause_break(gaps[i]), i))
            calls.append(call[cut:])
            del call[cut:]
            call = calls[-1]
        elif call is None:
            calls.append(call := [])
        call.append(run)
    return calls


def tag_rules(names, moves=None, adjacent=None):
    """Which word tag may follow which -> (allowed (n, n) bool, start (n,) bool,
    allowed between two words with only white space between them (n, n) bool, or
    None) over names[1:] (the tags a request word can have: "-" is none). moves:
    the data dir's [previous, next] pairs seen in training ("^": before the first
    word; datadir.tag_moves); without them, BIO's own rule: I-k only right after
    B-k or I-k. adjacent: the pairs seen between such words (datadir.adjacent_pairs),
    each also in moves. O may always follow, and begin."""
    tags = names[1:]
    n = len(tags)
    index = {t: i for i, t in enumerate(tags)}
    if moves:
        allowed, start = torch.zeros(n, n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
        for a, b in moves:
            if b in index and a == "^":
                start[index[b]] = True
            elif a in index and b in index:
                allowed[index[a], index[b]] = True
    else:
        key = [t.partition("-")[2] for t in tags]
        inside = [t[0] == "I" for t in tags]
        allowed = torch.tensor([[not inside[j] or (tags[i][0] in "BI" and key[i] == key[j]) for j in range(n)]
                                for i in range(n)])
        start = ~torch.tensor(inside)
    tight = None
    if adjacent:
        tight = torch.zeros(n, n, dtype=torch.bool)
        for a, b in adjacent:
            if a in index and b in index:
                tight[index[a], index[b]] = True
        tight &= allowed
    if "O" in index:
        allowed[:, index["O"]] = True
        start[index["O"]] = True
        if tight is not None:
            tight[:, index["O"]] = True
    return allowed, start, tight


def best_tags(logp, allowed, start, tight=None, adjacent=(), fresh=()):
    """The likeliest sequence of word tags that keeps the rules (Viterbi):
    logp (n_words, n) log-probabilities -> n_words tag indices. Read one word at a
    time, a value can come out in two pieces (B B where B I was meant), which then
    opens a call of its own; read as a sequence, only as the data has them.
    adjacent[t - 1]: word t follows word t - 1 with only white space between them;
    there the moves are tight's (tag_rules), when given. fresh[t - 1]: a clause
    break may stand between them (a sentence end or ";", grammar.Spans.breaks);
    word t may then take any tag a request may begin with, whatever came before,
    as well as the moves (the data's pairs of tags across such a break are few:
    "... for June 1; allergy medicine ..." never had a date before a list of items,
    and would read "1" as no value; a lower-case "st. louis" is one value)."""
    ban = torch.zeros(allowed.shape).masked_fill(~allowed, -1e9)
    ban_tight = None if tight is None else torch.zeros(tight.shape).masked_fill(~tight, -1e9)
    ban_fresh = torch.zeros(allowed.shape).masked_fill(~(allowed | start[None, :]), -1e9)
    score = logp[0].masked_fill(~start, -1e9)
    back = []
    for t in range(1, len(logp)):
        rule = ban_fresh if fresh and fresh[t - 1] else \
            ban_tight if ban_tight is not None and adjacent and adjacent[t - 1] else ban
        best, arg = (score[:, None] + rule).max(0)          # the best previous tag for each tag
        back.append(arg)
        score = best + logp[t]
    path = [int(score.argmax())]
    for arg in reversed(back):
        path.append(int(arg[path[-1]]))
    return path[::-1]
