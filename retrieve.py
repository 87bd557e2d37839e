"""
Retrieval before the model: when a catalogue is longer than k tools, keep the k
most related to the request (BM25, Robertson & Zaragoza 2009), in their original
order, so the general router reads a short prompt.

    python retrieve.py --tools examples/tools.json --k 2 "Where's my order ORD-1234?"
    python sample.py --ckpt out/general/best.pt --tools many_tools.json "..."     # the router keeps 8 (--retrieve_k)
    python utils/recall.py --jsonl data/general/val.jsonl      # how often the gold tools are kept

Prints the kept tools with their scores. Lexical on purpose: no model, no dependency,
0.1 ms a request against 154 tools (building the index: 4 ms, once per catalogue),
and it reads in one sitting.

Each tool is one document: the words of its name (snake_case and camelCase split),
its description, its parameters' names, their descriptions and enum values. Words
are lowercase runs of letters and digits, less a few function words (STOPWORDS);
no stemming. utils/recall.py measured these choices against other variants on our
validation split (docs/results.md). A catalogue of k tools or fewer is returned as
it is. A compiled-catalogue model has its tools in its weights and never
retrieves; Router.retrieve_k applies this to a catalogue in the prompt.
"""

import argparse
import math
import re
import sys
from collections import Counter

K1, B = 1.2, 0.75          # BM25's usual term saturation and length normalization
FIELDS = ("name", "description", "param_names", "param_descriptions", "enums")
# Words that say nothing about which tool is meant. BM25's idf cannot tell this alone
# in a catalogue of a few tools ("the" may be in one description of five); dropping
# them kept 1-2% more gold tools at k = 3 and 5 on our validation split.
STOPWORDS = frozenset("a an the to of in on at for from by with and or i me my you your it is be this that "
                      "can could would please like want need what how do".split())


def words(text):
    """Text -> lowercase words: snake_case, camelCase, punctuation and digits split
    ("getAPIToken" -> get api token)."""
    text = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1 \2", text)    # APIToken -> API Token
    text = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", text)       # getApi -> get Api
    return re.findall(r"[a-z0-9]+", text.lower())


def tool_text(tool, fields=FIELDS):
    """The text a tool is indexed by: its name, description and parameters (as fields say)."""
    props = tool.get("parameters", {}).get("properties", {})
    parts = {"name": [tool["name"]], "description": [tool.get("description") or ""],
             "param_names": list(props),
             "param_descriptions": [p.get("description") or "" for p in props.values() if isinstance(p, dict)],
             "enums": [str(v) for p in props.values() if isinstance(p, dict) for v in p.get("enum", [])]}
    return " ".join(s for f in fields for s in parts[f])


class Index:
    """BM25 over one catalogue: built once (a Router keeps one per catalogue it
    meets), then scores any request against every tool."""

    def __init__(self, tools, fields=FIELDS, stop=STOPWORDS, k1=K1, b=B, split=words):
        self.tools, self.stop, self.k1, self.b, self.split = tools, stop, k1, b, split
        self.docs = [Counter(self.words(tool_text(t, fields))) for t in tools]     # word -> count, per tool
        self.lens = [sum(d.values()) for d in self.docs]
        self.avg_len = sum(self.lens) / max(1, len(self.lens)) or 1.0
        n_with = Counter(w for d in self.docs for w in d)                          # tools holding each word
        n = len(tools)
        self.idf = {w: math.log(1 + (n - m + 0.5) / (m + 0.5)) for w, m in n_with.items()}

    def words(self, text):
        return [w for w in self.split(text) if w not in self.stop]

    def scores(self, request):
        """BM25 score of each tool for the request (each distinct request word counts once)."""
        q = [w for w in set(self.words(request)) if w in self.idf]
        out = []
        for d, n in zip(self.docs, self.lens):
            norm = self.k1 * (1 - self.b + self.b * n / self.avg_len)
            out.append(sum(self.idf[w] * d[w] * (self.k1 + 1) / (d[w] + norm) for w in q if w in d))
        return out

    def top_k(self, request, k, keep=()):
        """The k tools scoring highest (ties: the earlier tool), plus any named in
        keep (a tool_choice), in catalogue order; all of them if there are <= k."""
        if len(self.tools) <= k:
            return self.tools
        s = self.scores(request)
        best = sorted(range(len(s)), key=lambda i: (-s[i], i))[:k]
        chosen = set(best) | {i for i, t in enumerate(self.tools) if t["name"] in keep}
        return [t for i, t in enumerate(self.tools) if i in chosen]


def top_k(tools, request, k, keep=()):
    """The k tools of a catalogue most related to the request, in their order
    (the catalogue itself when it has k or fewer); names in keep are kept too."""
    return tools if len(tools) <= k else Index(tools).top_k(request, k, keep)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("request", help="the user's request, in quotes")
    p.add_argument("--tools", required=True, help="JSON list of tool definitions")
    p.add_argument("--k", type=int, default=8, help="tools kept")
    args = p.parse_args(argv)
    import wire
    from runtime import die
    if args.k < 1:
        die(f"--k is the number of tools kept, at least 1; got {args.k}")
    try:
        tools = wire.load_tools(args.tools)
    except wire.ToolError as e:
        die(str(e))
    index = Index(tools)
    score = dict(zip((t["name"] for t in tools), index.scores(args.request)))
    kept = index.top_k(args.request, args.k)
    for t in kept:
        print(f"{score[t['name']]:7.3f}  {t['name']}")
    print(f"kept {len(kept)} of {len(tools)} tools", file=sys.stderr)


if __name__ == "__main__":
    main()
