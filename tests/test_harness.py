"""The lm-evaluation-harness model ``knnlm`` (``knnlm/harness.py``) on local tasks, no hub access.

A tiny random Llama with a ``<bos>``-adding tokenizer is saved to disk, a flat datastore over four
small stdlib modules (``knnlm.testing.CORPUS_FILES``) is built with it (64-token windows), and two
task YAMLs read local jsonl files: a rolling-loglikelihood task (word / byte perplexity, bits per
byte) over excerpts of those modules and a multiple-choice task. lm-eval's index of its built-in
tasks and its environment report are skipped (``_fast_lm_eval``): seconds per run, never read here.

* At ``lambda=0`` multiple choice equals lm-eval's own ``hf`` model on the same saved model, choice
  by choice (1e-4 relative). Rolling loglikelihood is compared where the two are the same quantity:
  for a document shorter than one window, ``knnlm``'s rolling score is log p(document | <bos>),
  which ``hf`` computes as ``loglikelihood("", document)``. (``hf``'s own rolling windows prefix
  another <bos> to the tokenizer's and use the model's full length, so its rolling numbers are a
  different quantity; ``knnlm``'s follow ``knnlm eval``, checked against ``knnlm.evaluate``.)
* At the default lambda, with the datastore over the text the documents are taken from, the
  perplexities are lower, and the harness's metrics equal ``knnlm.evaluate``'s perplexity converted
  through the total negative log-likelihood.
"""

from __future__ import annotations

import ast
import json
import math
import re
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install -e '.[harness]'")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import knnlm  # noqa: E402
from knnlm.testing import corpus_paths, make_tiny_tokenizer, save_tiny_model  # noqa: E402

REL = 1e-4


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Saved tiny model, a datastore built with it, local task YAMLs over local jsonl files."""
    root = tmp_path_factory.mktemp("harness")
    tok = make_tiny_tokenizer(add_bos=True)
    model_dir = save_tiny_model(root / "model", tok)
    model, tok = knnlm.load_model(str(model_dir), device="cpu")
    ds = knnlm.build_datastore(model, tok, corpus_paths(), root / "ds",
                               knnlm.BuildConfig(context=64, index="flat", progress=False))
    texts = [Path(p).read_text() for p in corpus_paths()]
    long_docs = [t[300:900] for t in texts[:3]]  # several 64-token windows each, from the datastore's files
    short_docs = [t[:70] for t in texts[:3]]  # within one window
    mc = [{"q": "def insort_left(a, x, lo=0, hi=None):\n    ", "choices": ["if lo < 0:", "return None", "x = 1"],
           "label": 0},
          {"q": "import", "choices": [" sys", " os", " re"], "label": 1},
          {"q": "def hls_to_rgb(h, l, s):\n", "choices": ["    if s == 0.0:", "    pass"], "label": 0}]
    docs = [{"name": f"doc{i}", "text": t} for i, t in enumerate(long_docs)]
    data = {"long": _write_jsonl(root / "long.jsonl", docs), "mc": _write_jsonl(root / "mc.jsonl", mc)}
    tasks = root / "tasks"
    tasks.mkdir()
    cache = root / "hf-datasets"
    (tasks / "tiny_rolling.yaml").write_text(f"""task: tiny_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data["long"]}
  cache_dir: {cache}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")
    (tasks / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data["mc"]}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: q
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return {"root": root, "model_dir": str(model_dir), "ds": ds, "tok": tok, "model": model, "tasks": str(tasks),
            "long": long_docs, "short": short_docs, "tm": LocalTasks(include_path=str(tasks))}


class LocalTasks(TaskManager):
    """lm-eval's task index without its built-in tasks: indexing their thousands of YAML files
    takes 5-25 s per ``TaskManager`` here, and the tests use only their own local tasks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, include_defaults=False, **kwargs)


@pytest.fixture(autouse=True)
def _fast_lm_eval(monkeypatch):
    """Skip what the tests do not read: the environment report in lm-eval's results (``pip list``
    and more in subprocesses, seconds per run) and the index of built-in tasks (the CLI's too)."""
    monkeypatch.setattr("lm_eval.evaluator.add_env_info", lambda *a, **k: None)
    monkeypatch.setattr("lm_eval.tasks.TaskManager", LocalTasks)


def _knnlm(env, **args):
    from knnlm.harness import KNNLMHarness

    return KNNLMHarness(pretrained=env["model_dir"], datastore=str(env["ds"].path), device="cpu", batch_size=4,
                        **args)


@pytest.fixture(scope="module")
def hf(env):
    return get_model("hf")(pretrained=env["model_dir"], dtype="float32", device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def knn0(env):
    return _knnlm(env, **{"lambda": 0})


def _run(env, lm, tasks):
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=env["tm"], log_samples=True,
                                   bootstrap_iters=0, verbosity="WARNING")


def _choice_lls(res, task="tiny_mc") -> list[float]:
    return [r[0][0] for s in sorted(res["samples"][task], key=lambda s: s["doc_id"]) for r in s["resps"]]


def _rolling(lm, docs) -> list[float]:
    return lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)],
                                    disable_tqdm=True)


def test_multiple_choice_at_lambda_zero_equals_lm_eval_hf(env, hf, knn0):
    ours, theirs = _run(env, knn0, ["tiny_mc"]), _run(env, hf, ["tiny_mc"])
    assert _choice_lls(ours) == pytest.approx(_choice_lls(theirs), rel=REL)
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["tiny_mc"][metric] == theirs["results"]["tiny_mc"][metric]


def test_rolling_at_lambda_zero_equals_hf_where_defined(env, hf, knn0):
    """A document within one window: log p(document | <bos>), which hf computes with an empty context."""
    for d in env["short"]:
        assert len(env["tok"](d)["input_ids"]) <= knn0.context
    theirs = [ll for ll, _ in hf.loglikelihood([Instance("loglikelihood", {}, ("", d), i)
                                                for i, d in enumerate(env["short"])], disable_tqdm=True)]
    assert _rolling(knn0, env["short"]) == pytest.approx(theirs, rel=REL)


def test_loglikelihood_is_greedy_matches_hf(env, hf, knn0):
    reqs = [Instance("loglikelihood", {}, ("def insort(a, x):\n", "    "), 0),
            Instance("loglikelihood", {}, ("import", " os"), 1),
            Instance("loglikelihood", {}, ("", "def f(x):\n    return x\n"), 2)]
    ours, theirs = knn0.loglikelihood(reqs, disable_tqdm=True), hf.loglikelihood(reqs, disable_tqdm=True)
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in theirs], rel=REL)
    assert [g for _, g in ours] == [g for _, g in theirs]


def _total_nll(result: dict, docs: list[str]) -> dict[str, float]:
    """The total negative log-likelihood each rolling metric implies (lm-eval's word / byte counts)."""
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    r = result["results"]["tiny_rolling"]
    return {"word_perplexity": math.log(r["word_perplexity,none"]) * words,
            "byte_perplexity": math.log(r["byte_perplexity,none"]) * nbytes,
            "bits_per_byte": r["bits_per_byte,none"] * math.log(2) * nbytes}


def test_rolling_cli_matches_knnlm_evaluate_and_retrieval_helps(env, knn0, tmp_path, capsys):
    """`python -m knnlm.harness` (lm-eval's CLI, the model found by name) at the default lambda:
    the rolling metrics are knnlm.evaluate's perplexity on the same documents, and lower than at
    lambda 0 with the same windows."""
    from knnlm.harness import main

    rc = main(["--model", "knnlm", "--model_args", f"pretrained={env['model_dir']},datastore={env['ds'].path}",
               "--tasks", "tiny_rolling", "--include_path", env["tasks"], "--device", "cpu", "--batch_size", "4",
               "--output_path", str(tmp_path / "out")])
    assert rc == 0, capsys.readouterr().err[-2000:]
    res = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert res["config"]["model"] == "knnlm"
    res0 = _run(env, knn0, ["tiny_rolling"])

    ref = knnlm.evaluate(env["model"], env["tok"], env["ds"], texts=env["long"],
                         cfg=knnlm.EvalConfig(progress=False))
    assert ref["window"]["context"] == 64 and ref["window"]["bos"] == env["tok"].bos_token_id
    for nll_knn, nll_base in zip(_total_nll(res, env["long"]).values(), _total_nll(res0, env["long"]).values()):
        assert nll_knn == pytest.approx(math.log(ref["ppl_knn"]) * ref["tokens"], rel=REL)
        assert nll_base == pytest.approx(math.log(ref["ppl_base"]) * ref["tokens"], rel=REL)
        assert nll_knn < 0.9 * nll_base  # retrieval over the documents' source text helps
    r, r0 = res["results"]["tiny_rolling"], res0["results"]["tiny_rolling"]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert r[metric] < r0[metric]


def test_generate_until_honours_stop_sequences(env):
    lm = _knnlm(env, **{"lambda": 0.5})
    prompt = "def insort_right(a, x, lo=0, hi=None):\n"

    def gen(**kw):
        return lm.generate_until([Instance("generate_until", {}, (prompt, kw), 0)], disable_tqdm=True)[0]

    free = gen(until=[], max_gen_toks=24)
    ids = env["tok"](prompt, return_tensors="pt")
    direct = lm.knn.generate(**ids, max_new_tokens=24, do_sample=False)
    assert free == env["tok"].decode(direct[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(free) > 4
    stop = free[len(free) // 2: len(free) // 2 + 2]
    cut = free[: free.index(stop)]
    assert gen(until=[stop], max_gen_toks=24) == cut
    assert len(gen(until=[], max_gen_toks=3)) <= len(free)  # max_gen_toks caps the new tokens


def test_bad_model_args_are_one_line_errors_naming_the_arg(env, capsys):
    from knnlm.harness import KNNLMHarness, main

    ds = str(env["ds"].path)
    for args, name in [({"lambda": 2}, "lambda"), ({"lambda": "often"}, "lambda"), ({"k": "many"}, "k"),
                       ({"k": 0}, "k"), ({"temperature": 0}, "temperature"), ({"batch_size": 0}, "batch_size"),
                       ({"nprobe": 0}, "nprobe"), ({"colour": "red"}, "colour"), ({"stride": 64}, "stride"),
                       ({"device": "tpu"}, "device")]:
        with pytest.raises(knnlm.KnnlmError, match=f"`{name}`"):
            KNNLMHarness(pretrained=env["model_dir"], datastore=ds, **args)
    with pytest.raises(knnlm.KnnlmError, match="`pretrained`"):
        KNNLMHarness(pretrained=str(env["root"] / "no-such-model"))
    with pytest.raises(knnlm.KnnlmError, match="datastore"):
        KNNLMHarness(pretrained=env["model_dir"], datastore=str(env["root"] / "no-such-ds"))
    capsys.readouterr()
    rc = main(["--model", "knnlm", "--model_args", f"pretrained={env['model_dir']},datastore={ds},lambda=1.5",
               "--tasks", "tiny_rolling", "--include_path", env["tasks"], "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("knnlm.harness: error: `lambda` must be in [0, 1]")


def test_lambda_adaptive_is_handed_to_knnlm(env, monkeypatch):
    """``lambda=adaptive`` reaches ``KNNLM`` as the settings' λ (the hook for adaptive mixing); a
    datastore without a gate refuses in one line naming `lambda`."""
    import knnlm.harness as harness

    try:
        harness.KNNLMHarness(pretrained=env["model_dir"], datastore=str(env["ds"].path), **{"lambda": "adaptive"})
    except knnlm.KnnlmError as e:
        assert "`lambda`" in str(e) and "\n" not in str(e)
    seen = {}

    class Recorder(knnlm.KNNLM):
        def __init__(self, model, ds, tok, settings, **kwargs):
            seen["lam"] = settings.lam
            super().__init__(model, ds, tok, settings, lam=0.25, **kwargs)

    monkeypatch.setattr(harness, "KNNLM", Recorder)
    harness.KNNLMHarness(pretrained=env["model_dir"], datastore=str(env["ds"].path), **{"lambda": "Adaptive"})
    assert seen["lam"] == "adaptive"


def test_registered_by_name_and_lm_eval_stays_lazy():
    import knnlm.harness

    assert get_model("knnlm") is knnlm.harness.KNNLMHarness
    knnlm.harness.register()  # idempotent
    assert issubclass(knnlm.harness.KNNLMHarness, lm_eval.api.model.LM)
    # `import knnlm` (and every module but knnlm.harness) never imports lm_eval; nothing imports knnlm.harness
    pkg = Path(knnlm.__file__).parent
    for path in pkg.glob("*.py"):
        if path.stem == "harness":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "lm_eval" or n.startswith("knnlm.harness") for n in names), path.name


def _example(name: str):
    """A script of examples/harness/ as a module."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "examples" / "harness" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"harness_example_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_example_task_and_compare_agree_with_knnlm_eval(env, tmp_path, monkeypatch, capsys):
    """The README's recipe on the tiny model: make_jsonl.py writes the documents `knnlm eval` reads
    (same names, same text), the committed stdlib_test.yaml runs on them from the working directory,
    and compare.py finds the same total NLL as `knnlm eval` (here the documents are also in the
    datastore: both exclude their own keys the same way)."""
    from knnlm.data import iter_documents, resolve_sources
    from knnlm.harness import main

    paths = corpus_paths()[:2]
    monkeypatch.chdir(tmp_path)
    assert _example("make_jsonl").main([*paths, "--out", "runs/harness/stdlib_test.jsonl"]) == 0
    rows = [json.loads(line) for line in Path("runs/harness/stdlib_test.jsonl").read_text().splitlines()]
    assert [(r["name"], r["text"]) for r in rows] == [(d.name, d.text) for d in iter_documents(resolve_sources(paths))]

    examples = Path(__file__).resolve().parent.parent / "examples" / "harness"
    assert main(["--model", "knnlm", "--model_args", f"pretrained={env['model_dir']},datastore={env['ds'].path}",
                 "--tasks", "stdlib_test", "--include_path", str(examples), "--device", "cpu", "--batch_size", "8",
                 "--output_path", "out"]) == 0
    ev = knnlm.evaluate(env["model"], env["tok"], env["ds"], data=paths, cfg=knnlm.EvalConfig(progress=False))
    assert ev["overlap"]["documents"] == 2
    Path("eval.json").write_text(json.dumps(ev))
    capsys.readouterr()
    assert _example("compare").main(["--data", "runs/harness/stdlib_test.jsonl", "--knnlm", "eval.json",
                                     "--harness", "out"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "NLL relative difference" in x)
    assert line.startswith("harness, kNN-LM vs knnlm eval, kNN-LM")
    assert abs(float(line.rsplit(" ", 1)[1])) < REL
