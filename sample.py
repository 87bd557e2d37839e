"""
Answer one request with a trained model: greedy decoding with a KV cache.

    python sample.py --ckpt out/demo/best.pt --tools data/demo/tools.json "Where's my order ORD-1234?"
    python sample.py --ckpt out/demo/best.pt --tools my_tools.json --json "turn off the porch light"

Prints the call(s) as JSON, or the no-call reason. --tools takes OpenAI function
definitions or bare {name, description, parameters} objects, as a JSON list.
The tokenizer is the one in the checkpoint's data dir (or --data_dir), and must
be the one the checkpoint was trained with.
"""

import argparse
import json
import os
import sys
import time

import torch

import wire
from model import KVCache, CheckpointError, check_tokenizer, load_checkpoint


class Router:
    """A loaded model + tokenizer that turns (tools, request) into an answer."""

    def __init__(self, ckpt_path, data_dir=None, device="cpu"):
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
        ids = self.meta["special_tokens"]
        self.end_id, self.call_id, self.nocall_id = ids[wire.END], ids[wire.CALL], ids[wire.NOCALL]

    def encode_prompt(self, tools, request):
        return self.sp.encode(wire.render_prompt(tools, request))

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens=128, use_cache=True):
        """Greedy decoding -> list of new token ids (ending at <|end|> if reached).
        With the cache, the prompt runs once and each step feeds one token;
        without it, every step re-runs the whole sequence (for tests and timing)."""
        model = self.model
        budget = model.config.block_size - len(prompt_ids)
        if budget <= 0:
            raise ValueError(f"prompt is {len(prompt_ids)} tokens; the model's context is "
                             f"{model.config.block_size}")
        max_new_tokens = min(max_new_tokens, budget)
        idx = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        out = []
        if use_cache:
            cache = KVCache(model.config, 1, len(prompt_ids) + max_new_tokens, self.device)
            logits = model(idx, cache)                       # prefill: (1, T, V)
            for _ in range(max_new_tokens):
                nxt = int(logits[0, -1].argmax())
                out.append(nxt)
                if nxt == self.end_id:
                    break
                logits = model(torch.tensor([[nxt]], device=self.device), cache)
        else:
            for _ in range(max_new_tokens):
                logits = model(idx)
                nxt = int(logits[0, -1].argmax())
                out.append(nxt)
                if nxt == self.end_id:
                    break
                idx = torch.cat([idx, torch.tensor([[nxt]], device=self.device)], dim=1)
        return out

    def answer(self, tools, request, max_new_tokens=128):
        """-> dict: calls, reason, valid, error, text, tokens, latency_ms."""
        if not request or not request.strip():
            raise ValueError("empty request")
        t0 = time.perf_counter()
        ids = self.generate(self.encode_prompt(tools, request), max_new_tokens)
        text = self.sp.decode(ids)
        latency = 1000 * (time.perf_counter() - t0)
        result = {"text": text, "tokens": len(ids), "latency_ms": latency,
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
        router = Router(args.ckpt, args.data_dir, args.device)
        result = router.answer(tools, args.request, args.max_new_tokens)
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
