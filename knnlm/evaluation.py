"""Perplexity of the base LM and of the kNN-LM on the same tokens, sweeps, frequency buckets.

The eval text goes through the same sliding-window protocol as the builder (the datastore's
``context`` / ``stride`` / ``<bos>`` unless overridden). Each batch is one forward pass; the hidden
states of the scored positions query the index once, at the largest k of the sweep, and every
(lambda, temperature, k) setting is scored from those cached neighbours: log p_lm(target) is
computed once per token (it is the base-LM result too), the kNN term once per (T, k) from the K
neighbours, and the mix once per lambda -- no V-sized pass per setting. (The fused ``csrc`` op
computes full distributions for decoding; here it would only redo the V-sized pass already done.)

If an eval document is also in the datastore (same text hash, and the datastore's tokens are a
prefix of the eval document's: a build cut by ``max_tokens`` keeps only the first part of its
last document), each query whose own key is in the datastore has it excluded from the neighbours
(``exclude_self``, on by default): otherwise retrieval would find the answer at distance zero and
the perplexity would be meaningless. The result says how many documents and tokens overlapped.
With ``per_document`` the result also holds each document's summed negative log-likelihood (base
LM and the primary setting): what the lm-evaluation-harness model (``knnlm.harness``) reports; with
``per_token`` (Python only) every target's log-probability, base LM and each setting, as tensors.

``run(model, tokenizer, knn, ...)`` is the loop; ``KNNLM.evaluate`` and the functional
``knnlm.evaluate`` call it. The kNN side of each batch is ``KNNLM.lookup`` (which rows search,
follow pointers or get no neighbours) and ``KNNLM.mix_targets`` (the sweep's target
log-probabilities): the decisions every way of using a ``KNNLM`` shares.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from knnlm.capture import capture_keys
from knnlm.config import ADAPTIVE, EvalConfig, check_context
from knnlm.data import (
    Document,
    Source,
    batch_inputs,
    count_targets,
    iter_batches,
    iter_documents,
    resolve_sources,
    sha256_text,
    tokenize_documents,
    tokenizer_bos,
)
from knnlm.datastore import Datastore
from knnlm.distributed import SINGLE, World, gather, shard_range, together
from knnlm.errors import CorpusError, KnnlmError
from knnlm.gate import NL, lm_features
from knnlm.retrieval import Step, one_thread, resolve_k
from knnlm.scoring import knn_target_log_probs, lm_target_log_probs

logger = logging.getLogger(__name__)

__all__ = ["run", "eval_window", "BUCKET_EDGES", "format_results", "LMCache", "collect_tuning", "collect_self_tuning",
           "SELF_TUNE_TOKENS", "tunable_documents"]

# Datastore-corpus frequency buckets of the target token: [0], [1, 10), [10, 100), ...
BUCKET_EDGES = (0, 1, 10, 100, 1_000, 10_000)
EMPTY_SEARCH_WARN = 0.05  # warn when more than this share of searches finds no neighbour at all
DEFAULT_CONTEXT = 512  # windows of a base-LM-only eval (no datastore to take them from)


def _bucket_names() -> list[str]:
    names = ["0"]
    for lo, hi in zip(BUCKET_EDGES[1:], BUCKET_EDGES[2:]):
        names.append(f"{lo}-{hi - 1}")
    names.append(f">={BUCKET_EDGES[-1]}")
    return names


def _ppl(nll: float, n: int) -> float | None:
    if n == 0:
        return None
    v = nll / n
    return math.exp(v) if v < 700 else None  # None: infinite (a target with zero probability)


# ---------------------------------------------------------------------------- the eval text


def _load_eval_documents(tokenizer, data, texts, cfg: EvalConfig) -> list[dict]:
    if (data is None) == (texts is None):
        raise KnnlmError("pass either `data` (paths or Sources) or `texts` (strings) to evaluate", param="data")
    if texts is not None:
        documents = [Document(f"text[{i}]", -1, t) for i, t in enumerate(texts)]
    else:
        sources = list(data) if data and all(isinstance(d, Source) for d in data) else \
            resolve_sources(data, cfg.globs, cfg.exclude)
        documents = iter_documents(sources, cfg.text_field)
    docs = []
    for d, ids in tokenize_documents(tokenizer, documents, cfg.max_tokens):
        docs.append({"name": d.name, "length": len(ids), "ids": ids, "sha256": sha256_text(d.text)})
    if sum(count_targets(d["length"]) for d in docs) == 0:
        raise CorpusError(f"the eval text has no tokens to predict ({len(docs)} documents); check `data`",
                          param="data")
    return docs


@dataclass
class _Overlap:
    """Eval documents whose text is in the datastore: the datastore row of each of their targets."""
    rows: dict[int, tuple[int, int]] = field(default_factory=dict)  # eval doc -> (first row, datastore length)
    documents: int = 0
    tokens: int = 0

    def own_rows(self, doc: int, first: int, end: int) -> torch.Tensor:
        """Datastore row of each target ``[first, end)`` of eval document ``doc`` (-1: none)."""
        j = torch.arange(first, end)
        if doc not in self.rows:
            return torch.full_like(j, -1)
        row0, length = self.rows[doc]
        return torch.where(j < length, row0 + j - 1, torch.full_like(j, -1))


def _find_overlap(docs: list[dict], datastore: Datastore) -> _Overlap:
    """Match eval documents to datastore documents by text hash and token prefix: a datastore cut
    by ``max_tokens`` holds the first part of its last document, whose keys are still its own."""
    by_hash = {d["sha256"]: i for i, d in enumerate(datastore.documents)}
    ov = _Overlap()
    for i, d in enumerate(docs):
        j = by_hash.get(d["sha256"])
        if j is None:
            continue
        theirs = datastore.document_tokens(j)
        m = min(len(theirs), d["length"])
        if not np.array_equal(np.asarray(theirs[:m]), d["ids"][:m]):
            continue
        ov.rows[i] = (int(datastore.documents[j]["first_row"]), len(theirs))
        ov.documents += 1
        ov.tokens += max(m - 1, 0)
    return ov


# ---------------------------------------------------------------------------- accumulating


@dataclass
class _Tally:
    """Negative log-likelihood sums for the base LM and every grid setting, overall and per bucket."""
    grid_size: int
    n: int = 0
    nll_base: float = 0.0
    nll: torch.Tensor = None  # (G,)
    n_bucket: torch.Tensor = None  # (NB,)
    nll_bucket_base: torch.Tensor = None  # (NB,)
    nll_bucket: torch.Tensor = None  # (G, NB)
    t_lm: float = 0.0
    t_knn: float = 0.0
    n_searched: int = 0  # rows that ran a search
    n_empty: int = 0  # rows that searched and found no neighbour (FAISS id -1 for all k)
    n_pointed: int = 0  # rows scored from pointers (no search)
    lambdas: list = field(default_factory=list)  # adaptive λ of the rows with neighbours, per batch
    lam_bucket: torch.Tensor = None  # (NB,) sum of adaptive λ per bucket (rows without neighbours: 0)
    documents: int = 0  # > 0: also sum per document (``per_document``)
    doc_nll_base: torch.Tensor = None  # (D,)
    doc_nll: torch.Tensor = None  # (D,) the primary setting
    per_token: bool = False  # also keep every target's log-probability (``per_token``)
    tok_base: list = field(default_factory=list)  # (R,) per batch
    tok_grid: list = field(default_factory=list)  # per setting: (R,) per batch
    batch: bool = False  # one batch's tally (``fresh``): per-document terms kept, added by ``merge``
    doc_parts: list = field(default_factory=list)  # (doc (R,), -lp (R,), primary?) of a batch's tally
    ranks: list = field(default_factory=list)  # per torchrun rank: tokens and seconds (``_reduce``)

    def __post_init__(self):
        nb = len(BUCKET_EDGES)
        self.nll = torch.zeros(self.grid_size, dtype=torch.float64)
        self.n_bucket = torch.zeros(nb, dtype=torch.float64)
        self.nll_bucket_base = torch.zeros(nb, dtype=torch.float64)
        self.nll_bucket = torch.zeros(self.grid_size, nb, dtype=torch.float64)
        self.doc_nll_base = torch.zeros(self.documents, dtype=torch.float64)
        self.doc_nll = torch.zeros(self.documents, dtype=torch.float64)
        self.lam_bucket = torch.zeros(nb, dtype=torch.float64)
        self.tok_grid = [[] for _ in range(self.grid_size)]

    def add_lambdas(self, lam: torch.Tensor, bucket: torch.Tensor) -> None:
        x = lam.double().cpu()
        self.lambdas.append(x)
        self.lam_bucket += torch.bincount(bucket, weights=x, minlength=len(BUCKET_EDGES))

    def add_base(self, lp_lm: torch.Tensor, doc: torch.Tensor | None = None) -> None:
        """``doc`` (R,): the eval document of each target, when summing per document."""
        self.n += lp_lm.shape[0]
        self.nll_base -= lp_lm.double().sum().item()
        if self.per_token:
            self.tok_base.append(lp_lm.double().cpu())
        if doc is not None:
            self._add_docs(doc, -lp_lm.double().cpu(), False)

    def _add_docs(self, doc: torch.Tensor, nll: torch.Tensor, primary: bool) -> None:
        if self.batch:
            self.doc_parts.append((doc, nll, primary))
        else:
            (self.doc_nll if primary else self.doc_nll_base).index_add_(0, doc, nll)

    def fresh(self) -> _Tally:
        """An empty tally for one batch, added to this one later with ``merge``."""
        return _Tally(self.grid_size, per_token=self.per_token, batch=True)

    def merge(self, b: _Tally) -> None:
        """Add a batch's tally (``fresh``). Merging the batches in batch order gives the same
        float64 sums, bit for bit, as adding them to this tally directly (a batch's sums start
        from zero, so each term is ``0 - x``, exactly ``-x``), whichever rank scored them."""
        self.n += b.n
        self.nll_base += b.nll_base
        for name in ("nll", "n_bucket", "nll_bucket_base", "nll_bucket", "lam_bucket"):
            getattr(self, name).add_(getattr(b, name))
        self.t_lm += b.t_lm
        self.t_knn += b.t_knn
        self.n_searched += b.n_searched
        self.n_pointed += b.n_pointed
        self.lambdas.extend(b.lambdas)
        self.tok_base.extend(b.tok_base)
        for mine, theirs in zip(self.tok_grid, b.tok_grid):
            mine.extend(theirs)
        for doc, nll, primary in b.doc_parts:
            self._add_docs(doc, nll, primary)

    def add_buckets(self, bucket: torch.Tensor, lp_lm: torch.Tensor) -> None:
        nb = len(BUCKET_EDGES)
        self.n_bucket += torch.bincount(bucket, minlength=nb).double()
        self.nll_bucket_base -= torch.bincount(bucket, weights=lp_lm.double().cpu(), minlength=nb)

    def add_setting(self, gi: int, bucket: torch.Tensor, lp: torch.Tensor, doc: torch.Tensor | None = None) -> None:
        x = lp.double().cpu()
        self.nll[gi] -= x.sum()
        if self.per_token:
            self.tok_grid[gi].append(x)
        self.nll_bucket[gi] -= torch.bincount(bucket, weights=x, minlength=len(BUCKET_EDGES))
        if gi == 0 and doc is not None:
            self._add_docs(doc, -x, True)


# ---------------------------------------------------------------------------- the loop


@dataclass
class _LMBatch:
    """What one forward pass gives the kNN side: per scored target (R rows, in row order)."""
    query: torch.Tensor  # (R, D) key hidden states
    tgt: torch.Tensor  # (R,)
    lp_lm: torch.Tensor  # (R,) log p_lm(target)
    lm_feats: torch.Tensor | None  # (R, NL + 1) knnlm.gate.lm_features, when asked for
    exclude: torch.Tensor | None  # (R,) own datastore row (self-exclusion) or None
    exclude_range: torch.Tensor | None  # (R, 2) datastore rows [lo, hi) never returned (self-tuning) or None
    lengths: list[int]  # scored targets per window of the batch (their rows are consecutive)
    seconds: float  # time the forward (and LM head) took
    doc: torch.Tensor  # (R,) the eval document of each target (per-document sums)


class LMCache:
    """The LM side of an eval text kept in RAM (per batch: query hidden states, log p_lm of the
    targets, LM features), so that several kNN settings (fixed / adaptive λ, a retrieval fraction,
    pointers) are scored from one forward pass per batch: pass the same ``LMCache`` to ``run``
    (``KNNLM.evaluate(..., lm_cache=c)``) with the same text and windows. Timings of later runs
    reuse the first run's measured LM seconds. Memory: about R x D x 4 bytes (121k tokens x 576
    dims = 280 MB)."""

    def __init__(self):
        self.key = None
        self.batches: list[_LMBatch] = []


def _score_knn(knn, tally: _Tally, grid, cfg: EvalConfig, lmb: _LMBatch, counts: torch.Tensor, kmax: int) -> None:
    """Neighbours at the largest k (``KNNLM.lookup``: searched, followed as pointers, or none),
    then every (k, T, lambda) of the grid from them (``KNNLM.mix_targets``)."""
    step = _neighbours(knn, lmb, kmax, [lam for lam, _, _ in grid])
    tally.n_searched += int(step.searched.sum())
    tally.n_empty += int((step.searched & ~step.has).sum())
    tally.n_pointed += int(step.pointed.sum())
    bucket = torch.bucketize(counts[lmb.tgt.cpu()], torch.tensor(BUCKET_EDGES[1:]), right=True)  # (R,)
    tally.add_buckets(bucket, lmb.lp_lm)
    lps, lam_ad = knn.mix_targets(lmb.lp_lm, step, lmb.tgt, grid, lmb.lm_feats)  # (G, R), (H,)
    if lam_ad is not None:
        tally.add_lambdas(lam_ad, bucket[step.has.cpu()])
    for gi in range(len(grid)):
        tally.add_setting(gi, bucket, lps[gi], lmb.doc if cfg.per_document else None)


def _neighbours(knn, lmb: _LMBatch, kmax: int, lambdas) -> Step:
    """The neighbours (``Step``) of every row of a batch. With pointers the windows are followed
    position by position (sequential within a window, vectorised across the windows)."""
    query, exclude, feats, dev = lmb.query, lmb.exclude, lmb.lm_feats, lmb.query.device
    lookup = knn.lookup(len(lmb.lengths) if knn.pointers else 0, k=kmax, lambdas=lambdas, device=dev)
    if not knn.pointers:
        return lookup.neighbours(query, feats, exclude=exclude)
    out = Step.empty(query.shape[0], kmax, dev)
    lengths = torch.tensor(lmb.lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    with one_thread():
        for s in range(int(lengths.max())):
            wins = (lengths > s).nonzero().squeeze(1).to(dev)  # (W,) windows that reach position s
            r = starts.to(dev)[wins] + s  # (W,) their rows
            st = lookup.neighbours(query[r], None if feats is None else feats[r],
                                   exclude=None if exclude is None else exclude[r], rows=wins)
            for o, x in zip(out, st):
                o.index_copy_(0, r, x)
            lookup.advance(st, lmb.tgt[r], rows=wins)
    return out


HEAD_CHUNK_BYTES = 64 << 20  # fp32 logits materialised at once when the LM head is applied in chunks


def _head_log_probs(model, cap, h: torch.Tensor, tgt: torch.Tensor, counts: torch.Tensor | None = None):
    """log p_lm(tgt) (R,) from LM-head inputs ``h`` (R, H): the head is applied to chunks of rows
    and only each row's target log-prob survives, so memory does not grow with B x T x V. With
    ``counts`` also the LM features (R, NL + 1) (``knnlm.gate.lm_features``), else None."""
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    rows = max(1, HEAD_CHUNK_BYTES // (4 * head.weight.shape[0]))
    out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    feats = None if counts is None else torch.empty(h.shape[0], NL + 1, dtype=torch.float32, device=h.device)
    for lo in range(0, h.shape[0], rows):
        logits = cap.apply_head(h[lo: lo + rows])  # (r, V)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        lse = None
        if feats is not None:
            feats[lo: lo + rows], lse = lm_features(logits, counts)
        out[lo: lo + rows] = lm_target_log_probs(logits, tgt[lo: lo + rows], lse)
    return out, feats


def _lm_pass(model, cap, ids: torch.Tensor, rows_b: torch.Tensor, rows_t: torch.Tensor,
             counts: torch.Tensor | None = None):
    """One forward: the key hidden states (B, T, D), log p_lm of the scored targets (R,) and, with
    ``counts``, the LM features (R, 4); through the chunked LM head when ``cap.stop_before_head``,
    else from the full logits."""
    tgt = ids[rows_b, rows_t + 1]
    if cap.stop_before_head:
        cap.run(ids)
        final = cap.pop_head_input()  # (B, T, H)
        return (cap.pop(), *_head_log_probs(model, cap, final[rows_b, rows_t], tgt, counts))
    logits, keys = cap.forward(ids)  # (B, T, V), (B, T, D)
    scored = logits[rows_b, rows_t]  # (R, V)
    if counts is None:
        return keys, lm_target_log_probs(scored, tgt), None
    feats, lse = lm_features(scored, counts)
    return keys, lm_target_log_probs(scored, tgt, lse), feats


def _head_path_matches(model, cap, doc_ids, probe: int = 64) -> bool:
    """Whether the chunked LM head reproduces the model's own logits (it does unless the model
    transforms its logits after the head in a way knnlm does not know): checked once, on a
    short probe; otherwise eval falls back to full logits (memory grows with B x T x V)."""
    ids = torch.as_tensor(np.asarray(doc_ids[:probe]), dtype=torch.long)[None].to(next(model.parameters()).device)
    rows_b = torch.zeros(ids.shape[1] - 1, dtype=torch.long, device=ids.device)
    rows_t = torch.arange(ids.shape[1] - 1, device=ids.device)
    cap.stop_before_head = True
    _, chunked, _ = _lm_pass(model, cap, ids, rows_b, rows_t)
    cap.stop_before_head = False
    _, full, _ = _lm_pass(model, cap, ids, rows_b, rows_t)
    if torch.allclose(chunked, full, rtol=1e-4, atol=1e-4):
        return True
    logger.warning("%s: the LM head applied alone does not reproduce the model's logits (max difference %.3g); "
                   "scoring from full logits instead", type(model).__name__, float((chunked - full).abs().max()))
    return False


def eval_window(cfg: EvalConfig, datastore: Datastore | None, tokenizer) -> tuple[int, int, int | None]:
    """``(context, stride, bos)`` of an eval: the datastore's window protocol unless ``cfg`` sets
    the window; without a datastore, ``DEFAULT_CONTEXT`` windows and the tokenizer's own ``<bos>``."""
    if datastore is not None:
        w = datastore.header.window
        return (*cfg.window(w.context, w.stride), w.bos)
    return (*cfg.window(DEFAULT_CONTEXT, DEFAULT_CONTEXT - 1), tokenizer_bos(tokenizer))


def _batch_rows(docs: list[dict], context: int, stride: int, batch_size: int) -> list[int]:
    """Scored targets per batch of ``iter_batches`` (what a torchrun rank's share is balanced by)."""
    return [sum(w.end - w.first for w in batch) for _, batch in iter_batches(docs, context, stride, batch_size)]


def _share(weights: list[int], world: World) -> tuple[int, int] | None:
    """This rank's contiguous share of the batches (``knnlm.distributed.shard_range``), None: all."""
    return shard_range(weights, world) if world.distributed else None


def _lm_batches(model, docs: list[dict], key_layer, context: int, stride: int, bos, cfg: EvalConfig,
                counts: torch.Tensor | None, overlap: _Overlap, exclude_self: bool, lm_cache: LMCache | None,
                share: tuple[int, int] | None = None):
    """The LM side of every batch (``_LMBatch``), from the model or from ``lm_cache``; with
    ``share`` ``(lo, hi)`` only batches ``lo .. hi - 1`` (a torchrun rank's share): each one is
    the same batch, the same windows, as in a one-process run."""
    key = (tuple((d["sha256"], d["length"]) for d in docs), context, stride, bos, cfg.batch_size, key_layer,
           exclude_self, counts is not None, share)
    if lm_cache is not None and lm_cache.key == key:
        yield from lm_cache.batches
        return
    if lm_cache is not None:
        lm_cache.key, lm_cache.batches = None, []
    device = next(model.parameters()).device
    out = []
    batches = iter_batches(docs, context, stride, cfg.batch_size)
    if share is not None:
        batches = itertools.islice(batches, *share)
    with torch.inference_mode(), capture_keys(model, key_layer, stop_before_head=True) as cap:
        cap.stop_before_head = _head_path_matches(model, cap, next(d["ids"] for d in docs if d["length"] > 1))
        for _, batch in batches:
            t0 = time.time()
            ids, rows_b, rows_t = batch_inputs(batch, lambda di: docs[di]["ids"], bos)
            ids, rows_b, rows_t = (torch.from_numpy(a).to(device) for a in (ids, rows_b, rows_t))
            tgt = ids[rows_b, rows_t + 1]  # (R,)
            hidden, lp_lm, feats = _lm_pass(model, cap, ids, rows_b, rows_t, counts)  # (B, T, D), (R,), (R, 4)
            exclude = torch.cat([overlap.own_rows(w.doc, w.first, w.end) for w in batch]).to(device) \
                if exclude_self else None
            ranges = None  # a datastore document scored against the others: its own rows are never neighbours
            if "rows" in docs[0]:
                ranges = torch.cat([torch.tensor(docs[w.doc]["rows"]).expand(w.end - w.first, 2) for w in batch])
            lmb = _LMBatch(hidden[rows_b, rows_t], tgt, lp_lm, feats, exclude, ranges, [w.end - w.first for w in batch],
                           time.time() - t0, torch.cat([torch.full((w.end - w.first,), w.doc) for w in batch]))
            if lm_cache is not None:
                out.append(lmb)
            yield lmb
    if lm_cache is not None:
        lm_cache.key, lm_cache.batches = key, out


def _prepare(model, tokenizer, knn, data, cfg: EvalConfig, texts):
    """Windows, documents, overlap with the datastore: what every pass over an eval text needs."""
    ds = knn.datastore if knn is not None else None
    context, stride, bos = eval_window(cfg, ds, tokenizer)
    check_context(context, bos, getattr(model.config, "max_position_embeddings", None))
    docs = _load_eval_documents(tokenizer, data, texts, cfg)
    overlap = _find_overlap(docs, ds) if ds is not None else _Overlap()
    return ds, context, stride, bos, docs, overlap


def run(model, tokenizer, knn, data: Sequence | None, cfg: EvalConfig, *,
        texts: Sequence[str] | None = None, lm_cache: LMCache | None = None, world: World = SINGLE) -> dict:
    """Score ``data`` or ``texts`` with the base LM and, when ``knn`` is given, every setting of
    ``cfg``'s grid with ``knn``'s model, datastore and retriever. Returns a JSON-ready dict.
    ``lm_cache``: reuse (or fill) the LM side of the same text (``LMCache``).

    ``world`` (``knnlm.distributed.init_world()`` under torchrun; every rank calls ``run`` with the
    same arguments): each rank scores a contiguous share of the batches, balanced by tokens, and
    the batches' sums are gathered and added in batch order, so every rank returns the result of a
    one-process run (the same float64 sums); ``timing.ranks`` has each rank's tokens and seconds."""
    t_start = time.time()
    gate = knn.require_gate() if knn is not None and (ADAPTIVE in cfg.lambdas or knn.settings.gated) else None
    ds, context, stride, bos, docs, overlap = _prepare(model, tokenizer, knn, data, cfg, texts)
    if gate is not None:
        gate.check_disjoint(docs)
    if ds is not None:
        grid = [(lam, t, resolve_k(k, len(ds), param="ks")) for lam, t, k in cfg.grid]
        counts = torch.from_numpy(ds.token_counts())
        kmax = max(k for _, _, k in grid)
        if gate is not None and ADAPTIVE in cfg.lambdas:
            kmax = max(kmax, gate.k)  # the gate's features are computed from its own k neighbours
    else:
        grid, counts, kmax = [], None, 0
    if overlap.documents:
        how = "their own keys are excluded from retrieval" if cfg.exclude_self else \
            "NOT excluded: kNN-LM perplexity is inflated by self-retrieval"
        logger.warning("%d of %d eval documents (%d tokens) are in the datastore; %s",
                       overlap.documents, len(docs), overlap.tokens, how)
    exclude_self = bool(overlap.documents) and cfg.exclude_self
    tally = _Tally(len(grid), documents=len(docs) if cfg.per_document else 0, per_token=cfg.per_token)
    keep_unseen = knn is not None and knn.keeps_unseen_for(cfg.lambdas)
    need_feats = counts is not None and (gate is not None or lm_cache is not None or keep_unseen)

    from tqdm.auto import tqdm

    weights = _batch_rows(docs, context, stride, cfg.batch_size)
    share = _share(weights, world)
    total = sum(weights[slice(*share)] if share else weights)
    key_layer = ds.header.key.layer if ds is not None else None
    batches: list[_Tally] = []  # under torchrun: this rank's batches, merged in batch order by every rank

    def score() -> None:
        try:
            _score_all()
        finally:  # under `shard_search`: answer the other ranks' searches until they are done too
            if knn is not None:
                knn.retriever.finish()

    def _score_all() -> None:
        with tqdm(total=total, unit="tok", unit_scale=True, desc="evaluating", disable=not cfg.progress) as bar:
            for lmb in _lm_batches(model, docs, key_layer, context, stride, bos, cfg,
                                   counts if need_feats else None, overlap, exclude_self, lm_cache, share):
                t = tally.fresh() if world.distributed else tally
                t.add_base(lmb.lp_lm, lmb.doc if cfg.per_document else None)
                t.t_lm += lmb.seconds
                if knn is not None:
                    t1 = time.time()
                    with torch.inference_mode():
                        _score_knn(knn, t, grid, cfg, lmb, counts, kmax)
                    t.t_knn += time.time() - t1
                if world.distributed:
                    batches.append(t)
                bar.update(int(lmb.tgt.shape[0]))

    together(world, score)  # an error on one rank is raised on every rank
    if world.distributed:
        _reduce(world, tally, batches, time.time() - t_start)
    res = _base_result(tally, docs, context, stride, bos, cfg, time.time() - t_start)
    if knn is not None:
        res["settings"].update(_jsonable(asdict(knn.settings)))
        res.update(_knn_result(tally, grid, knn, overlap, cfg, gate, kmax))
        res["keep_unseen"] = keep_unseen
    if cfg.per_token:  # float64 tensors (T,) in document order; -inf: a target of probability zero
        res["per_token"] = {"base": torch.cat(tally.tok_base),
                            "grid": [torch.cat(t) for t in tally.tok_grid] if knn is not None else []}
    if cfg.per_document:
        res["per_document"] = [
            {"name": d["name"], "tokens": count_targets(d["length"]), "nll_base": float(tally.doc_nll_base[i]),
             **({"nll_knn": float(tally.doc_nll[i])} if knn is not None else {})}
            for i, d in enumerate(docs)]
    return res


def collect_tuning(knn, data: Sequence | None, cfg: EvalConfig, *, texts: Sequence[str] | None = None,
                   world: World = SINGLE):
    """The per-token statistics ``knnlm.gate.fit_gate`` needs, from one pass over the tuning
    text at ``knn``'s k and temperature: LM features, kNN features, log p_lm(y), log p_knn(y)
    and whether the datastore holds each target (``knnlm.gate.TuneData``). Refuses tuning
    documents that are in the datastore (same text). Under torchrun (``world``) every rank scores
    a share of the batches and every rank returns the whole data, in one-process order."""
    from knnlm.gate import check_outside_datastore

    ds, context, stride, bos, docs, overlap = _prepare(knn.model, knn.tokenizer, knn, data, cfg, texts)
    check_outside_datastore(ds, docs)
    return _tuning_pass(knn, docs, cfg, context, stride, bos, overlap, world)


SELF_TUNE_TOKENS = 20_000  # default sample of a datastore's own documents for self-tuning (`knnlm tune` without text)
SELF_TUNE_MIN_DOCS = 10  # ... drawn from at least this many documents when the datastore has them


def tunable_documents(ds) -> int:
    """How many of ``ds``'s documents have a token to predict (what self-tuning can sample)."""
    return sum(count_targets(d["length"]) > 0 for d in ds.documents)


def collect_self_tuning(knn, cfg: EvalConfig, *, seed: int = 0, world: World = SINGLE):
    """``collect_tuning``'s statistics from the datastore's own documents: the leading tokens of a
    seeded random sample of documents, at most 1/``SELF_TUNE_MIN_DOCS`` of the sample from each
    (1/n with n < ``SELF_TUNE_MIN_DOCS`` documents),
    up to ``cfg.max_tokens`` targets (default ``SELF_TUNE_TOKENS``); each document's queries are
    searched without any of its own rows (a document-level exclusion: as if it were held out; the
    datastore frequencies of its LM features and never-seen flags leave its tokens out too), in
    the datastore's window protocol."""
    ds = knn.datastore
    want = cfg.max_tokens or SELF_TUNE_TOKENS
    n_docs = tunable_documents(ds)
    per_doc = max(1, -(-want // max(1, min(SELF_TUNE_MIN_DOCS, n_docs))))  # at most this much of one document
    docs, total = [], 0
    for i in np.random.default_rng(seed).permutation(len(ds.documents)).tolist():
        d = ds.documents[i]
        n = min(count_targets(d["length"]), want - total, per_doc)
        if n <= 0:
            continue
        ids = np.array(ds.document_tokens(i)[: n + 1], dtype=np.int64)  # a copy: the memory map is read-only
        docs.append({"name": d["name"], "length": len(ids), "ids": ids, "sha256": d.get("sha256"),
                     "rows": (int(d["first_row"]), int(d["first_row"]) + count_targets(d["length"]))})
        total += n
        if total >= want:
            break
    if len(docs) < 2:
        raise KnnlmError(f"self-tuning needs at least 2 documents with tokens to predict; datastore {ds.path} has "
                         f"{len(docs)}: tune on separate text (`data`)", param="data")
    w = ds.header.window
    data = _tuning_pass(knn, docs, cfg, w.context, w.stride, w.bos, _Overlap(), world)
    return replace(data, self_tuned={"documents": len(docs), "tokens": total, "seed": seed, "exclusion": "document"})


def _tuning_pass(knn, docs: list[dict], cfg: EvalConfig, context: int, stride: int, bos, overlap: _Overlap,
                 world: World = SINGLE):
    from tqdm.auto import tqdm

    from knnlm.gate import TuneData

    ds = knn.datastore
    counts = torch.from_numpy(ds.token_counts())
    parts = {n: [] for n in ("lm", "knn", "has", "lp_lm", "lp_knn", "doc", "seen")}
    doc_of_row = torch.cat([torch.full((count_targets(d["length"]),), i) for i, d in enumerate(docs)])
    if "rows" in docs[0]:  # the datastore's own documents: each one as if held out, its tokens not counted
        values = np.asarray(ds.values)
        groups = [([d], counts - torch.from_numpy(np.bincount(values[d["rows"][0]: d["rows"][1]],
                                                              minlength=counts.numel()))) for d in docs]
    else:
        groups = [(docs, counts)]
    # under torchrun: this rank's contiguous share of all the groups' batches, in order
    weights = [_batch_rows(group, context, stride, cfg.batch_size) for group, _ in groups]
    flat = [w for ws in weights for w in ws]
    lo, hi = _share(flat, world) or (0, len(flat))
    row, first = sum(flat[:lo]), 0  # the first target row of this rank's share; a group's first batch
    shares = []
    for ws in weights:
        shares.append((min(max(lo - first, 0), len(ws)), min(max(hi - first, 0), len(ws))))
        first += len(ws)
    total = sum(flat[lo:hi])

    def score() -> None:
        nonlocal row
        try:
            with tqdm(total=total, unit="tok", unit_scale=True, desc="tuning", disable=not cfg.progress) as bar:
                for (group, cnt), share in zip(groups, shares):  # cnt (V,): the datastore-frequency features see
                    if share[0] < share[1]:
                        row = _tune_group(knn, group, cnt, share, cfg, context, stride, bos, overlap, parts,
                                          doc_of_row, row, bar)
        finally:  # under `shard_search`: answer the other ranks' searches until they are done too
            knn.retriever.finish()

    together(world, score)  # an error on one rank is raised on every rank
    documents = [{"name": d["name"], "sha256": d["sha256"], "tokens": d["length"]} for d in docs]
    everyone = gather(world, parts)  # the ranks' rows, in rank order: one-process order
    return TuneData(**{n: torch.cat([x for p in everyone for x in p[n]]) for n in parts}, documents=documents)


def _tune_group(knn, group, cnt, share, cfg, context, stride, bos, overlap, parts, doc_of_row, row, bar) -> int:
    """The tuning statistics of one group of documents' batches ``share``, appended to ``parts``;
    returns the next row."""
    from knnlm.gate import knn_features

    for lmb in _lm_batches(knn.model, group, knn.key_layer, context, stride, bos, cfg, cnt, overlap, False,
                           None, share):
        with torch.inference_mode():
            dists, values, _ = knn.search(lmb.query, exclude_range=lmb.exclude_range)  # (R, k)
            kf, has = knn_features(dists, values, knn.temperature, lmb.lm_feats[:, NL])
            lpk = knn_target_log_probs(dists, values, lmb.tgt, knn.temperature)
        n = lmb.tgt.shape[0]
        for name, x in (("lm", lmb.lm_feats), ("knn", kf), ("has", has), ("lp_lm", lmb.lp_lm),
                        ("lp_knn", lpk), ("doc", doc_of_row[row: row + n]), ("seen", cnt[lmb.tgt.cpu()] > 0)):
            parts[name].append(x.cpu())
        row += n
        bar.update(n)
    return row


# ---------------------------------------------------------------------------- results


def _reduce(world: World, tally: _Tally, batches: list[_Tally], wall: float) -> None:
    """Every rank's batches into ``tally``, in batch order (the ranks' shares are contiguous and
    in rank order), and each rank's tokens and seconds into ``tally.ranks``."""
    mine = {"rank": world.rank, "tokens": sum(b.n for b in batches), "lm_seconds": sum(b.t_lm for b in batches),
            "knn_seconds": sum(b.t_knn for b in batches), "wall_seconds": wall}
    for theirs, stats in gather(world, (batches, mine)):
        for b in theirs:
            tally.merge(b)
        busy = stats["lm_seconds"] + stats["knn_seconds"]
        tally.ranks.append({**{k: round(v, 2) if isinstance(v, float) else v for k, v in stats.items()},
                            "tokens_per_second": round(stats["tokens"] / max(busy, 1e-9), 1)})


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _base_result(tally: _Tally, docs, context: int, stride: int, bos, cfg: EvalConfig, wall: float) -> dict:
    timing = {"wall_seconds": round(wall, 2), "lm_seconds": round(tally.t_lm, 2), "knn_seconds": round(tally.t_knn, 2),
              "tokens_per_second": round(tally.n / max(tally.t_lm + tally.t_knn, 1e-9), 1),
              "lm_tokens_per_second": round(tally.n / max(tally.t_lm, 1e-9), 1)}
    if tally.ranks:  # torchrun: the seconds are summed over the ranks; the job's pace is its slowest rank's
        busy = max(r["lm_seconds"] + r["knn_seconds"] for r in tally.ranks)
        timing.update(tokens_per_second=round(tally.n / max(busy, 1e-9), 1),
                      lm_tokens_per_second=round(tally.n / max(max(r["lm_seconds"] for r in tally.ranks), 1e-9), 1),
                      world_size=len(tally.ranks), ranks=tally.ranks)
    return {
        "tokens": tally.n,
        "documents": len(docs),
        "ppl_base": _ppl(tally.nll_base, tally.n),
        "window": {"context": context, "stride": stride, "bos": bos},
        "batch_size": cfg.batch_size,
        "timing": timing,
        "settings": _jsonable(asdict(cfg)),
    }


def _lambda_summary(tally: _Tally, gate) -> dict:
    lam = torch.cat(tally.lambdas) if tally.lambdas else torch.zeros(0, dtype=torch.float64)
    qs = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
    return {
        "gate": {"path": gate.path, "kind": gate.net["kind"], "features": gate.features, "k": gate.k,
                 "temperature": gate.temperature},
        "tokens": int(lam.numel()),
        "mean": float(lam.mean()) if lam.numel() else None,
        "quantiles": {str(q): float(torch.quantile(lam, q)) for q in qs} if lam.numel() else {},
        "histogram": {"edges": [i / 10 for i in range(11)],
                      "counts": torch.histc(lam.float(), bins=10, min=0.0, max=1.0).long().tolist()},
    }


def _knn_result(tally: _Tally, grid, knn, overlap: _Overlap, cfg: EvalConfig, gate,
                kmax: int) -> dict:
    n = tally.n
    results = [{"lambda": lam, "temperature": t, "k": k, "ppl": _ppl(float(tally.nll[gi]), n)}
               for gi, (lam, t, k) in enumerate(grid)]
    finite = [r for r in results if r["ppl"] is not None]
    best = min(finite, key=lambda r: r["ppl"]) if finite else None
    names = _bucket_names()

    def bucket_ppl(nll_row, i):
        return _ppl(float(nll_row[i]), int(tally.n_bucket[i]))

    ds = knn.datastore
    adaptive = any(lam == ADAPTIVE for lam, _, _ in grid)
    if tally.n_empty > EMPTY_SEARCH_WARN * max(tally.n_searched, 1):
        logger.warning("%d of %d searches found no neighbour (FAISS returned no valid id): those tokens are scored "
                       "by the LM alone; raise `nprobe` or check the index of %s", tally.n_empty, tally.n_searched,
                       ds.path)
    out = {
        "ppl_knn": results[0]["ppl"],
        "primary": results[0],
        "best": best,
        "grid": results,
        "retrieval": {"k": kmax, "nprobe": knn.nprobe, "rerank": knn.rerank,
                      "index": (ds.header.index or {}).get("factory"),
                      "retrieve_fraction": knn.retrieve_fraction,
                      "retrieve_fraction_used": knn.require_gate().fraction(knn.retrieve_fraction)
                      if knn.retrieve_fraction is not None else None,
                      "pointers": knn.pointers,
                      "min_pointers": knn.settings.pointer_floor(kmax) if knn.pointers else None,
                      "searched_fraction": tally.n_searched / max(n, 1),
                      "pointer_fraction": tally.n_pointed / max(n, 1),
                      "searches_saved": 1.0 - tally.n_searched / max(n, 1),
                      "no_neighbour_searches": tally.n_empty,
                      "no_neighbour_fraction": tally.n_empty / max(tally.n_searched, 1)},
        "overlap": {"documents": overlap.documents, "tokens": overlap.tokens, "excluded": bool(cfg.exclude_self)},
        "buckets": [
            {"frequency": names[i], "tokens": int(tally.n_bucket[i]),
             "ppl_base": bucket_ppl(tally.nll_bucket_base, i), "ppl_knn": bucket_ppl(tally.nll_bucket[0], i),
             "ppl_best": bucket_ppl(tally.nll_bucket[results.index(best)], i) if best else None,
             "ppl_grid": [bucket_ppl(tally.nll_bucket[g], i) for g in range(len(grid))],
             **({"mean_lambda": float(tally.lam_bucket[i] / tally.n_bucket[i])} if adaptive else {})}
            for i in range(len(BUCKET_EDGES)) if tally.n_bucket[i] > 0],
        "datastore": {"path": str(ds.path), "rows": len(ds), "header": ds.header.to_json()},
    }
    if adaptive:
        out["adaptive"] = _lambda_summary(tally, gate)
    return out


def _fmt(x: float | None) -> str:
    return "inf" if x is None else f"{x:.3f}"


def format_results(res: dict) -> str:
    """A human-readable table of an ``evaluate`` result."""
    t = res["timing"]
    lines = [f"tokens {res['tokens']:,} in {res['documents']} documents, windows {res['window']['context']}"
             f"/{res['window']['stride']}, {t['tokens_per_second']:,} tok/s ({t['wall_seconds']} s)"]
    if "ppl_knn" not in res:
        lines.append(f"perplexity  base LM {_fmt(res['ppl_base'])}")
        return "\n".join(lines)
    r = res["retrieval"]
    probes = f"nprobe {r['nprobe']}" if r["nprobe"] is not None else "exact search"
    lines.append(f"datastore {res['datastore']['path']} ({res['datastore']['rows']:,} keys, {r['index']}, "
                 f"k {r['k']}, {probes}{', exact re-rank' if r['rerank'] else ''})")
    ov = res["overlap"]
    if ov["documents"]:
        lines.append(f"overlap: {ov['documents']} eval documents ({ov['tokens']:,} tokens) are in the datastore; "
                     + ("their own keys were excluded" if ov["excluded"] else "NOT excluded: kNN ppl is inflated"))
    base, p = res["ppl_base"], res["primary"]
    change = f"{100 * (p['ppl'] / base - 1):+.1f}% vs base" if p["ppl"] and base else "n/a"
    lines.append(f"perplexity  base LM {_fmt(base)}   kNN-LM {_fmt(p['ppl'])}  ({change}; lambda {p['lambda']}, "
                 f"T {p['temperature']}, k {p['k']})")
    if r.get("no_neighbour_searches"):
        lines.append(f"warning: {r['no_neighbour_searches']:,} searches "
                     f"({100 * r['no_neighbour_fraction']:.1f}%) found no neighbour (scored by the LM alone)")
    if r.get("retrieve_fraction") is not None or r.get("pointers"):
        what = [f"searched {100 * r['searched_fraction']:.1f}% of tokens"]
        if r.get("pointers"):
            what.append(f"pointers {100 * r['pointer_fraction']:.1f}% (min {r['min_pointers']})")
        if r.get("retrieve_fraction") is not None:
            used = r.get("retrieve_fraction_used")
            raised = f" (raised to the gate's floor {used:g})" if used is not None and used > r["retrieve_fraction"] \
                else ""
            what.append(f"retrieve fraction {r['retrieve_fraction']:g}{raised}")
        lines.append("retrieval: " + ", ".join(what) + f"; searches saved {100 * r['searches_saved']:.1f}%")
    if "adaptive" in res:
        a = res["adaptive"]
        q = a["quantiles"]
        if q:
            lines.append(f"adaptive lambda ({a['gate']['kind']} gate, {len(a['gate']['features'])} features): mean "
                         f"{a['mean']:.3f}, 5/50/95% {q['0.05']:.3f}/{q['0.5']:.3f}/{q['0.95']:.3f}")
    if len(res["grid"]) > 1:
        lines.append("")
        lines.append(f"{'lambda':>8} {'T':>8} {'k':>6} {'ppl':>9}")
        for row in res["grid"]:
            mark = "  <- best" if row == res["best"] else ""
            lam = row["lambda"] if isinstance(row["lambda"], str) else f"{row['lambda']:g}"
            lines.append(f"{lam:>8} {row['temperature']:>8g} {row['k']:>6} {_fmt(row['ppl']):>9}{mark}")
    lines.append("")
    lam_col = "adaptive" in res
    lines.append(f"{'datastore freq':>15} {'tokens':>8} {'base ppl':>10} {'kNN ppl':>10}"
                 + (f" {'mean lambda':>12}" if lam_col else ""))
    for b in res["buckets"]:
        lines.append(f"{b['frequency']:>15} {b['tokens']:>8,} {_fmt(b['ppl_base']):>10} {_fmt(b['ppl_knn']):>10}"
                     + (f" {b['mean_lambda']:>12.3f}" if lam_col else ""))
    return "\n".join(lines)
