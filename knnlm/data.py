"""Reading corpora, tokenizing them, and the sliding-window protocol shared by build and eval.

Inputs are text files, directories (recursive, filtered by glob patterns), ``.jsonl`` files (one
JSON object per line, text under ``text_field``) and Hugging Face ``datasets`` saved with
``save_to_disk``. Each yields *documents*; windows never cross a document boundary.
"""

from __future__ import annotations

import codecs
import fnmatch
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from knnlm.config import check_layer_spec, check_window
from knnlm.errors import CorpusError

logger = logging.getLogger(__name__)

__all__ = [
    "CorpusError", "Source", "Document", "Window", "check_build_inputs", "resolve_sources", "iter_documents", "windows",
    "count_targets", "iter_batches", "batch_inputs", "tokenize_documents", "tokenizer_bos", "sha256_file",
    "sha256_text",
]

HEAD_BYTES = 8192  # how much of each text file is checked for NUL bytes / UTF-8 before any model is loaded


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
    return _hash_and_head(path, chunk)[0]


def _hash_and_head(path: str | os.PathLike, chunk: int = 1 << 20) -> tuple[str, bytes]:
    """(SHA-256 of the file, its first HEAD_BYTES bytes), in one read."""
    h = hashlib.sha256()
    head = b""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if len(head) < HEAD_BYTES:
                head += block[: HEAD_BYTES - len(head)]
            h.update(block)
    return h.hexdigest(), head


def _check_head(path: Path, size: int, head: bytes) -> bool:
    """Refuse a binary or non-UTF-8 file from its first bytes; True when it holds any text."""
    if b"\x00" in head:
        raise CorpusError(f"{path} looks binary (NUL bytes); remove it or narrow the input with `globs`", param="data")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=size <= len(head))
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None
    return size > len(head) or bool(head.strip())


def _not_utf8(path, e: UnicodeDecodeError) -> CorpusError:
    return CorpusError(f"{path} is not valid UTF-8 (byte {e.start}); convert it or narrow the input with `globs`",
                       param="data")


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _is_hf_dataset(p: Path) -> bool:
    return p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()
                           or (p / "state.json").exists())


def _dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def resolve_sources(paths: Sequence[str | os.PathLike], globs: Sequence[str] = ("*",),
                    exclude: Sequence[str] = ()) -> list[Source]:
    """Expand input paths into a sorted, deterministic list of sources (hashing each).

    Cheap checks happen here, before any model is loaded: missing paths, directories with no
    matching file, binary or non-UTF-8 files (from their first bytes), and a corpus with no text.
    """
    if not paths:
        raise CorpusError("no input given: pass `data` with at least one file or directory", param="data")
    files: list[tuple[Path, str]] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise CorpusError(f"`data` path does not exist: {raw}", param="data")
        if _is_hf_dataset(p):
            files.append((p, "hf_dataset"))
        elif p.is_dir():
            found = sorted(
                f for f in p.rglob("*")
                if f.is_file() and any(fnmatch.fnmatch(f.name, g) for g in globs)
                and not any(fnmatch.fnmatch(str(f.relative_to(p)), e) for e in exclude))
            if not found:
                raise CorpusError(f"no files under {raw} match `globs` {' '.join(globs)}", param="globs")
            files.extend((f, _kind_of(f)) for f in found)
        else:
            files.append((p, _kind_of(p)))
    out, has_text = [], False
    for f, kind in files:
        if kind == "hf_dataset":
            h = hashlib.sha256()
            for g in sorted(f.rglob("*")):
                if g.is_file():
                    h.update(str(g.relative_to(f)).encode())
                    h.update(sha256_file(g).encode())
            out.append(Source(str(f), kind, _dir_size(f), h.hexdigest()))
            has_text = True  # rows are only known once read
        else:
            size = f.stat().st_size
            digest, head = _hash_and_head(f)
            has_text |= _check_head(f, size, head)
            out.append(Source(str(f), kind, size, digest))
    if not has_text:
        names = ", ".join(s.path for s in out[:3]) + (", ..." if len(out) > 3 else "")
        raise CorpusError(f"the corpus is empty: {len(out)} file(s) with no text ({names}); check `data` / `globs`",
                          param="data")
    return out


def check_build_inputs(data: Sequence[str | os.PathLike], cfg) -> list[Source]:
    """Everything about a build (``cfg``: a ``BuildConfig``) that can be checked before a model
    is loaded, cheapest first: the corpus (paths, empty, binary or non-UTF-8 files), the key-layer
    spelling, the index specification. Imports neither torch nor transformers. Returns the sources."""
    from knnlm.index import check_index_spec

    sources = resolve_sources(data, cfg.globs, cfg.exclude)
    check_layer_spec(cfg.layer)
    check_index_spec(cfg.index)
    return sources


def _kind_of(f: Path) -> str:
    return "jsonl" if f.suffix == ".jsonl" else "text"


def _read_text(path: str) -> str:
    data = Path(path).read_bytes()
    _check_head(Path(path), len(data), data[:HEAD_BYTES])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None


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
                                      "set `text_field` to the key holding the text", param="text_field")
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
                                  f"{', '.join(ds.column_names)}); set `text_field`", param="text_field")
            for i, text in enumerate(ds[text_field]):
                yield Document(f"{src.path}[{i}]", si, text or "")
        else:  # pragma: no cover - Source is built by resolve_sources
            raise CorpusError(f"unknown source kind {src.kind!r}")


class Window(NamedTuple):
    """One forward window of ``iter_batches``: document ``doc``, corpus tokens ``[start, end)``,
    scored targets ``[first, end)``."""
    doc: int
    start: int
    end: int
    first: int


def windows(n_tokens: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """Sliding windows over one document of ``n_tokens`` tokens.

    Yields ``(start, end, first_target)``: run the model on tokens ``[start, end)`` and score the
    targets ``[first_target, end)`` (target ``j`` is predicted from position ``j - 1``). Every
    token but the first is a target exactly once. The first window is ``context`` long; each later
    one scores the next ``stride`` targets and reaches back as far as ``context`` allows, so every
    target after the first window sees at least ``context - stride`` tokens of left context.
    ``stride = context - 1`` gives non-overlapping windows (each token is fed to the model once).
    A window that starts inside the document gets the model's ``<bos>`` in front of it when the
    tokenizer uses one (``batch_inputs``); that token is extra, never a target.
    """
    check_window(context, stride)
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
                 batch_size: int) -> Iterator[tuple[int, list[Window]]]:
    """Group the windows of all documents into batches, in row order.

    Yields ``(first_row, [Window(doc, start, end, first), ...])``; each batch's rows are the
    contiguous range starting at ``first_row``. A pure function of its arguments (resume relies
    on it).
    """
    batch, row0, row = [], 0, 0
    for di, doc in enumerate(documents):
        for start, end, first in windows(doc["length"], context, stride):
            if not batch:
                row0 = row
            batch.append(Window(di, start, end, first))
            row += end - first
            if len(batch) == batch_size:
                yield row0, batch
                batch = []
    if batch:
        yield row0, batch


def batch_inputs(batch: Sequence[Window], doc_tokens: Callable[[int], np.ndarray], bos: int | None = None,
                 pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model input of a batch from ``iter_batches`` and where its predictions are.

    Returns ``ids`` (B, T) int64, right-padded with ``pad_id``, and ``(rows_b, rows_t)`` (R,) int64:
    the output at ``ids[rows_b[r], rows_t[r]]`` predicts the r-th target of the batch (targets in
    row order, so ``r`` is the datastore row ``first_row + r``), and that target is
    ``ids[rows_b[r], rows_t[r] + 1]``. With ``bos`` (the tokenizer's BOS id, when it adds one), a
    window that starts inside its document gets ``bos`` in front: positions shift by one.
    ``doc_tokens(doc)`` gives a document's token ids. Right padding is never attended to by a
    causal model, and the outputs at padded positions are never read.
    """
    shift = [int(bos is not None and w.start > 0) for w in batch]
    width = max(w.end - w.start + s for w, s in zip(batch, shift))
    ids = np.full((len(batch), width), pad_id, dtype=np.int64)  # (B, T)
    rows_b, rows_t = [], []
    for b, (w, s) in enumerate(zip(batch, shift)):
        if s:
            ids[b, 0] = bos
        ids[b, s: s + w.end - w.start] = doc_tokens(w.doc)[w.start:w.end]
        pos = np.arange(w.first - 1 - w.start + s, w.end - 1 - w.start + s)  # predicts first .. end - 1
        rows_b.append(np.full_like(pos, b))
        rows_t.append(pos)
    return ids, np.concatenate(rows_b), np.concatenate(rows_t)


def tokenizer_bos(tokenizer) -> int | None:
    """The BOS id when ``tokenizer`` puts one in front of every encoded text (Llama-3, Gemma,
    Mistral, ...), else None (GPT-2 style tokenizers, SmolLM2). Detected by encoding a probe."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if ids and ids[0] == bos else None


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
