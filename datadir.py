"""
The data directory on disk, both ways: data.py writes it with the functions
here, train.py / distill.py / sample.py / eval.py read it with the ones below.

    meta.json                  vocab size, special-token ids, counts, tokenizer hash, ...
    tok.model, tok.vocab       the sentencepiece tokenizer
    {split}.jsonl              the examples: tools, request, calls, reason, kind, split
    {split}.bin                uint16 token ids, all examples back to back
    {split}_mask.bin           uint8, 1 on answer tokens (where loss is computed)
    {split}_cls.bin            uint8 class of each token: 0 prompt, then wire.TOKEN_CLASSES
    {split}_idx.npy            int64 offsets: example i is tokens[idx[i]:idx[i+1]]
    {split}_group.npy          int64 group id per example: a group shares one tool list

Reading, a training row is one example by default. Two opt-in ways fill rows
with more (both keep every example's own view: positions as if alone, attention
only to itself): share_prefix, a group of examples that share one tool list,
the list once and then each request with its answer; pack, several whole
examples end to end (pack_rows).
"""

import bisect
import json
import os
import re
from typing import NamedTuple

import numpy as np
import torch

import grammar
import wire
from model import Layout


class Batch(NamedTuple):
    """A training micro-batch; every tensor (B, L). y is x shifted by one; m the
    loss weight of y (0 on the prompt and padding); layout a model.Layout when a row
    holds several examples (else None); seg the prompt block of each x token (1 up
    to <|user|>, 2 the request, 0 the answer and padding; None with a layout)."""
    x: torch.Tensor
    y: torch.Tensor
    m: torch.Tensor
    layout: object
    seg: object
    tags: object = None        # (B, L) tag of each x token (0: none), for the aux tagger
    intent: object = None      # (B,) the first tool (-1: unknown), for the aux intent head
    intent_at: object = None   # (B,) where it is read: the last prompt token
    ptr: object = None         # (B, L) a tagged request token's argument-name position (-1: none)
    tool: object = None        # (B, L) the tool of the call a tagged request token's value is in (-1: none)

    def to(self, device):
        move = lambda t: t.to(device, non_blocking=True) if t is not None else None
        layout = Layout(*(move(t) for t in self.layout)) if self.layout is not None else None
        return Batch(move(self.x), move(self.y), move(self.m), layout, *(move(t) for t in self[4:]))


class DataDirError(ValueError):
    """A data directory we cannot use; the message says why and what to run."""


class DataDir(NamedTuple):
    path: str
    meta: dict           # meta.json
    sp: object           # sentencepiece.SentencePieceProcessor

    def special(self, token):
        return self.meta["special_tokens"][token]


def load_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise DataDirError(f"{data_dir}: no meta.json here; run data.py first (python data.py --out_dir {data_dir})")
    return wire.read_json(path, DataDirError)


def load_data_dir(data_dir):
    """meta.json and the tokenizer of a data dir; checks the tokenizer file is the
    one meta.json was written with."""
    import sentencepiece as spm
    from model import file_sha256
    meta = load_meta(data_dir)
    tok = os.path.join(data_dir, "tok.model")
    if not os.path.isfile(tok):
        raise DataDirError(f"{data_dir}: no tok.model here; run data.py --out_dir {data_dir}")
    if file_sha256(tok) != meta["tokenizer_sha256"]:
        raise DataDirError(f"{tok}: not the tokenizer meta.json was written with; run data.py again")
    return DataDir(data_dir, meta, spm.SentencePieceProcessor(model_file=tok))


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# -----------------------------------------------------------------------------
# writing token files

def piece_lengths(sp):
    """Bytes of text each token id stands for (byte-fallback pieces: one)."""
    return np.array([1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
                     for i in range(sp.get_piece_size())], dtype=np.int64)


def token_classes(ids, spans, nbytes):
    """Class of each answer token (wire.TOKEN_CLASSES): the class of the span its
    last byte falls in, so a piece like "_Paris" that starts on the space after
    "city:" counts as value. spans: wire.answer_spans(); nbytes: piece_lengths()."""
    bounds, classes, at = [], [], 0
    for text, cls in spans:
        at += len(text.encode("utf-8"))
        bounds.append(at)
        classes.append(wire.TOKEN_CLASSES[cls])
    last = np.cumsum(nbytes[ids]) - 1
    span = np.minimum(np.searchsorted(bounds, last, side="right"), len(classes) - 1)
    return [classes[j] for j in span.tolist()]


def tag_names(tools, compiled):
    """The request-token tags of a data dir (the aux tagging loss, GPT.tagger in model.py):
    0 "-" (not a request token), 1 "O" (in no argument value), then B-/I- per
    argument key of a compiled catalogue (the key is known from the tag), or just
    B/I for catalogues in the prompt (keys differ from prompt to prompt)."""
    if not compiled:
        return ["-", "O", "B", "I"]
    keys = list(dict.fromkeys(k for t in tools for k in t["parameters"].get("properties", {})))
    return ["-", "O"] + [f"{bi}-{k}" for k in keys for bi in "BI"]


def request_words(sp, request, nbytes, ids=None):
    """The request as the model reads it -> (its token ids, its words as (index of
    the token holding the word's first byte, start byte, end byte), its bytes).
    The heads tag each word on its first token (as JointBERT tags a word's first
    piece): a value read off the tags is then whole words (grammar.word_cores)."""
    text = wire.render_request(request)
    ids = sp.encode(text) if ids is None else ids      # ids: the request's, if encoded already
    ends = np.cumsum(nbytes[ids]) if ids else np.zeros(0, dtype=np.int64)
    words = []
    for a, z in grammar.word_cores(text):
        tok = int(np.searchsorted(ends, a, side="right"))
        if words and words[-1][0] == tok:    # one token holds both first bytes ("k's"): one word
            words[-1] = (tok, words[-1][1], z)
        else:
            words.append((tok, a, z))
    return ids, words, text.encode("utf-8")


def request_tags(sp, ex, tag_index, nbytes, read=None):
    """Each request token's tag (indices into tag_names): on the first token of
    each word, the argument whose value the word begins (B) or continues (I), else
    O; every other token "-" (no tag, no loss). A value (each item of a list) is
    placed at the first run of whole words that spells it and that no other value
    took; with a key of its own (a compiled catalogue's B-key), a whole number no
    run spells in digits at the first run of number words that says it ("down to
    seventy" -> temperature 70, number_words_run); any other value no run spells
    (converted, not copied) is not tagged.
    read: request_words's answer for this request, if at hand.
    -> (tags, owners): owners[j] is (tool name, key) for a tagged token, else None."""
    ids, words, text = read or request_words(sp, ex["request"], nbytes)
    tags, owners, taken = [0] * len(ids), [None] * len(ids), set()
    for tok, _, _ in words:
        tags[tok] = tag_index["O"]
    for c in ex["calls"]:
        for k, v in c.get("arguments", {}).items():
            b, i = tag_index.get(f"B-{k}", tag_index.get("B")), tag_index.get(f"I-{k}", tag_index.get("I"))
            if b is None:           # a key the catalogue does not have (a test item): no tag for it
                continue
            for item in (v if isinstance(v, list) else [v]):
                val = wire.render_value(item).encode("utf-8")
                run = spelled_run(words, text, val, taken)
                if run is None and f"B-{k}" in tag_index and isinstance(item, (int, float)) and \
                        not isinstance(item, bool) and float(item).is_integer():
                    run = number_words_run(words, text, int(item), taken)
                if run is None:
                    continue
                taken |= set(run)
                for n, w in enumerate(run):
                    tags[words[w][0]] = b if n == 0 else i
                    owners[words[w][0]] = (c["name"], k)
    return tags, owners


def spelled_run(words, text, val, taken=frozenset()):
    """The first run of whole words (indices into words, request_words) whose bytes
    are val, none of them in taken -> a range of word indices, or None."""
    for x, (_, a, _) in enumerate(words):
        if not text.startswith(val, a):
            continue
        for y in range(x, len(words)):
            z = words[y][2]
            if z - a >= len(val):
                if z - a == len(val) and taken.isdisjoint(range(x, y + 1)):
                    return range(x, y + 1)
                break
    return None


NUMBER_WORD = set(grammar.UNITS) | set(grammar.TENS) | {"hundred", "and"}


def number_words_run(words, text, n, taken=frozenset()):
    """The first run of up to four request words, each a number word, that
    writes n ("seventy", "twenty six", "sixty-six"), none in taken -> a range
    of word indices, or None. (A compiled model's tagger marks it as the value's
    words: the heads find a call whose only value is said in words, and the
    decoder writes its number from those words, grammar.Spans.within.)"""
    for x in range(len(words)):
        for y in range(x, min(x + 4, len(words))):
            run = text[words[x][1]:words[y][2]].decode("utf-8", "replace")
            parts = re.findall(r"[^\W\d_]+", run.lower())
            if not parts or not set(parts) <= NUMBER_WORD or re.search(r"[^\w\s-]", run) or taken & set(range(x, y + 1)):
                break
            if said_in_words(run) and grammar.word_numbers(run) == {n}:
                return range(x, y + 1)
    return None


def said_in_words(text):
    """Is text one number in number words only ("seventy", "twenty six", "one
    hundred and five"; not "and seventy", "6 fifty", "minus five")?"""
    parts = re.findall(r"[^\W\d_]+", text.lower())
    return bool(parts) and set(parts) <= NUMBER_WORD and not re.search(r"\d", text) and \
        parts[0] not in ("and", "hundred") and parts[-1] != "and" and len(grammar.word_numbers(text)) == 1


def tag_moves(out_dir, split, tags):
    """The word-tag transitions a split's data shows -> sorted [previous, next]
    pairs of tag names ("^" as previous: a request's first word). The heads read
    their tags as a sequence that keeps to these (heads.best_tags): a value the
    data never splits cannot come out split in two."""
    base = os.path.join(out_dir, split)
    seq = np.fromfile(base + "_tag.bin", dtype=np.uint16)
    starts = np.load(base + "_idx.npy")
    at = np.nonzero(seq)[0]                                   # the tagged tokens: one per request word
    ex = np.searchsorted(starts, at, side="right") - 1        # the example each belongs to
    vals = seq[at]
    pairs = set()
    first = np.ones(len(at), dtype=bool)
    first[1:] = ex[1:] != ex[:-1]
    pairs |= {("^", tags[v]) for v in np.unique(vals[first])}
    same = ~first[1:]
    pairs |= {(tags[a], tags[b]) for a, b in set(zip(vals[:-1][same].tolist(), vals[1:][same].tolist()))}
    return sorted([a, b] for a, b in pairs)


def adjacent_pairs(read, token_tags, tags):
    """The word-tag transitions of one request between two words with nothing but
    white space between them ("our last aurora", not "Paris, Lyon") -> a set of
    (previous, next) tag names. read: request_words; token_tags: request_tags.
    Over the training data (write_tokens) these are the meta's "adjacent_moves": a
    value that continues into the next word is read as one run there unless the
    data has two values side by side like that (an intent/slot set's "monday
    tuesday"), so the heads never split "Dar es Salaam" into two values, each
    opening a call (heads.best_tags)."""
    _, words, text = read
    return {(tags[token_tags[t0]], tags[token_tags[t1]])
            for (t0, _, z), (t1, a, _) in zip(words, words[1:]) if not text[z:a].strip()}


NO_CALL = "<no call>"  # a compiled model's intent class for an answer that calls no tool
SPAN_SHARE = 0.99     # data that copies this share of a kind of value from the request: the decoder always does


def span_keys(examples, tools, share=SPAN_SHARE):
    """The arguments of a compiled catalogue whose values the data copies from the
    request (grammar.is_span) in at least `share` of its examples -> sorted [tool,
    key] pairs. The decoder holds these to runs of the request's words (grammar
    span frames); the rest (converted: number words, flags, enums, dates written
    anew) stay free. A (tool, key) the data never shows goes by its key over all
    tools (an intent/slot set pairs slots with new intents at test time). Only
    plain strings, lists of strings and numbers can be held so (grammar.spanned)."""
    pair, key = {}, {}
    for ex in examples:
        spans = grammar.Spans(ex["request"])
        for c in ex["calls"]:
            for k, v in c.get("arguments", {}).items():
                ok = grammar.is_span(v, spans)
                for tally, at in ((pair, (c["name"], k)), (key, k)):
                    n, m = tally.get(at, (0, 0))
                    tally[at] = (n + 1, m + ok)
    out = []
    for t in tools:
        for k, p in t["parameters"].get("properties", {}).items():
            if grammar.spanned(grammar.value_node(p))[0] != "span":
                continue                                  # an enum, a flag, an object: never copied as such
            n, m = pair.get((t["name"], k)) or key.get(k) or (0, 0)
            if n and m >= share * n:
                out.append([t["name"], k])
    return sorted(out)


def catalogue_positions(sp, tools):
    """Where, among the tokens of wire.render_prefix(tools), each tool's name and
    each argument's name begins -> ({tool: index}, {(tool, key): index}). The
    pointer heads (train.py --tagger on a catalogue in the prompt) point there:
    the intent at the tool it calls, each tagged request token at its argument."""
    ids = sp.encode(wire.render_prefix(tools))
    ends = np.cumsum([1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode()) for i in ids])
    token_at = lambda byte: int(np.searchsorted(ends, byte, side="right"))   # the token holding that byte
    names, args = {}, {}
    at = len(wire.TOOLS.encode())
    for t in tools:
        line = wire.clean(wire.render_tool(t))
        names[t["name"]] = token_at(at)
        pos = line.index("(")
        for k in t["parameters"].get("properties", {}):
            for mark in (f" {k}:", f" {k}?:", f" {k}="):
                j = line.find(mark, pos)
                if j >= 0:
                    args[(t["name"], k)] = token_at(at + len(line[:j].encode()))
                    pos = j + 1
                    break
        at += len(line.encode()) + 1          # the newline between lines
    return names, args


def encode_example(sp, ex, nbytes, compiled=False):
    """-> (token ids, per-token class: 0 on the prompt, else the answer part it
    belongs to). The answer is encoded separately so the boundary falls exactly
    on the first answer token. compiled: the prompt is the request alone."""
    prompt = sp.encode(wire.render_prompt(None if compiled else ex["tools"], ex["request"]))
    spans = wire.answer_spans(ex["calls"], ex["reason"])
    answer = sp.encode("".join(t for t, _ in spans))
    return prompt + answer, [0] * len(prompt) + token_classes(answer, spans, nbytes)


def write_tokens(sp, examples, out_dir, split, max_len, compiled=False, tags=None, intents=None, adjacent=None):
    """Token files for one split; examples over max_len are dropped and counted.
    tags (tag_names) and intents (tool names + "<no call>", compiled only) add
    {split}_tag.bin (each prompt token's tag), {split}_intent.npy (each
    example's first tool) and, compiled, {split}_tool.bin (each tagged token's
    call's tool, -1 elsewhere) for the aux losses; for a catalogue in the prompt the
    intent is the position of that tool's name (0: no call), and {split}_ptr.bin
    gives each tagged request token the position of its argument's name.
    adjacent: a set to add the kept examples' adjacent_pairs to (with tags).
    -> (kept examples, number of tokens, length of each kept example)."""
    ids, cls, tag_ids, intent_ids, ptr_ids, tool_ids, offsets, kept = [], [], [], [], [], [], [0], []
    nbytes = piece_lengths(sp)
    tag_index = {t: i for i, t in enumerate(tags or [])}
    for ex in examples:
        x, c = encode_example(sp, ex, nbytes, compiled)
        if len(x) > max_len:
            continue
        ids.extend(x)
        cls.extend(c)
        offsets.append(len(ids))
        kept.append(ex)
        if tags:
            n_prompt = next((i for i, k in enumerate(c) if k), len(c))
            read = request_words(sp, ex["request"], nbytes)
            rt, owners = request_tags(sp, ex, tag_index, nbytes, read)
            if adjacent is not None:
                adjacent |= adjacent_pairs(read, rt, tags)
            tag_ids.extend([0] * (n_prompt - len(rt)) + rt + [0] * (len(x) - n_prompt))
        if intents:
            name = ex["calls"][0]["name"] if ex["calls"] else intents[-1]
            intent_ids.append(intents.index(name) if name in intents else -1)   # -1: not a known tool
            tool = [intents.index(o[0]) if o and o[0] in intents else -1 for o in owners]
            tool_ids.extend([-1] * (n_prompt - len(rt)) + tool + [-1] * (len(x) - n_prompt))
        elif tags:     # a catalogue in the prompt: point at the tool's and the arguments' names
            names, args = catalogue_positions(sp, ex["tools"])
            intent_ids.append(names[ex["calls"][0]["name"]] if ex["calls"] and ex["calls"][0]["name"] in names
                              else 0)                                  # no call: <|tools|>
            ptr = [args.get(o, -1) if o else -1 for o in owners]
            ptr_ids.extend([-1] * (n_prompt - len(rt)) + ptr + [-1] * (len(x) - n_prompt))
    if tags:
        np.array(tag_ids, dtype=np.uint16).tofile(os.path.join(out_dir, f"{split}_tag.bin"))
        np.save(os.path.join(out_dir, f"{split}_intent.npy"), np.array(intent_ids, dtype=np.int64))
    if tags and intents:
        np.array(tool_ids, dtype=np.int16).tofile(os.path.join(out_dir, f"{split}_tool.bin"))
    if tags and not intents:
        np.array(ptr_ids, dtype=np.int16).tofile(os.path.join(out_dir, f"{split}_ptr.bin"))
    assert sp.get_piece_size() < 65536, "token ids are stored as uint16"
    cls = np.array(cls, dtype=np.uint8)
    np.array(ids, dtype=np.uint16).tofile(os.path.join(out_dir, f"{split}.bin"))
    (cls > 0).astype(np.uint8).tofile(os.path.join(out_dir, f"{split}_mask.bin"))
    cls.tofile(os.path.join(out_dir, f"{split}_cls.bin"))
    np.save(os.path.join(out_dir, f"{split}_idx.npy"), np.array(offsets, dtype=np.int64))
    groups = [ex.get("group", i) for i, ex in enumerate(kept)]
    np.save(os.path.join(out_dir, f"{split}_group.npy"), np.array(groups, dtype=np.int64))
    return kept, len(ids), np.diff(offsets)


# -----------------------------------------------------------------------------
# reading token files: training rows and batches

class Split:
    """One split's token files, memory-mapped; examples are kept whole (one
    longer than block_size is skipped and counted in n_dropped).

    rows[r] lists the examples of row r, prefix[r] the length of the tool list
    they share (0: none). With neither share_prefix nor pack, each row is one
    example and batches are plain causal sequences."""

    def __init__(self, data_dir, split, block_size, share_prefix=False, user_id=None,
                 max_examples=0, pack=False, seed=0, aux=True):
        if pack and share_prefix:
            raise DataDirError("pack and share_prefix are two ways of filling a row; choose one")
        self.user_id = user_id if user_id is not None else load_meta(data_dir)["special_tokens"][wire.USER]
        self.base = base = os.path.join(data_dir, split)
        self.tokens = np.memmap(self._file(".bin", f"run data.py --out_dir {data_dir}"), dtype=np.uint16, mode="r")
        self.mask = np.memmap(self._file("_mask.bin", f"run data.py --out_dir {data_dir}"), dtype=np.uint8, mode="r")
        offsets = np.load(self._file("_idx.npy", f"run data.py --out_dir {data_dir}"))
        # aux: the aux heads' targets (train.py --tagger), where data.py wrote them
        self.tags = self.intents = self.ptr = self.tool = None
        if aux:
            self.tags = np.memmap(base + "_tag.bin", dtype=np.uint16, mode="r") if os.path.isfile(base + "_tag.bin") \
                else None
            self.intents = np.load(base + "_intent.npy") if os.path.isfile(base + "_intent.npy") else None
            self.ptr = np.memmap(base + "_ptr.bin", dtype=np.int16, mode="r") if os.path.isfile(base + "_ptr.bin") \
                else None
            self.tool = np.memmap(base + "_tool.bin", dtype=np.int16, mode="r") \
                if os.path.isfile(base + "_tool.bin") else None
        lens = np.diff(offsets)
        keep = lens <= block_size
        if max_examples:
            keep &= np.arange(len(lens)) < max_examples
        self.starts, self.lens = offsets[:-1], lens
        self.n_dropped = int((lens > block_size).sum())
        self.n_examples = int(keep.sum())
        self.rows, self.prefix = self._make_rows(np.flatnonzero(keep), block_size, share_prefix, pack, seed)
        if not self.rows:
            raise DataDirError(f"{base}: no example fits block_size {block_size}")
        self.row_lens = np.array([self._row_len(r, p) for r, p in zip(self.rows, self.prefix)])
        self.by_length = np.argsort(self.row_lens, kind="stable")   # for length-grouped batches

    def _file(self, suffix, fix):
        """The path of one of the split's files; a DataDirError saying how to get it if missing."""
        if not os.path.isfile(self.base + suffix):
            raise DataDirError(f"{self.base + suffix}: missing; {fix}")
        return self.base + suffix

    def _make_rows(self, kept, block_size, share_prefix, pack, seed):
        """-> (rows, prefix): one example per row; or packed (pack_rows); or grouped
        by shared tool list (share_prefix)."""
        if pack:
            # which examples share a row is fixed for the run (by seed); as they
            # do not see each other, that only ties them into the same batches
            rows = [[int(kept[j]) for j in row] for row in pack_rows(self.lens[kept], block_size, seed)]
            return rows, [0] * len(rows)
        if share_prefix:
            groups = np.load(self._file("_group.npy", "--share_prefix needs data from data.py --group N"))
            return self._group_rows(kept, groups, block_size, self.user_id)
        return [[int(k)] for k in kept], [0] * len(kept)

    def __len__(self):
        return len(self.rows)

    def _row_len(self, row, p):
        return p + sum(int(self.lens[k]) - p for k in row)

    def _group_rows(self, kept, groups, block_size, user_id):
        """Rows of examples that share a tool list: the common prefix (up to the
        <|user|> token) once, then as many members as fit in block_size; the rest
        start a new row. A member whose prefix differs gets a row of its own."""
        rows, prefix = [], []
        members_of = {}
        for k in kept:
            members_of.setdefault(int(groups[k]), []).append(int(k))
        for members in members_of.values():
            first = self.example(members[0])
            where = np.flatnonzero(first == user_id)
            p = int(where[0]) if len(where) else 0
            row = []
            for k in members:
                if not p or not np.array_equal(self.example(k)[:p], first[:p]):
                    rows.append([k])
                    prefix.append(0)
                    continue
                if row and self._row_len(row + [k], p) > block_size:
                    rows.append(row)
                    prefix.append(p)
                    row = []
                row.append(k)
            if row:
                rows.append(row)
                prefix.append(p if len(row) > 1 else 0)
        return rows, prefix

    def example(self, k):
        return self.tokens[self.starts[k]:self.starts[k] + self.lens[k]]

    def batch(self, idx, pad_id):
        """Rows idx -> a Batch, right-padded to the longest row, with a model.Layout
        if any row holds several examples (else None: plain causal). m is 1 on
        answer tokens. Right padding needs no
        attention mask: under the causal mask no real token sees a pad."""
        if all(len(self.rows[r]) == 1 for r in idx):
            return self._plain_batch(idx, pad_id)
        return self._layout_batch(idx, pad_id)

    def _plain_batch(self, idx, pad_id):
        L = int(self.row_lens[idx].max()) - 1
        x = np.full((len(idx), L), pad_id, dtype=np.int64)
        y = np.full((len(idx), L), pad_id, dtype=np.int64)
        m = np.zeros((len(idx), L), dtype=np.float32)
        seg = np.zeros((len(idx), L), dtype=np.int64)
        aux = self._aux_arrays(len(idx), L) if self.tags is not None else None
        for b, r in enumerate(idx):
            k = self.rows[r][0]
            s, n = self.starts[k], int(self.lens[k])
            t, mk = self.tokens[s:s + n], self.mask[s:s + n]
            x[b, :n - 1], y[b, :n - 1], m[b, :n - 1] = t[:-1], t[1:], mk[1:]
            # the prompt's blocks: up to <|user|> (the catalogue), then the request
            # up to the first answer token
            user, answer = int(np.argmax(t == self.user_id)), int(np.argmax(mk > 0))
            seg[b, :user + 1], seg[b, user + 1:answer] = 1, 2
            if aux is not None:
                self._fill_aux(aux, b, k, s, n, answer)
        aux = () if aux is None else (*(torch.from_numpy(a) for a in aux[:3]),
                                      *(torch.from_numpy(a) if f is not None else None
                                        for a, f in zip(aux[3:], (self.ptr, self.tool))))
        return Batch(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(m), None, torch.from_numpy(seg), *aux)

    def _aux_arrays(self, B, L):
        """Empty aux targets for a batch: tags (B, L) 0, intent (B,) -1, intent_at (B,),
        ptr (B, L) -1, tool (B, L) -1."""
        return (np.zeros((B, L), dtype=np.int64), np.full(B, -1, dtype=np.int64), np.zeros(B, dtype=np.int64),
                np.full((B, L), -1, dtype=np.int64), np.full((B, L), -1, dtype=np.int64))

    def _fill_aux(self, aux, b, k, s, n, answer):
        """Row b's aux targets: example k, tokens s..s+n, its first answer token at `answer`."""
        tags, intent, intent_at, ptr, tool = aux
        tags[b, :n - 1] = self.tags[s:s + n - 1]
        if self.intents is not None:
            intent[b], intent_at[b] = self.intents[k], answer - 1
        if self.ptr is not None:
            ptr[b, :n - 1] = self.ptr[s:s + n - 1]
        if self.tool is not None:
            tool[b, :n - 1] = self.tool[s:s + n - 1]

    def _layout_batch(self, idx, pad_id):
        """Rows holding a shared prefix and/or several examples: the tokens as in
        _plain_batch, plus each token's position, sequence and previous token."""
        L = int(self.row_lens[idx].max()) - 1
        B = len(idx)
        x = np.full((B, L), pad_id, dtype=np.int64)
        y = np.full((B, L), pad_id, dtype=np.int64)
        m = np.zeros((B, L), dtype=np.float32)
        pos = np.tile(np.arange(L), (B, 1))
        seg = np.full((B, L), -1, dtype=np.int64)         # 0: shared prefix, k: k-th example
        prev = np.tile(np.arange(L) - 1, (B, 1))
        for b, r in enumerate(idx):
            p, row = self.prefix[r], self.rows[r]
            s0 = self.starts[row[0]]
            toks, msk = [self.tokens[s0:s0 + p]], [self.mask[s0:s0 + p]]
            ps, sg, pv = [np.arange(p)], [np.zeros(p, dtype=np.int64)], [np.arange(p) - 1]
            at = p
            for k_i, k in enumerate(row, 1):
                s, n = self.starts[k], int(self.lens[k])
                toks.append(self.tokens[s + p:s + n])
                msk.append(self.mask[s + p:s + n])
                ps.append(np.arange(p, n))
                sg.append(np.full(n - p, k_i))
                # the first token after the prefix follows the prefix's last token
                pv.append(np.concatenate([[p - 1], np.arange(at, at + n - p - 1)]))
                at += n - p
            t, mk = np.concatenate(toks), np.concatenate(msk)
            n = len(t) - 1
            x[b, :n], y[b, :n], m[b, :n] = t[:-1], t[1:], mk[1:]
            pos[b, :n], seg[b, :n], prev[b, :n] = np.concatenate(ps)[:-1], np.concatenate(sg)[:-1], np.concatenate(pv)[:-1]
        layout = packed_layout(torch.from_numpy(pos), torch.from_numpy(seg), torch.from_numpy(prev))
        return Batch(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(m), layout, None)


def packed_layout(pos, seg, prev):
    """model.Layout for rows holding several sequences. pos, prev: (B, L) as in
    Layout; seg: (B, L) 0 for a shared prefix that every sequence sees, k >= 1
    for the k-th sequence, -1 for padding. Query t may attend to key s <= t of
    its own sequence or of the prefix: block-diagonal causal, plus the prefix."""
    L = seg.size(1)
    q, k = seg[:, :, None], seg[:, None, :]                                     # (B, L, 1), (B, 1, L)
    mask = ((k == 0) | (k == q)) & torch.ones(L, L, dtype=torch.bool).tril()   # (B, L, L)
    return Layout(pos, mask[:, None], prev)                                     # mask (B, 1, L, L): all heads


def pack_rows(lens, capacity, seed):
    """Examples of the given lengths -> rows (lists of indices into lens) of at
    most capacity tokens each. Best fit in a shuffled order: each example goes
    to the row with the least room that still holds it, else opens a new row.
    Shuffled rather than longest-first, so which examples share a row is not
    tied to their length; with examples well under capacity it leaves only a
    few percent empty all the same."""
    order = np.random.default_rng([seed, 0x9ac]).permutation(len(lens))
    rows, free = [], []      # free: sorted (room left, row number) of the rows still open
    for i in order:
        n = int(lens[i])
        j = bisect.bisect_left(free, (n, -1))      # the first row with room >= n
        if j < len(free):
            room, r = free.pop(j)
            rows[r].append(int(i))
        else:
            room, r = capacity, len(rows)
            rows.append([int(i)])
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return rows


def batch_indices(split, seed, step, micro, batch_size, window=0):
    """Which rows go into a micro-batch: a pure function of (seed, step, micro).
    micro counts micro-batches over all processes (rank * grad_accum + i), so
    2 processes with grad_accum 1 draw exactly what 1 process draws with 2.
    With window > 0, the batch is drawn from `window` rows of neighbouring
    length (around a random anchor), so little compute is spent on padding."""
    rng = np.random.default_rng([seed, step, micro])
    n = len(split)
    if window <= 0 or window >= n:
        return rng.integers(0, n, batch_size)
    lo = int(rng.integers(0, n - window + 1))
    return split.by_length[lo + rng.integers(0, window, batch_size)]


def padding_fraction(split, rows_per_batch, window, seed, n_batches=20):
    """The fraction of a batch's token slots that hold padding: each batch is
    (rows, longest row - 1) after the one-token shift of inputs and targets,
    and a row of n tokens fills n - 1 slots. Over the first n_batches training
    batches (the same draws as step 0, 1, ...), token-weighted."""
    real = total = 0
    for step in range(n_batches):
        lens = split.row_lens[batch_indices(split, seed, step, 0, rows_per_batch, window)]
        real += int((lens - 1).sum())
        total += len(lens) * int(lens.max() - 1)
    return 1 - real / total
