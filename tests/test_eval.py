import math

import numpy as np
import pytest
import torch

from knnlm import evaluate, format_results
from knnlm.build import build_datastore
from knnlm.config import BuildConfig, ConfigError, EvalConfig
from knnlm.data import CorpusError
from knnlm.datastore import DatastoreError
from knnlm.errors import KnnlmError
from knnlm.retrieval import Retriever

from conftest import make_tiny_model

TEXTS = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n",
         "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n"]


@pytest.fixture
def store(tiny_store):
    """The tiny model and its flat datastore over a few stdlib files (conftest.tiny_store)."""
    return tiny_store


def _cfg(**kw):
    kw.setdefault("progress", False)
    return EvalConfig(**kw)


def test_lambda_zero_is_the_plain_hf_loss(store, tiny_tokenizer):
    model, ds = store
    res = evaluate(model, tiny_tokenizer, ds, texts=TEXTS, cfg=_cfg(lambdas=[0.0], context=256, stride=255))
    nll, n = 0.0, 0
    with torch.inference_mode():
        for t in TEXTS:
            ids = torch.tensor([tiny_tokenizer(t)["input_ids"]])
            loss = model(input_ids=ids, labels=ids).loss.item()
            nll += loss * (ids.shape[1] - 1)
            n += ids.shape[1] - 1
    assert res["tokens"] == n
    assert res["ppl_base"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert res["ppl_knn"] == pytest.approx(res["ppl_base"], rel=1e-6)


def test_per_document_sums_are_each_documents_own_eval(store, tiny_tokenizer):
    """``per_document``: each document's NLL (base and primary setting) is what evaluating it alone
    gives, and the sums are the overall perplexities (windows of 16 tokens: several per document)."""
    model, ds = store
    cfg = dict(lambdas=[0.5, 0.1], context=16)
    res = evaluate(model, tiny_tokenizer, ds, texts=TEXTS, cfg=_cfg(per_document=True, batch_size=3, **cfg))
    docs = res["per_document"]
    assert [d["name"] for d in docs] == [f"text[{i}]" for i in range(len(TEXTS))]
    assert sum(d["tokens"] for d in docs) == res["tokens"]
    for field, ppl in (("nll_base", res["ppl_base"]), ("nll_knn", res["ppl_knn"])):
        assert math.exp(sum(d[field] for d in docs) / res["tokens"]) == pytest.approx(ppl, rel=1e-9)
    for text, d in zip(TEXTS, docs):
        alone = evaluate(model, tiny_tokenizer, ds, texts=[text], cfg=_cfg(**cfg))
        assert d["nll_knn"] == pytest.approx(math.log(alone["ppl_knn"]) * alone["tokens"], rel=1e-5)
        assert d["nll_base"] == pytest.approx(math.log(alone["ppl_base"]) * alone["tokens"], rel=1e-5)
    assert "per_document" not in evaluate(model, tiny_tokenizer, None, texts=TEXTS, cfg=_cfg(context=16))
    plain = evaluate(model, tiny_tokenizer, None, texts=TEXTS, cfg=_cfg(context=16, per_document=True))
    assert [d["nll_base"] for d in plain["per_document"]] == pytest.approx([d["nll_base"] for d in docs], rel=1e-5)


def test_sweep_equals_single_runs(store, tiny_tokenizer, corpus_dir):
    model, ds = store
    data = [str(corpus_dir / "bisect.py")]
    sweep = evaluate(model, tiny_tokenizer, ds, data, _cfg(lambdas=[0.1, 0.5], temperatures=[1, 4], ks=[4, 32]))
    assert len(sweep["grid"]) == 8
    assert sweep["best"]["ppl"] == min(r["ppl"] for r in sweep["grid"])
    for row in sweep["grid"]:
        single = evaluate(model, tiny_tokenizer, ds, data, _cfg(lambdas=[row["lambda"]],
                                                                  temperatures=[row["temperature"]],
                                                                  ks=[row["k"]]))
        assert single["ppl_knn"] == pytest.approx(row["ppl"], rel=1e-5)
        assert single["ppl_base"] == sweep["ppl_base"]
    assert "<- best" in format_results(sweep)


def test_self_retrieval_is_excluded(store, tiny_tokenizer, corpus_dir):
    model, ds = store
    data = [str(corpus_dir / "colorsys.py")]  # this exact text is in the datastore
    kept = evaluate(model, tiny_tokenizer, ds, data, _cfg(exclude_self=False))
    excl = evaluate(model, tiny_tokenizer, ds, data, _cfg())
    assert excl["overlap"]["documents"] == 1 and excl["overlap"]["tokens"] == excl["tokens"]
    assert excl["ppl_knn"] > kept["ppl_knn"] * 1.5  # its own key at distance 0 made it look far better
    assert excl["ppl_base"] == kept["ppl_base"]
    # and the excluded row really is gone from the neighbours
    r = Retriever(ds, 8)
    q = torch.from_numpy(ds.keys[:50].astype(np.float32))
    _, _, ids = r.search(q, exclude=torch.arange(50))
    assert not (ids == torch.arange(50)[:, None]).any()
    _, _, ids_kept = r.search(q)
    assert (ids_kept[:, 0] == torch.arange(50)).float().mean() > 0.9


def test_rerank_equals_exact_search(store, tiny_tokenizer, tmp_path):
    model, ds = store
    q = torch.from_numpy(ds.keys[100:140].astype(np.float32)) + 0.01
    d_flat, v_flat, i_flat = Retriever(ds, 16).search(q)
    d_rr, v_rr, i_rr = Retriever(ds, 16, rerank=True).search(q)
    assert torch.equal(i_flat, i_rr) and torch.equal(v_flat, v_rr)
    torch.testing.assert_close(d_rr, d_flat, rtol=1e-5, atol=1e-4)
    # on a lossy (PQ) index the re-ranked distances are the exact ones for the returned ids
    pq = build_datastore(model, tiny_tokenizer, [s["path"] for s in ds.header.corpus.sources], tmp_path / "pq",
                         BuildConfig(context=64, index="IVF4,PQ8", progress=False))
    d, _, ids = Retriever(pq, 16, rerank=True, nprobe=4).search(q)
    keys = torch.from_numpy(pq.keys[:].astype(np.float32))
    exact = ((keys[ids] - q[:, None, :]) ** 2).sum(-1)
    torch.testing.assert_close(d, exact, rtol=1e-5, atol=1e-4)
    assert torch.all(d[:, 1:] >= d[:, :-1])


def test_eval_refusals(store, tiny_tokenizer, tmp_path):
    model, ds = store
    other = make_tiny_model("llama", seed=3)
    with pytest.raises(DatastoreError, match="model weights"):
        evaluate(other, tiny_tokenizer, ds, texts=TEXTS, cfg=_cfg())
    with pytest.raises(KnnlmError, match="`ks` must be between 1 and the datastore size"):
        evaluate(model, tiny_tokenizer, ds, texts=TEXTS, cfg=_cfg(ks=[len(ds) + 1]))
    with pytest.raises(CorpusError, match="no tokens"):
        evaluate(model, tiny_tokenizer, ds, texts=[""], cfg=_cfg())
    for kw in ({"lambdas": [1.5]}, {"temperatures": [0]}, {"ks": [0]}):
        with pytest.raises(ConfigError):
            _cfg(**kw)


def test_lambda_one_and_buckets(store, tiny_tokenizer, corpus_dir):
    model, ds = store
    res = evaluate(model, tiny_tokenizer, ds, [str(corpus_dir / "keyword.py")], _cfg(lambdas=[0.25, 1.0]))
    assert res["grid"][0]["ppl"] is not None and all(not math.isnan(r["ppl"] or 0) for r in res["grid"])
    assert sum(b["tokens"] for b in res["buckets"]) == res["tokens"]


def test_document_cut_by_max_tokens_still_excludes_its_own_rows(tiny_tokenizer, tmp_path):
    """A build cut by max_tokens inside a document holds its first part; evaluating the whole
    document must exclude the keys of that part (matched by text hash + token prefix), which an
    independent brute-force kNN-LM computation with those rows removed reproduces."""
    from knnlm.capture import capture_keys
    from knnlm.corpora import stdlib_root
    from knnlm.data import windows

    tok, model = tiny_tokenizer, make_tiny_model("llama")
    a, b = stdlib_root() / "keyword.py", stdlib_root() / "colorsys.py"
    n_a = len(tok(a.read_text())["input_ids"])
    cut = 300
    ds = build_datastore(model, tok, [str(a), str(b)], tmp_path / "ds",
                         BuildConfig(context=64, index="flat", max_tokens=n_a + cut, progress=False))
    assert ds.documents[1]["length"] == cut  # the second document was cut
    lam, temp, k = 0.5, 2.0, 8
    res = evaluate(model, tok, ds, [str(b)], _cfg(lambdas=[lam], temperatures=[temp], ks=[k]))
    assert res["overlap"] == {"documents": 1, "tokens": cut - 1, "excluded": True}
    kept = evaluate(model, tok, ds, [str(b)], _cfg(lambdas=[lam], temperatures=[temp], ks=[k], exclude_self=False))
    assert kept["ppl_knn"] < 0.9 * res["ppl_knn"]  # the own rows would have been found at distance 0

    # oracle: same windows, exact distances to every key, own rows (targets j < cut) removed
    ids = tok(b.read_text())["input_ids"]
    keys = torch.from_numpy(np.asarray(ds.keys, dtype=np.float32))  # (N, D)
    vals = torch.from_numpy(np.asarray(ds.values, dtype=np.int64))
    row0 = ds.documents[1]["first_row"]
    nll = 0.0
    with torch.inference_mode(), capture_keys(model) as cap:
        for start, end, first in windows(len(ids), 64, 63):
            logits = model(input_ids=torch.tensor([ids[start:end]])).logits[0].float()  # (T, V)
            h = cap.pop()[0].float()  # (T, D)
            js = torch.arange(first, end)  # (P,) scored targets; position j - 1 - start predicts ids[j]
            pos, tgt = js - 1 - start, torch.tensor(ids)[js]
            lp_lm = torch.log_softmax(logits[pos], -1).gather(1, tgt[:, None])[:, 0]  # (P,)
            d = ((keys[None] - h[pos][:, None]) ** 2).sum(-1)  # (P, N)
            own = js < cut
            d[own.nonzero()[:, 0], row0 + js[own] - 1] = math.inf
            top = torch.topk(-d, k, dim=1).indices  # (P, k)
            w = torch.softmax(-d.gather(1, top) / temp, 1)
            p_knn = (w * (vals[top] == tgt[:, None])).sum(1)  # (P,)
            nll -= torch.log(lam * p_knn.double() + (1 - lam) * lp_lm.double().exp()).sum().item()
    n = len(ids) - 1
    assert res["tokens"] == n
    assert res["ppl_knn"] == pytest.approx(math.exp(nll / n), rel=1e-4)
