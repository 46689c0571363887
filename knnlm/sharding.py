"""An index split into shards over disjoint rows (global row ids), searched as one.

``knnlm build-index`` / ``knnlm reindex`` with ``index_shards`` N write N IVF indexes that share
one trained coarse quantizer (and PQ), each holding a contiguous share of the rows with their
global row numbers as ids (``knnlm.datastore.build_index``). Searched with the same quantizer and
nprobe, each shard returns exactly the candidates (and distances) the unsharded index finds among
its rows, so merging the shards' top-k lists gives the unsharded top-k (FAISS ``IndexShards``
semantics, with global ids). ``merge_topk`` is that merge, the one place its rule lives: ascending
distance, ties by row id, missing results (id -1) last.

Two ways to search the shards:

* one process opens them all (``ShardedIndex``: each shard searched, the lists merged);
* under torchrun with ``shard_search``, rank r opens only shard r (``own_shard``) and every
  search is a round (``ShardRounds``): each rank's queries go to every rank, each rank searches
  all of them on its shard, the (distances, ids) lists come back, and each rank merges the lists
  of its own queries and scores them. A rank with no more queries keeps answering (``finish``)
  until every rank is done.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from knnlm.distributed import World, gather

__all__ = ["merge_topk", "ShardedIndex", "ShardRounds"]

Result = tuple[np.ndarray, np.ndarray]  # distances (Q, k) fp32, ids (Q, k) int64


def merge_topk(results: Sequence[Result], k: int) -> Result:
    """The ``k`` best of several (distances, ids) lists of the same queries: ascending distance,
    ties by id, missing results (id -1, distance +inf) last; padded with (+inf, -1) when fewer."""
    d = np.concatenate([np.asarray(r[0], dtype=np.float32) for r in results], axis=1)  # (Q, sum k_i)
    i = np.concatenate([np.asarray(r[1], dtype=np.int64) for r in results], axis=1)
    d = np.where(i < 0, np.float32(np.inf), d)
    order = np.lexsort((np.where(i < 0, np.iinfo(np.int64).max, i), d), axis=1)[:, :k]
    d, i = np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
    if d.shape[1] < k:
        pad = k - d.shape[1]
        d = np.concatenate([d, np.full((d.shape[0], pad), np.inf, dtype=np.float32)], axis=1)
        i = np.concatenate([i, np.full((i.shape[0], pad), -1, dtype=np.int64)], axis=1)
    return np.ascontiguousarray(d), np.ascontiguousarray(i)


class ShardedIndex:
    """Index shards (FAISS indexes over disjoint rows, ids = global rows) searched as one.
    ``parts``: the shards this process holds; ``world``: set when the other shards are held by
    the other torchrun ranks (``shard_search``): a search is then a round (``ShardRounds``)."""

    def __init__(self, parts: Sequence, ntotal: int, world: World | None = None):
        self.parts = list(parts)
        self.ntotal = int(ntotal)  # rows of every shard together
        self.d = self.parts[0].d
        self.world = world

    def search(self, x: np.ndarray, k: int, params=None) -> Result:
        """The merged k nearest over this process's shards (``merge_topk``)."""
        return merge_topk([p.search(x, k, params=params) for p in self.parts], k)


class ShardRounds:
    """The rounds of a search split over torchrun ranks (each rank holds one shard).
    ``local(queries, k, extra)``: this rank's search of any rank's queries on its own shard ->
    ``Result``; ``extra``: whatever that search needs besides the queries (e.g. excluded rows)."""

    def __init__(self, world: World, local: Callable[[np.ndarray, int, object], Result]):
        self.world, self.local = world, local
        self.rounds = 0
        self.bytes_sent = 0  # by this rank: its queries, and its results for every rank's queries

    def _round(self, ask) -> list | None:
        everyone = gather(self.world, ask)  # each rank's (queries, k, extra), or None when it is done
        if all(a is None for a in everyone):
            return None
        answers = [None if a is None else self.local(*a) for a in everyone]
        self.rounds += 1
        self.bytes_sent += (0 if ask is None else ask[0].nbytes) + \
            sum(a[0].nbytes + a[1].nbytes for a in answers if a is not None)
        return [theirs[self.world.rank] for theirs in gather(self.world, answers)]

    def search(self, queries: np.ndarray, k: int, extra=None) -> Result:
        """This rank's queries (Q, D) fp32 searched on every rank's shard, merged."""
        mine = self._round((queries, k, extra))
        return merge_topk(mine, k)

    def finish(self) -> None:
        """Answer the other ranks' rounds until every rank is done (every rank calls it once,
        after its last search, before any other collective step)."""
        while self._round(None) is not None:
            pass
