"""The fused csrc op (knnlm.ops) against the torch reference in knnlm.scoring.

Tolerances: the op returns fp32 computed from the same inputs upcast to fp32, with fp32
accumulation; the reference is fed the same logits (it upcasts fp16/bf16 with .float() itself).
Both are fp32 computations of the same formula that differ only in summation order and in the
exp/log implementations (about 1 ulp each), so the results agree to fp32 level, ~1e-5 abs/rel,
for every logits dtype -- the input rounding to fp16/bf16 is common to both sides. NaN / inf
positions must match exactly (``equal_nan=True``; assert_close compares infinities exactly).

A missing kernel skips these tests with the build failure as the reason, except under
``KNNLM_REQUIRE_KERNEL=1`` (set by .ci/run) or ``CI``, where it fails them: a C++ compile error
must not pass as "skipped".
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from knnlm import ops, scoring

RTOL = ATOL = 1e-5
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none present)")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, NEEDS_GPU])]
LAMS = [0.0, 0.25, 1.0]


def _kernel_required() -> bool:
    return ops.kernel_required() or bool(os.environ.get("CI"))


def _missing(msg: str):
    if _kernel_required():
        pytest.fail(f"{msg} (a kernel is required: KNNLM_REQUIRE_KERNEL / CI is set)", pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="module", autouse=True)
def _extension():
    if ops._disabled():
        _missing("fused op disabled by KNNLM_DISABLE_KERNEL")
    try:
        loaded = ops.load_extension()
    except RuntimeError as exc:  # KNNLM_REQUIRE_KERNEL: load_extension raises with the reason
        loaded = False
        assert ops.unavailable_reason() is not None, exc
    if not loaded:
        _missing(f"fused op could not be built: {ops.unavailable_reason()}")


def _op(name: str, device: str):
    try:
        op = ops.get_op(name, torch.device(device))
    except RuntimeError as exc:  # KNNLM_REQUIRE_KERNEL and no kernel for this device
        _missing(str(exc))
    if op is None:
        _missing(f"no {name} kernel for {device} in the built extension: {ops._cuda_reason}")
    return op


def _inputs(B, V, K, dtype=torch.float32, device="cpu", seed=0, n_tokens=None):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, V, generator=g) * 3).to(dtype)
    dists = torch.rand(B, K, generator=g) * 20
    # few distinct tokens -> many duplicate neighbour values
    values = torch.randint(0, n_tokens or V, (B, K), generator=g)
    target = torch.randint(0, V, (B,), generator=g)
    target[0] = values[0, 0]  # at least one target the neighbours vote for
    return [t.to(device) for t in (logits, dists, values, target)]


def _check(logits, dists, values, target, lam, T, device):
    full = _op("knn_interpolate", device)(logits, dists, values, lam, T)
    ref = scoring.reference_interpolate(logits, dists, values, lam, T)
    assert full.dtype == torch.float32 and full.shape == logits.shape
    torch.testing.assert_close(full, ref, rtol=RTOL, atol=ATOL, equal_nan=True)
    # the full rows at the targets equal the target-only spec (what evaluation computes)
    tgt = full.gather(1, target.long()[:, None])[:, 0]
    ref_t = scoring.reference_interpolate_target(logits, dists, values, target, lam, T)
    torch.testing.assert_close(tgt, ref_t, rtol=RTOL, atol=ATOL, equal_nan=True)
    return full, tgt


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lam", [0.0, 0.25, 0.9, 1.0])
@pytest.mark.parametrize("B,V,K", [(4, 1000, 16), (3, 50257, 64), (1, 20000, 1), (6, 300, 200)])
def test_matches_reference(device, dtype, lam, B, V, K):
    logits, dists, values, target = _inputs(B, V, K, dtype, device, n_tokens=min(V, 4 * K))
    _check(logits, dists, values, target, lam, 2.0, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_long_rows_few_batch(device, lam):
    # B < threads with long rows: the CPU kernel splits V across threads and merges the partial
    # row statistics (a different code path from one row per task)
    logits, dists, values, target = _inputs(1, 200_000, 512, torch.bfloat16, device, n_tokens=300)
    _check(logits, dists, values, target, lam, 2.0, device)


@pytest.mark.parametrize("device", DEVICES)
def test_int32_indices(device):
    logits, dists, values, target = _inputs(5, 777, 32, device=device, n_tokens=50)
    _check(logits, dists, values.int(), target.int(), 0.3, 1.5, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_missing_neighbours(device, lam):
    logits, dists, values, target = _inputs(4, 500, 8, device=device, n_tokens=20)
    dists[0, 3] = math.inf          # one missing neighbour
    dists[1] = math.inf             # a row without any kNN mass
    dists[2, :4] = math.inf         # half missing, and duplicates of the missing ones
    values[2, 4:] = values[2, :4]
    target[1] = values[1, 0]
    full, tgt = _check(logits, dists, values, target, lam, 1.0, device)
    assert not torch.isnan(full).any() and not torch.isnan(tgt).any()
    if lam == 1.0:  # no kNN mass: log p_knn = -inf everywhere
        assert torch.isneginf(full[1]).all() and torch.isneginf(tgt[1])


@pytest.mark.parametrize("device", DEVICES)
def test_lam_endpoints_exact(device):
    logits, dists, values, _ = _inputs(3, 2000, 32, device=device, n_tokens=40)
    op = _op("knn_interpolate", device)
    lm = op(logits, dists, values, 0.0, 1.0)
    torch.testing.assert_close(lm, torch.log_softmax(logits, -1), rtol=RTOL, atol=ATOL)
    knn = op(logits, dists, values, 1.0, 1.0)
    ref_knn = scoring.reference_knn_log_probs(dists, values, logits.shape[-1], 1.0)
    torch.testing.assert_close(knn, ref_knn, rtol=RTOL, atol=ATOL)
    assert not torch.isnan(lm).any() and not torch.isnan(knn).any()
    assert (torch.isneginf(knn) == torch.isneginf(ref_knn)).all()


@pytest.mark.parametrize("device", DEVICES)
def test_duplicates_add_mass(device):
    V = 10
    logits = torch.zeros(1, V, device=device)
    dists = torch.zeros(1, 4, device=device)  # equal weights 1/4
    values = torch.tensor([[3, 3, 3, 7]], device=device)
    out = _op("knn_interpolate", device)(logits, dists, values, 1.0, 1.0)
    expect = torch.full((1, V), -math.inf, device=device)
    expect[0, 3], expect[0, 7] = math.log(0.75), math.log(0.25)
    torch.testing.assert_close(out, expect, rtol=RTOL, atol=ATOL)
    mixed = _op("knn_interpolate", device)(logits, dists, values, 0.5, 1.0)
    assert torch.allclose(mixed.exp().sum(), torch.tensor(1.0, device=device), atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_k1_b1_and_empty(device):
    logits, dists, values, target = _inputs(1, 4096, 1, device=device)
    _check(logits, dists, values, target, 0.4, 3.0, device)
    op = _op("knn_interpolate", device)
    empty = op(logits[:0], dists[:0], values[:0], 0.4, 3.0)
    assert empty.shape == (0, 4096) and empty.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_weights_do_not_nan(device):
    # distances far apart: the far neighbour's weight underflows relative to the near one
    logits, dists, values, target = _inputs(2, 100, 4, device=device)
    dists[:] = torch.tensor([0.0, 50.0, 300.0, 1e4], device=device)
    values[:] = torch.tensor([5, 6, 6, 9], device=device)
    full, tgt = _check(logits, dists, values, target, 0.5, 1.0, device)
    assert torch.isfinite(full).all()


@pytest.mark.parametrize("device", DEVICES)
def test_input_validation(device, monkeypatch):
    if device == "cuda":  # the token-id range raises on CUDA only with the (syncing) debug checks
        monkeypatch.setenv("KNNLM_CUDA_CHECKS", "1")
    logits, dists, values, target = _inputs(2, 100, 4, device=device)
    op = _op("knn_interpolate", device)
    bad = values.clone()
    bad[1, 2] = 100
    with pytest.raises(RuntimeError, match=r"values must be token ids in \[0, V\)"):
        op(logits, dists, bad, 0.5, 1.0)
    bad[1, 2] = -1
    with pytest.raises(RuntimeError, match=r"values must be token ids in \[0, V\)"):
        op(logits, dists, bad, 0.5, 1.0)
    with pytest.raises(RuntimeError, match="values must have the shape of dists"):
        op(logits, dists, values[:, :3], 0.5, 1.0)
    with pytest.raises(RuntimeError, match="rows but logits has"):
        op(logits[:1], dists, values, 0.5, 1.0)
    with pytest.raises(RuntimeError, match="dists must be float32"):
        op(logits, dists.double(), values, 0.5, 1.0)
    with pytest.raises(RuntimeError, match="values must be int64 or int32"):
        op(logits, dists, values.float(), 0.5, 1.0)
    with pytest.raises(RuntimeError, match="logits must be float32, float16 or bfloat16"):
        op(logits.double(), dists, values, 0.5, 1.0)
    with pytest.raises(RuntimeError, match="lam must be in"):
        op(logits, dists, values, 1.5, 1.0)
    with pytest.raises(RuntimeError, match="temperature must be"):
        op(logits, dists, values, 0.5, 0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    _op("knn_interpolate", device)
    for dtype in DTYPES:
        logits, dists, values, _ = _inputs(3, 257, 9, dtype, device, n_tokens=30)
        torch.library.opcheck(torch.ops.knnlm.knn_interpolate, (logits, dists, values, 0.3, 2.0))


@pytest.mark.parametrize("device", DEVICES)
def test_scoring_dispatches_to_op(device):
    assert ops.get_op("knn_interpolate", torch.device(device)) is not None
    logits, dists, values, _ = _inputs(4, 3000, 16, torch.bfloat16, device, n_tokens=50)
    out = scoring.interpolate(logits, dists, values, 0.25, 2.0)
    torch.testing.assert_close(out, scoring.reference_interpolate(logits, dists, values, 0.25, 2.0),
                               rtol=RTOL, atol=ATOL)


def test_disable_env(monkeypatch):
    monkeypatch.setenv("KNNLM_DISABLE_KERNEL", "1")
    assert ops.get_op("knn_interpolate", torch.device("cpu")) is None
    assert ops.unavailable_reason() == "disabled by KNNLM_DISABLE_KERNEL"
    monkeypatch.delenv("KNNLM_DISABLE_KERNEL")
    assert ops.get_op("knn_interpolate", torch.device("cpu")) is not None


def test_unknown_op_name():
    with pytest.raises(ValueError, match="unknown knnlm op"):
        ops.get_op("knn_nope", torch.device("cpu"))


def test_fallback_warns_once_without_compiler(tmp_path):
    """No compiler: one warning saying why, and scoring falls back to the reference."""
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('always')\n"
        "from knnlm import ops, scoring\n"
        "with warnings.catch_warnings(record=True) as rec:\n"
        "    warnings.simplefilter('always')\n"
        "    assert ops.get_op('knn_interpolate', torch.device('cpu')) is None\n"
        "    x = torch.randn(2, 50); d = torch.rand(2, 4); v = torch.randint(0, 50, (2, 4))\n"
        "    out = scoring.interpolate(x, d, v, 0.5, 1.0)\n"
        "    assert torch.equal(out, scoring.reference_interpolate(x, d, v, 0.5, 1.0))\n"
        "msgs = [str(w.message) for w in rec if 'knnlm' in str(w.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert 'no C++ compiler' in msgs[0], msgs\n"
        "print('OK')\n"
    )
    res = _run_without_compiler(code, tmp_path, require=False)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]


def _run_without_compiler(code: str, tmp_path, *, require: bool):
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"),
               TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    env.pop("KNNLM_DISABLE_KERNEL", None)
    env.pop("KNNLM_REQUIRE_KERNEL", None)
    if require:
        env["KNNLM_REQUIRE_KERNEL"] = "1"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=str(ops.csrc_dir().parent.parent), timeout=120, check=False)


def test_require_kernel_raises_without_compiler(tmp_path):
    """KNNLM_REQUIRE_KERNEL=1: no silent fallback; get_op and scoring raise with the reason."""
    code = (
        "import warnings, torch, pytest\n"
        "from knnlm import ops, scoring\n"
        "with warnings.catch_warnings():\n"
        "    warnings.simplefilter('error')\n"
        "    for _ in range(2):  # every call raises, not only the first\n"
        "        with pytest.raises(RuntimeError, match='required.*no C\\+\\+ compiler'):\n"
        "            ops.get_op('knn_interpolate', torch.device('cpu'))\n"
        "    x = torch.randn(2, 50); d = torch.rand(2, 4); v = torch.randint(0, 50, (2, 4))\n"
        "    with pytest.raises(RuntimeError, match='KNNLM_REQUIRE_KERNEL'):\n"
        "        scoring.interpolate(x, d, v, 0.5, 1.0)\n"
        "print('OK')\n"
    )
    res = _run_without_compiler(code, tmp_path, require=True)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]


# ---- non-finite inputs: the kernels follow the reference (scoring.py module docstring) --------

NAN, INF = math.nan, math.inf
# rows of _nonfinite_inputs whose output is NaN everywhere, by which side the row breaks
LM_NAN_ROWS = {1, 2, 3, 5, 8, 9, 10}  # a NaN / +inf logit, or all -inf
KNN_NAN_ROWS = {6, 7, 9}  # a NaN / -inf distance


def _nonfinite_inputs(dtype, device):
    B, V, K = 12, 64, 8
    logits, dists, values, target = _inputs(B, V, K, torch.float32, "cpu", seed=3, n_tokens=20)
    logits[1, 5] = NAN                        # a NaN logit
    logits[2, 7] = INF                        # one +inf logit, the target sits on it
    target[2] = 7
    logits[3, [2, 9]] = INF                   # two +inf logits
    logits[4, values[4, :3]] = -INF           # -inf logits at voted tokens and at the target
    target[4] = values[4, 0]
    logits[4, target[4]] = -INF
    logits[5] = -INF                          # all -inf
    dists[6, 2] = NAN                         # a NaN distance
    target[6] = values[6, 5]
    dists[7, 1] = -INF                        # a -inf distance
    logits[8, 0] = NAN                        # a NaN logit and no kNN mass
    dists[8] = INF
    logits[9, 3] = NAN                        # NaN on both sides
    dists[9, 0] = NAN
    logits[10] = INF                          # all +inf
    logits[11, 4] = -INF                      # a -inf logit, a missing neighbour
    dists[11, 5] = INF
    values[11, 6] = 4
    target[11] = 4
    return logits.to(dtype).to(device), dists.to(device), values.to(device), target.to(device)


def _nan_rows(lam):
    if lam == 0.0:
        return LM_NAN_ROWS
    if lam == 1.0:
        return KNN_NAN_ROWS
    return LM_NAN_ROWS | KNN_NAN_ROWS


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lam", [0.0, 0.25, 0.9, 1.0])
def test_nonfinite_matches_reference(device, dtype, lam):
    logits, dists, values, target = _nonfinite_inputs(dtype, device)
    full, tgt = _check(logits, dists, values, target, lam, 2.0, device)
    # ... and both follow the documented semantics: whole rows NaN, the others NaN-free
    nan_rows = _nan_rows(lam)
    for b in range(logits.shape[0]):
        if b in nan_rows:
            assert torch.isnan(full[b]).all() and torch.isnan(tgt[b]), b
        else:
            assert not torch.isnan(full[b]).any() and not torch.isnan(tgt[b]), b
    if lam < 1.0:  # -inf logits are tokens of probability 0 (unless the kNN side votes for them)
        assert torch.isneginf(full[4, values[4, :3]]).any() == (lam == 0.0)
        assert torch.isneginf(full[11, 4]) == (lam == 0.0)


@pytest.mark.parametrize("lam", [0.0, 0.25, 1.0])
def test_reference_full_and_target_agree_on_nonfinite(lam):
    """The spec is self-consistent: the target function is the full one gathered at the target."""
    logits, dists, values, target = _nonfinite_inputs(torch.float32, "cpu")
    full = scoring.reference_interpolate(logits, dists, values, lam, 2.0)
    tgt = scoring.reference_interpolate_target(logits, dists, values, target, lam, 2.0)
    torch.testing.assert_close(tgt, full.gather(1, target[:, None]).squeeze(1), equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lam", LAMS)
def test_nonfinite_long_rows(device, lam):
    # single long rows: the CPU kernel splits V across threads, NaN / +inf land in a later chunk
    logits, dists, values, target = _inputs(3, 200_000, 64, torch.bfloat16, device, n_tokens=300)
    logits[0, 150_000] = NAN
    logits[1, 199_999] = INF
    logits[2, :100_000] = -INF
    dists[2, 3] = NAN
    for b in range(3):
        rows = slice(b, b + 1)
        _check(logits[rows], dists[rows], values[rows], target[rows], lam, 2.0, device)


# ---- CUDA only ---------------------------------------------------------------------------------

cuda_only = [pytest.mark.cuda, NEEDS_GPU]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K,n_tokens", [(2048, 3), (1024, 3), (5000, 7), (513, 1), (700, 700)])
@pytest.mark.cuda
@NEEDS_GPU
def test_cuda_heavy_duplicates(dtype, K, n_tokens):
    """Many neighbours over few tokens: shared-memory (K <= 1024) and global-scratch grouping."""
    logits, dists, values, target = _inputs(4, 32000, K, dtype, "cuda", n_tokens=n_tokens)
    dists[1, ::3] = INF  # missing neighbours inside the groups
    dists[2] = dists[2].sort().values  # near neighbours first, as FAISS returns them
    op = _op("knn_interpolate", "cuda")
    for lam in (0.25, 1.0):
        full, _ = _check(logits, dists, values, target, lam, 2.0, "cuda")
        assert torch.equal(full, op(logits, dists, values, lam, 2.0)), "not deterministic"


@pytest.mark.parametrize("V", [100, 40_000])  # one block per row; rows split over several blocks
@pytest.mark.cuda
@NEEDS_GPU
def test_cuda_out_of_range_ids_give_nan_rows(monkeypatch, V):
    """No host sync on CUDA: bad token ids make the row NaN; KNNLM_CUDA_CHECKS=1 raises."""
    monkeypatch.delenv("KNNLM_CUDA_CHECKS", raising=False)
    op = _op("knn_interpolate", "cuda")
    logits, dists, values, _ = _inputs(3, V, 4, device="cuda", n_tokens=100)
    bad = values.clone()
    bad[1, 2] = V
    for lam in LAMS:
        full = op(logits, dists, bad, lam, 1.0)
        ref = scoring.reference_interpolate(logits, dists, values, lam, 1.0)
        assert torch.isnan(full[1]).all()
        torch.testing.assert_close(full[[0, 2]], ref[[0, 2]], rtol=RTOL, atol=ATOL)
    bad[1, 2] = -1
    assert torch.isnan(op(logits, dists, bad, 0.5, 1.0)[1]).all()
    monkeypatch.setenv("KNNLM_CUDA_CHECKS", "1")
    with pytest.raises(RuntimeError, match=r"values must be token ids in \[0, V\)"):
        op(logits, dists, bad, 0.5, 1.0)


@pytest.mark.cuda
@NEEDS_GPU
def test_cuda_runs_on_the_current_stream():
    op = _op("knn_interpolate", "cuda")
    logits, dists, values, _ = _inputs(8, 50000, 64, device="cuda", n_tokens=100)
    ref = scoring.reference_interpolate(logits, dists, values, 0.25, 2.0)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x = torch.zeros_like(logits)
        torch.cuda._sleep(50_000_000)  # keep the side stream busy: an op launched on another
        x.copy_(logits)                # stream would read x before this copy lands
        out = op(x, dists, values, 0.25, 2.0)
    side.synchronize()
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("K,V", [(64, 5000), (2048, 5000), (64, 60_000), (2048, 60_000)])
@pytest.mark.cuda
@NEEDS_GPU
def test_cuda_graph_capture(K, V, monkeypatch):
    """Sync-free: the op captures into a CUDA graph (a host sync would raise while capturing);
    at V 60,000 the 4 rows are split over several blocks (three launches)."""
    monkeypatch.delenv("KNNLM_CUDA_CHECKS", raising=False)
    op = _op("knn_interpolate", "cuda")
    static = _inputs(4, V, K, torch.bfloat16, "cuda", seed=0, n_tokens=50)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        op(*static[:3], 0.25, 2.0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(*static[:3], 0.25, 2.0)
    fresh = _inputs(4, V, K, torch.bfloat16, "cuda", seed=1, n_tokens=50)
    for s_, f in zip(static, fresh):
        s_.copy_(f)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, scoring.reference_interpolate(*fresh[:3], 0.25, 2.0),
                               rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("K", [64, 2048])
@pytest.mark.cuda
@NEEDS_GPU
def test_cuda_split_rows_equal_whole_rows(lam, K):
    """Few long rows are split over several blocks per row; the same rows inside a batch large
    enough to fill the GPU run one block per row. Same values, up to fp32 summation order."""
    op = _op("knn_interpolate", "cuda")
    few = _inputs(3, 100_003, K, torch.bfloat16, "cuda", seed=4, n_tokens=200)[:3]
    few[0][1, 70_000] = INF  # a NaN row found by a later chunk
    many = [torch.cat([t, t[:1].expand(4 * 1024, *t.shape[1:])]) for t in few]  # > 4 x SMs rows
    split, whole = op(*few, lam, 2.0), op(*many, lam, 2.0)[:3]
    torch.testing.assert_close(split, whole, rtol=RTOL, atol=ATOL, equal_nan=True)
    torch.testing.assert_close(split, scoring.reference_interpolate(*few, lam, 2.0), rtol=RTOL, atol=ATOL,
                               equal_nan=True)
    assert torch.isnan(split[1]).all() == (lam < 1) and not torch.isnan(split[[0, 2]]).any()


@pytest.mark.cuda
@NEEDS_GPU
@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason=f"needs 2 CUDA GPUs, found {torch.cuda.device_count()}")
def test_cuda_second_device():
    """Inputs on cuda:1 while cuda:0 is current: the op runs on cuda:1 (device guard)."""
    with torch.cuda.device(0):
        logits, dists, values, target = _inputs(4, 3000, 600, torch.float16, "cuda:1", n_tokens=30)
        full, tgt = _check(logits, dists, values, target, 0.25, 2.0, "cuda")
    assert full.device == tgt.device == torch.device("cuda:1")


def test_a_stale_torch_build_lock_is_removed_not_waited_on(tmp_path):
    """A process killed while compiling leaves torch's ``lock`` file in the build directory; the
    next build holds knnlm's flock (released by the kernel on death), so that file is stale and
    is removed instead of waited on forever."""
    (tmp_path / "lock").touch()
    with ops._build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()
    import fcntl

    with open(tmp_path / ".knnlm-build.flock") as f:  # released on exit: another holder gets it at once
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


# ---- small_linear: x W^T (+ b) for a few rows (knnlm.cpu.small_linears) ---------------------------

NEEDS_AVX512 = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                                  reason="small_linear needs a CPU with AVX-512 (as torch sees it)")


def _small(M, N, K, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    return x, w, (torch.randn(N, generator=g) if bias else None)


@NEEDS_AVX512
@pytest.mark.parametrize("M", [1, 4, 6, 7, 13, 32])
@pytest.mark.parametrize("N,K", [(1, 1), (5, 15), (4, 16), (7, 17), (576, 576), (130, 1537)])
@pytest.mark.parametrize("bias", [False, True])
def test_small_linear_is_the_linear_product(M, N, K, bias):
    """Within the float32 error bound of a K-term sum (plus the bias add) of the exact product."""
    op = _op("small_linear", "cpu")
    x, w, b = _small(M, N, K, bias, seed=M * 10_000 + N * 10 + K)
    got = op(x, w, b)
    assert got.shape == (M, N) and got.dtype == torch.float32
    exact = x.double() @ w.double().T + (0.0 if b is None else b.double())
    scale = x.double().abs() @ w.double().abs().T + (0.0 if b is None else b.double().abs())
    assert ((got.double() - exact).abs() <= (K + 2) * 2.0 ** -24 * scale).all()


@NEEDS_AVX512
def test_small_linear_rows_do_not_depend_on_the_batch_or_the_threads():
    """Each output is summed in one fixed order: a row alone, in any batch, on any number of
    threads, gives the same bits."""
    op = _op("small_linear", "cpu")
    x, w, b = _small(13, 130, 577, True)
    got = op(x, w, b)
    for i in range(13):
        assert torch.equal(op(x[i:i + 1], w, b), got[i:i + 1])
    assert torch.equal(op(x[3:10], w, b), got[3:10])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(op(x, w, b), got)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(op(x.t().contiguous().t(), w.t().contiguous().t(), b), got)  # any layout


@NEEDS_AVX512
def test_small_linear_input_validation():
    op = _op("small_linear", "cpu")
    x, w, b = _small(3, 5, 8, True)
    with pytest.raises(RuntimeError, match="takes x \\[M, K\\] and weight \\[N, K\\]"):
        op(x[None], w, b)
    with pytest.raises(RuntimeError, match="x has 7 columns, weight 8"):
        op(x[:, :7], w, b)
    with pytest.raises(RuntimeError, match="takes float32 x and weight"):
        op(x.double(), w.double(), b)
    with pytest.raises(RuntimeError, match="bias must be float32 \\[N\\] with N = 5"):
        op(x, w, b[:4])
    assert op(x[:0], w, b).shape == (0, 5)
    assert torch.equal(op(x[:, :0], w[:, :0], b), b.expand(3, 5))  # K = 0: the bias alone


@NEEDS_AVX512
def test_small_linear_opcheck():
    _op("small_linear", "cpu")
    for bias in (False, True):
        torch.library.opcheck(torch.ops.knnlm.small_linear, _small(5, 7, 33, bias))
