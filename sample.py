"""
Answer one request with a trained model: greedy decoding with a KV cache,
constrained so that the answer is always a valid call (or a no-call).

    python sample.py --ckpt out/demo/best.pt "Where's my order ORD-1234?"        # a compiled model: its own tools
    python sample.py --ckpt out/general/best.pt --tools examples/tools.json "Where's my order ORD-1234?"
    python sample.py --ckpt out/demo/best.pt --tools my_tools.json --json "turn off the porch light"
    python sample.py ... --no_constrain        # the raw model, which may answer anything
    python sample.py ... --quantize int8       # int8 weights for the linear layers (CPU)
    python sample.py ... --retrieve_k 0        # a long catalogue whole, as far as it fits (default: the 8 tools most related to the request)

Prints the call(s) as JSON, or the no-call reason; --json adds the confidence and
timing. --tools takes OpenAI function definitions or bare {name, description,
parameters} objects, as a JSON list. The tokenizer is the one in the checkpoint's
data dir (or --data_dir), and must be the one the checkpoint was trained with.

A model that reads the catalogue from the prompt gets only the --retrieve_k tools
most related to the request when there are more (retrieve.py), and fewer when those
would not leave room in its context for the answer (Router.fit); a compiled model
never retrieves.

Top to bottom: Router (loading, the tools a request may call, prompts, answer);
step, the one decoding step every decoder takes; the two decoders,
decode_reference (plain) and decode_fast (the same tokens, faster); the fast
decoder's pieces, each readable alone (propose + verify: speculation; _Pass: the
model side, with the KV and prefix caches and the pending forced spans); _Answer,
the answer being written and the rule on values. The heads' answer: heads.py.

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
import retrieve
import wire
from datadir import DataDirError, load_data_dir
from heads import Heads, remember
from model import KVCache, CheckpointError, check_tokenizer, load_checkpoint
from runtime import die

MIN_ANSWER_TOKENS = 16     # a prompt must leave at least this much room in the context
FIT_ROOM = 64              # ... and a catalogue in the prompt is cut to leave this much (Router.fit)
DROP = -1                  # step's choice to take back the call being written and end (_Answer.push)


def quantize_int8(model):
    """Dynamic int8 quantization of the linear layers: weights stored as int8,
    activations quantized on the fly. CPU only; the tied embedding/head stays fp32."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # torch.ao.quantization announces its successor
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def greedy(scores, allowed, out):
    """The decoders' choice among the allowed tokens: the model's likeliest ->
    its index in allowed (scores: the allowed tokens' logits; out: tokens so far)."""
    return int(scores.argmax())


class Router:
    """A loaded model + tokenizer that turns (tools, request) into an answer."""

    def __init__(self, ckpt_path, data_dir=None, device="cpu", quantize=None, retrieve_k=8):
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
        self.arg_id = ids[wire.ARG]
        # the commonest decline, whole: the answer when tokens run out (cut), the heads' guess for a no call
        self.decline_ids = [self.nocall_id] + self.sp.encode(wire.REASON_NO_TOOL) + [self.end_id]
        self.vocab = grammar.Vocab(self.sp, ids)
        # Values the training data always copies from the request are held to runs of
        # its whole words (grammar.Spans): the arguments data.py lists as span keys
        # (a compiled catalogue), or, when the data dir says nearly all of its values
        # are such runs ("span_values"), every value of a kind that can be (a plain
        # string, strings in an array, a number the request states) of any catalogue.
        self.span_keys = {tuple(k) for k in self.meta.get("span_keys", [])}
        self.span_every = bool(self.meta.get("span_values")) and not self.span_keys
        # A model with aux heads (train.py --tagger) on a compiled catalogue, or with
        # pointer heads on a catalogue in the prompt, drafts the answer from them
        # (heads.py); the draft is the answer when it can be (answer_from_heads,
        # switch off to measure the decoder alone), else a guess the decoder verifies.
        has_heads = self.model.tagger is not None and (self.catalogue is not None or self.model.point is not None)
        self.heads = Heads(self) if has_heads else None
        self.answer_from_heads = has_heads
        self.cover_found = True            # a call answer uses every value the heads found (_Answer.allowed)
        self.end_sure = 0.99               # ... unless a compiled model ends it with at least this probability
        self.call_waiting = True           # ... but never before calling each tool a run is surely of (_Answer.allowed)
        self.min_value_p = 0.001           # a later call's free text value the model gives less: no call (_Answer.unwanted)
        self.hold_to_tags = True           # span values are runs the tagger marked for their key (heads.py)
        self.tags_call = True              # tags that fill a tool's required arguments outvote a no-call intent (heads.py)
        self.untagged_declines = True      # a compiled no-call intent with nothing tagged is the answer (heads.py)
        self.tags_pick = True              # tagged keys the intent's tool lacks pick a tool rated next (heads.py)
        self.hush_o = 0.99                 # a compiled model's untagged value begins at no word rated O this sure (heads.py)
        self.fresh_clauses = True          # after a clause break the word tags begin afresh (heads.best_tags)
        self.split_at_clauses = True       # a repeated key ends the call at the strongest clause break (heads.segment)
        self.tools_per_run = bool(self.ckpt.get("run_tools"))   # each tagged run is a value of the tool its words name (heads.py)
        self.run_tool_sure = 0.9           # ... when they give it this much; else of any tool that takes it
        self.found_not_missing = True      # a compiled model's answer is no "missing argument" the heads found (decode_fast)
        self.hold_general = True           # a catalogue in the prompt: a value is a run tagged for its key (heads.py)
        self.runs_in_order = True          # ... each run taken once, in request order (grammar.Spans.hold)
        self.grounded = True               # ... and each call has ground in the request (ground)
        self.asks_general = True           # ... and a decline asks for a value the intent's tool needs, none tagged (heads.py)
        self.choose = greedy               # the step's choice; a benchmark may follow a fixed answer
        self.grammars = OrderedDict()      # catalogue -> Grammar, most recent last
        # A catalogue in the prompt longer than retrieve_k: only its retrieve_k tools
        # most related to the request reach the model (retrieve.py; 0 = all of them),
        # fewer when they would not fit the context (fit)
        self.retrieve_k = retrieve_k
        self.indexes = OrderedDict()       # catalogue -> retrieve.Index, most recent last
        self.grounds = OrderedDict()       # ... the tools the model saw -> theirs (ground)
        self.prefixes = OrderedDict()      # prefix token ids -> (KVCache, its last_k, n_src)

    # -- prompts and catalogues

    def encode_prefix(self, tools):
        """Token ids of <|tools|>...<|user|>: the part shared by every request to a
        catalogue; <|user|> alone for a compiled catalogue."""
        return self.sp.encode(wire.render_prefix(None if self.catalogue is not None else tools))

    def tools_for(self, tools, request=None, tool_choice="auto"):
        """The tools a request may call. A compiled model: None means its whole
        catalogue; tools given must be in it with the schema it was compiled with
        (the answer is then restricted to them), else a ToolError naming the tool.
        A catalogue-in-the-prompt model takes any tools, and needs some; given the
        request, a catalogue longer than retrieve_k, or too long for the context, is
        cut to the tools most related to it (fit)."""
        if self.catalogue is None:
            if tools is None:
                raise wire.ToolError("this model reads the tools from the prompt: pass the tools")
            return tools if request is None else self.fit(tools, request, tool_choice)
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

    def fit(self, tools, request, tool_choice="auto"):
        """A catalogue in the prompt, cut for one request: its retrieve_k tools most
        related to the request (retrieve.py; 0 = all), and fewer while the prompt
        would leave less than FIT_ROOM tokens of the context for the answer, the
        least related dropped first (a tool tool_choice names is always kept). A
        catalogue that fits and is no longer than retrieve_k is returned as it is."""
        k = self.retrieve_k if 0 < self.retrieve_k < len(tools) else len(tools)
        room = self.model.config.block_size - FIT_ROOM - len(self.encode_request(request))
        if k == len(tools) and len(self.encode_prefix(tools)) <= room:
            return tools
        index = remember(self.indexes, json.dumps(tools, sort_keys=True), lambda: retrieve.Index(tools), 32)
        while True:
            kept = index.top_k(request, k, keep=(tool_choice,))
            if k <= 1 or len(self.encode_prefix(kept)) <= room:
                return kept
            k -= 1

    def encode_request(self, request):
        # the request follows a special token, so it is tokenized on its own either way
        return self.sp.encode(wire.render_request(request))

    def encode_prompt(self, tools, request):
        return self.encode_prefix(tools) + self.encode_request(request)

    def grammar(self, tools, tool_choice="auto"):
        # the compiled catalogue is one object: no need to serialise it for the key
        key = ("catalogue", tool_choice) if tools is self.catalogue else json.dumps([tools, tool_choice], sort_keys=True)
        return remember(self.grammars, key, lambda: grammar.Grammar(tools, tool_choice, self.spans_of(tools)), 32)

    def spans_of(self, tools):
        """The (tool, key) pairs whose values are held to runs of request words."""
        if self.span_every:
            return {(t["name"], k) for t in tools for k, p in t["parameters"].get("properties", {}).items()
                    if grammar.spanned(grammar.value_node(p))[0] == "span"}
        return self.span_keys

    def budget(self, n_prompt, max_new_tokens):
        """Tokens an answer may take after a prompt of n_prompt tokens (ValueError:
        the prompt leaves less than MIN_ANSWER_TOKENS of the context)."""
        room = self.model.config.block_size - n_prompt
        if room < MIN_ANSWER_TOKENS:
            raise ValueError(f"prompt is {n_prompt} tokens; the model's context is "
                             f"{self.model.config.block_size}, which leaves too little room for an answer")
        return min(max_new_tokens, room)

    # -- answering

    def answer(self, tools, request, max_new_tokens=128, constrain=True, tool_choice="auto", top_logprobs=None):
        """-> dict: calls, reason, valid, error, text, tokens, latency_ms,
        confidence (None unconstrained), truncated, dead_end (the grammar left the
        decoder no token: a bug, answered validly all the same), retrieved (the names of the
        tools the model saw when retrieval cut the catalogue, else None).
        tool_choice needs constrain.
        top_logprobs=k (constrained only): also "logprobs", per answer token
        (token id, its log-probability, the k likeliest [(id, log-probability)]),
        the model's own over the whole vocabulary (no grammar mask), from the
        decoder's logits with the prompt's blocks as decoding had them."""
        if not request or not request.strip():
            raise ValueError("empty request")
        t0 = time.perf_counter()
        info = {"confidence": None, "truncated": False}
        given = tools
        tools = self.tools_for(tools, request, tool_choice)
        if constrain:
            ids, info, run = decode_fast(self, tools, request, max_new_tokens, tool_choice)
        elif tool_choice != "auto" or top_logprobs is not None:
            raise ValueError("tool_choice other than auto, and logprobs, need constrained decoding")
        else:
            ids = self.generate(self.encode_prompt(tools, request), max_new_tokens)
        text = self.sp.decode(ids)
        result = {"text": text, "tokens": len(ids), "confidence": info["confidence"],
                  "truncated": info["truncated"], "dead_end": info.get("dead_end", False),
                  "calls": [], "reason": None, "valid": False, "error": None,
                  "retrieved": [t["name"] for t in tools] if given is not None and len(tools) < len(given) else None}
        if top_logprobs is not None:
            result["logprobs"] = run.logprobs(ids, top_logprobs)
        result["latency_ms"] = 1000 * (time.perf_counter() - t0)
        try:
            parsed = wire.parse_answer(text, tools)
        except wire.AnswerError as e:
            result["error"] = f"unparseable: {e}"
            return result
        result.update(parsed)
        result["error"] = wire.validate_answer(parsed, tools)
        result["valid"] = result["error"] is None
        return result

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens=128, use_cache=True):
        """Unconstrained greedy decoding -> list of new token ids (ending at
        <|end|> if reached): the raw model. With the cache, the prompt runs once and
        each step feeds one token; without it, every step re-runs the whole sequence."""
        prefix, request = split_prompt(list(prompt_ids), self.meta["special_tokens"][wire.USER])
        max_new_tokens = self.budget(len(prompt_ids), max_new_tokens)
        run = _Pass(self, prefix, request, use_cache, prefix_cache=False)
        out = []
        while len(out) < max_new_tokens and (not out or out[-1] != self.end_id):
            out.append(int(run.logits().argmax()))
            run.add(out[-1:])
        return out

    def decode_reference(self, tools, request, max_new_tokens=128, tool_choice="auto"):
        """Constrained greedy decoding in its plainest form -> token ids (see decode_reference)."""
        return decode_reference(self, tools, request, max_new_tokens, tool_choice)

    def generate_constrained(self, tools, request, max_new_tokens=128, tool_choice="auto", **speedups):
        """decode_reference's answer, faster -> (token ids, info) (see decode_fast)."""
        ids, info, _ = decode_fast(self, tools, request, max_new_tokens, tool_choice, **speedups)
        return ids, info

    def tensor(self, ids):
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def decode(self, ids, cache, prompt=0, first=-1, aux=False):
        """GPT.decode on token ids: continue the cache with them (a prompt block:
        prompt=1 the catalogue, 2 the request) -> logits of the last position (V),
        or of positions first.. (n, V); with aux also the aux heads' logits."""
        return self.model.decode(self.tensor(ids), cache, prompt, first, aux)


def split_prompt(prompt_ids, user_id):
    """Prompt ids -> (prefix up to and including <|user|>, request)."""
    at = prompt_ids.index(user_id) + 1 if user_id in prompt_ids else 0
    return prompt_ids[:at], prompt_ids[at:]


# -----------------------------------------------------------------------------
# one decoding step, the same in every decoder

def step(ans, logits, choose=greedy):
    """One step of constrained decoding: the text the grammar fixes next (the rest
    of a name once only one fits, a special token that is the only one allowed,
    ...), else the only token allowed, else the choice among the allowed tokens
    (the grammar's, with its rule on values: grammar.Spans) from the
    model's logits. logits() gives the next-token logits (V); it is called only
    for a choice, so a decoder may put off running the model until then.
    -> (tokens, the choice's probability under the constrained distribution, or
    1.0 when nothing was chosen), or None at a dead end (nothing allowed)."""
    toks = ans.forced()
    if toks is not None:
        return toks, 1.0
    toks = ans.asks_for(logits)
    if toks is not None:
        return toks, 1.0
    allowed = ans.allowed(logits)
    if len(allowed) <= 1:
        return ([int(allowed[0])], 1.0) if len(allowed) else None
    scores = logits()[allowed]
    j = choose(scores, allowed, ans.out)
    if ans.unwanted(logits, int(allowed[j])):
        return [DROP], 1.0
    return [int(allowed[j])], float(F.softmax(scores, dim=-1)[j])


# -----------------------------------------------------------------------------
# the decoders: the plain reference and the fast one (same tokens)

def begin(router, tools, request, max_new_tokens, tool_choice):
    """What every constrained decoder starts from -> (tools, grammar, prefix
    ids, request ids, token budget)."""
    tools = router.tools_for(tools)
    prefix, request_ids = router.encode_prefix(tools), router.encode_request(request)
    budget = router.budget(len(prefix) + len(request_ids), max_new_tokens)
    return tools, router.grammar(tools, tool_choice), prefix, request_ids, budget


@torch.inference_mode()
def decode_reference(router, tools, request, max_new_tokens=128, tool_choice="auto"):
    """Constrained greedy decoding in its plainest form -> token ids. Run the
    prompt once (KV cache); the heads' answer, if it stands (heads.py), is
    the answer. Otherwise, until the grammar says the answer is complete,
    take one step (see step) from the model's logits, feed what was written,
    repeat. Then settle: calls without ground go, a decline may ask for a value
    (settle). generate_constrained gives the same tokens in fewer, cheaper
    passes (tests check, token for token)."""
    tools, g, prefix, request_ids, budget = begin(router, tools, request, max_new_tokens, tool_choice)
    cfg = router.model.config
    cache = KVCache(cfg, 1, cfg.block_size, router.device)
    router.decode(prefix, cache, prompt=1)
    logits = router.decode(request_ids, cache, prompt=2, aux=router.heads is not None)
    ans = _Answer(router, g, request, request_ids)
    if router.heads is not None:
        logits, *aux = logits
        if router.heads.answer(aux, ans, tools, budget)[1] is not None:
            return settle(router, ans, ans.out, tools, budget, tool_choice)
    while not ans.done():
        ans.may_end()                                     # note where the answer could close
        chosen = step(ans, lambda: logits, router.choose)
        if chosen is None or len(ans.out) + len(chosen[0]) > budget:    # a dead end, out of tokens
            return settle(router, ans, ans.cut(budget), tools, budget, tool_choice)
        ans.push(chosen[0])
        if not ans.done():
            logits = router.decode(chosen[0], cache)
    if tool_choice == "auto" and ans.says_missing_what_it_found():     # a call after all (decode_fast)
        return decode_reference(router, tools, request, max_new_tokens, "required")
    return settle(router, ans, ans.out, tools, budget, tool_choice)


@torch.inference_mode()
def decode_fast(router, tools, request, max_new_tokens=128, tool_choice="auto", use_cache=True,
                forced_spans=True, prefix_cache=True, speculate=True, draft=True):
    """decode_reference's answer, faster -> (token ids, info, the _Pass (for logprobs)).
    info: confidence, forward passes, truncated (the token budget ran out and
    the answer was cut back to its last complete point), dead_end.
    What is faster (each can be switched off; utils/bench_latency.py times them):
        prefix_cache  the catalogue's KV cache is kept across requests (_Pass)
        forced_spans  tokens the grammar fixes, and tokens that are the only
                      ones allowed, are not run one pass each: they wait
                      (pending) and run in one pass with the next free choice
        speculate     copy speculation: guesses of a value's next tokens from
                      the request, verified in one pass (propose, verify)
        draft         the heads' draft (heads.py), when it is not the answer
                      itself, is verified as a guess of the whole answer
    use_cache=False re-runs the whole sequence every pass (the slowest check).
    tool_choice: auto | none | required | a tool's name (see grammar.Grammar)."""
    tools, g, prefix, request_ids, budget = begin(router, tools, request, max_new_tokens, tool_choice)
    fast = use_cache and forced_spans         # guesses need the cache and pending tokens
    run = _Pass(router, prefix, request_ids, use_cache, prefix_cache, aux=router.heads is not None)
    ans, conf, guess = _Answer(router, g, request, request_ids), 1.0, []

    def finish(truncated, dead_end=False):
        ids = settle(router, ans, ans.cut(budget) if truncated else ans.out, tools, budget, tool_choice)
        return ids, {"confidence": conf, "passes": run.passes, "truncated": truncated, "dead_end": dead_end}, run

    if router.heads is not None:
        guess, heads_conf = router.heads.answer(run.aux, ans, tools, budget)
        if heads_conf is not None:            # the heads' answer stands: no decoder pass at all
            conf = heads_conf
            return finish(False)
        guess = guess if draft and fast else []
    while not ans.done():
        ans.may_end()
        if not guess and speculate and fast and run.stale:
            guess = propose(ans, k=min(8, budget - len(ans.out), run.room()))
        guess = guess[:max(0, run.room())]        # never past the context
        if guess:
            conf = verify(run, guess, ans, conf, budget, router.choose)
            guess = []
            continue
        chosen = step(ans, run.logits, router.choose)
        if chosen is None:                      # a grammar bug; answer validly all the same
            return finish(True, dead_end=True)
        toks, p = chosen
        conf = min(conf, p)
        if len(ans.out) + len(toks) > budget:
            return finish(True)
        ans.push(toks)
        run.add(toks, one_pass_each=not forced_spans and not ans.done())
    if tool_choice == "auto" and ans.says_missing_what_it_found():
        # "missing argument: city" for "will it rain in Izmir tomorrow night?", the city
        # tagged: the request holds the value, so it is a call; decoded again as one
        return decode_fast(router, tools, request, max_new_tokens, "required", use_cache, forced_spans,
                           prefix_cache, speculate, draft)
    return finish(False)


def settle(router, ans, ids, tools, budget, tool_choice="auto"):
    """The decoded answer's last word (a catalogue in the prompt): the calls
    the request gives no ground for dropped (ground), and a decline (the
    decoder's, or ground's) that asks for no value, when the intent head's tool
    needs one the tagger found no run for, asks for it if it fits the budget
    (heads.Heads.asks_for: "what's the weather like" -> "missing argument: city",
    not "no tool fits") -> token ids."""
    ids = ground(router, ids, tools, ans.request, tool_choice)
    if ans.ask and len(ans.ask) <= budget and ids and ids[0] == router.nocall_id and \
            wire.reason_kind(router.sp.decode(ids[1:-1]).strip()) != "missing argument":
        return list(ans.ask)
    return ids


def ground(router, ids, tools, request, tool_choice="auto"):
    """A catalogue in the prompt: an answer's calls without the ones the request
    gives no ground for -> token ids. A call has ground when one of its values is
    held to the request's words (grammar.Spans: a plain string, strings in a list,
    a number the request states; without such data, any value but a boolean or
    an enum's member), or when the request shares a word with its tool's name,
    description, parameters or enum members (retrieve.Index: BM25 above 0, stop
    words aside).
    The model otherwise fills a call from nothing but the schema: "sign me up for
    the 10K race" -> get_notifications(unread_only=true, platform="X"). An answer
    left with no call is the decline "no tool fits". Only with tool_choice auto
    (a call the client requires is made). (A tool that takes no
    arguments, asked for in words none of its own share, is lost:
    "what are the big stories this morning" -> get_top_headlines().)"""
    if router.catalogue is not None or not router.grounded or tool_choice != "auto" or not ids \
            or ids[0] != router.call_id:
        return ids
    at = [i for i, t in enumerate(ids) if t == router.call_id] + [len(ids) - (ids[-1] == router.end_id)]
    parts = [ids[a:b] for a, b in zip(at, at[1:])]
    held = router.spans_of(tools) if router.span_every else None

    def from_request(name, key, value):
        if held is not None:
            return (name, key) in held
        p = next((t["parameters"].get("properties", {}) for t in tools if t["name"] == name), {}).get(key) or {}
        return not isinstance(value, bool) and "enum" not in p and "enum" not in (p.get("items") or {})

    def related(name):                     # (the index only when a call needs it)
        index = remember(router.grounds, json.dumps(tools, sort_keys=True), lambda: retrieve.Index(tools), 32)
        return dict(zip([t["name"] for t in tools], index.scores(request))).get(name, 1.0) > 0

    def has_ground(part):
        try:
            call = wire.parse_answer(router.sp.decode(part), tools)["calls"][0]
        except (wire.AnswerError, IndexError):
            return True                    # (not ours to judge: validation reports it)
        return any(from_request(call["name"], k, v) for k, v in call["arguments"].items()) or related(call["name"])

    kept = [p for p in parts if has_ground(p)]
    if len(kept) == len(parts):
        return ids
    return [t for p in kept for t in p] + [router.end_id] if kept else list(router.decline_ids)


# -----------------------------------------------------------------------------
# speculation: guessed tokens verified in one pass

def propose(ans, k=8):
    """Copy speculation (prompt lookup, Saxena 2023): guess the next tokens of a
    value as what followed the last answer token (the last two, if they match)
    in the request; only tokens the grammar takes."""
    request_ids, out = ans.request_ids, ans.out
    if k <= 0 or ans.state.phase != "value" or not out or out[-1] not in request_ids:
        return []
    spots = [j for j, t in enumerate(request_ids) if t == out[-1]]
    two = [j for j in spots if j > 0 and len(out) > 1 and request_ids[j - 1] == out[-2]]
    j = (two or spots)[0]
    guess, s = [], ans.state
    for t in request_ids[j + 1:j + 1 + k]:
        s = ans.r.vocab.advance(ans.g, s, t)
        if s is None:
            break
        guess.append(t)
    return guess


def verify(run, guess, ans, conf, budget, choose=greedy):
    """Run guessed answer tokens in one pass with what is pending, and keep each
    while it is what the step would have written anyway from the model's logits
    at that point: the output is unchanged, in fewer passes. Guesses are copy
    speculation (propose) or a whole drafted answer (heads.py). Pushes the kept
    tokens onto ans -> the confidence after them; run.logits() is then the next logits."""
    rows = run.feed_with_guess(guess)     # rows[i]: logits after pending + guess[:i]
    i = 0
    while i < len(guess) and not ans.done():
        if i:
            ans.may_end()
        chosen = step(ans, lambda: rows[i], choose)
        if chosen is None or guess[i:i + len(chosen[0])] != chosen[0] or len(ans.out) + len(chosen[0]) > budget:
            break
        conf = min(conf, chosen[1])
        ans.push(chosen[0])
        i += len(chosen[0])
    run.keep_guess(i, guess, rows[i])
    return conf


# -----------------------------------------------------------------------------
# the model side of the fast decoder: KV cache, prefix cache, forced spans

class _Pass:
    """The model side of one decode: the KV cache (the catalogue's part kept
    across requests with prefix_cache), the tokens chosen but not yet run
    through the model (pending: forced spans wait for the next choice and run in
    the same pass), the logits after the last token run, and the number of
    forward passes. use_cache=False re-runs the whole sequence every pass."""

    def __init__(self, router, prefix, request_ids, use_cache, prefix_cache, aux=False):
        self.r, self.use_cache, self.pending, self.passes = router, use_cache, [], 1
        self.stale = False    # chosen tokens since _last was computed
        self.n_prefix, self.n_request = len(prefix), len(request_ids)
        self.aux = None       # the aux heads' logits of the request (aux=True)
        self.seq = prefix + request_ids       # what the uncached passes run
        cfg = router.model.config
        if use_cache or aux:  # (the uncached check still takes the heads from a prompt pass)
            self.cache = self._prefix_cache(prefix) if prefix_cache else None
            if self.cache is None:
                self.cache = KVCache(cfg, 1, cfg.block_size, router.device)
                if prefix:                    # (generate's raw prompt may lack <|user|>)
                    router.decode(prefix, self.cache, prompt=1)
            out = router.decode(request_ids, self.cache, prompt=2, aux=aux)
            self._last, *aux_out = out if aux else (out,)
            self.aux = aux_out or None
            self.prompt_mark = self.cache.pos, self.cache.last_k.clone(), self.cache.n_src
        if not use_cache:
            self._last = self._uncached()
        self.first = self._last               # the logits after the prompt

    def _prefix_cache(self, prefix):
        """The prefix cache: a KV cache holding the catalogue's part, kept for the
        last 4 catalogues, rewound to its end (what a previous request appended is
        overwritten as this one runs; smeared keys also need the last raw key back)."""
        r, cfg = self.r, self.r.model.config

        def make():
            cache = KVCache(cfg, 1, cfg.block_size, r.device)
            r.decode(prefix, cache, prompt=1)
            return cache, cache.last_k.clone(), cache.n_src
        cache, last_k, n_src = remember(r.prefixes, tuple(prefix), make, 4)
        cache.rewind(len(prefix), last_k, n_src)
        return cache

    def _uncached(self, first=-1):
        """Logits of the last position of seq (or of positions first..), run whole
        (no cache), with the same prompt blocks as a cached run."""
        seg = [1] * self.n_prefix + [2] * self.n_request + [0] * (len(self.seq) - self.n_prefix - self.n_request)
        out = self.r.model(self.r.tensor(self.seq), seg=self.r.tensor(seg))[0]
        return out[-1] if first == -1 else out[first:]

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
            self._last = self.r.decode(ids, self.cache)
        else:
            self.seq = self.seq + ids
            self._last = self._uncached()

    def feed_with_guess(self, guess):
        """Run pending + guess in one pass -> logits rows: rows[i] is what comes
        after pending + guess[:i] (len(guess) + 1 rows)."""
        self.passes += 1
        self._mark = self.cache.pos, self.cache.last_k.clone(), self.cache.n_src
        if not self.pending:              # the logits before the first guess are the last ones
            return torch.cat([self._last[None], self.r.decode(guess, self.cache, first=0)])
        return self.r.decode(self.pending + guess, self.cache, first=len(self.pending) - 1)

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

    @torch.inference_mode()
    def logprobs(self, ids, k):
        """The decoder's own log-probabilities of answer ids (the whole vocabulary,
        no grammar mask): the logits after the prompt, then one pass of the answer
        over the prompt's cache (or the whole sequence, uncached) -> per token
        (id, log-probability, the k likeliest [(id, log-probability)]). One pass
        also covers an answer the heads gave without running the decoder."""
        if not ids:
            return []
        if self.use_cache:
            self.cache.rewind(*self.prompt_mark)
            rest = self.r.decode(ids[:-1], self.cache, first=0) if len(ids) > 1 else None
        else:
            self.seq = self.seq[:self.n_prefix + self.n_request] + ids[:-1]
            rest = self._uncached(first=self.n_prefix + self.n_request) if len(ids) > 1 else None
        rows = self.first[None] if rest is None else torch.cat([self.first[None], rest])    # (len(ids), V)
        logp = torch.log_softmax(rows.float(), dim=-1)
        chosen = logp.gather(1, torch.tensor(ids, device=logp.device)[:, None])[:, 0].tolist()
        top = logp.topk(k, dim=-1) if k else None
        return [(t, chosen[j], list(zip(top.indices[j].tolist(), top.values[j].tolist())) if k else [])
                for j, t in enumerate(ids)]


# -----------------------------------------------------------------------------
# the answer being written

class _Answer:
    """The answer being written: its tokens, the grammar state after them (which
    knows the request: values of span keys are runs of its whole words, see
    grammar.Spans), and where it could end (for a cut)."""

    def __init__(self, router, g, request, request_ids):
        self.r, self.g, self.request, self.request_ids = router, g, request, request_ids
        self.state, self.out, self.ends = g.start(request), [], []
        self.calls = []        # [where its <|call|> is in out, state before it] of each call
        self.found = []        # the values the heads tagged in the request (heads.py)
        self.found_keys = []   # the same as (argument, value, its call's tool or None) (a compiled model's)
        self.hushed = []       # where no untagged value may begin: words the tagger is sure are none (heads.py)
        self.blocked = (0, -1)   # (how many were unused, answer length) when last kept from ending
        self.must_call = False   # the heads say the request is a call (heads.Heads.draft)
        self.must_decline = False   # ... or that it is no call
        self.intent = None       # the tool a pointer model's intent head names (heads.Heads.draft)
        self.ask = None          # ... and the decline asking for a value it needs, none tagged (heads.Heads.asks_for)

    def done(self):
        return self.state.phase == "done"

    def may_end(self):
        """Note that the answer could close here (for a cut when tokens run out)."""
        if self.g.step(self.state, wire.END) is not None:
            self.ends.append(len(self.out))

    def push(self, toks):
        """Write tokens. A call is never written twice: when a call closes
        (<|call|> or <|end|> after it) as one of the answer's earlier calls (the
        same tool and arguments, in any order), it is taken back and the answer
        ends there (a model that repeats a call has nothing more to ask; it would
        otherwise repeat it to the token budget)."""
        if toks == [DROP]:                     # step: a later call the model would not fill
            self.end_before_last_call()
            return
        if toks and toks[0] == self.r.nocall_id and self.state.phase == "name":    # asks_for: a decline
            del self.out[self.calls[0][0]:]
            self.state, self.calls = self.calls[0][1], []
        for t in toks:
            if t in (self.r.call_id, self.r.end_id) and self.calls and self.state.phase in ("name", "value"):
                at = self.calls[-1][0]
                mine = self.call_key(self.out[at:])
                if any(self.call_key(self.out[a:b]) == mine for (a, _), (b, _) in zip(self.calls, self.calls[1:])):
                    self.end_before_last_call()
                    return
            if t == self.r.call_id:
                self.calls.append([len(self.out), self.state])
            s = self.r.vocab.advance(self.g, self.state, t)
            assert s is not None, "the grammar rejected a token it allowed"
            self.state = s
            self.out.append(t)

    def says_missing_what_it_found(self):
        """Is the answer a compiled model's decline for a missing argument whose
        value the tagger found in the request (Router.found_not_missing)?"""
        if not self.r.found_not_missing or not self.found_keys or not self.out or self.out[0] != self.r.nocall_id:
            return False
        reason = self.r.sp.decode(self.out[1:-1]).strip()
        return reason.startswith(wire.REASON_MISSING) and \
            reason[len(wire.REASON_MISSING):] in {k for k, _, _ in self.found_keys}

    def end_before_last_call(self):
        """Take back the call being written (from its <|call|> on) and end the answer there."""
        at, before = self.calls.pop()
        del self.out[at:]
        self.state = self.r.vocab.advance(self.g, before, self.r.end_id)
        self.out.append(self.r.end_id)

    def unwanted(self, logits, tok):
        """Is tok, the step's choice inside a text value of a compiled model's
        second or later call, one the model would not write: not its likeliest
        token and given less than min_value_p, in a value no tagged run holds
        (the tagger found none left for its key, so the grammar lets it copy any
        request words not taken yet: grammar.Spans.took)? Then the call is not
        made: step takes it back and the answer ends (push). A call the request
        does not ask for is what it stops ("save Elena Ward, number is 691-742-9377"
        -> a second add_contact(name="Number", phone="is") once the phone is taken);
        numbers are left alone, being often converted from words the model spells
        its own way."""
        s = self.state
        if not self.r.min_value_p or s.phase != "value" or s.calls < 2 or self.r.catalogue is None or \
                s.spans is None or s.spans.at(s.key, s.tool) in s.spans.runs or s.key not in self.g.tools[s.tool]["texts"]:
            return False
        p = F.softmax(logits().float(), dim=-1)
        return float(p[tok]) < self.r.min_value_p and int(p.argmax()) != tok

    def uncalled(self):
        """The tools a tagged run no value took is surely of (grammar.Spans.waiting,
        Router.tools_per_run) that no call of the answer names yet, that a call
        can name (not grammar.Grammar.blocked), and whose required copied values
        all wait in runs held for them."""
        s, names = self.state, self.r.meta.get("tool_tokens")
        if s.spans is None or not s.spans.by_tool or not names:
            return set()
        called = {self.out[a + 1] for a, _ in self.calls if a + 1 < len(self.out)}
        # (a tool whose required copied values are not all among them is no call to
        # make: "Randomize and play my ... playlist" -> add_song_to_playlist(song="Randomize"))
        blocked = self.g.blocked(s.spans)[0]
        return {t for t in s.spans.waiting() if names.get(t.decode()) not in called and t in self.g.tools and
                t not in blocked and self.g.tools[t]["required"] & self.g.tools[t]["spans"] <=
                {k for u, k in s.spans.runs if u == t and s.spans.left((u, k))}}

    def call_key(self, toks):
        """A call's tokens -> (its tool's text, the set of its arguments' texts): the
        same for the same call whatever order its arguments were written in."""
        parts = [[]]
        for t in toks:
            if t == self.r.arg_id:
                parts.append([])
            else:
                parts[-1].append(t)
        text = self.r.sp.decode
        return text(parts[0]).strip(), frozenset(text(p).strip() for p in parts[1:])

    def asks_for(self, logits):
        """A compiled model's first call, when the tool it rates highest needs a
        value the request does not hold (a required number and no number stated:
        "snooze the alarm"; grammar.Grammar.blocked): the grammar would not let it
        write that call, so the answer asks for the value instead, as the data
        answers such requests -> the tokens of that decline, or None."""
        s, names = self.state, self.r.meta.get("tool_tokens")
        if not names or s.phase != "name" or s.text or s.calls != 1 or self.g.choice != "auto":
            return None                    # (a call the client or the heads require does not ask)
        blocked, dead = self.g.blocked(s.spans)
        if not blocked:
            return None
        tools = [n for n in self.g.tools if n.decode() in names]
        scores = logits()[[names[n.decode()] for n in tools]]
        best = tools[int(scores.argmax())]
        if best not in blocked:
            return None
        key = sorted(dead[best] & self.g.tools[best]["required"])[0]
        reason = self.r.vocab.encode_text((wire.REASON_MISSING + key).encode())
        return [self.r.nocall_id] + reason + [self.r.end_id]

    def cut(self, budget):
        """Out of tokens: the answer up to its last complete point that leaves
        room for <|end|> within the budget, or a decline."""
        fits = [e for e in self.ends if e < budget]
        if fits:
            return self.out[:fits[-1]] + [self.r.end_id]
        return list(self.r.decline_ids)

    def forced(self):
        """Token ids for the text the grammar determines next, or None."""
        text = self.g.determined_text(self.state)
        if not text:
            return None
        ids = self.r.vocab.encode_text(text)
        if not ids:
            return None
        s = self.state
        for t in ids:                      # a tokenization the grammar would not take
            s = self.r.vocab.advance(self.g, s, t)    # (it always should) leaves the choice to the model
            if s is None:
                return None
        return ids

    def allowed(self, logits=None):
        """Token ids the step may take: the grammar's (span values included). A
        call answer may not end while a value the heads tagged in the request is
        in none of its calls (every call found: a second or third call is not
        dropped while its values wait in the request), unless a compiled model
        gives <|end|> at least Router.end_sure among those ids (logits(): the
        step's logits), so that a stray tagged word opens no call of its own
        ("randomize and play my Blood Window playlist" -> cancel_event(title=
        "randomize")). (With a catalogue in the prompt the same rule lost: its ends
        cut calls short of optional values the pointer heads found, docs/results.md.)
        A second or third call of a compiled model is of a tool that takes one
        of the values still waiting, when some are. With runs held per tool
        (Router.tools_per_run), a run surely of a tool no call names yet keeps the
        answer open even then (uncalled, Router.call_waiting): the tags found
        that call ("play the album Abbey Road and turn off the kitchen lights")."""
        allowed = self.r.vocab.allowed(self.g, self.state)
        if self.found_keys and self.state.phase == "name" and not self.state.text and self.state.calls > 1 \
                and self.r.cover_found:
            text = self.r.sp.decode(self.out)
            waiting = [(k, t) for k, v, t in self.found_keys if v not in text]
            names = self.r.meta.get("tool_tokens", {})
            ids = [names[t["name"]] for t in self.g.tools.values() if t["name"] in names and any(
                k in t["args"] and u in (None, t["name"]) for k, u in waiting)]
            keep = torch.isin(allowed, torch.tensor(ids, dtype=allowed.dtype))
            if keep.any():
                allowed = allowed[keep]
        if self.found and self.state.calls and self.r.cover_found:
            end = allowed == self.r.end_id
            if end.any() and self.r.call_waiting and bool((allowed == self.r.call_id).any()) and self.uncalled():
                return allowed[~end]
            if end.any() and len(allowed) > 1:
                text = self.r.sp.decode(self.out)
                left = sum(v not in text for v in self.found)
                # ... unless the calls since the last such moment placed none of them
                # (a tagged value no call takes would otherwise run on to the budget)
                if left and (left != self.blocked[0] or len(self.out) == self.blocked[1]) and not (
                        logits is not None and self.r.end_sure < 1 and self.r.catalogue is not None and
                        float(F.softmax(logits()[allowed].float(), -1)[end]) >= self.r.end_sure):
                    self.blocked = (left, len(self.out))
                    allowed = allowed[~end]
        return allowed


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
    p.add_argument("--retrieve_k", type=int, default=8,
                   help="a catalogue in the prompt longer than this: only its k tools most related "
                   "to the request (retrieve.py); 0 = all")
    args = p.parse_args(argv)
    if not args.request.strip():
        die("the request is empty")
    if args.retrieve_k < 0:
        die(f"--retrieve_k is a number of tools (0 = all), got {args.retrieve_k}")
    tools = None
    if args.tools:
        try:
            tools = wire.load_tools(args.tools)
        except wire.ToolError as e:
            die(str(e))
        if not tools:
            die(f"{args.tools}: the tool list is empty")
    try:
        router = Router(args.ckpt, args.data_dir, args.device, args.quantize, args.retrieve_k)
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
