"""Memorization-heavy evaluations of a kNN-LM: plain functions, each returning a JSON-able dict.

Each takes an already loaded ``(model, tokenizer)`` and datastore(s), so the runner
(``scripts/memorization_suite.py``) decides what to build and cache. Corpora are handled as lists
of ``{"name", "text"}`` documents (written to ``.jsonl`` for ``knnlm.build_datastore``, passed as
``texts`` to ``knnlm.evaluate``), so every model sees exactly the same text whatever its
tokenizer, and results can also be given in bits per UTF-8 byte, comparable across tokenizers.

    in_domain_ppl       datastore = train split prefix, eval = held-out split
    domain_adaptation   datastore + eval on a domain the model was not trained on, vs no datastore
    verbatim_recall     greedy continuation of prefixes of datastore passages, with / without retrieval
    rare_token_ppl      perplexity by datastore frequency of the target token (from in_domain_ppl)
    datastore_scaling   perplexity vs datastore size (leading-document subsets of one datastore)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = ["read_documents", "take_bytes", "chunk_documents", "write_jsonl", "split_by_hash", "domain_corpus",
           "summarize_eval", "in_domain_ppl", "domain_adaptation", "verbatim_recall", "rare_token_ppl",
           "datastore_scaling", "PYTHON_DOC_SOURCES", "LICENSES_DIR"]

PYTHON_DOC_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")  # apt-get install python3.11-doc
LICENSES_DIR = Path("/usr/share/common-licenses")  # Debian base-files: on every Debian/Ubuntu machine


# ------------------------------------------------------------------------------------ corpora

def read_documents(paths: Sequence[str | os.PathLike], root: str | os.PathLike | None = None) -> list[dict]:
    """``[{"name", "text"}]`` for files (names relative to ``root`` when given); undecodable
    files are skipped."""
    docs = []
    for p in paths:
        try:
            text = Path(p).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        name = os.path.relpath(p, root) if root else str(p)
        docs.append({"name": name, "text": text})
    return docs


def take_bytes(docs: Sequence[dict], max_bytes: int | None) -> list[dict]:
    """The leading documents up to ``max_bytes`` UTF-8 bytes; the last one is cut at a line
    boundary to fill the budget (always at least one non-empty document)."""
    if max_bytes is None:
        return list(docs)
    out, total = [], 0
    for d in docs:
        n = len(d["text"].encode())
        if total + n <= max_bytes:
            out.append(d)
            total += n
            continue
        room = max_bytes - total
        lines, kept, used = d["text"].splitlines(keepends=True), [], 0
        for line in lines:
            b = len(line.encode())
            if used + b > room:
                break
            kept.append(line)
            used += b
        if kept:
            out.append({"name": d["name"] + "[:cut]", "text": "".join(kept)})
        break
    if not out and docs:
        out.append({"name": docs[0]["name"] + "[:cut]", "text": docs[0]["text"].encode()[:max_bytes].decode(errors="ignore")})
    return out


def chunk_documents(docs: Sequence[dict], max_chars: int) -> list[dict]:
    """Split documents into pieces of at most ``max_chars`` characters at line boundaries (a
    longer line becomes its own piece)."""
    out = []
    for d in docs:
        piece, n, i = [], 0, 0
        for line in d["text"].splitlines(keepends=True):
            if piece and n + len(line) > max_chars:
                out.append({"name": f"{d['name']}#{i}", "text": "".join(piece)})
                piece, n, i = [], 0, i + 1
            piece.append(line)
            n += len(line)
        if piece:
            out.append({"name": f"{d['name']}#{i}", "text": "".join(piece)})
    return out


def split_by_hash(docs: Sequence[dict], modulus: int = 5) -> tuple[list[dict], list[dict]]:
    """(train, test): a document is held out when the SHA-1 of its name is 0 modulo ``modulus``;
    both keep the input order."""
    def held(d):
        return int(hashlib.sha1(d["name"].encode()).hexdigest()[:12], 16) % modulus == 0
    return [d for d in docs if not held(d)], [d for d in docs if held(d)]


def write_jsonl(docs: Sequence[dict], path: str | os.PathLike) -> Path:
    """Write documents as jsonl (one ``{"name", "text"}`` per line); returns the path. Rewrites only
    when the content changed, so datastore builds over it can ``--resume``."""
    path = Path(path)
    data = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
    if not path.exists() or path.read_text(encoding="utf-8") != data:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)
    return path


def domain_corpus(which: str = "auto") -> tuple[str, list[dict], str]:
    """(name, documents, split method) of the out-of-domain corpus.

    ``auto``: the Python 3.11 documentation sources (reST, Debian ``python3.11-doc``) when
    installed, else the license texts of ``/usr/share/common-licenses`` (English legal prose,
    present on every Debian/Ubuntu machine). ``python-doc`` / ``licenses`` force one; any other
    value is a directory of text files. Directories with at least 20 files are split by file;
    smaller ones are first cut into ~2,000-character pieces (so both splits are non-empty).
    """
    if which == "auto":
        which = "python-doc" if PYTHON_DOC_SOURCES.is_dir() else "licenses"
    if which == "python-doc":
        if not PYTHON_DOC_SOURCES.is_dir():
            raise FileNotFoundError(f"{PYTHON_DOC_SOURCES} is missing: `apt-get install python3.11-doc`")
        root, name = PYTHON_DOC_SOURCES, "python3.11-doc reST"
    elif which == "licenses":
        root, name = LICENSES_DIR, "common-licenses"
    else:
        root, name = Path(which), Path(which).name
    files = sorted(str(f) for f in Path(root).rglob("*") if f.is_file() and not f.is_symlink())
    docs = [d for d in read_documents(files, root) if d["text"].strip()]
    if not docs:
        raise FileNotFoundError(f"no readable text files under {root}")
    method = "by file"
    if len(docs) < 20:
        docs, method = chunk_documents(docs, 2000), "by 2,000-character piece"
    return name, docs, method


def _nbytes(docs: Sequence[dict]) -> int:
    return sum(len(d["text"].encode()) for d in docs)


# -------------------------------------------------------------------------------------- evals

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
            return math.log(ppl) * res["tokens"] / n_bytes / math.log(2) if ppl else None
        out["bpb_base"], out["bpb_knn"] = bpb(base), bpb(knn)
        out["bpb_best"] = bpb(best.get("ppl"))
        out["tokens_per_byte"] = res["tokens"] / n_bytes
    if "datastore" in res:
        out["datastore"] = {"path": res["datastore"]["path"], "rows": res["datastore"]["rows"],
                            "tokens": res["datastore"]["header"].get("tokens"),
                            "index": res["datastore"]["header"].get("index", {}).get("factory")}
    return out


def in_domain_ppl(model, tok, datastore, eval_docs: Sequence[dict], eval_cfg) -> dict:
    """Perplexity on held-out in-domain text with a datastore over the training split, against
    the base LM on the same tokens."""
    from knnlm.evaluation import evaluate

    res = evaluate(model, tok, datastore, None, eval_cfg, texts=[d["text"] for d in eval_docs])
    return {"task": "in_domain_ppl", **summarize_eval(res, _nbytes(eval_docs))}


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
            "mean_correct_prefix_tokens": float(first_miss.float().mean())}


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
    from knnlm.wrapper import KNNLM

    span = prefix_tokens + continuation_tokens
    device = next(model.parameters()).device
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    has_generate = hasattr(KNNLM, "generate")
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
        arr = torch.from_numpy(np.stack(passages))
        prompts, target = arr[:, :prefix_tokens].to(device), arr[:, prefix_tokens:]
        res = {"passages": len(passages)}
        with torch.inference_mode():
            gen = _greedy(model.generate, prompts, continuation_tokens, pad_id, batch)
        res["base"] = _match_stats(gen, target)
        res["examples"] = [{"prompt": tok.decode(prompts[i].tolist()), "target": tok.decode(target[i].tolist()),
                            "base": tok.decode([t for t in gen[i].tolist() if t >= 0])}
                           for i in range(min(examples, len(passages)))]
        res["knn"] = []
        if has_generate:
            for lam in lambdas:
                knn = KNNLM(model, datastore, tokenizer=tok, lam=lam, temperature=temperature, k=k)
                with torch.inference_mode():
                    g = _greedy(knn.generate, prompts, continuation_tokens, pad_id, batch)
                res["knn"].append({"lambda": lam, "k": knn.k, **_match_stats(g, target)})
                for i, ex in enumerate(res["examples"]):
                    ex[f"knn_lambda_{lam:g}"] = tok.decode([t for t in g[i].tolist() if t >= 0])
        out[set_name] = res
    return out


def datastore_scaling(model, tok, datastore, eval_docs: Sequence[dict], eval_cfg, work_dir: str | os.PathLike, *,
                      fractions: Sequence[float] = (0.1, 0.3, 1.0), full_result: dict | None = None,
                      index: str = "auto") -> dict:
    """Perplexity on the same held-out text with datastores made of the leading whole documents
    of ``datastore`` (``knnlm.subset_datastore``) at ``fractions`` of its corpus tokens. A
    fraction of 1 is the datastore itself (``full_result``, an ``in_domain_ppl`` result, is reused
    when given). Subsets are cached under ``work_dir``."""
    from knnlm.build import subset_datastore
    from knnlm.datastore import open_datastore, read_header
    from knnlm.errors import KnnlmError
    from knnlm.evaluation import evaluate

    total = int(datastore.header["tokens"])
    n_bytes = _nbytes(eval_docs)
    points = []
    for f in sorted(fractions):
        if f >= 1.0:
            ds, s = datastore, full_result
        else:
            path = Path(work_dir) / f"subset-{int(round(f * 1000)):04d}permille"
            h = read_header(path) if path.exists() else None
            try:
                if h and h.get("status") == "complete":
                    ds = open_datastore(path)
                else:
                    if path.exists():
                        import shutil
                        shutil.rmtree(path)
                    ds = subset_datastore(datastore, path, max(2, int(f * total)), index=index, progress=False)
            except KnnlmError as e:
                points.append({"fraction": f, "skipped": str(e)})
                continue
            s = None
        if s is None:
            s = summarize_eval(evaluate(model, tok, ds, None, eval_cfg, texts=[d["text"] for d in eval_docs]), n_bytes)
        points.append({"fraction": f, "datastore_tokens": int(ds.header["tokens"]), "keys": len(ds),
                       "ppl_base": s["ppl_base"], "ppl_knn": s["ppl_knn"], "best": s["best"],
                       "gain_pct": s["gain_pct"], "bpb_base": s.get("bpb_base"), "bpb_knn": s.get("bpb_knn")})
    return {"task": "datastore_scaling", "full_tokens": total, "points": points}
