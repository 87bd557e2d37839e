"""
Answer one request with a trained model: greedy decoding with a KV cache,
constrained so that the answer is always a valid call (or a no-call).

    python sample.py --ckpt out/demo/best.pt "Where's my order ORD-1234?"        # a compiled model: its own tools
    python sample.py --ckpt out/general/best.pt --tools examples/tools.json "Where's my order ORD-1234?"
    python sample.py --ckpt out/demo/best.pt --tools my_tools.json --json "turn off the porch light"
    python sample.py ... --no_constrain        # the raw model, which may answer anything
    python sample.py ... --quantize int8       # int8 weights for the linear layers (CPU)

Prints the call(s) as JSON, or the no-call reason; --json adds the confidence and
timing. --tools takes OpenAI function definitions or bare {name, description,
parameters} objects, as a JSON list. The tokenizer is the one in the checkpoint's
data dir (or --data_dir), and must be the one the checkpoint was trained with.

What makes it fast (each is measured in utils/bench_latency.py):
    KV cache        the prompt runs once; each step feeds only the new tokens
    forced spans    text the grammar fixes (the rest of a tool name once its
                    prefix is unique, a key that is the only one left, a special
                    token that is the only one allowed) is appended without asking
                    the model and run through it in the same forward pass as the
                    token before it, instead of one pass per token
    copy speculation  argument values are mostly copied from the request: the
                    tokens that followed the last one in the request are fed in the
                    same pass and kept while the model agrees (greedy output unchanged)
    prefix cache    the KV cache of the rendered catalogue (<|tools|>...<|user|>) is
                    kept, so the next request with the same tools runs only its own
                    tokens through the model
    --quantize int8 dynamic int8 quantization of every nn.Linear (CPU only)

Confidence: the smallest probability the model gave a token it chose freely,
under the constrained distribution (forced tokens do not count). eval.py
reports how well it is calibrated.
"""

import argparse
import json
import os
import sys
import time
import warnings
from collections import OrderedDict

import torch
import torch.nn.functional as F

import grammar
import wire
from datadir import DataDirError, catalogue_positions, load_data_dir, word_boundaries
from model import KVCache, CheckpointError, check_tokenizer, load_checkpoint
from runtime import die

MIN_ANSWER_TOKENS = 16     # a prompt must leave at least this much room in the context


def quantize_int8(model):
    """Dynamic int8 quantization of the linear layers: weights stored as int8,
    activations quantized on the fly. CPU only; the tied embedding/head stays fp32."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # torch.ao.quantization announces its successor
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


class Router:
    """A loaded model + tokenizer that turns (tools, request) into an answer."""

    def __init__(self, ckpt_path, data_dir=None, device="cpu", quantize=None):
        self.model, self.ckpt = load_checkpoint(ckpt_path, device)
        data_dir = data_dir or self.ckpt.get("data_dir", "")
        try:
            d = load_data_dir(data_dir)
        except DataDirError as e:
            raise CheckpointError(f"{e} (pass the data dir {ckpt_path} was trained on with --data_dir)") from None
        check_tokenizer(self.ckpt, d.meta["tokenizer_sha256"], ckpt_path)
        self.meta, self.sp = d.meta, d.sp
        # a compiled catalogue lives in the model (and its data dir), not in the prompt
        self.catalogue = None
        if d.meta.get("compiled"):
            self.catalogue = self.ckpt.get("catalogue") or wire.load_tools(os.path.join(data_dir, "tools.json"))
        self.device = device
        if quantize == "int8":
            if torch.device(device).type != "cpu":
                raise ValueError("--quantize int8 runs on the CPU only")
            self.model = quantize_int8(self.model)
        elif quantize:
            raise ValueError(f"unknown quantization {quantize!r}; the choice is int8")
        ids = self.meta["special_tokens"]
        self.end_id, self.call_id, self.nocall_id = ids[wire.END], ids[wire.CALL], ids[wire.NOCALL]
        self.vocab = grammar.Vocab(self.sp, ids)
        # string values are runs of whole request words (see _Answer)
        self.span_values = bool(self.meta.get("span_values"))
        # A compiled model with aux heads (train.py --tagger) answers from them when
        # it can: the intent head names the tool and the request tags give its string
        # arguments, as a classic intent/slot tagger does; measured on ATIS valid that
        # is 88% right against 77% for the generative decoder of the same model. The
        # decoder answers whatever the heads cannot (no call, a tool taking numbers,
        # enums or flags, an answer the grammar refuses); switch off to compare.
        # A catalogue-in-the-prompt model with pointer heads does the same.
        self.answer_from_heads = self.model.tagger is not None and \
            (self.catalogue is not None or self.model.point is not None)
        self.positions = OrderedDict()     # catalogue -> where its names are (pointer heads)
        self.word_start, self.end_before = word_boundaries(self.sp)
        self.grammars = OrderedDict()      # catalogue -> Grammar, most recent last
        self.prefixes = OrderedDict()      # prefix token ids -> (KVCache, its last_k)

    # -- prompts and catalogues

    def encode_prefix(self, tools):
        """Token ids of <|tools|>...<|user|>: the part shared by every request to a
        catalogue; <|user|> alone for a compiled catalogue."""
        return self.sp.encode(wire.render_prefix(None if self.catalogue is not None else tools))

    def tools_for(self, tools):
        """The tools a request may call. A compiled model: None means its whole
        catalogue; tools given must be in it with the schema it was compiled with
        (the answer is then restricted to them), else a ToolError naming the tool.
        A catalogue-in-the-prompt model takes any tools, and needs some."""
        if self.catalogue is None:
            if tools is None:
                raise wire.ToolError("this model reads the tools from the prompt: pass the tools")
            return tools
        if tools is None or tools is self.catalogue:
            return self.catalogue
        known = {t["name"]: t for t in self.catalogue}
        for t in tools:
            mine = known.get(t["name"])
            if mine is None:
                raise wire.ToolError(f"tool '{t['name']}' is not in this model's compiled catalogue "
                                     f"({', '.join(sorted(known)[:12])}{', ...' if len(known) > 12 else ''}); "
                                     "compile a model with it (data.py --compiled) or use a catalogue-in-the-prompt model")
            diff = wire.schema_difference(mine["parameters"], t["parameters"])
            if diff:
                raise wire.ToolError(f"tool '{t['name']}': {diff} than the compiled one; this model cannot "
                                     "call it as given (compile a model with the new schema)")
        return tools

    def encode_request(self, request):
        # the request follows a special token, so it is tokenized on its own either way
        return self.sp.encode(wire.render_request(request))

    def encode_prompt(self, tools, request):
        return self.encode_prefix(tools) + self.encode_request(request)

    def grammar(self, tools, tool_choice="auto"):
        # the compiled catalogue is one object: no need to serialise it for the key
        key = ("catalogue", tool_choice) if tools is self.catalogue else json.dumps([tools, tool_choice], sort_keys=True)
        g = self.grammars.pop(key, None) or grammar.Grammar(tools, tool_choice)
        self.grammars[key] = g
        while len(self.grammars) > 32:
            self.grammars.popitem(last=False)
        return g

    def _budget(self, n_prompt, max_new_tokens):
        room = self.model.config.block_size - n_prompt
        if room < MIN_ANSWER_TOKENS:
            raise ValueError(f"prompt is {n_prompt} tokens; the model's context is "
                             f"{self.model.config.block_size}, which leaves too little room for an answer")
        return min(max_new_tokens, room)

    def _tensor(self, ids):
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def _logits(self, ids, cache, first=-1, prompt=0, aux=False):
        """Continue the cache with answer tokens ids (or a prompt block, see
        GPT.decode) -> logits of the last position (V), or of positions first..
        (n, V): the vocabulary projection of the other positions is never run.
        aux: also the aux heads' logits (GPT.decode)."""
        return self.model.decode(self._tensor(ids), cache, prompt, first, aux)

    def _logits_uncached(self, seq, n_prefix, n_request):
        """Logits of the last position of seq = prefix + request + answer so far,
        run whole (no cache), with the same prompt blocks as a cached run."""
        seg = [1] * n_prefix + [2] * n_request + [0] * (len(seq) - n_prefix - n_request)
        return self.model(self._tensor(seq), seg=self._tensor(seg))[0, -1]

    def _split_prompt(self, prompt_ids):
        """Prompt ids -> (prefix up to and including <|user|>, request)."""
        user = self.meta["special_tokens"][wire.USER]
        at = prompt_ids.index(user) + 1 if user in prompt_ids else 0
        return prompt_ids[:at], prompt_ids[at:]

    # -- decoding

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens=128, use_cache=True):
        """Unconstrained greedy decoding -> list of new token ids (ending at
        <|end|> if reached): the raw model. With the cache, the prompt runs once and
        each step feeds one token; without it, every step re-runs the whole sequence."""
        model = self.model
        budget = model.config.block_size - len(prompt_ids)
        if budget <= 0:
            raise ValueError(f"prompt is {len(prompt_ids)} tokens; the model's context is "
                             f"{model.config.block_size}")
        max_new_tokens = min(max_new_tokens, budget)
        prefix, request = self._split_prompt(list(prompt_ids))
        out = []
        if use_cache:
            cache = KVCache(model.config, 1, len(prompt_ids) + max_new_tokens, self.device)
            logits = self._prefill(prefix, request, cache)
            for _ in range(max_new_tokens):
                nxt = int(logits.argmax())
                out.append(nxt)
                if nxt == self.end_id:
                    break
                logits = self._logits([nxt], cache)
        else:
            seq = list(prompt_ids)
            for _ in range(max_new_tokens):
                nxt = int(self._logits_uncached(seq, len(prefix), len(request)).argmax())
                out.append(nxt)
                if nxt == self.end_id:
                    break
                seq.append(nxt)
        return out

    @torch.inference_mode()
    def decode_reference(self, tools, request, max_new_tokens=128, tool_choice="auto"):
        """Constrained greedy decoding in its plainest form -> token ids. Run the
        prompt once (KV cache); then, until the grammar says the answer is
        complete: where the grammar fixes the next text (the rest of a name once
        only one fits, a special token that is the only one allowed, ...) write it;
        otherwise mask every token the grammar does not allow here and take the
        argmax. Feed what was written, repeat. generate_constrained gives the same
        tokens in fewer, cheaper passes (a test checks, token for token)."""
        tools = self.tools_for(tools)
        g = self.grammar(tools, tool_choice)
        prefix, request_ids = self.encode_prefix(tools), self.encode_request(request)
        budget = self._budget(len(prefix) + len(request_ids), max_new_tokens)
        cache = KVCache(self.model.config, 1, self.model.config.block_size, self.device)
        logits = self._prefill(prefix, request_ids, cache)    # (V): after the prompt
        ans = _Answer(self, g, request_ids)
        while not ans.done():
            ans.may_end()                                     # note where the answer could close
            toks = ans.forced()
            if toks is None:
                allowed = ans.allowed()                       # token ids the grammar takes here
                if len(allowed) == 0:
                    return self._cut(ans, budget)
                toks = [int(allowed[logits[allowed].argmax()])]
            if len(ans.out) + len(toks) > budget:             # out of tokens
                return self._cut(ans, budget)
            ans.push(toks)
            logits = self._logits(toks, cache)
        return ans.out

    @torch.inference_mode()
    def generate_constrained(self, tools, request, max_new_tokens=128, use_cache=True,
                             forced_spans=True, prefix_cache=True, speculate=True, pick=None,
                             tool_choice="auto", draft=True):
        """decode_reference's answer, faster -> (token ids, info).
        info: confidence, forward passes, truncated (the token budget ran out and
        the answer was cut back to its last complete point), dead_end.
        What is faster (each can be switched off; utils/bench_latency.py times them):
            prefix_cache  the catalogue's KV cache is kept across requests
            forced_spans  tokens the grammar fixes, and tokens that are the only
                          ones allowed, are not run one pass each: they wait
                          (pending) and run in one pass with the next free choice
            speculate     copy speculation: guesses of a value's next tokens from
                          the request, verified in one pass (see _verify)
            draft         a model with aux heads (train.py --tagger) on a compiled
                          catalogue drafts the whole answer from its request tags
                          and intent, verified in one pass (see _draft, _verify)
        use_cache=False re-runs the whole sequence every pass (the slowest check).
        pick(logits, allowed ids, tokens so far) -> id replaces the argmax
        (utils/bench_latency.py follows a fixed answer with it). tool_choice: auto |
        none | required | a tool's name (see grammar.Grammar)."""
        tools = self.tools_for(tools)
        g = self.grammar(tools, tool_choice)
        prefix, request_ids = self.encode_prefix(tools), self.encode_request(request)
        budget = self._budget(len(prefix) + len(request_ids), max_new_tokens)
        fast = use_cache and forced_spans         # guesses need the cache and pending tokens
        drafting = draft and fast and self.model.tagger is not None and \
            (self.catalogue is not None or self.model.point is not None)
        run = _Pass(self, prefix, request_ids, use_cache, prefix_cache, aux=drafting)
        ans, conf = _Answer(self, g, request_ids), 1.0
        guess, whole = self._draft(run.aux, request_ids, g, tools) if drafting else ([], False)

        def finish(truncated, dead_end=False):
            ids = self._cut(ans, budget) if truncated else ans.out
            return ids, {"confidence": conf, "passes": run.passes, "truncated": truncated, "dead_end": dead_end}

        if guess and whole and self.answer_from_heads and len(guess) <= budget and \
                self._heads_may_answer(guess, g, ans, tools):
            # the aux heads' answer stands (see answer_from_heads); no decoder pass at all
            conf = self._heads_confidence(run.aux, g)
            return finish(False)

        while not ans.done():
            ans.may_end()
            if not guess and speculate and fast and run.stale:
                guess = self._propose(ans, k=min(8, budget - len(ans.out), run.room()))
            guess = guess[:max(0, run.room())]        # never past the context
            if guess:
                conf = self._verify(run, guess, ans, conf, budget, pick)
                guess = []
                continue
            toks = ans.forced()
            if toks is None:
                allowed = ans.allowed()
                if len(allowed) == 0:               # a grammar bug; answer validly all the same
                    return finish(True, dead_end=True)
                if len(allowed) == 1:
                    toks = [int(allowed[0])]
                else:
                    tok, p = self._choose(run.logits(), allowed, ans.out, pick)
                    conf = min(conf, p)
                    toks = [tok]
            if len(ans.out) + len(toks) > budget:
                return finish(True)
            ans.push(toks)
            run.add(toks, one_pass_each=not forced_spans and not ans.done())
        return finish(False)

    def _verify(self, run, guess, ans, conf, budget, pick):
        """Run guessed answer tokens in one pass with what is pending, and keep each
        while it is what the decoder would have written anyway (the grammar's
        forced text, or its greedy choice from the model's logits at that point):
        the output is unchanged, in fewer passes. Guesses are copy speculation
        (prompt lookup, Saxena 2023: a value's next tokens as they go on in the
        request) or a whole drafted answer (_draft). Pushes the kept tokens onto
        ans -> the confidence after them; run.logits() is then the next logits."""
        rows = run.feed_with_guess(guess)     # rows[i]: logits after pending + guess[:i]
        i = 0
        while i < len(guess) and not ans.done():
            if i:
                ans.may_end()
            toks, p = ans.forced(), 1.0
            if toks is None:
                allowed = ans.allowed()
                if len(allowed) == 0:
                    break
                if len(allowed) == 1:
                    toks = [int(allowed[0])]
                else:
                    tok, p = self._choose(rows[i], allowed, ans.out, pick)
                    toks = [tok]
            if guess[i:i + len(toks)] != toks or len(ans.out) + len(toks) > budget:
                break
            conf = min(conf, p)
            ans.push(toks)
            i += len(toks)
        run.keep_guess(i, guess, rows[i])
        return conf

    def _heads_may_answer(self, draft, g, ans, tools):
        """Is the draft the answer (answer_from_heads)? When its tool takes plain
        strings only (what request tags can fill; a number, an enum or a flag is the
        decoder's to write) and the grammar takes it whole, as it was written
        (pushed onto ans)."""
        try:
            calls = wire.parse_answer(self.sp.decode(draft), tools)["calls"]
        except wire.AnswerError:
            return False
        by_name = {t["name"]: t for t in tools}
        for c in calls:
            props = by_name.get(c["name"], {}).get("parameters", {}).get("properties", {})
            if c["name"] not in by_name or any(p.get("type") != "string" or "enum" in p for p in props.values()):
                return False
        s = ans.state
        for t in draft:
            s = self.vocab.advance(g, s, t)
            if s is None:
                return False
        if s.phase != "done":
            return False
        ans.push(draft)
        return True

    def _heads_confidence(self, aux, g):
        """How sure the heads are of their answer: the smallest probability among
        the intent and each request token's tag."""
        tag_logits, intent_logits, _ = aux
        p = [float(F.softmax(intent_logits.float(), -1).max())]
        if len(tag_logits):
            p.append(float(F.softmax(tag_logits[:, 1:].float(), -1).max(-1).values.min()))
        return min(p)

    def _draft(self, aux, request_ids, g, tools):
        """A whole answer guessed from the aux heads after the prompt pass: the tool
        the intent head names, with an argument for each run of request tokens the
        tagger marks B(-key), I(-key)... (a key met again opens a second call of
        the tool, as data.py writes repeated slots) -> (its tokens, whole), or
        ([], False) when the intent head says no call or names a tool the grammar
        does not allow here. whole is False when a tagged run's key is not the
        tool's: the request asks for more (a second tool), so the draft may only
        be verified, never stand as the answer.
        A compiled model's heads name tools and keys as classes; pointer heads (a
        catalogue in the prompt) point at a tool's name and at each argument's name
        in the catalogue (datadir.catalogue_positions)."""
        tag_logits, intent_logits, arg_logits = aux
        if intent_logits is None or tag_logits is None:
            return [], False
        if self.model.point is None:                       # compiled: classes
            intents = self.meta.get("intents") or []
            name = intents[int(intent_logits.argmax())] if intents else None
            key_of = lambda tag, j: tag.partition("-")[2]
        else:                                              # pointers into the catalogue
            names, args = self._positions(tools)
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
            tag = self.meta["tags"][t + 1]
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
            call["arguments"][key] = self.sp.decode(request_ids[a:b]).strip()
        return self.sp.encode(wire.render_answer(calls or [{"name": name, "arguments": {}}])), whole

    def _positions(self, tools):
        """datadir.catalogue_positions of a catalogue, kept for the last 32."""
        key = json.dumps([t["name"] for t in tools] + [wire.render_prefix(tools)])
        pos = self.positions.pop(key, None) or catalogue_positions(self.sp, tools)
        self.positions[key] = pos
        while len(self.positions) > 32:
            self.positions.popitem(last=False)
        return pos

    def _choose(self, logits, allowed, out, pick):
        """The greedy choice among the allowed tokens -> (token id, its probability
        under the constrained distribution); pick (utils/bench_latency.py) may override the argmax."""
        sub = logits[allowed]
        j = int(sub.argmax()) if pick is None else int((allowed == pick(logits, allowed, out)).nonzero()[0])
        return int(allowed[j]), float(F.softmax(sub, dim=-1)[j])

    def _propose(self, ans, k=8):
        """Guess the next tokens of a value: what followed the last answer token
        (the last two, if they match) in the request; only tokens the grammar takes."""
        request_ids, out = ans.request_ids, ans.out
        if k <= 0 or ans.state.phase != "value" or not out or out[-1] not in request_ids:
            return []
        spots = [j for j, t in enumerate(request_ids) if t == out[-1]]
        two = [j for j in spots if j > 0 and len(out) > 1 and request_ids[j - 1] == out[-2]]
        j = (two or spots)[0]
        guess, s = [], ans.state
        for t in request_ids[j + 1:j + 1 + k]:
            s = self.vocab.advance(ans.g, s, t)
            if s is None:
                break
            guess.append(t)
        return guess

    def _forced(self, g, state):
        """Token ids for the text the grammar determines next, or None."""
        text = g.determined_text(state)
        if not text:
            return None
        ids = self.vocab.encode_text(text)
        if not ids:
            return None
        s = state
        for t in ids:                      # a tokenization the grammar would not take
            s = self.vocab.advance(g, s, t)  # (it always should) leaves the choice to the model
            if s is None:
                return None
        return ids

    def _cut(self, ans, budget):
        """Out of tokens: keep the answer up to its last complete point that leaves
        room for <|end|> within the budget, or decline."""
        fits = [e for e in ans.ends if e < budget]
        if fits:
            return ans.out[:fits[-1]] + [self.end_id]
        return [self.nocall_id] + self.sp.encode(wire.REASON_NO_TOOL) + [self.end_id]

    def _prefill(self, prefix, request_ids, cache, aux=False):
        """Run the prompt into cache, its two blocks one after the other (as
        training's seg has them) -> logits of its last position (with aux: and
        the aux heads' logits of the request, see GPT.decode)."""
        self._logits(prefix, cache, prompt=1)
        return self._logits(request_ids, cache, prompt=2, aux=aux)

    def _prefill_cached(self, prefix, request_ids, aux=False):
        """_prefill with the catalogue's part kept across requests (the prefix
        cache: the last 4 catalogues) -> (cache, logits of the last position)."""
        cfg = self.model.config
        key = tuple(prefix)
        entry = self.prefixes.pop(key, None)
        if entry is None:
            cache = KVCache(cfg, 1, cfg.block_size, self.device)
            self._logits(prefix, cache, prompt=1)
            entry = (cache, cache.last_k.clone(), cache.n_src)
        self.prefixes[key] = entry
        while len(self.prefixes) > 4:
            self.prefixes.popitem(last=False)
        cache, last_k, n_src = entry
        # rewind to the end of the catalogue: what a previous request appended is
        # overwritten as this one runs (smeared keys also need the last raw key back)
        cache.rewind(len(prefix), last_k, n_src)
        return cache, self._logits(request_ids, cache, prompt=2, aux=aux)

    def answer(self, tools, request, max_new_tokens=128, constrain=True, tool_choice="auto"):
        """-> dict: calls, reason, valid, error, text, tokens, latency_ms,
        confidence (None unconstrained), truncated. tool_choice needs constrain."""
        if not request or not request.strip():
            raise ValueError("empty request")
        t0 = time.perf_counter()
        info = {"confidence": None, "truncated": False}
        tools = self.tools_for(tools)
        if constrain:
            ids, info = self.generate_constrained(tools, request, max_new_tokens, tool_choice=tool_choice)
        elif tool_choice != "auto":
            raise ValueError("tool_choice other than auto needs constrained decoding")
        else:
            ids = self.generate(self.encode_prompt(tools, request), max_new_tokens)
        text = self.sp.decode(ids)
        latency = 1000 * (time.perf_counter() - t0)
        result = {"text": text, "tokens": len(ids), "latency_ms": latency,
                  "confidence": info["confidence"], "truncated": info["truncated"],
                  "calls": [], "reason": None, "valid": False, "error": None}
        try:
            parsed = wire.parse_answer(text, tools)
        except wire.AnswerError as e:
            result["error"] = f"unparseable: {e}"
            return result
        result.update(parsed)
        result["error"] = wire.validate_answer(parsed, tools)
        result["valid"] = result["error"] is None
        return result


class _Answer:
    """The answer being written: its tokens, the grammar state after them, where
    it could end (for a cut), and where the current argument value began.

    With span values (the data dir's "span_values": every string value of the
    training data is a run of whole words of the request, as in intent/slot sets),
    a string value may only be such a run: it starts where a request word starts,
    continues as the request does, and ends where a request word ends. The model
    then cannot write a garbled copy ("baya" for "bay area") or cut a word."""

    def __init__(self, router, g, request_ids):
        self.r, self.g, self.request_ids = router, g, request_ids
        self.state, self.out, self.ends, self.value_at = g.start(), [], [], None

    def done(self):
        return self.state.phase == "done"

    def may_end(self):
        """Note that the answer could close here (for a cut when tokens run out)."""
        if self.g.step(self.state, wire.END) is not None and (self._span() is None or self._span()[1]):
            self.ends.append(len(self.out))

    def push(self, toks):
        for t in toks:
            s = self.r.vocab.advance(self.g, self.state, t)
            assert s is not None, "the grammar rejected a token it allowed"
            if s.phase == "value" and self.state.phase != "value":
                self.value_at = len(self.out) + 1          # the value begins with the next token
            self.state = s
            self.out.append(t)

    def forced(self):
        return self.r._forced(self.g, self.state)

    def allowed(self):
        allowed = self.r.vocab.allowed(self.g, self.state)
        span = self._span()
        if span is None:
            return allowed
        nxt, may_end = span
        keep = [t for t in allowed.tolist() if t in nxt or (may_end and t in self.r.vocab.id_special)]
        return torch.tensor(keep, dtype=torch.long)

    def _span(self):
        """Inside a string value under span values: (the request tokens that may
        come next, may the value end here), else None."""
        if not self.r.span_values or self.state.phase != "value" or not grammar.is_raw(self.state.value):
            return None
        req, v = self.request_ids, self.out[self.value_at:]
        n = len(v)
        starts = [j for j in range(len(req) - n + 1) if req[j:j + n] == v and (n or self.r.word_start[req[j]])]
        nxt = {req[j + n] for j in starts if j + n < len(req)}
        # a value ends where a request word ends: at the request's end, before a new
        # word or before punctuation (datadir.word_boundaries)
        return nxt, n > 0 and any(j + n == len(req) or self.r.end_before[req[j + n]] for j in starts)


class _Pass:
    """The model side of one generate_constrained call: the KV cache, the tokens
    chosen but not yet run through the model (pending), the logits after the
    last token run, and the number of forward passes."""

    def __init__(self, router, prefix, request_ids, use_cache, prefix_cache, aux=False):
        self.r, self.use_cache, self.pending, self.passes = router, use_cache, [], 1
        self.stale = False    # chosen tokens since _last was computed
        self.n_prefix, self.n_request = len(prefix), len(request_ids)
        self.aux = None       # the aux heads' logits of the request (aux=True)
        if use_cache and prefix_cache:
            self.cache, self._last = router._prefill_cached(prefix, request_ids, aux)
        elif use_cache:
            cfg = router.model.config
            self.cache = KVCache(cfg, 1, cfg.block_size, router.device)
            self._last = router._prefill(prefix, request_ids, self.cache, aux)
        if aux:
            self._last, *self.aux = self._last
        else:
            self.seq = prefix + request_ids
            self._last = router._logits_uncached(self.seq, self.n_prefix, self.n_request)

    def room(self):
        """Tokens the context still holds after the pending ones."""
        used = self.cache.pos if self.use_cache else len(self.seq)
        return self.r.model.config.block_size - used - len(self.pending)

    def add(self, toks, one_pass_each=False):
        """Chosen tokens: pending until the next logits() (one pass for all), or
        with one_pass_each, run at once, a pass per token."""
        self.pending += toks
        self.stale = True
        if one_pass_each:
            for t in self.pending:
                self._run([t])
            self.pending = []

    def logits(self):
        """Next-token logits after everything chosen so far (runs what is pending)."""
        if self.stale:
            self._run(self.pending)
            self.pending = []
        return self._last

    def _run(self, ids):
        self.passes += 1
        self.stale = False
        if self.use_cache:
            self._last = self.r._logits(ids, self.cache)
        else:
            self.seq = self.seq + ids
            self._last = self.r._logits_uncached(self.seq, self.n_prefix, self.n_request)

    def feed_with_guess(self, guess):
        """Run pending + guess in one pass -> logits rows: rows[i] is what comes
        after pending + guess[:i] (len(guess) + 1 rows)."""
        self.passes += 1
        self._mark = self.cache.pos, self.cache.last_k.clone(), self.cache.n_src
        if not self.pending:              # the logits before the first guess are the last ones
            return torch.cat([self._last[None], self.r._logits(guess, self.cache, first=0)])
        return self.r._logits(self.pending + guess, self.cache, first=len(self.pending) - 1)

    def keep_guess(self, n_ok, guess, next_logits):
        """The first n_ok guesses were right. All of them: nothing pending, and
        next_logits is what follows. Fewer: forget the pass (rewind the cache) and
        make the kept ones pending, to run again with the next token."""
        if n_ok == len(guess):
            self.pending = []
        else:
            self.cache.rewind(*self._mark)
            self.pending = self.pending + guess[:n_ok]
        self._last, self.stale = next_logits, False


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("request", help="the user's request, in quotes")
    p.add_argument("--ckpt", default="out/demo/best.pt")
    p.add_argument("--tools", default=None,
                   help="JSON list of tool definitions; a compiled model: optional, a subset of its "
                   "catalogue to restrict the answer to (default: the whole catalogue)")
    p.add_argument("--data_dir", default=None, help="default: the one recorded in the checkpoint")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the full result as one JSON object")
    p.add_argument("--no_constrain", action="store_true", help="the raw model, without the answer grammar")
    p.add_argument("--quantize", choices=["int8"], default=None, help="int8 linear layers (CPU)")
    args = p.parse_args(argv)
    if not args.request.strip():
        die("the request is empty")
    tools = None
    if args.tools:
        try:
            tools = wire.load_tools(args.tools)
        except wire.ToolError as e:
            die(str(e))
        if not tools:
            die(f"{args.tools}: the tool list is empty")
    try:
        router = Router(args.ckpt, args.data_dir, args.device, args.quantize)
        if tools is None and router.catalogue is None:
            die("this model reads the tools from the prompt: pass them with --tools FILE")
        result = router.answer(tools, args.request, args.max_new_tokens, not args.no_constrain)
    except (CheckpointError, ValueError) as e:
        die(str(e))
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    elif result["calls"]:
        for c in result["calls"]:
            print(json.dumps(c, ensure_ascii=False))
        if not result["valid"]:
            print(f"(invalid: {result['error']})", file=sys.stderr)
    elif result["reason"] is not None:
        print(f"no call: {result['reason']}")
    else:
        print(f"(unparseable answer: {result['text']!r})", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
