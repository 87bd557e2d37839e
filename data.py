"""
Build a training set: tool catalogue -> examples -> sentencepiece tokenizer -> token files.

    python data.py                                  # data/demo, ~20k examples, ~1 min on a laptop CPU
    python data.py --out_dir data/big --n_train 200000 --vocab_size 8192

Writes to --out_dir:
    tools.json                 the whole catalogue (bare {name, description, parameters} form)
    {train,val,test}.jsonl     examples: tools, request, calls, reason, kind, split
    tok.model, tok.vocab       sentencepiece BPE with the special tokens as single pieces
    {split}.bin                uint16 token ids, all examples back to back
    {split}_mask.bin           uint8, 1 on answer tokens (where loss is computed)
    {split}_idx.npy            int64 offsets: example i is tokens[idx[i]:idx[i+1]]
    meta.json                  vocab size, special-token ids, counts, tokenizer hash, held-out tools

The test split has two parts: "seen" (tools that appear in training) and "unseen"
(a few tools held out of training entirely, not even shown as distractors).
Deterministic under --seed.
"""

import argparse
import io
import json
import os
import random
import sys

import numpy as np
from tqdm import tqdm

import wire
from model import file_sha256
from synth import Generator, load_catalogue, load_json

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="data/demo", help="where to write everything")
    p.add_argument("--catalogue", default=os.path.join(HERE, "assets", "catalogue.json"))
    p.add_argument("--values", default=os.path.join(HERE, "assets", "values.json"))
    p.add_argument("--n_train", type=int, default=20000, help="training examples")
    p.add_argument("--n_val", type=int, default=500)
    p.add_argument("--n_test", type=int, default=600, help="test examples over seen tools")
    p.add_argument("--n_test_unseen", type=int, default=300, help="test examples over held-out tools")
    p.add_argument("--n_heldout", type=int, default=5, help="tools held out of training")
    p.add_argument("--max_tools", type=int, default=6, help="most tools shown per example")
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--max_len", type=int, default=512, help="drop examples longer than this (tokens)")
    p.add_argument("--seed", type=int, default=1337)
    return p.parse_args(argv)


def die(msg):
    print(f"data.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


# -----------------------------------------------------------------------------
# examples

def choose_heldout(entries, n, rng):
    """n tools from n different domains, never seen in training."""
    domains = sorted({e["domain"] for e in entries})
    rng.shuffle(domains)
    held = []
    for d in domains[:n]:
        held.append(rng.choice([e for e in entries if e["domain"] == d]))
    return held


def generate(gen, rng, n, targets_pool, allowed, reserved, desc, split):
    """n distinct examples. Exact duplicates (same request, same tools) are removed
    within the split, and no request may repeat one in `reserved` (the requests of
    the splits made before: test, then val), so test requests never reach training.
    The split's own requests are added to `reserved` at the end."""
    out, seen, mine = [], set(), set()
    bar = tqdm(total=n, desc=desc, unit="ex", leave=False, disable=n < 2000)
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 20 * n + 1000:
            die(f"could only make {len(out)} distinct {desc} examples; lower the count")
        ex = gen.sample(rng, targets_pool, allowed)
        req = ex["request"].lower()
        key = (req, tuple(sorted(t["name"] for t in ex["tools"])))
        if req in reserved or key in seen:
            continue
        seen.add(key)
        mine.add(req)
        ex["split"] = split
        out.append(ex)
        bar.update(1)
    bar.close()
    reserved |= mine
    return out


# -----------------------------------------------------------------------------
# tokenizer and token files

def train_tokenizer(examples, tools, vocab_size, out_dir):
    """sentencepiece BPE as llama2.c trains it: byte_fallback (no unknown
    characters at sampling time), split_digits (numbers are copied digit by
    digit), identity normalisation (the text we decode is the text we encoded)."""
    import sentencepiece as spm
    texts = [wire.render_tool(t) for t in tools]
    texts += [wire.render_prompt(ex["tools"], ex["request"]) + wire.render_answer(ex["calls"], ex["reason"])
              for ex in examples]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, character_coverage=1.0,
        user_defined_symbols=wire.SPECIAL_TOKENS, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
        max_sentence_length=1 << 16, input_sentence_size=200000, shuffle_input_sentence=True,
        num_threads=os.cpu_count() or 1, minloglevel=2)
    path = os.path.join(out_dir, "tok.model")
    with open(path, "wb") as f:
        f.write(model.getvalue())
    sp = spm.SentencePieceProcessor(model_file=path)
    with open(os.path.join(out_dir, "tok.vocab"), "w", encoding="utf-8") as f:
        for i in range(sp.get_piece_size()):
            f.write(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n")
    return sp


def encode_example(sp, ex):
    """-> (token ids, loss mask). The answer is encoded separately so the mask
    boundary falls exactly on the first answer token."""
    prompt = sp.encode(wire.render_prompt(ex["tools"], ex["request"]))
    answer = sp.encode(wire.render_answer(ex["calls"], ex["reason"]))
    return prompt + answer, [0] * len(prompt) + [1] * len(answer)


def write_tokens(sp, examples, out_dir, split, max_len):
    """Token files for one split; examples over max_len are dropped and counted."""
    ids, mask, offsets, kept = [], [], [0], []
    for ex in examples:
        x, m = encode_example(sp, ex)
        if len(x) > max_len:
            continue
        ids.extend(x)
        mask.extend(m)
        offsets.append(len(ids))
        kept.append(ex)
    np.array(ids, dtype=np.uint16).tofile(os.path.join(out_dir, f"{split}.bin"))
    np.array(mask, dtype=np.uint8).tofile(os.path.join(out_dir, f"{split}_mask.bin"))
    np.save(os.path.join(out_dir, f"{split}_idx.npy"), np.array(offsets, dtype=np.int64))
    return kept, len(ids), np.diff(offsets)


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# -----------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    for path in (args.catalogue, args.values):
        if not os.path.isfile(path):
            die(f"{path}: no such file")
    if not 0 < args.vocab_size < 65536:
        die("--vocab_size must be between 1 and 65535 (tokens are stored as uint16)")
    try:
        entries = load_catalogue(args.catalogue)
        pools = load_json(args.values)
    except (ValueError, KeyError) as e:
        die(f"bad catalogue or value file: {e}")
    rng = random.Random(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)

    held = choose_heldout(entries, args.n_heldout, rng)
    held_names = {e["tool"]["name"] for e in held}
    seen = [e for e in entries if e["tool"]["name"] not in held_names]
    gen = Generator(entries, pools, max_tools=args.max_tools)
    print(f"catalogue: {len(entries)} tools over {len({e['domain'] for e in entries})} domains; "
          f"held out of training: {', '.join(sorted(held_names))}")

    # Test examples are made first and their requests reserved, so no training
    # request repeats a test request word for word.
    reserved = set()
    splits = {}
    splits["test"] = (generate(gen, rng, args.n_test, seen, seen, reserved, "test (seen)", "seen")
                      + generate(gen, rng, args.n_test_unseen, held, entries, reserved, "test (unseen)", "unseen"))
    splits["val"] = generate(gen, rng, args.n_val, seen, seen, reserved, "val", "seen")
    splits["train"] = generate(gen, rng, args.n_train, seen, seen, reserved, "train", "seen")

    print(f"training tokenizer (BPE, vocab {args.vocab_size}) ...")
    sp = train_tokenizer(splits["train"], [e["tool"] for e in entries], args.vocab_size, args.out_dir)
    special_ids = {t: sp.piece_to_id(t) for t in wire.SPECIAL_TOKENS}
    for t, i in special_ids.items():
        assert sp.encode(t) == [i], f"special token {t} is not a single piece"

    meta = {"vocab_size": sp.get_piece_size(), "special_tokens": special_ids,
            "tokenizer_sha256": file_sha256(os.path.join(args.out_dir, "tok.model")),
            "heldout_tools": sorted(held_names), "seed": args.seed, "args": vars(args), "splits": {}}
    for split, examples in splits.items():
        kept, n_tok, lens = write_tokens(sp, examples, args.out_dir, split, args.max_len)
        write_jsonl(os.path.join(args.out_dir, f"{split}.jsonl"), kept)
        kinds = {}
        for ex in kept:
            kinds[ex["kind"]] = kinds.get(ex["kind"], 0) + 1
        meta["splits"][split] = {"examples": len(kept), "dropped_too_long": len(examples) - len(kept),
                                 "tokens": n_tok, "tokens_p50": int(np.percentile(lens, 50)),
                                 "tokens_p95": int(np.percentile(lens, 95)), "kinds": kinds}
    with open(os.path.join(args.out_dir, "tools.json"), "w", encoding="utf-8") as f:
        json.dump([e["tool"] for e in entries], f, indent=1, ensure_ascii=False)
    with open(os.path.join(args.out_dir, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)

    print(f"wrote {args.out_dir}/ (vocab {meta['vocab_size']}, tokenizer {meta['tokenizer_sha256'][:12]})")
    for split, s in meta["splits"].items():
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(s["kinds"].items()))
        print(f"  {split:5s} {s['examples']:6d} examples {s['tokens']:9,d} tokens "
              f"(p50 {s['tokens_p50']}, p95 {s['tokens_p95']}, dropped {s['dropped_too_long']}): {kinds}")


if __name__ == "__main__":
    main()
