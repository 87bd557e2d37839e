"""
Constrained decoding: the answer grammar as a byte-level automaton, and the
token masks it implies.

sample.py lets the model pick only tokens that keep the answer on a path to a
valid one (wire.py's format):

    <|call|>name<|arg|> key: value<|arg|> key2: 5<|end|>      or
    <|nocall|>missing argument: order_id<|end|>

    - the first token is <|call|> or <|nocall|>: the no-call path is always open
    - a tool name only from the catalogue
    - argument keys only from the chosen tool's schema, each at most once; the
      call closes (<|call|> or <|end|>) only once every required key is present
    - a value is what its schema allows: an enum value, a JSON integer / number /
      boolean / null, a JSON array of well-typed items, a JSON object with its
      declared keys, or free text for a plain string (raw in the wire format,
      ended by the next special token, so it needs no quotes or escapes; strings
      inside arrays are JSON strings, quoted and escaped)
    - a no-call reason is one of the four kinds; "missing argument: " is
      followed by an argument name from the catalogue

How it works. The grammar is an automaton over bytes (a normal token is the
UTF-8 bytes of its piece) and special tokens. A state is an immutable tuple, so
the set of tokens allowed in a state can be memoised: the vocabulary is stored
once as a byte trie (Vocab), and walking that trie with the automaton, pruning
every branch it rejects, gives the allowed tokens. Free text short-circuits to
"every normal token". Structural states (a name or key half written) are few
per catalogue and are memoised per Grammar; value states do not depend on the
catalogue and are memoised per Vocab. After the first requests, a step costs a
dictionary look-up plus stepping the automaton over one token's bytes.

Not enforced (the validator still checks them): string pattern / format /
length limits, numeric ranges, unions that mix "string" with other types (read
as free text). Keys containing ":" cannot be written in the wire format, so the
grammar leaves them out (a tool that requires one is left out too).
"""

import copy
import json
import re
import unicodedata
from typing import NamedTuple

import torch

import wire

MAX_CALLS = 8    # calls in one answer
MAX_DEPTH = 6    # nesting of JSON arrays / objects inside one value

SPECIALS = (wire.CALL, wire.ARG, wire.NOCALL, wire.END)
REASONS = (wire.REASON_CHITCHAT, wire.REASON_INFO, wire.REASON_NO_TOOL)


def _json(v):
    return json.dumps(v, ensure_ascii=False, separators=(",", ":")).encode()


# -----------------------------------------------------------------------------
# one argument's value: schema -> node -> stack automaton
#
# A node is a hashable tuple saying what a value may be:
#   ("raw",)                 free text (a top-level plain string)
#   ("lit", options)         one of these byte strings (enum, boolean, null)
#   ("num", int_only)        a JSON number (integer if int_only)
#   ("str",)                 a JSON string
#   ("arr", item_node)       a JSON array
#   ("obj", props, required) a JSON object: props = ((key bytes, node), ...)
#   ("any",)                 any JSON value
#   ("alt", nodes)           any one of these (a union type)
# While reading, a value is a stack of frames (the innermost last); a state is a
# frozenset of such stacks, because a union or a number that may or may not go on
# can be read more than one way at once.

RAW = ("raw",)
ANY = ("any",)
BOOL = ("lit", (b"false", b"true"))
NULL = ("lit", (b"null",))
_SCALAR = {"integer": ("num", True), "number": ("num", False), "boolean": BOOL, "null": NULL}


def _reads_raw(v):
    """Does wire.read_value give this string back as it is, written bare (it is
    no JSON text, and no white space at its ends)?"""
    try:
        json.loads(v)
        return False
    except ValueError:
        return bool(v) and v == v.strip()


def value_node(prop, top=True):
    """JSON Schema of one argument -> node. top: the argument's own value (a plain
    string is raw text there); inside arrays and objects everything is JSON."""
    if not isinstance(prop, dict):
        return ANY
    if "enum" in prop:
        vals = prop["enum"]
        if top and all(isinstance(v, str) for v in vals):
            opts = {wire.render_value(v).encode() for v in vals}   # read back raw (wire.read_value)
        else:
            opts = {_json(v) for v in vals}
            if top:    # a string the answer renders bare (wire.render_value) and reads back as itself
                opts |= {wire.render_value(v).encode() for v in vals if isinstance(v, str) and _reads_raw(v)}
        opts.discard(b"")
        return ("lit", tuple(sorted(opts))) if opts else ANY
    t = prop.get("type")
    types = t if isinstance(t, list) else [t]
    if top and "string" in types:
        return RAW
    nodes = []
    for t in types:
        if t == "string":
            nodes.append(("str",))
        elif t in _SCALAR:
            nodes.append(_SCALAR[t])
        elif t == "array":
            items = prop.get("items")
            nodes.append(("arr", value_node(items, top=False) if isinstance(items, dict) else ANY))
        elif t == "object":
            props = prop.get("properties")
            if isinstance(props, dict) and props:
                req = frozenset(_json(k) for k in prop.get("required", []) if k in props)
                nodes.append(("obj", tuple(sorted((_json(k), value_node(p, top=False))
                                                  for k, p in props.items())), req))
            else:
                nodes.append(("obj", None, frozenset()))
        else:
            nodes.append(ANY)
    return nodes[0] if len(nodes) == 1 else ("alt", tuple(nodes))


# letters with periods ("p.m.", "U.S."): the last period belongs to the word
ABBREVIATION = re.compile(r"(?<![\w.])(?:[^\W\d_]\.){2,}")
CLAUSE_BREAK = re.compile(r"[.?!;](?=\s)")     # the end of a sentence or clause (unless an abbreviation's)
LIST_JOINER = re.compile(r"\s*(?:,|&|and|or|plus|,\s*and|,\s*or)?\s*", re.I)   # between two items of one list
POSSESSIVE = re.compile(r"(?<=\w)['\u2019][sS]$")           # "Clark's": the word and its "s"
TITLE = re.compile(r"(?<![\w.])[^\W\d_][^\W\d_A-Z]{0,2}$")  # "St", "Mr", "Mrs", "J": a capital and up to two letters


def joined(between):
    """Do these bytes between two runs join them into one list: a comma or a
    conjunction alone ("rain jacket and bath mat"; not "jump rope on my list,
    then add crayons")?"""
    return LIST_JOINER.fullmatch(between.decode("utf-8", "replace")) is not None


def _abbreviation_at(text, i):
    """Does the period at text[i] close an abbreviation ("St.", "Mrs.", "J.", "p.m.")?"""
    if text[i] != ".":
        return False
    before = text[:i]
    return bool(TITLE.search(before) and before.split()[-1][:1].isupper()) or \
        any(m.end() == i + 1 for m in ABBREVIATION.finditer(text, max(0, i - 12), i + 1))


ALNUM_RUN = re.compile(r"[^\W_]+")                 # letters and digits (str.isalnum), no underscore
SIGIL_START = re.compile(r"(?<!\S)[#$@+](?=[^\W_])")   # "#general", "@amy", "+44": after white space
LONE_NUMBER = r"(?<![^\W_])\d+(?:\.\d+)?(?![^\W\d_])"   # digits with no letter or digit glued before, no letter after


class Spans:
    """Where a value copied from this request may begin and end: byte offsets into
    its UTF-8 text, and the numbers it writes in digits.

    A copied value is a run of whole request words: it begins at a word's first
    letter or digit (after white space, a quote or a bracket: "Our" in '"Our Starlit
    Journey"'; or at a '#', '$', '@' or '+' that opens a word) and ends right after
    a word's last letter or digit (before white space, punctuation or the end: "La
    Paz" in "fly to La Paz?"), or after the last period of an abbreviation ("7:30
    p.m."). Anything of the request may stand between ("Paris,
    France", "ORD-1234") except the end of a sentence or clause: a '?', '!', ';'
    or a period before white space, unless the period closes an abbreviation
    ("St. Louis", "Mr. O'Connor", "p.m."), so "remind me September 22. Also ..."
    cannot give "September 22. Also". Classic intent/slot taggers label whole words
    and so can never answer "cggs" for "eggs" or "Mateo Walk" for "Mateo Walker"; a
    decoder held to these offsets cannot either."""

    def __init__(self, request):
        self.hushed = frozenset()  # word starts no free value may open at (hush)
        self._index(wire.clean(request.strip()), frozenset())
        self.runs = {}         # argument -> its tagged runs no value took yet, in request order (hold)
        self.by_tool = False   # runs held per (tool, argument): a run is one call's value (hold)
        self.in_order = False  # values take their runs in request order (hold)
        self.in_row, self.glued = False, frozenset()   # (spans held in order: see within)
        self._held = {}        # (argument, runs, list?) -> the spans held to them (for_key)
        self.only_runs = False  # an argument takes its runs only, nothing when it has none (hold)
        self.sure = {}         # (by_tool) run -> the one tool whose call it is, when only one (hold)
        self.blocked = {}      # grammar -> what no value can be written for here (Grammar.blocked)

    def _index(self, text, taken):
        """Where values may begin and end in text (a str) when the byte offsets in
        taken belong to values the answer copied already: a request word is copied
        once (the second call of "save Amy Hakimi, number 958 237 7665" cannot take
        the first one's phone again, nor a city its contact's name)."""
        self.text, self.taken = text.encode("utf-8"), taken
        at_char = byte_offsets(text)
        # the text as later values see it: taken words are white space
        seen = "".join(" " if at_char[i] in taken else ch for i, ch in enumerate(text)) if taken else text
        self.seen = bytes(32 if i in taken else b for i, b in enumerate(self.text)) if taken else self.text
        # a value begins where a run of letters and digits does, or at a "#$@+" after
        # white space and before one ("#general", "@amy"); it ends where such a run does
        starts, ends = set(), set()
        for m in ALNUM_RUN.finditer(seen):
            starts.add(at_char[m.start()])
            ends.add(at_char[m.end()])
        starts.update(at_char[m.start()] for m in SIGIL_START.finditer(seen))
        for m in ABBREVIATION.finditer(seen):          # "7:30 p.m." keeps its last period
            ends.add(at_char[m.end()])
        self.starts, self.ends = frozenset(starts), frozenset(ends)
        self.opens = self.starts - self.hushed      # where a value may begin
        # where a value may not run on: the clause breaks, and the words taken
        self.breaks = frozenset(at_char[m.start()] for m in CLAUSE_BREAK.finditer(text)
                                if not _abbreviation_at(text, m.start())) | taken
        self.live = self._live()
        self.first = frozenset(self.text[a] for a in self.opens if a + 1 in self.live)   # bytes a value may open with
        # numbers as written ("107", "3.5", and "-3" where the minus is no hyphen),
        # not glued to letters: "A6736344" is an order id, not the number 6736344
        nums = set()
        for m in re.finditer(LONE_NUMBER, seen):
            nums.add(m.group().encode())
            if m.start() and seen[m.start() - 1] == "-" and (m.start() < 2 or not seen[m.start() - 2].isalnum()):
                nums.add(b"-" + m.group().encode())
        self.numbers = frozenset(nums)
        # the numbers it states, in digits or in words ("ninety-five" -> 95): what a
        # number argument that the data always finds in its request may be
        self.stated = self.numbers | frozenset(str(n).encode() for n in word_numbers(seen))

    def within(self, runs, in_order=False):
        """These spans held to some runs of the request ((start, end) byte offsets,
        e.g. the words the tagger marked for one argument): a value is one of them,
        whole. in_order: a list's items are runs in a row, and a list does not end
        where its next run is joined on by a comma or a conjunction alone (slist)."""
        inside = {p for a, z in runs for p in range(a, z)}
        held = Spans.__new__(Spans)
        held.text, held.taken, held.seen = self.text, self.taken, self.seen
        held.starts = held.opens = frozenset(a for a, _ in runs)
        held.ends = frozenset(z for _, z in runs)
        held.breaks = self.breaks | frozenset(p for p in range(len(self.text)) if p not in inside)
        held.live = held._live()
        held.first = frozenset(self.text[a] for a in held.starts if a + 1 in held.live)
        held.numbers = frozenset(m.group() for a, z in runs
                                 for m in re.finditer(rb"-?\d+(?:\.\d+)?", self.seen[a:z])) & self.numbers
        held.stated = frozenset(n for a, z in runs for n in self._stated_in(a, z))
        held.runs, held.in_order, held._held, held.in_row, held.blocked = {}, False, {}, in_order, {}
        held.only_runs, held.by_tool, held.sure, held.hushed = False, False, {}, frozenset()
        # the runs a list goes on from: the next run follows, joined by a comma or a
        # conjunction alone ("rain jacket and bath mat")
        held.glued = frozenset(z for (_, z), (a, _) in zip(runs, runs[1:]) if in_order and joined(self.text[z:a]))
        return held

    def hush(self, words):
        """No text value that is no tagged run may begin inside these words ((start,
        end) byte offsets): words the tagger is sure are no value (Router.hush_o), so
        that a value the tagger did not find is not any word at all ("check my
        calendar for May 28 and find 113 open minutes" -> find_free_time(date=
        "minutes")). (A number is still any the request states.)"""
        self.hushed = frozenset(q for a, z in words for q in self.starts if a <= q < z)
        self.opens = self.starts - self.hushed
        self.first = frozenset(self.text[a] for a in self.opens if a + 1 in self.live)
        self._held, self.blocked = {}, {}

    def at(self, key, tool=None):
        """Where hold keeps an argument's runs: (tool, key) when they are held per
        tool (by_tool), else key."""
        return (tool, key) if self.by_tool else key

    def left(self, at):
        """The runs held at `at` that no value took yet."""
        runs = self.runs.get(at, ())
        if runs and self.taken:                 # (a run another key's value took is gone)
            runs = tuple((a, z) for a, z in runs if self.taken.isdisjoint(range(a, z)))
        return runs

    def for_key(self, key, listed=False, tool=None, required=False):
        """The spans a value of this argument (of this tool's call) may take: the
        runs the tagger marked for it that no value took yet (hold), else any.
        Held per tool (by_tool), a tool with no run of the key while other tools'
        runs of it wait: nothing for an optional argument (it is theirs), those
        runs for a required one (the call stays possible); an optional argument
        with no run at all while a run surely another tool's waits (waiting): nothing
        either (its words are that call's: "play the album Abbey Road and turn off
        the kitchen lights" has no artist). In order, a value is
        the first of them (listed, a list: the first and the next ones in a row)."""
        runs, elsewhere = self.left(self.at(key, tool)), False
        if self.by_tool and not runs:
            others = tuple(sorted(r for t, k in self.runs if k == key for r in self.left((t, k))))
            runs, elsewhere = (others, False) if required else ((), bool(others) or bool(self.waiting() - {tool}))
        if not runs and not self.only_runs and not elsewhere:
            return self
        memo = (key, runs, listed)             # (no runs and only_runs: nothing to copy)
        if memo not in self._held:
            self._held[memo] = self.within(runs if listed or not self.in_order else runs[:1], self.in_order)
        return self._held[memo]

    def sparing(self, runs):
        """These spans with the words of runs (byte offsets) set aside, as if taken:
        what a free value may copy once the values held to those runs are written."""
        if not runs:
            return self
        memo = ("sparing", runs)
        if memo not in self._held:
            self._held[memo] = self._taking({p for a, z in runs for p in range(a, z)})
        return self._held[memo]

    def hold(self, runs_by_key, in_order=False, only_runs=False):
        """Hold each argument's values to the runs the tagger marked for it:
        {key: [(start, end), ...]} byte offsets, or {(tool, key): ...} (by_tool:
        each run is one tool's call's value; the tool a grammar name, bytes) (a
        key with no run stays free, unless only_runs: then it has nothing to copy).
        Each run is taken once (took); in_order: in request order, as the data
        writes them ("sixty-four ... 103 minutes": the first call's duration is 64)."""
        self.runs = {k: tuple(sorted(p for r in runs for p in self._clauses(*r))) for k, runs in runs_by_key.items()}
        self.runs = {k: runs for k, runs in self.runs.items() if runs}
        self.in_order, self.only_runs = in_order, only_runs
        self._held, self.blocked = {}, {}      # (what was worked out before the runs is stale)
        self.by_tool = any(isinstance(k, tuple) for k in self.runs)
        owners = {}
        for at, runs in self.runs.items():
            for r in runs if self.by_tool else ():
                owners.setdefault(r, set()).add(at[0])
        self.sure = {r: next(iter(ts)) for r, ts in owners.items() if len(ts) == 1}

    def waiting(self):
        """(by_tool) The tools that runs no value took yet surely belong to (held for
        that tool alone): calls the answer has yet to make."""
        return {self.sure[r] for at, runs in self.runs.items() for r in self.left(at) if r in self.sure}

    def _clauses(self, a, z):
        """A run cut at the clause breaks inside it, each piece from a word's start
        to a word's end ("go for a run; AQI Bilbao" -> "go for a run", "AQI Bilbao"):
        a value may not cross a break, so a run across one could not be written."""
        cuts = sorted(p for p in self.breaks if a < p < z)
        out = []
        for lo, hi in zip([a] + cuts, cuts + [z]):
            starts = [q for q in self.starts if lo <= q < hi]
            ends = [q for q in self.ends if lo < q <= hi]
            if starts and ends and min(starts) < max(ends):
                out.append((min(starts), max(ends)))
        return out

    def took(self, key, value, tool=None):
        """These spans after a value of key was written (its bytes as the answer
        has them, ' ["a","b"]'): the runs it took are taken (in order: with every
        run before them), the others stay for the next value; a key whose runs
        are all taken is free again. And the words the value copied are taken:
        no later value of any key copies them again (_copied)."""
        text = value.strip()
        try:
            items = json.loads(text) if text[:1] in (b"[", b'"') else [text.decode("utf-8")]
        except ValueError:
            items = []
        items = [str(item).encode("utf-8") for item in (items if isinstance(items, list) else [items])]
        taken = set()
        for item in items:
            taken |= self._copied(item, self.taken | taken)
        out = self._taking(taken)
        at = self.at(key, tool)
        runs = self.runs.get(at)
        if runs:
            left = list(runs)
            for item in items:
                i = next((j for j, (a, z) in enumerate(left) if self.text[a:z] == item or
                          item in self._stated_in(a, z)), None)
                if i is not None:
                    left = left[i + 1:] if self.in_order else left[:i] + left[i + 1:]
            out.runs = {k: v for k, v in self.runs.items() if k != at}
            if left:
                out.runs[at] = tuple(left)
        return out

    def _taking(self, taken):
        """A copy of these spans with the byte offsets in taken taken too (no later
        value copies them), what was worked out for the old ones forgotten."""
        out = copy.copy(self)
        out.blocked, out._held = {}, {}
        if taken:
            out._index(self.text.decode("utf-8"), self.taken | taken)
        return out

    def _copied(self, item, taken):
        """The byte offsets of the request words a value copied (item: its bytes),
        none of them in taken: a string's first whole-word run of them; a number's
        digits only where that run is certain: written once in digits, not also in
        words, not part of a time or date ("6" of "6:15"), so "snooze it six
        minutes" after "wake me at 6:15" takes nothing."""
        n = len(item)
        if not n:
            return set()
        if re.fullmatch(rb"-?\d+(?:\.\d+)?", item):
            digits = item.lstrip(b"-")
            occ = [m for m in re.finditer(LONE_NUMBER.encode(), self.text)
                   if m.group() == digits and taken.isdisjoint(range(*m.span()))]
            if len(occ) != 1 or digits.isdigit() and int(digits) in word_numbers(self.seen.decode("utf-8")):
                return set()
            word = re.search(rb"\S*$", self.text[:occ[0].start()]).group() + re.match(rb"\S*", self.text[occ[0].start():]).group()
            return set(range(*occ[0].span())) if len(re.findall(rb"\d+", word)) == 1 else set()
        for a in sorted(self.starts):
            if self.text.startswith(item, a) and a + n in self.ends and taken.isdisjoint(range(a, a + n)) and \
                    self.breaks.isdisjoint(range(a, a + n)):
                return set(range(a, a + n))
        return set()

    def _stated_in(self, a, z):
        """The numbers the run text[a:z] states: in digits as the request writes
        them, or in words."""
        run = self.seen[a:z]
        return {m.group() for m in re.finditer(rb"-?\d+(?:\.\d+)?", run) if m.group() in self.numbers} | \
            {str(n).encode() for n in word_numbers(run.decode("utf-8"))}

    def _live(self):
        """The offsets a value can still end from (at a word end, crossing no
        break): a value never writes itself into a dead end, such as "23?" at the
        end of the request, which can neither end nor go on."""
        live, n = set(), len(self.text)
        for q in range(n, -1, -1):
            if q in self.ends or (q < n and q not in self.breaks and q + 1 in live):
                live.add(q)
        return frozenset(live)

    def go_on(self, offs, b):
        """Offsets reached after byte b from offsets offs (None: the value's first
        byte), those a value can still end from."""
        if offs is None:
            return frozenset(a + 1 for a in self.opens if self.text[a] == b and a + 1 in self.live)
        return frozenset(p + 1 for p in offs if p < len(self.text) and self.text[p] == b and p not in self.breaks
                         and p + 1 in self.live)

    def next_bytes(self, offs):
        if offs is None:
            return self.first
        return {self.text[p] for p in offs if p < len(self.text) and p not in self.breaks and p + 1 in self.live}

    def may_end(self, offs):
        return offs is not None and not offs.isdisjoint(self.ends)

    def whole_number(self, digits):
        """May a number written as these bytes end here? Not in the middle of a
        number the request writes in digits ("10" of "107", "9" of "volume 90")."""
        return digits in self.numbers or not any(n.startswith(digits) for n in self.numbers)


UNITS = {w: n for n, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                                    "fourteen fifteen sixteen seventeen eighteen nineteen".split())}
TENS = {w: 10 * n for n, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)}


def byte_offsets(text):
    """Each character's offset in text's UTF-8 bytes, and the end's (len(text) + 1 of them)."""
    if text.isascii():
        return range(len(text) + 1)
    out, at = [], 0
    for ch in text:
        out.append(at)
        at += len(ch.encode("utf-8"))
    out.append(at)
    return out


def word_numbers(text):
    """The numbers a text writes in words, each compound whole: "twenty-six" ->
    {26}, "one hundred and five" -> {105}, "six twenty" -> {6, 20}. Words make one
    number only when spaces or a hyphen join them ("twenty, six" -> {20, 6}), so
    "fifty-one" can never be read as 50."""
    out, cur, end = set(), None, 0
    low = text.lower()
    for m in list(re.finditer(r"[^\W\d_]+", low)) + [None]:
        w = m.group() if m else ""
        attached = m is not None and re.fullmatch(r" *-? *", low[end:m.start()]) is not None
        end = m.end() if m else end
        if not attached and cur is not None:
            out.add(cur)
            cur = None
        if w in UNITS or w in TENS:
            n = UNITS.get(w, TENS.get(w))
            # "twenty six" adds, "six twenty" is two numbers
            if cur is not None and (cur % 100 >= 20 and cur % 10 == 0 and n < 10 or cur % 100 == 0 and cur and n < 100):
                cur += n
            else:
                if cur is not None:
                    out.add(cur)
                cur = n
        elif w == "hundred" and cur is not None and cur < 100:
            cur *= 100
        elif w == "and" and cur is not None and cur % 100 == 0 and cur:
            continue
        elif cur is not None:
            out.add(cur)
            cur = None
    return out


def word_cores(text):
    """The words of a text as (start, end) byte offsets: each run between white
    space without the punctuation around it ('"Our' -> Our, 'Paz?' -> Paz; a
    leading '#', '$', '@' or '+' stays), a possessive's "s" a word of its own
    ("Clark's" -> Clark, s: "Nicole Clark" and "Macy's" are both runs); a run
    with no letter or digit is no word. The heads tag these, one tag a word, and
    a value read off the tags, text[start of its first word : end of its last],
    is a span Spans allows."""
    out, at_char = [], byte_offsets(text)
    for m in re.finditer(r"\S+", text):
        w = m.group()
        i, j = 0, len(w)
        if not (w[0] in "#$@+" and j > 1 and w[1].isalnum()):
            while i < j and not w[i].isalnum():
                i += 1
        while j > i and not w[j - 1].isalnum():
            j -= 1
        abbr = ABBREVIATION.search(w, i)
        if abbr and abbr.end() > j and abbr.start() < j:  # "p.m.:" -> p.m.
            j = abbr.end()
        at = lambda k: at_char[m.start() + k]
        poss = POSSESSIVE.search(w, i, j)
        if poss:
            out.append((at(i), at(poss.start())))
            i = poss.start() + 1
        if i < j:
            out.append((at(i), at(j)))
    return out


def is_span(value, spans):
    """Is this argument value copied from the request as Spans has it: a string
    that is a run of whole words, a list of such strings, or a number as the
    request writes it in digits?"""
    if isinstance(value, bool) or value is None:
        return False
    if isinstance(value, (int, float)):
        return json.dumps(value).encode() in spans.stated
    if isinstance(value, list):
        return bool(value) and all(isinstance(v, str) and is_span(v, spans) for v in value)
    if not isinstance(value, str) or not value:
        return False
    v, t = value.encode("utf-8"), spans.text
    return any(t.startswith(v, a) and a + len(v) in spans.ends and not any(a <= p < a + len(v) for p in spans.breaks)
               for a in spans.starts)


def plain_string(prop):
    """A plain string argument (no enum): free text, or a run of request words."""
    return isinstance(prop, dict) and prop.get("type") == "string" and "enum" not in prop


def spanned(node):
    """The node of a span key (one whose values the training data always copies
    from the request): a plain string, strings in an array, or a number, held to
    the request's words once it is known (bind). Other types are left as they are."""
    if node == RAW or node[0] == "num" or (node[0] == "arr" and node[1] == ("str",)):
        return ("span", node)
    return node


def _start(node, depth=0):
    """The frames a value of this node may open with (depth: containers around it;
    a free-form value stops nesting at MAX_DEPTH, declared schemas are finite)."""
    kind = node[0]
    if kind == "alt":
        return [f for n in node[1] for f in _start(n, depth)]
    if kind == "any":
        scalars = [("str", 0), ("num", False, "s"), ("lit", (b"false", b"null", b"true"), b"")]
        if depth >= MAX_DEPTH:
            return scalars
        return [("obj", None, frozenset(), 0, frozenset(), b""), ("arr", ANY, 0)] + scalars
    if kind == "raw":
        return [("raw", 0, b"")]
    if kind == "sraw":                    # (sraw, spans, offsets reached)
        return [("sraw", node[1], None)]
    if kind == "sstr":                    # (sstr, spans, 0 before / 1 after the quote, offsets)
        return [("sstr", node[1], 0, None)]
    if kind in ("snum", "wnum"):          # (kind, int_only, spans, phase, text so far)
        return [(kind, node[1], node[2], "s", b"")]
    if kind == "slist":                   # (slist, spans, phase, where the next item may begin, offsets)
        return [("slist", node[1], 0, 0, None)]
    if kind == "lit":
        return [("lit", node[1], b"")]
    if kind == "num":
        return [("num", node[1], "s")]
    if kind == "str":
        return [("str", 0)]
    if kind == "arr":
        return [("arr", node[1], 0)]
    if kind == "obj":                     # (obj, props, required, phase, used, key so far)
        return [("obj", node[1], node[2], 0, frozenset(), b"")]
    raise ValueError(f"unknown node {node!r}")


_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
# number phases: s start, - after minus, 0 leading zero, i integer digits, . after
# the dot, f fraction digits, e after e/E, E after the exponent sign, x exponent digits
_NUM_DONE = frozenset("0ifx")


def _accepting(frame):
    """Can this frame end here (the next byte then belongs to its parent)?"""
    kind = frame[0]
    if kind == "raw":
        return frame[1] == 1
    if kind == "lit":
        return frame[2] in frame[1]
    if kind == "num":
        return frame[2] in _NUM_DONE
    if kind == "sraw":
        return frame[1].may_end(frame[2])
    if kind == "snum":
        return frame[3] in _NUM_DONE and frame[4] in frame[2].stated
    if kind == "wnum":
        return frame[3] in _NUM_DONE and frame[2].whole_number(frame[4])
    return False


def _num(int_only, phase, b):
    """Next number phase after byte b, or None."""
    digit = b in _DIGITS
    if phase == "s":
        return "-" if b == 45 else "0" if b == 48 else "i" if digit else None
    if phase == "-":
        return "0" if b == 48 else "i" if digit else None
    if phase in "0i":
        if phase == "i" and digit:
            return "i"
        if int_only:
            return None
        return "." if b == 46 else "e" if b in (101, 69) else None
    if phase == ".":
        return "f" if digit else None
    if phase == "f":
        return "f" if digit else "e" if b in (101, 69) and not int_only else None
    if phase == "e":
        return "E" if b in (43, 45) else "x" if digit else None
    if phase in "Ex":
        return "x" if digit else None
    return None


def _advance(frame, b, depth):
    """Frame consumes byte b -> list of replacements for it (tuples of frames:
    () when the frame is complete, a child frame last when one opens)."""
    kind = frame[0]
    if kind == "sp":
        return [()] if b == 32 else []
    if kind == "raw":
        # Free text, except that its first character may not be white space: a value
        # that is all white space would vanish when the answer is read back (its end
        # is stripped), and a small model that starts a value with spaces tends to
        # go on writing spaces until the token budget runs out.
        if frame[1] == 1:
            return [(("raw", 1),)]
        first = frame[2] + bytes([b])           # the first character, byte by byte
        try:
            ch = first.decode("utf-8")
        except UnicodeDecodeError as e:
            if e.reason != "unexpected end of data" or len(first) >= 4:
                return []
            return [(("raw", 0, first),)]       # wait for the rest of the character
        return [] if ch.isspace() or unicodedata.category(ch) == "Cc" else [(("raw", 1),)]
    if kind == "lit":
        prefix = frame[2] + bytes([b])
        opts = frame[1]
        if not any(o.startswith(prefix) for o in opts):
            return []
        longer = any(len(o) > len(prefix) and o.startswith(prefix) for o in opts)
        return [(("lit", opts, prefix),)] if longer else [()]
    if kind == "num":
        nxt = _num(frame[1], frame[2], b)
        return [] if nxt is None else [(("num", frame[1], nxt),)]
    if kind == "sraw":
        offs = frame[1].go_on(frame[2], b)
        return [(("sraw", frame[1], offs),)] if offs else []
    if kind == "sstr":
        spans, phase, offs = frame[1:]
        if phase == 0:
            return [(("sstr", spans, 1, None),)] if b == 34 else []
        if b == 34:                                       # the closing quote, at a word's end
            return [()] if spans.may_end(offs) else []
        offs = spans.go_on(offs, b) if b != 92 else None  # no escapes: a span is plain text
        return [(("sstr", spans, 1, offs),)] if offs else []
    if kind == "slist":
        return _advance_slist(frame, b)
    if kind in ("snum", "wnum"):
        _, int_only, spans, phase, text = frame
        nxt, text = _num(int_only, phase, b), text + bytes([b])
        if nxt is None or (kind == "snum" and not any(n.startswith(text) for n in _numbers(spans, int_only))):
            return []
        return [((kind, int_only, spans, nxt, text),)]
    if kind == "str":
        phase = frame[1]
        if phase == 0:                                    # expect the opening quote
            return [(("str", 1),)] if b == 34 else []
        if phase == 1:                                    # inside
            if b == 34:
                return [()]
            if b == 92:
                return [(("str", 2),)]
            return [] if b < 32 else [(("str", 1),)]      # control characters must be escaped
        if phase == 2:                                    # after a backslash
            if b == 117:
                return [(("str", 6),)]                    # \u: four hex digits follow
            return [(("str", 1),)] if b in b'"\\/bfnrt' else []
        if b in _HEX:                                     # phases 3..6: hex digits left
            return [(("str", 1 if phase == 3 else phase - 1),)]
        return []
    if kind == "arr":
        item, phase = frame[1], frame[2]
        if phase == 0:
            return [(("arr", item, 1),)] if b == 91 else []
        if phase == 2:                                    # after an item
            return [(("arr", item, 3),)] if b == 44 else [()] if b == 93 else []
        out = [()] if phase == 1 and b == 93 else []      # "[]"
        for f in _start(item, depth + 1):                 # an item opens with b
            out += [(("arr", item, 2),) + r for r in _advance(f, b, depth + 1)]
        return out
    if kind == "obj":
        return _advance_obj(frame, b, depth)
    raise ValueError(f"unknown frame {frame!r}")


def _advance_slist(frame, b):
    """A list of span strings, '["rain jacket","bath mat"]': each item a span as
    in sstr, in the order the request says them: an item begins after the last
    one ended, so no item comes twice ("dog leash" three times) unless the
    request says it twice. Held in order (Spans.within), the items are the next
    runs in a row, as far as a comma or conjunction alone joins them. Phases: 0
    before '[', 1 after it, 2 inside an item, 3 after an item, 4 after a comma;
    after: the byte offset the next item may begin at. A comma comes only when
    an item is left to write; a list holds at least one item (an empty one is
    no run of the request's words)."""
    _, spans, phase, after, offs = frame
    if phase == 0:
        return [(("slist", spans, 1, 0, None),)] if b == 91 else []
    if phase in (1, 4):
        return [(("slist", spans, 2, after, None),)] if b == 34 else []
    if phase == 3:
        if b == 44 and _item_starts(spans, after) and (after in spans.glued or not spans.in_row):
            return [(("slist", spans, 4, after, None),)]
        return [()] if b == 93 and after not in spans.glued else []
    if b == 34:                                           # the item's closing quote
        ends = [p for p in offs if p in spans.ends] if offs else []
        return [(("slist", spans, 3, min(ends), None),)] if ends else []
    if offs is None:
        offs = frozenset(a + 1 for a in _item_starts(spans, after) if spans.text[a] == b and a + 1 in spans.live)
    else:
        offs = spans.go_on(offs, b) if b != 92 else None
    return [(("slist", spans, 2, after, offs),)] if offs else []


JSON_NUMBER = re.compile(rb"-?(?:0|[1-9]\d*)(?:\.\d+)?")


def _numbers(spans, int_only):
    """The stated numbers a number value may be: those JSON can write ("06" of
    "06:04" it cannot), integers only for an integer."""
    return [n for n in spans.stated if JSON_NUMBER.fullmatch(n) and not (int_only and b"." in n)]


def _fillable(inner, spans):
    """Can a span value of this inner node be written from these spans at all? A
    string needs a word to begin at, a number a number the request states (an
    integer: one without a fraction); a list, a word for its first item."""
    if inner[0] == "num":
        return bool(_numbers(spans, inner[1]))
    return bool(spans.first)


def _item_starts(spans, after):
    """Where a list's next item may begin: after the last one; held in order
    (Spans.within), at the next run only."""
    starts = [a for a in spans.opens if a >= after]
    return {min(starts)} if starts and spans.in_row else set(starts)


def _advance_obj(frame, b, depth):
    _, props, req, phase, used, key = frame
    free = props is None                       # any keys, any values
    if phase == 0:                             # expect "{"
        return [(("obj", props, req, 1, used, b""),)] if b == 123 else []
    if phase in (1, 5):                        # a key opens (or "}" right after "{")
        if b == 125 and phase == 1 and req <= used:
            return [()]
        if b != 34:
            return []
        if free:                               # the key is any JSON string; ":" comes next
            return [(("obj", props, req, 3, used, b""), ("str", 1))]
        phase, key = 2, b""
    if phase == 2:                             # a declared key, matched as its JSON bytes '"key"'
        key += bytes([b])
        cands = [k for k, _ in props if k not in used and k.startswith(key)]
        if not cands:
            return []
        return [(("obj", props, req, 3 if key in cands else 2, used, key),)]
    if phase == 3:                             # expect ":" then the value
        if b != 58:
            return []
        node = ANY if free else dict(props)[key]
        parent = ("obj", props, req, 4, used if free else used | {key}, b"")
        return [(parent, f) for f in _start(node, depth + 1)]
    if phase == 4:                             # after a value
        if b == 44 and (free or any(k not in used for k, _ in props)):   # a key is left to write
            return [(("obj", props, req, 5, used, b""),)]
        return [()] if b == 125 and req <= used else []
    return []


def _step_stack(stack, b):
    """All the ways the stack can read byte b -> list of stacks."""
    if not stack:
        return []
    top, rest = stack[-1], stack[:-1]
    out = [rest + r for r in _advance(top, b, len(rest))]
    if _accepting(top):                        # the top may end here; the parent reads b
        out += _step_stack(rest, b)
    return out


def bind(node, spans):
    """A node with the request's spans bound in: a ("span", x) node becomes a
    span frame's node (x a plain string, a JSON string or a number: the value is
    copied from the request), and any other number must not stop inside a number
    the request writes in digits. Without spans (no request), the plain node."""
    kind = node[0]
    if kind == "span":
        inner = node[1]
        if spans is None:
            return bind(inner, None)
        if inner == RAW:
            return ("sraw", spans)
        if inner == ("str",):
            return ("sstr", spans)
        if inner[0] == "num":
            return ("snum", inner[1], spans)
        if inner == ("arr", ("str",)):
            return ("slist", spans)
        if inner[0] == "arr":
            return ("arr", bind(("span", inner[1]), spans))
        return bind(inner, spans)
    if kind == "num":
        return ("wnum", node[1], spans) if spans is not None else node
    if kind == "arr":
        return ("arr", bind(node[1], spans))
    if kind == "alt":
        return ("alt", tuple(bind(n, spans) for n in node[1]))
    if kind == "obj" and node[1] is not None:
        return ("obj", tuple((k, bind(n, spans)) for k, n in node[1]), node[2])
    return node


def value_start(node, spans=None):
    """The value state right after " key:": a space, then the value."""
    return frozenset((f, ("sp",)) for f in _start(bind(node, spans)))


def value_step(vstate, b):
    """Value state after byte b, or None if no reading survives."""
    nxt = frozenset(s for stack in vstate for s in _step_stack(stack, b))
    return nxt or None


def value_done(vstate):
    return any(all(_accepting(f) for f in stack) for stack in vstate)


RAW_STATES = (frozenset({(("raw", 1),)}),)    # free text past its first character: any byte


# -----------------------------------------------------------------------------
# the whole answer

class State(NamedTuple):
    phase: str                   # start | reason | name | key | value | done
    text: bytes = b""            # the reason / name / " key:" bytes written so far
    tool: str = None             # the tool being called
    used: frozenset = frozenset()  # its keys written so far (including the current one)
    value: frozenset = None      # the value automaton's state
    calls: int = 0               # calls opened so far
    spans: Spans = None          # the request's (span values), if known
    key: str = None              # the argument whose value is being written
    vtext: bytes = b""           # that value's bytes so far, when it is copied (Spans.took)


class Grammar:
    """The answer grammar for one catalogue (tools in wire.normalize_tool form).

    tool_choice (OpenAI's): "auto" (call or not), "none" (no call), "required"
    (at least one call), or a tool name (calls of that tool only)."""

    def __init__(self, tools, tool_choice="auto", span_keys=()):
        names = {t["name"] for t in tools}
        if tool_choice not in ("auto", "none", "required") and tool_choice not in names:
            raise ValueError(f"tool_choice names {tool_choice!r}, which is not among the tools")
        self.choice = tool_choice
        self.tools = {}          # name bytes -> {"name", "keys": {b" key:": (key, node)}, "args", "required", ...}
        arg_names = set()
        for t in tools:
            if tool_choice in names and t["name"] != tool_choice:
                continue
            props = t["parameters"].get("properties", {})
            required = set(t["parameters"].get("required", []))
            keys = {f" {k}:".encode(): (k, spanned(value_node(p)) if (t["name"], k) in span_keys else value_node(p))
                    for k, p in props.items() if k and ":" not in k and wire.clean(k) == k}
            if required - {k for k, _ in keys.values()}:
                continue                       # a required key the wire format cannot write
            self.tools[t["name"].encode()] = {"name": t["name"], "keys": keys, "required": required,
                                              "args": frozenset(k for k, _ in keys.values()),
                                              "spans": frozenset(k for k, node in keys.values() if node[0] == "span"),
                                              "texts": frozenset(k for k, node in keys.values()
                                                                 if node[0] == "span" and node[1][0] != "num")}
            arg_names.update(k for k, _ in keys.values())
        reasons = list(REASONS) + [wire.REASON_MISSING + k for k in sorted(arg_names)]
        self.reasons = tuple(r.encode() for r in reasons)
        self.memo = {}           # structural byte-key -> allowed normal token ids
        self._cand_memo = {}     # (phase, tool, text) -> the names / reasons / keys it begins

    def start(self, request=None):
        """The state before the answer; with the request, values of the span keys
        are held to runs of its words (Spans)."""
        return State("start", spans=Spans(request) if request else None)

    # -- stepping

    def step(self, s, sym):
        """State after symbol sym (a byte 0..255, or a special token string), or None."""
        if isinstance(sym, str):
            return self._special(s, sym)
        if s.phase == "value":
            v = value_step(s.value, sym)
            if v is None:
                return None
            copied = s.spans is not None and s.key in self.tools[s.tool]["spans"]
            return s._replace(value=v, vtext=s.vtext + bytes([sym]) if copied else b"")
        if s.phase in ("name", "reason", "key"):
            text = s.text + bytes([sym])
            cands = self._candidates(s._replace(text=text))
            if not cands:
                return None
            if s.phase == "key" and text in cands:          # " key:" complete: its value next
                key, node = self.tools[s.tool]["keys"][text]
                spans = self._held_for(s.spans, s.tool, key, node[0] == "span" and node[1][0] == "arr") \
                    if s.spans is not None else None
                return s._replace(phase="value", text=b"", used=s.used | {key}, key=key, vtext=b"",
                                  value=value_start(node, spans))
            return s._replace(text=text)
        return None

    def _candidates(self, s):
        """The names / reasons / key strings that s.text is a prefix of. Memoised
        per (phase, tool, text), used keys filtered after: the grammar steps byte by
        byte, and a tool with dozens of arguments made this the decoder's hot spot."""
        memo_key = (s.phase, s.tool, s.text)
        cands = self._cand_memo.get(memo_key)
        if cands is None:
            if s.phase == "name":
                pool = self.tools
            elif s.phase == "reason":
                pool = self.reasons
            else:
                pool = self.tools[s.tool]["keys"]
            cands = [c for c in pool if c.startswith(s.text)]
            if len(self._cand_memo) > 100_000:
                self._cand_memo.clear()
            self._cand_memo[memo_key] = cands
        if s.phase == "key":
            keys, dead = self.tools[s.tool]["keys"], self.blocked(s.spans)[1].get(s.tool, ())
            return [c for c in cands if keys[c][0] not in s.used and keys[c][0] not in dead]
        if s.phase == "name":
            return [c for c in cands if c not in self.blocked(s.spans)[0]]
        return cands

    def blocked(self, spans):
        """What no value can be written for in this request -> (names of the tools
        one of whose required arguments is such, {tool name: such arguments}): a
        span key with nothing to copy, e.g. snooze_alarm's minutes when the request
        states no number. Offering them would lead the decoder into a dead end."""
        if spans is None:
            return frozenset(), {}
        if id(self) not in spans.blocked:
            dead = {}
            for name, t in self.tools.items():
                keys = frozenset(k for k, node in t["keys"].values() if node[0] == "span" and
                                 not _fillable(node[1], self._held_for(spans, name, k, node[1][0] == "arr")))
                if keys:
                    dead[name] = keys
            spans.blocked[id(self)] = (frozenset(n for n, keys in dead.items() if keys & self.tools[n]["required"]),
                                       dead)
        return spans.blocked[id(self)]

    def _held_for(self, spans, name, key, listed):
        """What a value of this tool's key may copy (Spans.for_key). Runs held per
        tool, a required value free to copy any words may not copy those held for the
        call's other required values: they are theirs, and the call would have no way to end
        ("put Golden Gold on the The Highway Song playlist", the playlist's run taken
        by another call: only "Golden Gold" is left for it, and it is the song; a
        room may not copy "thirty-four percent", the brightness's run). Only a
        value's one run left is set aside: of two, a value takes one, and the other
        may be a word of this one ("plumber visit" with "visit" also tagged as the
        email). A tool with nothing else to copy for such a value is blocked."""
        required = key in self.tools[name]["required"]
        held = spans.for_key(key, listed, name, required)
        if held is spans and spans.by_tool and required:
            others = [spans.left(at) for at in spans.runs
                      if at[0] == name and at[1] != key and at[1] in self.tools[name]["required"]]
            held = spans.sparing(tuple(r[0] for r in others if len(r) == 1))     # (of several, one is spare)
        return held

    def open_tools(self, s):
        """Is there a tool a call could name here (one whose required arguments
        can all be written)?"""
        return len(self.blocked(s.spans)[0]) < len(self.tools)

    def _special(self, s, sym):
        if s.phase == "start":
            if sym == wire.CALL and self.choice != "none" and self.open_tools(s):
                return State("name", calls=1, spans=s.spans)
            if sym == wire.NOCALL and (self.choice in ("auto", "none") or not self.open_tools(s)):
                return State("reason", spans=s.spans)     # (a forced call no tool can make declines instead)
            return None
        if s.phase == "reason":
            return State("done", spans=s.spans) if sym == wire.END and s.text in self.reasons else None
        if s.phase == "name":
            if s.text not in self.tools:
                return None
            s = s._replace(tool=s.text, used=frozenset())
        elif s.phase != "value" or not value_done(s.value):
            return None
        elif s.spans is not None and s.key in self.tools[s.tool]["spans"]:   # the words this value took
            s = s._replace(spans=s.spans.took(s.key, s.vtext, s.tool))
        tool = self.tools[s.tool]
        if sym == wire.ARG:
            dead = self.blocked(s.spans)[1].get(s.tool, ())
            left = [k for k, _ in tool["keys"].values() if k not in s.used and k not in dead]
            return State("key", tool=s.tool, used=s.used, calls=s.calls, spans=s.spans) if left else None
        if not tool["required"] <= s.used:
            return None
        if sym == wire.END:
            return State("done", calls=s.calls, spans=s.spans)
        if sym == wire.CALL and s.calls < MAX_CALLS and self.open_tools(s):
            return State("name", calls=s.calls + 1, spans=s.spans)
        return None

    # -- what the decoder needs

    def byte_key(self, s):
        """What the set of allowed normal tokens depends on (the memo key)."""
        if s.phase == "value":
            return s.value
        if s.phase == "key":
            return ("key", s.tool, s.used, s.text)
        if s.phase == "name":
            return ("name", s.text, self.blocked(s.spans)[0])
        return (s.phase, s.text)

    def next_bytes(self, s):
        """The bytes that may come next in state s, when few and known (inside a
        span value), else None: the trie walk then skips every other branch."""
        if s.phase != "value":
            return None
        out = set()
        for stack in s.value:
            top = stack[-1] if stack else ("done",)
            if top[0] == "sp":
                out.add(32)
            elif top[0] == "sraw":
                out |= top[1].next_bytes(top[2])
            elif top[0] == "sstr":
                spans, phase, offs = top[1:]
                out |= {34} if phase == 0 else (spans.next_bytes(offs) - {34, 92}) | ({34} if spans.may_end(offs) else set())
            elif top[0] == "slist" and top[2] == 2:
                spans, _, after, offs = top[1:]
                if offs is None:
                    out |= {spans.text[a] for a in _item_starts(spans, after) if a + 1 in spans.live}
                else:
                    out |= (spans.next_bytes(offs) - {34, 92}) | ({34} if spans.may_end(offs) else set())
            else:
                return None
        return out

    def determined_text(self, s):
        """Bytes that must come next whatever the model prefers: the rest of a
        name, key or reason once only one fits (b"" if nothing is determined)."""
        if s.phase not in ("name", "reason", "key"):
            return b""
        cands = self._candidates(s)
        if len(cands) != 1:
            return b""
        return cands[0][len(s.text):]


# -----------------------------------------------------------------------------
# the vocabulary as a byte trie

class _Node:
    __slots__ = ("ids", "children", "all_ids")

    def __init__(self):
        self.ids = []           # tokens whose bytes end here
        self.children = {}      # byte -> _Node
        self.all_ids = None     # every token in this subtree (filled on first use)


class Vocab:
    """A sentencepiece tokenizer's tokens as bytes, a trie over them, and the
    memo of allowed tokens per value state (catalogue independent)."""

    def __init__(self, sp, special_ids):
        self.sp = sp
        self.size = sp.get_piece_size()
        self.special_id = {s: special_ids[s] for s in SPECIALS}
        self.id_special = {i: s for s, i in self.special_id.items()}
        self.token_bytes = [None] * self.size
        specials = set(special_ids.values())
        for i in range(self.size):
            if i in specials or sp.is_unknown(i) or sp.is_control(i):
                continue
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):
                self.token_bytes[i] = bytes([int(piece[3:5], 16)])     # <0xAB>
            else:
                self.token_bytes[i] = piece.replace("\u2581", " ").encode("utf-8")
        self.root = _Node()
        for i, tb in enumerate(self.token_bytes):
            if not tb:
                continue
            node = self.root
            for b in tb:
                node = node.children.setdefault(b, _Node())
            node.ids.append(i)
        self.normal_ids = torch.tensor([i for i, tb in enumerate(self.token_bytes) if tb])
        self.value_memo = {}

    def symbols(self, token_id):
        """A token as grammar symbols: its bytes, or the special token's string."""
        if token_id in self.id_special:
            return [self.id_special[token_id]]
        tb = self.token_bytes[token_id]
        if tb is None:
            return None                         # pad, unk, <|tools|>, <|user|>: never allowed
        return list(tb)

    def advance(self, grammar, s, token_id):
        """State after a whole token, or None if the grammar rejects it."""
        syms = self.symbols(token_id)
        if syms is None:
            return None
        for sym in syms:
            s = grammar.step(s, sym)
            if s is None:
                return None
        return s

    def encode_text(self, b):
        """Determined bytes -> token ids, tokenized the way the training data is
        (a name or key directly after a special token); None if b is not UTF-8."""
        try:
            text = b.decode("utf-8")
        except UnicodeDecodeError:
            return None
        return self.sp.encode(text)

    def _subtree(self, node):
        if node.all_ids is None:
            ids = list(node.ids)
            for child in node.children.values():
                ids += self._subtree(child)
            node.all_ids = ids
        return node.all_ids

    def allowed(self, grammar, s):
        """Token ids the grammar allows in state s: a long tensor (normal tokens
        memoised per state, then the allowed special tokens)."""
        if s.phase in ("start", "done"):
            normal = self.normal_ids[:0]
        elif s.phase == "key":
            normal = self._key_ids(grammar, s)
        else:
            memo = self.value_memo if s.phase == "value" else grammar.memo
            key = grammar.byte_key(s)
            normal = memo.get(key)
            if normal is None:
                normal = self._walk(grammar, s)
                if len(memo) > 50_000:          # bound the memory of long-running servers
                    memo.clear()
                memo[key] = normal
        specials = [i for sym, i in self.special_id.items() if grammar.step(s, sym) is not None]
        if not specials:
            return normal
        return torch.cat([normal, torch.tensor(specials, dtype=torch.long)])

    def _key_ids(self, grammar, s):
        """Allowed tokens while writing an argument name: those whose bytes go on
        with " key:" of a key not used yet. The trie walk is memoised per (tool,
        text so far) with the keys each token fits, whatever keys are used (a
        memo per set of used keys missed on almost every request of a tool with
        many optional arguments); the used ones are filtered out here."""
        memo_key = ("key", s.tool, s.text)
        fits = grammar.memo.get(memo_key)
        if fits is None:
            keys = [(k, name) for k, (name, _) in grammar.tools[s.tool]["keys"].items() if k.startswith(s.text)]
            ids, sets, todo = [], [], [(self.root, len(s.text), keys)]
            while todo:
                node, at, cands = todo.pop()
                for b, child in node.children.items():
                    left = [(k, n) for k, n in cands if len(k) > at and k[at] == b]
                    if not left:
                        continue
                    names = frozenset(n for _, n in left)
                    ids += child.ids
                    sets += [names] * len(child.ids)
                    if child.children:
                        todo.append((child, at + 1, left))
            fits = (torch.tensor(ids, dtype=torch.long), sets)
            grammar.memo[memo_key] = fits
        ids, sets = fits
        gone = s.used | grammar.blocked(s.spans)[1].get(s.tool, frozenset())    # used, or nothing to write
        keep = [i for i, names in enumerate(sets) if not names <= gone]
        return ids[keep] if len(keep) < len(sets) else ids

    def _walk(self, grammar, s):
        """Walk the trie with the automaton, pruning rejected branches."""
        if s.phase == "value" and s.value in RAW_STATES:
            return self.normal_ids
        ids, todo = [], [(self.root, s)]
        while todo:
            node, st = todo.pop()
            few = grammar.next_bytes(st)
            kids = node.children.items() if few is None else \
                [(b, node.children[b]) for b in few if b in node.children]
            for b, child in kids:
                st2 = grammar.step(st, b)
                if st2 is None:
                    continue
                if st2.phase == "value" and st2.value in RAW_STATES:
                    ids += self._subtree(child)          # free text below: everything
                    continue
                ids += child.ids
                if child.children:
                    todo.append((child, st2))
        return torch.tensor(sorted(ids), dtype=torch.long)
