"""Building a datastore: the model's pass over a corpus. The format is ``knnlm.datastore``'s.

Phases (``Header.status``, written by ``knnlm.datastore.DatastoreWriter``):

1. ``tokenizing``: every document is tokenized once into ``tokens.npy``, ``values.npy`` and
   ``documents.json``. Cheap; an interrupted tokenization restarts from scratch.
2. ``building``: windows (see ``knnlm.data.windows``; a ``<bos>`` in front of each window that
   starts inside a document when the tokenizer uses one) go through the model in batches of
   ``batch_size``; the key rows of each batch are written at their final place in ``keys.npy``
   and, once on disk, ``Header.count`` advances. Batches are a pure function of the corpus and
   the settings, so a resumed build recomputes exactly the batches an uninterrupted one would:
   the bytes are identical.
3. the index is trained and filled from ``keys.npy``, written atomically, and the status becomes
   ``complete``.

Memory is bounded by one batch of activations plus one chunk of keys while adding to the
index, plus the index itself: keys are streamed to disk with ``pwrite``, never held in RAM.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from knnlm.capture import capture_keys, find_key_module
from knnlm.config import RESUME_KEYS, BuildConfig, check_context
from knnlm.data import (
    Source,
    batch_inputs,
    check_build_inputs,
    iter_batches,
    iter_documents,
    sha256_text,
    tokenize_documents,
    tokenizer_bos,
)
from knnlm.datastore import (
    INDEX,
    IVFDATA,
    KEYS,
    SHARD,
    TRAINED,
    CorpusSpec,
    Datastore,
    DatastoreError,
    DatastoreWriter,
    Header,
    KeySpec,
    WindowSpec,
    build_dir,
    check_index_shards,
    disk_errors,
    index_record,
    index_work_dir,
    merge_fills,
    model_identity,
    open_datastore,
    read_header,
)
from knnlm.distributed import SINGLE, World, agree, barrier, on_main, shard_range
from knnlm.index import check_index_spec

logger = logging.getLogger(__name__)

__all__ = ["build_datastore"]

# How often finished rows are fsync'ed and recorded in the header (what resume restarts from).
COMMIT_SECONDS = float(os.environ.get("KNNLM_COMMIT_SECONDS", "5"))


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _key_dim(model, layer: str) -> int:
    """Width of the key module's input, from a 2-token probe forward."""
    device = next(model.parameters()).device
    with torch.inference_mode(), capture_keys(model, layer, stop_after=True) as cap:
        return int(cap.keys_of(torch.zeros(1, 2, dtype=torch.long, device=device)).shape[-1])


def _new_header(model, tokenizer, sources: list[Source], cfg: BuildConfig) -> Header:
    """The header a build of ``sources`` with ``cfg`` starts from (checks the model side first)."""
    key_layer = find_key_module(model, cfg.layer)
    bos = tokenizer_bos(tokenizer)
    check_context(cfg.context, bos, getattr(model.config, "max_position_embeddings", None))
    return Header(model=model_identity(model, tokenizer, key_layer),
                  key=KeySpec(layer=key_layer, dim=_key_dim(model, key_layer), dtype=cfg.key_dtype),
                  window=WindowSpec(context=cfg.context, stride=cfg.stride, bos=bos),
                  corpus=CorpusSpec(sources=[s.to_json() for s in sources], text_field=cfg.text_field),
                  build=cfg.settings())


def _corpus(tokenizer, sources: list[Source], cfg: BuildConfig):
    """(document record, token ids) of every document, in the deterministic corpus order."""
    for d, ids in tokenize_documents(tokenizer, iter_documents(sources, cfg.text_field), cfg.max_tokens):
        yield {"name": d.name, "source": d.source, "sha256": sha256_text(d.text)}, ids


def _todo(documents: list[dict], done: list[list[int]], header: Header, batch_size: int) -> list[tuple[int, list]]:
    """The batches (``iter_batches``) whose rows are not all in ``done`` (``done_rows()``), in row order."""
    out, j = [], 0
    for row0, batch in iter_batches(documents, header.window.context, header.window.stride, batch_size):
        end = row0 + sum(w.end - w.first for w in batch)
        while j < len(done) and done[j][1] <= row0:
            j += 1
        if not (j < len(done) and done[j][0] <= row0 and end <= done[j][1]):
            out.append((row0, batch))
    return out


def _extract(writer: DatastoreWriter, model, cfg: BuildConfig, world: World = SINGLE) -> None:
    """Phase 2: run the model over the windows whose rows are not final and write key rows;
    resumable. Under torchrun each rank takes a contiguous share of those batches (balanced by
    rows); the rows, and so the bytes, do not depend on which rank computes them."""
    from tqdm.auto import tqdm

    header = writer.header
    documents, done_before = writer.documents(), writer.done_rows()  # read once
    todo = _todo(documents, done_before, header, cfg.batch_size)
    lo, hi = shard_range([sum(w.end - w.first for w in b) for _, b in todo], world)
    mine = todo[lo:hi]
    # a single process whose rows so far are a prefix keeps recording it as Header.count
    as_prefix = not world.distributed and done_before in ([], [[0, header.count]]) and \
        (not mine or mine[0][0] == header.count)
    tokens = writer.tokens()
    bos, device = header.window.bos, next(model.parameters()).device
    n_mine = sum(w.end - w.first for _, b in mine for w in b)
    done: list[list[int]] = []
    t0 = last_commit = time.time()
    desc = "extracting keys" + (f" ({world}, {world.size} ranks)" if world.distributed else "")
    with writer, torch.inference_mode(), capture_keys(model, header.key.layer, stop_after=True) as cap, \
            tqdm(total=header.total, initial=header.total - sum(w.end - w.first for _, b in todo for w in b),
                 unit="tok", unit_scale=True, desc=desc, disable=not cfg.progress, smoothing=0.1) as bar:
        for i, (row0, batch) in enumerate(mine):
            ids, rows_b, rows_t = batch_inputs(
                batch, lambda di: tokens[documents[di]["offset"]: documents[di]["offset"] + documents[di]["length"]],
                bos)
            h = cap.keys_of(torch.from_numpy(ids).to(device))  # (B, T, D)
            rows = h[torch.from_numpy(rows_b).to(device), torch.from_numpy(rows_t).to(device)]  # (nrows, D)
            writer.write_rows(row0, rows.to(torch.float32).cpu().numpy())
            end = row0 + len(rows)
            if done and done[-1][1] == row0:
                done[-1][1] = end
            else:
                done.append([row0, end])
            last = i == len(mine) - 1
            if time.time() - last_commit >= COMMIT_SECONDS or last:
                if as_prefix:
                    writer.commit(end)
                else:
                    writer.record(world.rank, done)
                last_commit = time.time()
            bar.update(min(len(rows) * world.size, bar.total - bar.n))  # every rank advances at about this pace
    dt = time.time() - t0
    header.build["stats"] = {
        "extract_seconds": round(dt, 2), "rows_this_run": n_mine * world.size if world.distributed else n_mine,
        "tokens_per_second": round(n_mine * world.size / dt, 1) if dt > 0 else None,
        "peak_rss_mib_after_extract": round(_peak_rss_mib(), 1), "world_size": world.size,
    }
    logger.info("extracted %d keys in %.1fs (%.0f tok/s%s)", n_mine, dt, n_mine / max(dt, 1e-9),
                f" on {world}" if world.distributed else "")


def _index_sharded(writer: DatastoreWriter | None, cfg: BuildConfig, world: World, out: Path) -> Datastore | None:
    """Phase 3 over torchrun ranks: rank 0 trains the index once on a seeded sample, every rank
    encodes its share of the row ranges into fill files (one range per rank, or with
    ``index_shards`` N one per index shard, dealt round-robin), rank 0 merges them (RAM or on-disk
    inverted lists; one index file, or one per index shard) and completes the datastore. The same
    functions and the same bytes as the one-process ``DatastoreWriter.finalize``. Returns the
    datastore on rank 0."""
    from knnlm.index import fill_shard, plan_index, train_index

    header = read_header(out)
    n, dim = header.total, header.key.dim
    keys, index_path = out / KEYS, out / INDEX
    work = index_work_dir(index_path)
    t0 = time.time()

    def train():
        plan = plan_index(cfg.index, n, dim, storage=cfg.index_storage)  # storage "auto" is rank 0's call
        check_index_shards(plan, n, cfg.index_shards)
        logger.info("%s; filled by %d ranks", plan.describe(n, dim), world.size)
        with disk_errors(out):
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            (out / IVFDATA).unlink(missing_ok=True)
            train_index(keys, plan, work / TRAINED, seed=cfg.seed)
        return plan

    plan = on_main(world, train, share=True)
    if plan.shardable:  # range u = rows [n u / U, n (u + 1) / U), filled by rank u mod W
        units = cfg.index_shards if cfg.index_shards > 1 else world.size
        mine = range(world.rank, units, world.size)
    else:  # a graph index is filled in one piece, by rank 0
        units, mine = 1, range(1) if world.main else range(0)
    bounds = [n * u // units for u in range(units + 1)]
    fills = [work / SHARD.format(u) for u in range(units)]
    with disk_errors(out):
        for u in mine:
            fill_shard(work / TRAINED, keys, bounds[u], bounds[u + 1], fills[u])
    barrier(world)

    def merge() -> Datastore:
        with disk_errors(out):
            record = merge_fills(work / TRAINED, fills, bounds, index_path, storage=plan.storage,
                                 index_shards=cfg.index_shards)
            shutil.rmtree(work, ignore_errors=True)
            return writer.complete(index_record(plan, record, time.time() - t0))

    return on_main(world, merge)


def build_datastore(model, tokenizer, data: Sequence[str] | Sequence[Source], out: str | os.PathLike,
                    cfg: BuildConfig | None = None, world: World = SINGLE) -> Datastore:
    """Build (or resume) a datastore in ``out`` and return it opened (``knnlm.Datastore``).

    ``data`` is a list of input paths, or of ``Source`` from ``check_build_inputs`` /
    ``resolve_sources`` (already checked). Everything that can be checked before writing is
    checked first (corpus, index spec, key layer, context, the output directory); a failure while
    tokenizing a fresh build removes what it wrote.

    ``world`` (``knnlm.distributed.init_world()`` under torchrun): every rank calls this with the
    same arguments and its own model replica; rank 0 holds the directory's lock, tokenizes and
    builds the index, and every rank extracts its share of the keys. The datastore is the same,
    byte for byte, whatever the number of ranks; ranks that disagree on the arguments are refused
    before anything is written.
    """
    cfg = cfg or BuildConfig()
    if data and all(isinstance(d, Source) for d in data):
        sources = list(data)
        check_index_spec(cfg.index, cfg.index_storage)
    else:
        sources = check_build_inputs(data, cfg)
    t_start = time.time()
    header = _new_header(model, tokenizer, sources, cfg)
    agree(world, {"out": str(Path(out).resolve()), "data": header.corpus.sources, **header.build,
                  "model": header.model.to_json(), "layer": header.key.layer, "resume": cfg.resume,
                  "overwrite": cfg.overwrite})

    def start() -> DatastoreWriter:
        with disk_errors(Path(out)):
            w = DatastoreWriter.start(Path(out), header, resume=cfg.resume, overwrite=cfg.overwrite,
                                      resume_keys=RESUME_KEYS)
        try:
            with disk_errors(w.path):
                if w.header.status == "tokenizing":
                    try:
                        w.write_corpus(_corpus(tokenizer, sources, cfg), progress=cfg.progress)
                    except BaseException:
                        w.discard()
                        raise
                if not w.header.complete:
                    w.consolidate()
                    w.prepare_keys()  # before any other rank opens keys.npy
        except BaseException:
            w.release()
            raise
        return w

    writer = on_main(world, start)
    try:
        complete = on_main(world, lambda: writer.header.complete)
        if not world.main:
            complete = read_header(build_dir(out)).complete
        if not complete:
            if not world.main:
                writer = DatastoreWriter.follow(out)
            with disk_errors(writer.path):
                _extract(writer, model, cfg, world)
            barrier(world)

            def finish() -> None:
                with disk_errors(writer.path):
                    writer.consolidate()  # the ranks' progress files -> Header.count
                    if writer.header.count < writer.header.total:
                        raise DatastoreError(f"{writer.path}: {writer.header.count}/{writer.header.total} key rows "
                                             "final after every rank finished; run the same command with `resume`",
                                             param="out")

            on_main(world, finish)

            def finalize() -> Datastore:
                with disk_errors(writer.path):
                    return writer.finalize(cfg.index, storage=cfg.index_storage, seed=cfg.seed,
                                           progress=cfg.progress, index_shards=cfg.index_shards)

            if world.distributed:
                ds = _index_sharded(writer, cfg, world, writer.path)
            else:
                ds = on_main(world, finalize)
        else:
            ds = None
    finally:
        if world.main and writer is not None:
            writer.release()
    barrier(world)
    if ds is None:
        ds = open_datastore(out)
    if world.main:
        ds.header.build.setdefault("stats", {}).update(peak_rss_mib=round(_peak_rss_mib(), 1),
                                                       total_seconds_this_run=round(time.time() - t_start, 2))
        ds.header.write(ds.path)
    barrier(world)
    return ds
