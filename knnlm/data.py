"""Reading corpora, tokenizing them, and the sliding-window protocol shared by build and eval.

Inputs are text files, directories (recursive, filtered by glob patterns), JSON-lines files (one
JSON object per line, text under ``text_field``; ``.jsonl``, gzip-compressed ``.jsonl.gz``,
zstd-compressed ``.jsonl.zst``), Parquet files (each row a document, text in column
``text_field``) and Hugging Face ``datasets`` saved with ``save_to_disk``. Each yields
*documents*; windows never cross a document boundary. Files are read as streams: memory holds one
document (a text file), one line plus one (decompressed) read block (JSON lines) or one batch of
rows (Parquet, read row group by row group), never a whole compressed or columnar file. Reading
``.jsonl.zst`` needs ``zstandard`` and Parquet needs ``pyarrow`` (the extra ``knnlm[formats]``).
"""

from __future__ import annotations

import codecs
import fnmatch
import gzip
import hashlib
import importlib
import json
import logging
import os
import zlib
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

HEAD_BYTES = 8192  # how much of each file's (decompressed) text is checked before any model is loaded
READ_BYTES = 1 << 17  # block size of streamed reads (the size zstd recommends for its input)
PARQUET_BATCH_ROWS = 256  # rows converted to Python strings at a time

# kind -> (module to import, package to pip install, what the file is); the optional readers
_OPTIONAL = {"parquet": ("pyarrow.parquet", "pyarrow", "a Parquet"),
             "jsonl.zst": ("zstandard", "zstandard", "a zstd-compressed")}
_JSONL_KINDS = ("jsonl", "jsonl.gz", "jsonl.zst")
_COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd", ".bz2", ".xz", ".zip")


@dataclass(frozen=True)
class Source:
    """One input file (or dataset directory) with what identifies its content (the SHA-256 of the
    file's bytes as stored, compressed or not)."""
    path: str
    kind: str  # "text" | "jsonl" | "jsonl.gz" | "jsonl.zst" | "parquet" | "hf_dataset"
    size: int
    sha256: str

    def to_json(self) -> dict:
        return {"path": self.path, "kind": self.kind, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class Document:
    name: str  # file path, or "path:line" for JSON lines, or "path[i]" for Parquet rows and datasets
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


def _check_head(path: Path, head: bytes, complete: bool) -> bool:
    """Refuse a binary or non-UTF-8 file from its first bytes (``head``; ``complete`` when that is
    the whole text); True when it holds any text."""
    if b"\x00" in head:
        hint = (" (compressed: of compressed files only .jsonl.gz and .jsonl.zst are read)"
                if Path(path).suffix in _COMPRESSED_SUFFIXES else "")
        raise CorpusError(f"{path} looks binary (NUL bytes){hint}; remove it or narrow the input with `globs`",
                          param="data")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=complete)
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None
    return not complete or bool(head.strip())


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
                    exclude: Sequence[str] = (), *, text_field: str | None = None) -> list[Source]:
    """Expand input paths into a sorted, deterministic list of sources (hashing each).

    Cheap checks happen here, before any model is loaded: missing paths, directories with no
    matching file, a missing optional package (``pyarrow`` for Parquet, ``zstandard`` for
    ``.jsonl.zst``), binary or non-UTF-8 files (from their first bytes, decompressed for
    ``.jsonl.gz`` / ``.jsonl.zst``), unreadable compressed or Parquet files (gzip / zstd headers,
    the Parquet footer), and a corpus with no text. With ``text_field`` also the JSON lines in
    each file's first bytes and each Parquet file's column (present, of strings). Under a
    directory, files and directories whose name starts with a dot (``.git``, a datastore's
    ``.knnlm.lock``) are skipped.
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
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
                and any(fnmatch.fnmatch(f.name, g) for g in globs)
                and not any(fnmatch.fnmatch(str(f.relative_to(p)), e) for e in exclude))
            if not found:
                raise CorpusError(f"no files under {raw} match `globs` {' '.join(globs)}", param="globs")
            files.extend((f, _kind_of(f)) for f in found)
        else:
            files.append((p, _kind_of(p)))
    for kind in _OPTIONAL:  # a missing package fails before any file is hashed
        first = next((f for f, k in files if k == kind), None)
        if first is not None:
            _optional(kind, first)
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
            has_text |= _check_file(f, kind, size, head, text_field)
            out.append(Source(str(f), kind, size, digest))
    if not has_text:
        names = ", ".join(s.path for s in out[:3]) + (", ..." if len(out) > 3 else "")
        raise CorpusError(f"the corpus is empty: {len(out)} file(s) with no text ({names}); check `data` / `globs`",
                          param="data")
    return out


def _check_file(f: Path, kind: str, size: int, head: bytes, text_field: str | None) -> bool:
    """The cheap check of one file of ``kind`` (``head``: its first raw bytes); True when it may
    hold text."""
    if kind == "parquet":
        with _open_parquet(f) as pf:
            if text_field is not None:
                _parquet_text_column(f, pf, text_field)
            return pf.metadata.num_rows > 0
    complete = size <= len(head)
    if kind in ("jsonl.gz", "jsonl.zst"):
        head, complete = _stream_head(_chunks(str(f), kind))
    has_text = _check_head(f, head, complete)
    if kind in _JSONL_KINDS and text_field is not None:
        lines = head.split(b"\n")
        for _ in _jsonl_texts(str(f), lines if complete else lines[:-1], text_field):
            pass  # every complete line in the head parses and has the field
    return has_text


def _stream_head(chunks: Iterator[bytes]) -> tuple[bytes, bool]:
    """The first HEAD_BYTES bytes of a (decompressed) stream, and whether that is all of it.
    Decompresses about READ_BYTES and no further, so a small file is read whole here: one cut
    short or damaged is refused before any model loads."""
    head, total, ended = bytearray(), 0, False
    try:
        for chunk in chunks:
            if len(head) <= HEAD_BYTES:
                head += chunk[: HEAD_BYTES + 1 - len(head)]
            total += len(chunk)
            if total > READ_BYTES:
                break
        else:
            ended = True
    finally:
        chunks.close()
    return bytes(head[:HEAD_BYTES]), ended and len(head) <= HEAD_BYTES


def check_build_inputs(data: Sequence[str | os.PathLike], cfg) -> list[Source]:
    """Everything about a build (``cfg``: a ``BuildConfig``) that can be checked before a model
    is loaded, cheapest first: the corpus (paths, empty, binary or non-UTF-8 files, unreadable
    compressed or Parquet files, the ``text_field`` of JSON lines and Parquet columns, missing
    optional packages), the key-layer spelling, the index specification. Imports neither torch
    nor transformers. Returns the sources."""
    from knnlm.index import check_index_spec

    sources = resolve_sources(data, cfg.globs, cfg.exclude, text_field=cfg.text_field)
    check_layer_spec(cfg.layer)
    check_index_spec(cfg.index, cfg.index_storage)
    return sources


def _kind_of(f: Path) -> str:
    name = f.name
    if name.endswith(".jsonl.gz"):
        return "jsonl.gz"
    if name.endswith(".jsonl.zst"):
        return "jsonl.zst"
    return {".jsonl": "jsonl", ".parquet": "parquet"}.get(f.suffix, "text")


def _optional(kind: str, path):
    """The module reading ``kind`` files, or a one-line error saying what to install."""
    module, package, what = _OPTIONAL[kind]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CorpusError(f"{path} is {what} file: `pip install {package}` to read it (the extra knnlm[formats] "
                          "installs it too)", param="data") from None


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _corrupt(path, what: str, e: BaseException) -> CorpusError:
    return CorpusError(f"{path}: corrupt or truncated {what} data ({_one_line(e)}); re-download or recompress it",
                       param="data")


def _read_text(path: str) -> str:
    data = Path(path).read_bytes()
    _check_head(Path(path), data[:HEAD_BYTES], len(data) <= HEAD_BYTES)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None


# ---------------------------------------------------------------------------- JSON lines


def _chunks(path: str, kind: str) -> Iterator[bytes]:
    """The (decompressed) bytes of a JSON-lines file, in blocks of bounded size."""
    if kind == "jsonl.gz":
        return _gzip_chunks(path)
    if kind == "jsonl.zst":
        return _zstd_chunks(path)
    return _plain_chunks(path)


def _plain_chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(READ_BYTES):
            yield chunk


def _gzip_chunks(path: str) -> Iterator[bytes]:
    with gzip.open(path, "rb") as f:  # several members in one file are read one after the other
        try:
            while chunk := f.read(READ_BYTES):
                yield chunk
        except (OSError, EOFError, zlib.error) as e:  # bad header or CRC, cut short
            raise _corrupt(path, "gzip", e) from None


def _zstd_chunks(path: str) -> Iterator[bytes]:
    """zstd frames one after the other (skippable frames give nothing). A decompression object per
    frame rather than ``stream_reader``: the reader ends quietly on a truncated file, the object
    tells (``eof`` stays False)."""
    zstd = _optional("jsonl.zst", path)
    dctx = zstd.ZstdDecompressor()
    with open(path, "rb") as f:
        frame, in_frame = dctx.decompressobj(), False
        try:
            while data := f.read(READ_BYTES):
                while data:
                    out = frame.decompress(data)
                    if frame.eof:
                        data, frame, in_frame = frame.unused_data, dctx.decompressobj(), False
                    else:
                        data, in_frame = b"", True
                    if out:
                        yield out
        except zstd.ZstdError as e:
            raise _corrupt(path, "zstd", e) from None
        if in_frame:
            raise _corrupt(path, "zstd", EOFError("the file ends inside a frame"))


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Split a stream of blocks at b"\n" (the newline itself dropped); holds one line at a time."""
    pending: list[bytes] = []
    for chunk in chunks:
        parts = chunk.split(b"\n")
        if len(parts) == 1:
            pending.append(chunk)
            continue
        pending.append(parts[0])
        yield b"".join(pending)
        yield from parts[1:-1]
        pending = [parts[-1]] if parts[-1] else []
    if pending:
        yield b"".join(pending)


def _jsonl_texts(path: str, lines: Iterable[bytes], text_field: str) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every non-blank line. Lines end at "\\n", "\\r\\n" or "\\r"
    (numbered as ``str.splitlines`` numbers them), never inside a JSON string: a raw U+2028 or
    U+0085 in a string stays in the text."""
    lineno = 0
    for raw in lines:
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        for part in raw.split(b"\r"):  # a bare CR is not valid inside JSON strings: a line end
            lineno += 1
            try:
                line = part.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start} of the line); convert the file",
                                  param="data") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                raise CorpusError(f"{path}:{lineno}: no string field {text_field!r}; "
                                  "set `text_field` to the key holding the text", param="text_field")
            yield lineno, obj[text_field]


# ---------------------------------------------------------------------------- Parquet


def _open_parquet(path):
    """A ``pyarrow.parquet.ParquetFile`` (its footer read and checked: the schema, row groups)."""
    pq = _optional("parquet", path)
    import pyarrow as pa

    try:  # pre_buffer=False: read one row group's column chunk at a time, not all of them ahead
        return pq.ParquetFile(path, pre_buffer=False)
    except (pa.ArrowException, OSError) as e:
        raise CorpusError(f"{path} is not a readable Parquet file ({_one_line(e)}); re-download or rewrite it",
                          param="data") from None


def _is_string_type(t) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    is_view = getattr(pa.types, "is_string_view", lambda _: False)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or is_view(t)


def _parquet_text_column(path, pf, text_field: str) -> None:
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise CorpusError(f"{path} has no column {text_field!r} (columns: {', '.join(schema.names)}); "
                          "set `text_field`", param="text_field")
    t = schema.field(text_field).type
    if not _is_string_type(t):
        raise CorpusError(f"{path}: column {text_field!r} holds {t}, not strings; set `text_field` to a "
                          "string column", param="text_field")


def _parquet_texts(path: str, text_field: str) -> Iterator[str]:
    """The ``text_field`` of every row in order, row group by row group (a null is "")."""
    import pyarrow as pa

    with _open_parquet(path) as pf:
        _parquet_text_column(path, pf, text_field)
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field], use_threads=False):
                for text in batch.column(0).to_pylist():
                    yield text or ""
                    row += 1
        except (pa.ArrowException, OSError) as e:
            raise CorpusError(f"{path}: corrupt Parquet data after {row} rows ({_one_line(e)}); re-download or "
                              "rewrite it", param="data") from None


def iter_documents(sources: Sequence[Source], text_field: str = "text") -> Iterator[Document]:
    """Yield documents in a fixed order: sources in order, then line / row order."""
    for si, src in enumerate(sources):
        if src.kind == "text":
            yield Document(src.path, si, _read_text(src.path))
        elif src.kind in _JSONL_KINDS:
            for lineno, text in _jsonl_texts(src.path, _lines(_chunks(src.path, src.kind)), text_field):
                yield Document(f"{src.path}:{lineno}", si, text)
        elif src.kind == "parquet":
            for i, text in enumerate(_parquet_texts(src.path, text_field)):
                yield Document(f"{src.path}[{i}]", si, text)
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
