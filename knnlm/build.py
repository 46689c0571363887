"""The build loop: corpus -> tokens -> keys / values -> FAISS index, resumable.

Phases (``header["status"]``):

1. ``tokenizing``: every document is tokenized once into ``tokens.npy``, ``values.npy`` and
   ``documents.json``. Cheap; an interrupted tokenization restarts from scratch.
2. ``building``: windows (see ``knnlm.data.windows``) go through the model in batches of
   ``batch_size``; the key rows of each batch are written at their final place in ``keys.npy``
   and, once on disk, ``header["count"]`` advances. Batches are a pure function of the corpus and
   the settings, so a resumed build recomputes exactly the batches an uninterrupted one would:
   the bytes are identical.
3. the index is trained and filled from ``keys.npy``, written atomically, and the status becomes
   ``complete``.

Memory is bounded by one batch of activations plus one chunk of keys while adding to the
index, plus the index itself: keys are streamed to disk with ``pwrite``, never held in RAM.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from knnlm import __version__
from knnlm.capture import capture_keys, find_key_module
from knnlm.config import RESUME_KEYS, BuildConfig
from knnlm.data import (CorpusError, Source, count_targets, iter_batches, iter_documents, pad_windows,
                        resolve_sources, sha256_text, tokenize_documents)
from knnlm.datastore import (DOCUMENTS, HEADER, INDEX, KEY_DTYPES, KEYS, TOKENS, VALUES, DatastoreError,
                             model_identity, new_header, open_datastore, read_header, write_json_atomic)
from knnlm.index import build_index, plan_index

logger = logging.getLogger(__name__)

__all__ = ["build_datastore", "subset_datastore", "merge_datastores"]

_OWNED_FILES = (HEADER, HEADER + ".tmp", DOCUMENTS, TOKENS, VALUES, KEYS, INDEX, INDEX + ".tmp",
                TOKENS + ".part", VALUES + ".part")
# How often finished rows are fsync'ed and recorded in the header (what --resume restarts from).
COMMIT_SECONDS = float(os.environ.get("KNNLM_COMMIT_SECONDS", "5"))


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _key_dim(model, layer: str | None) -> int:
    """Width of the key module's input, from a 2-token probe forward."""
    device = next(model.parameters()).device
    with torch.inference_mode(), capture_keys(model, layer, stop_after=True) as cap:
        return int(cap.keys_of(torch.zeros(1, 2, dtype=torch.long, device=device)).shape[-1])


def _check_out_dir(out: Path, identity: dict, cfg: BuildConfig, sources) -> dict | None:
    """Decide what to do with ``out``: returns the header to resume from, or None to start fresh."""
    header = read_header(out) if out.exists() else None
    if header is None:
        if out.exists() and any(out.iterdir()) and not cfg.overwrite:
            raise DatastoreError(f"--out {out} exists, is not empty and holds no datastore; "
                                 "choose an empty or new directory")
        return None
    if cfg.overwrite:
        return None
    theirs = header.get("model", {})
    for fieldname in ("config_hash", "weights_fingerprint", "tokenizer_hash"):
        if theirs.get(fieldname) != identity[fieldname]:
            raise DatastoreError(
                f"--out {out} holds a datastore of another model ({theirs.get('name_or_path')!r}, "
                f"{fieldname} differs); choose another --out, or pass --overwrite to replace it")
    if not cfg.resume:
        raise DatastoreError(f"--out {out} already holds a datastore (status {header.get('status')!r}, "
                             f"{header.get('count')}/{header.get('total')} rows); pass --resume to "
                             "continue it, --overwrite to replace it, or choose another --out")
    mine, old = cfg.settings(), header.get("build", {})
    diff = [k for k in RESUME_KEYS if mine.get(k) != old.get(k)]
    if diff:
        k = diff[0]
        raise DatastoreError(f"cannot --resume {out}: --{k.replace('_', '-')} is {mine.get(k)!r} now, "
                             f"{old.get(k)!r} when the build started; use the same settings or --overwrite")
    if [s.to_json() for s in sources] != header["corpus"]["sources"]:
        raise DatastoreError(f"cannot --resume {out}: the input files differ from those the build started "
                             "with (paths, sizes or hashes); use the same --data or --overwrite")
    return header


def _clear(out: Path) -> None:
    for name in _OWNED_FILES:
        (out / name).unlink(missing_ok=True)


def _write_npy_from_raw(raw: Path, dest: Path, dtype, shape: tuple) -> None:
    """Wrap a raw little-endian array file into a .npy file (streamed, constant memory)."""
    tmp = dest.with_name(dest.name + ".tmp")
    with open(tmp, "wb") as f, open(raw, "rb") as r:
        np.lib.format.write_array_header_2_0(
            f, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape})
        shutil.copyfileobj(r, f, 1 << 22)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dest)
    raw.unlink()


def _tokenize(out: Path, tokenizer, sources, cfg: BuildConfig, header: dict) -> None:
    """Phase 1: tokens.npy, values.npy, documents.json; fills header totals."""
    from tqdm.auto import tqdm

    docs, n_tokens, n_rows = [], 0, 0
    tok_raw, val_raw = out / (TOKENS + ".part"), out / (VALUES + ".part")
    bar = tqdm(desc="tokenizing", unit="doc", disable=not cfg.progress)
    with open(tok_raw, "wb") as ft, open(val_raw, "wb") as fv:
        for d, arr in tokenize_documents(tokenizer, iter_documents(sources, cfg.text_field), cfg.max_tokens):
            ft.write(arr.tobytes())
            fv.write(arr[1:].tobytes())
            docs.append({"name": d.name, "source": d.source, "offset": n_tokens, "length": len(arr),
                         "first_row": n_rows, "sha256": sha256_text(d.text)})
            n_tokens += len(arr)
            n_rows += count_targets(len(arr))
            bar.update(1)
    bar.close()
    if n_rows == 0:
        raise CorpusError(f"the corpus has no tokens to predict ({len(docs)} documents, "
                          f"{n_tokens} tokens); check --data / --glob / --text-field")
    _write_npy_from_raw(tok_raw, out / TOKENS, np.int32, (n_tokens,))
    _write_npy_from_raw(val_raw, out / VALUES, np.int32, (n_rows,))
    write_json_atomic(out / DOCUMENTS, docs)
    header.update(status="building", count=0, total=n_rows, tokens=n_tokens)
    header["corpus"]["documents"] = len(docs)
    logger.info("tokenized %d documents: %d tokens, %d key rows", len(docs), n_tokens, n_rows)


def _allocate_keys(path: Path, n: int, dim: int, dtype) -> int:
    """Create keys.npy at full size (sparse); return the byte offset of row 0."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_2_0(
            f, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": (n, dim)})
        offset = f.tell()
        f.truncate(offset + n * dim * np.dtype(dtype).itemsize)
    return offset


def _keys_offset(path: Path) -> int:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        read(f)
        return f.tell()


def _extract(out: Path, model, header: dict, cfg: BuildConfig, key_layer: str) -> None:
    """Phase 2: run the model over every window and write key rows; resumable."""
    from tqdm.auto import tqdm

    documents = json.loads((out / DOCUMENTS).read_text())
    n, dim = int(header["total"]), int(header["key"]["dim"])
    dtype = np.dtype(KEY_DTYPES[cfg.key_dtype])
    keys_path = out / KEYS
    if header["count"] == 0 or not keys_path.exists():
        header["count"] = 0
        offset = _allocate_keys(keys_path, n, dim, dtype)
    else:
        offset = _keys_offset(keys_path)
    row_bytes = dim * dtype.itemsize
    tokens = np.load(out / TOKENS, mmap_mode="r")
    device = next(model.parameters()).device

    def doc_tokens(di: int) -> np.ndarray:
        d = documents[di]
        return tokens[d["offset"]: d["offset"] + d["length"]]

    start_count = cursor = int(header["count"])
    bar = tqdm(total=n, initial=start_count, unit="tok", unit_scale=True, desc="extracting keys",
               disable=not cfg.progress, smoothing=0.1)
    t0 = time.time()
    fd = os.open(keys_path, os.O_WRONLY)
    last_commit = time.time()

    def commit(rows: int) -> None:
        """Make rows [0, rows) durable, then record them: count never runs ahead of the disk."""
        nonlocal last_commit
        os.fdatasync(fd)
        header["count"] = rows
        write_json_atomic(out / HEADER, header)
        last_commit = time.time()

    try:
        with torch.inference_mode(), capture_keys(model, key_layer, stop_after=True) as cap:
            for row0, batch in iter_batches(documents, cfg.context, cfg.stride, cfg.batch_size):
                nrows = sum(end - first for _, _, end, first in batch)
                if row0 + nrows <= start_count:
                    continue  # done before the interruption
                if row0 != cursor:
                    raise DatastoreError(f"{out}: row count {start_count} is not at a batch boundary; "
                                         "the datastore is corrupt, rebuild it with --overwrite")
                ids = pad_windows(batch, doc_tokens)  # (B, T)
                h = cap.keys_of(torch.from_numpy(ids).to(device))  # (B, T, D)
                # target j is predicted at position j - 1; positions are relative to the window
                rows = torch.cat([h[b, first - 1 - start: end - 1 - start]
                                  for b, (_, start, end, first) in enumerate(batch)])  # (nrows, D)
                buf = rows.to(torch.float32).cpu().numpy().astype(dtype, copy=False).tobytes()
                os.pwrite(fd, buf, offset + row0 * row_bytes)
                cursor = row0 + nrows
                if time.time() - last_commit >= COMMIT_SECONDS or cursor == n:
                    commit(cursor)
                bar.update(nrows)
    finally:
        os.close(fd)
        bar.close()
    dt = time.time() - t0
    done = n - start_count
    header["build"]["stats"] = {
        "extract_seconds": round(dt, 2), "rows_this_run": done,
        "tokens_per_second": round(done / dt, 1) if dt > 0 else None,
        "peak_rss_mib_after_extract": round(_peak_rss_mib(), 1),
    }
    logger.info("extracted %d keys in %.1fs (%.0f tok/s)", done, dt, done / max(dt, 1e-9))


def build_datastore(model, tokenizer, data: Sequence[str] | Sequence[Source], out: str | os.PathLike,
                    cfg: BuildConfig | None = None):
    """Build (or resume) a datastore in ``out`` and return it opened (``knnlm.Datastore``).

    ``data`` is a list of input paths, or of ``Source`` from ``resolve_sources`` (already checked).
    Everything that can be checked before writing is checked first (paths, key layer, index
    spec, the output directory); a failure while tokenizing a fresh build removes what it wrote.
    """
    cfg = cfg or BuildConfig()
    out = Path(out)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and cfg.context > max_pos:
        raise DatastoreError(f"--context {cfg.context} exceeds the model's {max_pos} positions; lower it")
    key_layer = find_key_module(model, cfg.layer)
    dim = _key_dim(model, key_layer)
    plan_index(cfg.index, 1 << 20, dim)  # parse check only; planned for real once N is known
    sources = list(data) if all(isinstance(d, Source) for d in data) and data else \
        resolve_sources(data, cfg.globs, cfg.exclude)
    identity = model_identity(model, tokenizer, key_layer)
    header = _check_out_dir(out, identity, cfg, sources)
    fresh = header is None
    if fresh:
        out.mkdir(parents=True, exist_ok=True)
        _clear(out)
        header = new_header(identity=identity, key_layer=key_layer, dim=dim, key_dtype=cfg.key_dtype,
                            sources=sources, settings=cfg.settings(), version=__version__)
        write_json_atomic(out / HEADER, header)
    t_start = time.time()
    if header["status"] == "tokenizing":
        try:
            _tokenize(out, tokenizer, sources, cfg, header)
        except BaseException:
            if fresh:
                _clear(out)
                if not any(out.iterdir()):
                    out.rmdir()
            raise
        write_json_atomic(out / HEADER, header)
    if header["status"] == "building" and header["count"] < header["total"]:
        _extract(out, model, header, cfg, key_layer)
        write_json_atomic(out / HEADER, header)
    if header["status"] == "building":
        plan = plan_index(cfg.index, int(header["total"]), dim)
        logger.info("%s", plan.describe(int(header["total"]), dim))
        header["index"] = build_index(out / KEYS, int(header["total"]), dim, plan, out / INDEX,
                                      seed=cfg.seed, progress=cfg.progress)
        header["build"].setdefault("stats", {})["peak_rss_mib"] = round(_peak_rss_mib(), 1)
        header["build"]["stats"]["total_seconds_this_run"] = round(time.time() - t_start, 2)
        header["status"] = "complete"
        write_json_atomic(out / HEADER, header)
    return open_datastore(out)


def _new_output_dir(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise DatastoreError(f"--out {out} exists and is not empty; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)


def _copy_keys(dst: np.ndarray, src: np.ndarray, at: int, chunk: int = 1 << 16) -> None:
    """dst[at : at + len(src)] = src, in chunks (constant memory for memory-mapped arrays)."""
    for lo in range(0, len(src), chunk):
        hi = min(len(src), lo + chunk)
        dst[at + lo: at + hi] = src[lo:hi]


def _index_and_complete(out: Path, header: dict, index: str, seed: int, progress: bool):
    """Final phase shared by subset and merge: the arrays are on disk, build the index, mark complete."""
    n, dim = int(header["total"]), int(header["key"]["dim"])
    plan = plan_index(index, n, dim)
    logger.info("%s", plan.describe(n, dim))
    header["index"] = build_index(out / KEYS, n, dim, plan, out / INDEX, seed=seed, progress=progress)
    header["status"] = "complete"
    write_json_atomic(out / HEADER, header)
    return open_datastore(out)


def subset_datastore(src, out: str | os.PathLike, max_tokens: int, *, index: str = "auto", seed: int = 0,
                     progress: bool = True):
    """A smaller datastore made of the first documents of ``src`` (whole documents, at most
    ``max_tokens`` corpus tokens), with its own index: for datastore-size studies without
    re-running the model. Its keys are byte-identical to a build over those documents alone.
    """
    import copy

    out = Path(out)
    docs = [d for d in src.documents if d["offset"] + d["length"] <= max_tokens]
    if not docs or sum(d["length"] - 1 for d in docs) == 0:
        raise DatastoreError(f"no whole document of {src.path} fits in {max_tokens} tokens; raise the limit")
    _new_output_dir(out)
    n_tok = docs[-1]["offset"] + docs[-1]["length"]
    n = docs[-1]["first_row"] + docs[-1]["length"] - 1
    header = copy.deepcopy(src.header)
    header.update(status="building", count=n, total=n, tokens=n_tok, index=None)
    header["corpus"]["documents"] = len(docs)
    header["build"]["subset_of"] = {"path": str(src.path), "max_tokens": max_tokens}
    header["build"].pop("stats", None)
    write_json_atomic(out / HEADER, header)
    np.save(out / TOKENS, np.asarray(src.tokens[:n_tok]))
    np.save(out / VALUES, np.asarray(src.values[:n]))
    keys = np.lib.format.open_memmap(out / KEYS, mode="w+", dtype=src.keys.dtype, shape=(n, src.dim))
    _copy_keys(keys, src.keys[:n], 0)
    keys.flush()
    del keys
    write_json_atomic(out / DOCUMENTS, docs)
    return _index_and_complete(out, header, index, seed, progress)


# What must agree between the inputs of a merge (header path, what it is called in the error).
_MERGE_MUST_MATCH = ((("model", "config_hash"), "model config"), (("model", "weights_fingerprint"), "model weights"),
                     (("model", "tokenizer_hash"), "tokenizer"), (("key", "layer"), "key layer"),
                     (("key", "dim"), "key dim"), (("key", "dtype"), "key dtype"),
                     (("window", "context"), "window context"), (("window", "stride"), "window stride"))


def merge_datastores(inputs: Sequence, out: str | os.PathLike, *, index: str = "auto", seed: int = 0,
                     progress: bool = True):
    """One datastore holding the rows of every input, in order, with a new index over all of them.

    For sharded builds: split a corpus, run ``build-index`` on each part (on several machines, or
    one after another), then merge. The inputs must come from the same model, tokenizer, key
    layer, key dtype and window settings, and must not share a document (same name and text);
    the merged keys, values and tokens are exactly those of the inputs, concatenated.
    """
    import copy

    from tqdm.auto import tqdm

    if len(inputs) < 2:
        raise DatastoreError("merge needs at least two datastores")
    stores = [d if hasattr(d, "keys") else open_datastore(d, require_index=False) for d in inputs]
    first = stores[0]
    for ds in stores[1:]:
        for (sec, key), what in _MERGE_MUST_MATCH:
            if ds.header[sec].get(key) != first.header[sec].get(key):
                raise DatastoreError(f"cannot merge {ds.path} into {first.path}: another {what} "
                                     f"({ds.header[sec].get(key)!r} != {first.header[sec].get(key)!r}); "
                                     "merge only datastores built with the same model and settings")
    seen: dict[tuple[str, str], Path] = {}
    for ds in stores:
        for d in ds.documents:
            k = (d["name"], d["sha256"])
            if k in seen:
                raise DatastoreError(f"document {d['name']} is in both {seen[k]} and {ds.path}; a merge would "
                                     "count it twice (a --max-tokens cut can split a file): make one input "
                                     "without it (e.g. `subset_datastore` to whole documents)")
            seen[k] = ds.path
    n = sum(len(ds) for ds in stores)
    plan_index(index, n, first.dim)  # a bad --index fails before anything is written
    out = Path(out)
    _new_output_dir(out)
    n_tok = sum(int(ds.header["tokens"]) for ds in stores)
    header = copy.deepcopy(first.header)
    header.update(status="building", count=n, total=n, tokens=n_tok, index=None,
                  created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), knnlm_version=__version__)
    header["build"].pop("stats", None)
    header["build"].pop("subset_of", None)
    header["build"]["max_tokens"] = None
    header["build"]["merged_from"] = [{"path": str(ds.path), "keys": len(ds), "tokens": int(ds.header["tokens"]),
                                       "documents": len(ds.documents), "created": ds.header.get("created")}
                                      for ds in stores]
    write_json_atomic(out / HEADER, header)  # status "building": never opens as valid until the index exists
    keys = np.lib.format.open_memmap(out / KEYS, mode="w+", dtype=first.keys.dtype, shape=(n, first.dim))
    values = np.lib.format.open_memmap(out / VALUES, mode="w+", dtype=np.int32, shape=(n,))
    tokens = np.lib.format.open_memmap(out / TOKENS, mode="w+", dtype=np.int32, shape=(n_tok,))
    docs: list[dict] = []
    sources: dict[str, int] = {}
    row, tok = 0, 0
    bar = tqdm(total=n, unit="key", desc="merging", disable=not progress)
    for ds in stores:
        m, t = len(ds), int(ds.header["tokens"])
        _copy_keys(keys, ds.keys, row)
        values[row: row + m] = ds.values
        tokens[tok: tok + t] = ds.tokens
        remap = []  # this input's source index -> merged source index (a source listed twice is kept once)
        for src in ds.header["corpus"]["sources"]:
            key = json.dumps(src, sort_keys=True)
            if key not in sources:
                sources[key] = len(sources)
            remap.append(sources[key])
        docs += [{**d, "offset": d["offset"] + tok, "first_row": d["first_row"] + row,
                  "source": remap[d["source"]]} for d in ds.documents]
        row, tok = row + m, tok + t
        bar.update(m)
    bar.close()
    for arr in (keys, values, tokens):
        arr.flush()
    del keys, values, tokens
    header["corpus"].update(sources=[json.loads(k) for k in sources], documents=len(docs))
    write_json_atomic(out / DOCUMENTS, docs)
    write_json_atomic(out / HEADER, header)
    return _index_and_complete(out, header, index, seed, progress)
