"""Self-tuning (#27): the gate fitted on the datastore's own documents, each searched without any
of its own rows; the fallback to the best fixed λ when the gate loses on held-out documents; the
CLI's defaults (`knnlm tune` without --data, `knnlm eval` without --lambda)."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from knnlm import KNNLM
from knnlm.datastore import open_datastore
from knnlm.gate import FEATURES, NL, TuneData, fit_gate


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_store):
    """A writable copy of the tiny flat datastore (tuning writes the gate into it)."""
    model, shared = tiny_store
    path = tmp_path_factory.mktemp("self-tune") / "ds"
    shutil.copytree(shared.path, path)
    return model, open_datastore(path)


def test_a_search_excluding_a_range_returns_the_nearest_other_rows(store, tiny_tokenizer):
    """Against brute force over the stored keys: the k nearest rows outside [lo, hi), none inside."""
    model, ds = store
    knn = KNNLM(model, ds, tiny_tokenizer, k=16)
    keys = torch.from_numpy(np.asarray(ds.keys, dtype=np.float32))  # (N, D)
    doc = ds.documents[1]
    lo, hi = doc["first_row"], doc["first_row"] + doc["length"] - 1
    q = keys[lo: lo + 5] + 0.01  # queries next to the document's own keys
    ranges = torch.tensor([[lo, hi]] * 5)
    d, _, ids = knn.search(q, exclude_range=ranges)
    assert not ((ids >= lo) & (ids < hi)).any()
    brute = ((keys[None] - q[:, None]) ** 2).sum(-1)  # (5, N)
    brute[:, lo:hi] = math.inf
    want = brute.sort(dim=1).values[:, :16]
    torch.testing.assert_close(d, want, rtol=1e-4, atol=1e-4)  # the same distances (ties may swap ids)
    d_all, _, ids_all = knn.search(q)
    assert ((ids_all >= lo) & (ids_all < hi)).any()  # without the exclusion its own rows come first


def test_self_tuning_never_retrieves_a_documents_own_rows(store, tiny_tokenizer, monkeypatch):
    model, ds = store
    knn = KNNLM(model, ds, tiny_tokenizer, k=16)
    seen = []
    real = knn.retriever.search

    def spy(q, k=None, exclude=None, exclude_range=None):
        out = real(q, k, exclude=exclude, exclude_range=exclude_range)
        seen.append((exclude_range, out[2]))
        return out

    monkeypatch.setattr(knn.retriever, "search", spy)
    gate = knn.tune(max_tokens=3000, progress=False, save=False, kind="linear")
    assert seen and all(r is not None for r, _ in seen)
    for ranges, ids in seen:
        inside = (ids >= ranges[:, :1]) & (ids < ranges[:, 1:]) & (ids >= 0)
        assert not inside.any()
    names = {d["name"] for d in ds.documents}
    assert gate.tuned_on and {d["name"] for d in gate.tuned_on} <= names
    own = gate.report["self_tuned"]
    assert own["exclusion"] == "document" and 0 < own["tokens"] == gate.report["tokens"] <= 3000
    assert own["documents"] == len(gate.tuned_on) >= 2


def _synthetic(n_docs: int = 10, per_doc: int = 400, flip_held: bool = True) -> TuneData:
    """A feature that tells perfectly whether retrieval is right on the fitting documents and the
    opposite on the held-out ones (every fifth): a gate fitted on the former loses badly on the
    latter, where a constant λ loses little."""
    g = torch.Generator().manual_seed(0)
    n = n_docs * per_doc
    doc = torch.arange(n_docs).repeat_interleave(per_doc)
    good = torch.rand(n, generator=g) < 0.5  # retrieval finds the target
    held = doc % 5 == 4
    signal = torch.where(held & flip_held, ~good, good).double()
    lm = torch.zeros(n, NL + 1)
    lm[:, 0] = signal.float()  # lm_entropy carries the (misleading on held-out) signal
    lm[:, 1:NL] = torch.randn(n, NL - 1, generator=g) * 0.01
    knn = torch.randn(n, len(FEATURES) - NL, generator=g) * 0.01
    lp_lm = torch.full((n,), math.log(0.2))
    lp_knn = torch.where(good, torch.full((n,), math.log(0.9)), torch.full((n,), math.log(1e-4)))
    docs = [{"name": f"d{i}", "sha256": f"{i:064x}", "tokens": per_doc} for i in range(n_docs)]
    return TuneData(lm=lm, knn=knn, has=torch.ones(n, dtype=torch.bool), lp_lm=lp_lm, lp_knn=lp_knn, doc=doc,
                    documents=docs, seen=torch.ones(n, dtype=torch.bool))


def test_a_gate_that_loses_to_a_fixed_lambda_on_held_out_documents_is_that_fixed_lambda():
    gate = fit_gate(_synthetic(), "x", 16, 1.0, kind="linear", select=False)
    fb = gate.report["fallback"]
    assert fb["validation_nll_gate"] > fb["validation_nll_fixed"] + 0.1  # a wide margin, not rounding
    assert gate.report["kind"] == "fixed" and fb["fixed_lambda"] == gate.report["nll_per_token"][
        "best_fixed_lambda"]["lambda"]
    feats = torch.cat([torch.zeros(3, NL + 1), torch.tensor([[0.0], [1.0], [5.0]]).repeat(1, 1)], 1)[:, :NL + 1]
    dists, values = torch.rand(3, 16), torch.randint(0, 50, (3, 16))
    lam = gate.lam(feats, dists, values)
    torch.testing.assert_close(lam, torch.full((3,), fb["fixed_lambda"]), rtol=1e-6, atol=1e-6)
    # the same data where held-out documents behave like the others: the gate wins and is kept
    kept = fit_gate(_synthetic(flip_held=False), "x", 16, 1.0, kind="linear", select=False)
    assert "fallback" not in kept.report and kept.report["kind"] == "linear"
    assert kept.report["validation_nll"] < kept.report["nll_per_token"]["best_fixed_lambda"]["nll"] - 0.1


def test_cli_tune_without_data_self_tunes_and_eval_defaults_to_the_gate(tmp_path, tiny_model_dir, corpus_dir, capsys):
    from knnlm.cli import main

    out = tmp_path / "ds"
    assert main(["build-index", "--model", str(tiny_model_dir), "--data", str(corpus_dir), "--out", str(out),
                 "--context", "64", "--index", "flat", "--quiet"]) == 0
    held_out = tmp_path / "held.py"
    held_out.write_text("def f(a, b):\n    return sorted(a) + [x for x in b if x]\n" * 30)
    assert main(["eval", "--model", str(tiny_model_dir), "--datastore", str(out), "--data", str(held_out),
                 "--quiet"]) == 0
    assert "lambda 0.25," in capsys.readouterr().out  # no gate: the fixed mixture
    assert main(["tune", "--model", str(tiny_model_dir), "--datastore", str(out), "--max-tokens", "3000",
                 "--kind", "linear", "--quiet"]) == 0
    assert "of the datastore itself" in capsys.readouterr().out
    assert main(["eval", "--model", str(tiny_model_dir), "--datastore", str(out), "--data", str(held_out),
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "lambda adaptive," in out and "adaptive lambda (" in out  # the datastore's gate, by default


def test_self_tuning_counts_a_document_as_held_out(store, tiny_tokenizer):
    """The never-seen flags (and the LM features' frequencies) of a self-tuned document leave its
    own tokens out: a token that only that document holds is 'never seen' for it."""
    from knnlm.config import EvalConfig
    from knnlm.evaluation import collect_self_tuning

    model, ds = store
    knn = KNNLM(model, ds, tiny_tokenizer, k=16)
    data = collect_self_tuning(knn, EvalConfig(max_tokens=4000, progress=False))
    values = np.asarray(ds.values)
    counts = np.bincount(values, minlength=model.config.vocab_size)
    by_name = {d["name"]: d for d in ds.documents}
    unseen_somewhere = False
    for i, d in enumerate(data.documents):
        src = by_name[d["name"]]
        own = np.bincount(values[src["first_row"]: src["first_row"] + src["length"] - 1], minlength=counts.size)
        rows = (data.doc == i).nonzero().squeeze(1)
        tgt = np.asarray(ds.document_tokens(ds.documents.index(src)))[1: rows.numel() + 1]
        want = (counts - own)[tgt] > 0
        assert np.array_equal(data.seen[rows].numpy(), want)
        unseen_somewhere |= bool((~want).any())
    assert unseen_somewhere  # the tiny corpus has tokens only one document holds


def _curve_respects_the_floor(gate) -> None:
    rg = gate.report["retrieval_gate"]
    floor, curve = rg["min_fraction"], rg["held_out_nll_by_fraction"]
    fixed = rg["held_out_nll_fixed_full_search"]["nll"]
    assert gate.min_fraction == floor
    assert curve[str(floor)] <= fixed
    assert all(v > fixed for f, v in curve.items() if float(f) < floor)  # the smallest fraction that loses nothing


def test_the_retrieval_gate_searches_at_least_the_fraction_that_loses_nothing_to_a_fixed_lambda():
    # every token gains the same from retrieval and nothing before the search says otherwise:
    # skipping any share of the searches loses to a fixed λ with full search, so the floor is 1
    n_docs, per_doc = 10, 300
    n = n_docs * per_doc
    g = torch.Generator().manual_seed(1)
    flat = TuneData(lm=torch.randn(n, NL + 1, generator=g), knn=torch.randn(n, len(FEATURES) - NL, generator=g),
                    has=torch.ones(n, dtype=torch.bool), lp_lm=torch.full((n,), math.log(0.2)),
                    lp_knn=torch.full((n,), math.log(0.9)), doc=torch.arange(n_docs).repeat_interleave(per_doc),
                    documents=[{"name": f"d{i}", "sha256": f"{i:064x}", "tokens": per_doc} for i in range(n_docs)])
    gate = fit_gate(flat, "x", 16, 1.0, kind="linear", select=False)
    _curve_respects_the_floor(gate)
    assert gate.min_fraction == 1.0
    assert gate.fraction(0.3) == 1.0 and bool(gate.select(flat.lm[:50], 0.3).all())
    # where the LM's own features tell which tokens retrieval helps (half of them), a smaller
    # fraction loses nothing: the floor lies well below 1, and asking for more is honoured
    useful = fit_gate(_synthetic(flip_held=False), "x", 16, 1.0, kind="linear", select=False)
    _curve_respects_the_floor(useful)
    assert useful.min_fraction <= 0.6
    assert useful.fraction(0.8) == 0.8 and useful.fraction(None) == 1.0
    assert useful.fraction(0.01) == useful.min_fraction
    # the floor travels with the gate file
    from knnlm.gate import Gate

    again = Gate.from_json(useful.to_json(), "gate.json")
    assert again.min_fraction == useful.min_fraction
