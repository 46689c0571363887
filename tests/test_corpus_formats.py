"""Corpora as big datasets ship them: Parquet files (and directories of them), ``.jsonl.gz`` and
``.jsonl.zst``. The same texts build the same datastore as a ``.jsonl`` file; bad files and a
missing optional package give one-line errors, before any model loads where that is cheap."""

from __future__ import annotations

import gzip
import json
import sys

import pytest

from knnlm import BuildConfig, build_datastore
from knnlm.cli import main
from knnlm.data import CorpusError, check_build_inputs, iter_documents, resolve_sources, sha256_text
from knnlm.testing import corpus_paths, make_tiny_model

ARRAYS = ("keys.npy", "values.npy", "tokens.npy")
# the stdlib test corpus, plus texts that stress line handling: a raw U+2028 / U+0085 inside a
# string (a line separator to str.splitlines, not to JSON lines), CR LF inside the text, an empty text
TEXTS = [open(p, encoding="utf-8").read() for p in corpus_paths()] + [
    "x = 1\u2028y = 2\n", "a\r\nb\u0085c\n", "", "caf\u00e9 \u2603\n"]


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def _jsonl_bytes(texts, blank_lines=True) -> bytes:
    """One object per line (a blank line after each when ``blank_lines``: line numbers 1, 3, 5...)."""
    sep = "\n\n" if blank_lines else "\n"
    return "".join(json.dumps({"id": i, "text": t}, ensure_ascii=False) + sep for i, t in enumerate(texts)).encode()


def _zstd(data: bytes) -> bytes:
    return pytest.importorskip("zstandard").ZstdCompressor().compress(data)


def _write_parquet(path, table: dict, row_group_size: int = 2) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table(table), str(path), row_group_size=row_group_size)


def _write(fmt: str, d) -> tuple[list, list[str]]:
    """TEXTS in format ``fmt`` under ``d``: (the `data` paths, each document's name without its path)."""
    d.mkdir()
    lines = [f":{2 * i + 1}" for i in range(len(TEXTS))]
    half = len(TEXTS) // 2
    if fmt == "jsonl":
        (d / "c.jsonl").write_bytes(_jsonl_bytes(TEXTS))
        return [d / "c.jsonl"], lines
    if fmt == "jsonl.gz":  # two gzip members, read one after the other
        data = _jsonl_bytes(TEXTS)
        cut = data.index(b"\n\n", len(data) // 2) + 1
        (d / "c.jsonl.gz").write_bytes(gzip.compress(data[:cut]) + gzip.compress(data[cut:]))
        return [d / "c.jsonl.gz"], lines
    if fmt == "jsonl.zst":  # two zstd frames
        data = _jsonl_bytes(TEXTS)
        cut = data.index(b"\n\n", len(data) // 2) + 1
        (d / "c.jsonl.zst").write_bytes(_zstd(data[:cut]) + _zstd(data[cut:]))
        return [d / "c.jsonl.zst"], lines
    if fmt == "parquet":  # several row groups
        _write_parquet(d / "c.parquet", {"id": list(range(len(TEXTS))), "text": TEXTS})
        return [d / "c.parquet"], [f"[{i}]" for i in range(len(TEXTS))]
    if fmt == "parquet-dir":  # a directory of Parquet files, read in sorted order
        _write_parquet(d / "part-1.parquet", {"text": TEXTS[half:]})
        _write_parquet(d / "part-0.parquet", {"text": TEXTS[:half]})
        return [d], [f"[{i}]" for i in range(half)] + [f"[{i}]" for i in range(len(TEXTS) - half)]
    raise AssertionError(fmt)


@pytest.fixture(scope="module")
def tiny_llama():
    return make_tiny_model("llama")


def _build(model, tokenizer, data, out, monkeypatch):
    monkeypatch.setattr("knnlm.data.READ_BYTES", 1000)  # blocks end mid-line: lines are joined across them
    return build_datastore(model, tokenizer, data, out, BuildConfig(context=64, index="flat", progress=False))


@pytest.fixture(scope="module")
def jsonl_store(tmp_path_factory, tiny_llama, tiny_tokenizer):
    d = tmp_path_factory.mktemp("jsonl")
    data, _ = _write("jsonl", d / "corpus")
    with pytest.MonkeyPatch.context() as mp:
        return _build(tiny_llama, tiny_tokenizer, data, d / "ds", mp).path


def _header(path) -> dict:
    h = json.loads((path / "header.json").read_text())
    for drop in ("created", "generation"):  # when it was built, and its random generation id
        h.pop(drop)
    h["build"].pop("stats")
    h["index"].pop("build_seconds")
    return h


@pytest.mark.parametrize("fmt", ["jsonl.gz", "jsonl.zst", "parquet", "parquet-dir"])
def test_same_texts_same_datastore(fmt, tmp_path, jsonl_store, tiny_llama, tiny_tokenizer, monkeypatch):
    data, suffixes = _write(fmt, tmp_path / "corpus")
    ds = _build(tiny_llama, tiny_tokenizer, data, tmp_path / "ds", monkeypatch).path
    for name in ARRAYS:
        assert (ds / name).read_bytes() == (jsonl_store / name).read_bytes(), name
    docs, ref = (json.loads((p / "documents.json").read_text()) for p in (ds, jsonl_store))
    assert len(docs) == len(ref) == len(TEXTS)
    assert [d["sha256"] for d in ref] == [sha256_text(t) for t in TEXTS]  # the texts as written, in order
    sources = json.loads((ds / "header.json").read_text())["corpus"]["sources"]
    for doc, suffix in zip(docs, suffixes):  # names: the source's path, then :line or [row]
        assert doc["name"] == sources[doc["source"]]["path"] + suffix
    strip = ("name", "source")
    assert [{k: v for k, v in d.items() if k not in strip} for d in docs] == \
           [{k: v for k, v in d.items() if k not in strip} for d in ref]
    h, h_ref = _header(ds), _header(jsonl_store)
    assert [s["kind"] for s in h["corpus"].pop("sources")] == [fmt.replace("-dir", "")] * len(sources)
    h_ref["corpus"].pop("sources")
    assert h == h_ref


@pytest.mark.parametrize("read_bytes", [1, 7, 4096])
def test_jsonl_lines_do_not_depend_on_read_blocks(tmp_path, monkeypatch, read_bytes):
    monkeypatch.setattr("knnlm.data.READ_BYTES", read_bytes)
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes(TEXTS)))
    docs = list(iter_documents(resolve_sources([tmp_path / "c.jsonl.gz"], text_field="text")))
    assert [d.text for d in docs] == TEXTS
    assert [d.name.rsplit(":", 1)[1] for d in docs] == [str(2 * i + 1) for i in range(len(TEXTS))]


# ---------------------------------------------------------------------------- errors


def test_parquet_column_missing_or_not_text(tmp_path):
    f = tmp_path / "rows.parquet"
    _write_parquet(f, {"id": [1, 2], "body": ["a", "b"]})
    with pytest.raises(CorpusError) as e:  # before the model: in the build's checks
        check_build_inputs([f], BuildConfig(index="flat"))
    assert str(f) in _one_line(e) and "no column 'text'" in str(e.value) and "columns: id, body" in str(e.value)
    assert e.value.param == "text_field"
    with pytest.raises(CorpusError, match="no column 'text'"):  # and when reading sources checked without it
        list(iter_documents(resolve_sources([f])))
    with pytest.raises(CorpusError) as e:
        resolve_sources([f], text_field="id")
    assert "column 'id' holds int64, not strings" in _one_line(e)
    assert [d.text for d in iter_documents(resolve_sources([f], text_field="body"), "body")] == ["a", "b"]


def test_parquet_nulls_are_empty_documents(tmp_path):
    f = tmp_path / "rows.parquet"
    _write_parquet(f, {"text": ["a", None, "c"]})
    docs = list(iter_documents(resolve_sources([f], text_field="text")))
    assert [(d.name[-3:], d.text) for d in docs] == [("[0]", "a"), ("[1]", ""), ("[2]", "c")]


def test_cli_names_the_missing_column_before_loading_a_model(tmp_path, capsys):
    f = tmp_path / "rows.parquet"
    _write_parquet(f, {"content": ["a b c"]})
    code = main(["build-index", "--model", str(tmp_path / "no-model"), "--data", str(f), "--out",
                 str(tmp_path / "ds")])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1, err
    assert "no column 'text'" in err and "columns: content" in err and "--text-field" in err, err
    assert not (tmp_path / "ds").exists()


def test_corrupt_parquet(tmp_path):
    f = tmp_path / "rows.parquet"
    _write_parquet(f, {"text": ["a", "b"]})
    data = f.read_bytes()
    for bad in (b"not parquet at all", data[: len(data) // 2]):  # garbage, a file cut short
        f.write_bytes(bad)
        with pytest.raises(CorpusError) as e:
            resolve_sources([f])
        assert f"{f} is not a readable Parquet file" in _one_line(e)


@pytest.mark.parametrize("ext, compress", [("gz", gzip.compress), ("zst", _zstd)])
def test_corrupt_or_truncated_compressed_jsonl(tmp_path, monkeypatch, ext, compress):
    f = tmp_path / f"c.jsonl.{ext}"
    fmt = "gzip" if ext == "gz" else "zstd"
    f.write_bytes(b'{"text": "plain, not compressed"}\n')
    with pytest.raises(CorpusError) as e:
        resolve_sources([f])
    assert f"{f}: corrupt or truncated {fmt} data" in _one_line(e)
    data = compress(_jsonl_bytes(TEXTS))
    f.write_bytes(data[:-6])  # a small file cut short: the whole of it is checked before the model
    with pytest.raises(CorpusError, match=f"corrupt or truncated {fmt} data"):
        resolve_sources([f])
    # a big one (several zstd blocks) is checked by its first bytes; reading streams up to the
    # damage, then names the file
    data = compress(_jsonl_bytes(TEXTS * 30))
    f.write_bytes(data[:-6])
    monkeypatch.setattr("knnlm.data.READ_BYTES", 256)
    srcs = resolve_sources([f])
    docs = iter_documents(srcs)
    assert next(docs).text == TEXTS[0]
    with pytest.raises(CorpusError) as e:
        list(docs)
    assert f"{f}: corrupt or truncated {fmt} data" in _one_line(e)


@pytest.mark.parametrize("ext, compress", [("gz", gzip.compress), ("zst", _zstd)])
def test_bad_json_line_in_compressed_jsonl(tmp_path, ext, compress):
    f = tmp_path / f"c.jsonl.{ext}"
    f.write_bytes(compress(b'{"text": "ok"}\n{"text": oops}\n'))
    with pytest.raises(CorpusError) as e:  # in the first bytes: found before the model
        resolve_sources([f], text_field="text")
    assert _one_line(e).startswith(f"{f}:2: invalid JSON")
    long = json.dumps({"text": "x" * 20000}).encode() + b"\n"
    f.write_bytes(compress(long * 3 + b'{"text": 3}\n'))  # past the first bytes: found while reading
    srcs = resolve_sources([f], text_field="text")
    with pytest.raises(CorpusError) as e:
        list(iter_documents(srcs))
    assert _one_line(e).startswith(f"{f}:4: no string field 'text'")
    f.write_bytes(compress(b'{"text": "caf\xe9"}\n'))
    with pytest.raises(CorpusError, match="not valid UTF-8"):
        resolve_sources([f])


@pytest.mark.parametrize("kind, name, modules, package", [
    ("parquet", "rows.parquet", ("pyarrow", "pyarrow.parquet"), "pyarrow"),
    ("zstd", "c.jsonl.zst", ("zstandard",), "zstandard"),
])
def test_missing_optional_package(tmp_path, monkeypatch, kind, name, modules, package):
    f = tmp_path / name
    f.write_bytes(b"whatever: the package is missing, the file is never opened")
    (tmp_path / "other.txt").write_text("plain text\n")
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)  # `import m` raises ImportError
    with pytest.raises(CorpusError) as e:
        resolve_sources([tmp_path])
    msg = _one_line(e)
    assert str(f) in msg and f"`pip install {package}`" in msg and "knnlm[formats]" in msg, msg
