"""Real corpora available on every machine: the CPython standard library sources.

The split is deterministic and committed (``knnlm/splits/stdlib_{train,tune,test}.txt``, paths
relative to the stdlib root): a file is held out for evaluation (test) when the SHA-1 of its
relative path is 0 modulo ``TEST_MODULUS``, and set aside for tuning (λ gates, temperatures) when
it is 1 modulo ``TEST_MODULUS``; the rest is train, the datastore text. The three are disjoint, so
nothing fitted on tune ever sees test, and no tune document is in a stdlib datastore. All lists are
ordered by that hash, so any prefix of the train list (e.g. with ``--max-tokens``) is a uniform
sample of files rather than the alphabetically first packages.

Split history: until 2026-11-26 the tune files were part of train (706 files); results measured
on datastores built before then (the 3.29M-token and 150k-token stdlib datastores) used that train.

``python -m knnlm.corpora stdlib-train`` prints the absolute paths, one per line, for shells::

    knnlm build-index --data $(python -m knnlm.corpora stdlib-train) --out runs/stdlib
"""

from __future__ import annotations

import hashlib
import logging
import sys
import sysconfig
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from knnlm.errors import KnnlmError

logger = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["stdlib_root", "stdlib_files", "make_stdlib_split", "hash_key", "hash_split", "TEST_MODULUS", "SPLITS"]

TEST_MODULUS = 25  # ~4 % of the files are held out for evaluation, ~4 % for tuning
SPLITS = ("train", "tune", "test")
SPLITS_DIR = Path(__file__).parent / "splits"
# directories of tests, vendored packages and generated data, relative to the stdlib root
_EXCLUDED_PARTS = {"site-packages", "test", "tests", "idle_test", "__pycache__", "lib-dynload"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def hash_key(name: str) -> int:
    """A document's split key: the first 48 bits of the SHA-1 of its name (UTF-8)."""
    return int(hashlib.sha1(name.encode()).hexdigest()[:12], 16)


def hash_split(items: Sequence[T], modulus: int, name: Callable[[T], str] = str) -> tuple[list[T], list[T]]:
    """(train, test): an item is held out when ``hash_key(name(item)) % modulus == 0``; both keep
    the input order. Deterministic and stable: adding or removing items never moves the others.
    The committed stdlib split is ``hash_split`` of the relative paths, ordered by key."""
    train, test = [], []
    for x in items:
        (test if hash_key(name(x)) % modulus == 0 else train).append(x)
    return train, test


def make_stdlib_split(root: Path | None = None) -> dict[str, list[str]]:
    """Recompute the split from the files on disk (what produced the committed lists)."""
    root = root or stdlib_root()
    rels = []
    for f in root.rglob("*.py"):
        rel = f.relative_to(root).as_posix()
        if set(Path(rel).parts[:-1]) & _EXCLUDED_PARTS or rel.startswith("_sysconfigdata"):
            continue
        try:
            f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        rels.append(rel)
    rels.sort(key=lambda r: (hash_key(r), r))
    rest, test = hash_split(rels, TEST_MODULUS)
    tune = [r for r in rest if hash_key(r) % TEST_MODULUS == 1]
    train = [r for r in rest if hash_key(r) % TEST_MODULUS != 1]
    return {"train": train, "tune": tune, "test": test}


def stdlib_files(split: str, root: Path | None = None) -> list[str]:
    """Absolute paths of the committed ``split`` ("train", "tune" or "test") that exist on this machine."""
    if split not in SPLITS:
        raise KnnlmError(f"unknown stdlib split {split!r}; use train, tune or test")
    root = root or stdlib_root()
    rels = (SPLITS_DIR / f"stdlib_{split}.txt").read_text().split()
    paths = [root / r for r in rels]
    present = [str(p) for p in paths if p.is_file()]
    if len(present) < len(paths):
        logger.warning("%d of %d stdlib %s files are missing on this Python (%s)",
                       len(paths) - len(present), len(paths), split, root)
    if not present:
        raise KnnlmError(f"none of the stdlib {split} files exist under {root}")
    return present


def _main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in (*(f"stdlib-{s}" for s in SPLITS), "write-split"):
        print("usage: python -m knnlm.corpora {stdlib-train|stdlib-tune|stdlib-test|write-split}", file=sys.stderr)
        return 2
    if argv[0] == "write-split":
        SPLITS_DIR.mkdir(exist_ok=True)
        for name, rels in make_stdlib_split().items():
            (SPLITS_DIR / f"stdlib_{name}.txt").write_text("\n".join(rels) + "\n")
            print(f"{name}: {len(rels)} files")
        return 0
    print("\n".join(stdlib_files(argv[0].split("-")[1])))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
