"""Reading corpora, tokenizing them, and the sliding-window protocol shared by build and eval.

Inputs are text files, directories (recursive, filtered by glob patterns), ``.jsonl`` files (one
JSON object per line, text under ``text_field``) and Hugging Face ``datasets`` saved with
``save_to_disk``. Each yields *documents*; windows never cross a document boundary.
"""

from __future__ import annotations

from knnlm.errors import KnnlmError

import fnmatch
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "CorpusError", "Source", "Document", "resolve_sources", "iter_documents", "windows",
    "count_targets", "iter_batches", "pad_windows", "tokenize_documents", "sha256_file", "sha256_text",
]


class CorpusError(KnnlmError):
    """The corpus cannot be read: missing path, no files, undecodable text, bad jsonl."""


@dataclass(frozen=True)
class Source:
    """One input file (or dataset directory) with what identifies its content."""
    path: str
    kind: str  # "text" | "jsonl" | "hf_dataset"
    size: int
    sha256: str

    def to_json(self) -> dict:
        return {"path": self.path, "kind": self.kind, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class Document:
    name: str  # file path, or "path:line" for jsonl, or "path[i]" for datasets
    source: int  # index into the source list
    text: str


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _is_hf_dataset(p: Path) -> bool:
    return p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()
                           or (p / "state.json").exists())


def _dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def resolve_sources(paths: Sequence[str | os.PathLike], globs: Sequence[str] = ("*",),
                    exclude: Sequence[str] = ()) -> list[Source]:
    """Expand input paths into a sorted, deterministic list of sources (hashing each)."""
    if not paths:
        raise CorpusError("no input given: pass --data with at least one file or directory")
    files: list[tuple[Path, str]] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise CorpusError(f"input path does not exist: {raw}")
        if _is_hf_dataset(p):
            files.append((p, "hf_dataset"))
        elif p.is_dir():
            found = sorted(
                f for f in p.rglob("*")
                if f.is_file() and any(fnmatch.fnmatch(f.name, g) for g in globs)
                and not any(fnmatch.fnmatch(str(f.relative_to(p)), e) for e in exclude))
            if not found:
                raise CorpusError(f"no files under {raw} match --glob {' '.join(globs)}")
            files.extend((f, _kind_of(f)) for f in found)
        else:
            files.append((p, _kind_of(p)))
    out = []
    for f, kind in files:
        if kind == "hf_dataset":
            h = hashlib.sha256()
            for g in sorted(f.rglob("*")):
                if g.is_file():
                    h.update(str(g.relative_to(f)).encode())
                    h.update(sha256_file(g).encode())
            out.append(Source(str(f), kind, _dir_size(f), h.hexdigest()))
        else:
            out.append(Source(str(f), kind, f.stat().st_size, sha256_file(f)))
    return out


def _kind_of(f: Path) -> str:
    return "jsonl" if f.suffix == ".jsonl" else "text"


def _read_text(path: str) -> str:
    data = Path(path).read_bytes()
    if b"\x00" in data[:8192]:
        raise CorpusError(f"{path} looks binary (NUL bytes); remove it or narrow the input with --glob")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path} is not valid UTF-8 (byte {e.start}); "
                          "convert it or narrow the input with --glob") from None


def iter_documents(sources: Sequence[Source], text_field: str = "text") -> Iterator[Document]:
    """Yield documents in a fixed order: sources in order, then line / row order."""
    for si, src in enumerate(sources):
        if src.kind == "text":
            yield Document(src.path, si, _read_text(src.path))
        elif src.kind == "jsonl":
            for lineno, line in enumerate(_read_text(src.path).splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{src.path}:{lineno}: invalid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                    raise CorpusError(f"{src.path}:{lineno}: no string field {text_field!r}; "
                                      "set --text-field to the key holding the text")
                yield Document(f"{src.path}:{lineno}", si, obj[text_field])
        elif src.kind == "hf_dataset":
            try:
                import datasets  # optional dependency
            except ImportError:
                raise CorpusError(f"{src.path} is a Hugging Face dataset; "
                                  "`pip install datasets` to read it") from None
            ds = datasets.load_from_disk(src.path)
            if isinstance(ds, datasets.DatasetDict):
                raise CorpusError(f"{src.path} holds several splits ({', '.join(ds)}); "
                                  "pass the directory of one split")
            if text_field not in ds.column_names:
                raise CorpusError(f"{src.path} has no column {text_field!r} (columns: "
                                  f"{', '.join(ds.column_names)}); set --text-field")
            for i, text in enumerate(ds[text_field]):
                yield Document(f"{src.path}[{i}]", si, text or "")
        else:  # pragma: no cover - Source is built by resolve_sources
            raise CorpusError(f"unknown source kind {src.kind!r}")


def windows(n_tokens: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """Sliding windows over one document of ``n_tokens`` tokens.

    Yields ``(start, end, first_target)``: run the model on tokens ``[start, end)`` and score the
    targets ``[first_target, end)`` (target ``j`` is predicted from position ``j - 1``). Every
    token but the first is a target exactly once. The first window is ``context`` long; each later
    one scores the next ``stride`` targets and reaches back as far as ``context`` allows, so every
    target after the first window sees at least ``context - stride`` tokens of left context.
    ``stride = context - 1`` gives non-overlapping windows (each token is fed to the model once).
    """
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}")
    if not 1 <= stride <= context - 1:
        raise ValueError(f"stride must be in [1, context - 1] (= [1, {context - 1}]), got {stride}")
    done = 1  # targets below this index are scored
    end = min(context, n_tokens)
    while done < n_tokens:
        start = max(0, end - context)
        yield start, end, done
        done = end
        end = min(done + stride, n_tokens)


def count_targets(n_tokens: int) -> int:
    """Number of (key, value) rows a document of ``n_tokens`` tokens contributes."""
    return max(n_tokens - 1, 0)


def iter_batches(documents: Sequence[dict], context: int, stride: int,
                 batch_size: int) -> Iterator[tuple[int, list[tuple[int, int, int, int]]]]:
    """Group the windows of all documents into batches, in row order.

    Yields ``(first_row, [(doc, start, end, first_target), ...])``; each batch's rows are the
    contiguous range starting at ``first_row``. A pure function of its arguments (resume relies
    on it).
    """
    batch, row0, row = [], 0, 0
    for di, doc in enumerate(documents):
        for start, end, first in windows(doc["length"], context, stride):
            if not batch:
                row0 = row
            batch.append((di, start, end, first))
            row += end - first
            if len(batch) == batch_size:
                yield row0, batch
                batch = []
    if batch:
        yield row0, batch


def pad_windows(batch: Sequence[tuple[int, int, int, int]], doc_tokens: Callable[[int], np.ndarray],
                pad_id: int = 0) -> np.ndarray:
    """Token ids (B, T) int64 of a batch from ``iter_batches``, right-padded with ``pad_id``.

    ``doc_tokens(doc)`` gives a document's token ids. Right padding is never attended to by a
    causal model, and the outputs at padded positions are never read.
    """
    width = max(end - start for _, start, end, _ in batch)
    ids = np.full((len(batch), width), pad_id, dtype=np.int64)  # (B, T)
    for b, (di, start, end, _) in enumerate(batch):
        ids[b, : end - start] = doc_tokens(di)[start:end]
    return ids


TOKENIZE_BATCH_DOCS = 64  # documents per call of the (fast, batched) tokenizer


def tokenize_documents(tokenizer, documents: Iterable[Document],
                       max_tokens: int | None = None) -> Iterator[tuple[Document, np.ndarray]]:
    """Tokenize in batches with the tokenizer's own special tokens (BOS where the model uses one).

    Yields ``(document, ids)`` with ``ids`` an int32 array; with ``max_tokens`` the stream stops
    after that many tokens in total (the last document is truncated), a deterministic prefix.
    """
    budget = max_tokens
    pending: list[Document] = []

    def flush():
        nonlocal budget
        enc = tokenizer([d.text for d in pending], add_special_tokens=True, verbose=False)["input_ids"]
        pending.clear()
        for ids in enc:
            if budget is not None:
                ids = ids[:budget]
                budget -= len(ids)
            yield np.asarray(ids, dtype=np.int32)

    batch: list[Document] = []
    for doc in documents:
        pending.append(doc)
        batch.append(doc)
        if len(pending) == TOKENIZE_BATCH_DOCS:
            for d, ids in zip(batch, flush()):
                yield d, ids
                if budget == 0:
                    return
            batch = []
    if pending:
        for d, ids in zip(batch, flush()):
            yield d, ids
            if budget == 0:
                return
