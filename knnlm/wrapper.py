"""``KNNLM``: a Hugging Face causal LM paired with a datastore.

    from knnlm import KNNLM, load_model, open_datastore
    model, tok = load_model("smollm2")
    knn = KNNLM(model, open_datastore("runs/stdlib"), tokenizer=tok, lam=0.25)
    res = knn.evaluate(texts=["def main():\\n    ..."])

The object checks once that the datastore was built by this model and tokenizer, owns the
``Retriever``, and turns (logits, query hidden states) into kNN-LM log-probabilities with
``knnlm.scoring`` — the one place the formula lives.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from knnlm.config import EvalConfig
from knnlm.datastore import Datastore, model_identity
from knnlm.retrieval import Retriever
from knnlm.scoring import check_mixture_args, interpolate

logger = logging.getLogger(__name__)

__all__ = ["KNNLM"]


class KNNLM:
    """A model + datastore with fixed kNN-LM settings (lambda, temperature, k, nprobe)."""

    def __init__(self, model, datastore: Datastore, tokenizer=None, *, lam: float = 0.25,
                 temperature: float = 1.0, k: int | None = None, nprobe: int | None = None,
                 rerank: bool = False, use_kernel: bool = True):
        check_mixture_args(lam, temperature)
        self.model, self.datastore, self.tokenizer = model, datastore, tokenizer
        self.lam, self.temperature, self.use_kernel = float(lam), float(temperature), use_kernel
        self.key_layer = datastore.header["key"]["layer"]
        if tokenizer is not None:
            datastore.check_compatible(model_identity(model, tokenizer, self.key_layer))
        self.retriever = Retriever(datastore, k, nprobe=nprobe, rerank=rerank)

    @property
    def k(self) -> int:
        return self.retriever.k

    def log_probs(self, logits: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """kNN-LM log-distribution: logits (B, V), query hidden states (B, D) -> (B, V) fp32."""
        dists, values, _ = self.retriever.search(queries)  # (B, k), (B, k)
        return interpolate(logits, dists, values, self.lam, self.temperature, use_kernel=self.use_kernel)

    def generate(self, inputs: torch.Tensor | None = None, **kwargs):
        """``model.generate`` with the kNN-LM mixture at every step: same keyword arguments (greedy,
        sampling, beam search, ``max_new_tokens``, ``attention_mask``, ...), same return types.
        See ``knnlm.generate``."""
        from knnlm.generate import generate

        return generate(self, inputs, **kwargs)

    def neighbours(self, rows, dists=None, *, context: int = 12) -> list[dict]:
        """Where datastore rows come from: one dict per row id >= 0 (missing neighbours, -1, are
        skipped) with ``row``, ``document`` (name), ``position`` (token offset in the document of
        the row's value), ``token`` (value id), ``distance`` when ``dists`` is given, and with a
        tokenizer the decoded ``text`` of the value and up to ``context`` tokens ``before`` /
        ``after`` it."""
        import numpy as np

        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        d = None if dists is None else np.asarray(dists, dtype=np.float64).reshape(-1)
        ds = self.datastore
        starts = np.array([doc["first_row"] for doc in ds.documents], dtype=np.int64)
        out = []
        for i, r in enumerate(rows.tolist()):
            if r < 0:
                continue
            di = int(np.searchsorted(starts, r, side="right")) - 1
            doc = ds.documents[di]
            pos = r - doc["first_row"] + 1
            toks = ds.document_tokens(di)
            item = {"row": r, "document": doc["name"], "position": pos, "token": int(toks[pos])}
            if d is not None:
                item["distance"] = float(d[i])
            if self.tokenizer is not None:
                dec = self.tokenizer.decode
                item["text"] = dec([int(toks[pos])])
                item["before"] = dec(toks[max(0, pos - context): pos].tolist())
                item["after"] = dec(toks[pos + 1: pos + 1 + context].tolist())
            out.append(item)
        return out

    def evaluate(self, data: Sequence | None = None, *, texts: Sequence[str] | None = None, **settings) -> dict:
        """Perplexity with and without retrieval (see ``knnlm.evaluate``) at this object's settings;
        keyword ``settings`` override ``EvalConfig`` fields (e.g. ``lambdas=[0.1, 0.25]``)."""
        from knnlm.evaluation import evaluate

        if self.tokenizer is None:
            raise ValueError("KNNLM.evaluate needs the tokenizer: KNNLM(model, datastore, tokenizer=tok)")
        base = dict(lambdas=[self.lam], temperatures=[self.temperature], ks=[self.k],
                    nprobe=self.retriever.nprobe, rerank=self.retriever.rerank)
        base.update(settings)
        return evaluate(self.model, self.tokenizer, self.datastore, data, EvalConfig(**base), texts=texts)
