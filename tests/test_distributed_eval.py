"""Data-parallel eval and tune under torchrun (2 gloo ranks on CPU): the same perplexities,
buckets and gate file as one process; a rank that fails stops the job with one error line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from knnlm.testing import corpus_paths

REPO = Path(__file__).resolve().parent.parent
HELD_OUT = ["heapq.py", "textwrap.py", "glob.py"]  # not in the datastore's corpus (knnlm.testing.CORPUS_FILES)
# One intra-op thread everywhere, as torchrun gives each rank: a float's last bit can depend on it.
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))  # this checkout


def _knnlm(args: list[str], nproc: int = 1, script: list[str] | None = None) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd = [*(launch if nproc > 1 else [sys.executable]), *(script or ["-m", "knnlm"]), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=ENV)


def _ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir):
    """A small flat datastore (one process) and the model it was built with."""
    out = tmp_path_factory.mktemp("dp") / "ds"
    _ok(_knnlm(["build-index", "--model", str(tiny_model_dir), "--data", *corpus_paths(), "--out", str(out),
                "--index", "flat", "--context", "32", "--batch-size", "4", "--quiet"]))
    return out


def _eval_args(model_dir, ds, out, *more) -> list[str]:
    return ["eval", "--model", str(model_dir), "--datastore", str(ds), "--data", *corpus_paths(HELD_OUT),
            "--max-tokens", "3000", "--lambda", "0.25,0.5", "--k", "16,4", "--knn-temperature", "1,2",
            "--batch-size", "2", "--output", str(out), "--quiet", *more]


def test_two_ranks_evaluate_like_one_process(store, tiny_model_dir, tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    _ok(_knnlm(_eval_args(tiny_model_dir, store, one)))
    res = _ok(_knnlm(_eval_args(tiny_model_dir, store, two), nproc=2))
    assert res.stdout.count("perplexity  base LM") == 1, "only rank 0 prints"
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["tokens"] == b["tokens"] > 2000
    assert b["ppl_base"] == pytest.approx(a["ppl_base"], rel=1e-6)
    assert len(a["grid"]) == len(b["grid"]) == 8
    for x, y in zip(a["grid"], b["grid"]):
        assert (x["lambda"], x["temperature"], x["k"]) == (y["lambda"], y["temperature"], y["k"])
        assert y["ppl"] == pytest.approx(x["ppl"], rel=1e-6)
    assert [x["tokens"] for x in a["buckets"]] == [y["tokens"] for y in b["buckets"]]
    for x, y in zip(a["buckets"], b["buckets"]):
        assert y["ppl_base"] == pytest.approx(x["ppl_base"], rel=1e-6)
        assert y["ppl_grid"] == pytest.approx(x["ppl_grid"], rel=1e-6)
    t = b["timing"]
    assert t["world_size"] == 2 and [r["rank"] for r in t["ranks"]] == [0, 1]
    assert sum(r["tokens"] for r in t["ranks"]) == b["tokens"]
    assert all(r["tokens"] > 0.3 * b["tokens"] for r in t["ranks"]), "balanced by tokens"
    assert all(r["tokens_per_second"] > 0 for r in t["ranks"]) and t["tokens_per_second"] > 0
    assert "ranks" not in a["timing"]


def test_two_ranks_tune_the_same_gate_file_as_one_process(store, tiny_model_dir, tmp_path):
    """On separate tuning text and self-tuned (the datastore's own documents)."""
    for name, data in (("text", ["--data", *corpus_paths(HELD_OUT), "--max-tokens", "1500"]),
                       ("self", ["--max-tokens", "800"])):
        one, two = tmp_path / f"{name}1.json", tmp_path / f"{name}2.json"
        args = ["tune", "--model", str(tiny_model_dir), "--datastore", str(store), *data, "--k", "8",
                "--kind", "linear", "--batch-size", "2", "--quiet"]
        _ok(_knnlm([*args, "--out", str(one)]))
        res = _ok(_knnlm([*args, "--out", str(two)], nproc=2))
        assert res.stdout.count("gate written to") == 1, "only rank 0 fits and writes"
        assert one.read_bytes() == two.read_bytes(), name


def test_a_rank_that_fails_stops_the_job_with_one_error_line(store, tiny_model_dir, tmp_path):
    """Rank 1 fails in the middle of its share (an injected KnnlmError): both ranks stop, the job
    exits non-zero, and the error is printed once."""
    wrapper = tmp_path / "fail_rank1.py"
    wrapper.write_text(
        "import os, sys\n"
        "from knnlm import evaluation\n"
        "from knnlm.cli import main\n"
        "from knnlm.errors import CorpusError\n"
        "if os.environ['RANK'] == '1':\n"
        "    def boom(*a, **k):\n"
        "        raise CorpusError('`data` holds a broken document (injected on rank 1)', param='data')\n"
        "    evaluation._score_knn = boom\n"
        "sys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "res.json"
    res = _knnlm(_eval_args(tiny_model_dir, store, out), nproc=2, script=[str(wrapper)])
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if "knnlm eval: error:" in ln]
    assert len(lines) == 1, res.stderr[-4000:]
    assert lines[0].endswith("knnlm eval: error: --data holds a broken document (injected on rank 1)")
    assert not out.exists()
