"""The standard-setting memorization pipeline (``python -m experiments.memorization.standard``)
in --tiny mode: every stage end to end, an interrupted training resumed to the same bytes, the
settings lock, and the parameter-multiple formula on numbers whose answer is known.

``experiments`` is imported from the repository root (``python -m pytest`` puts it on the path)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from experiments.memorization import standard
from experiments.memorization.multiples import multiples
from experiments.memorization.standard_report import render_markdown
from experiments.train_family import TrainingInterrupted


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    w = tmp_path_factory.mktemp("std")
    assert standard.main(["--workdir", str(w), "--tiny"]) == 0
    return w


def test_every_stage_runs_and_the_summary_is_generated(full_run, capsys):
    w = full_run
    assert standard.main(["--workdir", str(w), "--tiny", "--plan"]) == 0
    stages = [line.split() for line in capsys.readouterr().out.splitlines() if line[:4].strip().isdigit()]
    names = [s[1] for s in stages]
    assert names[:3] == ["text", "train:smoke-a-s0", "eval:smoke-a-s0"] and names[-1] == "summary"
    assert "ref:smoke-ref" in names and "more:smoke-c-s0" in names and "more:smoke-a-s1" not in names
    assert all(s[2] == "done" for s in stages), stages
    summary = json.loads((w / "results" / "summary.json").read_text())
    fam = [m for m in summary["models"] if m["kind"] == "family"]
    assert [m["name"] for m in fam] == ["smoke-a-s0", "smoke-a-s1", "smoke-b-s0", "smoke-c-s0"]
    for m in fam:
        meta = m["meta"]
        assert meta["datastore_is_training_text"] is True
        assert meta["datastore_tokens"] == meta["training_text_tokens"] == summary["text"]["training_text"][
            "family_tokens"]
        assert meta["epochs"] == 1 and meta["tokens_trained"] >= meta["datastore_tokens"]
        assert m["control"]["skipped_not_prefix"] == 0 and m["control"]["answer_tokens"] > 0
        assert m["overlap"]["train"]["control"]["shared"] == 0  # computed lines are in no datastore
        assert m["overlap"]["domain"]["domain_eval"]["ngrams"] > 0
        for task in ("in_domain_ppl", "domain_adaptation"):
            assert m[task]["bpb_base"] > 0 and m[task]["bpb_knn"] > 0
    assert [m["name"] for m in fam if m["more_data"]] == ["smoke-a-s0", "smoke-b-s0", "smoke-c-s0"]
    more = fam[0]["more_data"]
    assert more["datastore"]["tokens"] > fam[0]["meta"]["datastore_tokens"]  # more text than trained on
    for key in ("in_domain", "more_data", "new_domain", "control"):
        rows = summary["multiples"][key]["rows"]
        assert [r["size"] for r in rows] == ["smoke-a", "smoke-b", "smoke-c"], key
        assert all(r["multiple"] is None or r["multiple"] > 0 for r in rows)
    assert summary["multiples"]["in_domain"]["rows"][0]["seeds"] == [0, 1]
    ov = fam[0]["overlap"]["train"]["stdlib_test"]
    assert len(ov["per_document_fraction"]) == ov["documents"] == summary["text"]["eval"]["documents"]
    low = summary["multiples"]["in_domain_low_overlap"]  # documents not mostly in the training text
    assert low["documents"] == [i for i, f in enumerate(ov["per_document_fraction"]) if f <= 0.5]
    md = (w / "results" / "summary.md").read_text()
    assert md == render_markdown(summary)  # the tables are generated from the JSON
    for name in summary["plots"]:
        assert (w / "results" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _copy_text_stage(src, dst):
    """A second workdir that has done the (deterministic) text stage: the same texts and tokenizer."""
    dst.mkdir()
    shutil.copy(src / "settings.json", dst / "settings.json")
    shutil.copytree(src / "text", dst / "text")
    for d in ("tokenizer", "data"):
        shutil.copytree(src / "family" / d, dst / "family" / d)


def test_interrupted_training_resumes_to_the_same_model(full_run, tmp_path):
    """A training killed after step 5 (last checkpoint: step 4) and rerun with the same command
    ends with the same weights, losses and eval numbers as the uninterrupted run."""
    from safetensors.numpy import load_file

    a, b = full_run, tmp_path / "b"
    _copy_text_stage(a, b)
    argv = ["--workdir", str(b), "--tiny", "--stage", "train:smoke-b-s0"]
    with pytest.raises(TrainingInterrupted):
        standard.main(argv, interrupt=("smoke-b-s0", 5))
    mdir = b / "family" / "smoke-b-s0"
    assert (mdir / "resume.pt").exists() and not (mdir / "training.json").exists()
    assert standard.main(argv + ["--stage", "eval:smoke-b-s0"]) == 0
    assert not (mdir / "resume.pt").exists()
    wa, wb = load_file(a / "family" / "smoke-b-s0" / "model.safetensors"), load_file(mdir / "model.safetensors")
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    ta, tb = (json.loads((d / "family" / "smoke-b-s0" / "training.json").read_text()) for d in (a, b))
    assert [p["loss"] for p in ta["curve"]] == [p["loss"] for p in tb["curve"]]
    ra, rb = (json.loads((d / "results" / "smoke-b-s0" / "in_domain_ppl.json").read_text()) for d in (a, b))
    assert (ra["ppl_base"], ra["ppl_knn"], ra["per_document"]) == (rb["ppl_base"], rb["ppl_knn"], rb["per_document"])


def test_rerun_recomputes_nothing_and_other_settings_are_refused(full_run):
    w = full_run
    before = {p: p.stat().st_mtime_ns for p in (w / "results").glob("*/*.json")}
    assert standard.main(["--workdir", str(w), "--tiny"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (w / "results").glob("*/*.json")} == before
    with pytest.raises(SystemExit, match="epochs: 1 in settings.json, 2 asked"):
        standard.main(["--workdir", str(w), "--tiny", "--epochs", "2"])
    settings = standard.resolve_settings(w, True, {"gemma_max_tokens": 1000})  # Gemma not started: allowed
    assert settings.gemma_max_tokens == 1000
    assert json.loads((w / "settings.json").read_text())["gemma_max_tokens"] == 1000


def test_parameter_multiple_of_a_known_curve():
    """No-datastore metric = 5 - 0.5 ln p exactly; each kNN-LM equals the base of a model twice its
    size: the multiple is 2 at every size, and the bootstrap interval holds 2."""
    rng = np.random.default_rng(0)
    runs = []
    for params in (1e5, 4e5, 1.6e6):
        for seed in (0, 1):
            den = rng.integers(50, 150, 20).astype(float)
            noise = rng.normal(0, 0.01, 20)
            base = (5 - 0.5 * math.log(params) + noise) * den
            knn = (5 - 0.5 * math.log(2 * params) + noise) * den
            runs.append({"size": f"{params:g}", "params": params, "seed": seed, "base": base.sum() / den.sum(),
                         "knn": knn.sum() / den.sum(), "units": {"base": base, "knn": knn, "den": den}})
    res = multiples(runs, n_boot=200)
    assert res["resampled"] == "units and seeds"
    # model-free readout: 1e5's kNN-LM (= a 2e5 model) is first matched by the 4e5 model without a
    # datastore; the largest size's kNN-LM beats every measured size; the curve is best at its largest
    assert [r["matched_by"] for r in res["rows"]] == ["400000", "1.6e+06", None]
    assert (res["fit"]["best_size"], res["fit"]["largest_size"]) == ("1.6e+06", "1.6e+06")
    assert res["fit"]["b"] == pytest.approx(-0.5, abs=0.02)
    for row in res["rows"]:
        assert row["multiple"] == pytest.approx(2.0, rel=0.05)
        assert row["multiple_ci"][0] <= 2.0 <= row["multiple_ci"][1]
        assert row["seeds"] == [0, 1]
    up = multiples([{**r, "base": -r["base"], "knn": -r["knn"], "units": None} for r in runs],
                   lower_is_better=False, n_boot=50)
    assert [r["multiple"] for r in up["rows"]] == pytest.approx([2.0] * 3, rel=0.05)
    assert up["resampled"] == "seeds"
