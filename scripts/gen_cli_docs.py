"""Write docs/cli.md, the command-line reference, from the argparse parsers of ``knnlm.cli``.

    python scripts/gen_cli_docs.py            # rewrite docs/cli.md
    python scripts/gen_cli_docs.py --check    # exit 1 when docs/cli.md is not current

Everything is formatted here from ``parser._actions`` (usage lines, option tables, defaults), not
by argparse's help formatter, so the page is the same on every Python version and terminal width.
``tests/test_docs.py`` regenerates the page in memory and compares it with the committed file: after
changing a flag, its help or a default, rerun this script and commit docs/cli.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "cli.md"
WIDTH = 100  # usage lines are wrapped at this many columns

HEADER = """\
# Command-line reference

Every `knnlm` subcommand with its usage, options, defaults and examples. This page is generated from
the argparse parsers in `knnlm/cli` by `python scripts/gen_cli_docs.py` (do not edit it by hand:
`tests/test_docs.py` fails when it differs from what the parsers say). `knnlm COMMAND --help` prints
the same on the command line. A walk through the commands is in
[getting-started.md](getting-started.md); the Python API is in [python-api.md](python-api.md).
"""


def _metavar(action: argparse.Action) -> str:
    if action.metavar is not None:
        return action.metavar if isinstance(action.metavar, str) else " ".join(action.metavar)
    if action.choices is not None:
        return "{" + ",".join(str(c) for c in action.choices) + "}"
    return action.dest.upper() if action.option_strings else action.dest


def _args(action: argparse.Action) -> str:
    """What follows the option string (or stands for a positional) in usage: ``M``, ``[M ...]``..."""
    m, n = _metavar(action), action.nargs
    if n == 0:
        return ""
    if n is None:
        return m
    if n == "?":
        return f"[{m}]"
    if n == "*":
        return f"[{m} ...]"
    if n == "+":
        return f"{m} [{m} ...]"
    if isinstance(n, int):
        return " ".join([m] * n)
    return m  # argparse.REMAINDER / PARSER: not used by knnlm


def _usage_item(action: argparse.Action) -> str:
    args = _args(action)
    if not action.option_strings:
        return args
    flag = max(action.option_strings, key=len)  # the long form
    return f"{flag} {args}" if args else flag


def _hidden(action: argparse.Action) -> bool:
    return action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction)


def usage(prog: str, parser: argparse.ArgumentParser) -> str:
    """One usage line (wrapped at ``WIDTH``): required options bare, others in brackets, a
    mutually exclusive group as ``(a | b)`` when required, else ``[a | b]``; positionals last."""
    groups = {id(a): g for g in parser._mutually_exclusive_groups for a in g._group_actions}
    items, done = [], set()
    actions = [a for a in parser._actions if not _hidden(a)]
    for action in [a for a in actions if a.option_strings] + [a for a in actions if not a.option_strings]:
        if id(action) in done:
            continue
        group = groups.get(id(action))
        if group is not None:
            members = [a for a in group._group_actions if not _hidden(a)]
            done.update(id(a) for a in members)
            inner = " | ".join(_usage_item(a) for a in members)
            items.append(f"({inner})" if group.required else f"[{inner}]")
        elif action.option_strings and not action.required:
            items.append(f"[{_usage_item(action)}]")
        else:
            items.append(_usage_item(action))
    lines, line = [], prog
    indent = " " * (len(prog) + 1)
    for item in items:
        if len(line) + 1 + len(item) > WIDTH and line.strip():
            lines.append(line)
            line = indent + item
        else:
            line = f"{line} {item}"
    lines.append(line)
    return "\n".join(lines)


def _help(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    own_default = text.endswith(" (default: %(default)s)")
    if own_default:  # the default column says it
        text = text[: -len(" (default: %(default)s)")]
    params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
    params["prog"] = prog
    if params.get("choices") is not None:
        params["choices"] = ", ".join(str(c) for c in params["choices"])
    for k, v in list(params.items()):
        if hasattr(v, "__name__"):
            params[k] = v.__name__
    text = " ".join((text % params).split()) if "%" in text else " ".join(text.split())
    if getattr(action, "deprecated", False):
        text = f"deprecated. {text}"
    return text.replace("|", "\\|")


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.nargs == 0:  # a switch
        return ""
    d = action.default
    if d is None or d is argparse.SUPPRESS or d == []:
        return ""
    if isinstance(d, (list, tuple)):
        d = ",".join(str(x) for x in d)
    return f"`{d}`"


def _option_cell(action: argparse.Action) -> str:
    args = _args(action)
    if not action.option_strings:
        return f"`{args}`"
    names = [f"`{s}`" for s in action.option_strings]
    if args:
        names[-1] = f"`{action.option_strings[-1]} {args}`"
    return ", ".join(names)


def _table(actions, prog: str, groups: dict) -> list[str]:
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for a in actions:
        group = groups.get(id(a))
        note = ""
        if group is not None:
            others = [max(o.option_strings, key=len) for o in group._group_actions if o is not a and not _hidden(o)]
            note = f" (one of this and {', '.join(f'`{o}`' for o in others)}" + (", required)" if group.required
                                                                                   else ")")
        default = "" if group is not None and group.required else _default(a)
        rows.append(f"| {_option_cell(a)} | {default or '–'} | {_help(a, prog)}{note} |")
    return rows


def _options(parser: argparse.ArgumentParser, prog: str) -> list[str]:
    """One table per argument group, in the parser's order (its own titles; the two default
    groups are called "arguments" and "options" here, whatever the Python version calls them)."""
    groups = {id(a): g for g in parser._mutually_exclusive_groups for a in g._group_actions}
    out = []
    for i, group in enumerate(parser._action_groups):
        actions = [a for a in group._group_actions if not _hidden(a)]
        if not actions:
            continue
        title = ("arguments", "options")[i] if i < 2 else group.title
        out += ["", f"**{title}**", ""] + _table(actions, prog, groups)
    return out


def _epilog(parser: argparse.ArgumentParser) -> list[str]:
    text = (parser.epilog or "").strip("\n")
    if not text:
        return []
    if text.startswith("examples:"):
        body = [line[2:] if line.startswith("  ") else line for line in text.splitlines()[1:]]
        return ["", "Examples:", "", "```bash", *[b.rstrip() for b in body], "```"]
    return ["", "```text", text, "```"]


def render() -> str:
    """The text of docs/cli.md."""
    from knnlm.cli import _build_parser

    parser = _build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    out = [HEADER.rstrip("\n"), "", "| command | what it does |", "|---|---|"]
    for name in sub.choices:
        out.append(f"| [`knnlm {name}`](#knnlm-{name}) | {helps.get(name) or ''} |")
    out += ["", "## `knnlm`", "", " ".join((parser.description or "").split()), "", "```text",
            usage("knnlm", parser), "```"]
    top = [a for a in parser._actions if not _hidden(a) and a is not sub and a.option_strings]
    out += ["", "**options** (before the command)", ""] + _table(top, "knnlm", {})
    for name, p in sub.choices.items():
        prog = f"knnlm {name}"
        out += ["", f"## `{prog}`", "", " ".join((p.description or helps.get(name) or "").split()), "",
                "```text", usage(prog, p), "```"]
        out += _options(p, prog)
        out += _epilog(p)
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check that docs/cli.md is current")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        current = OUT.read_text() if OUT.exists() else ""
        if current != text:
            print(f"{OUT.relative_to(ROOT)} is out of date: run python scripts/gen_cli_docs.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # the checkout's knnlm, not an installed copy
    sys.exit(main())
