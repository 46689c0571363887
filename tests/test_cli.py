import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest

from knnlm import DatastoreError, open_datastore
from knnlm.cli import main


def _run(capsys, *argv):
    code = main(list(map(str, argv)))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _assert_one_line_error(err: str, command: str, *names: str) -> None:
    """stderr is exactly one line, ``knnlm COMMAND: error: ...``, and it names the problem: each of
    ``names`` is a substring, or a regex when it starts with ``re:``."""
    assert err.endswith("\n") and err.count("\n") == 1, err
    line = err.rstrip("\n")
    assert line.startswith(f"knnlm {command}: error: "), err
    for name in names:
        if name.startswith("re:"):
            assert re.search(name[3:], line), (name, line)
        else:
            assert name in line, (name, line)


def _assert_no_valid_datastore(path):
    if path.exists():
        with pytest.raises(DatastoreError):
            open_datastore(path)


def test_build_and_info(capsys, tiny_model_dir, corpus_dir, tmp_path):
    out = tmp_path / "ds"
    code, stdout, err = _run(capsys, "build-index", "--model", tiny_model_dir, "--data", corpus_dir, "--out", out,
                             "--context", 64, "--quiet", "--index", "flat")
    assert code == 0, err
    assert "complete" in stdout and "tok/s" in stdout and "Flat" in stdout
    assert len(open_datastore(out)) > 1000
    code, stdout, _ = _run(capsys, "info", out)
    assert code == 0 and "model.layers.1.mlp" in stdout


BUILD_ERRORS = {  # case -> what the one-line message must name
    "missing": ["does-not-exist"],
    "empty": ["re:empty|no tokens"],
    "binary": ["blob.bin", "re:binary|NUL"],
    "unknown-model": ["no-such-model"],
    "bad-index": ["IVFbogus"],
    "graph-on-disk": ["--index-storage disk", "HNSW32"],
    "bad-layer": ["model.layers.7.mlp"],
    "bad-stride": ["--stride", "64"],
    "other-model": ["another model", "--overwrite"],
}


@pytest.mark.parametrize("case", list(BUILD_ERRORS))
def test_bad_input_one_line_error(case, capsys, tiny_model_dir, other_model_dir, corpus_dir, tmp_path):
    out = tmp_path / "ds"
    data, model, extra = corpus_dir, tiny_model_dir, []
    if case == "missing":
        data = tmp_path / "does-not-exist"
    elif case == "empty":
        data = tmp_path / "empty.txt"
        data.write_text("")
    elif case == "binary":
        data = tmp_path / "blob.bin"
        data.write_bytes(bytes(range(256)) * 4)
    elif case == "unknown-model":
        model = tmp_path / "no-such-model"
    elif case == "bad-index":
        extra = ["--index", "IVFbogus,PQ"]
    elif case == "graph-on-disk":
        extra = ["--index", "HNSW32", "--index-storage", "disk"]
    elif case == "bad-layer":
        extra = ["--layer", "model.layers.7.mlp"]
    elif case == "bad-stride":
        extra = ["--stride", "64"]
    elif case == "other-model":  # resuming another model's datastore (without --resume: test_refusals_...)
        code, _, err = _run(capsys, "build-index", "--model", other_model_dir, "--data", corpus_dir, "--out", out,
                            "--context", 64, "--quiet", "--index", "flat")
        assert code == 0, err
        extra = ["--resume"]
    code, stdout, err = _run(capsys, "build-index", "--model", model, "--data", data, "--out", out,
                             "--context", 64, "--quiet", *extra)
    assert code == 2
    _assert_one_line_error(err, "build-index", *BUILD_ERRORS[case])
    if case == "other-model":
        open_datastore(out)  # the other model's datastore is untouched and still valid
    else:
        _assert_no_valid_datastore(out)


def test_help_documents_every_option_with_examples():
    res = subprocess.run([sys.executable, "-m", "knnlm.cli", "build-index", "--help"], capture_output=True,
                         text=True, check=True)
    for opt in ("--model", "--data", "--glob", "--exclude", "--text-field", "--max-tokens", "--context", "--stride",
                "--batch-size", "--out", "--layer", "--key-dtype", "--index", "--index-storage", "--seed", "--resume",
                "--overwrite", "--device", "--dtype", "--quiet"):
        assert opt in res.stdout
    assert "examples:" in res.stdout and "knnlm build-index --data" in res.stdout


@pytest.fixture
def cli_store(capsys, tiny_model_dir, corpus_dir, tmp_path):
    out = tmp_path / "ds"
    code, _, err = _run(capsys, "build-index", "--model", tiny_model_dir, "--data", corpus_dir, "--out", out,
                        "--context", 64, "--quiet", "--index", "flat")
    assert code == 0, err
    return out


def test_eval_cli_table_and_json(capsys, cli_store, tiny_model_dir, corpus_dir, tmp_path):
    out_json = tmp_path / "res.json"
    code, stdout, err = _run(capsys, "eval", "--model", tiny_model_dir, "--datastore", cli_store, "--data",
                             corpus_dir / "bisect.py", "--lambda", "0.25,0.5", "--k", "8,32", "--quiet",
                             "--output", out_json)
    assert code == 0, err
    assert "kNN-LM" in stdout and "<- best" in stdout and "datastore freq" in stdout
    res = json.loads(out_json.read_text())
    assert len(res["grid"]) == 4 and res["overlap"]["documents"] == 1 and res["settings"]["lambdas"] == [0.25, 0.5]


EVAL_ERRORS = {  # case -> what the one-line message must name
    "lambda": ["--lambda", "1.5"],
    "temperature": ["--knn-temperature"],
    "k-zero": ["--k"],
    "k-too-big": ["--k", "100000000"],
    "k-text": ["--k", "many"],
    "no-index": ["index.faiss"],
    "corrupt-index": ["index.faiss", "FAISS"],
    "other-model": ["model weights"],
    "empty-text": ["re:empty|no tokens"],
    "not-a-datastore": ["corpus", "re:(holds no|not a) datastore"],
    "version": ["999"],
}


@pytest.mark.parametrize("case", list(EVAL_ERRORS))
def test_eval_bad_input_one_line_error(case, capsys, cli_store, tiny_model_dir, other_model_dir, corpus_dir, tmp_path):
    model, store, data, extra = tiny_model_dir, cli_store, corpus_dir / "bisect.py", []
    if case == "lambda":
        extra = ["--lambda", "1.5"]
    elif case == "temperature":
        extra = ["--knn-temperature", "0"]
    elif case == "k-zero":
        extra = ["--k", "0"]
    elif case == "k-too-big":
        extra = ["--k", "100000000"]
    elif case == "k-text":
        extra = ["--k", "many"]
    elif case == "no-index":
        (cli_store / "index.faiss").unlink()
    elif case == "corrupt-index":
        (cli_store / "index.faiss").write_bytes(b"not an index")
    elif case == "other-model":
        model = other_model_dir
    elif case == "empty-text":
        data = tmp_path / "empty.txt"
        data.write_text("")
    elif case == "not-a-datastore":
        store = corpus_dir
    elif case == "version":
        h = json.loads((cli_store / "header.json").read_text())
        h["format_version"] = 999
        (cli_store / "header.json").write_text(json.dumps(h))
    code, _, err = _run(capsys, "eval", "--model", model, "--datastore", store, "--data", data, "--quiet", *extra)
    assert code == 2
    _assert_one_line_error(err, "eval", *EVAL_ERRORS[case])


@pytest.mark.parametrize("command", ["eval", "tune"])
def test_temperature_is_a_deprecated_alias_of_knn_temperature(command, capsys):
    """``--temperature`` in eval / tune still sets the kNN temperature, with a warning naming
    ``--knn-temperature`` (in generate ``--temperature`` is the sampling temperature)."""
    from knnlm.cli import _build_parser

    parser = _build_parser()
    base = [command, "--datastore", "x", "--data", "y"]
    old = parser.parse_args([*base, "--temperature", "2"])
    assert "--knn-temperature" in capsys.readouterr().err
    new = parser.parse_args([*base, "--knn-temperature", "2"])
    assert capsys.readouterr().err == ""
    dest = "temperatures" if command == "eval" else "temperature"
    assert getattr(old, dest) == getattr(new, dest) and float(getattr(new, dest)) == 2.0
    gen = parser.parse_args(["generate", "--datastore", "x", "--prompt", "p", "--temperature", "0.5",
                             "--knn-temperature", "3"])
    assert (gen.sampling_temperature, gen.temperature) == (0.5, 3.0)


def test_error_is_the_last_line_of_a_real_stderr(cli_store, tiny_model_dir, corpus_dir):
    """In a real process (logging to stderr, progress bars on), the error is still one line and
    the last thing printed, with no traceback."""
    res = subprocess.run([sys.executable, "-m", "knnlm.cli", "eval", "--model", str(tiny_model_dir), "--datastore",
                          str(cli_store), "--data", str(corpus_dir / "bisect.py"), "--k", "100000000"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    last = res.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith("knnlm eval: error: ") and "--k" in last and "100000000" in last, res.stderr
    assert res.stderr.endswith(last + "\n")


def test_info_json_is_the_header(capsys, cli_store, tmp_path):
    code, stdout, err = _run(capsys, "info", cli_store, "--json")
    assert code == 0, err
    assert json.loads(stdout) == json.loads((cli_store / "header.json").read_text())
    code, stdout, err = _run(capsys, "info", cli_store)
    assert code == 0, err
    h = json.loads((cli_store / "header.json").read_text())
    assert f"{h['count']:,}/{h['total']:,} rows" in stdout and h["key"]["layer"] in stdout
    code, _, err = _run(capsys, "info", tmp_path / "nothing-here")
    assert code == 2
    _assert_one_line_error(err, "info", "nothing-here")


def test_demo_on_a_tiny_model(capsys, tiny_model_dir, tmp_path):
    """`knnlm demo` end to end on the default path (stdlib train split -> datastore -> a gate tuned
    on its own documents, no tuning text -> held-out perplexities with eval's default, the adaptive
    lambda, first), and a rerun reuses the datastore and its gate and prints the same numbers."""
    out = tmp_path / "demo"
    argv = ["demo", "--model", tiny_model_dir, "--tokens", 130000, "--eval-tokens", 500, "--tune-tokens", 1000,
            "--out", out, "--quiet"]
    code, stdout, err = _run(capsys, *argv)
    assert code == 0, err
    m = re.search(r"perplexity\s+base LM ([0-9.]+)\s+kNN-LM ([0-9.]+)", stdout)
    assert m, stdout
    base, knn = float(m.group(1)), float(m.group(2))
    assert math.isfinite(base) and math.isfinite(knn) and base > 1 and knn > 1 and base != knn
    open_datastore(out)
    h = json.loads((out / "header.json").read_text())
    assert int(h["tokens"]) == 130000 and h["status"] == "complete"
    assert len(json.loads((out / "documents.json").read_text())) >= 10  # enough for build-index's self-tuning
    n_eval = int(re.search(r"tokens ([0-9,]+) in \d+ documents", stdout).group(1).replace(",", ""))
    assert 490 <= n_eval <= 500  # --eval-tokens 500: its targets were scored
    assert "lambda adaptive" in stdout and "held-out NLL" in stdout and (out / "gate.json").exists()
    assert h["gate"]["file"] == "gate.json"
    gate = json.loads((out / "gate.json").read_text())
    assert gate["report"]["self_tuned"]["exclusion"] == "document"  # its own documents, not the tune split
    assert {d["name"] for d in gate["tuned_on"]} <= {d["name"] for d in json.loads(
        (out / "documents.json").read_text())}
    assert "knnlm eval's default (the self-tuned gate, no tuning text)" in stdout
    keys_before = (out / "keys.npy").read_bytes()
    code, stdout2, err = _run(capsys, *argv)
    assert code == 0, err
    assert "keeps its gate" in stdout2
    assert re.search(r"perplexity\s+base LM ([0-9.]+)\s+kNN-LM ([0-9.]+)", stdout2).groups() == m.groups()
    assert (out / "keys.npy").read_bytes() == keys_before


def test_subset_cli_shards_a_capped_build_into_the_same_datastore_as_one_build(capsys, tiny_model_dir, corpus_dir,
                                                                                  tmp_path):
    """build-index --max-tokens cuts the last file; `knnlm subset` keeps the whole ones and says where
    the rest starts; a build of the rest merged with it has the keys of one build over everything."""
    files = sorted(corpus_dir.iterdir())
    common = ["--model", tiny_model_dir, "--context", 64, "--quiet", "--index", "flat"]
    assert _run(capsys, "build-index", "--data", *files, "--out", tmp_path / "full", *common)[0] == 0
    full = open_datastore(tmp_path / "full")
    budget = full.documents[2]["offset"] + full.documents[2]["length"] // 2  # the third file, cut in half
    assert _run(capsys, "build-index", "--data", *files, "--max-tokens", budget, "--out", tmp_path / "cap",
                *common)[0] == 0
    code, stdout, err = _run(capsys, "subset", tmp_path / "cap", "--out", tmp_path / "part1", "--quiet",
                             "--index", "flat")
    assert code == 0, err
    assert f"left out: documents 3-3 of {tmp_path / 'cap'} (from {files[2]})" in stdout
    assert len(open_datastore(tmp_path / "part1").documents) == 2
    assert _run(capsys, "build-index", "--data", *files[2:], "--out", tmp_path / "part2", *common)[0] == 0
    code, _, err = _run(capsys, "merge", tmp_path / "part1", tmp_path / "part2", "--out", tmp_path / "merged",
                        "--quiet", "--index", "flat")
    assert code == 0, err
    merged = open_datastore(tmp_path / "merged")
    np.testing.assert_array_equal(merged.keys[:], full.keys[:])
    np.testing.assert_array_equal(merged.values[:], full.values[:])
    assert [d["name"] for d in merged.documents] == [d["name"] for d in full.documents]
    # the cut build itself cannot be merged with the rest: its cut file would be counted twice
    code, _, err = _run(capsys, "merge", tmp_path / "cap", tmp_path / "part2", "--out", tmp_path / "bad", "--quiet")
    assert code == 2
    _assert_one_line_error(err, "merge", "knnlm subset")
    for args, names in ((["--max-tokens", 0], ("--max-tokens", "at least 1")),
                        ([], ("no document", "--max-tokens"))):  # an uncut datastore: nothing to leave out
        code, _, err = _run(capsys, "subset", tmp_path / "full", *args, "--out", tmp_path / "bad2", "--quiet")
        assert code == 2
        _assert_one_line_error(err, "subset", *names)
        _assert_no_valid_datastore(tmp_path / "bad2")


def test_merge_cli(capsys, tiny_model_dir, other_model_dir, corpus_dir, tmp_path):
    files = sorted(corpus_dir.iterdir())
    for name, model, data in (("a", tiny_model_dir, files[:2]), ("b", tiny_model_dir, files[2:]),
                              ("o", other_model_dir, files[2:])):
        code, _, err = _run(capsys, "build-index", "--model", model, "--data", *data, "--out", tmp_path / name,
                            "--context", 64, "--quiet", "--index", "flat")
        assert code == 0, err
    code, stdout, err = _run(capsys, "merge", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "ab", "--quiet",
                             "--index", "flat")
    assert code == 0, err
    merged = open_datastore(tmp_path / "ab")
    assert len(merged) == len(open_datastore(tmp_path / "a")) + len(open_datastore(tmp_path / "b"))
    assert "complete" in stdout and "merged     from 2 datastores" in stdout
    for args, names in (([tmp_path / "a", tmp_path / "o"], "model weights"),  # another model
                        ([tmp_path / "a", tmp_path / "b", "--index", "IVFbogus"], "IVFbogus"),  # bad index
                        ([tmp_path / "a", tmp_path / "missing"], "missing")):  # not a datastore
        code, _, err = _run(capsys, "merge", *args, "--out", tmp_path / "bad", "--quiet")
        assert code == 2
        _assert_one_line_error(err, "merge", names)
        _assert_no_valid_datastore(tmp_path / "bad")


def test_refusals_that_need_no_model_come_before_it_loads(capsys, cli_store, tiny_model_dir, corpus_dir, tmp_path,
                                                          monkeypatch):
    """Building into a complete datastore (without the wrong advice to resume), into an unfinished
    one without --resume, into a non-empty directory, and eval on text the gate was tuned on: each
    refused in one line while the model is still unloaded."""
    import knnlm.loading

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the refusal")

    build = ["build-index", "--model", tiny_model_dir, "--data", corpus_dir, "--quiet", "--index", "flat"]
    tuning = tmp_path / "t.py"
    tuning.write_text(_TUNE_TEXT)
    code, _, err = _run(capsys, "tune", "--model", tiny_model_dir, "--datastore", cli_store, "--data", tuning,
                        "--quiet", "--kind", "linear")  # a gate (this loads the model: before the patch)
    assert code == 0, err
    monkeypatch.setattr(knnlm.loading, "load_model", no_model)
    code, _, err = _run(capsys, *build, "--out", cli_store)
    assert code == 2 and "--resume" not in err
    _assert_one_line_error(err, "build-index", "complete datastore", "--overwrite")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    code, _, err = _run(capsys, *build, "--out", tmp_path / "busy")
    assert code == 2
    _assert_one_line_error(err, "build-index", "holds no datastore")
    h = json.loads((cli_store / "header.json").read_text())
    h["status"] = "building"  # a real unfinished status (an unknown one is refused as corrupt, #31)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "header.json").write_text(json.dumps(h))
    code, _, err = _run(capsys, *build, "--out", tmp_path / "half")
    assert code == 2
    _assert_one_line_error(err, "build-index", "unfinished", "--resume")
    code, _, err = _run(capsys, "eval", "--model", tiny_model_dir, "--datastore", cli_store, "--data", tuning,
                        "--lambda", "adaptive", "--quiet")
    assert code == 2
    _assert_one_line_error(err, "eval", "tuned on", "--data")
    # a model whose tokenizer is not the datastore's: the tokenizer alone is enough to refuse it
    from knnlm.testing import make_tiny_tokenizer, save_tiny_model

    other = save_tiny_model(tmp_path / "other-tok", make_tiny_tokenizer(files=["colorsys.py"]))
    capsys.readouterr()  # what saving it printed
    for command in ("eval", "tune", "generate"):
        extra = {"generate": ["--prompt", "x"], "eval": ["--data", corpus_dir / "bisect.py", "--lambda", "0.25"],
                 "tune": ["--data", tuning]}[command]
        code, _, err = _run(capsys, command, "--model", other, "--datastore", cli_store, *extra, "--quiet")
        assert code == 2
        _assert_one_line_error(err, command, "another tokenizer")


_TUNE_TEXT = "def f(x):\n    return [y * 2 for y in range(x) if y % 3]\n" * 40
