import numpy as np
import pytest

from knnlm.datastore import build_index
from knnlm.index import AUTO_FLAT_MAX_ROWS, AUTO_SQ_MAX_ROWS, IndexSpecError, load_index, plan_index


def _keys_file(tmp_path, n, d, seed=0):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((n, d)).astype(np.float16)
    np.save(tmp_path / "keys.npy", keys)
    return keys.astype(np.float32)


def test_flat_index_equals_brute_force(tmp_path):
    n, d, k = 3000, 24, 10
    keys = _keys_file(tmp_path, n, d)
    plan = plan_index("flat", n, d)
    info = build_index(tmp_path / "keys.npy", n, d, plan, tmp_path / "index.faiss", progress=False)
    index = load_index(tmp_path / "index.faiss", n=n, dim=d, nprobe=info["nprobe"], use_gpu=False)
    q = np.random.default_rng(1).standard_normal((50, d)).astype(np.float32)
    dist, ids = index.search(q, k)
    brute = ((q[:, None, :] - keys[None]) ** 2).sum(-1)  # (Q, N)
    order = np.argsort(brute, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(ids, order)
    np.testing.assert_allclose(dist, np.take_along_axis(brute, order, 1), rtol=1e-4, atol=1e-3)


def test_auto_picks_by_size():
    assert plan_index("auto", 1000, 64).factory == "Flat"
    assert plan_index("auto", AUTO_FLAT_MAX_ROWS, 64).factory == "Flat"
    p = plan_index("auto", AUTO_FLAT_MAX_ROWS + 1, 64)
    assert p.factory.startswith("IVF") and p.factory.endswith("SQfp16") and p.nprobe > 0
    assert plan_index("auto", AUTO_SQ_MAX_ROWS, 576).factory.endswith("SQfp16")
    assert plan_index("auto", AUTO_SQ_MAX_ROWS + 1, 576).factory.endswith(",PQ64")
    assert plan_index("auto", 1_100_000, 576).factory == "IVF4096,PQ64"  # the measured recipe
    assert "PQ" in plan_index("auto", 200_000_000, 1024).factory
    assert plan_index("ivfpq", 100_000, 576).factory == "IVF1024,PQ64"  # 4 * sqrt(N) lists, a power of two
    pq = plan_index("ivfpq", 1_100_000, 576)  # the original kNN-LM recipe at ~1M keys
    assert (pq.factory, pq.nprobe) == ("IVF4096,PQ64", 32)
    big = plan_index("ivfpq", 4_000_000, 576)  # an HNSW coarse quantizer beyond 2M keys, probes for 8k candidates
    assert big.factory == "IVF65536_HNSW32,PQ64" and big.nprobe * 4_000_000 / 65536 >= 8192
    assert plan_index("ivfpq", 50_000_000, 576).factory == "IVF262144_HNSW32,PQ64"


def test_ivf_recall_against_exact(tmp_path):
    n, d, k = 20_000, 32, 16
    keys = _keys_file(tmp_path, n, d)
    plan = plan_index("IVF64,SQfp16", n, d)
    info = build_index(tmp_path / "keys.npy", n, d, plan, tmp_path / "index.faiss", progress=False)
    assert info["ntotal"] == n and info["factory"] == "IVF64,SQfp16"
    index = load_index(tmp_path / "index.faiss", n=n, dim=d, nprobe=64, use_gpu=False)
    q = keys[:100] + 0.1 * np.random.default_rng(2).standard_normal((100, d)).astype(np.float32)
    _, ids = index.search(q, k)
    brute = ((q[:, None, :] - keys[None]) ** 2).sum(-1)
    exact = np.argsort(brute, axis=1)[:, :k]
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, exact)])
    assert recall > 0.99  # nprobe = nlist: every list is scanned, fp16 storage is exact for fp16 keys


@pytest.mark.parametrize("spec, match", [("IVFbogus", "`index` .IVFbogus. is invalid"),
                                         ("IVF4096,Flat", "at least 4096 keys")])
def test_bad_specs(spec, match):
    with pytest.raises(IndexSpecError, match=match):
        plan_index(spec, 1000, 16)
