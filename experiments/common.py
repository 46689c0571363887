"""Helpers shared by the experiments."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from knnlm.corpora import hash_key, hash_split  # the one hash split (also the committed stdlib split)

__all__ = ["hash_key", "hash_split", "write_json", "floats", "command_line", "logger"]


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON, atomically (a reader sees the old or the new file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def floats(csv: str) -> list[float]:
    """``"0.25,0.5"`` -> ``[0.25, 0.5]`` (a comma list from the command line)."""
    return [float(x) for x in csv.split(",") if x]


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command that ran ``python -m module`` with ``argv`` (default: this process's)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", "-m", module, *args])


def logger(prefix: str) -> Callable[[str], None]:
    """A ``log(msg)`` that prints ``[prefix] msg`` to stderr."""
    def log(msg: str) -> None:
        print(f"[{prefix}] {msg}", file=sys.stderr, flush=True)
    return log
