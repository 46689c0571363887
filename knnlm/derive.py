"""Datastores made from other datastores' rows, each written like a build (``DatastoreWriter``:
crash-safe, resumable or replaced, never half-written): ``subset_datastore`` (the first rows of
one), ``merge_datastores`` (several, concatenated) and ``reindex_datastore`` (the same rows under a
new index, switched to atomically)."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from knnlm import __version__, config
from knnlm.data import count_targets
from knnlm.datastore import (
    INDEX,
    IVFDATA,
    KEYS,
    Datastore,
    DatastoreWriter,
    Header,
    _listing,
    _lock,
    _now,
    _unlock,
    build_index,
    check_entries,
    command_of,
    disk_errors,
    new_generation,
    open_datastore,
    read_header,
)
from knnlm.errors import DatastoreError

logger = logging.getLogger(__name__)

__all__ = ["subset_datastore", "merge_datastores", "reindex_datastore", "cut_document"]


def _derived_header(src: Header, **build_extra) -> Header:
    """A fresh header for a datastore made from others' rows (same model, keys and windows)."""
    h = copy.deepcopy(src)
    h.status, h.count, h.total, h.tokens, h.index, h.gate = "tokenizing", 0, None, None, None, None
    h.created, h.knnlm_version = _now(), __version__
    for k in ("stats", "subset_of", "merged_from"):
        h.build.pop(k, None)
    h.build.update(build_extra)
    return h


def _new_writer(out: str | os.PathLike, header: Header, command: str) -> DatastoreWriter:
    """A writer of a fresh derived datastore (``command``: subset | merge) at ``out``: a new or
    empty directory, or the unfinished result of an interrupted run of the same command (it
    cannot resume: it is replaced)."""
    out = Path(out)
    if out.exists() and out.is_dir() and _listing(out):
        old = read_header(out)
        if old is None or old.complete or command_of(old) != command:
            raise DatastoreError(f"`out` {out} exists and is not empty; choose a new directory", param="out")
        logger.info("replacing the unfinished %s at %s", command, out)
        return DatastoreWriter.start(out, header, overwrite=True)
    return DatastoreWriter.start(out, header)


def cut_document(ds: Datastore) -> int | None:
    """Index of the document that the build's ``max_tokens`` may have cut short (the last one, when
    the build stopped at its budget), else None. A document ending exactly at the budget counts as
    cut: what follows it in the corpus is the place a next shard starts either way."""
    budget = ds.header.build.get("max_tokens")
    if budget is None or ds.header.tokens is None or ds.header.tokens < budget or not ds.documents:
        return None
    return len(ds.documents) - 1


def subset_datastore(src: Datastore, out: str | os.PathLike, max_tokens: int | None = None, *,
                     index: str = "auto", index_storage: str = "auto", seed: int = 0,
                     progress: bool = True) -> Datastore:
    """A smaller datastore made of the first documents of ``src`` (whole documents, at most
    ``max_tokens`` corpus tokens), with its own index: for datastore-size studies, or to shard
    (``merge_datastores``) a build that ``max_tokens`` cut, without re-running the model.
    ``max_tokens`` None: every document but the one the build's ``max_tokens`` cut (``cut_document``).
    Its keys are byte-identical to a build over those documents alone.
    """
    from knnlm.index import plan_index

    config.check_at_least("max_tokens", max_tokens, 1)
    if max_tokens is None:
        cut = cut_document(src)
        if cut is None:
            raise DatastoreError(f"no document of {src.path} was cut by a `max_tokens` budget: it can be merged as it "
                                 "is; give `max_tokens` for a smaller datastore", param="max_tokens")
        max_tokens = src.documents[cut]["offset"]
    docs = [d for d in src.documents if d["offset"] + d["length"] <= max_tokens]
    if not docs or sum(count_targets(d["length"]) for d in docs) == 0:
        raise DatastoreError(f"no whole document of {src.path} fits in `max_tokens` = {max_tokens}; raise it",
                             param="max_tokens")
    n = docs[-1]["first_row"] + count_targets(docs[-1]["length"])  # an empty last document adds no row
    src.require_keys("index", "a subset re-indexes the keys: build the smaller datastore from the corpus")
    plan_index(index, n, src.dim, storage=index_storage)  # a bad index fails before anything is written
    with disk_errors(Path(out), "subset"):
        writer = _new_writer(out, _derived_header(src.header, subset_of={"path": str(src.path),
                                                                         "max_tokens": max_tokens}), "subset")
    try:
        with disk_errors(Path(out), "subset"):
            writer.write_corpus(((d, src.document_tokens(i)) for i, d in enumerate(docs)), progress=False)
            with writer:
                writer.copy_rows(src.keys[:n], 0)
                writer.commit(n)
            return writer.finalize(index, storage=index_storage, seed=seed, progress=progress)
    finally:
        writer.release()


# What must agree between the inputs of a merge besides the model: (section, field) of the header.
_MERGE_MUST_MATCH = (("key", "layer"), ("key", "dim"), ("key", "dtype"), ("window", "context"),
                     ("window", "stride"), ("window", "bos"))


def _check_mergeable(stores: Sequence[Datastore]) -> None:
    first = stores[0]
    for ds in stores[1:]:
        diff = first.header.model.mismatch(ds.header.model)
        if diff:
            raise DatastoreError(f"cannot merge {ds.path} into {first.path}: another {diff[1]} ({diff[0]} differs); "
                                 "merge only datastores built with the same model and settings")
        for sec, key in _MERGE_MUST_MATCH:
            a, b = getattr(getattr(first.header, sec), key), getattr(getattr(ds.header, sec), key)
            if a != b:
                raise DatastoreError(f"cannot merge {ds.path} into {first.path}: another {sec} {key} "
                                     f"({b!r} != {a!r}); merge only datastores built with the same model and settings")
    seen: dict[tuple[str, str], Path] = {}
    for ds in stores:
        for d in ds.documents:
            k = (d["name"], d["sha256"])
            if k in seen:
                raise DatastoreError(f"document {d['name']} is in both {seen[k]} and {ds.path}; a merge would "
                                     "count it twice (a max_tokens cut can split a file): make one input "
                                     "without it (`knnlm subset` / `subset_datastore`: its whole documents)")
            seen[k] = ds.path


def _merged_documents(stores: Sequence[Datastore], sources: dict[str, int]):
    """(document, token ids) of every input in order, source indices remapped into ``sources``
    (filled as a side effect: a source listed by several inputs is kept once)."""
    for ds in stores:
        remap = []
        for src in ds.header.corpus.sources:
            key = json.dumps(src, sort_keys=True)
            remap.append(sources.setdefault(key, len(sources)))
        for i, d in enumerate(ds.documents):
            yield {**d, "source": remap[d["source"]]}, ds.document_tokens(i)


def merge_datastores(inputs: Sequence[str | os.PathLike | Datastore], out: str | os.PathLike, *,
                     index: str = "auto", index_storage: str = "auto", seed: int = 0,
                     progress: bool = True) -> Datastore:
    """One datastore holding the rows of every input, in order, with a new index over all of them.

    For sharded builds: split a corpus, run ``build-index`` on each part (on several machines, or
    one after another), then merge. The inputs must come from the same model, tokenizer, key
    layer, key dtype and window settings, and must not share a document (same name and text);
    the merged keys, values and tokens are exactly those of the inputs, concatenated.
    """
    from tqdm.auto import tqdm

    from knnlm.index import plan_index

    if len(inputs) < 2:
        raise DatastoreError("`inputs`: merge needs at least two datastores", param="inputs")
    stores = [d if isinstance(d, Datastore) else open_datastore(d, require_index=False) for d in inputs]
    _check_mergeable(stores)
    for ds in stores:
        ds.require_keys("index", "a merge re-indexes the keys: build the merged datastore from the corpora")
    plan_index(index, sum(len(ds) for ds in stores), stores[0].dim,
               storage=index_storage)  # a bad index fails before anything is written
    merged_from = [{"path": str(ds.path), "keys": len(ds), "tokens": ds.header.tokens,
                    "documents": len(ds.documents), "created": ds.header.created} for ds in stores]
    header = _derived_header(stores[0].header, merged_from=merged_from)
    header.build["max_tokens"] = None
    with disk_errors(Path(out), "merge"):
        writer = _new_writer(out, header, "merge")
    try:
        with disk_errors(Path(out), "merge"):
            sources: dict[str, int] = {}
            writer.write_corpus(_merged_documents(stores, sources), progress=False)
            writer.header.corpus.sources = [json.loads(k) for k in sources]
            with writer, tqdm(total=writer.header.total, unit="key", desc="merging", disable=not progress) as bar:
                row = 0
                for ds in stores:
                    writer.copy_rows(ds.keys, row, bar)
                    row += len(ds)
                writer.commit(row)
            return writer.finalize(index, storage=index_storage, seed=seed, progress=progress)
    finally:
        writer.release()


def _index_files(path: Path) -> list[Path]:
    """Every index file the datastore's writers may have made in ``path``."""
    return [p for pattern in (INDEX, IVFDATA, "index.r*.faiss", "index.r*.ivfdata", "index.s*.faiss",
                              "index.s*.ivfdata") for p in path.glob(pattern)]


def _kept_training(path: Path, record: dict | None, index: str) -> Path:
    """The index file whose training ``reindex_datastore(keep_training=True)`` keeps: the
    current index (its first shard), checked like any index the datastore opens."""
    from knnlm.index import check_lists

    if record is None:
        raise DatastoreError(f"{path} has no index whose training to keep; leave out `keep_training`",
                             param="keep_training")
    if "IVF" not in record["factory"]:
        raise DatastoreError(f"{path}'s index {record['factory']} has no training to keep (only IVF indexes do); "
                             "leave out `keep_training`", param="keep_training")
    if index not in ("auto", record["factory"]):
        raise DatastoreError(f"`keep_training` keeps the current recipe {record['factory']}; `index` {index!r} "
                             "would need training anew: leave out one of the two", param="keep_training")
    source = path / (record.get("shards") or [record])[0]["file"]
    check_lists(source, storage=record.get("storage", "ram"),
                ivfdata=path / record["ivfdata"] if record.get("ivfdata") else None)
    return source


def reindex_datastore(path: str | os.PathLike, *, index: str = "auto", index_storage: str = "auto", seed: int = 0,
                      progress: bool = True, index_shards: int = 1, keep_training: bool = False) -> Datastore:
    """Rebuild only the index of a complete datastore (another recipe, or RAM <-> disk storage,
    or split into ``index_shards``), from its keys. The new index is written under fresh file
    names, then the header is switched to it atomically, then the old index files are removed: an
    interrupted reindex leaves the old index in use, never a half-written one. Holds the
    directory's writer lock throughout.

    ``keep_training``: keep the current IVF index's recipe, nprobe and training (coarse quantizer,
    codebooks) and only add the keys again: another storage or shard count without training anew,
    and neighbours identical to the current index's."""
    from knnlm.index import plan_index

    path = Path(path)
    config.check_at_least("index_shards", index_shards, 1)
    ds = open_datastore(path, require_index=False)
    ds.require_keys("index", "its index cannot be rebuilt: rebuild the datastore from the corpus")
    n, dim = len(ds), ds.dim
    trained_from = _kept_training(path, ds.header.index, index) if keep_training else None
    plan = plan_index(ds.header.index["factory"] if keep_training else index, n, dim, storage=index_storage)
    if keep_training:
        plan = replace(plan, nprobe=ds.header.index.get("nprobe") or plan.nprobe, train_rows=0)
    logger.info("%s%s", plan.describe(n, dim), f", training kept from {trained_from.name}" if trained_from else "")
    fd = _lock(path)
    try:
        header = read_header(path)  # as it is now that the lock is held
        gen = 1
        while any((path / f"index.r{gen}{ext}").exists() for ext in (".faiss", ".ivfdata")):
            gen += 1
        name = INDEX if header.index is None and not (path / INDEX).exists() else f"index.r{gen}.faiss"
        check_entries(path, header)
        if keep_training:  # the index of now, under the lock
            trained_from = _kept_training(path, header.index, plan.factory)
        with disk_errors(path, "reindex"):
            header.index = build_index(path / KEYS, n, dim, plan, path / name, seed=seed, progress=progress,
                                       index_shards=index_shards, trained_from=trained_from)
            header.generation = new_generation()
            header.build.setdefault("reindexed", []).append({"index": index, "index_storage": index_storage,
                                                             "seed": seed, "at": _now(),
                                                             **({"index_shards": index_shards}
                                                                if index_shards > 1 else {}),
                                                             **({"keep_training": True} if keep_training else {})})
            header.write(path)
        keep = {name for r in header.index.get("shards") or [header.index] for name in (r["file"], r.get("ivfdata"))}
        for p in _index_files(path):  # the old index, and any that an interrupted reindex left
            if p.name not in keep:
                p.unlink(missing_ok=True)
        for pattern in (".index*.build", ".index*.staging"):  # work files a killed reindex left behind
            for p in path.glob(pattern):
                shutil.rmtree(p, ignore_errors=True)
    finally:
        _unlock(path, fd)
    return open_datastore(path)
