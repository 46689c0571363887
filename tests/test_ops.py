"""The fused csrc op (knnlm.ops) against the torch reference in knnlm.scoring.

Tolerances: the op returns fp32 computed from the same inputs upcast to fp32, with fp32
accumulation; the reference is fed the same logits (it upcasts fp16/bf16 with .float() itself).
Both are fp32 computations of the same formula that differ only in summation order and in the
exp/log implementations (about 1 ulp each), so the results agree to fp32 level, ~1e-5 abs/rel,
for every logits dtype -- the input rounding to fp16/bf16 is common to both sides.
"""

from __future__ import annotations

import math

import pytest
import torch

from knnlm import ops, scoring

RTOL = ATOL = 1e-5
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none present)"),
    ]),
]


@pytest.fixture(scope="module", autouse=True)
def _extension():
    if ops._disabled():
        pytest.skip("fused op disabled by KNNLM_DISABLE_KERNEL")
    if not ops.load_extension():
        pytest.skip(f"fused op could not be built: {ops.unavailable_reason()}")


def _op(name: str, device: str):
    op = ops.get_op(name, torch.device(device))
    if op is None:
        pytest.skip(f"no {name} kernel for {device} in the built extension")
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
    torch.testing.assert_close(full, ref, rtol=RTOL, atol=ATOL)
    tgt = _op("knn_interpolate_target", device)(logits, dists, values, target, lam, T)
    ref_t = scoring.reference_interpolate_target(logits, dists, values, target, lam, T)
    assert tgt.dtype == torch.float32 and tgt.shape == (logits.shape[0],)
    torch.testing.assert_close(tgt, ref_t, rtol=RTOL, atol=ATOL)
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
def test_input_validation(device):
    logits, dists, values, target = _inputs(2, 100, 4, device=device)
    op = _op("knn_interpolate", device)
    op_t = _op("knn_interpolate_target", device)
    bad = values.clone()
    bad[1, 2] = 100
    with pytest.raises(RuntimeError, match=r"values must be token ids in \[0, V\)"):
        op(logits, dists, bad, 0.5, 1.0)
    bad[1, 2] = -1
    with pytest.raises(RuntimeError, match=r"values must be token ids in \[0, V\)"):
        op_t(logits, dists, bad, target, 0.5, 1.0)
    with pytest.raises(RuntimeError, match=r"target must be token ids in \[0, V\)"):
        op_t(logits, dists, values, torch.full_like(target, 100), 0.5, 1.0)
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
    with pytest.raises(RuntimeError, match="target must be 1-D"):
        op_t(logits, dists, values, target[:1], 0.5, 1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    _op("knn_interpolate", device)
    for dtype in DTYPES:
        logits, dists, values, target = _inputs(3, 257, 9, dtype, device, n_tokens=30)
        torch.library.opcheck(torch.ops.knnlm.knn_interpolate, (logits, dists, values, 0.3, 2.0))
        torch.library.opcheck(torch.ops.knnlm.knn_interpolate_target,
                              (logits, dists, values, target, 0.3, 2.0))


@pytest.mark.parametrize("device", DEVICES)
def test_scoring_dispatches_to_op(device):
    assert ops.get_op("knn_interpolate", torch.device(device)) is not None
    assert ops.get_op("knn_interpolate_target", torch.device(device)) is not None
    logits, dists, values, target = _inputs(4, 3000, 16, torch.bfloat16, device, n_tokens=50)
    out = scoring.interpolate(logits, dists, values, 0.25, 2.0)
    torch.testing.assert_close(out, scoring.reference_interpolate(logits, dists, values, 0.25, 2.0),
                               rtol=RTOL, atol=ATOL)
    out_t = scoring.interpolate_target(logits, dists, values, target, 0.25, 2.0)
    torch.testing.assert_close(
        out_t, scoring.reference_interpolate_target(logits, dists, values, target, 0.25, 2.0),
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
    import os
    import subprocess
    import sys

    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('always')\n"
        "from knnlm import ops, scoring\n"
        "with warnings.catch_warnings(record=True) as rec:\n"
        "    warnings.simplefilter('always')\n"
        "    assert ops.get_op('knn_interpolate', torch.device('cpu')) is None\n"
        "    assert ops.get_op('knn_interpolate_target', torch.device('cpu')) is None\n"
        "    x = torch.randn(2, 50); d = torch.rand(2, 4); v = torch.randint(0, 50, (2, 4))\n"
        "    out = scoring.interpolate(x, d, v, 0.5, 1.0)\n"
        "    assert torch.equal(out, scoring.reference_interpolate(x, d, v, 0.5, 1.0))\n"
        "msgs = [str(w.message) for w in rec if 'knnlm' in str(w.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert 'no C++ compiler' in msgs[0], msgs\n"
        "print('OK')\n"
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"),
               TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    env.pop("KNNLM_DISABLE_KERNEL", None)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=str(ops.csrc_dir().parent), timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]
