"""k-NN search over a datastore: FAISS search, optional exact re-ranking, self-exclusion.

``Retriever.search(queries)`` takes hidden states (Q, D) on any device and returns squared L2
distances (Q, k) fp32 and the neighbours' values (Q, k) int64 and row ids (Q, k) int64, on the
queries' device, ready for ``knnlm.scoring``. Missing neighbours (FAISS id -1, or excluded rows)
come back with distance ``+inf``, value 0 and id -1: zero weight in the kNN softmax.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from knnlm.config import check_k, check_nprobe
from knnlm.datastore import Datastore

logger = logging.getLogger(__name__)

__all__ = ["Retriever", "DEFAULT_K", "resolve_k"]

DEFAULT_K = 1024  # as in Khandelwal et al. (2020)
RERANK_ROWS = 1 << 18  # candidate rows gathered per re-ranking chunk (~300 MB of fp16 keys at D=576)


def resolve_k(k: int | None, n: int, *, param: str = "k") -> int:
    """``None`` -> DEFAULT_K capped at the datastore size; an explicit k must be in [1, n]."""
    if k is None:
        return min(DEFAULT_K, n)
    check_k(k, n, param=param)
    return int(k)


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
        set_nprobe(self.index, self.nprobe)  # the index is shared by every Retriever of this datastore
        self.rerank = rerank
        self._values = torch.from_numpy(np.asarray(datastore.values, dtype=np.int64))  # (N,)

    def search(self, queries: torch.Tensor, k: int | None = None,
               exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """queries (Q, D) -> dists (Q, k) fp32, values (Q, k) int64, ids (Q, k) int64.

        ``exclude`` (Q,) holds one datastore row per query that must not be returned (the query's
        own key when the eval text is in the datastore), or -1 for none.
        """
        k = self.k if k is None else k
        device = queries.device
        q = queries.detach().to("cpu", torch.float32).contiguous().numpy()  # (Q, D)
        extra = 1 if exclude is not None else 0
        d_np, i_np = self.index.search(q, min(k + extra, len(self.datastore)))
        dists = torch.from_numpy(d_np)  # (Q, k')
        ids = torch.from_numpy(i_np)  # (Q, k')
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

    def _exact_dists(self, q: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Squared L2 from the stored keys for the candidate ids, vectorised in chunks."""
        keys = self.datastore.keys
        qn, kn = ids.shape
        out = torch.empty(qn, kn, dtype=torch.float32)
        rows_per = max(1, RERANK_ROWS // kn)
        for lo in range(0, qn, rows_per):
            hi = min(qn, lo + rows_per)
            flat = ids[lo:hi].clamp(min=0).reshape(-1).numpy()
            cand = torch.from_numpy(np.asarray(keys[np.sort(flat)]))  # sorted reads of the memmap
            inv = torch.from_numpy(np.argsort(np.argsort(flat, kind="stable"), kind="stable"))
            cand = cand[inv].float().view(hi - lo, kn, -1)  # (q, k, D)
            out[lo:hi] = ((cand - q[lo:hi, None, :]) ** 2).sum(-1)
        return out
