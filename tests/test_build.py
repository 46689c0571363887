
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from knnlm import build as build_mod
from knnlm import capture as capture_mod
from knnlm.build import build_datastore
from knnlm.capture import capture_keys
from knnlm.config import BuildConfig
from knnlm.datastore import DatastoreError, model_identity, open_datastore

from conftest import make_tiny_model


def _header(path) -> dict:
    """header.json of the datastore directory ``path``, as written on disk."""
    return json.loads((Path(path) / "header.json").read_text())


def _build(model, tok, corpus, out, **kw):
    kw.setdefault("index", "flat")
    return build_datastore(model, tok, [corpus], out, BuildConfig(progress=False, **kw))


def _forward_keys(model, ids):
    with torch.inference_mode(), capture_keys(model) as cap:
        model(input_ids=torch.tensor([ids]))
        return cap.pop()[0].float()


def test_one_key_per_target_equal_to_plain_forward(tiny_model, tiny_tokenizer, corpus_dir, tmp_path):
    ds = _build(tiny_model, tiny_tokenizer, corpus_dir, tmp_path / "ds", context=32, stride=12, batch_size=3,
                key_dtype="float32")
    assert len(ds) == sum(d["length"] - 1 for d in ds.documents) == ds.keys.shape[0]
    for di, doc in enumerate(ds.documents[:2]):
        toks = ds.document_tokens(di).tolist()
        rows = slice(doc["first_row"], doc["first_row"] + doc["length"] - 1)
        np.testing.assert_array_equal(ds.values[rows], toks[1:])  # value of key j-1 is token j
        # the first window's keys equal a plain forward over the document prefix (causal model)
        ref = _forward_keys(tiny_model, toks[:32])
        torch.testing.assert_close(torch.from_numpy(ds.keys[rows][:31].copy()), ref[:31], atol=1e-5, rtol=1e-5)
        # a later target j (window [j_end - 32, j_end)) equals a forward over exactly that window
        from knnlm.data import windows

        start, end, first = list(windows(len(toks), 32, 12))[2]
        ref = _forward_keys(tiny_model, toks[start:end])
        got = torch.from_numpy(ds.keys[rows][first - 1: end - 1].copy())
        torch.testing.assert_close(got, ref[first - 1 - start:end - 1 - start], atol=1e-5, rtol=1e-5)


def test_document_shorter_than_context_matches_full_forward(tiny_model, tiny_tokenizer, tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("def f(x):\n    return x + 1\n")
    ds = _build(tiny_model, tiny_tokenizer, f, tmp_path / "ds", context=256, key_dtype="float32")
    ref = _forward_keys(tiny_model, ds.document_tokens(0).tolist())
    torch.testing.assert_close(torch.from_numpy(ds.keys[:].copy()), ref[:-1], atol=1e-5, rtol=1e-5)


def test_header_round_trip_and_refusals(tiny_model, tiny_tokenizer, corpus_dir, tmp_path):
    ds = _build(tiny_model, tiny_tokenizer, corpus_dir, tmp_path / "ds", context=64)
    h = _header(tmp_path / "ds")
    assert h["status"] == "complete" and h["count"] == h["total"] == len(ds)
    assert h["key"] == {"layer": "model.layers.1.mlp", "kind": "ffn_input", "dim": 32, "dtype": "float16"}
    assert (h["window"]["context"], h["window"]["stride"]) == (64, 63)
    assert [s["path"].split("/")[-1] for s in h["corpus"]["sources"]] == sorted(p.name for p in corpus_dir.iterdir())
    assert all(len(s["sha256"]) == 64 and s["size"] > 0 for s in h["corpus"]["sources"])
    assert h["index"]["factory"] == "Flat" and h["index"]["ntotal"] == len(ds)
    ident = model_identity(tiny_model, tiny_tokenizer, "model.layers.1.mlp")
    ds.check_compatible(ident)
    other = model_identity(make_tiny_model("llama", seed=1), tiny_tokenizer, "model.layers.1.mlp")
    with pytest.raises(DatastoreError, match="model weights"):
        ds.check_compatible(other)
    with pytest.raises(DatastoreError, match="tokenizer"):
        ds.check_compatible(dataclasses.replace(ident, tokenizer_hash="0" * 16))
    # files that disagree with the header are refused
    np.save(tmp_path / "ds" / "values.npy", np.zeros(3, dtype=np.int32))
    with pytest.raises(DatastoreError, match="values.npy"):
        open_datastore(tmp_path / "ds")


class _Crash(Exception):
    pass


def test_resume_after_interruption_is_byte_identical(tiny_model, tiny_tokenizer, corpus_dir, tmp_path, monkeypatch):
    kw = dict(context=48, batch_size=6)
    monkeypatch.setattr(build_mod, "COMMIT_SECONDS", 0.0)  # record progress after every batch
    _build(tiny_model, tiny_tokenizer, corpus_dir, tmp_path / "full", **kw)
    calls = {"n": 0}
    real = capture_mod.Capture.keys_of

    def crashing(self, ids):
        calls["n"] += 1
        if calls["n"] == 4:
            raise _Crash
        return real(self, ids)

    monkeypatch.setattr(capture_mod.Capture, "keys_of", crashing)
    with pytest.raises(_Crash):
        _build(tiny_model, tiny_tokenizer, corpus_dir, tmp_path / "part", **kw)
    h = _header(tmp_path / "part")
    assert h["status"] == "building" and 0 < h["count"] < h["total"]
    with pytest.raises(DatastoreError, match="incomplete"):
        open_datastore(tmp_path / "part")
    with pytest.raises(DatastoreError, match="resume"):
        _build(tiny_model, tiny_tokenizer, corpus_dir, tmp_path / "part", **kw)
    monkeypatch.setattr(capture_mod.Capture, "keys_of", real)
    _build(tiny_model, tiny_tokenizer, corpus_dir, tmp_path / "part", resume=True, **kw)
    for name in ("keys.npy", "values.npy", "tokens.npy", "documents.json", "index.faiss"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "part" / name).read_bytes(), name


def test_resume_refuses_changed_settings_and_other_models(tiny_model, tiny_tokenizer, corpus_dir, tmp_path):
    _build(tiny_model, tiny_tokenizer, corpus_dir, tmp_path / "ds", context=24)
    with pytest.raises(DatastoreError, match=r"context\b.*32.*24"):
        _build(tiny_model, tiny_tokenizer, corpus_dir, tmp_path / "ds", context=32, resume=True)
    with pytest.raises(DatastoreError, match="another model"):
        _build(make_tiny_model("llama", seed=1), tiny_tokenizer, corpus_dir, tmp_path / "ds", context=24, resume=True)


def test_max_tokens_is_a_prefix(tiny_model, tiny_tokenizer, corpus_dir, tmp_path):
    full = _build(tiny_model, tiny_tokenizer, corpus_dir, tmp_path / "a", context=24)
    part = _build(tiny_model, tiny_tokenizer, corpus_dir, tmp_path / "b", context=24, max_tokens=700)
    assert int(_header(part.path)["tokens"]) == 700
    np.testing.assert_array_equal(part.tokens, full.tokens[:700])


def test_failed_tokenization_leaves_nothing(tiny_model, tiny_tokenizer, tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "a.txt").write_text("fine text\n")
    (d / "b.txt").write_bytes(b"\xff\xfe bad")
    from knnlm.data import CorpusError

    with pytest.raises(CorpusError, match="UTF-8"):
        _build(tiny_model, tiny_tokenizer, d, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_subset_equals_a_build_over_the_same_documents(tiny_model, tiny_tokenizer, corpus_dir, tmp_path):
    from knnlm import subset_datastore

    full = _build(tiny_model, tiny_tokenizer, corpus_dir, tmp_path / "full", context=40)
    cut = full.documents[2]["offset"]  # the first two documents exactly
    sub = subset_datastore(full, tmp_path / "sub", cut + 5, index="flat", progress=False)
    assert _header(sub.path)["corpus"]["documents"] == 2 and len(sub) == full.documents[2]["first_row"]
    first_two = sorted(corpus_dir.iterdir())[:2]
    direct = build_datastore(tiny_model, tiny_tokenizer, first_two, tmp_path / "direct",
                             BuildConfig(context=40, index="flat", progress=False))
    np.testing.assert_array_equal(sub.keys[:], direct.keys[:])
    np.testing.assert_array_equal(sub.values[:], direct.values[:])


def test_sigkill_midway_then_resume_is_byte_identical(tmp_path, slow_model_dir, corpus_dir):
    """A real `knnlm build-index` process killed with SIGKILL, resumed with --resume (a wider tiny
    model, conftest.slow_model_dir, so the build lasts past the first progress commit). The
    uninterrupted reference is built in this process with the same arguments."""
    from knnlm.cli import main

    repo = Path(__file__).resolve().parent.parent  # `python -m experiments.kill_resume_check` runs from here
    files = sorted(str(p) for p in corpus_dir.iterdir())
    extra = ["--context", "32", "--batch-size", "1"]
    full = tmp_path / "full"  # the arguments experiments.kill_resume_check gives its builds
    assert main(["build-index", "--model", str(slow_model_dir), "--data", *files, "--max-tokens", "8000", "--quiet",
                 "--index", "flat", *extra, "--out", str(full)]) == 0
    env = dict(os.environ, KNNLM_COMMIT_SECONDS="0.1")  # commit often, so a kill lands between commits
    res = subprocess.run([sys.executable, "-m", "experiments.kill_resume_check", "--model", str(slow_model_dir),
                          "--data", *files, "--tokens", "8000", "--reference", str(full),
                          "--workdir", str(tmp_path / "killed"), "--", *extra],
                         capture_output=True, text=True, timeout=600, env=env, cwd=repo)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "killed with SIGKILL" in res.stdout and "partial datastore refused" in res.stdout
    # every file compared and byte-identical: "<file> identical (N bytes)" lines, then the verdict
    lines = res.stdout.splitlines()
    for name in ("keys.npy", "values.npy", "tokens.npy", "documents.json", "index.faiss"):
        assert any(re.fullmatch(rf"{re.escape(name)}\s+identical \([0-9,]+ bytes\)", ln) for ln in lines), name
    assert "DIFFERENT" not in res.stdout and "NOT byte-identical" not in res.stdout
    assert lines[-1] == "byte-identical"


def test_merge_equals_one_build_over_all_documents(tiny_model, tiny_tokenizer, corpus_dir, tmp_path):
    from knnlm import merge_datastores

    files = sorted(corpus_dir.iterdir())
    whole = build_datastore(tiny_model, tiny_tokenizer, files, tmp_path / "whole",
                            BuildConfig(context=40, index="flat", progress=False))
    a = build_datastore(tiny_model, tiny_tokenizer, files[:2], tmp_path / "a",
                        BuildConfig(context=40, index="flat", progress=False))
    b = build_datastore(tiny_model, tiny_tokenizer, files[2:], tmp_path / "b",
                        BuildConfig(context=40, index="flat", progress=False))
    merged = merge_datastores([tmp_path / "a", tmp_path / "b"], tmp_path / "ab", index="flat", progress=False)
    assert len(merged) == len(whole) == len(a) + len(b)
    np.testing.assert_array_equal(merged.keys[:], whole.keys[:])
    np.testing.assert_array_equal(merged.values[:], whole.values[:])
    np.testing.assert_array_equal(merged.tokens[:], whole.tokens[:])
    assert merged.documents == whole.documents
    assert _header(merged.path)["corpus"]["sources"] == _header(whole.path)["corpus"]["sources"]
    assert [m["path"] for m in _header(merged.path)["build"]["merged_from"]] == [str(a.path), str(b.path)]
    # provenance of a row of the second input points into the second input's documents
    row = len(a) + 3
    assert merged.provenance([row]) == b.provenance([3])
    assert merged.index.ntotal == len(whole)


def test_merge_refuses_overlap_other_model_and_leaves_inputs_intact(tiny_model, tiny_tokenizer, corpus_dir,
                                                                    tmp_path):
    from knnlm import merge_datastores

    files = sorted(corpus_dir.iterdir())
    cfg = BuildConfig(context=40, index="flat", progress=False)
    build_datastore(tiny_model, tiny_tokenizer, files[:2], tmp_path / "a", cfg)
    build_datastore(tiny_model, tiny_tokenizer, files[1:3], tmp_path / "b", cfg)  # shares files[1]
    before = (tmp_path / "a" / "keys.npy").read_bytes()
    with pytest.raises(DatastoreError, match="in both"):
        merge_datastores([tmp_path / "a", tmp_path / "b"], tmp_path / "ab", progress=False)
    assert not (tmp_path / "ab").exists()
    other = make_tiny_model("llama", seed=1)
    build_datastore(other, tiny_tokenizer, files[2:3], tmp_path / "c", cfg)
    with pytest.raises(DatastoreError, match="another model"):
        merge_datastores([tmp_path / "a", tmp_path / "c"], tmp_path / "ac", progress=False)
    with pytest.raises(DatastoreError, match="at least two"):
        merge_datastores([tmp_path / "a"], tmp_path / "x", progress=False)
    assert (tmp_path / "a" / "keys.npy").read_bytes() == before
    open_datastore(tmp_path / "a")
    assert _header(tmp_path / "a")["status"] == "complete"


def test_disk_full_then_resume_is_byte_identical(tiny_model_dir, corpus_dir, tmp_path):
    """A build that runs out of space (a file-size limit stands in for a full disk: writes past it
    fail with EFBIG, as they fail with ENOSPC on a full one; here it trips when keys.npy is
    allocated, after the corpus is written) stops with a one-line error, leaves nothing that opens
    as valid, and `--resume` without the limit gives the bytes of a clean build."""
    import resource

    from knnlm.datastore import open_datastore as _open

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))

    args = [sys.executable, "-m", "knnlm.cli", "build-index", "--model", str(tiny_model_dir), "--data",
            str(corpus_dir), "--context", "64", "--index", "flat", "--key-dtype", "float32", "--quiet"]
    out = tmp_path / "full"
    res = subprocess.run(args + ["--out", str(out)], preexec_fn=limited, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-2000:]
    assert "no space left writing" in err[-1] and "--resume" in err[-1], err[-3:]
    with pytest.raises(DatastoreError):
        _open(out)
    # the resume and the clean build without the limit: the same command, in this process
    from knnlm.cli import main

    assert main(args[3:] + ["--out", str(out), "--resume"]) == 0
    clean = tmp_path / "clean"
    assert main(args[3:] + ["--out", str(clean)]) == 0
    for name in ("keys.npy", "values.npy", "tokens.npy", "documents.json", "index.faiss"):
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name
