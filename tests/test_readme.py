"""The README's set-up commands are the ones CI runs, and the CLI the README shows exists."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    blocks = _bash_blocks(setup)
    assert len(blocks) == 2, "the README has exactly two set-up commands"
    demo, test = (b.strip() for b in blocks)
    assert "\n" not in demo and "\n" not in test
    assert demo.endswith("knnlm demo") and test.endswith("python -m pytest -q")
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci_lines


def test_readme_subcommands_exist():
    from knnlm.cli import _build_parser

    sub = next(a for a in _build_parser()._actions if a.dest == "command")
    readme = (ROOT / "README.md").read_text()
    for name in re.findall(r"^knnlm ([a-z-]+)", readme, re.M):
        assert name in sub.choices, name
