"""Memorization-heavy evaluations of a kNN-LM: plain functions, each returning a JSON-able dict.

Each takes an already loaded ``(model, tokenizer)`` and datastore(s), so the runner
(``experiments.memorization.suite``) decides what to build and cache. Corpora are lists of
``{"name", "text"}`` documents (``experiments.memorization.documents``), passed as ``texts`` to
``knnlm.evaluate``, so every model sees exactly the same text whatever its tokenizer, and results
can also be given in bits per UTF-8 byte, comparable across tokenizers.

    in_domain_ppl       datastore = train split prefix, eval = held-out split
    domain_adaptation   datastore + eval on a domain the model was not trained on, vs no datastore
    verbatim_recall     greedy continuation of prefixes of datastore passages, with / without retrieval
    rare_token_ppl      perplexity by datastore frequency of the target token (from in_domain_ppl)
    datastore_scaling   perplexity vs datastore size (leading-document subsets of one datastore)
    control_task        continuations that are computed (sums, sorted lists), never in any datastore
    ngram_overlap       how many n-grams of an eval text occur in a datastore (leakage report)
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

import knnlm.datastore
from experiments.memorization.documents import nbytes

__all__ = ["bits_per_byte", "summarize_eval", "in_domain_ppl", "domain_adaptation", "verbatim_recall",
           "rare_token_ppl", "datastore_scaling", "control_documents", "control_task", "ngram_overlap"]


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    """Bits per UTF-8 byte of a text whose scored tokens have total negative log-likelihood
    ``nll_nats`` (natural log): the one conversion every tokenizer-independent number uses."""
    return nll_nats / n_bytes / math.log(2)


def summarize_eval(res: dict, n_bytes: int | None = None) -> dict:
    """The headline numbers of a ``knnlm.evaluate`` result (plus bits per byte when the eval
    text's UTF-8 size is given: scored-token NLL / bytes / ln 2; the first token of each document
    is not scored, so this slightly under-counts)."""
    out = {"tokens": res["tokens"], "documents": res["documents"], "ppl_base": res["ppl_base"],
           "ppl_knn": res.get("ppl_knn"), "primary": res.get("primary"), "best": res.get("best"),
           "grid": res.get("grid"), "buckets": res.get("buckets"), "timing": res["timing"],
           "window": res["window"], "retrieval": res.get("retrieval"), "overlap": res.get("overlap")}
    base, knn = res["ppl_base"], res.get("ppl_knn")
    out["gain_pct"] = 100 * (1 - knn / base) if (base and knn) else None
    best = res.get("best") or {}
    out["gain_best_pct"] = 100 * (1 - best["ppl"] / base) if (base and best.get("ppl")) else None
    if n_bytes:
        out["eval_bytes"] = n_bytes

        def bpb(ppl):
            return bits_per_byte(math.log(ppl) * res["tokens"], n_bytes) if ppl else None
        out["bpb_base"], out["bpb_knn"] = bpb(base), bpb(knn)
        out["bpb_best"] = bpb(best.get("ppl"))
        out["tokens_per_byte"] = res["tokens"] / n_bytes
    if "per_document" in res:  # EvalConfig(per_document=True): for resampling by document
        out["per_document"] = res["per_document"]
    if "datastore" in res:
        out["datastore"] = {"path": res["datastore"]["path"], "rows": res["datastore"]["rows"],
                            "tokens": res["datastore"]["header"].get("tokens"),
                            "index": res["datastore"]["header"].get("index", {}).get("factory")}
    return out


def in_domain_ppl(model, tok, datastore, eval_docs: Sequence[dict], eval_cfg) -> dict:
    """Perplexity on held-out in-domain text with a datastore over the training split, against
    the base LM on the same tokens."""
    res = knnlm.evaluate(model, tok, datastore, None, eval_cfg, texts=[d["text"] for d in eval_docs])
    return {"task": "in_domain_ppl", **summarize_eval(res, nbytes(eval_docs))}


def domain_adaptation(model, tok, domain_datastore, eval_docs: Sequence[dict], eval_cfg, *,
                      domain: str = "", split: str = "") -> dict:
    """A datastore over a domain the model was not trained on, evaluated on held-out text of that
    domain: the kNN-LM against the same model without a datastore (``ppl_base``)."""
    out = in_domain_ppl(model, tok, domain_datastore, eval_docs, eval_cfg)
    out.update(task="domain_adaptation", domain=domain, split=split)
    return out


def rare_token_ppl(in_domain_result: dict) -> dict:
    """Perplexity by how often the target token occurs in the datastore corpus (``evaluate``'s
    buckets), base LM vs kNN-LM, with the relative gain per bucket."""
    rows = []
    for b in in_domain_result.get("buckets") or []:
        base, knn = b["ppl_base"], b["ppl_knn"]
        rows.append({**b, "gain_pct": 100 * (1 - knn / base) if (base and knn) else None})
    return {"task": "rare_token_ppl", "tokens": in_domain_result.get("tokens"),
            "primary": in_domain_result.get("primary"), "buckets": rows}


# ---------------------------------------------------------------------------- verbatim recall

def _sample_passages(docs_tokens: Sequence[np.ndarray], n: int, span: int, seed: int) -> list[np.ndarray]:
    """``n`` spans of ``span`` tokens at uniformly drawn positions (documents drawn uniformly among
    those long enough); deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    eligible = [t for t in docs_tokens if len(t) >= span + 1]
    if not eligible:
        return []
    out = []
    for _ in range(n):
        t = eligible[int(rng.integers(len(eligible)))]
        o = int(rng.integers(1, len(t) - span + 1))  # from 1: the first token has no key
        out.append(np.asarray(t[o: o + span], dtype=np.int64))
    return out


def _greedy(gen_fn, prompts: torch.Tensor, n_new: int, pad_id: int, batch: int) -> torch.Tensor:
    outs = []
    for i in range(0, len(prompts), batch):
        x = prompts[i: i + batch]
        y = gen_fn(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n_new, min_new_tokens=n_new,
                   do_sample=False, pad_token_id=pad_id)
        y = y[:, x.shape[1]:]
        if y.shape[1] < n_new:  # stopped early everywhere
            y = torch.cat([y, torch.full((len(y), n_new - y.shape[1]), -1, dtype=y.dtype, device=y.device)], 1)
        outs.append(y[:, :n_new].cpu())
    return torch.cat(outs)


def _match_stats(gen: torch.Tensor, target: torch.Tensor) -> dict:
    eq = gen == target  # (N, C)
    first_miss = torch.where(eq.all(1), torch.full((len(eq),), eq.shape[1]), (~eq).int().argmax(1))
    return {"exact_match": float(eq.all(1).float().mean()), "token_accuracy": float(eq.float().mean()),
            "mean_correct_prefix_tokens": float(first_miss.float().mean()),
            "per_passage_correct": eq.sum(1).tolist()}  # (N,) right tokens per passage: for resampling


def _decode(tok, ids: torch.Tensor) -> str:
    return tok.decode([t for t in ids.tolist() if t >= 0])  # -1: padding after an early stop


def _recall_one_set(model, tok, datastore, passages: list[np.ndarray], *, prefix_tokens: int,
                    continuation_tokens: int, lambdas: Sequence[float], temperature: float, k: int | None,
                    batch: int, examples: int, with_knn: bool) -> dict:
    """Exact match / token accuracy of greedy continuations of ``passages``, base LM then the
    kNN-LM at each lambda, with the first ``examples`` decoded. A passage starts inside its
    document: the prompt gets the ``<bos>`` in front when the datastore's windows do."""
    device = next(model.parameters()).device
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    arr = torch.from_numpy(np.stack(passages))
    prompts, target = arr[:, :prefix_tokens], arr[:, prefix_tokens:]
    bos = datastore.header.window.bos
    if bos is not None:
        prompts = torch.cat([torch.full((len(prompts), 1), bos, dtype=prompts.dtype), prompts], dim=1)
    prompts = prompts.to(device)
    res = {"passages": len(passages)}
    with torch.inference_mode():
        gen = _greedy(model.generate, prompts, continuation_tokens, pad_id, batch)
    res["base"] = _match_stats(gen, target)
    res["examples"] = [{"prompt": tok.decode(prompts[i].tolist(), skip_special_tokens=True),
                        "target": tok.decode(target[i].tolist()),
                        "base": _decode(tok, gen[i])}
                       for i in range(min(examples, len(passages)))]
    res["knn"] = []
    for lam in lambdas if with_knn else ():
        knn = knnlm.KNNLM(model, datastore, tokenizer=tok, lam=lam, temperature=temperature, k=k)
        with torch.inference_mode():
            g = _greedy(knn.generate, prompts, continuation_tokens, pad_id, batch)
        res["knn"].append({"lambda": lam, "k": knn.k, **_match_stats(g, target)})
        for i, ex in enumerate(res["examples"]):
            ex[f"knn_lambda_{lam:g}"] = _decode(tok, g[i])
    return res


def verbatim_recall(model, tok, datastore, *, n_passages: int = 64, prefix_tokens: int = 32,
                    continuation_tokens: int = 32, lambdas: Sequence[float] = (0.25, 0.5, 0.75),
                    temperature: float = 1.0, k: int | None = None, seed: int = 0, batch: int = 16,
                    control_docs: Sequence[dict] | None = None, examples: int = 2) -> dict:
    """Prompt with ``prefix_tokens`` of a passage that is in the datastore and compare the greedy
    continuation with the next ``continuation_tokens`` of the passage: exact-match rate (all
    tokens right), token accuracy (position by position) and the mean length of the correct
    prefix, for the base LM and for the kNN-LM at each lambda. ``control_docs`` (held-out text,
    not in the datastore) gives the same numbers where retrieval cannot help by recall.

    Datastore keys were computed with the build's window (up to ``context`` tokens of left
    context) while the prompt has only ``prefix_tokens``, so the query keys are close to, not
    equal to, the stored ones.
    """
    span = prefix_tokens + continuation_tokens
    has_generate = hasattr(knnlm.KNNLM, "generate")
    sets = {"datastore": [datastore.document_tokens(i) for i in range(len(datastore.documents))]}
    if control_docs:
        enc = tok([d["text"] for d in control_docs], add_special_tokens=True, verbose=False)["input_ids"]
        sets["control"] = [np.asarray(e, dtype=np.int64) for e in enc]
    out = {"task": "verbatim_recall", "n_passages": n_passages, "prefix_tokens": prefix_tokens,
           "continuation_tokens": continuation_tokens, "temperature": temperature, "seed": seed,
           "knn_generate": has_generate}
    if not has_generate:
        out["skipped_knn"] = "knnlm.KNNLM has no generate method in this version"
    model.eval()
    for set_name, docs_tokens in sets.items():
        passages = _sample_passages(docs_tokens, n_passages, span, seed)
        if not passages:
            out[set_name] = {"skipped": f"no document has {span + 1} tokens"}
            continue
        out[set_name] = _recall_one_set(model, tok, datastore, passages, prefix_tokens=prefix_tokens,
                                        continuation_tokens=continuation_tokens, lambdas=lambdas,
                                        temperature=temperature, k=k, batch=batch, examples=examples,
                                        with_knn=has_generate)
    return out


# -------------------------------------------------------------------------- datastore scaling

def subset_path(work_dir: str | os.PathLike, fraction: float) -> Path:
    """Where ``datastore_scaling`` caches the subset at ``fraction``."""
    return Path(work_dir) / f"subset-{int(round(fraction * 1000)):04d}permille"


def datastore_scaling(model, tok, datastore, eval_docs: Sequence[dict], eval_cfg, work_dir: str | os.PathLike, *,
                      fractions: Sequence[float] = (0.1, 0.3, 1.0), full_result: dict | None = None,
                      index: str = "auto") -> dict:
    """Perplexity on the same held-out text with datastores made of the leading whole documents
    of ``datastore`` (``knnlm.subset_datastore``) at ``fractions`` of its corpus tokens. A
    fraction of 1 is the datastore itself (``full_result``, an ``in_domain_ppl`` result, is reused
    when given). Subsets are cached under ``work_dir`` (``knnlm.datastore.open_or_create``; an interrupted
    one is made again)."""
    total = int(datastore.header.tokens)
    texts = [d["text"] for d in eval_docs]
    points = []
    for f in sorted(fractions):
        ds, s = datastore, full_result
        if f < 1.0:
            try:
                ds = knnlm.datastore.open_or_create(subset_path(work_dir, f), lambda f=f: knnlm.subset_datastore(
                    datastore, subset_path(work_dir, f), max(2, int(f * total)), index=index, progress=False),
                    discard_incomplete=True)
            except knnlm.KnnlmError as e:
                points.append({"fraction": f, "skipped": str(e)})
                continue
            s = None
        if s is None:
            s = summarize_eval(knnlm.evaluate(model, tok, ds, None, eval_cfg, texts=texts), nbytes(eval_docs))
        points.append({"fraction": f, "datastore_tokens": int(ds.header.tokens), "keys": len(ds),
                       "ppl_base": s["ppl_base"], "ppl_knn": s["ppl_knn"], "best": s["best"],
                       "gain_pct": s["gain_pct"], "bpb_base": s.get("bpb_base"), "bpb_knn": s.get("bpb_knn")})
    return {"task": "datastore_scaling", "full_tokens": total, "points": points}


# ------------------------------------------------------------------------------ control task

def control_documents(n: int, seed: int = 0) -> list[dict]:
    """``n`` one-line Python statements whose tail is computed, not remembered: half
    ``assert A + B == C`` (4-digit A, B), half ``assert sorted([...]) == [...]`` (6 numbers
    below 1000). ``{"name", "prompt", "answer", "text"}`` with ``text = prompt + answer``; the
    answer (``C`` or the sorted list, plus the newline) is what the task scores. Deterministic in
    ``seed``; such lines do not occur in the stdlib or the Python documentation (the overlap
    report checks it). The answer starts with its space, so that byte-level tokenizers do not
    merge it into the prompt's last token."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        if i % 2 == 0:
            a, b = (int(x) for x in rng.integers(1000, 10000, 2))
            prompt, answer = f"assert {a} + {b} ==", f" {a + b}"
        else:
            xs = [int(x) for x in rng.integers(0, 1000, 6)]
            prompt, answer = f"assert sorted({xs}) ==", f" {sorted(xs)}"
        docs.append({"name": f"control-{i:04d}", "prompt": prompt, "answer": answer, "text": prompt + answer})
    return docs


def control_task(model, tok, datastore, docs: Sequence[dict], eval_cfg) -> dict:
    """Negative log-likelihood of the computed answers of ``control_documents``, base LM vs
    kNN-LM (primary setting), where retrieval should not help: no datastore holds these lines.

    Scored with ``knnlm.evaluate`` (per document) on each full line and on its prompt alone;
    answer NLL = NLL(line) - NLL(prompt): the prompt's tokens are scored identically in both runs
    prompt. That holds where the prompt's tokens are a prefix of the line's; documents where the
    tokenizer merges across the boundary are left out (counted in ``skipped_not_prefix``).
    Returns the totals, the per-document numbers for resampling, and bits per answer byte."""
    from dataclasses import replace

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    n_all = len(docs)
    kept = [d for d in docs if ids(d["text"])[: len(ids(d["prompt"]))] == ids(d["prompt"])]
    if not kept:
        raise ValueError("no control document keeps its prompt's tokens as a prefix of the line's")
    docs = kept
    cfg = replace(eval_cfg, per_document=True, lambdas=eval_cfg.lambdas[:1], temperatures=eval_cfg.temperatures[:1],
                  ks=eval_cfg.ks[:1])
    full = knnlm.evaluate(model, tok, datastore, None, cfg, texts=[d["text"] for d in docs])
    head = knnlm.evaluate(model, tok, datastore, None, cfg, texts=[d["prompt"] for d in docs])
    rows = []
    for d, f, h in zip(docs, full["per_document"], head["per_document"], strict=True):
        rows.append({"name": d["name"], "tokens": f["tokens"] - h["tokens"], "bytes": len(d["answer"].encode()),
                     "nll_base": f["nll_base"] - h["nll_base"], "nll_knn": f["nll_knn"] - h["nll_knn"]})
    nb, nk = sum(r["nll_base"] for r in rows), sum(r["nll_knn"] for r in rows)
    tokens, n_bytes = sum(r["tokens"] for r in rows), sum(r["bytes"] for r in rows)
    return {"task": "control", "documents": len(rows), "answer_tokens": tokens, "answer_bytes": n_bytes,
            "skipped_not_prefix": n_all - len(rows),
            "setting": full["primary"], "ppl_base": math.exp(nb / tokens), "ppl_knn": math.exp(nk / tokens),
            "gain_pct": 100 * (1 - math.exp((nk - nb) / tokens)),
            "bpb_base": bits_per_byte(nb, n_bytes), "bpb_knn": bits_per_byte(nk, n_bytes),
            "per_document": rows}


# ---------------------------------------------------------------------------- n-gram overlap

_HASH = np.random.default_rng(13).integers(1, 2**62, 64, dtype=np.int64) | 1  # odd multipliers


def _ngram_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit hash of every n-gram of ``tokens`` (wrapping arithmetic): (len - n + 1,) int64."""
    t = np.asarray(tokens, dtype=np.int64)
    if len(t) < n:
        return np.zeros(0, dtype=np.int64)
    view = np.lib.stride_tricks.sliding_window_view(t, n)  # (L - n + 1, n)
    with np.errstate(over="ignore"):
        return (view * _HASH[:n]).sum(1)


def ngram_overlap(datastore, tok, docs: Sequence[dict], n: int = 13) -> dict:
    """The share of the ``n``-grams (of ``datastore``'s tokenizer's tokens, within documents)
    of the eval ``docs`` that also occur in the datastore's corpus: a leakage report (a gain on
    text the datastore contains verbatim is recall, not generalisation). Also the documents with
    at least one shared n-gram, those with more than half, and each document's share."""
    stored = np.unique(np.concatenate([_ngram_hashes(datastore.document_tokens(i), n)
                                       for i in range(len(datastore.documents))] or [np.zeros(0, np.int64)]))
    enc = tok([d["text"] for d in docs], add_special_tokens=False, verbose=False)["input_ids"]
    total = shared = any_doc = half_doc = 0
    per_doc = []
    for ids in enc:
        h = _ngram_hashes(np.asarray(ids), n)
        pos = np.searchsorted(stored, h).clip(max=max(0, len(stored) - 1))  # stored is sorted (np.unique)
        hit = int((stored[pos] == h).sum()) if len(stored) else 0
        total, shared = total + len(h), shared + hit
        any_doc += hit > 0
        half_doc += len(h) > 0 and hit > len(h) / 2
        per_doc.append(hit / len(h) if len(h) else 0.0)
    return {"n": n, "ngrams": total, "shared": shared, "fraction": shared / total if total else None,
            "documents": len(docs), "documents_with_shared": any_doc, "documents_mostly_shared": half_doc,
            "datastore_tokens": int(datastore.header.tokens), "per_document_fraction": per_doc}
