"""An index split over rows (``--index-shards``): one trained quantizer, N files of disjoint rows
with global ids; searched as one index in one process, or one shard per torchrun rank
(``eval --shard-search``, 2 gloo ranks): the same neighbours as the unsharded index."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from knnlm.testing import corpus_paths

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
INDEX = ["--index", "IVF16,PQ8", "--index-storage", "disk", "--seed", "3"]
HELD_OUT = ["heapq.py", "textwrap.py"]


def _knnlm(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    res = subprocess.run([*(launch if nproc > 1 else [sys.executable]), "-m", "knnlm", *args], capture_output=True,
                         text=True, timeout=600, cwd=REPO, env=ENV)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_model_dir):
    """The same datastore three times: an IVF-PQ index in one file (one process); built by 2
    torchrun ranks with the index in 2 shards, each rank filling one (same seed, one thread: the
    same keys, trained quantizer and PQ); a copy of the first split into 2 in-RAM shards that keep
    its training (``reindex --keep-training``)."""
    root = tmp_path_factory.mktemp("shards")
    one, two, kept = root / "one", root / "two", root / "kept"
    build = ["build-index", "--model", str(tiny_model_dir), "--data", *corpus_paths(), "--context", "32",
             "--batch-size", "8", "--quiet", *INDEX]
    _knnlm([*build, "--out", str(one)])
    _knnlm([*build, "--out", str(two), "--index-shards", "2"], nproc=2)
    shutil.copytree(one, kept)
    _knnlm(["reindex", str(kept), "--index-storage", "ram", "--index-shards", "2", "--keep-training", "--quiet"])
    return one, two, kept


def _canonical(d: np.ndarray, i: np.ndarray):
    from knnlm.sharding import merge_topk

    return merge_topk([(d, i)], d.shape[1])


def _assert_same_neighbours(a, b):
    """Equal distances, and equal ids wherever a distance is not tied at the k-th one."""
    (da, ia), (db, ib) = a, b
    np.testing.assert_array_equal(da, db)
    below = da < da[:, -1:]
    np.testing.assert_array_equal(np.where(below, ia, -2), np.where(below, ib, -2))


@pytest.mark.parametrize("which", ["built by 2 ranks", "training kept"])
def test_the_shards_hold_disjoint_rows_and_search_as_the_unsharded_index(stores, which):
    from knnlm.datastore import open_datastore
    from knnlm.index import set_nprobe

    one, two = (open_datastore(p) for p in (stores[0], stores[1 if which == "built by 2 ranks" else 2]))
    rec = two.header.index
    assert rec["nprobe"] == one.header.index["nprobe"] and rec["factory"] == one.header.index["factory"]
    assert rec["storage"] == ("disk" if which == "built by 2 ranks" else "ram")
    assert [s["rows"] for s in rec["shards"]] == [[0, len(two) // 2], [len(two) // 2, len(two)]]
    stem = "index" if which == "built by 2 ranks" else "index.r1"
    assert [s["file"] for s in rec["shards"]] == [f"{stem}.s0.faiss", f"{stem}.s1.faiss"]
    assert all(s["ivfdata"] is None or (two.path / s["ivfdata"]).exists() for s in rec["shards"])
    assert rec["ntotal"] == len(two) and two.index_shard_count == 2 and one.index_shard_count == 1
    assert not (two.path / "index.faiss").exists(), "no unsharded index"
    assert not list(two.path.glob(".index*")), "the index's work files are gone"
    for s in rec["shards"]:  # global row ids, each shard its own rows
        part = two.index_shards([rec["shards"].index(s)]).parts[0]
        assert part.ntotal == s["rows"][1] - s["rows"][0]

    rng = np.random.default_rng(0)
    keys = np.asarray(one.keys[rng.choice(len(one), 300, replace=False)], dtype=np.float32)
    queries = keys + rng.normal(0, 0.3, keys.shape).astype(np.float32)  # near, not on, stored keys
    for nprobe in (2, 16):
        set_nprobe(one.index, nprobe)
        for part in two.index.parts:
            set_nprobe(part, nprobe)
        for k in (1, 32):
            _assert_same_neighbours(_canonical(*one.index.search(queries, k)), two.index.search(queries, k))


def test_merge_topk_orders_by_distance_then_id_and_puts_missing_last():
    from knnlm.sharding import merge_topk

    d, i = merge_topk([(np.array([[1.0, 2.0, 0.0]]), np.array([[7, 3, -1]])),
                       (np.array([[1.0, 0.5]]), np.array([[2, 9]]))], 4)
    assert i.tolist() == [[9, 2, 7, 3]] and d.tolist() == [[0.5, 1.0, 1.0, 2.0]]
    d, i = merge_topk([(np.array([[1.0]]), np.array([[4]]))], 3)
    assert i.tolist() == [[4, -1, -1]] and np.isinf(d[0, 1:]).all()


def _eval(model_dir, ds, out, *more) -> list[str]:
    return ["eval", "--model", str(model_dir), "--datastore", str(ds), "--data", *corpus_paths(HELD_OUT),
            "--max-tokens", "2000", "--lambda", "0.25,0.5", "--k", "16", "--nprobe", "4", "--batch-size", "2",
            "--output", str(out), "--quiet", *more]


def test_keep_training_refuses_another_recipe_and_an_index_without_training(stores, tmp_path):
    from knnlm.derive import reindex_datastore
    from knnlm.errors import KnnlmError

    with pytest.raises(KnnlmError, match=r"^`keep_training` keeps the current recipe IVF16,PQ8; `index` 'flat'"):
        reindex_datastore(stores[2], index="flat", keep_training=True, progress=False)
    flat = tmp_path / "flat"
    shutil.copytree(stores[0], flat)
    reindex_datastore(flat, index="flat", progress=False)
    with pytest.raises(KnnlmError, match=r"index Flat has no training to keep"):
        reindex_datastore(flat, keep_training=True, progress=False)
    res = subprocess.run([sys.executable, "-m", "knnlm", "reindex", str(flat), "--keep-training", "--quiet"],
                         capture_output=True, text=True, timeout=600, cwd=REPO, env=ENV)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--keep-training" in res.stderr, res.stderr


def test_two_ranks_searching_one_shard_each_evaluate_like_one_process_on_the_unsharded_index(
        stores, tiny_model_dir, tmp_path):
    one, two, _ = stores
    ref, whole, split = tmp_path / "ref.json", tmp_path / "whole.json", tmp_path / "split.json"
    _knnlm(_eval(tiny_model_dir, one, ref))
    _knnlm(_eval(tiny_model_dir, two, whole))  # one process, both shards
    _knnlm(_eval(tiny_model_dir, two, split, "--shard-search"), nproc=2)
    a = json.loads(ref.read_text())
    for res in (json.loads(whole.read_text()), json.loads(split.read_text())):
        assert res["tokens"] == a["tokens"]
        assert [g["ppl"] for g in res["grid"]] == pytest.approx([g["ppl"] for g in a["grid"]], rel=1e-6)
        assert [b["ppl_knn"] for b in res["buckets"]] == pytest.approx([b["ppl_knn"] for b in a["buckets"]],
                                                                        rel=1e-6)


def test_shard_search_needs_one_rank_per_shard(stores, tiny_model_dir, tmp_path):
    one = stores[0]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "knnlm",
           *_eval(tiny_model_dir, one, tmp_path / "x.json", "--shard-search")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=ENV)
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if "knnlm eval: error:" in ln]
    assert len(lines) == 1 and "--shard-search needs one torchrun rank per index shard: the index of" in lines[0] \
        and "has 1 shard(s), 2 rank(s) run" in lines[0], res.stderr[-3000:]
