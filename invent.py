"""
Tools nobody wrote by hand, and requests for tools we did not write.

A model trained on a fixed list of tools learns that list. To make it read tool
names, descriptions and parameter names instead, about half of the training
tools are invented here from parts: a verb, an object, and 1-4 parameters drawn
from a library of parameter kinds (every JSON Schema type we support: string,
integer, number, boolean, enum, array; required and optional).

Both invented tools and a user's own tools (`data.py --tools my_tools.json`)
become catalogue entries of the same shape synth.py reads (tool + slot kinds +
request templates + missing-value phrasings), so one generator serves all three
sources. For a user's tool the slot kind of each parameter is guessed from its
name, type and description (PARAM_RULES), and the request templates are built
from the tool's name and the parameters' phrasings; labelling those requests
with a teacher (data.py --teacher) fixes what the guesses get wrong.

Also here: surface noise for request templates (typos, spoken disfluencies),
applied to the template's own words only, never to the values it carries.
"""

import copy
import random
import re

# -----------------------------------------------------------------------------
# parts of invented tools

VERBS = {   # verb in the tool name -> how people say it
    "create": ["create", "make", "add", "set up", "start"],
    "add": ["add", "create", "put in", "register"],
    "register": ["register", "sign up", "enroll", "add"],
    "schedule": ["schedule", "book", "plan", "set up"],
    "cancel": ["cancel", "call off", "scrap", "drop"],
    "delete": ["delete", "remove", "get rid of", "erase"],
    "update": ["update", "change", "edit", "modify"],
    "rename": ["rename", "change the name of"],
    "get": ["get", "show me", "fetch", "look up", "pull up"],
    "check": ["check", "look at", "verify", "see"],
    "list": ["list", "show all", "give me the list of", "show"],
    "find": ["find", "search for", "look for", "locate"],
    "assign": ["assign", "hand over", "give"],
    "approve": ["approve", "accept", "sign off on", "okay"],
    "reject": ["reject", "decline", "deny", "turn down"],
    "export": ["export", "download", "save out"],
    "print": ["print", "print out"],
    "archive": ["archive", "file away", "put away"],
    "restore": ["restore", "bring back", "recover", "undelete"],
    "share": ["share", "send", "pass on"],
    "start": ["start", "begin", "kick off", "launch"],
    "stop": ["stop", "end", "halt", "finish"],
    "pause": ["pause", "hold", "put on hold"],
    "resume": ["resume", "continue", "restart", "pick up"],
    "rate": ["rate", "review", "score"],
    "report": ["report", "flag", "file a report on"],
    "book": ["book", "reserve", "grab", "get"],
    "renew": ["renew", "extend", "prolong"],
    "move": ["move", "transfer", "relocate", "shift"],
    "track": ["track", "follow", "monitor", "keep an eye on"],
    "log": ["log", "record", "write down", "note"],
    "request": ["request", "ask for", "put in a request for"],
    "submit": ["submit", "send in", "hand in", "file"],
    "duplicate": ["duplicate", "copy", "clone"],
    "lock": ["lock", "secure", "freeze"],
    "unlock": ["unlock", "open up", "unfreeze"],
}

OBJECTS = [
    "invoice", "support ticket", "parking permit", "library book", "gym locker",
    "volunteer shift", "quiz", "poll", "badge", "coupon", "fleet vehicle", "bug report",
    "pet vaccination", "plant watering", "aquarium reading", "drone flight", "print job",
    "meeting room", "grant application", "wine bottle", "lab sample", "warehouse bin",
    "training course", "job posting", "candidate", "lease", "maintenance request",
    "delivery slot", "tutoring session", "recipe card", "budget line", "tax form",
    "insurance claim", "guest pass", "visitor log", "bike rental", "storage unit",
    "garden plot", "chore", "allowance", "study group", "flashcard deck", "school trip",
    "carpool", "laundry pickup", "dog walk", "babysitter", "cleaning visit", "voucher",
    "membership", "loyalty card", "gift registry", "wishlist item", "book club meeting",
    "podcast episode", "newsletter", "survey", "feedback form", "timesheet", "expense report",
    "purchase order", "shipment", "return label", "warranty", "repair order", "lab booking",
    "telescope session", "studio slot", "rehearsal", "costume", "ticket batch", "raffle",
    "fundraiser", "donation", "pledge", "seed order", "beehive inspection", "compost pickup",
    "solar panel report", "water meter reading", "server backup", "api key", "user account",
    "password reset", "vpn session", "kanban card", "sprint", "release note", "feature flag",
]

# Parameter library: (name variants, JSON type, description, slot kind, phrasings).
# In phrasings {v} is the value and {o} the object ("invoice"). enum kinds carry
# their values; bool phrasings are (true phrasings, false phrasings).
PARAMS = [
    (["name", "title", "label"], "string", "Name of the {o}.", "title",
     ["called {v}", "named {v}", "titled {v}", "with the name {v}"]),
    (["owner", "assignee", "person", "contact_name"], "string", "Person responsible for the {o}.", "person",
     ["for {v}", "assigned to {v}", "owned by {v}", "for {v} to handle"]),
    (["date", "due_date", "start_date", "on_date"], "string", "Date of the {o}.", "date",
     ["on {v}", "for {v}", "dated {v}", "due {v}"]),
    (["time", "start_time", "at_time"], "string", "Time of day.", "time",
     ["at {v}", "starting {v}", "around {v}"]),
    (["city", "location", "place"], "string", "Where the {o} is.", "city",
     ["in {v}", "at {v}", "over in {v}", "located in {v}"]),
    (["quantity", "count", "number"], "integer", "How many.", "int:1:60",
     ["{v} of them", "quantity {v}", "times {v}", "{v} units"]),
    (["priority", "urgency", "level"], "string", "How urgent the {o} is.",
     ("enum", ["low", "medium", "high", "urgent"]),
     ["with {v} priority", "{v} priority", "marked {v}"]),
    (["notes", "comment", "description", "details"], "string", "Free-text notes.", "note",
     ["with the note {v}", "noting {v}", "comment: {v}", "and add {v}"]),
    (["email", "recipient_email", "contact_email"], "string", "Email address.", "email",
     ["to {v}", "send it to {v}", "email {v}", "cc {v}"]),
    (["amount", "price", "cost"], "number", "Amount of money.", "amount",
     ["for {v} dollars", "costing {v}", "worth {v}", "of {v} bucks"]),
    (["{o}_id", "id", "reference"], "string", "Identifier of the {o}.", "code",
     ["number {v}", "{v}", "code {v}", "with id {v}", "ref {v}"]),
    (["tags", "labels", "keywords"], "array", "Tags to attach.", "list:title_nouns",
     ["tagged {v}", "with tags {v}", "labelled {v}"]),
    (["notify", "send_notification", "alert"], "boolean", "Notify the people involved.", "bool",
     (["and notify everyone", "and send a notification", "and let people know"],
      ["without notifying anyone", "quietly, no notification", "and don't alert anyone"])),
    (["public", "is_public", "shared"], "boolean", "Visible to everyone.", "bool",
     (["and make it public", "visible to everyone", "and share it publicly"],
      ["and keep it private", "not public", "private only"])),
    (["duration_minutes", "minutes", "length_min"], "integer", "Length in minutes.", "int:5:180",
     ["for {v} minutes", "lasting {v} min", "{v} minutes long"]),
    (["color", "colour", "theme"], "string", "Colour.",
     ("enum", ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]),
     ["in {v}", "colored {v}", "the {v} one"]),
    (["size"], "string", "Size.", ("enum", ["small", "medium", "large", "extra large"]),
     ["{v} size", "in {v}", "size {v}"]),
    (["format", "file_format", "output"], "string", "Output format.",
     ("enum", ["pdf", "csv", "xlsx", "json", "docx", "png"]),
     ["as {v}", "in {v} format", "as a {v} file"]),
    (["language", "lang", "locale"], "string", "Language to use.", "language",
     ["in {v}", "in the {v} language", "translated to {v}"]),
    (["phone", "phone_number", "mobile"], "string", "Phone number.", "phone",
     ["at {v}", "phone {v}", "call {v}", "number {v}"]),
    (["rating", "stars", "score"], "integer", "Rating from 1 to 5.", "int:1:5",
     ["{v} stars", "a rating of {v}", "score it {v}"]),
    (["percent", "percentage", "level_pct"], "integer", "Percentage, 0-100.", "int:0:100",
     ["to {v} percent", "at {v}%", "{v} percent"]),
    (["weight_kg", "weight", "kg"], "number", "Weight in kilograms.", "number:0.5:80",
     ["{v} kg", "weighing {v} kilos", "at {v} kilograms"]),
    (["temperature", "temp_c", "degrees"], "number", "Temperature in Celsius.", "number:-10:40",
     ["at {v} degrees", "{v}°C", "set to {v} degrees"]),
    (["address", "street_address", "delivery_address"], "string", "Street address.", "address",
     ["at {v}", "to {v}", "address {v}"]),
    (["country", "region"], "string", "Country.", "country",
     ["in {v}", "for {v}", "from {v}"]),
    (["message", "text", "body"], "string", "Message text.", "message",
     ["saying {v}", "with the message {v}", "that says {v}"]),
    (["url", "link", "website"], "string", "Web address.", "url",
     ["at {v}", "link {v}", "from {v}"]),
]
NAME_STYLES = ["snake"] * 6 + ["camel", "pascal", "dotted"]
OPENERS = ["", "", "Please ", "Can you ", "Could you ", "I need to ", "I want to ", "hey, ",
           "Go ahead and ", "I'd like to ", "Quick one: ", "Would you ", "pls ", "Help me "]
CLOSERS = ["", ".", ".", "?", " please", ", thanks", " asap", " for me", "!"]


def words_of(name):
    """track_order / trackOrder / Orders.track -> ['track', 'order']"""
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name.split(".")[-1])
    return [w.lower() for w in re.split(r"[_\-\s]+", name) if w]


def style_name(parts, style, rng):
    if style == "camel":
        return parts[0] + "".join(p.title() for p in parts[1:])
    if style == "pascal":
        return "".join(p.title() for p in parts)
    if style == "dotted":
        return rng.choice(["api", "tools", "svc", "v2", "app"]) + "." + "_".join(parts)
    return "_".join(parts)


def _phrases_for(spec, key):
    """Phrasings of one parameter with the placeholder written in."""
    phr = spec[4]
    if spec[3] == "bool":
        return phr
    return [p.replace("{v}", "{" + key + "}") for p in phr]


def invent_tool(rng, taken=()):
    """-> a catalogue entry (tool, slot kinds, request templates, missing phrasings)."""
    for attempt in range(100):
        verb, obj = rng.choice(sorted(VERBS)), rng.choice(OBJECTS)
        style = rng.choice(NAME_STYLES)
        name = style_name([verb] + obj.split(), style, rng)
        if name not in taken:
            break
    else:
        name = f"{name}_{len(taken)}"
    specs = rng.sample(PARAMS, rng.choice([1, 2, 2, 3, 3, 4]))
    props, slots, phrasings, required = {}, {}, {}, []
    obj_key = obj.replace(" ", "_")
    for i, spec in enumerate(specs):
        key = rng.choice(spec[0]).replace("{o}", obj_key)
        if style in ("camel", "pascal"):
            key = style_name(key.split("_"), "camel", rng)
        jtype, desc, kind = spec[1], spec[2].replace("{o}", obj), spec[3]
        prop = {"type": jtype, "description": desc}
        if isinstance(kind, tuple):
            prop["enum"] = rng.sample(kind[1], rng.randint(3, len(kind[1])))
            kind = "enum"
        if jtype == "array":
            prop["items"] = {"type": "string"}
        if rng.random() < 0.15:
            del prop["description"]
        props[key], slots[key] = prop, kind
        phrasings[key] = _phrases_for(spec, key)
        if jtype != "boolean" and (not required or rng.random() < 0.5):
            required.append(key)
    verb_says = VERBS[verb]
    desc = rng.choice([f"{verb.title()} a {obj}.", f"{verb.title()} a {obj} in the system.",
                       f"Use this to {verb} a {obj}.", f"{verb.title()}s a {obj}",
                       f"{verb.title()} {obj}s for the user."])
    tool = {"name": name, "description": desc,
            "parameters": {"type": "object", "properties": props, "required": required}}
    entry = entry_from_parts(tool, slots, phrasings, verb_says, obj, rng, domain="invented")
    entry["object"] = obj   # two invented tools on one object would make requests ambiguous
    return entry


def entry_from_parts(tool, slots, phrasings, verb_says, obj, rng, domain, n_templates=14):
    """Request templates from the parts: opener + verb + object + parameter
    phrasings (all required, some optional, shuffled) + closer. Boolean
    parameters become constant arguments of object templates."""
    props = tool["parameters"]["properties"]
    required = set(tool["parameters"].get("required", []))
    templates, seen = [], set()
    for _ in range(n_templates * 3):
        if len(templates) >= n_templates:
            break
        keys = [k for k in props if k in required or rng.random() < 0.5]
        rng.shuffle(keys)
        bits, consts = [], {}
        for k in keys:
            if slots[k] == "bool":
                val = rng.random() < 0.5
                bits.append(rng.choice(phrasings[k][0 if val else 1]))
                consts[k] = val
            else:
                bits.append(rng.choice(phrasings[k]))
        article = rng.choice(["a ", "the ", "a new ", "my ", ""]) if obj else ""
        body = f"{rng.choice(verb_says)} {article}{obj}".rstrip()
        sep = rng.choice([" ", " ", ", "])
        text = rng.choice(OPENERS) + body + (" " + sep.join(bits) if bits else "") + rng.choice(CLOSERS)
        text = text[0].upper() + text[1:] if rng.random() < 0.6 else text
        if text in seen:
            continue
        seen.add(text)
        templates.append({"text": text, "args": consts} if consts else text)
    missing = {}
    for k in sorted(required):
        if slots[k] in ("bool", "enum") or props[k].get("type") != "string":
            continue
        # every other required value is given, so k is the one missing argument
        others = [o for o in props if o in required and o != k and slots[o] != "bool"]
        phr = set()
        for _ in range(4):
            bits = " ".join(rng.choice(phrasings[o]) for o in others)
            m = f"{rng.choice(OPENERS)}{rng.choice(verb_says)} {rng.choice(['a ', 'the ', 'my '])}{obj}"
            phr.add((m + (" " + bits if bits else "") + rng.choice(CLOSERS)).strip())
        missing[k] = sorted(m[0].upper() + m[1:] for m in phr)
    return {"domain": domain, "tool": tool, "slots": slots, "requests": templates, "missing": missing}


# -----------------------------------------------------------------------------
# a user's own tools: guess each parameter's kind, then build templates

PARAM_RULES = [  # (pattern over the parameter name + description, slot kind, phrasings)
    (r"e-?mail", "email", ["to {v}", "email {v}"]),
    (r"phone|mobile", "phone", ["at {v}", "number {v}"]),
    (r"city|town|location|destination|origin|place", "city", ["in {v}", "for {v}"]),
    (r"country|nation", "country", ["in {v}", "for {v}"]),
    (r"address|street", "address", ["at {v}", "to {v}"]),
    (r"date|day|deadline", "date", ["on {v}", "for {v}"]),
    (r"time|hour", "time", ["at {v}"]),
    (r"contact|person|recipient|user|name|owner|assignee|author", "person", ["for {v}", "{v}"]),
    (r"message|text|body|content|note|comment", "message", ["saying {v}", "with the text {v}"]),
    (r"song|track", "song", ["{v}"]),
    (r"artist|singer|band", "artist", ["by {v}"]),
    (r"movie|film|show", "movie", ["{v}"]),
    (r"product|item", "product", ["{v}"]),
    (r"query|search|keyword|term|topic", "query", ["about {v}", "for {v}"]),
    (r"language|lang", "language", ["in {v}"]),
    (r"currency", "currency", ["in {v}"]),
    (r"symbol|ticker", "ticker", ["{v}"]),
    (r"id$|_id|code|number|reference|ref", "code", ["{v}", "number {v}"]),
    (r"url|link|website", "url", ["at {v}"]),
    (r"title|subject|label", "title", ["called {v}", "titled {v}"]),
]


def guess_slot(key, prop):
    """-> (slot kind, phrasings with {v}) for one parameter of a user's tool."""
    words = " ".join(words_of(key))
    text = f"{key} {words} {prop.get('description', '')}".lower()
    jtype = prop.get("type")
    jtype = jtype[0] if isinstance(jtype, list) else jtype
    if "enum" in prop:
        return "enum", [f"{words} {{v}}", "{v}", f"with {words} {{v}}"]
    if jtype == "boolean":
        return "bool", ([f"with {words} on", f"and set {words} to true"],
                        [f"with {words} off", f"and set {words} to false"])
    if jtype in ("integer", "number"):
        lo, hi = prop.get("minimum", 1), prop.get("maximum", 100 if jtype == "integer" else 500)
        kind = f"{'int' if jtype == 'integer' else 'number'}:{int(lo)}:{int(hi)}"
        return kind, [f"{words} {{v}}", f"with {words} {{v}}", f"{{v}} {words}"]
    if jtype == "array":
        return "list:title_nouns", [f"{words} {{v}}", f"with {words} {{v}}"]
    for pattern, kind, phrasings in PARAM_RULES:
        if re.search(pattern, text):
            return kind, phrasings + [f"{words} {{v}}", f"with {words} {{v}}"]
    return "title", [f"{words} {{v}}", f"with {words} {{v}}", f"{words}: {{v}}"]


def entry_from_tool(tool, rng, domain="user"):
    """A user's tool (bare form) -> a catalogue entry with guessed slots and
    generic request templates."""
    slots, phrasings = {}, {}
    for key, prop in tool["parameters"].get("properties", {}).items():
        kind, phr = guess_slot(key, prop)
        slots[key] = kind
        phrasings[key] = phr if kind == "bool" else [p.replace("{v}", "{" + key + "}") for p in phr]
    words = words_of(tool["name"])
    if words and words[0] in VERBS:
        verb_says, obj = VERBS[words[0]], " ".join(words[1:])
    else:
        verb_says, obj = ["use", "run", "call"], " ".join(words)
    return entry_from_parts(tool, slots, phrasings, verb_says, obj, rng, domain=domain, n_templates=20)


# -----------------------------------------------------------------------------
# rephrasing hand-written tools, and noise on request templates

def rephrase_tool(entry, rng):
    """A copy of a catalogue entry whose description is reworded and whose
    parameter descriptions are sometimes dropped; the name stays (calls keep it)."""
    e = copy.deepcopy(entry)
    t = e["tool"]
    d = t.get("description", "").rstrip(".")
    if d:
        low = d[0].lower() + d[1:]
        t["description"] = rng.choice([d, d + ".", f"Use this to {low}.", f"Tool: {low}",
                                       f"{d}. Call when the user asks.", low])
    for p in t["parameters"]["properties"].values():
        if "description" in p and rng.random() < 0.2:
            del p["description"]
    return e


FILLERS = ["um, ", "uh, ", "so ", "okay so ", "like, ", "hmm ", "well, ", "right, "]
PLACEHOLDER_SPLIT = re.compile(r"(\{[A-Za-z_][A-Za-z0-9_]*\})")


def typo(word, rng):
    if len(word) < 4 or not word.isalpha():
        return word
    i = rng.randrange(1, len(word) - 1)
    op = rng.choice(["swap", "drop", "double"])
    if op == "swap":
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if op == "drop":
        return word[:i] + word[i + 1:]
    return word[:i] + word[i] + word[i:]


def noisy(template, rng, p_typo=0.08, p_filler=0.08):
    """Typos and spoken fillers in a template's own words; the {placeholders}
    (the values that must be copied exactly) are left alone."""
    text = template["text"] if isinstance(template, dict) else template
    if rng.random() < p_typo:
        parts = PLACEHOLDER_SPLIT.split(text)
        lit = [i for i, s in enumerate(parts) if not PLACEHOLDER_SPLIT.fullmatch(s) and s.strip()]
        if lit:
            i = rng.choice(lit)
            ws = parts[i].split(" ")
            j = rng.randrange(len(ws))
            ws[j] = typo(ws[j], rng)
            parts[i] = " ".join(ws)
            text = "".join(parts)
    if rng.random() < p_filler:
        filler = rng.choice(FILLERS)
        if rng.random() < 0.5 or ", " not in text:
            text = filler + (text[0].lower() + text[1:] if text[:2] != "I " else text)
        else:
            a, b = text.split(", ", 1)
            text = f"{a}, {filler}{b}"
    if isinstance(template, dict):
        return {**template, "text": text}
    return text


NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n):
    """0..999 -> English words ('forty-two'); None outside that range."""
    if not 0 <= n <= 999:
        return None
    if n < 20:
        return NUMBER_WORDS[n]
    if n < 100:
        return TENS[n // 10] + ("-" + NUMBER_WORDS[n % 10] if n % 10 else "")
    rest = n % 100
    return NUMBER_WORDS[n // 100] + " hundred" + (" and " + number_words(rest) if rest else "")


def invent_tools(n, seed, taken=()):
    rng = random.Random(seed)
    taken = set(taken)
    out = []
    for _ in range(n):
        e = invent_tool(rng, taken)
        taken.add(e["tool"]["name"])
        out.append(e)
    return out
