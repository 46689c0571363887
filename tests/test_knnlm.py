"""kNN-LM perplexity and ``KNNLM`` against an independent oracle.

The oracle shares nothing with the library but the model weights and the stored keys / values: it
runs the model itself on each window (plain HF forward, its own forward hook on the last layer's
pre-FFN norm), computes exact squared L2 distances to every stored key in float64, picks the top k
by brute force and applies the kNN-LM formula written out here, in float64. ``knnlm.scoring``,
``knnlm.retrieval`` and ``knnlm.data`` are never called by it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from knnlm import KNNLM, EvalConfig, evaluate
from knnlm.corpora import stdlib_root

# held-out text: stdlib modules that are not in the tiny datastore (conftest.CORPUS_FILES)
HELD_OUT = [("heapq.py", 600, 500), ("shlex.py", 0, 350)]


def _held_out_texts() -> list[str]:
    out = []
    for name, lo, n in HELD_OUT:
        text = (stdlib_root() / name).read_bytes().decode("utf-8")
        out.append(text[lo:lo + n])
    return out


# ---------------------------------------------------------------------------------------------
# the oracle


def _forward(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (T, V), keys (T, D)), both float64, for one unpadded sequence.

    The key is the output of the last decoder layer's post-attention norm of the tiny Llama, i.e.
    the input of its MLP -- taken with a forward hook of our own.
    """
    norm = model.model.layers[-1].post_attention_layernorm
    got = []
    handle = norm.register_forward_hook(lambda _m, _inp, out: got.append(out.detach()))
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    finally:
        handle.remove()
    assert len(got) == 1
    return logits.double(), got[0][0].double()


def _window_of_target(j: int, n: int, context: int, stride: int) -> tuple[int, int]:
    """(start, end) of the window that scores target j: the first window ends at min(context, n),
    each later one `stride` tokens further; a window starts `context` tokens before its end."""
    if j < context:
        end = min(context, n)
    else:
        end = min(context + ((j - context) // stride + 1) * stride, n)
    return max(0, end - context), end


def _sq_dists(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Exact squared L2 in float64: (Q, D) x (N, D) -> (Q, N)."""
    q, k = queries.double(), keys.double()
    return (q * q).sum(-1)[:, None] + (k * k).sum(-1)[None, :] - 2.0 * q @ k.T


def _brute_neighbours(queries, keys, k, exclude=None):
    """top-k (smallest) squared distances and row ids, float64; ``exclude`` (Q,) rows never count."""
    d = _sq_dists(queries, keys)
    if exclude is not None:
        rows = torch.as_tensor(exclude, dtype=torch.long)
        ok = rows >= 0
        d[torch.nonzero(ok).squeeze(1), rows[ok]] = math.inf
    dist, ids = torch.topk(d, k, dim=1, largest=False, sorted=True)
    return dist, ids


def _oracle_targets(model, tokenizer, ds, texts, *, context, stride, k, self_rows=None):
    """Everything the formula needs for every target of ``texts`` under the window protocol:
    (targets (R,), log p_lm(target) (R,), neighbour distances (R, k), neighbour values (R, k)),
    float64 / int64. ``self_rows[i]``: first datastore row of text i when it is in the datastore;
    each target's own row is then never a neighbour."""
    keys = torch.from_numpy(np.asarray(ds.keys, dtype=np.float64))  # (N, D)
    values = torch.from_numpy(np.asarray(ds.values, dtype=np.int64))  # (N,)
    tg, lps, ds_, vs = [], [], [], []
    for ti, text in enumerate(texts):
        ids = tokenizer(text)["input_ids"]
        n = len(ids)
        by_window: dict[tuple[int, int], list[int]] = {}
        for j in range(1, n):
            by_window.setdefault(_window_of_target(j, n, context, stride), []).append(j)
        for (start, end), targets in by_window.items():
            logits, hidden = _forward(model, ids[start:end])
            pos = torch.tensor([j - 1 - start for j in targets])
            tgt = torch.tensor([ids[j] for j in targets])
            lp = torch.log_softmax(logits[pos], dim=-1).gather(1, tgt[:, None])[:, 0]  # (R,)
            excl = None
            if self_rows is not None and self_rows[ti] is not None:
                excl = [self_rows[ti] + j - 1 for j in targets]
            dist, rows = _brute_neighbours(hidden[pos], keys, k, excl)
            tg.append(tgt), lps.append(lp), ds_.append(dist), vs.append(values[rows])
    return torch.cat(tg), torch.cat(lps), torch.cat(ds_), torch.cat(vs)


def _oracle_ppl(targets, lp_lm, dists, vals, lam, temp) -> tuple[float, float]:
    """(base ppl, kNN-LM ppl): p_knn(t) = sum of softmax(-d / T) over the neighbours whose value is
    t, p = lam * p_knn + (1 - lam) * p_lm, all in float64."""
    w = torch.softmax(-dists / temp, dim=1)  # (R, k)
    p_knn = (w * (vals == targets[:, None])).sum(1)  # (R,)
    log_p = torch.logaddexp(math.log(1 - lam) + lp_lm, math.log(lam) + torch.log(p_knn))
    return math.exp(-lp_lm.mean().item()), math.exp(-log_p.mean().item())


def _cfg(**kw):
    kw.setdefault("progress", False)
    return EvalConfig(**kw)


# ---------------------------------------------------------------------------------------------
# knnlm.evaluate against the oracle


@pytest.mark.parametrize("context,stride", [(32, 16), (32, 31)])
def test_eval_perplexity_matches_oracle(tiny_store, tiny_tokenizer, context, stride):
    model, ds = tiny_store
    texts = _held_out_texts()
    k = 32
    res = evaluate(model, tiny_tokenizer, ds, texts=texts,
                   cfg=_cfg(lambdas=[0.25, 0.6], temperatures=[1.0, 3.0], ks=[k], context=context, stride=stride,
                            batch_size=3))
    targets, lp_lm, dists, vals = _oracle_targets(model, tiny_tokenizer, ds, texts, context=context,
                                                  stride=stride, k=k)
    lengths = [len(tiny_tokenizer(t)["input_ids"]) for t in texts]
    assert min(lengths) > 4 * context  # several windows per text: the window protocol is exercised
    assert res["tokens"] == len(targets) == sum(n - 1 for n in lengths)
    assert res["overlap"]["documents"] == 0
    assert len(res["grid"]) == 4
    for row in res["grid"]:
        base, ppl = _oracle_ppl(targets, lp_lm, dists, vals, row["lambda"], row["temperature"])
        assert res["ppl_base"] == pytest.approx(base, rel=1e-4)
        assert row["ppl"] == pytest.approx(ppl, rel=1e-4), row
        assert abs(row["ppl"] / base - 1) > 1e-2  # retrieval changed the result


def _doc_text(name: str) -> str:
    return (stdlib_root() / name).read_bytes().decode("utf-8")


@pytest.mark.parametrize("rerank", [True, False])
def test_eval_excludes_own_row_matches_oracle(tiny_store, tiny_tokenizer, rerank):
    """Eval text that IS a datastore document, with the datastore's own windows: every query equals
    its own stored key (distance ~0). With exclude_self that row is never a neighbour: the result
    equals the oracle that drops it, and differs from the one that keeps it."""
    model, ds = tiny_store
    (doc,) = [d for d in ds.documents if d["name"].endswith("keyword.py")]
    text = _doc_text("keyword.py")
    k, lam, temp = 16, 0.5, 1.0
    cfg = dict(lambdas=[lam], temperatures=[temp], ks=[k])
    res = evaluate(model, tiny_tokenizer, ds, texts=[text], cfg=_cfg(**cfg), rerank=rerank)
    kept = evaluate(model, tiny_tokenizer, ds, texts=[text], cfg=_cfg(exclude_self=False, **cfg), rerank=rerank)
    assert res["overlap"] == {"documents": 1, "tokens": doc["length"] - 1, "excluded": True}
    assert res["tokens"] == doc["length"] - 1
    window = json.loads((Path(ds.path) / "header.json").read_text())["window"]
    context, stride = window["context"], window["stride"]
    excl = _oracle_targets(model, tiny_tokenizer, ds, [text], context=context, stride=stride, k=k,
                           self_rows=[doc["first_row"]])
    incl = _oracle_targets(model, tiny_tokenizer, ds, [text], context=context, stride=stride, k=k)
    assert (incl[2][:, 0] < 1e-3).float().mean() > 0.9  # the own key is the nearest neighbour
    base, ppl_excl = _oracle_ppl(*excl, lam, temp)
    _, ppl_incl = _oracle_ppl(*incl, lam, temp)
    assert ppl_incl < 0.7 * ppl_excl  # self-retrieval would be visible
    assert res["ppl_base"] == pytest.approx(base, rel=1e-5)
    assert res["ppl_knn"] == pytest.approx(ppl_excl, rel=1e-5)
    assert kept["ppl_knn"] == pytest.approx(ppl_incl, rel=1e-5)


def test_rerank_gives_exact_distances_on_a_lossy_index(tiny_model, tiny_tokenizer, tmp_path):
    """A 4-bit scalar-quantized IVF index distorts distances. With k = every row and all lists
    probed, the candidates are every row (own row excluded), so re-ranked results must equal the
    exact oracle, and results without re-ranking must not."""
    from knnlm import BuildConfig, build_datastore

    src = stdlib_root() / "keyword.py"
    ds = build_datastore(tiny_model, tiny_tokenizer, [str(src)], tmp_path / "ds",
                         BuildConfig(context=64, index="IVF4,SQ4", progress=False))
    n = len(ds)
    text = _doc_text("keyword.py")
    lam, temp = 0.5, 2.0
    cfg = _cfg(lambdas=[lam], temperatures=[temp], ks=[n])
    rr = evaluate(tiny_model, tiny_tokenizer, ds, texts=[text], cfg=cfg, nprobe=4, k=n, rerank=True)
    lossy = evaluate(tiny_model, tiny_tokenizer, ds, texts=[text], cfg=cfg, nprobe=4, k=n, rerank=False)
    oracle = _oracle_targets(tiny_model, tiny_tokenizer, ds, [text], context=64, stride=63, k=n, self_rows=[0])
    _, ppl = _oracle_ppl(*oracle, lam, temp)
    assert rr["overlap"]["documents"] == 1
    assert rr["ppl_knn"] == pytest.approx(ppl, rel=1e-5)
    assert abs(lossy["ppl_knn"] / ppl - 1) > 1e-3  # the index alone is not exact


# ---------------------------------------------------------------------------------------------
# KNNLM


def _dense_mixture(logits, dists, vals, lam, temp):
    """The full kNN-LM distribution (R, V) in float64 from brute-force neighbours: log of
    lam * p_knn + (1 - lam) * softmax(logits); -inf only where both terms are zero."""
    r, v = logits.shape
    w = torch.softmax(-dists.double() / temp, dim=1)  # (R, k)
    p_knn = torch.zeros(r, v, dtype=torch.float64)
    for i in range(r):
        for wi, vi in zip(w[i].tolist(), vals[i].tolist()):
            p_knn[i, vi] += wi
    p = lam * p_knn + (1 - lam) * torch.softmax(logits.double(), dim=-1)
    return torch.log(p)


@pytest.fixture(scope="module")
def probe(tiny_store, tiny_tokenizer):
    """Logits (R, V) and query keys (R, D) of held-out text, from our own forward + hook."""
    model, ds = tiny_store
    ids = tiny_tokenizer(_held_out_texts()[1])["input_ids"][:40]
    logits, hidden = _forward(model, ids)
    return logits.float(), hidden.float()


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("lam,temp,k", [(0.3, 1.0, 16), (0.75, 4.0, 5), (1.0, 2.0, 8)])
def test_log_probs_equal_the_mixture_of_brute_force_neighbours(tiny_store, tiny_tokenizer, probe, use_kernel,
                                                                lam, temp, k):
    model, ds = tiny_store
    logits, hidden = probe
    knn = KNNLM(model, ds, tokenizer=tiny_tokenizer, lam=lam, temperature=temp, k=k, use_kernel=use_kernel)
    assert knn.k == k
    out = knn.log_probs(logits, hidden)
    assert out.shape == logits.shape and out.dtype == torch.float32
    keys = torch.from_numpy(np.asarray(ds.keys, dtype=np.float64))
    dists, rows = _brute_neighbours(hidden, keys, k)
    vals = torch.from_numpy(np.asarray(ds.values, dtype=np.int64))[rows]
    ref = _dense_mixture(logits, dists, vals, lam, temp)
    # -inf exactly where the reference has no mass (lam = 1: tokens no neighbour voted for)
    assert torch.equal(torch.isneginf(out), torch.isneginf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(out.double()[fin], ref[fin], rtol=1e-5, atol=1e-4)
    # every row is a distribution
    lse = torch.logsumexp(out.double(), dim=-1)
    torch.testing.assert_close(lse, torch.zeros_like(lse), rtol=0, atol=1e-5)
    if lam < 1:
        assert (out - torch.log_softmax(logits, -1)).abs().max() > 1e-2  # retrieval changed it


def test_log_probs_lambda_zero_is_log_softmax(tiny_store, tiny_tokenizer, probe):
    model, ds = tiny_store
    logits, hidden = probe
    for use_kernel in (True, False):
        knn = KNNLM(model, ds, tokenizer=tiny_tokenizer, lam=0.0, k=8, use_kernel=use_kernel)
        torch.testing.assert_close(knn.log_probs(logits, hidden), torch.log_softmax(logits, dim=-1),
                                   rtol=0, atol=1e-6)


def test_knnlm_refuses_another_model_and_bad_settings(tiny_store, tiny_tokenizer):
    from knnlm import DatastoreError

    from conftest import make_tiny_model

    model, ds = tiny_store
    with pytest.raises(DatastoreError, match="model weights"):
        KNNLM(make_tiny_model("llama", seed=5), ds, tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match=r"(lam|lambda)\b.*\[0, 1\].*1\.5"):
        KNNLM(model, ds, tokenizer=tiny_tokenizer, lam=1.5)
    with pytest.raises(ValueError, match=r"temperature.*positive"):
        KNNLM(model, ds, tokenizer=tiny_tokenizer, temperature=0)


def test_knnlm_evaluate_equals_evaluate(tiny_store, tiny_tokenizer):
    model, ds = tiny_store
    texts = _held_out_texts()
    knn = KNNLM(model, ds, tokenizer=tiny_tokenizer, lam=0.4, temperature=2.0, k=12)
    got = knn.evaluate(texts=texts, context=32, stride=20, progress=False)
    ref = evaluate(model, tiny_tokenizer, ds, texts=texts,
                   cfg=_cfg(lambdas=[0.4], temperatures=[2.0], ks=[12], context=32, stride=20))
    assert got["tokens"] == ref["tokens"] and got["window"] == ref["window"]
    assert (got["window"]["context"], got["window"]["stride"]) == (32, 20)
    assert got["ppl_base"] == ref["ppl_base"]
    assert got["primary"] == ref["primary"] == {"lambda": 0.4, "temperature": 2.0, "k": 12, "ppl": ref["ppl_knn"]}
    assert got["grid"] == ref["grid"]
    # and the numbers are the oracle's
    oracle = _oracle_targets(model, tiny_tokenizer, ds, texts, context=32, stride=20, k=12)
    base, ppl = _oracle_ppl(*oracle, 0.4, 2.0)
    assert got["ppl_base"] == pytest.approx(base, rel=1e-5)
    assert got["ppl_knn"] == pytest.approx(ppl, rel=1e-5)
