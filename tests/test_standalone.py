"""The repository stands alone: a fresh clone, with nothing beside it, runs what the
README and the Makefile say.

Two checks, each over the files a user reads or runs:
- no path leads outside the repository: a `../` path in a command, docstring or default
  is resolved from the repo root (where every command runs), a Markdown link from the
  page's own folder; either must land inside the root. `/work/...` machine paths fail too.
- every file the README's or the Makefile's commands name, and every file a page of the
  README or docs links to, is in the repository
  (tracked by git when there is a .git, so an untracked local file does not pass);
  gitignored outputs (data/, out/, .venv/) are made by the commands and are skipped.

The scanning functions take the root as an argument, so a test can run them on a
planted copy and see them fail.
"""

import glob
import os
import re
import shlex
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# what a user reads or runs; the data files under evaldata/ are not text to scan
SCANNED = ["README.md", "Makefile", "docs/*.md", "evaldata/*.md", "evaldata/*/README.md",
           "*.py", "utils/*.py", "experiments/*", "examples/*.py", "tests/*.py", ".ci/*"]
# made by the commands themselves (and gitignored): they need not exist in a clone
OUTPUTS = ("data/", "out/", ".venv/")
# a "../" that starts a path: not the tail of "..." (an ellipsis) or of a word
UP_PATH = re.compile(r"(?<![\w.])((?:\.\./)+[\w.\-/]*)")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
MACHINE_PATH = re.compile(r"(?<![\w.])/work/[\w.\-/]*")
# a word that names a file of the repository in a command
FILE_LIKE = re.compile(r"^[\w.\-/]+\.(py|sh|json|jsonl|md|txt|label|in|out)$|^[\w.\-]+/[\w.\-/]*$")


def scanned_files(root):
    files = set()
    for pattern in SCANNED:
        for p in glob.glob(os.path.join(root, pattern)):
            if os.path.isfile(p):
                files.add(os.path.relpath(p, root))
    files.discard(os.path.join("tests", "test_standalone.py"))  # it holds the patterns it plants
    return sorted(files)


def inside(root, path):
    root = os.path.realpath(root)
    return os.path.normpath(os.path.join(root, path)).startswith(root + os.sep) or \
        os.path.normpath(os.path.join(root, path)) == root


def outside_paths(root):
    """[(file, line number, path)] for every path in the scanned files that leads out."""
    bad = []
    for rel in scanned_files(root):
        with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
        here = os.path.dirname(rel)
        for n, line in enumerate(lines, 1):
            links = set()
            if rel.endswith(".md"):
                for target in MD_LINK.findall(line):
                    if "://" in target or target.startswith(("#", "mailto:")):
                        continue
                    links.add(target)
                    path = target.split("#")[0]
                    if path and not inside(root, os.path.join(here, path)):
                        bad.append((rel, n, target))
            for path in UP_PATH.findall(line):
                if any(path in t for t in links):
                    continue  # a Markdown link, judged from its page's folder above
                if not inside(root, path):
                    bad.append((rel, n, path))
            bad += [(rel, n, p) for p in MACHINE_PATH.findall(line)]
    return bad


def readme_commands(root):
    """The shell commands of the README: lines of its ```bash blocks and inline `code`
    that starts with a command."""
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        text = f.read()
    commands = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
        commands += block.replace("\\\n", " ").splitlines()
    starts = ("python ", ".venv/bin/python ", "make ", "bash ", "time ")
    commands += [c for c in re.findall(r"`([^`\n]+)`", text) if c.startswith(starts)]
    return commands


def makefile_commands(root):
    """Every recipe line of the Makefile's targets, variables expanded (make -n)."""
    if shutil.which("make") is None:
        pytest.skip("no make here")
    out = subprocess.run(["make", "-n", "-B", "-C", root, "--no-print-directory", "demo", "atis", "test"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def named_files(command):
    """The words of a command that name files of the repository."""
    command = command.split("#")[0]
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    names = []
    for w in words:
        w = w.split("=", 1)[1] if w.startswith("-") and "=" in w else w
        if w.startswith(("-", "$", "<", ">", "http")) or w in ("...",):
            continue
        if FILE_LIKE.match(w) and not w.startswith(OUTPUTS) and "/" + w != os.devnull:
            names.append(w.rstrip("/"))
    return names


def tracked(root):
    """The files a clone has: git's list when there is a .git, else what is on disk."""
    if os.path.exists(os.path.join(root, ".git")) and shutil.which("git"):
        out = subprocess.run(["git", "-C", root, "ls-files"], capture_output=True, text=True)
        if out.returncode == 0:
            files = set(out.stdout.splitlines())
            folders = {"/".join(f.split("/")[:k]) for f in files for k in range(1, f.count("/") + 1)}
            return files | folders
    return None


def missing_files(root, commands):
    have = tracked(root)
    missing = []
    for c in commands:
        for name in named_files(c):
            ok = name in have if have is not None else os.path.exists(os.path.join(root, name))
            if not ok:
                missing.append((name, c.strip()))
    return missing


def heading_anchors(text):
    """The #anchors GitHub gives a page's headings (code blocks are not headings)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}


def broken_links(root):
    """[(page, target)] for every relative Markdown link whose file a clone lacks, or
    whose #anchor names no heading of the page it leads to."""
    have = tracked(root)
    pages = {}
    for rel in scanned_files(root):
        if rel.endswith(".md"):
            with open(os.path.join(root, rel), encoding="utf-8") as f:
                pages[rel] = f.read()
    bad = []
    for rel, text in pages.items():
        for target in MD_LINK.findall(text):
            if "://" in target or target.startswith("mailto:"):
                continue
            path, _, anchor = target.partition("#")
            name = os.path.normpath(os.path.join(os.path.dirname(rel), path)) if path else rel
            if not (name in have if have is not None else os.path.exists(os.path.join(root, name))):
                bad.append((rel, target))
            elif anchor and name in pages and anchor not in heading_anchors(pages[name]):
                bad.append((rel, target))
    return bad


# -----------------------------------------------------------------------------


def test_nothing_points_outside_the_repository():
    bad = outside_paths(ROOT)
    assert not bad, "paths leading outside the repository:\n" + "\n".join(f"{f}:{n}: {p}" for f, n, p in bad)


def test_a_planted_outside_path_is_found(tmp_path):
    """The scan must be able to fail: a copy with ../shared in a script's docstring,
    another with an up-and-out Markdown link, and one with a machine path."""
    for rel, text in [("planted.py", '"""\n    python eval.py --when2call ../shared/eval/x.jsonl\n"""\n'),
                      ("docs/planted.md", "[design](../../shared/DESIGN.md)\n"),
                      ("utils/planted.py", 'DEFAULT = "/work/shared/eval/atis"\n')]:
        (tmp_path / "docs").mkdir(exist_ok=True)
        (tmp_path / "utils").mkdir(exist_ok=True)
        (tmp_path / rel).write_text(text)
        assert [b[0] for b in outside_paths(str(tmp_path))] == [rel], rel
        os.remove(tmp_path / rel)
    # and what stays inside passes: a link up from docs/ to the README, an ellipsis
    (tmp_path / "docs" / "ok.md").write_text("[back](../README.md) `can't open '.../bench.py'`\n")
    assert outside_paths(str(tmp_path)) == []


def test_every_file_the_readme_commands_name_is_in_the_repository():
    commands = readme_commands(ROOT)
    assert any("make atis" in c for c in commands) and any("--when2call" in c for c in commands)
    missing = missing_files(ROOT, commands)
    assert not missing, "README commands name files a clone lacks:\n" + "\n".join(f"{n}  ({c})" for n, c in missing)


def test_every_file_the_makefile_names_is_in_the_repository():
    commands = makefile_commands(ROOT)
    assert any("evaldata/atis" in c for c in commands)
    missing = missing_files(ROOT, commands)
    assert not missing, "Makefile commands name files a clone lacks:\n" + "\n".join(f"{n}  ({c})" for n, c in missing)


def test_every_link_of_the_readme_and_docs_leads_to_a_file_of_the_repository():
    bad = broken_links(ROOT)
    assert not bad, "links to files a clone lacks:\n" + "\n".join(f"{p}: {t}" for p, t in bad)


def test_the_evaluation_sets_are_complete():
    """What make atis and the README's external-set commands read, with each license."""
    for split in ("train", "valid", "test"):
        for ext in ("seq.in", "seq.out", "label"):
            with open(os.path.join(ROOT, "evaldata", "atis", f"{split}.{ext}"), encoding="utf-8") as f:
                n = sum(1 for _ in f)
            assert n == {"train": 4478, "valid": 500, "test": 893}[split], (split, ext, n)
    for f in ["evaldata/atis/LICENSE", "evaldata/when2call/LICENSE.txt", "evaldata/apibank/LICENSE",
              "evaldata/when2call/when2call_test_llm_judge.jsonl", "evaldata/apibank/level-1-api.json"]:
        assert os.path.getsize(os.path.join(ROOT, f)) > 1000, f
    for d in ("atis", "when2call", "apibank"):
        with open(os.path.join(ROOT, "evaldata", d, "README.md"), encoding="utf-8") as f:
            text = f.read().lower()
        assert "license" in text and "apache" in text and "scored" in text, d


def test_a_file_the_commands_need_that_a_clone_lacks_is_found(tmp_path):
    (tmp_path / "README.md").write_text("```bash\npython eval.py --apibank evaldata/apibank/gone.json\n"
                                        "python train.py --out_dir out/x\n```\n[gone](docs/gone.md) [here](eval.py) "
                                        "[up](#two-commands) [down](#moved)\n\n## Two commands\n")
    (tmp_path / "eval.py").write_text("")
    (tmp_path / "train.py").write_text("")
    assert missing_files(str(tmp_path), readme_commands(str(tmp_path))) == \
        [("evaldata/apibank/gone.json", "python eval.py --apibank evaldata/apibank/gone.json")]
    assert broken_links(str(tmp_path)) == [("README.md", "docs/gone.md"), ("README.md", "#moved")]


def test_make_atis_reads_the_shipped_split_as_its_readme_counts_it():
    """The loader make atis uses, on the files in the repository (the When2Call and
    API-Bank loaders are tested on small files in test_eval.py: on the full files they
    take ~20 s)."""
    import formats
    tools, splits = formats.load_intent_slot_dir(os.path.join(ROOT, "evaldata", "atis"))
    assert len(tools) == 21 and {k: len(v) for k, v in splits.items()} == {"train": 4478, "val": 500, "test": 893}
