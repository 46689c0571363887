"""A datastore is an untrusted file you download (issue #31): crafted datastores (symlinks where
its files go, FAISS lists naming a file outside it, malformed header fields, out-of-range values,
non-finite keys) are refused with one line, and nothing outside the datastore is written or
mapped. Tiny models, flat indexes: each test runs in about a second."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from knnlm.cli import main
from knnlm.datastore import (
    LOCK,
    DatastoreWriter,
    disk_errors,
    open_datastore,
    read_gate,
    read_header,
    write_gate,
    write_json_atomic,
)
from knnlm.derive import reindex_datastore, subset_datastore
from knnlm.errors import DatastoreError, GenerateError
from knnlm.testing import corpus_paths


@pytest.fixture
def copy(tiny_store, tmp_path):
    """A private copy of the shared tiny datastore (the tests change it)."""
    _, ds = tiny_store
    dest = tmp_path / "ds"
    shutil.copytree(ds.path, dest)
    return dest


def _one_line(e: Exception) -> str:
    msg = str(e)
    assert "\n" not in msg, msg
    return msg


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _edit_header(path: Path, edit) -> None:
    h = json.loads((path / "header.json").read_text())
    edit(h)
    (path / "header.json").write_text(json.dumps(h))


# ------------------------------------------------------------------ 1. no write through a link


@pytest.mark.parametrize("name", [LOCK, "header.json.tmp", "gate.json.tmp", "keys.npy", "index.faiss"])
def test_a_symlink_where_a_datastore_file_goes_is_refused_and_its_target_untouched(name, copy, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    target = copy / name
    if target.exists():
        target.unlink()
    target.symlink_to(victim)
    with pytest.raises(DatastoreError) as exc:
        reindex_datastore(copy, index="flat", progress=False)
    assert "symbolic link" in _one_line(exc.value) and name in str(exc.value)
    assert victim.read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "victim.txt"]  # nothing made beside it
    assert (copy / name).is_symlink()


def test_atomic_json_replaces_a_planted_temp_link_without_writing_through_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "header.json.tmp").symlink_to(victim)
    write_json_atomic(tmp_path / "header.json", {"a": 1})
    assert victim.read_text() == "precious\n"
    assert json.loads((tmp_path / "header.json").read_text()) == {"a": 1}
    assert not (tmp_path / "header.json").is_symlink() and not (tmp_path / "header.json.tmp").exists()


def test_a_fifo_where_the_lock_goes_is_refused_without_blocking(copy):
    (copy / LOCK).unlink(missing_ok=True)
    os.mkfifo(copy / LOCK)
    with pytest.raises(DatastoreError, match="not a regular file"):
        reindex_datastore(copy, index="flat", progress=False)


def test_the_lock_is_removed_when_the_writer_ends(copy):
    reindex_datastore(copy, index="flat", progress=False)
    assert not (copy / LOCK).exists()


def test_a_refused_build_creates_nothing(copy, tmp_path):
    header = read_header(copy)
    busy = tmp_path / "home"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    for overwrite in (False, True):  # `--out / --overwrite` included
        with pytest.raises(DatastoreError, match="holds no datastore") as exc:
            DatastoreWriter.start(busy, header, overwrite=overwrite)
        _one_line(exc.value)
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]  # no .knnlm.lock left behind


def test_a_corpus_directory_skips_dotfiles(tmp_path):
    from knnlm.data import resolve_sources

    (tmp_path / "a.txt").write_text("print('hello')\n")
    (tmp_path / LOCK).write_text("12345\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD.txt").write_text("ref: refs/heads/main\n")
    assert [Path(s.path).name for s in resolve_sources([tmp_path])] == ["a.txt"]


# ------------------------------------------------------------------ 2. FAISS lists confined


def _ivf_on_disk(keys: np.ndarray, index_path: Path, lists_path: Path) -> None:
    """An IVF index whose inverted lists FAISS keeps in ``lists_path`` (any path it is given)."""
    import faiss

    x = np.ascontiguousarray(keys, dtype=np.float32)
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(x.shape[1]), x.shape[1], 4)
    index.train(x)
    lists = faiss.OnDiskInvertedLists(4, index.code_size, str(lists_path))
    index.replace_invlists(lists, True)
    lists.this.disown()
    index.add(x)
    faiss.write_index(index, str(index_path))


def test_an_index_naming_lists_outside_the_datastore_is_refused_before_faiss_maps_them(copy, tmp_path, capfd):
    outside = tmp_path / "outside.ivfdata"
    ds = open_datastore(copy)
    _ivf_on_disk(ds.keys, copy / "index.faiss", outside)
    capfd.readouterr()
    before = _digest(outside)
    # the header says the index is in RAM: FAISS would map the absolute path read-write
    with pytest.raises(DatastoreError, match="header says the index is in RAM") as exc:
        _ = open_datastore(copy).index
    _one_line(exc.value)
    # the header says disk, with the datastore's own lists file: the index names another one
    shutil.copy(outside, copy / "index.ivfdata")
    _edit_header(copy, lambda h: h["index"].update(storage="disk", ivfdata="index.ivfdata",
                                                   ivfdata_bytes=outside.stat().st_size))
    with pytest.raises(DatastoreError, match="not the datastore's own") as exc:
        _ = open_datastore(copy).index
    _one_line(exc.value)
    outside.write_bytes(b"")  # had FAISS mapped it, reading through a now empty file would be a SIGBUS
    assert _digest(copy / "index.ivfdata") == before


def test_a_header_naming_on_disk_lists_that_the_index_lacks_is_refused(copy):
    import faiss

    keys = np.ascontiguousarray(open_datastore(copy).keys, dtype=np.float32)
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(keys.shape[1]), keys.shape[1], 4)  # lists in RAM
    index.train(keys)
    index.add(keys)
    faiss.write_index(index, str(copy / "index.faiss"))
    (copy / "index.ivfdata").write_bytes(b"\0" * 64)
    _edit_header(copy, lambda h: h["index"].update(storage="disk", ivfdata="index.ivfdata", ivfdata_bytes=64))
    with pytest.raises(DatastoreError, match="holds its inverted lists itself"):
        _ = open_datastore(copy).index


def test_an_on_disk_list_outside_its_lists_file_is_refused_before_faiss_reads_it(copy):
    """The lists' offsets are read from index.faiss (untrusted): one beyond the lists file was a
    SIGSEGV on the first search."""
    ds = reindex_datastore(copy, index="IVF4,Flat", index_storage="disk", progress=False)
    path = copy / ds.header.index["file"]
    raw = bytearray(path.read_bytes())
    at = raw.index(b"ilod") + 4 + 8 + 8 + 8 + 24 * 1 + 16  # list 1's offset in FAISS's "ilod" record
    raw[at:at + 8] = (1 << 40).to_bytes(8, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(DatastoreError, match="inverted list 1 .* lies outside the") as exc:
        _ = open_datastore(copy).index
    _one_line(exc.value)


# ------------------------------------------------------------------ 3. keys, values, empty searches


def test_keys_that_overflow_float16_fail_the_build_with_one_line(tiny_tokenizer, tmp_path):
    from knnlm import BuildConfig, build_datastore
    from knnlm.testing import make_tiny_model

    model = make_tiny_model("llama")
    with torch.no_grad():  # the last FFN's input (after its RMSNorm) beyond float16's 65504
        model.model.layers[-1].post_attention_layernorm.weight.mul_(1e6)
    with pytest.raises(DatastoreError) as exc:
        build_datastore(model, tiny_tokenizer, corpus_paths(["keyword.py"]), tmp_path / "ds",
                        BuildConfig(context=64, index="flat", progress=False))
    msg = _one_line(exc.value)
    assert "model.layers.1.mlp" in msg and "`key_dtype` float32" in msg and exc.value.param == "key_dtype"
    assert not open_datastore_ok(tmp_path / "ds")


def open_datastore_ok(path) -> bool:
    try:
        open_datastore(path)
    except DatastoreError:
        return False
    return True


def test_values_outside_the_vocabulary_are_refused_on_open(copy):
    values = np.load(copy / "values.npy")
    values[len(values) // 2] = read_header(copy).model.vocab_size
    np.save(copy / "values.npy", values)
    with pytest.raises(DatastoreError, match=r"outside the model's vocabulary \[0, 384\)") as exc:
        open_datastore(copy)
    _one_line(exc.value)


def test_tokens_outside_the_vocabulary_are_refused_on_open(copy):
    tokens = np.load(copy / "tokens.npy")
    tokens[10] = 10 ** 6
    np.save(copy / "tokens.npy", tokens)
    with pytest.raises(DatastoreError, match=r"tokens.npy: entry 10 is token id 1000000, outside") as exc:
        open_datastore(copy)
    _one_line(exc.value)


def test_non_finite_stored_keys_fail_a_reindex_and_keep_the_old_index(copy):
    keys = np.load(copy / "keys.npy", mmap_mode="r+")
    keys[100:110] = np.nan  # a crafted keys.npy: FAISS would index the rest and drop these silently
    keys.flush()
    del keys
    before = {p.name: _digest(p) for p in copy.iterdir()}
    with pytest.raises(DatastoreError, match="key row 100 holds inf or NaN") as exc:
        reindex_datastore(copy, index="flat", progress=False)
    _one_line(exc.value)
    assert {p.name: _digest(p) for p in copy.iterdir()} == before


def test_non_finite_keys_in_the_training_sample_fail_an_ivf_reindex(copy):
    """The IVF training sample is checked too (``train_index``): rows 100.. are NaN, so the
    refusal names a sampled row among them, and nothing of the datastore changes."""
    keys = np.load(copy / "keys.npy", mmap_mode="r+")
    keys[100:] = np.nan
    keys.flush()
    del keys
    before = {p.name: _digest(p) for p in copy.iterdir()}
    with pytest.raises(DatastoreError, match=r"key row \d+ holds inf or NaN") as exc:
        reindex_datastore(copy, index="IVF4,Flat", progress=False)
    _one_line(exc.value)
    assert int(re.search(r"key row (\d+)", str(exc.value)).group(1)) >= 100
    assert any(entry.name == "train_index" for entry in exc.traceback)  # refused before any row was added
    assert {p.name: _digest(p) for p in copy.iterdir()} == before


def test_searches_without_a_valid_neighbour_are_counted_and_warned_about(tiny_store, tiny_tokenizer, caplog):
    import faiss

    from knnlm import KNNLM

    model, ds = tiny_store
    mine = open_datastore(ds.path)
    crafted = faiss.IndexIDMap(faiss.IndexFlatL2(ds.dim))  # every id beyond the datastore's rows
    crafted.add_with_ids(np.asarray(ds.keys, dtype=np.float32), np.arange(len(ds), dtype=np.int64) + len(ds))
    mine._index = crafted
    knn = KNNLM(model, mine, tiny_tokenizer, k=4)
    with caplog.at_level(logging.WARNING):
        res = knn.evaluate(texts=["def double(x):\n    return 2 * x\n" * 8], progress=False)
    r = res["retrieval"]
    assert r["no_neighbour_searches"] > 0 and r["no_neighbour_fraction"] == 1.0
    assert res["primary"]["ppl"] == pytest.approx(res["ppl_base"], rel=1e-5)  # the LM alone
    assert any("found no neighbour" in m for m in caplog.messages)


# ------------------------------------------------------------------ 4. malformed header fields


HEADER_CASES = {
    "key-dtype-object": (lambda h: h["key"].update(dtype="object"), "key.dtype"),
    "bos-huge": (lambda h: h["window"].update(bos=1e6), "window.bos"),
    "count-string": (lambda h: h.update(count="12"), "count"),
    "vocab-missing": (lambda h: h["model"].pop("vocab_size"), "model.vocab_size"),
    "model-a-list": (lambda h: h.update(model=[1, 2]), "model"),
    "index-file-escapes": (lambda h: h["index"].update(file="../../etc/passwd"), "index.file"),
    "gate-file-escapes": (lambda h: h.update(gate={"file": "/etc/passwd", "sha256": "0", "datastore": "x"}),
                          "gate.file"),
    "max-tokens-string": (lambda h: h["build"].update(max_tokens="8000"), "build.max_tokens"),
    "stride-not-below-context": (lambda h: h["window"].update(stride=h["window"]["context"]), "window.stride"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_malformed_header_fields_are_one_line_errors(case, copy, capsys):
    edit, field = HEADER_CASES[case]
    _edit_header(copy, edit)
    with pytest.raises(DatastoreError) as exc:
        open_datastore(copy)
    assert field in _one_line(exc.value)
    assert main(["info", str(copy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and field in err


def test_deeply_nested_json_and_a_document_without_offset_are_one_line_errors(copy):
    good = (copy / "header.json").read_text()
    (copy / "header.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(DatastoreError, match="nested too deeply|not a JSON object") as exc:
        open_datastore(copy)
    _one_line(exc.value)
    (copy / "header.json").write_text(good)
    docs = json.loads((copy / "documents.json").read_text())
    del docs[1]["offset"]
    (copy / "documents.json").write_text(json.dumps(docs))
    with pytest.raises(DatastoreError, match="document 1 field 'offset'") as exc:
        open_datastore(copy)
    _one_line(exc.value)


def test_stored_strings_reach_the_terminal_escaped(copy, capsys):
    _edit_header(copy, lambda h: h["model"].update(name_or_path="evil\x1b[2J\x1b]0;owned\x07\nmodel"))
    assert main(["info", str(copy)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "evil\\x1b[2J" in out


# ------------------------------------------------------------------ 4. the smaller fixes


def test_generate_checks_the_models_position_limit(tiny_store, tiny_tokenizer):
    from knnlm import KNNLM

    model, ds = tiny_store
    knn = KNNLM(model, ds, tiny_tokenizer)
    limit = model.config.max_position_embeddings
    with pytest.raises(GenerateError, match=f"exceed the model's {limit} positions") as exc:
        knn.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=limit)
    assert exc.value.param == "max_new_tokens"
    with pytest.raises(GenerateError, match=r"the prompt \(3 tokens\)"):
        knn.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=limit - 2)


def _with_empty_document(path: Path, after: int) -> int:
    """Insert an empty document after document ``after``; returns the token offset where it ends."""
    docs = json.loads((path / "documents.json").read_text())
    d = docs[after]
    end, row = d["offset"] + d["length"], d["first_row"] + d["length"] - 1
    docs.insert(after + 1, {**d, "name": "empty.py", "offset": end, "length": 0, "first_row": row})
    (path / "documents.json").write_text(json.dumps(docs))
    _edit_header(path, lambda h: h["corpus"].update(documents=len(docs)))
    return end


def test_subset_ending_with_an_empty_document_keeps_every_row(copy, tmp_path):
    end = _with_empty_document(copy, 0)
    src = open_datastore(copy)
    sub = subset_datastore(src, tmp_path / "sub", end, index="flat", progress=False)
    assert [d["name"] for d in sub.documents][-1] == "empty.py"
    assert len(sub) == src.documents[0]["length"] - 1
    np.testing.assert_array_equal(np.asarray(sub.keys), np.asarray(src.keys[:len(sub)]))


def test_an_interrupted_subset_says_so_and_runs_again(copy, tmp_path):
    src = open_datastore(copy)
    out = tmp_path / "sub"
    subset_datastore(src, out, src.documents[1]["offset"], index="flat", progress=False)
    _edit_header(out, lambda h: h.update(status="building", count=0))  # as a kill leaves it
    with pytest.raises(DatastoreError, match="interrupted `knnlm subset`") as exc:
        open_datastore(out)
    assert "build-index --resume" not in str(exc.value)
    again = subset_datastore(src, out, src.documents[1]["offset"], index="flat", progress=False)
    assert again.header.complete and len(again) == src.documents[0]["length"] - 1


def test_reindex_removes_the_work_files_a_killed_reindex_left(copy):
    (copy / ".index.r3.faiss.build").mkdir()
    (copy / ".index.r3.faiss.build" / "trained.faiss").write_bytes(b"x")
    reindex_datastore(copy, index="flat", progress=False)
    assert not (copy / ".index.r3.faiss.build").exists()


def test_a_kill_between_the_new_gate_and_the_header_keeps_the_previous_gate(copy, monkeypatch):
    ds = open_datastore(copy)
    write_gate(ds, {"gate": 1})
    assert read_header(copy).gate["file"] == "gate.json"
    from knnlm import datastore

    def killed(self, directory):
        raise KeyboardInterrupt  # the process dies after writing the new gate, before the header

    monkeypatch.setattr(datastore.Header, "write", killed)
    with pytest.raises(KeyboardInterrupt):
        write_gate(ds, {"gate": 2})
    monkeypatch.undo()
    again = open_datastore(copy)
    assert read_gate(again)[0] == {"gate": 1}  # the previous gate: in place, its hash intact
    write_gate(again, {"gate": 3})
    assert read_header(copy).gate["file"] == "gate.r1.json" and not (copy / "gate.json").exists()
    assert read_gate(open_datastore(copy))[0] == {"gate": 3}


# ------------------------------------------------------------------ 5. readers pin one generation


def test_a_reader_refuses_an_index_swapped_under_it(copy):
    ds = open_datastore(copy)
    reindex_datastore(copy, index="flat", progress=False)  # another process, between open and search
    with pytest.raises(DatastoreError, match="changed while it was being read") as exc:
        _ = ds.index
    _one_line(exc.value)
    assert open_datastore(copy).index.ntotal == len(ds)  # a fresh reader sees the new generation


def test_overwrite_builds_beside_and_a_kill_keeps_the_previous_datastore(tiny_tokenizer, tmp_path, monkeypatch):
    from knnlm import BuildConfig, build_datastore, datastore
    from knnlm.testing import make_tiny_model

    model = make_tiny_model("llama")
    out = tmp_path / "ds"
    cfg = BuildConfig(context=64, index="flat", progress=False)
    old = build_datastore(model, tiny_tokenizer, corpus_paths(["keyword.py"]), out, cfg)
    values, generation = np.asarray(old.values).copy(), old.header.generation
    real = datastore.build_index

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies while the new index is built

    monkeypatch.setattr(datastore, "build_index", killed)
    over = BuildConfig(context=64, index="flat", progress=False, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        build_datastore(model, tiny_tokenizer, corpus_paths(["fnmatch.py"]), out, over)
    kept = open_datastore(out)  # the previous datastore: whole, same rows, same generation
    assert kept.header.generation == generation and np.array_equal(np.asarray(kept.values), values)
    assert kept.index.ntotal == len(values) and not (out / LOCK).exists()
    monkeypatch.setattr(datastore, "build_index", real)
    new = build_datastore(model, tiny_tokenizer, corpus_paths(["fnmatch.py"]), out, over)
    assert new.path == out and new.header.generation != generation and new.documents[0]["name"].endswith("fnmatch.py")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # the work directory is gone


def test_sigkill_during_overwrite_keeps_the_previous_datastore_byte_for_byte(tmp_path, slow_model_dir,
                                                                            corpus_dir):
    """A real `knnlm build-index --overwrite` killed with SIGKILL while it extracts keys beside the
    old datastore: every file of the old one is unchanged (same rows, same index: the same
    perplexity), and the same command again finishes the new one and swaps it in."""
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parent.parent
    files = sorted(str(p) for p in corpus_dir.iterdir())
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "knnlm", "build-index", "--model", str(slow_model_dir), "--data", *files,
           "--index", "flat", "--context", "32", "--batch-size", "1", "--quiet", "--out", str(out)]
    subprocess.run([*cmd, "--max-tokens", "1000"], check=True, cwd=repo, capture_output=True, timeout=300)
    before = {p.name: _digest(p) for p in out.iterdir()}
    generation = read_header(out).generation
    env = dict(os.environ, KNNLM_COMMIT_SECONDS="0.1")
    proc = subprocess.Popen([*cmd, "--max-tokens", "3000", "--overwrite"], cwd=repo, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stage, deadline = tmp_path / ".ds.overwrite", time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        h = read_header(stage) if (stage / "header.json").exists() else None
        if h is not None and h.count > 0:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the overwrite finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    after = {p.name: _digest(p) for p in out.iterdir() if p.name != LOCK}
    assert after == before
    kept = open_datastore(out)
    assert kept.header.generation == generation and kept.index.ntotal == len(kept)
    res = subprocess.run([*cmd, "--max-tokens", "3000", "--overwrite"], cwd=repo, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    new = open_datastore(out)
    assert new.header.generation != generation and new.header.tokens > kept.header.tokens
    assert not stage.exists() and not (out / LOCK).exists()


# ------------------------------------------------------------------ 6. full or read-only disks


@pytest.mark.parametrize("err", [OSError(errno.EROFS, os.strerror(errno.EROFS)),
                                 OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                                 RuntimeError("Error in faiss::FileIOWriter: 'ret == (n)' failed: write error in "
                                              f"x: 0 != 1 ({os.strerror(errno.ENOSPC)})")])
def test_write_errors_of_python_and_faiss_are_one_line(err, tmp_path):
    with pytest.raises(DatastoreError) as exc, disk_errors(tmp_path, "reindex"):
        raise err
    assert "run `knnlm reindex` again" in _one_line(exc.value)


def test_a_file_size_limit_during_reindex_is_one_line(copy):
    import subprocess
    import sys

    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); "
            "from knnlm.cli import main; sys.exit(main(['reindex', sys.argv[1], '--index', 'flat', '--quiet']))")
    before = {p.name: _digest(p) for p in copy.iterdir() if p.is_file()}
    proc = subprocess.run([sys.executable, "-c", code, str(copy)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "knnlm reindex: error:" in proc.stderr, proc.stderr
    assert open_datastore(copy).index.ntotal == len(open_datastore(copy))
    after = {p.name: _digest(p) for p in copy.iterdir() if p.is_file()}
    assert after == before


def test_on_disk_lists_that_would_not_fit_are_refused_before_faiss_maps_them(copy, monkeypatch):
    from collections import namedtuple

    before = open_datastore(copy).header.index
    real = os.statvfs
    full = namedtuple("statvfs", "f_bavail f_frsize")(0, 4096)
    monkeypatch.setattr(os, "statvfs", lambda p: full if Path(p) == copy else real(p))
    with pytest.raises(DatastoreError, match="no space left.*inverted lists need about") as exc:
        reindex_datastore(copy, index="IVF4,Flat", index_storage="disk", progress=False)
    assert "run `knnlm reindex` again" in _one_line(exc.value)
    monkeypatch.undo()
    assert open_datastore(copy).header.index == before  # the old index still in use
    assert sorted(p.name for p in copy.iterdir() if p.name.startswith(".")) == []


def test_a_read_only_datastore_refuses_a_writer_with_one_line(copy, monkeypatch):
    from knnlm import datastore

    def read_only(path, flags, mode=0o644):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(datastore, "open_own", read_only)
    with pytest.raises(DatastoreError, match="Read-only file system") as exc:
        write_gate(open_datastore(copy), {"gate": 1})
    _one_line(exc.value)


def test_a_full_disk_when_the_lock_is_written_is_one_line_and_leaves_no_lock(copy, monkeypatch):
    """`knnlm tune` on a full tmpfs: the lock file could be created (no data) but not written,
    and the OSError escaped as a traceback with the lock file left behind."""
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    before = {p.name: _digest(p) for p in copy.iterdir()}
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(DatastoreError, match="no space left .* writer lock") as exc:
        write_gate(open_datastore(copy), {"gate": 1})
    _one_line(exc.value)
    monkeypatch.undo()
    assert {p.name: _digest(p) for p in copy.iterdir()} == before  # no .knnlm.lock left


def test_token_ids_outside_the_vocabulary_are_refused_when_written(copy, tmp_path):
    from knnlm.errors import CorpusError

    header = read_header(copy)
    writer = DatastoreWriter.start(tmp_path / "new", header)
    try:
        with pytest.raises(CorpusError, match="token id 384 outside the model's vocabulary"):
            writer.write_corpus([({"name": "a.py", "source": 0, "sha256": "0"}, np.array([5, 384, 7]))],
                                progress=False)
    finally:
        writer.discard()
    assert not (tmp_path / "new").exists()
