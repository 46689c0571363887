"""Compressed indexes trained once, filled in shards, merged into RAM or onto disk; keyless
datastores; reindex; header versions. Oracles: exact search (IndexFlat / brute force over the
keys), the one-shard build (bytes), the RAM index (search results), the old header format."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import knnlm.index as kindex
from knnlm import BuildConfig, DatastoreError, build_datastore, open_datastore
from knnlm.cli import main
from knnlm.datastore import Header, build_index
from knnlm.derive import reindex_datastore
from knnlm.errors import ConfigError, IndexSpecError
from knnlm.index import gpu_clone_settings, load_index, merge_shards, plan_index
from knnlm.retrieval import Retriever
from knnlm.testing import corpus_paths


def _lists(directory, rec: dict) -> dict:
    """``load_index``'s inverted-lists arguments from ``build_index``'s record (none in RAM)."""
    return {"ivfdata": directory / rec["ivfdata"], "ivfdata_bytes": rec["ivfdata_bytes"]} if rec["ivfdata"] else {}

def _keys(tmp_path: Path, n: int = 6000, d: int = 32, seed: int = 0) -> tuple[Path, np.ndarray]:
    keys = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float16)
    path = tmp_path / "keys.npy"
    np.save(path, keys)
    return path, keys.astype(np.float32)


def _digest(paths) -> list[str]:
    return [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]


@pytest.fixture
def small_grid(monkeypatch):
    """A global add grid of 1,000 rows, so that shard boundaries cut grid chunks."""
    monkeypatch.setattr(kindex, "ADD_CHUNK_ROWS", 1000)


@pytest.mark.parametrize("factory", ["IVF16,PQ8", "IVF16,SQfp16", "Flat"])
@pytest.mark.parametrize("storage", ["ram", "disk"])
def test_shards_merge_to_the_bytes_of_one_pass(factory, storage, small_grid, tmp_path):
    path, keys = _keys(tmp_path)
    n, d = keys.shape
    plan = plan_index(factory, n, d, storage=storage)
    digests, results = [], []
    q = keys[:30] + 0.05
    for shards in (1, 3):
        out = tmp_path / f"s{shards}"
        out.mkdir()
        rec = build_index(path, n, d, plan, out / "index.faiss", progress=False, shards=shards)
        assert rec["ntotal"] == n and rec["storage"] == storage
        files = sorted(out.iterdir())
        assert [f.name for f in files] == (["index.faiss", "index.ivfdata"] if storage == "disk" and "IVF" in factory
                                           else ["index.faiss"])  # nothing staged is left behind
        digests.append(_digest(files))
        index = load_index(out / "index.faiss", n=n, dim=d, nprobe=16, storage=storage, **_lists(out, rec),
                           use_gpu=False)
        results.append(index.search(q, 10))
    assert digests[0] == digests[1]  # 3 shards (boundaries 2000, 4000 inside grid chunks) == 1 pass
    np.testing.assert_array_equal(results[0][1], results[1][1])


def test_disk_and_ram_search_identically_and_match_exact_search(tmp_path):
    """IVF-SQfp16 with every list probed over fp16 keys is exact: both storages return the
    brute-force neighbours; an IVF-PQ index returns the same results from RAM and from disk."""
    import faiss

    path, keys = _keys(tmp_path)
    n, d = keys.shape
    q = keys[:40] + 0.05
    brute = ((q[:, None, :] - keys[None]) ** 2).sum(-1)  # (Q, N)
    exact = np.argsort(brute, axis=1, kind="stable")[:, :10]
    for factory, nprobe in (("IVF16,SQfp16", 16), ("IVF16,PQ8", 4)):
        found = {}
        for storage in ("ram", "disk"):
            out = tmp_path / f"{factory}-{storage}".replace(",", "_")
            out.mkdir()
            rec = build_index(path, n, d, plan_index(factory, n, d, storage=storage), out / "index.faiss",
                              progress=False)
            index = load_index(out / "index.faiss", n=n, dim=d, nprobe=nprobe, storage=storage, **_lists(out, rec),
                               use_gpu=False)
            lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
            assert isinstance(lists, faiss.OnDiskInvertedLists) == (storage == "disk")
            found[storage] = index.search(q, 10)
        np.testing.assert_array_equal(found["ram"][1], found["disk"][1])
        np.testing.assert_array_equal(found["ram"][0], found["disk"][0])
        if factory == "IVF16,SQfp16":
            np.testing.assert_array_equal(found["disk"][1], exact)


def test_disk_index_maps_its_coarse_quantizer_and_searches_the_same(tmp_path):
    """On CPU, an on-disk IVF index's coarse quantizer (centroids, HNSW graph) is a view of the
    mapped index file, not a copy in RAM; results are those of FAISS's own read of the file."""
    import faiss

    path, keys = _keys(tmp_path)
    n, d = keys.shape
    q = keys[:40] + 0.05
    for factory in ("IVF64_HNSW32,PQ8", "IVF64,PQ8"):
        out = tmp_path / factory.replace(",", "_")
        out.mkdir()
        rec = build_index(path, n, d, plan_index(factory, n, d, storage="disk"), out / "index.faiss", progress=False)
        index = load_index(out / "index.faiss", n=n, dim=d, nprobe=8, storage="disk", **_lists(out, rec),
                           use_gpu=False)
        ivf = faiss.extract_index_ivf(index)
        assert isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)
        quantizer = faiss.downcast_index(ivf.quantizer)
        flat = faiss.downcast_index(quantizer.storage) if "HNSW" in factory else quantizer
        assert not flat.codes.is_owned, factory  # a view of the mapped file
        plain = faiss.read_index(str(out / "index.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
        assert faiss.downcast_index(faiss.extract_index_ivf(plain).quantizer).ntotal == 64
        faiss.extract_index_ivf(plain).nprobe = 8
        for a, b in zip(index.search(q, 10), plain.search(q, 10)):
            np.testing.assert_array_equal(a, b)
        del plain
        index.search(q, 10)  # the mapped index does not depend on the other read


_LOAD_AND_SEARCH = """
import json, sys
import numpy as np
from knnlm.index import load_index

def anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024

path, storage, ivfdata, n, d = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
q = np.load(sys.argv[6])
before = anon()
lists = path.replace(".faiss", ".ivfdata") if ivfdata is not None else None
index = load_index(path, n=n, dim=d, nprobe=64, storage=storage, ivfdata=lists, ivfdata_bytes=ivfdata, use_gpu=False)
index.search(q, 16)
print(anon() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for RssAnon")
def test_an_index_on_disk_adds_no_anonymous_memory(tmp_path):
    """Loaded and searched in a fresh process, an on-disk index's lists are pages of a mapped file
    (page cache), not the process's anonymous memory; the same index in RAM adds its whole size."""
    import subprocess
    import sys

    path, keys = _keys(tmp_path, n=300_000, d=64)
    n, d = keys.shape
    np.save(tmp_path / "q.npy", keys[:256] + 0.05)
    grown = {}
    for storage in ("disk", "ram"):
        out = tmp_path / storage
        out.mkdir()
        rec = build_index(path, n, d, plan_index("IVF64,SQfp16", n, d, storage=storage), out / "index.faiss",
                          progress=False)
        size = rec["bytes"] / 2**20  # ~39 MiB of fp16 codes + ids
        res = subprocess.run([sys.executable, "-c", _LOAD_AND_SEARCH, str(out / "index.faiss"), storage,
                              json.dumps(rec["ivfdata_bytes"]), str(n), str(d), str(tmp_path / "q.npy")],
                             capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        grown[storage] = float(res.stdout.split()[-1]) / size  # every list probed: every page was read
    assert grown["disk"] < 0.25 and grown["ram"] > 0.9, grown  # disk: a few MiB of search buffers


def test_a_crash_before_the_final_rename_leaves_no_index(tmp_path, monkeypatch):
    path, keys = _keys(tmp_path, n=3000)
    n, d = keys.shape
    plan = plan_index("IVF16,PQ8", n, d, storage="disk")
    real = os.replace

    def crash_on_index(src, dst):
        if Path(dst).name == "index.faiss":
            raise OSError("simulated crash")
        return real(src, dst)

    monkeypatch.setattr(kindex.os, "replace", crash_on_index)
    with pytest.raises(OSError, match="simulated"):
        build_index(path, n, d, plan, tmp_path / "index.faiss", progress=False)
    assert not (tmp_path / "index.faiss").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or work dirs left


def test_graph_indexes_are_built_whole_and_refuse_disk(tmp_path):
    path, keys = _keys(tmp_path, n=2000)
    plan = plan_index("HNSW16", 2000, 32)
    assert not plan.shardable and plan.storage == "ram"
    rec = build_index(path, 2000, 32, plan, tmp_path / "index.faiss", progress=False, shards=4)
    assert rec["ntotal"] == 2000
    with pytest.raises(IndexSpecError, match="`index_storage` disk"):
        plan_index("HNSW16", 2000, 32, storage="disk")
    with pytest.raises(ConfigError, match="`index_storage` must be one of"):
        plan_index("flat", 2000, 32, storage="ssd")
    with pytest.raises(ValueError, match="no shards"):
        merge_shards(tmp_path / "index.faiss", [], tmp_path / "x.faiss")


def test_auto_storage_goes_to_disk_when_the_index_would_crowd_ram(monkeypatch):
    monkeypatch.setattr(kindex, "_physical_ram", lambda: 1 << 30)
    small = plan_index("ivfpq", 100_000, 64, storage="auto")
    big = plan_index("ivfpq", 20_000_000, 64, storage="auto")  # ~24 B/key * 20M > 1 GiB / 4
    assert (small.storage, big.storage) == ("ram", "disk")


def test_gpu_clone_uses_fp16_lookup_tables_for_64_byte_pq():
    import faiss

    assert gpu_clone_settings(faiss.index_factory(576, "IVF64,PQ64")) == {"shard": True, "useFloat16": True}
    assert gpu_clone_settings(faiss.index_factory(576, "IVF64,PQ16")) == {"shard": True, "useFloat16": False}
    assert gpu_clone_settings(faiss.index_factory(576, "IVF64,SQfp16"))["useFloat16"] is False


def test_gpu_search_matches_cpu(tmp_path):
    import faiss

    if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
        pytest.skip("needs faiss with CUDA GPUs (faiss-gpu); this faiss sees none")
    path, keys = _keys(tmp_path, n=20_000, d=64)
    rec = build_index(path, 20_000, 64, plan_index("IVF32,PQ64", 20_000, 64, storage="disk"),
                      tmp_path / "index.faiss", progress=False)
    cpu = load_index(tmp_path / "index.faiss", n=20_000, dim=64, nprobe=32, storage="disk",
                     **_lists(tmp_path, rec), use_gpu=False)
    gpu = load_index(tmp_path / "index.faiss", n=20_000, dim=64, nprobe=32, storage="disk",
                     **_lists(tmp_path, rec), use_gpu=True)
    q = keys[:64] + 0.05
    _, i_cpu = cpu.search(q, 16)
    _, i_gpu = gpu.search(q, 16)
    assert np.mean([len(set(a) & set(b)) / 16 for a, b in zip(i_cpu, i_gpu)]) > 0.95  # fp16 tables: near-equal


# ------------------------------------------------------------------------------------ datastores


@pytest.fixture(scope="module")
def keyless(tmp_path_factory, tiny_tokenizer):
    """(model, a keyless IVF-PQ datastore on disk, a keyed flat datastore) over the same corpus."""
    from knnlm.testing import make_tiny_model

    model = make_tiny_model("llama")
    root = tmp_path_factory.mktemp("keyless")
    files = corpus_paths(["keyword.py", "colorsys.py"])
    none = build_datastore(model, tiny_tokenizer, files, root / "none",
                           BuildConfig(context=64, index="IVF8,PQ8", index_storage="disk", key_dtype="none",
                                       progress=False))
    flat = build_datastore(model, tiny_tokenizer, files, root / "flat",
                           BuildConfig(context=64, index="flat", progress=False))
    return model, none, flat


def test_keyless_datastore_opens_searches_and_refuses_rerank(keyless):
    _, ds, flat = keyless
    assert ds.keys is None and not (ds.path / "keys.npy").exists()
    assert ds.header.key.dtype == "none" and ds.header.index_storage == "disk"
    assert sorted(p.name for p in ds.path.iterdir() if p.suffix in (".faiss", ".ivfdata", ".npy")) == [
        "index.faiss", "index.ivfdata", "tokens.npy", "values.npy"]
    reopened = open_datastore(ds.path)
    q = torch.from_numpy(np.asarray(flat.keys[:20], dtype=np.float32))
    dists, values, ids = Retriever(reopened, 8, nprobe=8).search(q)
    assert ids.shape == (20, 8) and (ids >= 0).all()
    assert (ids[:, 0] == torch.arange(20)).float().mean() > 0.5  # PQ finds most queries' own rows first
    assert torch.equal(values, torch.from_numpy(np.asarray(ds.values, dtype=np.int64))[ids])
    with pytest.raises(DatastoreError, match="`rerank` needs the stored keys"):
        Retriever(reopened, 8, rerank=True)
    with pytest.raises(DatastoreError, match="keeps none"):
        reindex_datastore(ds.path, index="flat")


def test_cli_refuses_rerank_on_a_keyless_datastore_before_loading_a_model(keyless, tmp_path, capsys):
    _, ds, _ = keyless
    text = tmp_path / "t.py"
    text.write_text("import os\n")
    code = main(["eval", "--datastore", str(ds.path), "--data", str(text), "--rerank",
                 "--model", str(tmp_path / "no-such-model"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("knnlm eval: error: --rerank needs the stored keys") and "--key-dtype none" in err


def test_cli_refuses_a_bad_index_storage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["build-index", "--data", "x", "--out", "y", "--index-storage", "ssd"])
    assert exc.value.code == 2
    assert "invalid choice: 'ssd'" in capsys.readouterr().err


def test_reindex_switches_the_index_atomically(keyless, tmp_path, monkeypatch, capsys):
    model, _, flat = keyless
    copy = tmp_path / "ds"
    shutil.copytree(flat.path, copy)
    q = torch.from_numpy(np.asarray(flat.keys[:16], dtype=np.float32)) + 0.01
    _, _, exact_ids = Retriever(open_datastore(copy), 8).search(q)

    # a reindex that dies before the header switch leaves the old index in use
    real = Header.write

    def die(self, directory):
        raise OSError("simulated crash")

    monkeypatch.setattr(Header, "write", die)
    with pytest.raises(OSError, match="simulated"):
        reindex_datastore(copy, index="IVF8,SQfp16", index_storage="disk", progress=False)
    monkeypatch.setattr(Header, "write", real)
    old = open_datastore(copy)
    assert old.header.index["factory"] == "Flat" and old.header.index_file == "index.faiss"

    code = main(["reindex", str(copy), "--index", "IVF8,SQfp16", "--index-storage", "disk", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "IVF8,SQfp16" in out and "on disk" in out
    ds = open_datastore(copy)
    assert ds.header.index_storage == "disk" and ds.header.index["ivfdata"].endswith(".ivfdata")
    assert not (copy / "index.faiss").exists() and (copy / ds.header.index_file).exists()
    assert ds.header.build["reindexed"][-1]["index"] == "IVF8,SQfp16"
    _, _, ids = Retriever(ds, 8, nprobe=8).search(q)
    assert torch.equal(ids, exact_ids)  # every list probed, fp16 keys stored in fp16: exact

    ds = reindex_datastore(copy, index="flat", index_storage="ram", progress=False)
    names = sorted(p.name for p in copy.iterdir() if p.suffix in (".faiss", ".ivfdata"))
    assert names == [ds.header.index_file] and ds.header.index_storage == "ram"


def test_header_round_trip_and_version_1_still_opens(keyless, tmp_path):
    _, ds, flat = keyless
    for store in (ds, flat):
        h = store.header
        again = Header.from_json(json.loads(json.dumps(h.to_json())))
        assert again.to_json() == h.to_json()
    # a datastore written by the previous format: version 1, index record without storage / ivfdata
    copy = tmp_path / "v1"
    shutil.copytree(flat.path, copy)
    raw = json.loads((copy / "header.json").read_text())
    raw["format_version"] = 1
    for k in ("storage", "ivfdata", "ivfdata_bytes"):
        raw["index"].pop(k, None)
    raw["index"].pop("file")
    (copy / "header.json").write_text(json.dumps(raw))
    old = open_datastore(copy)
    assert old.header.index_storage == "ram" and old.header.has_keys and old.header.index_file == "index.faiss"
    q = torch.from_numpy(np.asarray(flat.keys[:5], dtype=np.float32))
    assert (Retriever(old, 4).search(q)[2][:, 0] == torch.arange(5)).all()


def test_a_truncated_inverted_lists_file_is_refused(keyless, tmp_path):
    _, ds, _ = keyless
    copy = tmp_path / "cut"
    shutil.copytree(ds.path, copy)
    data = copy / "index.ivfdata"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    with pytest.raises(DatastoreError, match="index.ivfdata is .* bytes, the header says"):
        open_datastore(copy).index  # noqa: B018 (the property loads the index)
    data.unlink()
    with pytest.raises(DatastoreError, match="index.ivfdata is missing"):
        open_datastore(copy)
