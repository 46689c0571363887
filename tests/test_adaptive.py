"""Adaptive kNN-LM: per-token λ from a tuned gate, the retrieval gate, pointers (knnlm.gate,
knnlm.retrieval.Retriever.step, evaluation / generation with them)."""

import dataclasses
import json
import math
import re
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from knnlm import KNNLM, BuildConfig, build_datastore
from knnlm.config import ConfigError, EvalConfig, KNNSettings
from knnlm.datastore import DatastoreError, open_datastore
from knnlm.evaluation import LMCache, collect_tuning
from knnlm.gate import LM_FEATURES, NL, UNSEEN_FLOOR, Gate, fit_gate, lm_features, load_gate
from knnlm.generate import KNNLogitsProcessor
from knnlm.scoring import interpolate, lm_target_log_probs, mix, reference_interpolate, reference_interpolate_target
from knnlm.testing import build_tiny_store, corpus_paths, make_tiny_model

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TUNE = [str(STDLIB / "sched.py")]  # not in the tiny datastore (CORPUS_FILES)
EVAL = [str(STDLIB / "queue.py")]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_store, tiny_tokenizer):
    """A copy of the tiny datastore (tuning writes into it) with a gate tuned on sched.py."""
    model, shared = tiny_store
    path = tmp_path_factory.mktemp("adaptive") / "ds"
    shutil.copytree(shared.path, path)
    knn = KNNLM(model, open_datastore(path), tiny_tokenizer, k=32)
    gate = knn.tune(TUNE, max_tokens=2000, progress=False)
    return model, open_datastore(path), gate


def _forced(gate: Gate, logit: float) -> Gate:
    """The same gate with its output forced: sigmoid(+inf) = 1, sigmoid(-inf) = 0 exactly."""
    g = Gate.from_json(gate.to_json(), gate.path)
    for k, v in g.net.items():
        if k != "kind":
            g.net[k] = torch.zeros_like(v)
    g.net["b" if g.net["kind"] == "linear" else "b2"] = torch.tensor(logit, dtype=torch.float64)
    return g


def _real_rows(model, ds, tokenizer):
    """Logits (R, V) and key hidden states (R, D) of the tiny model on a stretch of eval text."""
    from knnlm.capture import capture_keys

    ids = torch.tensor([tokenizer(Path(EVAL[0]).read_text()[:2000])["input_ids"][:96]])
    with torch.inference_mode(), capture_keys(model, ds.header.key.layer) as cap:
        logits = model(input_ids=ids).logits[0]
        hidden = cap.pop()[0]
    return logits.clone(), hidden.clone()


# ------------------------------------------------------------------------------ the formula


def test_tensor_lambda_is_the_scalar_formula_per_row():
    torch.manual_seed(0)
    logits, dists = torch.randn(5, 50), torch.rand(5, 8) * 4
    values, target = torch.randint(0, 50, (5, 8)), torch.randint(0, 50, (5,))
    lam = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    full = reference_interpolate(logits, dists, values, lam, 2.0)
    fused = interpolate(logits, dists, values, lam, 2.0)  # a tensor λ takes the reference
    tgt = reference_interpolate_target(logits, dists, values, target, lam, 2.0)
    for i, x in enumerate(lam.tolist()):
        row = reference_interpolate(logits[i:i + 1], dists[i:i + 1], values[i:i + 1], x, 2.0)[0]
        assert torch.allclose(full[i], row, atol=1e-6, equal_nan=True)
        assert torch.allclose(fused[i], row, atol=1e-6, equal_nan=True)
        assert torch.allclose(tgt[i], row[target[i]], atol=1e-6, equal_nan=True)
    assert torch.equal(full[0], torch.log_softmax(logits[0], -1))  # λ = 0: the LM exactly
    nan_lm = torch.full((2, 4), math.nan)
    knn = torch.log(torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]))
    out = mix(nan_lm, knn, torch.tensor([1.0, 1.0]))  # λ = 1 rows never read the LM side
    assert torch.equal(out, knn)
    for bad in (torch.tensor([0.5, 1.5]), torch.tensor([math.nan]), torch.ones(2, 2)):
        with pytest.raises(ConfigError, match="`lam`"):
            reference_interpolate(logits[:2], dists[:2], values[:2], bad, 1.0)


# ------------------------------------------------------------------------------ the gate


def test_lm_features_match_their_definitions_from_log_softmax():
    """The one-pass features against their textbook definitions, -inf logits included."""
    torch.manual_seed(0)
    logits = torch.randn(6, 40) * 3
    logits[1, :5] = -math.inf  # masked vocabulary: p = 0 contributes 0 to the entropy
    logits[2] = logits[2].clamp(max=0) - 30  # far from 0: the max shift matters
    counts = torch.randint(0, 4, (40,))
    counts[logits[3].argmax()] = 0  # the LM's favourite is a token the datastore never saw
    feats, lse = lm_features(logits, counts)
    assert feats.shape == (6, NL + 1) and len(LM_FEATURES) == NL
    lp = torch.log_softmax(logits, -1)
    p = lp.exp()
    ent = -(p * lp.masked_fill(p == 0, 0)).sum(-1)
    unseen = torch.log((p * (counts == 0)).sum(-1)).clamp(min=math.log(UNSEEN_FLOOR))
    arg = lp.argmax(-1)
    ref = torch.stack([ent, lp.max(-1).values, torch.log1p(counts[arg].float()), unseen, arg.float()], -1)
    torch.testing.assert_close(feats, ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1))
    tgt = torch.randint(5, 40, (6,))
    assert torch.equal(lm_target_log_probs(logits, tgt, lse), logits.gather(1, tgt[:, None])[:, 0] - lse)
    torch.testing.assert_close(lm_target_log_probs(logits, tgt, lse), lm_target_log_probs(logits, tgt))
    none_unseen, _ = lm_features(logits, counts + 1)  # every token seen: the floor
    assert torch.all(none_unseen[:, LM_FEATURES.index("lm_unseen_log_mass")] == math.log(UNSEEN_FLOOR))



def test_gate_limits_reproduce_base_lm_and_pure_knn(tuned, tiny_tokenizer):
    model, ds, gate = tuned
    plain = KNNLM(model, ds, tiny_tokenizer, k=32)
    cache = LMCache()
    ref = plain.evaluate(EVAL, lambdas=[0.0, 1.0], max_tokens=600, progress=False, lm_cache=cache, per_token=True)
    base, pure = ref["per_token"]["grid"]  # token by token: λ = 0 and λ = 1 (-inf where no neighbour has the target)
    assert torch.equal(base, ref["per_token"]["base"])
    for logit, want in ((-math.inf, base), (math.inf, pure)):
        knn = KNNLM(model, ds, tiny_tokenizer, k=32, lam="adaptive", gate=_forced(gate, logit))
        res = knn.evaluate(EVAL, max_tokens=600, progress=False, lm_cache=cache, per_token=True)
        got = res["per_token"]["grid"][0]
        assert got.shape == want.shape and torch.equal(torch.isinf(got), torch.isinf(want))  # infinities included
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert res["adaptive"]["quantiles"]["0.5"] == (0.0 if logit < 0 else 1.0)
    # log_probs: the full distributions, too
    torch.manual_seed(0)
    logits, hidden = torch.randn(3, model.config.vocab_size), torch.randn(3, ds.dim)
    lp0 = KNNLM(model, ds, tiny_tokenizer, k=32, lam="adaptive", gate=_forced(gate, -math.inf)).log_probs(
        logits, hidden)
    assert torch.equal(lp0, torch.log_softmax(logits, -1))
    lp1 = KNNLM(model, ds, tiny_tokenizer, k=32, lam="adaptive", gate=_forced(gate, math.inf)).log_probs(
        logits, hidden)
    pure = plain.replace(lam=1.0, use_kernel=False).log_probs(logits, hidden)
    assert torch.allclose(lp1, pure, atol=1e-6, equal_nan=True)


def test_adaptive_in_a_sweep_equals_single_runs_and_reports_lambda(tuned, tiny_tokenizer):
    model, ds, gate = tuned
    knn = KNNLM(model, ds, tiny_tokenizer, k=32, gate=gate)
    cache = LMCache()
    sweep = knn.evaluate(EVAL, lambdas=[0.25, "adaptive", 0.1], max_tokens=600, progress=False, lm_cache=cache)
    assert [r["lambda"] for r in sweep["grid"]] == [0.25, "adaptive", 0.1]
    single = knn.replace(lam="adaptive").evaluate(EVAL, max_tokens=600, progress=False)  # its own forward
    assert single["ppl_knn"] == pytest.approx(sweep["grid"][1]["ppl"], rel=1e-5)
    a = single["adaptive"]
    assert a["tokens"] == single["tokens"] and sum(a["histogram"]["counts"]) == a["tokens"]
    assert 0.0 <= a["quantiles"]["0.05"] <= a["quantiles"]["0.5"] <= a["quantiles"]["0.95"] <= 1.0
    assert all(0.0 <= b["mean_lambda"] <= 1.0 for b in single["buckets"])
    assert gate.report["nll_per_token"]["mlp_all"] < gate.report["nll_per_token"]["base_lm"]


def test_retrieval_gate_skips_searches_and_skipped_rows_are_the_lm_exactly(tuned, tiny_tokenizer, monkeypatch):
    model, ds, gate = tuned
    knn = KNNLM(model, ds, tiny_tokenizer, k=32, gate=gate, retrieve_fraction=0.5, use_kernel=False)
    logits, hidden = _real_rows(model, ds, tiny_tokenizer)
    allow = gate.select(knn.lm_features(logits), 0.5)
    assert 0 < int(allow.sum()) < logits.shape[0]
    searched = []
    real = knn.retriever.search
    monkeypatch.setattr(knn.retriever, "search", lambda q, *a, **kw: searched.append(q.shape[0]) or real(q, *a, **kw))
    out = knn.log_probs(logits, hidden)
    assert searched == [int(allow.sum())]  # one batched search over the selected rows only
    assert torch.equal(out[~allow], torch.log_softmax(logits[~allow], -1))
    every = knn.replace(retrieve_fraction=None, use_kernel=False).log_probs(logits[allow], hidden[allow])
    assert torch.allclose(out[allow], every, atol=1e-5)
    # eval: fraction searched is reported, and F = 1 searches everything
    cache = LMCache()
    half = knn.evaluate(EVAL, lambdas=["adaptive"], max_tokens=600, progress=False, lm_cache=cache)
    full = knn.evaluate(EVAL, lambdas=["adaptive"], retrieve_fraction=1.0, max_tokens=600, progress=False,
                        lm_cache=cache)
    assert 0.2 < half["retrieval"]["searched_fraction"] < 0.8
    assert full["retrieval"]["searched_fraction"] == 1.0
    assert half["ppl_base"] == full["ppl_base"]


def test_gate_from_another_datastore_and_a_tampered_gate_are_refused(tuned, tiny_tokenizer, tmp_path):
    model, ds, gate = tuned
    _, other = build_tiny_store(tmp_path / "other", tiny_tokenizer, model, files=["keyword.py"])
    with pytest.raises(DatastoreError, match="tuned on another datastore"):
        load_gate(other, gate.path)
    with pytest.raises(DatastoreError, match="tuned on another datastore"):
        KNNLM(model, other, tiny_tokenizer, lam="adaptive", gate=gate.path)
    with pytest.raises(ConfigError, match="need a gate"):
        KNNLM(model, other, tiny_tokenizer, lam="adaptive")
    tampered = tmp_path / "ds"
    tampered.mkdir()
    for f in Path(ds.path).iterdir():  # copies: a datastore holding links is refused (#31)
        shutil.copy(f, tampered / f.name) if f.name != "gate.json" else None
    (tampered / "gate.json").write_text(Path(gate.path).read_text().replace('"k": 32', '"k": 31'))
    with pytest.raises(DatastoreError, match="SHA-256"):
        load_gate(open_datastore(tampered))


def test_tuning_and_eval_overlap_is_refused(tuned, tiny_tokenizer):
    model, ds, gate = tuned
    knn = KNNLM(model, ds, tiny_tokenizer, k=32, gate=gate)
    with pytest.raises(ConfigError, match="in the datastore"):
        knn.tune(corpus_paths(["bisect.py"]), max_tokens=500, progress=False, save=False)
    with pytest.raises(ConfigError, match="tuned on"):
        knn.evaluate(TUNE, lambdas=["adaptive"], max_tokens=300, progress=False)
    knn.evaluate(TUNE, lambdas=[0.25], max_tokens=300, progress=False)  # a fixed λ does not use the gate


def test_tuning_is_deterministic(tuned, tiny_tokenizer):
    model, ds, gate = tuned
    data = collect_tuning(KNNLM(model, ds, tiny_tokenizer, k=32), TUNE, EvalConfig(max_tokens=2000, progress=False))
    fits = [fit_gate(data, ds.identity(), 32, 1.0, select=False).to_json() for _ in range(2)]
    assert fits[0]["net"] == fits[1]["net"] and fits[0]["pre"] == fits[1]["pre"]
    assert set(gate.features) <= set(fits[0]["features"])  # the tuned gate kept a subset of the features


# ------------------------------------------------------------------------------ pointers


def test_pointers_save_searches_on_repeated_text(tuned, tiny_tokenizer):
    """Text the datastore holds (own keys kept): pointers follow it, about one search per window
    (its first position; then the chain through the text's own rows holds — the last window of
    the 800-token prefix is aligned differently from the datastore's and needs a few more); with
    ``min_pointers`` = k, only rows whose k neighbours all continue the text skip the search."""
    model, ds, _ = tuned
    knn = KNNLM(model, ds, tiny_tokenizer, k=32)
    data = corpus_paths(["colorsys.py"])
    cache = LMCache()
    plain = knn.evaluate(data, max_tokens=800, exclude_self=False, progress=False, lm_cache=cache)
    ptr = knn.evaluate(data, max_tokens=800, exclude_self=False, pointers=True, min_pointers=1, progress=False,
                       lm_cache=cache)
    windows = math.ceil(ptr["tokens"] / 63)
    assert windows <= ptr["retrieval"]["searched_fraction"] * ptr["tokens"] <= windows + 4
    assert ptr["retrieval"]["searched_fraction"] + ptr["retrieval"]["pointer_fraction"] == pytest.approx(1.0)
    assert math.isfinite(ptr["ppl_knn"])
    never = knn.evaluate(data, max_tokens=800, exclude_self=False, pointers=True, min_pointers=32, progress=False,
                         lm_cache=cache)
    assert plain["retrieval"]["searches_saved"] == 0.0
    if never["retrieval"]["searches_saved"] == 0.0:
        assert never["ppl_knn"] == pytest.approx(plain["ppl_knn"], rel=1e-6)


def _reference_pointer_neighbours(retriever, lmb, k: int, min_ptr: int, allow):
    """The pointer loop written the slow, obvious way, one row at a time: per window, per
    position, the previous position's successors (value == actual next token, row + 1 in the
    same document, the row's own key excluded), exact squared L2 from the keys in numpy, a
    single-row search when fewer than ``min_ptr`` survive (and the retrieval gate allows it).
    Returns per row (ids, dists, values) sorted by distance, and searched / pointed flags."""
    import numpy as np

    from knnlm.data import count_targets

    ds = retriever.datastore
    keys, vals = np.asarray(ds.keys, dtype=np.float32), np.asarray(ds.values, dtype=np.int64)
    last = {d["first_row"] + count_targets(d["length"]) - 1 for d in ds.documents}
    rows, searched, pointed = [], [], []
    r = 0
    for length in lmb.lengths:
        ptrs: list[int] = []
        for _ in range(length):
            q = lmb.query[r].float().numpy()
            own = -1 if lmb.exclude is None else int(lmb.exclude[r])
            cand = [p for p in ptrs if p != own]
            if len(cand) >= min_ptr:
                d = [float(((keys[p] - q) ** 2).sum()) for p in cand]
                order = sorted(range(len(cand)), key=d.__getitem__)
                ids, dists = [cand[j] for j in order], [d[j] for j in order]
                searched.append(False), pointed.append(True)
            elif allow is None or bool(allow[r]):
                d_t, _, i_t = retriever.search(lmb.query[r:r + 1], k,
                                               exclude=None if lmb.exclude is None else lmb.exclude[r:r + 1])
                keep = i_t[0] >= 0
                ids, dists = i_t[0][keep].tolist(), d_t[0][keep].tolist()
                searched.append(True), pointed.append(False)
            else:
                ids, dists = [], []
                searched.append(False), pointed.append(False)
            rows.append((ids, dists, [int(vals[i]) for i in ids]))
            tgt = int(lmb.tgt[r])
            ptrs = [i + 1 for i in ids if vals[i] == tgt and i not in last]
            r += 1
    return rows, torch.tensor(searched), torch.tensor(pointed)


@pytest.mark.parametrize("min_ptr, fraction", [(1, None), (3, 0.6)])
def test_pointer_loop_matches_the_row_by_row_reference(tuned, tiny_tokenizer, min_ptr, fraction):
    """The batched pointer loop (all windows in lock step, one sorted gather of the candidate
    keys per step, chunked fp32 distances) finds, row for row, the neighbours, distances and
    kNN log-probs of the obvious per-row loop — on text the datastore holds (its own keys are
    excluded, pointers still chain through the neighbouring rows) and with the retrieval gate."""
    from knnlm.evaluation import _neighbours
    from knnlm.retrieval import Retriever
    from knnlm.scoring import knn_target_log_probs

    model, ds, gate = tuned
    k = 32
    knn = KNNLM(model, ds, tiny_tokenizer, k=k, gate=gate)
    cache = LMCache()
    knn.evaluate(corpus_paths(["colorsys.py", "keyword.py"]) + EVAL, max_tokens=700, lm_cache=cache,
                 lambdas=["adaptive"], progress=False, batch_size=4)
    knn = knn.replace(pointers=True, min_pointers=min_ptr, retrieve_fraction=fraction)
    assert any(b.exclude is not None and bool((b.exclude >= 0).any()) for b in cache.batches)
    for lmb in cache.batches:
        st = _neighbours(knn, lmb, k, ["adaptive"])
        allow = None if fraction is None else gate.select(lmb.lm_feats, fraction)
        ref, searched, pointed = _reference_pointer_neighbours(Retriever(ds, k), lmb, k, min_ptr, allow)
        assert torch.equal(st.searched, searched) and torch.equal(st.pointed, pointed)
        assert bool(st.pointed.any()) and bool(st.searched.any())
        for r, (ids, dists, vals) in enumerate(ref):
            n = len(ids)
            assert st.ids[r, :n].tolist() == ids and bool((st.ids[r, n:] == -1).all())
            assert st.values[r, :n].tolist() == vals
            assert torch.allclose(st.dists[r, :n], torch.tensor(dists), rtol=1e-5)
            assert bool(torch.isinf(st.dists[r, n:]).all())
        d_ref = torch.full_like(st.dists, math.inf)
        for r, (ids, dists, _) in enumerate(ref):
            d_ref[r, :len(ids)] = torch.tensor(dists)
        assert torch.allclose(knn_target_log_probs(st.dists, st.values, lmb.tgt, 1.0),
                              knn_target_log_probs(d_ref, st.values, lmb.tgt, 1.0), atol=1e-5, equal_nan=True)


def test_candidates_score_only_real_rows_in_distance_order(tuned, tiny_tokenizer):
    """``Retriever.candidates``: -1 padding anywhere in a row, rows with none, equal distances
    (a row named twice) keep their order; exact squared L2, bit for bit the reference formula.
    ``Retriever.successors``: row + 1 of matching neighbours, none past a document's last row."""
    import numpy as np

    from knnlm.retrieval import Retriever

    _, ds, _ = tuned
    ret = Retriever(ds, 32)
    torch.manual_seed(0)
    q = torch.randn(4, ds.dim)
    rows = torch.tensor([[5, -1, 9, 2, -1], [-1, -1, -1, -1, -1], [7, 7, 1, -1, 3], [0, 1, 2, 3, 4]])
    d, v, i = ret.candidates(q, rows)
    assert d.shape == (4, 5)
    keys = torch.from_numpy(np.array(ds.keys, dtype=np.float32))
    for r in range(4):
        real = [x for x in rows[r].tolist() if x >= 0]
        dist = [float(((keys[x] - q[r]) ** 2).sum(-1)) for x in real]
        order = sorted(range(len(real)), key=dist.__getitem__)
        assert i[r].tolist() == [real[j] for j in order] + [-1] * (5 - len(real))
        assert d[r, :len(real)].tolist() == [dist[j] for j in order]
        assert v[r, :len(real)].tolist() == [int(ds.values[real[j]]) for j in order]
        assert bool(torch.isinf(d[r, len(real):]).all()) and bool((v[r, len(real):] == 0).all())
    # successors: row + 1 where the value matched, never across a document's end
    from knnlm.data import count_targets

    last = [doc["first_row"] + count_targets(doc["length"]) - 1 for doc in ds.documents]
    ids = torch.tensor([[last[0], last[0] - 1, -1, last[1]]])
    vals = torch.from_numpy(np.asarray(ds.values, dtype=np.int64))[ids.clamp(min=0)]
    assert ret.successors(ids, vals, vals[0, 1:2]).tolist() == [[-1, last[0], -1, -1]]
    assert ret.successors(ids, vals, vals[0, 3:4])[0, 3] == -1
    assert ret.successors(ids, vals, vals[0, 0:1])[0, 0] == -1  # the value matches, the document ends


A_LIST = [7, 3, 9, 2, 8, 4, 6]
OTHER_LIST = [5, 3, 9, 1, 8, 0, 6]
FILLER = "".join(f"def helper_{i}(value):\n    return value + {i}\n" for i in range(6))


def _list_doc(title: str, values: list[int]) -> str:
    return f"# list {title}\n" + FILLER + "".join(f"item {i + 1}: {v}\n" for i, v in enumerate(values))


def test_pointers_recall_a_numbered_list_that_near_duplicates_confuse(tiny_tokenizer, tmp_path):
    """Four documents that differ only in their title and in the list at its end: A's list, and
    three near-duplicates that share another list. Prompted with A's beginning, the query at
    "item 1:" is nearest to A's key, but B, C and D's keys are almost as near (their contexts
    differ only by the title, 150 tokens back), so plain kNN-LM votes 3 : 1 for their value at any
    temperature and then follows them. With pointers, tracking the prompt finds the one neighbour
    whose next token was A's title, and from there the pointers stay inside document A."""
    corpus = tmp_path / "lists"
    corpus.mkdir()
    for t in "ABCD":
        (corpus / f"{t}.txt").write_text(_list_doc(t, A_LIST if t == "A" else OTHER_LIST))
    model = make_tiny_model("llama")
    ds = build_datastore(model, tiny_tokenizer, [str(corpus)], tmp_path / "ds",
                         BuildConfig(context=256, index="flat", progress=False))
    enc = tiny_tokenizer(f"# list A\n{FILLER}item 1:", return_tensors="pt")

    def recall(**kw) -> tuple[int, dict]:
        knn = KNNLM(model, ds, tiny_tokenizer, lam=0.9, k=16, use_kernel=False, **kw)
        proc = KNNLogitsProcessor(knn)
        out = knn.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=48,
                           do_sample=False, processor=proc, pad_token_id=0)
        text = "item 1:" + tiny_tokenizer.decode(out[0, enc["input_ids"].shape[1]:])
        items = re.findall(r"item (\d+): (\d+)\n", text)
        return sum(1 for i, v in items if 1 <= int(i) <= 7 and int(v) == A_LIST[int(i) - 1]), proc.stats

    plain, plain_stats = recall()
    ptr, ptr_stats = recall(pointers=True, min_pointers=1)
    assert ptr >= 5 and ptr > plain, (plain, ptr)
    assert ptr_stats["searched"] < plain_stats["searched"] == plain_stats["steps"]
    with pytest.raises(Exception, match="beam"):
        KNNLM(model, ds, tiny_tokenizer, pointers=True).generate(enc["input_ids"], num_beams=2, max_new_tokens=2)


def test_generate_with_adaptive_lambda_and_retrieve_fraction(tuned, tiny_tokenizer):
    model, ds, gate = tuned
    knn = KNNLM(model, ds, tiny_tokenizer, k=32, lam="adaptive", gate=gate, retrieve_fraction=0.5)
    enc = tiny_tokenizer(["def f(x):\n    return", "import os\n"], return_tensors="pt", padding=True)
    proc = KNNLogitsProcessor(knn)
    out = knn.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=12,
                       do_sample=False, processor=proc, pad_token_id=0)
    assert out.shape[1] == enc["input_ids"].shape[1] + 12
    assert proc.stats["steps"] == 24 and proc.stats["searched"] <= 24


def test_settings_and_eval_config_checks():
    with pytest.raises(ConfigError, match="`retrieve_fraction`"):
        KNNSettings(retrieve_fraction=0)
    with pytest.raises(ConfigError, match="`lambdas`"):
        EvalConfig(lambdas=["adaptiv"])
    with pytest.raises(ConfigError, match="`lam`"):
        KNNSettings(lam="adaptiv")
    with pytest.raises(ConfigError, match="`min_pointers`"):
        KNNSettings(min_pointers=4)
    with pytest.raises(ConfigError, match="`min_pointers`"):
        KNNSettings(pointers=True, min_pointers=0)
    with pytest.raises(ConfigError, match="`min_pointers`"):
        KNNSettings(pointers=True, k=8, min_pointers=9)
    assert EvalConfig(lambdas=["adaptive", "0.5"]).lambdas == ("adaptive", 0.5)
    s = KNNSettings(lam="0.5", retrieve_fraction=0.5)
    assert (s.lam, s.gated, s.needs_gate) == (0.5, True, True) and not KNNSettings().needs_gate
    assert s.pointer_floor(16) == 16 and KNNSettings(pointers=True, min_pointers=3).pointer_floor(16) == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.lam = 0.1


def test_header_gate_entry_is_optional_and_recorded(tuned):
    _, ds, gate = tuned
    h = json.loads((Path(ds.path) / "header.json").read_text())
    assert h["gate"]["file"] == "gate.json" and h["gate"]["datastore"] == ds.identity() == gate.identity


# ------------------------------------------------------------------------------ the command line


def _cli(capsys, *argv):
    from knnlm.cli import main

    code = main(list(map(str, argv)))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _one_line(err: str, command: str, *needles: str) -> None:
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(f"knnlm {command}: error: "), err
    for n in needles:
        assert n in err, (n, err)


def test_cli_tune_then_eval_adaptive_and_generate(capsys, tiny_model_dir, tiny_store, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(tiny_store[1].path, ds)
    # before tuning: --lambda adaptive has no gate; checked before the model loads (no such model)
    code, _, err = _cli(capsys, "eval", "--model", tmp_path / "no-model", "--datastore", ds, "--data", *EVAL,
                        "--lambda", "adaptive", "--quiet")
    assert code == 2
    _one_line(err, "eval", "--lambda", "knnlm tune")
    # tuning on datastore documents is refused, before the model loads
    code, _, err = _cli(capsys, "tune", "--model", tmp_path / "no-model", "--datastore", ds,
                        "--data", *corpus_paths(["bisect.py"]), "--quiet")
    assert code == 2
    _one_line(err, "tune", "--data", "in the datastore")
    code, out, err = _cli(capsys, "tune", "--model", tiny_model_dir, "--datastore", ds, "--data", *TUNE,
                          "--max-tokens", 1500, "--k", 32, "--quiet")
    assert code == 0, err
    assert "held-out NLL" in out and "gate written to" in out
    res_json = tmp_path / "res.json"
    code, out, err = _cli(capsys, "eval", "--model", tiny_model_dir, "--datastore", ds, "--data", *EVAL,
                          "--lambda", "adaptive,0.25", "--k", 32, "--max-tokens", 400, "--retrieve-fraction", 0.5,
                          "--output", res_json, "--quiet")
    assert code == 0, err
    assert "adaptive lambda" in out and "searched" in out
    res = json.loads(res_json.read_text())
    assert res["grid"][0]["lambda"] == "adaptive" and "histogram" in res["adaptive"]
    assert 0 < res["retrieval"]["searched_fraction"] < 1
    # eval on the tuning text is refused
    code, _, err = _cli(capsys, "eval", "--model", tiny_model_dir, "--datastore", ds, "--data", *TUNE,
                        "--lambda", "adaptive", "--quiet")
    assert code == 2
    _one_line(err, "eval", "--data", "tuned on")
    code, out, err = _cli(capsys, "generate", "--model", tiny_model_dir, "--datastore", ds, "--prompt", "import os\n",
                          "--lambda", "adaptive", "--retrieve-fraction", 0.5, "--pointers", "--max-new-tokens", 8)
    assert code == 0, err
    assert "[retrieval: searched" in out


@pytest.mark.parametrize("extra,needle", [
    (["--retrieve-fraction", "0"], "--retrieve-fraction must be in (0, 1]"),
    (["--retrieve-fraction", "1.5"], "--retrieve-fraction must be in (0, 1]"),
    (["--lambda", "adaptve"], "--lambda must be a number in [0, 1] or 'adaptive'"),
    (["--min-pointers", "4"], "--min-pointers only applies with --pointers"),
    (["--pointers", "--min-pointers", "0"], "--min-pointers must be at least 1"),
])
def test_cli_bad_adaptive_settings_fail_before_the_model(capsys, tiny_store, tmp_path, extra, needle):
    for cmd in ("eval", "generate"):
        what = ["--data", *EVAL] if cmd == "eval" else ["--prompt", "x"]
        code, _, err = _cli(capsys, cmd, "--model", tmp_path / "no-model", "--datastore", tiny_store[1].path,
                            *what, *extra)
        assert code == 2
        _one_line(err, cmd, needle)


def test_cli_tune_refuses_a_bad_unseen_bound_before_the_model(capsys, tiny_store, tmp_path):
    code, _, err = _cli(capsys, "tune", "--model", tmp_path / "no-model", "--datastore", tiny_store[1].path,
                        "--data", *TUNE, "--max-unseen-loss", "nan")
    assert code == 2
    _one_line(err, "tune", "--max-unseen-loss must be a fraction >= 0")


def _synthetic_tuning(n: int = 3000, seed: int = 0):
    """Tokens where retrieval helps (the datastore has the target and the neighbours vote for it),
    and 10 % whose target the datastore never saw (p_knn(y) = 0), which only the LM's unseen mass
    hints at (noisily)."""
    from knnlm import gate as G

    g = torch.Generator().manual_seed(seed)
    seen = torch.rand(n, generator=g) > 0.1
    lm = torch.randn(n, G.NL + 1, generator=g)
    lm[:, G.LM_FEATURES.index("lm_unseen_log_mass")] = (~seen).float() * 1.0 + torch.randn(n, generator=g)
    knn = torch.randn(n, len(G.KNN_FEATURES), generator=g)
    lp_lm = -2.0 - torch.rand(n, generator=g)
    lp_knn = torch.where(seen, -0.3 - 0.2 * torch.rand(n, generator=g), torch.full((n,), -math.inf))
    doc = torch.arange(n) % 10
    return G.TuneData(lm=lm, knn=knn, has=torch.ones(n, dtype=torch.bool), lp_lm=lp_lm, lp_knn=lp_knn, doc=doc,
                      documents=[{"name": f"d{i}", "sha256": str(i), "tokens": n // 10} for i in range(10)], seen=seen)


def test_unseen_bound_limits_what_retrieval_costs_never_seen_targets():
    data = _synthetic_tuning()
    free = fit_gate(data, "x", 16, 1.0, kind="linear", select=False, max_unseen_loss=None)
    bound = fit_gate(data, "x", 16, 1.0, kind="linear", select=False, max_unseen_loss=0.05)
    r_free, r_bound = free.report["unseen"]["ppl_ratio_tuning"], bound.report["unseen"]["ppl_ratio_tuning"]
    assert r_free > 1.2  # retrieval helps most tokens, so an unbounded gate leans on it everywhere
    assert r_bound <= 1.05 + 0.01 < r_free  # the penalty holds the bound (to its squared-hinge slack)
    assert bound.report["unseen"]["max_loss"] == 0.05 and free.report["unseen"]["max_loss"] is None
    x = data.x
    lam_b = torch.sigmoid(torch.as_tensor(bound.net["w"]) @ ((x - bound.mean) / bound.std).T + bound.net["b"])
    assert float(lam_b[data.seen].mean()) > float(lam_b[~data.seen].mean())  # still trusts retrieval where it can help
    with pytest.raises(ValueError, match="TuneData.seen"):
        fit_gate(dataclasses.replace(data, seen=None), "x", 16, 1.0, kind="linear", select=False,
                 max_unseen_loss=0.05)


# ---- the keep-unseen mixture (knnlm.scoring) ---------------------------------------------------


def _unseen_case(seed: int = 0, B: int = 5, V: int = 60, K: int = 12):
    """Logits, neighbours whose values are all 'seen' tokens, and the unseen mask (V,)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * 2
    unseen = torch.zeros(V, dtype=torch.bool)
    unseen[40:] = True
    unseen[7] = True
    seen_ids = (~unseen).nonzero().squeeze(1)
    values = seen_ids[torch.randint(0, seen_ids.numel(), (B, K), generator=g)]
    dists = torch.rand(B, K, generator=g) * 5
    dists[1, :4] = math.inf  # missing neighbours
    return logits, dists, values, unseen


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_keep_unseen_mixture_is_a_distribution_that_keeps_the_lm_on_unseen_tokens(lam):
    from knnlm.scoring import reference_knn_log_probs

    logits, dists, values, unseen = _unseen_case()
    out = reference_interpolate(logits, dists, values, lam, 1.5, unseen=unseen)  # (B, V)
    lp_lm = torch.log_softmax(logits, -1)
    torch.testing.assert_close(out.logsumexp(-1), torch.zeros(out.shape[0]), rtol=0, atol=1e-5)
    assert torch.equal(out[:, unseen], lp_lm[:, unseen])  # exactly the LM there, for every lambda
    # on the seen tokens: lam (1 - P_U) p_knn + (1 - lam) p_lm, written out in float64
    p_u = lp_lm.double().exp()[:, unseen].sum(-1, keepdim=True)
    p_knn = reference_knn_log_probs(dists, values, logits.shape[-1], 1.5).double().exp()
    ref = (lam * (1 - p_u) * p_knn + (1 - lam) * lp_lm.double().exp()).log()
    torch.testing.assert_close(out.double()[:, ~unseen], ref[:, ~unseen], rtol=1e-5, atol=1e-5)
    # nothing unseen: the standard mixture
    none = torch.zeros_like(unseen)
    torch.testing.assert_close(reference_interpolate(logits, dists, values, lam, 1.5, unseen=none),
                               reference_interpolate(logits, dists, values, lam, 1.5), rtol=1e-6, atol=1e-6)
    # the fused op does not implement it: interpolate takes the reference
    assert torch.equal(interpolate(logits, dists, values, lam, 1.5, unseen=unseen), out)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, tiny_tokenizer):
    """The tiny Llama and a datastore over keyword.py alone: most of the vocabulary never seen."""
    return build_tiny_store(tmp_path_factory.mktemp("small") / "ds", tiny_tokenizer, files=["keyword.py"])


def test_keep_unseen_eval_scores_never_seen_targets_with_the_lm(small_store, tiny_tokenizer):
    model, ds = small_store
    knn = KNNLM(model, ds, tiny_tokenizer, k=32)
    cache = LMCache()
    std = knn.evaluate(EVAL, lambdas=[0.25, 0.6], max_tokens=1500, progress=False, lm_cache=cache)
    keep = knn.evaluate(EVAL, lambdas=[0.25, 0.6], max_tokens=1500, progress=False, lm_cache=cache, keep_unseen=True)
    assert keep["keep_unseen"] is True and std["keep_unseen"] is False
    (b_std,), (b_keep,) = ([b for b in r["buckets"] if b["frequency"] == "0"] for r in (std, keep))
    assert b_keep["tokens"] > 50
    for i in range(2):  # never-seen targets: exactly the LM's perplexity, where the standard mixture loses
        assert b_keep["ppl_grid"][i] == pytest.approx(b_keep["ppl_base"], rel=1e-6)
        assert b_std["ppl_grid"][i] > b_std["ppl_base"] * 1.05
    # the full distributions (generation): a distribution, exactly the LM on the never-seen tokens
    logits, hidden = _real_rows(model, ds, tiny_tokenizer)
    full = knn.replace(keep_unseen=True).log_probs(logits, hidden)
    unseen = torch.from_numpy(ds.token_counts()) == 0
    torch.testing.assert_close(full.logsumexp(-1), torch.zeros(full.shape[0]), rtol=0, atol=1e-5)
    assert torch.equal(full[:, unseen], torch.log_softmax(logits.float(), -1)[:, unseen])


def test_keep_unseen_gate_is_recorded_followed_and_not_mixed_up(small_store, tuned, tiny_tokenizer, tmp_path):
    model, ds = small_store
    data = collect_tuning(KNNLM(model, ds, tiny_tokenizer, k=32), TUNE, EvalConfig(max_tokens=2000, progress=False))
    kept = fit_gate(data, ds.identity(), 32, 1.0, kind="linear", select=False, keep_unseen=True)
    assert kept.keep_unseen and kept.report["unseen"]["ppl_ratio_tuning"] == 1.0
    from knnlm.gate import save_gate

    path = tmp_path / "keep.json"
    save_gate(kept, ds, path)
    assert load_gate(ds, path).keep_unseen is True
    knn = KNNLM(model, ds, tiny_tokenizer, k=32, lam="adaptive", gate=str(path))
    assert knn.keeps_unseen  # follows the gate
    res = knn.evaluate(EVAL, max_tokens=800, progress=False)
    assert res["keep_unseen"] is True
    (never,) = [b for b in res["buckets"] if b["frequency"] == "0"]
    assert never["tokens"] > 0 and never["ppl_grid"][0] == pytest.approx(never["ppl_base"], rel=1e-6)
    with pytest.raises(ConfigError, match="keep_unseen"):  # a gate is fitted for one mixture
        KNNLM(model, ds, tiny_tokenizer, k=32, lam="adaptive", gate=str(path), keep_unseen=False)
    t_model, t_ds, t_gate = tuned
    assert t_gate.keep_unseen is False
    with pytest.raises(ConfigError, match="keep_unseen"):
        KNNLM(t_model, t_ds, tiny_tokenizer, k=32, lam="adaptive", keep_unseen=True)
    with pytest.raises(ConfigError, match="max_unseen_loss.*keep_unseen"):
        fit_gate(data, ds.identity(), 32, 1.0, kind="linear", select=False, keep_unseen=True, max_unseen_loss=0.05)
    # generation follows the gate too (the full keep-unseen distribution at every step)
    prompt = tiny_tokenizer(Path(EVAL[0]).read_text()[:300], return_tensors="pt")["input_ids"]
    out = knn.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape[1] == prompt.shape[1] + 6


def test_cli_keep_unseen(capsys, tiny_model_dir, small_store, tmp_path):
    _, shared = small_store
    ds = tmp_path / "ds"
    shutil.copytree(shared.path, ds)
    code, _, err = _cli(capsys, "tune", "--model", tiny_model_dir, "--datastore", ds, "--data", TUNE[0],
                        "--max-tokens", 1500, "--k", 32, "--keep-unseen", "--max-unseen-loss", 0.05, "--quiet")
    assert code == 2
    _one_line(err, "tune", "--max-unseen-loss", "--keep-unseen")
    code, _, err = _cli(capsys, "tune", "--model", tiny_model_dir, "--datastore", ds, "--data", TUNE[0],
                        "--max-tokens", 1500, "--k", 32, "--keep-unseen", "--quiet")
    assert code == 0, err
    out = tmp_path / "res.json"
    code, _, err = _cli(capsys, "eval", "--model", tiny_model_dir, "--datastore", ds, "--data", EVAL[0],
                        "--max-tokens", 600, "--lambda", "adaptive,0.25", "--quiet", "--output", out)
    assert code == 0, err
    res = json.loads(out.read_text())
    assert res["keep_unseen"] is True
    (never,) = [b for b in res["buckets"] if b["frequency"] == "0"]
    assert never["ppl_grid"] == pytest.approx([never["ppl_base"]] * 2, rel=1e-6)
