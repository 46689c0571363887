"""Every code block of README.md and docs/*.md runs in a test, and docs/cli.md is what the parsers say.

- docs/cli.md equals ``scripts/gen_cli_docs.py``'s rendering of ``knnlm.cli._build_parser()``.
- Every fence has a language: ``python`` (run), ``bash`` (commands checked), ``text`` (output, file
  layouts; its ``$ knnlm ...`` lines are checked like bash) or ``json`` (must parse).
- ``python`` blocks: all blocks of a page run in order in one namespace, in a fresh directory that
  holds ``corpus/``, ``my_docs/``, ``tune_text/`` and ``held_out/`` (small stdlib files,
  ``SANDBOX``), with ``knnlm.load_model`` returning the tiny random Llama and tokenizer of
  ``knnlm.testing`` instead of SmolLM2; then the whole page runs a second time in the same
  directory (a reader reruns a snippet). A comment ``<!-- test: tiny-store PATH -->`` on the line
  above a block builds a tiny datastore at PATH first (for a block that opens a datastore the page
  built with the CLI).
- ``bash`` blocks: every ``knnlm ...`` command (also under ``torchrun -m knnlm``, ``python -m knnlm``,
  ``nohup``, ``/usr/bin/time -v`` and ``benchmarks/peak_rss.py --``) is parsed by
  ``knnlm.cli._build_parser()``, so a flag or subcommand that does not exist fails; ``$(...)`` counts
  as one path. Other commands are checked by lighter means (``check_command``: the module or script
  exists and defines every ``--flag`` used, the pip extra exists, ...) or skipped with the reason in ``SKIPPED``;
  a command in neither fails.
- Relative links between the pages (and their ``#anchors``) resolve.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import importlib
import importlib.util
import io
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from knnlm.testing import CORPUS_FILES

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGS = {"python", "bash", "text", "json"}

# commands that the docs show but this test cannot run or check, and why
SKIPPED = {
    "export": "sets a shell variable",
    "cp": "copies files (the knnlm commands around it are checked)",
    "apt-get": "installs a system package",
    "nvidia-smi": "needs a GPU",
    "cd": "changes directory",
    "mkdir": "makes a directory",
    "cat": "prints a file (inside $(...): a file list the docs' own commands wrote)",
}


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# ------------------------------------------------------------------------------------ the blocks
@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the first line of the body
    lang: str
    body: str
    marker: str | None  # the text of a `<!-- test: ... -->` comment right above the fence

    @property
    def id(self) -> str:
        return f"{rel(self.path)}:{self.line}"


_FENCE = re.compile(r"^(\s*)```(.*)$")
_MARKER = re.compile(r"^\s*<!--\s*test:\s*(.*?)\s*-->\s*$")


def blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang = m.group(1), m.group(2).strip()
        prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        mk = _MARKER.match(prev)
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        assert j < len(lines), f"{rel(path)}:{i + 1}: unclosed ``` fence"
        body = "\n".join(x[len(indent):] if x.startswith(indent) else x for x in lines[i + 1: j])
        out.append(Block(path, i + 2, lang, body + "\n", mk.group(1) if mk else None))
        i = j + 1
    return out


ALL = [b for p in PAGES for b in blocks(p)]


def test_the_pages_have_code_blocks():
    assert (ROOT / "docs" / "cli.md") in PAGES and len(ALL) > 20


@pytest.mark.parametrize("block", ALL, ids=lambda b: b.id)
def test_every_fence_is_labelled(block):
    assert block.lang in LANGS, (f"{block.id}: fence ```{block.lang}: use ```python (run), ```bash (checked), "
                                 "```text (output, layouts) or ```json")
    if block.lang == "json":
        json.loads(block.body)


# ------------------------------------------------------------------------------------ docs/cli.md
def _gen_cli_docs():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_reference_is_generated_from_the_parsers():
    expected = _gen_cli_docs().render()
    assert (ROOT / "docs" / "cli.md").read_text() == expected, \
        "docs/cli.md differs from the argparse parsers: run python scripts/gen_cli_docs.py"


def test_cli_reference_covers_every_option():
    import argparse

    from knnlm.cli import _build_parser

    text = (ROOT / "docs" / "cli.md").read_text()
    sub = next(a for a in _build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        section = text.split(f"## `knnlm {name}`", 1)[1].split("\n## ", 1)[0]
        for a in p._actions:
            for s in a.option_strings:
                if s not in ("-h", "--help") and a.help != argparse.SUPPRESS:
                    assert f"`{s}" in section, f"knnlm {name} {s} is missing from docs/cli.md"


# ------------------------------------------------------------------------------------ shell commands
def _strip_comment(line: str) -> str:
    """``line`` without an unquoted ``# comment``."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            if c == quote:
                quote = None
            elif c == "\\" and quote == '"':
                continue
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _substitute(line: str) -> tuple[str, list[str]]:
    """Every ``$(...)`` (balanced) replaced by a placeholder path; returns the line and the inner commands."""
    out, inner, i = [], [], 0
    while i < len(line):
        if line.startswith("$(", i):
            depth, j = 1, i + 2
            while j < len(line) and depth:
                depth += {"(": 1, ")": -1}.get(line[j], 0)
                j += 1
            inner.append(line[i + 2: j - 1])
            out.append("/tmp/substituted")
            i = j
        else:
            out.append(line[i])
            i += 1
    return "".join(out), inner


def shell_lines(body: str) -> list[str]:
    """Logical command lines: continuations joined, comments and blank lines dropped."""
    out, cur = [], ""
    for raw in body.splitlines():
        line = _strip_comment(raw) if not cur else raw
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        cur += line
        if cur.strip():
            out.append(_strip_comment(cur).strip())
        cur = ""
    if cur.strip():
        out.append(cur.strip())
    return [x for x in out if x]


_OPS = {"&&", "||", ";", "|", "&"}
_REDIRECTS = {">", ">>", "<", ">&", "&>", ">|"}


def simple_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line (split at ``&& || ; | &``), redirections removed,
    ``$(...)`` and its inner commands included (each inner command is checked too)."""
    line, inner = _substitute(_strip_comment(line))
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split, lex.commenters = True, ""
    cmds, cur, skip = [], [], False
    for tok in lex:
        if skip:
            skip = False
            continue
        if tok in _OPS:
            cmds.append(cur)
            cur = []
        elif tok in _REDIRECTS:
            if cur and cur[-1].isdigit():
                cur.pop()
            skip = True
        else:
            cur.append(tok)
    cmds.append(cur)
    for x in inner:
        cmds += simple_commands(x)
    return [c for c in cmds if c]


def _parse_knnlm(argv: list[str]) -> None:
    from knnlm.cli import _build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            _build_parser().parse_args(argv)
    except SystemExit as e:
        if e.code not in (0, None):
            raise AssertionError(f"knnlm {' '.join(argv)}\n{err.getvalue().strip()}") from None


def _flags(argv: list[str]) -> list[str]:
    out = []
    for a in argv:
        if a == "--":
            break
        if a.startswith("--") and len(a) > 2:
            out.append(a.split("=", 1)[0])
    return out


def _check_flags_in(sources: list[Path], argv: list[str], what: str) -> None:
    text = "".join(p.read_text() for p in sources)
    for f in _flags(argv):
        assert f"'{f}'" in text or f'"{f}"' in text, f"{what} defines no option {f}"


def _module_sources(name: str) -> list[Path]:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin, f"no module {name}"
    origin = Path(spec.origin)
    return sorted(origin.parent.glob("*.py")) if origin.name == "__init__.py" else [origin, *origin.parent.glob("*.py")]


def _check_python(argv: list[str]) -> None:
    """``python ...`` (argv without the interpreter)."""
    if argv[:1] == ["-m"]:
        mod, rest = argv[1], argv[2:]
        if mod == "knnlm":
            return _parse_knnlm(rest)
        if mod in ("pytest", "ruff"):  # the dev extra's tools (docs/development.md)
            return
        if mod == "knnlm.corpora":
            from knnlm.corpora import SPLITS

            assert rest and rest[0] in [f"stdlib-{s}" for s in SPLITS] + ["write-split"], rest
            return
        if mod == "knnlm.harness":  # lm-eval's own command line; knnlm's part is checked in test_harness.py
            assert importlib.util.find_spec(mod) is not None
            return
        assert mod.split(".")[0] in ("experiments", "benchmarks"), f"python -m {mod}: not a module of this repository"
        return _check_flags_in(_module_sources(mod), rest, f"python -m {mod}")
    if argv[:1] == ["-c"]:
        tree = ast.parse(argv[1])
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "knnlm":
                mod = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(mod, alias.name), f"{node.module} has no {alias.name}"
        return
    script = ROOT / argv[0]
    assert script.is_file(), f"python {argv[0]}: no such file in the repository"
    rest = argv[1:]
    _check_flags_in([script], rest, f"python {argv[0]}")
    if "--" in rest:  # a wrapper (benchmarks/peak_rss.py -- COMMAND ...)
        check_command(rest[rest.index("--") + 1:])


def _extras() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([A-Za-z0-9_-]+)\s*=", text, re.M))


def _check_pip_args(argv: list[str]) -> None:
    """``pip install ...``: not run (it installs packages); an extra of this package must exist."""
    assert argv[:1] == ["install"], argv
    for a in argv[1:]:
        m = re.fullmatch(r"\.\[([a-z0-9,_-]+)\]", a)
        if m:
            missing = set(m.group(1).split(",")) - _extras()
            assert not missing, f"pyproject.toml has no extra {sorted(missing)}"


def check_command(argv: list[str]) -> None:
    """Check one simple command (see the module docstring); AssertionError when it is wrong."""
    while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):  # VAR=value prefixes
        argv = argv[1:]
    if not argv:
        return
    cmd = argv[0]
    if cmd in ("nohup", "time"):
        return check_command(argv[1:])
    if cmd == "/usr/bin/time":
        return check_command(argv[2:] if argv[1:2] == ["-v"] else argv[1:])
    if cmd == "knnlm":
        return _parse_knnlm(argv[1:])
    if cmd in ("python", "python3"):
        return _check_python(argv[1:])
    if cmd == "torchrun":
        assert "-m" in argv, "torchrun without -m"
        i = argv.index("-m")
        assert argv[i + 1] == "knnlm", argv
        return _parse_knnlm(argv[i + 2:])
    if cmd == "pip":
        return _check_pip_args(argv[1:])
    if cmd == "bash":
        assert (ROOT / argv[1]).is_file(), f"bash {argv[1]}: no such file"
        return
    if cmd == "tail" or cmd == "head":  # inside $(python -m knnlm.corpora ... | tail -n +237)
        return
    assert cmd in SKIPPED, f"{cmd}: add a check for it to tests/test_docs.py, or list it in SKIPPED with a reason"


SHELL = [b for b in ALL if b.lang == "bash"]


@pytest.mark.parametrize("block", SHELL, ids=lambda b: b.id)
def test_bash_block_commands_exist(block):
    for line in shell_lines(block.body):
        for argv in simple_commands(line):
            try:
                check_command(argv)
            except AssertionError as e:
                raise AssertionError(f"{block.id}: {line}\n{e}") from None


TEXT = [b for b in ALL if b.lang == "text" and re.search(r"^\$ ", b.body, re.M)]


@pytest.mark.parametrize("block", TEXT, ids=lambda b: b.id)
def test_commands_in_output_blocks_exist(block):
    """``$ knnlm ...`` lines of an output block (the command whose output it shows)."""
    lines = block.body.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("$ "):
            cmd = line[2:]
            while cmd.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                cmd = cmd.rstrip()[:-1] + " " + lines[i]
            for argv in simple_commands(cmd):
                check_command(argv)


def test_the_command_checks_catch_a_wrong_flag():
    with pytest.raises(AssertionError, match="--no-such-flag"):
        check_command(simple_commands("knnlm eval --datastore runs/x --data $(python -m knnlm.corpora "
                                      "stdlib-test) --no-such-flag")[0])
    with pytest.raises(AssertionError, match="--no-such-flag"):
        check_command(["python", "benchmarks/bench_eval.py", "--no-such-flag"])
    with pytest.raises(AssertionError, match="SKIPPED"):
        check_command(["rm", "-rf", "runs"])
    assert simple_commands("A=1 knnlm info runs/x --json > out.json 2>&1 # note") == [
        ["A=1", "knnlm", "info", "runs/x", "--json"]]


# ------------------------------------------------------------------------------------ Python blocks
PYTHON_PAGES = [p for p in PAGES if any(b.lang == "python" for b in blocks(p))]


# the directories a Python block finds in its working directory (small stdlib files): corpus/ is
# what the tiny stores hold; tune_text/ and held_out/ are in neither corpus/ nor each other
SANDBOX = {"corpus": CORPUS_FILES, "my_docs": ["bisect.py", "colorsys.py"], "tune_text": ["this.py", "antigravity.py"],
           "held_out": ["nturl2path.py"]}


@pytest.fixture
def docs_sandbox(tmp_path, monkeypatch, tiny_tokenizer):
    """A directory holding ``SANDBOX``; ``load_model`` gives the tiny Llama and tokenizer."""
    import knnlm
    import knnlm.loading
    from knnlm.testing import copy_corpus, make_tiny_model

    def load_model(name="smollm2", **kwargs):
        return make_tiny_model("llama"), copy.deepcopy(tiny_tokenizer)

    monkeypatch.setattr(knnlm, "load_model", load_model)
    monkeypatch.setattr(knnlm.loading, "load_model", load_model)
    for name, files in SANDBOX.items():
        copy_corpus(tmp_path / name, files)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _prepare(marker: str | None, tokenizer) -> None:
    """What a ``<!-- test: ... -->`` comment asks for, in the current directory."""
    if not marker:
        return
    from knnlm.testing import build_tiny_store

    what, *args = marker.split()
    assert what == "tiny-store" and len(args) == 1, f"unknown test marker {marker!r}"
    if not (Path(args[0]) / "header.json").exists():
        build_tiny_store(args[0], tokenizer)


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=rel)
def test_python_blocks_run_twice(page, docs_sandbox, tiny_tokenizer):
    code = [b for b in blocks(page) if b.lang == "python"]
    for _ in range(2):  # the second time in the same directory: what a reader rerunning it sees
        ns = {"__name__": "__main__"}
        for b in code:
            _prepare(b.marker, tiny_tokenizer)
            exec(compile("\n" * (b.line - 1) + b.body, str(b.path), "exec"), ns)


# ------------------------------------------------------------------------------------ links
def _slug(heading: str) -> str:
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        m = None if in_code else re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            s = _slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        assert dest.exists(), f"{rel(page)}: link to {target}: no such file"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{rel(page)}: link to {target}: no such heading in {dest.name}"
