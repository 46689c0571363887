"""k-NN search over a datastore: FAISS search, optional exact re-ranking, self-exclusion.

``Retriever.search(queries)`` takes hidden states (Q, D) on any device and returns squared L2
distances (Q, k) fp32 and the neighbours' values (Q, k) int64 and row ids (Q, k) int64, on the
queries' device, ready for ``knnlm.scoring``. Missing neighbours (FAISS id -1, or excluded rows)
come back with distance ``+inf``, value 0 and id -1: zero weight in the kNN softmax.

Pointers (RetoMaton-style, Alon et al. 2022): ``successors(ids, values, target)`` turns the
neighbours of step t whose value was the actual next token into step t+1's candidates (row + 1,
when it is in the same document), and ``step(queries, pointers, ...)`` uses those candidates
instead of a search when at least ``min_pointers`` survive. A pointer's distance is recomputed
exactly from the memory-mapped keys (``keys.npy`` always exists: the format requires it), so
pointer rows are scored like searched ones (ascending distances, then the same formula); rows
with fewer pointers search (the surviving pointers are then dropped, as a plain search would).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

from knnlm.config import check_k, check_nprobe
from knnlm.datastore import Datastore
from knnlm.sharding import ShardRounds, merge_topk

logger = logging.getLogger(__name__)

__all__ = ["Retriever", "DEFAULT_K", "resolve_k", "Step", "Lookup", "one_thread"]

DEFAULT_K = 1024  # as in Khandelwal et al. (2020)
KEY_CHUNK = 512  # candidate keys per chunk when scoring pointers (~1.2 MB of fp32 at D=576)


def resolve_k(k: int | None, n: int, *, param: str = "k") -> int:
    """``None`` -> DEFAULT_K capped at the datastore size; an explicit k must be in [1, n]."""
    if k is None:
        return min(DEFAULT_K, n)
    check_k(k, n, param=param)
    return int(k)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run a block on one intra-op thread (torch and FAISS share the OpenMP pool), then restore
    the previous count. For step-by-step loops (pointers): every step is a few small tensor ops
    and a FAISS search of a handful of queries, too small to gain from threads, while idle
    OpenMP workers spinning between the steps cost several times the work itself as soon as
    another process wants the cores (measured 5x slower on a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def agreeing_run(tokens: torch.Tensor, ok: torch.Tensor, recent: torch.Tensor) -> torch.Tensor:
    """tokens (H, M) int64, the M tokens before each of H places, nearest first; ok (H, M) bool,
    which exist; recent (M,) the tokens before a sequence's end, nearest first -> (H,) int64: how
    many of them each place agrees with, counting from the nearest until the first disagreement."""
    same = ok & (tokens == recent.to(tokens.device)[None, :])
    return torch.cumprod(same.long(), 1).sum(1)


class Step(NamedTuple):
    """The neighbours of a set of rows: (Q, k) as ``search`` returns them, and per row whether it
    searched / used pointers (Q,) bool. A row with no neighbour (every id -1: skipped by the
    retrieval gate, nothing found, or every candidate excluded) scores the LM exactly."""
    dists: torch.Tensor
    values: torch.Tensor
    ids: torch.Tensor
    searched: torch.Tensor
    pointed: torch.Tensor

    @property
    def has(self) -> torch.Tensor:
        """(Q,) bool: the rows with at least one neighbour (the others are the LM exactly)."""
        return (self.ids >= 0).any(dim=-1)

    @staticmethod
    def empty(q: int, k: int, device) -> Step:
        """``q`` rows without neighbours."""
        none = torch.zeros(q, dtype=torch.bool, device=device)
        return Step(torch.full((q, k), math.inf, dtype=torch.float32, device=device),
                    torch.zeros(q, k, dtype=torch.int64, device=device),
                    torch.full((q, k), -1, dtype=torch.int64, device=device), none, none.clone())


class Lookup:
    """The one per-token retrieval decision, for ``rows`` sequences followed step by step (or any
    set of rows when pointers are off). ``neighbours`` decides, per row: follow pointers (at least
    ``min_pointers`` survive), else search if the retrieval gate allows it, else no neighbours;
    ``advance`` turns a step's neighbours and the actual next tokens into the next step's
    pointers. Evaluation, generation and ``KNNLM.log_probs`` all go through it.

    ``gate``: an object with ``select(lm_feats, fraction) -> (Q,) bool`` (``knnlm.gate.Gate``),
    needed when ``fraction`` < 1; ``skip``: no row searches (a fixed λ = 0 has no kNN side)."""

    def __init__(self, retriever: Retriever, k: int, *, rows: int = 0, pointers: bool = False,
                 min_pointers: int = 1, fraction: float | None = None, gate=None, skip: bool = False,
                 device=None):
        self.retriever, self.k, self.skip = retriever, k, skip
        self.fraction = fraction if fraction is not None and fraction < 1 else None
        self.gate, self.min_pointers = gate, min_pointers
        self.state = torch.full((rows, k), -1, dtype=torch.int64, device=device) if pointers else None  # (S, k)

    def neighbours(self, query: torch.Tensor, lm_feats: torch.Tensor | None = None, *,
                   exclude: torch.Tensor | None = None, rows: torch.Tensor | None = None, gated: bool = True) -> Step:
        """query (Q, D), the gate's LM features (Q, F) (needed with a retrieval fraction),
        ``exclude`` (Q,) one datastore row per query never returned (-1: none), ``rows`` (Q,) the
        sequences the queries belong to (default: 0..Q-1) -> ``Step``. ``gated=False``: the
        retrieval gate does not apply (a prompt tracked for its pointers has no LM features)."""
        q = query.shape[0]
        if self.skip:
            return Step.empty(q, self.k, query.device)
        allow = None if self.fraction is None or not gated else self.gate.select(lm_feats, self.fraction)  # (Q,)
        pointers = None
        if self.state is not None:
            pointers = self.state if rows is None else self.state[rows]
        if allow is None and pointers is None:  # every row searches: one plain batched search
            d, v, i = self.retriever.search(query, self.k, exclude=exclude)
            every = torch.ones(q, dtype=torch.bool, device=query.device)
            return Step(d, v, i, every, ~every)
        return self.retriever.step(query, self.k, pointers=pointers, min_pointers=self.min_pointers, allow=allow,
                                   exclude=exclude)

    def apply_gate(self, step: Step, lm_feats: torch.Tensor | None) -> Step:
        """``step`` searched with ``gated=False``, the retrieval gate's decision taken afterwards,
        once the LM features are known (positions verified together, e.g. a speculative draft):
        rows the gate would not have searched lose their neighbours, as ``neighbours`` would have
        given them. The same step when there is no retrieval fraction."""
        if self.fraction is None or self.skip:
            return step
        allow = self.gate.select(lm_feats, self.fraction).to(step.ids.device)  # (Q,)
        if bool(allow.all()):
            return step
        keep = allow[:, None]
        return Step(torch.where(keep, step.dists, torch.full_like(step.dists, math.inf)),
                    torch.where(keep, step.values, torch.zeros_like(step.values)),
                    torch.where(keep, step.ids, torch.full_like(step.ids, -1)), step.searched & allow,
                    step.pointed & allow)

    def advance(self, step: Step, next_tokens: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """The pointers of the next step: the neighbours of ``step`` whose value was ``next_tokens``
        (Q,), for the sequences ``rows`` (default: all, in order). No-op without pointers."""
        if self.state is None:
            return
        nxt = self.retriever.successors(step.ids, step.values, next_tokens)
        if rows is None:
            self.state = nxt.to(self.state.device)
        else:
            self.state[rows] = nxt.to(self.state.device)

    def reset(self, rows: torch.Tensor) -> None:
        """Forget the pointers of ``rows`` (Q,) bool or ids (e.g. padding positions)."""
        if self.state is not None:
            self.state[rows] = -1


class Retriever:
    """Batched search on a datastore's index (CPU, or GPU when FAISS has one)."""

    def __init__(self, datastore: Datastore, k: int | None = None, *, nprobe: int | None = None,
                 rerank: bool = False):
        from knnlm.index import set_nprobe

        self.datastore = datastore
        if rerank:
            datastore.require_keys("rerank", "drop `rerank` (the index's own distances are used)")
        self.k = resolve_k(k, len(datastore))
        check_nprobe(nprobe)
        self.index = datastore.index
        self.nprobe = nprobe if nprobe is not None else datastore.header.nprobe
        self._parts = getattr(self.index, "parts", None) or [self.index]  # index shards held here (ShardedIndex)
        for part in self._parts:
            set_nprobe(part, self.nprobe)  # the index is shared by every Retriever of this datastore
        world = getattr(self.index, "world", None)  # shards on the other torchrun ranks: searches are rounds
        self.rounds = None if world is None else ShardRounds(world, self._local_search)
        self.rerank = rerank
        self._values = torch.from_numpy(np.asarray(datastore.values, dtype=np.int64))  # (N,)
        self._has_next: torch.Tensor | None = None  # (N,) bool, built on first use of pointers

    @property
    def has_next(self) -> torch.Tensor:
        """(N,) bool: row r + 1 belongs to the same document as row r (the last row of every
        document has no successor)."""
        if self._has_next is None:
            from knnlm.data import count_targets

            ok = torch.ones(len(self.datastore), dtype=torch.bool)
            ends = [d["first_row"] + count_targets(d["length"]) - 1 for d in self.datastore.documents
                    if count_targets(d["length"]) > 0]
            ok[torch.tensor(ends, dtype=torch.long)] = False
            self._has_next = ok
        return self._has_next

    def successors(self, ids: torch.Tensor, values: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Pointers for the next step: ids (Q, K), values (Q, K), the actual next token (Q,) ->
        rows (Q, K) int64: ``id + 1`` where the neighbour's value was ``target`` and its document
        goes on, else -1."""
        ids_c, dev = ids.cpu(), ids.device
        hit = (ids_c >= 0) & (values.cpu() == target.cpu().long()[:, None])
        hit &= self.has_next[ids_c.clamp(min=0)]
        return torch.where(hit, ids_c + 1, torch.full_like(ids_c, -1)).to(dev)

    def continuation(self, row: int, n: int) -> torch.Tensor:
        """The next-token values of up to ``n`` rows after ``row`` in its document (m,) int64, m <= n:
        the text that followed the neighbour ``row`` in the corpus."""
        if n <= 0 or row < 0:
            return torch.zeros(0, dtype=torch.int64)
        nxt = self.has_next[row: row + n]  # row + i + 1 is in row's document while these hold
        m = int(torch.cumprod(nxt.long(), 0).sum()) if nxt.numel() else 0
        return self._values[row + 1: row + 1 + m].clone()

    def match_before(self, rows: torch.Tensor, recent: torch.Tensor) -> torch.Tensor:
        """rows (H,) whose value is a sequence's last token, recent (M,) the tokens before that one,
        nearest first -> (H,) int64: for each row, how many of the sequence's last tokens its
        document had there, counting the value (1 + those of ``recent`` that agree in a row, within
        the row's document)."""
        rows = rows.detach().cpu().long()
        idx = rows[:, None] - torch.arange(1, recent.numel() + 1)  # (H, M): the rows holding the earlier tokens
        ok = idx >= 0
        idx = idx.clamp(min=0)
        ok &= self.has_next[idx]  # row idx + 1 is in row idx's document: the chain stays in one document
        return 1 + agreeing_run(self._values[idx], ok, recent)

    def candidates(self, queries: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Score given candidate rows (Q, K) (-1: none) like search results: exact squared L2 from
        the stored keys, ascending (ties keep the order of ``rows``); returns dists (Q, W) fp32,
        values (Q, W), ids (Q, W) with W <= K the largest number of candidates of a row (only
        real candidates are read)."""
        device = queries.device
        ids = rows.detach().cpu().long()  # (Q, K)
        valid = ids >= 0
        counts = valid.sum(1)  # (Q,)
        width = max(int(counts.max()) if ids.numel() else 0, 1)
        dists = torch.full(ids.shape, math.inf, dtype=torch.float32)
        if bool(valid.any()):
            owner = torch.repeat_interleave(torch.arange(ids.shape[0]), counts)  # (M,) query of each candidate
            dists[valid] = self.key_distances(queries.detach().to("cpu", torch.float32), owner, ids[valid])
        # missing candidates (+inf) sort last; a stable sort keeps equal distances in ``rows`` order
        dists, order = torch.sort(dists, dim=1, stable=True)
        dists, ids = dists[:, :width].contiguous(), ids.gather(1, order[:, :width])
        values = self._values[ids.clamp(min=0)].masked_fill(ids < 0, 0)
        return dists.to(device), values.to(device), ids.to(device)

    def key_distances(self, q: torch.Tensor, owner: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Exact squared L2 (M,) fp32 between stored keys ``rows`` (M,) and their queries
        ``q[owner]`` (q (Q, D) fp32 on CPU, owner (M,)): the keys are read from the memory map in
        ascending row order, and the arithmetic runs in cache-sized chunks of rows (the same
        fp32 operations, per row, as ``((key - q) ** 2).sum(-1)``)."""
        keys = self.datastore.keys
        order = torch.argsort(rows)  # sorted reads of the memmap
        srt = rows[order].numpy()
        own = owner[order]
        out = torch.empty(rows.shape[0], dtype=torch.float32)
        for lo in range(0, rows.shape[0], KEY_CHUNK):
            hi = min(rows.shape[0], lo + KEY_CHUNK)
            k = torch.from_numpy(np.asarray(keys[srt[lo:hi]])).float()  # (m, D) a fresh copy
            k.sub_(q.index_select(0, own[lo:hi]))
            out[lo:hi] = k.mul_(k).sum(-1)
        res = torch.empty_like(out)
        res[order] = out
        return res

    def step(self, queries: torch.Tensor, k: int | None = None, *, pointers: torch.Tensor | None = None,
             min_pointers: int = 1, allow: torch.Tensor | None = None,
             exclude: torch.Tensor | None = None) -> Step:
        """Neighbours for a set of queries (Q, D), searching only where needed:

        * rows with at least ``min_pointers`` pointers (``pointers`` (Q, K') rows, -1 padded)
          take those as their neighbours, scored exactly (no search);
        * other rows search, if ``allow`` (Q,) bool permits (a retrieval gate), as one batched
          search over just those rows;
        * the remaining rows get no neighbours (distance +inf, id -1: the LM alone).

        ``exclude`` (Q,) as in ``search`` (also removed from pointers). Returns a ``Step``."""
        k = self.k if k is None else k
        q = queries.shape[0]
        dev = queries.device
        dists = torch.full((q, k), math.inf, dtype=torch.float32, device=dev)
        values = torch.zeros(q, k, dtype=torch.int64, device=dev)
        ids = torch.full((q, k), -1, dtype=torch.int64, device=dev)
        use_ptr = torch.zeros(q, dtype=torch.bool, device=dev)
        if pointers is not None:
            ptr = pointers[:, :k].to(dev)
            if exclude is not None:
                ptr = torch.where(ptr == exclude.to(dev)[:, None], torch.full_like(ptr, -1), ptr)
            use_ptr = (ptr >= 0).sum(-1) >= min_pointers
            if bool(use_ptr.any()):
                d, v, i = self.candidates(queries[use_ptr], ptr[use_ptr])
                dists[use_ptr, :d.shape[1]], values[use_ptr, :d.shape[1]], ids[use_ptr, :d.shape[1]] = d, v, i
        search = ~use_ptr if allow is None else (~use_ptr & allow.to(dev))
        if bool(search.any()):
            ex = exclude[search] if exclude is not None else None
            d, v, i = self.search(queries[search], k, exclude=ex)
            dists[search], values[search], ids[search] = d, v, i
        return Step(dists, values, ids, search, use_ptr)

    def search(self, queries: torch.Tensor, k: int | None = None, exclude: torch.Tensor | None = None,
               exclude_range: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """queries (Q, D) -> dists (Q, k) fp32, values (Q, k) int64, ids (Q, k) int64.

        ``exclude`` (Q,) holds one datastore row per query that must not be returned (the query's
        own key when the eval text is in the datastore), or -1 for none. ``exclude_range`` (Q, 2):
        rows ``[lo, hi)`` per query that must not be returned (a whole document: self-tuning on
        the datastore's own documents); the k nearest of the other rows are returned.
        """
        k = self.k if k is None else k
        device = queries.device
        q = queries.detach().to("cpu", torch.float32).contiguous().numpy()  # (Q, D)
        extra = 1 if exclude is not None else 0
        kk = min(k + extra, len(self.datastore))
        ranges = None if exclude_range is None else exclude_range.detach().cpu().numpy().astype(np.int64)
        if self.rounds is not None:
            d_np, i_np = self.rounds.search(q, kk, ranges)
        else:
            d_np, i_np = self._local_search(q, kk, ranges)
        dists = torch.from_numpy(d_np)  # (Q, k')
        ids = torch.from_numpy(i_np)  # (Q, k')
        ids = ids.masked_fill((ids < 0) | (ids >= len(self.datastore)), -1)  # an id no row has: no neighbour
        if exclude is not None:
            ids = torch.where(ids == exclude.to("cpu", torch.int64)[:, None], torch.full_like(ids, -1), ids)
        if self.rerank:
            dists = self._exact_dists(queries.detach().to("cpu", torch.float32), ids)
        missing = ids < 0
        dists = dists.masked_fill(missing, math.inf)
        if extra or self.rerank:  # drop the excluded neighbour / reorder by the exact distance
            dists, order = torch.sort(dists, dim=1, stable=True)
            ids = ids.gather(1, order)
            dists, ids = dists[:, :k], ids[:, :k]
            missing = ids < 0
        values = self._values[ids.clamp(min=0)].masked_fill(missing, 0)  # (Q, k)
        return dists.to(device), values.to(device), ids.to(device)

    def finish(self) -> None:
        """After this process's last search: under ``shard_search``, keep answering the other
        ranks' searches until every rank is done (``knnlm.sharding.ShardRounds.finish``)."""
        if self.rounds is not None:
            self.rounds.finish()

    def _local_search(self, q: np.ndarray, k: int, ranges: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest in the index shards held by this process (one index, or several merged by
        ``knnlm.sharding.merge_topk``); ``ranges`` (Q, 2): rows never returned, or None."""
        res = [part.search(q, k) if ranges is None else self._search_excluding(part, q, k, ranges)
               for part in self._parts]
        return res[0] if len(res) == 1 else merge_topk(res, k)

    @staticmethod
    def _search_excluding(index, q: np.ndarray, k: int, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One search per distinct excluded range ``r`` (Q, 2) (``knnlm.index.search_excluding``)."""
        from knnlm.index import search_excluding

        d_np = np.empty((q.shape[0], k), dtype=np.float32)
        i_np = np.empty((q.shape[0], k), dtype=np.int64)
        uniq, inv = np.unique(r, axis=0, return_inverse=True)
        for u, (lo, hi) in enumerate(uniq):
            rows = np.flatnonzero(inv.reshape(-1) == u)
            d_np[rows], i_np[rows] = search_excluding(index, np.ascontiguousarray(q[rows]), k, lo, hi)
        return d_np, i_np

    def _exact_dists(self, q: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Squared L2 (Q, K) from the stored keys for the candidate ids (Q, K) (-1: a placeholder
        row 0, masked by the caller): ``key_distances`` with every query owning its K rows."""
        qn, kn = ids.shape
        owner = torch.arange(qn).repeat_interleave(kn)  # (Q*K,)
        return self.key_distances(q, owner, ids.clamp(min=0).reshape(-1)).view(qn, kn)
