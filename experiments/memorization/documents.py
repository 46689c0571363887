"""Corpora as lists of ``{"name", "text"}`` documents, so every model sees exactly the same text
whatever its tokenizer: read from files, cut to a byte budget, chunked, split by a hash of the
name (``experiments.common.hash_split``), written to ``.jsonl`` for ``knnlm.build_datastore``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from experiments.common import hash_split

__all__ = ["read_documents", "take_bytes", "chunk_documents", "split_documents", "write_jsonl", "domain_corpus",
           "nbytes", "PYTHON_DOC_SOURCES", "LICENSES_DIR", "DOMAIN_TEST_MODULUS"]

PYTHON_DOC_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")  # apt-get install python3.11-doc
LICENSES_DIR = Path("/usr/share/common-licenses")  # Debian base-files: on every Debian/Ubuntu machine
DOMAIN_TEST_MODULUS = 5  # one domain document in five is held out


def read_documents(paths: Sequence[str | os.PathLike], root: str | os.PathLike | None = None) -> list[dict]:
    """``[{"name", "text"}]`` for files (names relative to ``root`` when given); undecodable
    files are skipped."""
    docs = []
    for p in paths:
        try:
            text = Path(p).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        name = os.path.relpath(p, root) if root else str(p)
        docs.append({"name": name, "text": text})
    return docs


def take_bytes(docs: Sequence[dict], max_bytes: int | None) -> list[dict]:
    """The leading documents up to ``max_bytes`` UTF-8 bytes; the last one is cut at a line
    boundary to fill the budget (always at least one non-empty document)."""
    if max_bytes is None:
        return list(docs)
    out, total = [], 0
    for d in docs:
        n = len(d["text"].encode())
        if total + n <= max_bytes:
            out.append(d)
            total += n
            continue
        room = max_bytes - total
        lines, kept, used = d["text"].splitlines(keepends=True), [], 0
        for line in lines:
            b = len(line.encode())
            if used + b > room:
                break
            kept.append(line)
            used += b
        if kept:
            out.append({"name": d["name"] + "[:cut]", "text": "".join(kept)})
        break
    if not out and docs:
        head = docs[0]["text"].encode()[:max_bytes].decode(errors="ignore")
        out.append({"name": docs[0]["name"] + "[:cut]", "text": head})
    return out


def chunk_documents(docs: Sequence[dict], max_chars: int) -> list[dict]:
    """Split documents into pieces of at most ``max_chars`` characters at line boundaries (a
    longer line becomes its own piece)."""
    out = []
    for d in docs:
        piece, n, i = [], 0, 0
        for line in d["text"].splitlines(keepends=True):
            if piece and n + len(line) > max_chars:
                out.append({"name": f"{d['name']}#{i}", "text": "".join(piece)})
                piece, n, i = [], 0, i + 1
            piece.append(line)
            n += len(line)
        if piece:
            out.append({"name": f"{d['name']}#{i}", "text": "".join(piece)})
    return out


def split_documents(docs: Sequence[dict], modulus: int = DOMAIN_TEST_MODULUS) -> tuple[list[dict], list[dict]]:
    """(train, test) by the hash of each document's name (``hash_split``); both keep the input order."""
    return hash_split(docs, modulus, name=lambda d: d["name"])


def write_jsonl(docs: Sequence[dict], path: str | os.PathLike) -> Path:
    """Write documents as jsonl (one ``{"name", "text"}`` per line); returns the path. Rewrites only
    when the content changed, so datastore builds over it can ``--resume``."""
    path = Path(path)
    data = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
    if not path.exists() or path.read_text(encoding="utf-8") != data:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)
    return path


def domain_corpus(which: str = "auto") -> tuple[str, list[dict], str]:
    """(name, documents, split method) of the out-of-domain corpus.

    ``auto``: the Python 3.11 documentation sources (reST, Debian ``python3.11-doc``) when
    installed, else the license texts of ``/usr/share/common-licenses`` (English legal prose,
    present on every Debian/Ubuntu machine). ``python-doc`` / ``licenses`` force one; any other
    value is a directory of text files. Directories with at least 20 files are split by file;
    smaller ones are first cut into ~2,000-character pieces (so both splits are non-empty).
    """
    if which == "auto":
        which = "python-doc" if PYTHON_DOC_SOURCES.is_dir() else "licenses"
        if which == "licenses":
            print(f"[memorization] {PYTHON_DOC_SOURCES} is missing: the new domain is /usr/share/common-licenses, "
                  "not the Python documentation of the recorded runs (`apt-get install python3.11-doc`, or "
                  "--domain licenses to silence this)", file=sys.stderr, flush=True)
    if which == "python-doc":
        if not PYTHON_DOC_SOURCES.is_dir():
            raise FileNotFoundError(f"{PYTHON_DOC_SOURCES} is missing: `apt-get install python3.11-doc`")
        root, name = PYTHON_DOC_SOURCES, "python3.11-doc reST"
    elif which == "licenses":
        root, name = LICENSES_DIR, "common-licenses"
    else:
        root, name = Path(which), Path(which).name
    files = sorted(str(f) for f in Path(root).rglob("*") if f.is_file() and not f.is_symlink())
    docs = [d for d in read_documents(files, root) if d["text"].strip()]
    if not docs:
        raise FileNotFoundError(f"no readable text files under {root}")
    method = "by file"
    if len(docs) < 20:
        docs, method = chunk_documents(docs, 2000), "by 2,000-character piece"
    return name, docs, method


def nbytes(docs: Sequence[dict]) -> int:
    """Total UTF-8 size of the documents' text."""
    return sum(len(d["text"].encode()) for d in docs)
