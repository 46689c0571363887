import subprocess
import sys

import pytest

from knnlm.cli import main
from knnlm.datastore import DatastoreError, open_datastore


def _run(capsys, *argv):
    code = main(list(map(str, argv)))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


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


@pytest.mark.parametrize("case", ["missing", "empty", "binary", "unknown-model", "bad-index", "bad-layer",
                                  "bad-stride", "other-model"])
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
    elif case == "bad-layer":
        extra = ["--layer", "model.layers.7.mlp"]
    elif case == "bad-stride":
        extra = ["--stride", "64"]
    elif case == "other-model":
        code, _, err = _run(capsys, "build-index", "--model", other_model_dir, "--data", corpus_dir, "--out", out,
                            "--context", 64, "--quiet", "--index", "flat")
        assert code == 0, err
    code, stdout, err = _run(capsys, "build-index", "--model", model, "--data", data, "--out", out,
                             "--context", 64, "--quiet", *extra)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("knnlm build-index: error: "), err
    if case == "other-model":
        assert "another model" in err
        open_datastore(out)  # the other model's datastore is untouched and still valid
    else:
        _assert_no_valid_datastore(out)


def test_help_documents_every_option_with_examples():
    res = subprocess.run([sys.executable, "-m", "knnlm.cli", "build-index", "--help"], capture_output=True,
                         text=True, check=True)
    for opt in ("--model", "--data", "--glob", "--exclude", "--text-field", "--max-tokens", "--context", "--stride",
                "--batch-size", "--out", "--layer", "--key-dtype", "--index", "--seed", "--resume", "--overwrite",
                "--device", "--dtype", "--quiet"):
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
    import json

    out_json = tmp_path / "res.json"
    code, stdout, err = _run(capsys, "eval", "--model", tiny_model_dir, "--datastore", cli_store, "--data",
                             corpus_dir / "bisect.py", "--lambda", "0.25,0.5", "--k", "8,32", "--quiet",
                             "--output", out_json)
    assert code == 0, err
    assert "kNN-LM" in stdout and "<- best" in stdout and "datastore freq" in stdout
    res = json.loads(out_json.read_text())
    assert len(res["grid"]) == 4 and res["overlap"]["documents"] == 1 and res["settings"]["lambdas"] == [0.25, 0.5]


@pytest.mark.parametrize("case", ["lambda", "temperature", "k-zero", "k-too-big", "k-text", "no-index",
                                  "corrupt-index", "other-model", "empty-text", "not-a-datastore"])
def test_eval_bad_input_one_line_error(case, capsys, cli_store, tiny_model_dir, other_model_dir, corpus_dir, tmp_path):
    model, store, data, extra = tiny_model_dir, cli_store, corpus_dir / "bisect.py", []
    if case == "lambda":
        extra = ["--lambda", "1.5"]
    elif case == "temperature":
        extra = ["--temperature", "0"]
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
    code, _, err = _run(capsys, "eval", "--model", model, "--datastore", store, "--data", data, "--quiet", *extra)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("knnlm eval: error: "), err


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
    for args in ([tmp_path / "a", tmp_path / "o"],  # another model
                 [tmp_path / "a", tmp_path / "b", "--index", "IVFbogus"],  # bad index
                 [tmp_path / "a", tmp_path / "missing"]):  # not a datastore
        code, _, err = _run(capsys, "merge", *args, "--out", tmp_path / "bad", "--quiet")
        assert code == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("knnlm merge: error: "), err
        _assert_no_valid_datastore(tmp_path / "bad")
