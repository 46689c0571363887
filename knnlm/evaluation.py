"""Perplexity of the base LM and of the kNN-LM on the same tokens, sweeps, frequency buckets.

The eval text goes through the same sliding-window protocol as the builder (the datastore's
``context`` / ``stride`` unless overridden). Each batch is one forward pass; the hidden states of
the scored positions query the index once, at the largest k of the sweep, and every
(lambda, temperature, k) setting is scored from those cached neighbours: log p_lm(target) is
computed once per token (it is the base-LM result too), the kNN term once per (T, k) from the K
neighbours, and the mix once per lambda — no V-sized pass per setting. (The fused ``csrc`` op
computes full distributions for decoding; here it would only redo the V-sized pass already done.)

If an eval document is also in the datastore (same text hash), each of its queries has its own
key excluded from the neighbours (``exclude_self``, on by default): otherwise retrieval would
find the answer at distance zero and the perplexity would be meaningless. The result says how
many documents and tokens overlapped.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from typing import Sequence

import torch

from knnlm.capture import capture_keys
from knnlm.config import EvalConfig
from knnlm.data import (CorpusError, Document, Source, iter_batches, iter_documents, pad_windows, resolve_sources,
                        sha256_text, tokenize_documents)
from knnlm.datastore import Datastore, model_identity
from knnlm.errors import KnnlmError
from knnlm.retrieval import Retriever, resolve_k
from knnlm.scoring import knn_target_log_probs, lm_target_log_probs, mix

logger = logging.getLogger(__name__)

__all__ = ["evaluate", "BUCKET_EDGES", "format_results"]

# Datastore-corpus frequency buckets of the target token: [0], [1, 10), [10, 100), ...
BUCKET_EDGES = (0, 1, 10, 100, 1_000, 10_000)


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


def _load_eval_documents(tokenizer, data, texts, cfg: EvalConfig) -> list[dict]:
    if (data is None) == (texts is None):
        raise KnnlmError("pass either data (paths or Sources) or texts (strings) to evaluate")
    if texts is not None:
        documents = [Document(f"text[{i}]", -1, t) for i, t in enumerate(texts)]
    else:
        sources = list(data) if data and all(isinstance(d, Source) for d in data) else \
            resolve_sources(data, cfg.globs, cfg.exclude)
        documents = iter_documents(sources, cfg.text_field)
    docs = []
    for d, ids in tokenize_documents(tokenizer, documents, cfg.max_tokens):
        docs.append({"name": d.name, "length": len(ids), "ids": ids, "sha256": sha256_text(d.text)})
    if sum(max(d["length"] - 1, 0) for d in docs) == 0:
        raise CorpusError(f"the eval text has no tokens to predict ({len(docs)} documents); check --data")
    return docs


def evaluate(model, tokenizer, datastore: Datastore | None, data: Sequence | None = None,
             cfg: EvalConfig | None = None, *, texts: Sequence[str] | None = None) -> dict:
    """Perplexity of ``model`` with and without ``datastore`` on ``data`` (paths or ``Source``s)
    or on ``texts`` (strings).

    With ``datastore=None`` only the base LM is scored (the plain-LM baseline). Returns a
    JSON-ready dict; ``format_results`` renders it as a table.
    """
    cfg = cfg or EvalConfig()
    t_start = time.time()
    header = datastore.header if datastore is not None else None
    context = cfg.context or (header["window"]["context"] if header else 512)
    stride = cfg.stride or (header["window"]["stride"] if header else context - 1)
    if not 1 <= stride <= context - 1:
        raise KnnlmError(f"--stride must be between 1 and context - 1 = {context - 1}, got {stride}")
    retriever = None
    grid = cfg.grid
    if datastore is not None:
        ident = model_identity(model, tokenizer, header["key"]["layer"])
        datastore.check_compatible(ident)
        ks = [resolve_k(k, len(datastore)) for k in cfg.ks]
        grid = [(lam, t, resolve_k(k, len(datastore))) for lam, t, k in grid]
        retriever = Retriever(datastore, max(ks), nprobe=cfg.nprobe, rerank=cfg.rerank)
        counts = torch.from_numpy(datastore.token_counts())
        edges = torch.tensor(BUCKET_EDGES[1:])
    docs = _load_eval_documents(tokenizer, data, texts, cfg)

    # rows of the datastore that hold the eval documents' own keys (exact text matches)
    self_rows: dict[int, int] = {}
    overlap_docs = overlap_tokens = 0
    if datastore is not None:
        by_hash = {d["sha256"]: d for d in datastore.documents}
        for i, d in enumerate(docs):
            match = by_hash.get(d["sha256"])
            if match is not None and match["length"] == d["length"]:
                self_rows[i] = int(match["first_row"])
                overlap_docs += 1
                overlap_tokens += d["length"] - 1
        if overlap_docs:
            how = "their own keys are excluded from retrieval" if cfg.exclude_self else \
                "NOT excluded: kNN-LM perplexity is inflated by self-retrieval"
            logger.warning("%d of %d eval documents (%d tokens) are in the datastore; %s",
                           overlap_docs, len(docs), overlap_tokens, how)

    g = len(grid)
    nll = torch.zeros(g, dtype=torch.float64)
    nll_base = 0.0
    n_bucket = torch.zeros(len(BUCKET_EDGES), dtype=torch.float64)
    nll_bucket_base = torch.zeros(len(BUCKET_EDGES), dtype=torch.float64)
    nll_bucket = torch.zeros(g, len(BUCKET_EDGES), dtype=torch.float64)
    n_targets = 0
    t_lm = t_knn = 0.0
    device = next(model.parameters()).device

    from tqdm.auto import tqdm

    total = sum(max(d["length"] - 1, 0) for d in docs)
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="evaluating", disable=not cfg.progress)
    with torch.inference_mode(), capture_keys(model, header["key"]["layer"] if header else None) as cap:
        for _, batch in iter_batches(docs, context, stride, cfg.batch_size):
            t0 = time.time()
            ids = torch.from_numpy(pad_windows(batch, lambda di: docs[di]["ids"]))  # (B, T), right-padded
            logits = model(input_ids=ids.to(device), use_cache=False).logits  # (B, T, V)
            hidden = cap.pop()  # (B, T, D)
            sel_b, sel_t, tgt, excl = [], [], [], []
            for b, (di, start, end, first) in enumerate(batch):
                pos = torch.arange(first - 1 - start, end - 1 - start)
                sel_b.append(torch.full_like(pos, b))
                sel_t.append(pos)
                tgt.append(ids[b, pos + 1])
                row0 = self_rows.get(di, -1)
                excl.append(torch.arange(first - 1, end - 1) + row0 if row0 >= 0 else torch.full_like(pos, -1))
            sel_b, sel_t = torch.cat(sel_b).to(device), torch.cat(sel_t).to(device)
            tgt = torch.cat(tgt).to(device)  # (R,)
            # log p_lm of the next token at every position (no (R, V) copy), then the targets
            nxt = torch.cat([ids[:, 1:], ids[:, :1]], dim=1).to(device)  # (B, T); last column unused
            lp_lm = lm_target_log_probs(logits, nxt)[sel_b, sel_t]  # (R,)
            nll_base -= lp_lm.double().sum().item()
            t1 = time.time()
            t_lm += t1 - t0
            r = tgt.shape[0]
            n_targets += r
            if retriever is not None:
                exclude = torch.cat(excl) if (self_rows and cfg.exclude_self) else None
                dists, values, _ = retriever.search(hidden[sel_b, sel_t], exclude=exclude)  # (R, kmax)
                bucket = torch.bucketize(counts[tgt.cpu()], edges, right=True)  # (R,)
                n_bucket += torch.bincount(bucket, minlength=len(BUCKET_EDGES)).double()
                nll_bucket_base -= torch.bincount(bucket, weights=lp_lm.double().cpu(), minlength=len(BUCKET_EDGES))
                gi = 0
                for k in ks:
                    for t in cfg.temperatures:
                        lp_knn = knn_target_log_probs(dists[:, :k], values[:, :k], tgt, t)  # (R,)
                        for lam in cfg.lambdas:
                            x = mix(lp_lm, lp_knn, lam).double().cpu()  # (R,)
                            nll[gi] -= x.sum()
                            nll_bucket[gi] -= torch.bincount(bucket, weights=x, minlength=len(BUCKET_EDGES))
                            gi += 1
                t_knn += time.time() - t1
            bar.update(r)
    bar.close()
    wall = time.time() - t_start

    res = {
        "tokens": n_targets,
        "documents": len(docs),
        "ppl_base": _ppl(nll_base, n_targets),
        "window": {"context": context, "stride": stride},
        "batch_size": cfg.batch_size,
        "timing": {"wall_seconds": round(wall, 2), "lm_seconds": round(t_lm, 2), "knn_seconds": round(t_knn, 2),
                   "tokens_per_second": round(n_targets / max(t_lm + t_knn, 1e-9), 1),
                   "lm_tokens_per_second": round(n_targets / max(t_lm, 1e-9), 1)},
        "settings": _jsonable(asdict(cfg)),
    }
    if retriever is None:
        return res
    results = []
    for gi, (lam, t, k) in enumerate(grid):
        results.append({"lambda": lam, "temperature": t, "k": k, "ppl": _ppl(float(nll[gi]), n_targets)})
    finite = [r for r in results if r["ppl"] is not None]
    best = min(finite, key=lambda r: r["ppl"]) if finite else None
    names = _bucket_names()
    res.update({
        "ppl_knn": results[0]["ppl"],
        "primary": results[0],
        "best": best,
        "grid": results,
        "retrieval": {"k": max(ks), "nprobe": retriever.nprobe, "rerank": cfg.rerank,
                      "index": header.get("index", {}).get("factory")},
        "overlap": {"documents": overlap_docs, "tokens": overlap_tokens, "excluded": bool(cfg.exclude_self)},
        "buckets": [
            {"frequency": names[i], "tokens": int(n_bucket[i]),
             "ppl_base": _ppl(float(nll_bucket_base[i]), int(n_bucket[i])),
             "ppl_knn": _ppl(float(nll_bucket[0, i]), int(n_bucket[i])),
             "ppl_best": _ppl(float(nll_bucket[results.index(best), i]), int(n_bucket[i])) if best else None}
            for i in range(len(BUCKET_EDGES)) if n_bucket[i] > 0],
        "datastore": {"path": str(datastore.path), "rows": len(datastore), "header": header},
    })
    return res


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


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
    lines.append(f"datastore {res['datastore']['path']} ({res['datastore']['rows']:,} keys, {r['index']}, "
                 f"k {r['k']}, nprobe {r['nprobe']}{', exact re-rank' if r['rerank'] else ''})")
    ov = res["overlap"]
    if ov["documents"]:
        lines.append(f"overlap: {ov['documents']} eval documents ({ov['tokens']:,} tokens) are in the datastore; "
                     + ("their own keys were excluded" if ov["excluded"] else "NOT excluded: kNN ppl is inflated"))
    base, p = res["ppl_base"], res["primary"]
    change = f"{100 * (p['ppl'] / base - 1):+.1f}% vs base" if p["ppl"] and base else "n/a"
    lines.append(f"perplexity  base LM {_fmt(base)}   kNN-LM {_fmt(p['ppl'])}  ({change}; lambda {p['lambda']}, "
                 f"T {p['temperature']}, k {p['k']})")
    if len(res["grid"]) > 1:
        lines.append("")
        lines.append(f"{'lambda':>8} {'T':>8} {'k':>6} {'ppl':>9}")
        for row in res["grid"]:
            mark = "  <- best" if row == res["best"] else ""
            lines.append(f"{row['lambda']:>8g} {row['temperature']:>8g} {row['k']:>6} {_fmt(row['ppl']):>9}{mark}")
    lines.append("")
    lines.append(f"{'datastore freq':>15} {'tokens':>8} {'base ppl':>10} {'kNN ppl':>10}")
    for b in res["buckets"]:
        lines.append(f"{b['frequency']:>15} {b['tokens']:>8,} {_fmt(b['ppl_base']):>10} {_fmt(b['ppl_knn']):>10}")
    return "\n".join(lines)
