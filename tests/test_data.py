import gzip
import json

import pytest

from knnlm.data import CorpusError, Source, iter_documents, resolve_sources, sha256_file, windows


@pytest.mark.parametrize("n, context, stride", [(1, 4, 3), (2, 4, 3), (10, 4, 3), (10, 4, 1), (10, 4, 2),
                                                (3, 8, 7), (100, 16, 5), (17, 16, 15)])
def test_windows_score_every_target_once_within_context(n, context, stride):
    ws = list(windows(n, context, stride))
    targets = [j for _, end, first in ws for j in range(first, end)]
    assert targets == list(range(1, n))
    for start, end, first in ws:
        assert end - start <= context and start <= first - 1  # the predicting position is in the window
        if first > 1:  # later windows: at least context - stride tokens of left context
            assert first - start >= min(context - stride, first)


def test_windows_reject_bad_stride():
    with pytest.raises(ValueError, match="stride"):
        list(windows(10, 4, 4))


def test_sources_directories_globs_jsonl(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.py").write_text("print(1)\n")
    (tmp_path / "d" / "sub" / "b.py").write_text("x = 2\n")
    (tmp_path / "d" / "sub" / "skip.txt").write_text("no\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "hello"}) + "\n\n" + json.dumps({"body": "bye"}) + "\n")
    srcs = resolve_sources([tmp_path / "d", tmp_path / "c.jsonl"], globs=["*.py"])
    assert [s.path.split("/")[-1] for s in srcs] == ["a.py", "b.py", "c.jsonl"]
    docs = list(iter_documents(srcs, text_field="body"))
    assert [d.text for d in docs] == ["print(1)\n", "x = 2\n", "hello", "bye"]
    assert docs[3].name.endswith("c.jsonl:3") and docs[3].source == 2
    with pytest.raises(CorpusError, match="`text_field`"):
        list(iter_documents(srcs, text_field="text"))


def test_hf_dataset_on_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["one two", "three"]}).save_to_disk(str(tmp_path / "ds"))
    srcs = resolve_sources([tmp_path / "ds"])
    assert srcs[0].kind == "hf_dataset"
    assert [d.text for d in iter_documents(srcs)] == ["one two", "three"]


@pytest.mark.parametrize("content, match", [(b"\x00\x01binary", "binary"), (b"caf\xe9 latin-1", "UTF-8")])
def test_undecodable_files_are_refused(tmp_path, content, match):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    with pytest.raises(CorpusError, match=match):
        list(iter_documents(resolve_sources([f])))


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        resolve_sources([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no files"):
        resolve_sources([tmp_path / "empty"])


def test_jsonl_line_ends_and_unicode_separators(tmp_path):
    """Lines end at LF, CR LF or a bare CR and are numbered as before; a raw U+2028 / U+0085 inside
    a JSON string (valid JSON, a line break to str.splitlines) stays in the text."""
    f = tmp_path / "c.jsonl"
    f.write_bytes('{"text": "a"}\r\n\r\n{"text": "b\u2028c"}\r{"text": "d\u0085e"}\n{"text": "f"}'.encode())
    docs = list(iter_documents(resolve_sources([f], text_field="text")))
    assert [(d.name.rsplit(":", 1)[1], d.text) for d in docs] == \
           [("1", "a"), ("3", "b\u2028c"), ("4", "d\u0085e"), ("5", "f")]


def test_jsonl_first_lines_checked_before_reading(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    resolve_sources([f])  # without `text_field`, the lines are not looked at
    with pytest.raises(CorpusError, match=r"c.jsonl:2: no string field 'text'"):
        resolve_sources([f], text_field="text")
    f.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match="not valid UTF-8"):
        resolve_sources([f])
    unchecked = Source(str(f), "jsonl", f.stat().st_size, sha256_file(f))  # reading checks every line
    with pytest.raises(CorpusError, match=r"c.jsonl:2: not valid UTF-8"):
        list(iter_documents([unchecked]))


def test_compressed_file_of_another_kind_says_what_is_read(tmp_path):
    f = tmp_path / "notes.txt.gz"
    f.write_bytes(gzip.compress(b"some text\n", mtime=0))
    with pytest.raises(CorpusError, match=r"binary.*only \.jsonl\.gz and \.jsonl\.zst"):
        resolve_sources([f])
