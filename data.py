"""
Build a training set: tool catalogue -> examples -> sentencepiece tokenizer -> token files.

    python data.py                                  # data/demo, ~20k examples, ~1 min on a laptop CPU
    python data.py --out_dir data/big --n_train 200000 --vocab_size 8192
    python data.py --tools my_tools.json --out_dir data/mine          # requests for your own tools
    python data.py --teacher gemini --teacher_model gemini-3.8-flash  # labels from a cloud model
    python data.py --import xlam.jsonl --import chats.jsonl           # add examples from datasets

Examples come from three kinds of tools: the hand-written catalogue
(assets/catalogue.json), tools invented from parts (invent.py; about half the
training targets), and, with --tools, yours. The generator knows the right
answer by construction; --teacher replaces it, for train and val, with a cloud
model's answer (teacher.py: cached, resumable, validated). Test answers always
stay the generator's, so the test measures against what the request says.

Writes to --out_dir:
    tools.json                 the whole catalogue (bare {name, description, parameters} form)
    {train,val,test}.jsonl     examples: tools, request, calls, reason, kind, split
    tok.model, tok.vocab       sentencepiece BPE with the special tokens as single pieces
    {split}.bin                uint16 token ids, all examples back to back
    {split}_mask.bin           uint8, 1 on answer tokens (where loss is computed)
    {split}_cls.bin            uint8 class of each token: 0 prompt, then wire.TOKEN_CLASSES
                               (struct, tool name, argument key, argument value, reason)
    {split}_idx.npy            int64 offsets: example i is tokens[idx[i]:idx[i+1]]
    {split}_group.npy          int64 group id per example: a group shares one tool list
    meta.json                  vocab size, special-token ids, counts, tokenizer hash, held-out tools
    invented_tools.json        the invented tools of this build
    data_card.json             statistics of the training split (also printed)

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

import formats
import grammar
import wire
from datadir import NO_CALL, SPAN_SHARE, span_keys, tag_moves, tag_names, write_jsonl, write_tokens
from model import file_sha256
from runtime import die
from invent import entry_from_tool, invent_tools
from synth import KIND_SHARES, Generator, count_value_classes, load_catalogue, load_json

HERE = os.path.dirname(os.path.abspath(__file__))
SWAP_COPIES = 10       # an intent/slot set's training rows again with other values of their slots (formats.swap_slot_values)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="data/demo", help="where to write everything")
    p.add_argument("--catalogue", default=os.path.join(HERE, "assets", "catalogue.json"))
    p.add_argument("--values", default=os.path.join(HERE, "assets", "values.json"))
    p.add_argument("--n_train", type=int, default=20000, help="training examples")
    p.add_argument("--n_val", type=int, default=500)
    p.add_argument("--n_test", type=int, default=600, help="test examples over seen tools")
    p.add_argument("--n_test_unseen", type=int, default=300, help="test examples over held-out tools")
    p.add_argument("--n_heldout", type=int, default=None,
                   help="tools held out of training (default: those marked heldout in the catalogue)")
    p.add_argument("--max_tools", type=int, default=10, help="most tools shown per example")
    p.add_argument("--long_share", type=float, default=0.0,
                   help="share of training examples with a long tool list (--max_tools+1 to --long_max_tools), "
                   "so that a model with a long context learns to use it")
    p.add_argument("--long_max_tools", type=int, default=30)
    p.add_argument("--n_invented", type=int, default=1500, help="tools invented from parts (0: none)")
    p.add_argument("--p_invented", type=float, default=0.5, help="share of training targets that are invented")
    p.add_argument("--tools", default=None, help="your own tools (JSON list, OpenAI or bare form): "
                   "generate requests for these instead of the hand-written catalogue")
    p.add_argument("--domains", default=None, metavar="A,B,...",
                   help="only these domains of the hand-written catalogue (e.g. shopping,food_delivery)")
    p.add_argument("--compiled", action="store_true",
                   help="a compiled catalogue: the tools (--tools, or the catalogue's --domains) are fixed and "
                   "learnt into the model, each name one token; the prompt is the request alone")
    p.add_argument("--val_phrasings", type=float, default=0.0,
                   help="compiled: this share of each tool's request templates held out of training for "
                   "a part of the val split (new phrasings to choose settings on, never the test's)")
    p.add_argument("--case_flips", type=float, default=0.1,
                   help="compiled: how often a training request flips the case of a word inside a sentence "
                   "(val and test keep synth.INNER_CASE, 1/30; demo val: 1/30 -> 0.1 +1.3 points)")
    p.add_argument("--multi_share", type=float, default=0.40,
                   help="compiled: the share of training examples drawn as 2-3 calls (the generator's default is "
                   "0.24; val and test keep it; demo val: 0.24 -> 0.40 +0.7 points, multi-call +3.0)")
    p.add_argument("--outside", type=int, default=1, choices=(0, 1),
                   help="compiled --domains: \"no tool fits\" training examples also ask for what the catalogue's "
                   "other domains do (\"book a ride to the airport\"; half of them, as the generator's own); 0: "
                   "its out-of-scope list alone (demo val, two seeds: no-call 94.2 -> 98.6%%)")
    p.add_argument("--heldout_phrasings", type=float, default=0.2,
                   help="--compiled: share of each tool's request templates kept for the test split only")
    p.add_argument("--intent_slot", default=None, metavar="DIR",
                   help="a compiled catalogue from an intent/slot folder in the ATIS format "
                   "({train,valid,test}.{seq.in,seq.out,label}): intents become tools, slots arguments")
    p.add_argument("--swap_copies", type=int, default=None,
                   help="--intent_slot: training rows added per training row with each slot's words swapped for "
                   "another value of the same slot type from training (default 10; ATIS valid at 7 min: "
                   "0 -> 4 -> 10 copies, sentence 87.4 -> 88.2 -> 88.6%%)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="JSONL",
                   help="add training examples from a JSONL dataset ({query, tools, answers} or OpenAI chat)")
    p.add_argument("--teacher", choices=["gemini", "openai"], default=None,
                   help="label train/val requests with a cloud model (default: the generator's answers)")
    p.add_argument("--teacher_model", default=None)
    p.add_argument("--teacher_base_url", default=None, help="endpoint (OpenAI-compatible servers, proxies)")
    p.add_argument("--teacher_api_version", default=None,
                   help="Gemini API version (default: v1beta, the one its requests are written for)")
    p.add_argument("--teacher_concurrency", type=int, default=4)
    p.add_argument("--teacher_rps", type=float, default=5.0, help="most requests started per second")
    p.add_argument("--teacher_cache", default=None, help="default: <out_dir>/teacher_cache.jsonl")
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--max_len", type=int, default=512, help="drop examples longer than this (tokens)")
    p.add_argument("--group", type=int, default=1,
                   help="training examples per shared tool list (for train.py --share_prefix; 1: none)")
    p.add_argument("--seed", type=int, default=1337)
    return p.parse_args(argv)


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


def generate(draw, sibling, n, reserved, desc, split, group=1):
    """n distinct examples from draw() -> example. Exact duplicates (same request,
    same tools) are removed within the split, and no request may repeat one in
    `reserved` (the requests of the splits made before: test, then val), so test
    requests never reach training. The split's own requests are added to
    `reserved` at the end.

    group > 1: examples come in groups of up to `group` that share one tool list
    (same tools, same order, same wording): sibling(first example) -> the next one,
    numbered by ex["group"], so training can run the tool prefix once per group
    (train.py --share_prefix)."""
    out, seen, mine = [], set(), set()
    bar = tqdm(total=n, desc=desc, unit="ex", leave=False, disable=n < 2000)
    tries, gid = 0, 0
    while len(out) < n:
        first = None
        for _ in range(group):
            tries += 1
            if tries > 20 * n + 1000:
                die(f"could only make {len(out)} distinct {desc} examples; lower the count")
            ex = draw() if first is None else sibling(first)
            req = ex["request"].lower()
            key = (req, tuple(sorted(t["name"] for t in ex["tools"])))
            if req in reserved or key in seen:
                if first is None:
                    break
                continue
            seen.add(key)
            mine.add(req)
            first = first or ex
            ex["split"], ex["group"] = split, gid
            out.append(ex)
            bar.update(1)
            if len(out) == n:
                break
        gid += first is not None
    bar.close()
    for ex in out:
        del ex["_entries"]
    reserved |= mine
    return out


def general_splits(args, rng, pools):
    """Catalogue in the prompt: examples over changing tool lists, half the
    targets invented, some tools held out of training -> (catalogue tools,
    invented tools, held-out names, {test, val, train})."""
    entries, held = load_entries(args, rng)
    held_names = {e["tool"]["name"] for e in held}
    seen = [e for e in entries if e["tool"]["name"] not in held_names]
    invented = invent_tools(args.n_invented, args.seed, {e["tool"]["name"] for e in entries})
    p_inv = args.p_invented if invented else 0.0
    gen = Generator(entries, pools, max_tools=args.max_tools)            # test: our tools only
    train_gen = Generator(entries, pools, max_tools=args.max_tools, invented=invented, p_invented=p_inv)
    long_gen = Generator(entries, pools, min_tools=args.max_tools + 1, max_tools=args.long_max_tools,
                         invented=invented, p_invented=p_inv)
    print(f"catalogue: {len(entries)} tools over {len({e['domain'] for e in entries})} domains, "
          f"{len(invented)} invented; held out of training: {', '.join(sorted(held_names)) or 'none'}")
    sibling = lambda g, allowed: (lambda first: g.sibling(rng, first["_entries"], allowed))
    # Test examples are made first and their requests reserved, so no training
    # request repeats a test request word for word.
    reserved, splits = set(), {}
    splits["test"] = generate(lambda: gen.sample(rng, seen, seen), None, args.n_test, reserved, "test (seen)", "seen")
    if held:
        splits["test"] += generate(lambda: gen.sample(rng, held, entries), None, args.n_test_unseen, reserved,
                                   "test (unseen)", "unseen")
    splits["val"] = generate(lambda: train_gen.sample(rng, seen, seen), None, args.n_val, reserved, "val", "seen")
    draw = (lambda: (long_gen if rng.random() < args.long_share else train_gen).sample(rng, seen, seen)) \
        if args.long_share > 0 else (lambda: train_gen.sample(rng, seen, seen))
    splits["train"] = generate(draw, sibling(train_gen, seen), args.n_train, reserved, "train", "seen",
                               group=max(1, args.group))
    label_domains(splits, entries + invented)
    return [e["tool"] for e in entries], invented, held_names, splits


def compiled_splits(args, rng, pools):
    """A compiled catalogue from the generator: every example is about the same
    fixed tools (yours, or the catalogue's --domains). Some request templates of
    each tool are held out: the test split has new values in known phrasings
    ("new-values") and phrasings never seen in training ("new-phrasing")
    -> (tools, {test, val, train})."""
    entries, _ = load_entries(args, rng, heldout=False)
    train_entries, new_entries, val_entries = [], [], []
    for e in entries:
        templates = list(e["requests"])
        rng.shuffle(templates)
        k = min(len(templates) - 2, round(args.heldout_phrasings * len(templates))) if len(templates) >= 3 else 0
        k = max(k, 1) if args.heldout_phrasings > 0 and len(templates) >= 3 else k
        kv = max(1, round(args.val_phrasings * len(templates))) if args.val_phrasings and len(templates) - k >= 4 else 0
        train_entries.append({**e, "requests": templates[k + kv:]})
        if k:
            new_entries.append({**e, "requests": templates[:k], "paraphrases": []})
        if kv:
            val_entries.append({**e, "requests": templates[k:k + kv], "paraphrases": []})
    gen = Generator(train_entries, pools)
    new_gen = Generator(new_entries, pools)
    calls_only = {"single": 0.75, "multi": 0.25}
    print(f"compiled catalogue: {len(entries)} tools over {len({e['domain'] for e in entries})} domains; "
          f"{sum(len(e['requests']) for e in new_entries)} of "
          f"{sum(len(e['requests']) for e in entries)} request templates held out for the test")
    reserved, splits = set(), {}
    splits["test"] = generate(lambda: gen.sibling(rng, train_entries, train_entries), None, args.n_test, reserved,
                              "test (new values)", "new-values")
    if new_entries:
        splits["test"] += generate(lambda: new_gen.sibling(rng, new_entries, new_entries, calls_only), None,
                                   args.n_test_unseen, reserved, "test (new phrasings)", "new-phrasing")
    draw = lambda: gen.sibling(rng, train_entries, train_entries)
    splits["val"] = generate(draw, None, args.n_val, reserved, "val", "new-values")
    if val_entries:
        val_gen = Generator(val_entries, pools)
        splits["val"] += generate(lambda: val_gen.sibling(rng, val_entries, val_entries, calls_only), None,
                                  args.n_val // 2, reserved, "val (new phrasings)", "new-phrasing")
    # training draws more multi-call requests than val and test: they teach where one
    # request ends and the next begins, and each part is a single request as well
    shares = dict(KIND_SHARES)
    shares["single"] += shares["multi"] - args.multi_share
    shares["multi"] = args.multi_share
    gen.inner_case = args.case_flips
    # requests of the catalogue's other domains: what this app cannot do (training only)
    outside = [e for e in load_catalogue(args.catalogue) if e["domain"] not in {x["domain"] for x in entries}] \
        if args.outside and args.domains and not args.tools else []
    splits["train"] = generate(lambda: gen.sibling(rng, train_entries, train_entries + outside, shares), None,
                               args.n_train, reserved, "train", "new-values")
    label_domains(splits, entries)
    return [e["tool"] for e in entries], splits


def label_domains(splits, entries):
    """Each example's domain: its first call's tool's, or "no call"."""
    domain_of = {e["tool"]["name"]: e["domain"] for e in entries}
    for exs in splits.values():
        for ex in exs:
            names = [c["name"] for c in ex["calls"]]
            ex["domain"] = domain_of.get(names[0], "?") if names else "no call"


def shuffle_groups(examples, rng):
    """Shuffle the order of groups, keeping each group's examples together."""
    groups = {}
    for ex in examples:
        groups.setdefault(ex["group"], []).append(ex)
    order = list(groups.values())
    rng.shuffle(order)
    return [ex for g in order for ex in g]


# -----------------------------------------------------------------------------
# tokenizer and token files

def train_tokenizer(examples, tools, vocab_size, out_dir, compiled=False):
    """sentencepiece BPE as llama2.c trains it: byte_fallback (no unknown
    characters at sampling time), split_digits (numbers are copied digit by
    digit), identity normalisation (the text we decode is the text we encoded).
    compiled: each tool name is one more user-defined piece (a functional token,
    as Octopus v2 does), so choosing the tool is one step."""
    import sentencepiece as spm
    texts = [] if compiled else [wire.render_tool(t) for t in tools]
    texts += [wire.render_prompt(None if compiled else ex["tools"], ex["request"])
              + wire.render_answer(ex["calls"], ex["reason"]) for ex in examples]
    symbols = wire.SPECIAL_TOKENS + ([t["name"] for t in tools] if compiled else [])
    model = io.BytesIO()
    try:
        _train_sentencepiece(spm, texts, model, vocab_size, symbols)
    except RuntimeError as e:     # sentencepiece's own message, e.g. a vocabulary smaller than the alphabet
        die(f"--vocab_size {vocab_size}: sentencepiece cannot train on these examples "
            f"({str(e).split('] ')[-1].split('. Increase')[0]}); raise --vocab_size")
    path = os.path.join(out_dir, "tok.model")
    with open(path, "wb") as f:
        f.write(model.getvalue())
    sp = spm.SentencePieceProcessor(model_file=path)
    with open(os.path.join(out_dir, "tok.vocab"), "w", encoding="utf-8") as f:
        for i in range(sp.get_piece_size()):
            f.write(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n")
    return sp


def _train_sentencepiece(spm, texts, model, vocab_size, symbols):
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, character_coverage=1.0,
        user_defined_symbols=symbols, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
        max_sentence_length=1 << 16, input_sentence_size=200000, shuffle_input_sentence=True,
        num_threads=1, minloglevel=2)   # one thread: the same tokenizer on every run


# -----------------------------------------------------------------------------
# sources, teacher, data card

def load_entries(args, rng, heldout=True):
    """-> (all catalogue entries, held-out entries). The hand-written catalogue
    (or its --domains), or with --tools the user's tools (request templates built
    by invent.py). heldout=False: hold no tool out."""
    if args.tools:
        try:
            tools = wire.load_tools(args.tools)
        except (OSError, ValueError) as e:
            die(f"--tools: {e}")
        if not tools:
            die(f"--tools {args.tools}: the tool list is empty")
        entries = [entry_from_tool(t, rng) for t in tools]
        n = (args.n_heldout or 0) if heldout else 0
    else:
        entries = load_catalogue(args.catalogue)
        if args.domains:
            want = [d.strip() for d in args.domains.split(",") if d.strip()]
            known = sorted({e["domain"] for e in entries})
            unknown = [d for d in want if d not in known]
            if unknown:
                die(f"--domains: no domain {unknown[0]!r} in {args.catalogue}; there are {', '.join(known)}")
            entries = [e for e in entries if e["domain"] in want]
        marked = [e for e in entries if e["heldout"]] if heldout else []
        n = len(marked) if args.n_heldout is None or not heldout else args.n_heldout
        if not heldout or args.n_heldout is None or args.n_heldout == len(marked):
            return entries, marked
    if n >= len(entries):
        die(f"--n_heldout {n} leaves no tools to train on ({len(entries)} tools)")
    return entries, choose_heldout(entries, n, rng) if n else []


def label_with_teacher(args, examples):
    """Replace the generator's answers by the teacher's; drop what it got wrong
    or could not answer. Prints how often the teacher agreed with the generator."""
    import teacher as T
    try:
        t = T.make_teacher(args.teacher, model=args.teacher_model, base_url=args.teacher_base_url,
                           api_version=args.teacher_api_version)
    except T.TeacherError as e:
        die(str(e))
    cache = args.teacher_cache or os.path.join(args.out_dir, "teacher_cache.jsonl")
    try:
        results, _ = T.label([{"tools": ex["tools"], "request": ex["request"]} for ex in examples], t, cache,
                             concurrency=args.teacher_concurrency, rps=args.teacher_rps)
    except KeyboardInterrupt:
        print(f"\ninterrupted: every answer received so far is in {cache}; "
              "run the same command again to continue from there", file=sys.stderr)
        sys.exit(130)
    except T.TeacherError as e:        # a tool name it refuses; quota exhausted, unknown model (StopRun)
        die(str(e))
    kept, agree = [], 0
    for ex, r in zip(examples, results):
        if r is None:
            continue
        agree += answer_key(r["calls"], r["reason"]) == answer_key(ex["calls"], ex["reason"])
        # label: the teacher asked; label_model: the model that answered (an alias's snapshot, ...)
        kept.append({**ex, "calls": r["calls"], "reason": r["reason"], "label": t.id, "label_model": r["model"]})
    print(f"teacher {t.id}: kept {len(kept)}/{len(examples)}; agrees with the generator on "
          f"{agree / max(1, len(kept)):.1%} of kept answers")
    return kept


def answer_key(calls, reason):
    return (sorted(json.dumps(c, sort_keys=True) for c in calls), wire.reason_kind(reason))


def pct(xs, q):
    return int(np.percentile(xs, q)) if len(xs) else 0


def data_card(examples, lens, invented_names, catalogue):
    """Statistics of a split: what a reader should know before training on it.
    An example without "tools" (a compiled catalogue) is about the whole catalogue."""
    n = max(1, len(examples))
    tools_of = lambda ex: ex.get("tools", catalogue)
    n_tools = [len(tools_of(ex)) for ex in examples]
    n_calls = [len(ex["calls"]) for ex in examples]
    nocall = {}
    for ex in examples:
        if not ex["calls"]:
            k = wire.reason_kind(ex["reason"])
            nocall[k] = nocall.get(k, 0) + 1
    shown = {t["name"] for ex in examples for t in tools_of(ex)}
    targets = [c["name"] for ex in examples for c in ex["calls"]]
    multi = [ex for ex in examples if len(ex["calls"]) > 1]
    hist = lambda xs: {str(k): xs.count(k) for k in sorted(set(xs))}
    return {
        "examples": len(examples),
        "tools_per_example": {"mean": round(float(np.mean(n_tools or [0])), 2), "hist": hist(n_tools)},
        "calls_per_example": hist(n_calls),
        "no_call_share": round(sum(nocall.values()) / n, 3),
        "no_call_by_reason": {k: round(v / n, 3) for k, v in sorted(nocall.items())},
        "multi_call_share": round(len(multi) / n, 3),
        "multi_call_same_tool": sum(len({c["name"] for c in ex["calls"]}) == 1 for ex in multi),
        # gold argument values: copied as a run of whole request words (span), derived
        # from the schema (converted: bools, enums, numbers in words), or neither (bad)
        "values": count_value_classes(examples, catalogue),
        "unique_tools_shown": len(shown),
        "unique_tools_invented": len(shown & invented_names),
        "unique_tools_other": len(shown - invented_names),
        "call_targets_invented_share": round(sum(t in invented_names for t in targets) / max(1, len(targets)), 3),
        "tokens_p50": pct(lens, 50), "tokens_p95": pct(lens, 95),
        "domains": dict(sorted(_count(ex.get("domain", "?") for ex in examples).items())),
        "sources": dict(sorted(_count(ex.get("source", "generator") for ex in examples).items())),
    }


def _count(xs):
    out = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return out


def print_card(card):
    print(f"data card (train): {card['examples']} examples; tools/example mean {card['tools_per_example']['mean']} "
          f"(1..{max(map(int, card['tools_per_example']['hist']), default=0)}); "
          f"tokens p50 {card['tokens_p50']}, p95 {card['tokens_p95']}")
    print(f"  calls/example {card['calls_per_example']}; multi-call {card['multi_call_share']:.1%} "
          f"({card['multi_call_same_tool']} same tool); no-call {card['no_call_share']:.1%} "
          + ", ".join(f"{k} {v:.1%}" for k, v in card["no_call_by_reason"].items()))
    print(f"  unique tools shown {card['unique_tools_shown']} (invented {card['unique_tools_invented']}, "
          f"hand-written/yours/imported {card['unique_tools_other']}); invented share of calls "
          f"{card['call_targets_invented_share']:.1%}; calls into "
          f"{len(set(card['domains']) - {'invented', 'no call', 'imported', '?'})} hand-written domains; "
          f"sources {card['sources']}")
    v = card["values"]
    print(f"  argument values: {v['span']} spans of request words, {v['converted']} converted, {v['bad']} bad"
          + (" (neither: the decoder's span rule cannot produce them)" if v["bad"] else ""))


# -----------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    for path in [args.catalogue, args.values] + args.imports + ([args.tools] if args.tools else []):
        if not os.path.isfile(path):
            die(f"{path}: no such file")
    if not 0 < args.vocab_size < 65536:
        die("--vocab_size must be between 1 and 65535 (tokens are stored as uint16)")
    if not 0 <= args.case_flips <= 1:
        die(f"--case_flips is a probability between 0 and 1, got {args.case_flips}")
    if not 0 <= args.multi_share <= KIND_SHARES["single"] + KIND_SHARES["multi"]:
        die(f"--multi_share must be between 0 and {KIND_SHARES['single'] + KIND_SHARES['multi']:.2f} "
            "(the rest of the calls are single ones; no-call kinds keep their share)")
    if not 0 <= args.p_invented <= 1 or not 0 <= args.heldout_phrasings < 1:
        die("--p_invented must be between 0 and 1, --heldout_phrasings at least 0 and below 1")
    if args.swap_copies is not None and (args.swap_copies < 0 or not args.intent_slot):
        die("--swap_copies is a count of at least 0, and only for --intent_slot")
    if args.intent_slot and args.swap_copies is None:
        args.swap_copies = SWAP_COPIES
    if args.intent_slot and (args.tools or args.domains or args.teacher):
        die("--intent_slot brings its own intents, slots and labels: no --tools, --domains or --teacher with it")
    compiled = args.compiled or bool(args.intent_slot)
    rng = random.Random(args.seed)
    try:
        pools = load_json(args.values)
        invented, held_names = [], set()
        if args.intent_slot:
            tools, splits = formats.load_intent_slot_dir(args.intent_slot, args.swap_copies, rng)
            print(f"intent/slot set {args.intent_slot}: {len(tools)} intents as tools, "
                  f"{len(tools[0]['parameters']['properties'])} slot types as arguments")
        elif compiled:
            tools, splits = compiled_splits(args, rng, pools)
        else:
            tools, invented, held_names, splits = general_splits(args, rng, pools)
    except (ValueError, KeyError) as e:     # CatalogueError, FormatError, a malformed file
        die(f"{e}")
    os.makedirs(args.out_dir, exist_ok=True)
    if args.teacher:
        splits["train"] = label_with_teacher(args, splits["train"])
        splits["val"] = label_with_teacher(args, splits["val"])
    gid = 1 + max((ex.get("group", 0) for ex in splits["train"]), default=0)
    for path in args.imports:
        imported, counts = formats.import_jsonl(path)
        if compiled:        # the catalogue is fixed: keep what it can answer, as it defines the tools
            imported, off = fit_catalogue(imported, tools)
            counts["tools not in the compiled catalogue"] = off
        for i, ex in enumerate(imported):
            ex["split"], ex["domain"], ex["group"] = "seen", "imported", gid + i
        gid += len(imported)
        splits["train"] += imported
        bad = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "ok" and v) or "none"
        print(f"imported {len(imported)} examples from {path}; skipped: {bad}")
    if compiled:            # the catalogue lives in tools.json, not in every example
        for exs in splits.values():
            for ex in exs:
                ex.pop("tools", None)
    splits["train"] = shuffle_groups(splits["train"], rng) if not compiled else \
        rng.sample(splits["train"], len(splits["train"]))
    write_data_dir(args, tools, splits, compiled, invented, held_names)


def span_share(examples, tools):
    """The share of the values the span rule could hold (plain strings, strings in
    an array, numbers: grammar.spanned) that are runs of whole words of the
    request (grammar.is_span; a number: one the request states). When nearly all
    are (datadir.SPAN_SHARE), the data dir says so ("span_values") and a catalogue
    in the prompt holds every such value to the request (sample.Router.spans_of).
    An example's own tool list if it has one, else tools (a compiled catalogue)."""
    by_name = {t["name"]: t for t in tools}
    n = ok = 0
    for ex in examples:
        spans = grammar.Spans(ex["request"])
        schemas = {t["name"]: t for t in ex["tools"]} if ex.get("tools") else by_name
        for c in ex["calls"]:
            props = schemas.get(c["name"], {}).get("parameters", {}).get("properties", {})
            for k, v in c["arguments"].items():
                if k in props and grammar.spanned(grammar.value_node(props[k]))[0] == "span":
                    n, ok = n + 1, ok + grammar.is_span(v, spans)
    return ok / n if n else 0.0


def fit_catalogue(examples, tools):
    """Imported examples -> (those whose answer is valid against the compiled
    catalogue, number left out)."""
    kept = [ex for ex in examples if wire.validate_answer({"calls": ex["calls"], "reason": ex["reason"]}, tools)
            is None]
    return kept, len(examples) - len(kept)


def write_data_dir(args, tools, splits, compiled, invented, held_names):
    """Tokenizer, token files, jsonl, tools, meta and data card (datadir.py's format)."""
    print(f"training tokenizer (BPE, vocab {args.vocab_size}) ...")
    names = [t["name"] for t in tools] if compiled else []
    sp = train_tokenizer(splits["train"], tools, args.vocab_size, args.out_dir, compiled)
    special_ids = {t: sp.piece_to_id(t) for t in wire.SPECIAL_TOKENS}
    for t, i in list(special_ids.items()) + [(n, sp.piece_to_id(n)) for n in names]:
        assert sp.encode(t) == [i], f"{t} is not a single piece"

    spans = span_share(splits["train"], tools)
    keys = span_keys(splits["train"], tools) if compiled else []
    tags = tag_names(tools, compiled)
    intents = [t["name"] for t in tools] + [NO_CALL] if compiled else None
    meta = {"vocab_size": sp.get_piece_size(), "special_tokens": special_ids, "span_values": spans >= SPAN_SHARE, "span_keys": keys,
            "tokenizer_sha256": file_sha256(os.path.join(args.out_dir, "tok.model")),
            "compiled": compiled, "tool_tokens": {n: sp.piece_to_id(n) for n in names},
            "tags": tags, "intents": intents,
            "heldout_tools": sorted(held_names), "seed": args.seed, "args": vars(args), "splits": {}}
    card = None
    for split, examples in splits.items():
        adjacent = set() if split == "train" else None      # (the heads read the training data's)
        kept, n_tok, lens = write_tokens(sp, examples, args.out_dir, split, args.max_len, compiled, tags, intents,
                                         adjacent)
        write_jsonl(os.path.join(args.out_dir, f"{split}.jsonl"), kept)
        meta["splits"][split] = {"examples": len(kept), "dropped_too_long": len(examples) - len(kept),
                                 "tokens": n_tok, "tokens_p50": pct(lens, 50),
                                 "tokens_p95": pct(lens, 95), "kinds": _count(ex["kind"] for ex in kept),
                                 "values": count_value_classes(kept, tools),
                                 # requests that call two tools or more: the heads then read a tool per value
                                 "two_tools": sum(len({c["name"] for c in ex["calls"]}) > 1 for ex in kept)}
        if split == "train":
            card = data_card(kept, lens, {e["tool"]["name"] for e in invented}, tools)
            meta["tag_moves"] = tag_moves(args.out_dir, split, tags)
            meta["adjacent_moves"] = sorted([a, b] for a, b in adjacent)
    for name, obj in (("tools.json", tools), ("invented_tools.json", [e["tool"] for e in invented]),
                      ("data_card.json", card), ("meta.json", meta)):
        with open(os.path.join(args.out_dir, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, ensure_ascii=False)

    print(f"wrote {args.out_dir}/ (vocab {meta['vocab_size']}, tokenizer {meta['tokenizer_sha256'][:12]}"
          + (f", compiled catalogue of {len(tools)} tools, one token each; {len(keys)} of "
             f"{sum(len(t['parameters'].get('properties', {})) for t in tools)} arguments always copied from the "
             "request: decoding keeps their values to runs of whole request words" if compiled else "") + ")")
    for split, s in meta["splits"].items():
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(s["kinds"].items()))
        print(f"  {split:5s} {s['examples']:6d} examples {s['tokens']:9,d} tokens "
              f"(p50 {s['tokens_p50']}, p95 {s['tokens_p95']}, dropped {s['dropped_too_long']}): {kinds}")
    print_card(card)


if __name__ == "__main__":
    main()
