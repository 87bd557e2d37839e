"""
Answer one request with a trained model: greedy decoding with a KV cache,
constrained so that the answer is always a valid call (or a no-call).

    python sample.py --ckpt out/demo/best.pt --tools data/demo/tools.json "Where's my order ORD-1234?"
    python sample.py --ckpt out/demo/best.pt --tools my_tools.json --json "turn off the porch light"
    python sample.py ... --no_constrain        # the raw model, which may answer anything
    python sample.py ... --quantize int8       # int8 weights for the linear layers (CPU)

Prints the call(s) as JSON, or the no-call reason; --json adds the confidence and
timing. --tools takes OpenAI function definitions or bare {name, description,
parameters} objects, as a JSON list. The tokenizer is the one in the checkpoint's
data dir (or --data_dir), and must be the one the checkpoint was trained with.

What makes it fast (each is measured in bench.py):
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
from model import KVCache, CheckpointError, check_tokenizer, load_checkpoint

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
        import sentencepiece as spm
        self.model, self.ckpt = load_checkpoint(ckpt_path, device)
        data_dir = data_dir or self.ckpt.get("data_dir", "")
        meta_path = os.path.join(data_dir, "meta.json")
        if not os.path.isfile(meta_path):
            raise CheckpointError(f"{data_dir}: no meta.json; pass the data dir the checkpoint "
                                  "was trained on with --data_dir")
        with open(meta_path, encoding="utf-8") as f:
            self.meta = json.load(f)
        check_tokenizer(self.ckpt, self.meta["tokenizer_sha256"], ckpt_path)
        self.sp = spm.SentencePieceProcessor(model_file=os.path.join(data_dir, "tok.model"))
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
        self.grammars = OrderedDict()      # catalogue -> Grammar, most recent last
        self.prefixes = OrderedDict()      # prefix token ids -> (KVCache, its last_k)

    # -- prompts and catalogues

    def encode_prefix(self, tools):
        """Token ids of <|tools|>...<|user|>: the part shared by every request to a catalogue."""
        return self.sp.encode(f"{wire.TOOLS}{wire.clean(wire.render_tools(tools))}{wire.USER}")

    def encode_prompt(self, tools, request):
        # the request follows a special token, so it is tokenized on its own either way
        return self.encode_prefix(tools) + self.sp.encode(wire.clean(request.strip()))

    def grammar(self, tools, tool_choice="auto"):
        key = json.dumps([tools, tool_choice], sort_keys=True)
        g = self.grammars.pop(key, None) or grammar.Grammar(tools, tool_choice)
        self.grammars[key] = g
        while len(self.grammars) > 32:
            self.grammars.popitem(last=False)
        return g

    def _prefill(self, prefix, rest, use_prefix_cache):
        """Run the prompt -> (cache, logits of its last position)."""
        cfg = self.model.config
        if not use_prefix_cache:
            cache = KVCache(cfg, 1, cfg.block_size, self.device)
            return cache, self._logits(prefix + rest, cache)
        key = tuple(prefix)
        entry = self.prefixes.pop(key, None)
        if entry is None:
            cache = KVCache(cfg, 1, cfg.block_size, self.device)
            self.model.hidden(self._tensor(prefix), cache)
            entry = (cache, cache.last_k.clone())
        self.prefixes[key] = entry
        while len(self.prefixes) > 4:
            self.prefixes.popitem(last=False)
        cache, last_k = entry
        # rewind to the end of the catalogue: what a previous request appended is
        # overwritten as this one runs (smeared keys also need the last raw key back)
        cache.pos = len(prefix)
        cache.last_k.copy_(last_k)
        return cache, self._logits(rest, cache)

    def _tensor(self, ids):
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def _logits(self, ids, cache=None):
        """Run ids (continuing the cache, if any) -> logits of the last position only:
        the vocabulary projection of the other positions would be thrown away."""
        return self.model.head(self.model.hidden(self._tensor(ids), cache)[0, -1])

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
        idx = self._tensor(prompt_ids)
        out = []
        if use_cache:
            cache = KVCache(model.config, 1, len(prompt_ids) + max_new_tokens, self.device)
            logits = model(idx, cache)                       # prefill: (1, T, V)
            for _ in range(max_new_tokens):
                nxt = int(logits[0, -1].argmax())
                out.append(nxt)
                if nxt == self.end_id:
                    break
                logits = model(self._tensor([nxt]), cache)
        else:
            for _ in range(max_new_tokens):
                logits = model(idx)
                nxt = int(logits[0, -1].argmax())
                out.append(nxt)
                if nxt == self.end_id:
                    break
                idx = torch.cat([idx, self._tensor([nxt])], dim=1)
        return out

    @torch.inference_mode()
    def generate_constrained(self, tools, request, max_new_tokens=128, use_cache=True,
                             forced_spans=True, prefix_cache=True, speculate=True, pick=None,
                             tool_choice="auto"):
        """Greedy decoding under the answer grammar -> (token ids, info).
        info: confidence, forward passes, truncated (the token budget ran out
        and the answer was cut back to its last complete point).
        use_cache / forced_spans / prefix_cache / speculate switch the speed-ups off
        one by one (the tokens are the same, bench.py times them). pick(logits, allowed ids,
        tokens so far) -> id replaces the argmax (bench.py follows a fixed answer).
        tool_choice: auto | none | required | a tool's name (see grammar.Grammar)."""
        g, vocab = self.grammar(tools, tool_choice), self.vocab
        prefix = self.encode_prefix(tools)
        rest = self.sp.encode(wire.clean(request.strip()))
        n_prompt = len(prefix) + len(rest)
        room = self.model.config.block_size - n_prompt
        if room < MIN_ANSWER_TOKENS:
            raise ValueError(f"prompt is {n_prompt} tokens; the model's context is "
                             f"{self.model.config.block_size}, which leaves too little room for an answer")
        budget = min(max_new_tokens, room)
        passes = 1
        if use_cache:
            cache, logits = self._prefill(prefix, rest, prefix_cache)
        else:
            seq = prefix + rest
            logits = self._logits(seq)

        out, pending = [], []       # tokens chosen; tokens not yet run through the model
        state, conf, end_at = g.start(), 1.0, None
        while state.phase != "done":
            if g.step(state, wire.END) is not None:
                end_at = len(out)                  # the answer could close here
            toks = self._forced(g, state)
            if toks is None:
                allowed = vocab.allowed(g, state)
                if len(allowed) == 0:              # a grammar bug; answer validly all the same
                    return self._cut(out, end_at), {"confidence": conf, "passes": passes,
                                                    "truncated": True, "dead_end": True}
                if len(allowed) == 1:
                    toks = [int(allowed[0])]
                else:
                    if pending:                    # the model must see them before it chooses
                        passes += 1
                        n_ok, guess = 0, []
                        if speculate and use_cache and forced_spans:
                            # no more guesses than the budget and the context leave room for
                            room = min(budget - len(out), self.model.config.block_size - cache.pos - len(pending))
                            guess = self._propose(rest, out, g, state, k=min(8, room))
                        if guess:
                            # Copy speculation (prompt lookup, Saxena 2023): values are mostly
                            # copied from the request, so the tokens that followed the last one
                            # there are fed in the same pass and kept while they are what the
                            # model would have chosen anyway; greedy output is unchanged.
                            start, last_k = cache.pos, cache.last_k.clone()
                            rows = self._logit_rows(pending + guess, cache, len(pending) - 1)
                            n_ok = 0
                            for i, t in enumerate(guess):
                                if len(out) >= budget:
                                    break
                                if g.step(state, wire.END) is not None:
                                    end_at = len(out)
                                allowed = vocab.allowed(g, state)
                                tok, p = self._choose(rows[i], allowed, out, pick)
                                if tok != t:
                                    break
                                conf, n_ok = min(conf, p), n_ok + 1
                                state = vocab.advance(g, state, t)
                                out.append(t)
                            logits = rows[n_ok]
                            if n_ok == len(guess):
                                pending = []
                            else:                  # forget the rejected guesses: the kept ones
                                cache.pos = start  # run again with the next token, same pass count
                                cache.last_k.copy_(last_k)
                                pending = pending + guess[:n_ok]
                        elif use_cache:
                            logits, pending = self._logits(pending, cache), []
                        else:
                            seq += pending
                            logits, pending = self._logits(seq), []
                        if guess and n_ok:         # the state moved on: what is allowed now
                            if g.step(state, wire.END) is not None:
                                end_at = len(out)
                            allowed = vocab.allowed(g, state)
                    tok, p = self._choose(logits, allowed, out, pick)
                    conf = min(conf, p)
                    toks = [tok]
            if len(out) + len(toks) > budget:
                out = self._cut(out, end_at)
                return out, {"confidence": conf, "passes": passes, "truncated": True, "dead_end": False}
            for t in toks:
                state = vocab.advance(g, state, t)
                assert state is not None, "the grammar rejected its own forced tokens"
            out += toks
            pending += toks
            if not forced_spans and state.phase != "done":
                for t in pending:                  # one forward pass per token
                    passes += 1
                    if use_cache:
                        logits = self._logits([t], cache)
                    else:
                        seq.append(t)
                        logits = self._logits(seq)
                pending = []
        return out, {"confidence": conf, "passes": passes, "truncated": False, "dead_end": False}

    def _choose(self, logits, allowed, out, pick):
        """The greedy choice among the allowed tokens -> (token id, its probability
        under the constrained distribution); pick (bench.py) may override the argmax."""
        sub = logits[allowed]
        j = int(sub.argmax()) if pick is None else int((allowed == pick(logits, allowed, out)).nonzero()[0])
        return int(allowed[j]), float(F.softmax(sub, dim=-1)[j])

    def _propose(self, request_ids, out, g, state, k=8):
        """Guess the next tokens of a value: what followed the last answer token
        (the last two, if they match) in the request; only tokens the grammar takes."""
        if state.phase != "value" or not out or out[-1] not in request_ids:
            return []
        spots = [j for j, t in enumerate(request_ids) if t == out[-1]]
        two = [j for j in spots if j > 0 and len(out) > 1 and request_ids[j - 1] == out[-2]]
        j = (two or spots)[0]
        guess, s = [], state
        for t in request_ids[j + 1:j + 1 + k]:
            s = self.vocab.advance(g, s, t)
            if s is None:
                break
            guess.append(t)
        return guess

    def _logit_rows(self, ids, cache, first):
        """Run ids through the model (continuing the cache) -> logits of positions first.. ."""
        return self.model.head(self.model.hidden(self._tensor(ids), cache)[0, first:])

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

    def _cut(self, out, end_at):
        """Out of tokens: keep the answer up to its last complete point, or decline."""
        if end_at is not None:
            return out[:end_at] + [self.end_id]
        reason = self.sp.encode(wire.REASON_NO_TOOL)
        return [self.nocall_id] + reason + [self.end_id]

    def answer(self, tools, request, max_new_tokens=128, constrain=True, tool_choice="auto"):
        """-> dict: calls, reason, valid, error, text, tokens, latency_ms,
        confidence (None unconstrained), truncated. tool_choice needs constrain."""
        if not request or not request.strip():
            raise ValueError("empty request")
        t0 = time.perf_counter()
        info = {"confidence": None, "truncated": False}
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("request", help="the user's request, in quotes")
    p.add_argument("--ckpt", default="out/demo/best.pt")
    p.add_argument("--tools", default="data/demo/tools.json", help="JSON list of tool definitions")
    p.add_argument("--data_dir", default=None, help="default: the one recorded in the checkpoint")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the full result as one JSON object")
    p.add_argument("--no_constrain", action="store_true", help="the raw model, without the answer grammar")
    p.add_argument("--quantize", choices=["int8"], default=None, help="int8 linear layers (CPU)")
    args = p.parse_args(argv)

    def die(msg):
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)

    if not args.request.strip():
        die("the request is empty")
    try:
        tools = wire.load_tools(args.tools)
    except wire.ToolError as e:
        die(str(e))
    if not tools:
        die(f"{args.tools}: the tool list is empty")
    try:
        router = Router(args.ckpt, args.data_dir, args.device, args.quantize)
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
