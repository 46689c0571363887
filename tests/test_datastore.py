"""The on-disk datastore: merging shards (sources de-duplicated), and refusing files that do not
match their header. Oracles: a single build over the same documents, and hand-edited copies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from knnlm import BuildConfig, DatastoreError, build_datastore, merge_datastores, open_datastore, subset_datastore
from knnlm.cli import main
from knnlm.corpora import stdlib_root

ARRAYS = ("keys.npy", "values.npy", "tokens.npy")


def _header(ds) -> dict:
    """The header as written on disk (header.json)."""
    return json.loads((Path(ds.path) / "header.json").read_text())


def _cfg(**kw):
    return BuildConfig(context=40, index="flat", progress=False, **kw)


@pytest.fixture
def shard_corpus(tmp_path):
    """A text file, a jsonl file of four records and another text file (absolute paths)."""
    d = tmp_path / "corpus"
    d.mkdir()
    shutil.copy(stdlib_root() / "keyword.py", d / "a_keyword.py")
    text = (stdlib_root() / "colorsys.py").read_text()
    records = [text[i: i + 400] for i in range(0, 1600, 400)]
    (d / "b_records.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in records))
    c = (stdlib_root() / "bisect.py").read_text()[:1500]
    (d / "c_bisect.py").write_text(c)
    return [str(d / "a_keyword.py"), str(d / "b_records.jsonl"), str(d / "c_bisect.py")]


def test_merge_of_three_shards_deduplicates_sources(tiny_model, tiny_tokenizer, shard_corpus, tmp_path):
    """Shards made the way the README makes them: the first from a --max-tokens build over all the
    inputs (so its header lists every source, the jsonl included) cut back to whole documents, the
    others from the remaining inputs, one of them the same jsonl file. The merged datastore lists
    each source once, remaps the documents' source indices, and equals one build over everything."""
    a_txt, jsonl, c_txt = shard_corpus
    whole = build_datastore(tiny_model, tiny_tokenizer, shard_corpus, tmp_path / "whole", _cfg())
    assert [d["source"] for d in whole.documents] == [0, 1, 1, 1, 1, 2]
    n_first = whole.documents[0]["length"]
    cut = build_datastore(tiny_model, tiny_tokenizer, shard_corpus, tmp_path / "cut", _cfg(max_tokens=n_first + 7))
    assert [d["name"] for d in cut.documents] == [a_txt, f"{jsonl}:1"]  # the jsonl's first record was cut
    s1 = subset_datastore(cut, tmp_path / "s1", n_first, index="flat", progress=False)
    s2 = build_datastore(tiny_model, tiny_tokenizer, [jsonl], tmp_path / "s2", _cfg())
    s3 = build_datastore(tiny_model, tiny_tokenizer, [c_txt], tmp_path / "s3", _cfg())
    assert len(_header(s1)["corpus"]["sources"]) == 3 and [d["source"] for d in s1.documents] == [0]
    assert [d["source"] for d in s2.documents] == [0, 0, 0, 0] and [d["source"] for d in s3.documents] == [0]

    merged = merge_datastores([s1.path, s2.path, s3.path], tmp_path / "merged", index="flat", progress=False)
    mh, wh = _header(merged), _header(whole)
    assert mh["status"] == "complete"
    # each source once, in first-seen order, equal to the single build's list
    assert mh["corpus"]["sources"] == wh["corpus"]["sources"]
    assert [s["path"] for s in mh["corpus"]["sources"]] == shard_corpus
    # documents: source indices remapped into the merged list, offsets and rows shifted
    assert merged.documents == whole.documents
    for name in ("documents.json", "index.faiss", *ARRAYS):  # the files, byte for byte
        assert (tmp_path / "merged" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert mh["corpus"]["documents"] == len(whole.documents) == 6
    for k in ("count", "total", "tokens"):
        assert mh[k] == wh[k], k
    # and the arrays as opened
    pairs = ((merged.keys, whole.keys), (merged.values, whole.values), (merged.tokens, whole.tokens))
    for name, (a, b) in zip(ARRAYS, pairs):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), name
    assert merged.provenance([len(s1) + len(s2) + 2]) == [(c_txt, 3)]
    assert [m["keys"] for m in mh["build"]["merged_from"]] == [len(s1), len(s2), len(s3)]


# ---------------------------------------------------------------------------------------------
# files that disagree with the header are refused, with a one-line message


def _edit_header(path, **changes):
    h = json.loads((path / "header.json").read_text())
    h.update(changes)
    (path / "header.json").write_text(json.dumps(h, indent=1))


def _corrupt(case: str, path) -> list[str]:
    """Damage the datastore copy at ``path``; return what the error must mention."""
    h = json.loads((path / "header.json").read_text())
    n = int(h["count"])
    if case == "format-version":
        _edit_header(path, format_version=999)
        return ["999"]
    if case == "count-below-total":
        _edit_header(path, count=n - 1)
        return [str(n - 1)]
    if case == "count-and-total-disagree-with-keys":
        _edit_header(path, count=n - 1, total=n - 1)
        return ["keys.npy"]
    if case == "keys-wrong-shape":
        keys = np.load(path / "keys.npy")
        np.save(path / "keys.npy", keys[:-1])
        return ["keys.npy"]
    if case == "keys-wrong-dim":
        keys = np.load(path / "keys.npy")
        np.save(path / "keys.npy", keys[:, :-1])
        return ["keys.npy"]
    if case == "keys-wrong-dtype":
        keys = np.load(path / "keys.npy")
        np.save(path / "keys.npy", keys.astype(np.float32))
        return ["keys.npy"]
    if case == "tokens-count":
        _edit_header(path, tokens=int(h["tokens"]) + 1)
        return ["tokens.npy"]
    if case == "document-dropped":
        docs = json.loads((path / "documents.json").read_text())
        (path / "documents.json").write_text(json.dumps(docs[:-1]))
        return ["documents"]
    if case == "status-building":
        _edit_header(path, status="building")
        return ["incomplete"]
    if case == "header-not-json":
        (path / "header.json").write_text('{"format": "knnlm-datastore", ')
        return ["header.json"]
    raise AssertionError(case)


CORRUPTIONS = ["format-version", "count-below-total", "count-and-total-disagree-with-keys", "keys-wrong-shape",
               "keys-wrong-dim", "keys-wrong-dtype", "tokens-count", "document-dropped", "status-building",
               "header-not-json"]


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_open_refuses_files_that_disagree_with_the_header(case, tiny_store, tmp_path, capsys):
    _, ds = tiny_store
    copy = tmp_path / "copy"
    shutil.copytree(ds.path, copy)
    open_datastore(copy)  # the intact copy opens
    names = _corrupt(case, copy)
    with pytest.raises(DatastoreError) as exc:
        open_datastore(copy)
    msg = str(exc.value)
    assert "\n" not in msg
    for name in names:
        assert name in msg, (name, msg)
    # the command line refuses it with that one line (merge opens its inputs before anything else)
    code = main(["merge", str(copy), str(ds.path), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("knnlm merge: error: "), err
    for name in names:
        assert name in err, (name, err)
    assert not (tmp_path / "out").exists()


def test_open_refuses_documents_that_disagree_with_the_rows(tiny_store, tmp_path):
    """documents.json says where each key row comes from (provenance, self-exclusion in eval): a
    document list whose rows do not add up to the header's count is corrupt, even when the number
    of documents is right."""
    _, ds = tiny_store
    copy = tmp_path / "copy"
    shutil.copytree(ds.path, copy)
    docs = json.loads((copy / "documents.json").read_text())
    docs[-1]["length"] -= 5  # rows of the last document no longer reach the end of keys.npy
    (copy / "documents.json").write_text(json.dumps(docs))
    with pytest.raises(DatastoreError, match="documents"):
        open_datastore(copy)


def test_a_second_writer_of_the_same_directory_is_refused(tiny_store, tiny_tokenizer, tmp_path, capsys):
    """Two builds into one `out` at once: the one that comes second is refused with a one-line
    error while the first holds the directory's lock, and the first's datastore is intact."""
    import fcntl
    import os

    from knnlm.cli import main
    from knnlm.datastore import LOCK, DatastoreWriter, read_header

    _, ds = tiny_store
    out = tmp_path / "busy"
    shutil.copytree(ds.path, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT)  # another process's writer, as far as flock can tell
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(DatastoreError, match="being written by another process"):
            DatastoreWriter.start(out, read_header(out), resume=True)
        rc = main(["build-index", "--model", str(tiny_store_model_dir(tmp_path, tiny_tokenizer)), "--data",
                   *[s["path"] for s in ds.header.corpus.sources], "--out", str(out), "--context", "64",
                   "--index", "flat", "--overwrite", "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and "being written by another process" in err[-1] and "--out" in err[-1]
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != LOCK}
    assert after == {k: v for k, v in before.items() if k != LOCK}  # --overwrite changed nothing
    writer = DatastoreWriter.start(out, read_header(out), resume=True)  # free again
    writer.release()


def tiny_store_model_dir(tmp_path, tokenizer):
    from knnlm.testing import save_tiny_model

    d = tmp_path / "model"
    save_tiny_model(d, tokenizer)
    return d
