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

import json
from collections import OrderedDict

import torch.nn.functional as F

import wire
from datadir import catalogue_positions


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

    def answer(self, aux, ans, tools, budget):
        """The heads' turn, after the prompt pass: aux = the heads' logits of the
        request (GPT.decode with aux). -> (draft tokens, confidence): the draft is
        pushed onto ans and confidence is a float when it stands as the answer;
        otherwise confidence is None and the draft (maybe []) is only a guess to verify."""
        draft, whole = self.draft(aux, ans.request_ids, ans.g, tools)
        if draft and whole and self.r.answer_from_heads and len(draft) <= budget and \
                self.may_answer(draft, ans, tools):
            ans.push(draft)
            return draft, self.confidence(aux)
        return draft, None

    def may_answer(self, draft, ans, tools):
        """May the draft stand as the answer? When its tool takes plain strings
        only (what request tags can fill; a number, an enum or a flag is the
        decoder's to write) and the grammar takes it whole, as it was written."""
        try:
            calls = wire.parse_answer(self.r.sp.decode(draft), tools)["calls"]
        except wire.AnswerError:
            return False
        by_name = {t["name"]: t for t in tools}
        for c in calls:
            props = by_name.get(c["name"], {}).get("parameters", {}).get("properties", {})
            if c["name"] not in by_name or any(p.get("type") != "string" or "enum" in p for p in props.values()):
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

    def draft(self, aux, request_ids, g, tools):
        """A whole answer guessed from the heads: the tool the intent head names,
        with an argument for each run of request tokens the tagger marks B(-key),
        I(-key)... (a key met again opens a second call of the tool, as data.py
        writes repeated slots) -> (its tokens, whole), or ([], False) when the
        intent head says no call or names a tool the grammar does not allow here.
        whole is False when a tagged run's key is not the tool's: the request asks
        for more (a second tool), so the draft may only be verified, never stand.
        A compiled model's heads name tools and keys as classes; pointer heads (a
        catalogue in the prompt) point at a tool's name and at each argument's name
        in the catalogue (datadir.catalogue_positions)."""
        tag_logits, intent_logits, arg_logits = aux
        if intent_logits is None or tag_logits is None:
            return [], False
        meta = self.r.meta
        if self.r.model.point is None:                     # compiled: classes
            intents = meta.get("intents") or []
            name = intents[int(intent_logits.argmax())] if intents else None
            key_of = lambda tag, j: tag.partition("-")[2]
        else:                                              # pointers into the catalogue
            names, args = self.catalogue_positions(tools)
            cands = [0] + [p for n, p in names.items() if n.encode() in g.tools]   # 0: <|tools|>, no call
            best = cands[int(intent_logits[cands].argmax())]
            name = next((n for n, p in names.items() if p == best and best), None)
            keys = {p: k for (n, k), p in args.items() if n == name}

            def key_of(tag, j):
                if not keys:
                    return None
                ps = list(keys)
                return keys[ps[int(arg_logits[j, ps].argmax())]]
        tool = g.tools.get(name.encode()) if name else None
        if tool is None:
            return [], False
        known = {k for k, _ in tool["keys"].values()}
        spans, span = [], None
        for j, t in enumerate(tag_logits[:, 1:].argmax(-1).tolist()):    # never "-" for a request token
            tag = meta["tags"][t + 1]
            bio = tag[0]
            if bio == "I" and span:
                span[2] = j + 1
            elif bio in ("B", "I"):
                span = [key_of(tag, j), j, j + 1]
                spans.append(span)
            else:
                span = None
        calls, whole = [], True
        for key, a, b in spans:
            if key not in known:
                whole = False
                continue
            call = next((c for c in calls if key not in c["arguments"]), None)
            if call is None:
                call = {"name": name, "arguments": {}}
                calls.append(call)
            call["arguments"][key] = self.r.sp.decode(request_ids[a:b]).strip()
        return self.r.sp.encode(wire.render_answer(calls or [{"name": name, "arguments": {}}])), whole

    def catalogue_positions(self, tools):
        """datadir.catalogue_positions of a catalogue, kept for the last 32."""
        key = json.dumps([t["name"] for t in tools] + [wire.render_prefix(tools)])
        return remember(self.positions, key, lambda: catalogue_positions(self.r.sp, tools), 32)
