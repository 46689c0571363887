"""Helpers shared by the experiments."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

__all__ = ["hash_key", "hash_split", "write_json", "floats", "command_line", "logger"]

T = TypeVar("T")


def hash_key(name: str) -> int:
    """A document's split key: the first 48 bits of the SHA-1 of its name (UTF-8). The same
    function as the committed stdlib split of ``knnlm.corpora`` (a file is held out there when
    ``hash_key(relative path) % knnlm.corpora.TEST_MODULUS == 0``)."""
    return int(hashlib.sha1(name.encode()).hexdigest()[:12], 16)


def hash_split(items: Sequence[T], modulus: int, name: Callable[[T], str] = str) -> tuple[list[T], list[T]]:
    """(train, test): an item is held out when ``hash_key(name(item)) % modulus == 0``; both keep
    the input order. Deterministic and stable: adding or removing items never moves the others."""
    train, test = [], []
    for x in items:
        (test if hash_key(name(x)) % modulus == 0 else train).append(x)
    return train, test


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
