"""The reference formula against a brute-force per-token Python computation."""
import math

import pytest
import torch

from knnlm.scoring import check_mixture_args, reference_interpolate, reference_interpolate_target


def _brute(logits, dists, values, lam, temp):
    """Plain Python floats, one token at a time: the definition, nothing shared with the code."""
    out = []
    for row, d_row, v_row in zip(logits.tolist(), dists.tolist(), values.tolist()):
        z = sum(math.exp(x) for x in row)
        w = [math.exp(-d / temp) if d != math.inf else 0.0 for d in d_row]
        zw = sum(w)
        res = []
        for v in range(len(row)):
            p_lm = math.exp(row[v]) / z
            p_knn = sum(wi for wi, vi in zip(w, v_row) if vi == v) / zw if zw > 0 else 0.0
            p = lam * p_knn + (1 - lam) * p_lm
            res.append(math.log(p) if p > 0 else -math.inf)
        out.append(res)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("lam", [0.0, 0.25, 0.9, 1.0])
@pytest.mark.parametrize("temp", [0.5, 1.0, 10.0])
def test_reference_matches_brute_force(lam, temp):
    g = torch.Generator().manual_seed(0)
    B, V, K = 4, 40, 12
    logits = torch.randn(B, V, generator=g) * 3
    dists = torch.rand(B, K, generator=g) * 5
    values = torch.randint(0, 8, (B, K), generator=g)  # few distinct ids: duplicates are common
    dists[1, 3:] = math.inf  # missing neighbours
    dists[2] = math.inf  # no neighbours at all
    want = _brute(logits, dists, values, lam, temp)
    got = reference_interpolate(logits, dists, values, lam, temp).double()
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got))
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)
    assert not torch.isnan(got).any()
    tgt = torch.randint(0, V, (B,), generator=g)
    t = reference_interpolate_target(logits, dists, values, tgt, lam, temp).double()
    w = want.gather(1, tgt[:, None]).squeeze(1)
    assert torch.equal(torch.isfinite(t), torch.isfinite(w))
    torch.testing.assert_close(t[torch.isfinite(w)], w[torch.isfinite(w)], rtol=1e-5, atol=1e-5)


def test_per_row_lambda_matches_brute_force_and_the_dense_mixture():
    """A per-row λ (the adaptive gate's) on the CPU mixes only at the voted tokens
    (``scoring._mix_at_votes``): the definition per row, and the dense ``mix`` of the two
    log-distributions up to float32 rounding, with the same -inf / NaN entries (a NaN kNN row is
    NaN everywhere, a banned token stays -inf); a batch with a row of λ 0 or 1 takes the dense
    path, which returns that side exactly."""
    from knnlm.scoring import mix, reference_knn_log_probs

    g = torch.Generator().manual_seed(3)
    B, V, K, temp = 6, 50, 12, 2.0
    logits = torch.randn(B, V, generator=g) * 3
    dists = torch.rand(B, K, generator=g) * 5
    values = torch.randint(0, 9, (B, K), generator=g)  # duplicates are common
    dists[1, 4:] = math.inf  # missing neighbours
    dists[2] = math.inf  # no neighbour at all
    logits[3, :20] = -math.inf  # banned tokens
    lam = torch.tensor([0.1, 0.5, 0.7, 0.9, 0.3, 0.999])
    got = reference_interpolate(logits, dists, values, lam, temp)
    want = torch.cat([_brute(logits[i:i + 1], dists[i:i + 1], values[i:i + 1], float(lam[i]), temp) for i in range(B)])
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got)) and not torch.isnan(got).any()
    torch.testing.assert_close(got.double()[finite], want[finite], rtol=1e-5, atol=1e-5)

    dists[4, 2] = math.nan  # a NaN kNN row
    dense = mix(torch.log_softmax(logits, -1), reference_knn_log_probs(dists, values, V, temp), lam)
    got = reference_interpolate(logits, dists, values, lam, temp)
    assert torch.isnan(got[4]).all() and torch.equal(torch.isnan(got), torch.isnan(dense))
    assert torch.equal(torch.isneginf(got), torch.isneginf(dense))
    ok = torch.isfinite(dense)
    torch.testing.assert_close(got[ok], dense[ok], rtol=1e-6, atol=1e-6)

    edge = torch.tensor([0.0, 1.0, 0.5, 0.9, 0.3, 0.2])  # rows of weight 0 and 1: those sides exactly
    got = reference_interpolate(logits, dists, values, edge, temp)
    assert torch.equal(got[0], torch.log_softmax(logits[0], -1))
    assert torch.equal(got[1], reference_knn_log_probs(dists[1:2], values[1:2], V, temp)[0])


def test_fp16_logits_are_upcast():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 30, generator=g)
    dists, values = torch.rand(2, 5, generator=g), torch.randint(0, 30, (2, 5), generator=g)
    a = reference_interpolate(logits.half(), dists, values, 0.3, 1.0)
    b = reference_interpolate(logits.half().float(), dists, values, 0.3, 1.0)
    assert a.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.parametrize("lam, temp, match", [(-0.1, 1, "`lam` must be in"), (1.5, 1, "`lam` must be in"),
                                              (float("nan"), 1, "`lam` must be in"),
                                              (0.5, 0, "`temperature` must be a positive"),
                                              (0.5, -1, "`temperature` must be a positive")])
def test_bad_mixture_args(lam, temp, match):
    with pytest.raises(ValueError, match=match) as e:  # ConfigError is a ValueError
        check_mixture_args(lam, temp)
    assert e.value.param == match.split("`")[1]
