"""``python -m experiments.adaptive`` end to end on the tiny model and datastore: tune on the
stdlib tuning split, score every variant from one LM pass, write the JSON the README's table
comes from."""

import json
import math
import shutil

from experiments import adaptive
from knnlm import KNNLM, load_model
from knnlm.corpora import stdlib_files
from knnlm.datastore import open_datastore
from knnlm.gate import load_gate


def test_experiment_tunes_then_scores_every_variant_from_one_lm_pass(tiny_model_dir, tiny_store, tmp_path, capsys):
    ds_path = tmp_path / "ds"
    shutil.copytree(tiny_store[1].path, ds_path)
    out = tmp_path / "adaptive.json"
    code = adaptive.main(["--datastore", str(ds_path), "--model", str(tiny_model_dir), "--tune-tokens", "1500",
                          "--eval-tokens", "600", "--retrieve-fractions", "0.5", "--min-pointers", "16",
                          "--max-unseen-loss", "none,0.05,keep", "--out", str(out)])
    assert code == 0
    res = json.loads(out.read_text())
    variants = [(r["variant"], r["lambda"]) for r in res["rows"]]
    assert variants == [("full search", 0.25), ("full search", "adaptive"),
                        ("retrieve fraction 0.5", "adaptive"), ("retrieve fraction 0.5", 0.25),
                        ("full search, gate bound 0.05", "adaptive"),
                        ("retrieve fraction 0.5, gate bound 0.05", "adaptive"),
                        ("full search, keep unseen", "adaptive"), ("full search, keep unseen", 0.25),
                        ("retrieve fraction 0.5, keep unseen", "adaptive"),
                        ("pointers (min 16)", 0.25), ("pointers (min 16)", "adaptive")]
    # one LM pass serves every variant: the same tokens and base perplexity everywhere
    assert len({r["ppl_base"] for r in res["rows"]}) == 1
    assert len({run["tokens"] for run in res["runs"].values()}) == 1
    assert all(math.isfinite(r["ppl"]) and r["ppl"] > 1 for r in res["rows"])
    by = {(r["variant"], r["lambda"]): r for r in res["rows"]}
    assert by[("full search", 0.25)]["searched_fraction"] == 1.0
    assert 0 < by[("retrieve fraction 0.5", "adaptive")]["searched_fraction"] < 1
    assert 0 < by[("pointers (min 16)", 0.25)]["pointer_fraction"] <= 1
    # the fixed-λ row is what a plain KNNLM.evaluate of the same tokens gives (the shared cache changes nothing)
    model, tok = load_model(str(tiny_model_dir))
    direct = KNNLM(model, open_datastore(ds_path), tok).evaluate(stdlib_files("test"), lambdas=[0.25],
                                                                 max_tokens=600, progress=False)
    assert math.isclose(direct["ppl_knn"], by[("full search", 0.25)]["ppl"], rel_tol=1e-6)
    assert math.isclose(direct["ppl_base"], by[("full search", 0.25)]["ppl_base"], rel_tol=1e-6)
    assert direct["tokens"] == res["runs"]["full search"]["tokens"]
    # the first gate is saved into the datastore, the bounded one next to --out; both load for it
    ds = open_datastore(ds_path)
    saved = load_gate(ds)
    assert saved.to_json() == res["gate"] and saved.report["unseen"]["max_loss"] is None
    bounded = load_gate(ds, out.with_suffix(".gate_unseen0.05.json"))
    assert bounded.report["unseen"]["max_loss"] == 0.05 and bounded.to_json() == res["extra_gates"]["0.05"]
    kept = load_gate(ds, out.with_suffix(".gate_unseenkeep.json"))  # fitted for the keep-unseen mixture
    assert kept.keep_unseen and not saved.keep_unseen and kept.to_json() == res["extra_gates"]["keep"]
    for name in ("full search, keep unseen", "retrieve fraction 0.5, keep unseen"):
        assert res["runs"][name]["keep_unseen"] is True
    for lam in ("adaptive", 0.25):  # never-seen targets keep the LM's perplexity
        never = by[("full search, keep unseen", lam)]["never_seen"]
        assert never is None or math.isclose(never["ppl"], never["ppl_base"], rel_tol=1e-6)
    assert "| full search | adaptive |" in capsys.readouterr().out


def test_a_rerun_reuses_the_saved_gates_only_when_every_bound_has_one(tiny_model_dir, tiny_store, tmp_path, capsys):
    ds_path = tmp_path / "ds"
    shutil.copytree(tiny_store[1].path, ds_path)
    out = tmp_path / "adaptive.json"

    def run(bounds):
        assert adaptive.main(["--datastore", str(ds_path), "--model", str(tiny_model_dir), "--tune-tokens", "800",
                              "--eval-tokens", "200", "--retrieve-fractions", "0.5", "--min-pointers", "",
                              "--max-unseen-loss", bounds, "--out", str(out)]) == 0
        return json.loads(out.read_text()), capsys.readouterr().err

    first, log = run("none,0.05")
    assert "tuning on" in log and "reusing" not in log
    again, log = run("none,0.05")  # as after an interruption: both gates come back, no tuning pass
    assert "reusing the gates" in log and "tuning on" not in log
    assert again["gate"] == first["gate"] and again["extra_gates"] == first["extra_gates"]
    assert again["rows"] == [{**r, "tokens_per_second": a["tokens_per_second"], "knn_seconds": a["knn_seconds"],
                              "lm_tokens_per_second": a["lm_tokens_per_second"]}
                             for r, a in zip(first["rows"], again["rows"])]
    _, log = run("none,0.1")  # a bound without a saved gate: tune again rather than drop or mislabel it
    assert "tuning on" in log and "reusing" not in log
    refit = load_gate(open_datastore(ds_path), out.with_suffix(".gate_unseen0.1.json"))
    assert refit.report["unseen"]["max_loss"] == 0.1

