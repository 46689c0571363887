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
    CorpusSpec,
    Datastore,
    DatastoreError,
    DatastoreWriter,
    Header,
    KeySpec,
    WindowSpec,
    disk_errors,
    model_identity,
    open_datastore,
)
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


def _extract(writer: DatastoreWriter, model, cfg: BuildConfig) -> None:
    """Phase 2: run the model over every window and write key rows; resumable."""
    from tqdm.auto import tqdm

    header = writer.header
    documents, tokens = writer.documents(), writer.tokens()
    n, bos = header.total, header.window.bos
    device = next(model.parameters()).device
    start_count = cursor = header.count
    t0 = last_commit = time.time()
    with writer, torch.inference_mode(), capture_keys(model, header.key.layer, stop_after=True) as cap, \
            tqdm(total=n, initial=start_count, unit="tok", unit_scale=True, desc="extracting keys",
                 disable=not cfg.progress, smoothing=0.1) as bar:
        for row0, batch in iter_batches(documents, header.window.context, header.window.stride, cfg.batch_size):
            nrows = sum(w.end - w.first for w in batch)
            if row0 + nrows <= start_count:
                continue  # done before the interruption
            if row0 != cursor:
                raise DatastoreError(f"{writer.path}: row count {start_count} is not at a batch boundary; "
                                     "the datastore is corrupt, rebuild it with `overwrite`")
            ids, rows_b, rows_t = batch_inputs(
                batch, lambda di: tokens[documents[di]["offset"]: documents[di]["offset"] + documents[di]["length"]],
                bos)
            h = cap.keys_of(torch.from_numpy(ids).to(device))  # (B, T, D)
            rows = h[torch.from_numpy(rows_b).to(device), torch.from_numpy(rows_t).to(device)]  # (nrows, D)
            writer.write_rows(row0, rows.to(torch.float32).cpu().numpy())
            cursor = row0 + nrows
            if time.time() - last_commit >= COMMIT_SECONDS or cursor == n:
                writer.commit(cursor)
                last_commit = time.time()
            bar.update(nrows)
    dt, done = time.time() - t0, n - start_count
    header.build["stats"] = {
        "extract_seconds": round(dt, 2), "rows_this_run": done,
        "tokens_per_second": round(done / dt, 1) if dt > 0 else None,
        "peak_rss_mib_after_extract": round(_peak_rss_mib(), 1),
    }
    writer.save_header()
    logger.info("extracted %d keys in %.1fs (%.0f tok/s)", done, dt, done / max(dt, 1e-9))


def build_datastore(model, tokenizer, data: Sequence[str] | Sequence[Source], out: str | os.PathLike,
                    cfg: BuildConfig | None = None) -> Datastore:
    """Build (or resume) a datastore in ``out`` and return it opened (``knnlm.Datastore``).

    ``data`` is a list of input paths, or of ``Source`` from ``check_build_inputs`` /
    ``resolve_sources`` (already checked). Everything that can be checked before writing is
    checked first (corpus, index spec, key layer, context, the output directory); a failure while
    tokenizing a fresh build removes what it wrote.
    """
    cfg = cfg or BuildConfig()
    if data and all(isinstance(d, Source) for d in data):
        sources = list(data)
        check_index_spec(cfg.index, cfg.index_storage)
    else:
        sources = check_build_inputs(data, cfg)
    t_start = time.time()
    with disk_errors(Path(out)):
        writer = DatastoreWriter.start(Path(out), _new_header(model, tokenizer, sources, cfg), resume=cfg.resume,
                                       overwrite=cfg.overwrite, resume_keys=RESUME_KEYS)
    try:
        with disk_errors(writer.path):
            if writer.header.complete:
                return open_datastore(writer.path)
            if writer.header.status == "tokenizing":
                try:
                    writer.write_corpus(_corpus(tokenizer, sources, cfg), progress=cfg.progress)
                except BaseException:
                    writer.discard()
                    raise
            if writer.header.count < writer.header.total:
                _extract(writer, model, cfg)
            ds = writer.finalize(cfg.index, storage=cfg.index_storage, seed=cfg.seed, progress=cfg.progress)
    finally:
        writer.release()
    ds.header.build.setdefault("stats", {}).update(peak_rss_mib=round(_peak_rss_mib(), 1),
                                                   total_seconds_this_run=round(time.time() - t_start, 2))
    ds.header.write(ds.path)
    return ds

