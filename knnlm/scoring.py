"""The kNN-LM interpolation formula: the one place it is written down.

Given LM logits and the k nearest neighbours of the query hidden state (squared distances and
the token ids stored as their values):

    p_knn(v) = sum_{i : values_i = v} softmax(-dists / T)_i
    log p(v) = logaddexp(log(1 - lam) + log_softmax(logits)(v), log(lam) + log p_knn(v))

Everything is computed in fp32 log space. Conventions shared by the reference and the fused
``csrc`` op (which is tested against the functions below):

* ``dists`` may hold ``+inf`` for a missing / excluded neighbour: it gets zero weight. A row whose
  neighbours are all ``+inf`` has no kNN mass at all, so ``log p_knn = -inf`` everywhere and the
  result is ``log(1 - lam) + log p_lm``.
* tokens that no neighbour votes for get ``log p_knn = -inf`` (no epsilon, no magic floor).
* ``lam`` is a float, or a per-row tensor (B,) / (N,) of weights in [0, 1] (an adaptive gate's
  λ(x), ``knnlm.gate``): row i is mixed with ``lam[i]``, by the same formula. The fused op takes a
  scalar only; a tensor ``lam`` is computed by the torch reference (the spec).
* ``lam = 0`` returns ``log p_lm`` and ``lam = 1`` returns ``log p_knn`` exactly, without NaN
  (per row for a tensor ``lam``).
  A side with weight zero is not evaluated at all: at ``lam = 1`` the logits are not read (the
  result is the pure kNN distribution even for a NaN logits row), at ``lam = 0`` the distances are
  not read. (IEEE ``0 * NaN = NaN`` would make the endpoints depend on the unused side; the fused
  op skips the unused side's pass for speed, and the endpoints are the "base LM" and "pure kNN"
  settings of a sweep.)
* ``values`` must be valid token ids in ``[0, V)``. Out-of-range ids raise on the CPU; the CUDA op
  checks them in-kernel without a host sync and returns NaN for such a row
  (``KNNLM_CUDA_CHECKS=1`` makes it raise, see ``knnlm.ops``).

Non-finite inputs (the same for the full and the target-only functions, the reference and the op):

* LM side, as ``torch.log_softmax`` defines it: a logits row with a NaN, a ``+inf``, or only
  ``-inf`` entries has no distribution, ``log p_lm = NaN`` at every token of the row (one ``+inf``
  logit is not read as "all mass on that token"). ``-inf`` logits among finite ones are tokens of
  probability 0 (``log p_lm = -inf``).
* kNN side: a ``+inf`` distance is a missing neighbour (above); a NaN or ``-inf`` distance leaves
  the row's softmax undefined, ``log p_knn = NaN`` at every token of the row.
* The mix propagates NaN (``torch.logaddexp``): for ``0 < lam < 1`` a NaN on either side makes the
  whole output row NaN; at ``lam = 0`` / ``lam = 1`` only the evaluated side counts (above).

``interpolate`` dispatches to the fused op from ``knnlm.ops`` when it is available for the
tensors' device and falls back to the torch reference otherwise. Target-only scoring (evaluation)
has no fused op: it never builds a (B, V) row, only log p_lm(target) from the LM head and the
K-sized ``knn_target_log_probs`` (``reference_interpolate_target`` composes them: the spec).

**Keeping the unseen vocabulary** (``keep_unseen``; ``unseen`` = the tokens the datastore never
saw, U, with LM mass P_U per row): retrieval can only propose tokens of the datastore, so this
variant leaves the LM's probability of every token of U untouched and mixes only the rest:

    p(w) = p_lm(w)                                    w in U
    p(w) = lam (1 - P_U) p_knn(w) + (1 - lam) p_lm(w)  otherwise   (sums to 1 for every lam)

It is the formula above with log p_knn replaced by ``keep_unseen_knn`` (log p_lm on U, log p_knn +
log(1 - P_U) elsewhere): ``mix(..., log_unseen=, unseen=)``, which returns log p_lm on U exactly. The
fused op does not implement it (the reference is used). A target the datastore never saw scores
exactly log p_lm, whatever lam.
"""

from __future__ import annotations

import math

import torch

from knnlm.config import check_mixture
from knnlm.errors import ConfigError

__all__ = [
    "check_mixture_args",
    "knn_log_weights",
    "reference_knn_log_probs",
    "reference_interpolate",
    "reference_interpolate_target",
    "lm_target_log_probs",
    "knn_target_log_probs",
    "mix",
    "keep_unseen_knn",
    "unseen_log_mass",
    "interpolate",
]


Lam = float | torch.Tensor  # a weight for every row, or one per row: (B,) / (N,)


def check_mixture_args(lam: Lam, temperature: float) -> None:
    """Raise ``ConfigError`` (a ``ValueError``) naming ``lam`` / ``temperature`` when invalid.
    A tensor ``lam`` must be 1-D with every entry in [0, 1] (no NaN)."""
    if not isinstance(lam, torch.Tensor):
        check_mixture(lam, temperature)
        return
    check_mixture(0.0, temperature)
    if lam.dim() != 1:
        raise ConfigError(f"`lam` as a tensor must be 1-D (one weight per row), got shape {tuple(lam.shape)}",
                          param="lam")
    if lam.numel() and not bool(((lam >= 0) & (lam <= 1)).all()):  # NaN fails both comparisons
        bad = lam[~((lam >= 0) & (lam <= 1))][0].item()
        raise ConfigError(f"`lam` must be in [0, 1] for every row, got {bad}", param="lam")


def _is_scalar(lam: Lam) -> bool:
    return not isinstance(lam, torch.Tensor)


def _log_mix_weights(lam: float) -> tuple[float, float]:
    """(log(1 - lam), log(lam)) with exact -inf at the ends."""
    log_lm = math.log1p(-lam) if lam < 1.0 else -math.inf
    log_knn = math.log(lam) if lam > 0.0 else -math.inf
    return log_lm, log_knn


def _rows(lam: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-row ``lam`` (N,) shaped to broadcast over ``like`` (N, ...), fp32 on its device."""
    return lam.to(like.device, torch.float32).reshape(lam.shape + (1,) * (like.dim() - 1))


def knn_log_weights(dists: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(-dists / T) over the neighbour axis, fp32. (B, K) -> (B, K).

    ``+inf`` distances get ``-inf`` weight; a row of only ``+inf`` gets ``-inf`` everywhere
    (instead of the NaN a plain log_softmax would give). A row with a NaN or ``-inf`` distance is
    NaN everywhere.
    """
    scores = -dists.float() / temperature  # (B, K)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # (B, 1)
    out = scores - lse
    out = torch.where(torch.isneginf(lse), torch.full_like(out, -math.inf), out)
    # a NaN score (NaN distance) makes lse NaN, a +inf one (-inf distance) makes it +inf: the
    # softmax is undefined, the whole row NaN (not just the entries that inf - inf hits)
    undefined = torch.isnan(lse) | torch.isposinf(lse)
    return torch.where(undefined, torch.full_like(out, math.nan), out)


def _knn_log_probs_at_votes(dists: torch.Tensor, values: torch.Tensor, vocab_size: int,
                            temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log p_knn at each neighbour's token (B, K) fp32 (neighbours of one token share its value),
    and the rows' largest log weight m (B, 1): 0 for a row without neighbours, NaN for a NaN row."""
    w = knn_log_weights(dists, temperature)  # (B, K)
    # Stable per-token log-sum-exp of the neighbour weights: subtract the row max (0 unless the
    # row is empty), sum in probability space, take the log. exp(w - max) <= 1, never overflows.
    m = w.max(dim=-1, keepdim=True).values  # (B, 1)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    idx = values.long()
    mass = torch.zeros(w.shape[0], vocab_size, dtype=torch.float32, device=w.device)
    mass.scatter_add_(1, idx, torch.exp(w - m))  # (B, V)
    # log(mass) + m, taken only at the K voted tokens (the other V - K entries are log 0 = -inf):
    # torch's log of 0 is ~40x slower than of a normal number on some CPUs, and V >> K
    return mass.gather(1, idx).log() + m, m


def reference_knn_log_probs(dists: torch.Tensor, values: torch.Tensor, vocab_size: int,
                            temperature: float) -> torch.Tensor:
    """log p_knn as a dense (B, V) fp32 tensor, ``-inf`` where no neighbour votes."""
    at, m = _knn_log_probs_at_votes(dists, values, vocab_size, temperature)  # (B, K), (B, 1)
    out = torch.full((at.shape[0], vocab_size), -math.inf, dtype=torch.float32, device=at.device) + m
    return out.scatter_(1, values.long(), at)  # (B, V): log 0 + m is -inf, or NaN everywhere in a NaN row


def unseen_log_mass(lp_lm: torch.Tensor, unseen: torch.Tensor) -> torch.Tensor:
    """log P_U, the LM's mass on the tokens ``unseen`` (V,) bool: (B, V) log p_lm -> (B,) fp32."""
    return torch.logsumexp(lp_lm.float().masked_fill(~unseen.to(lp_lm.device), -math.inf), dim=-1)


def keep_unseen_knn(lp_lm: torch.Tensor, lp_knn: torch.Tensor, log_unseen: torch.Tensor,
                    unseen: torch.Tensor) -> torch.Tensor:
    """The kNN side of the keep-unseen mixture (module docstring): ``mix(lp_lm, keep_unseen_knn(...),
    lam)`` is log p (to rounding where ``unseen``: ``mix(..., unseen=)`` returns log p_lm there
    exactly). lp_lm / lp_knn (N,) at the targets or (N, V); ``log_unseen`` (N,) log P_U per row;
    ``unseen`` bool, broadcastable to lp_lm: (N,) whether each target is unseen, or (V,)."""
    lm, knn = lp_lm.float(), lp_knn.float()
    log_seen = torch.log1p(-log_unseen.float().exp().clamp(max=1.0))  # (N,) log(1 - P_U)
    log_seen = log_seen.reshape(log_seen.shape + (1,) * (knn.dim() - 1))
    return torch.where(unseen.to(lm.device), lm, knn + log_seen)


def reference_interpolate(logits: torch.Tensor, dists: torch.Tensor, values: torch.Tensor,
                          lam: Lam, temperature: float, *, unseen: torch.Tensor | None = None,
                          check: bool = True) -> torch.Tensor:
    """The spec. logits (B, V), dists (B, K), values (B, K), lam float or (B,) -> log p (B, V) fp32.
    ``unseen`` (V,) bool: the keep-unseen mixture (module docstring). ``check``: as ``interpolate``."""
    if check:
        check_mixture_args(lam, temperature)
    if unseen is not None:
        lp_lm = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
        lp_knn = reference_knn_log_probs(dists, values, logits.shape[-1], temperature)  # (B, V)
        return mix(lp_lm, lp_knn, lam, log_unseen=unseen_log_mass(lp_lm, unseen), unseen=unseen)
    if _is_scalar(lam) and lam == 1.0:  # the LM side has weight zero and is not evaluated (module docstring)
        return reference_knn_log_probs(dists, values, logits.shape[-1], temperature)
    # torch.log_softmax: a row with a NaN / +inf logit, or only -inf logits, is NaN everywhere
    lp_lm = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    if _is_scalar(lam) and lam == 0.0:
        return lp_lm
    if not _is_scalar(lam) and lp_lm.device.type == "cpu":
        w = _rows(lam, lp_lm)  # (B, 1)
        if not bool(((w == 0) | (w == 1)).any()):  # (rows of weight 0 / 1 take one side exactly: below)
            return _mix_at_votes(lp_lm, dists, values, w, temperature)
    lp_knn = reference_knn_log_probs(dists, values, logits.shape[-1], temperature)  # (B, V)
    return mix(lp_lm, lp_knn, lam)


def _mix_at_votes(lp_lm: torch.Tensor, dists: torch.Tensor, values: torch.Tensor, w: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """``mix(lp_lm, reference_knn_log_probs(...), w)`` for per-row weights 0 < w < 1 (B, 1), with
    the log-sum-exp of the two sides taken only at the K voted tokens: at the others log p_knn is
    -inf and ``logaddexp(a, -inf)`` is exactly ``a``, log(1 - w) + log p_lm (a NaN kNN row stays
    NaN everywhere: ``m - m`` below). The same values up to the last bit of a logaddexp (torch's
    vectorised and scalar exp / log round differently); on the CPU the (B, V) logaddexp costs
    ~0.1 ms a row, and dense log p_knn a few more V-wide passes."""
    knn, m = _knn_log_probs_at_votes(dists, values, lp_lm.shape[-1], temperature)  # (B, K), (B, 1)
    idx = values.long()
    log_lm_w = torch.log1p(-w)  # (B, 1)
    out = lp_lm + (log_lm_w + (m - m))  # (B, V) the unvoted tokens
    at = torch.logaddexp(lp_lm.gather(1, idx) + log_lm_w, knn + torch.log(w))  # (B, K)
    return out.scatter_(1, idx, at)


def lm_target_log_probs(logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor | None = None) -> torch.Tensor:
    """log p_lm(target): logits (..., V), target (...) -> (...) fp32. ``lse`` (...): the rows'
    log-sum-exp when already computed (``knnlm.gate.lm_features`` returns it).

    NaN for a row with a NaN / +inf logit or only -inf logits, as ``torch.log_softmax`` gives.
    """
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1) if lse is None else lse
    out = logits.gather(-1, target.long()[..., None]).squeeze(-1) - lse
    # lse is NaN for a NaN logit and -inf for an all -inf row (out is NaN then), but +inf for a
    # +inf logit, where the subtraction alone would give -inf at a finite target
    return torch.where(torch.isposinf(lse), torch.full_like(out, math.nan), out)


def knn_target_log_probs(dists: torch.Tensor, values: torch.Tensor, target: torch.Tensor,
                         temperature: float) -> torch.Tensor:
    """log p_knn(target): a masked log-sum-exp over the K neighbours, (B, K) -> (B,) fp32.

    Never materialises a (B, V) distribution.
    """
    w = knn_log_weights(dists, temperature)  # (B, K)
    hit = values.long() == target.long()[:, None]  # (B, K)
    out = torch.logsumexp(torch.where(hit, w, torch.full_like(w, -math.inf)), dim=-1)
    # a NaN kNN row is NaN at every token, voted for by a neighbour or not
    return torch.where(torch.isnan(w).any(dim=-1), torch.full_like(out, math.nan), out)


def mix(lp_lm: torch.Tensor, lp_knn: torch.Tensor, lam: Lam, *, log_unseen: torch.Tensor | None = None,
        unseen: torch.Tensor | None = None) -> torch.Tensor:
    """log(lam * p_knn + (1 - lam) * p_lm) from the two log-probabilities (any shape (N, ...));
    ``lam`` a float or one weight per row (N,). Rows with weight 0 / 1 return the LM / kNN side
    exactly (the other side is not read: a NaN there does not leak).

    With ``unseen`` (bool, broadcastable to lp_lm) and ``log_unseen`` (N,) log P_U: the keep-unseen
    mixture (module docstring), exactly log p_lm where ``unseen``."""
    if unseen is not None:
        lm = lp_lm.float()
        return torch.where(unseen.to(lm.device), lm, mix(lm, keep_unseen_knn(lm, lp_knn, log_unseen, unseen), lam))
    if not _is_scalar(lam):
        w = _rows(lam, lp_lm)  # (N, 1, ...)
        lm, knn = lp_lm.float(), lp_knn.float()
        out = torch.logaddexp(lm + torch.log1p(-w), knn + torch.log(w))
        # rows of weight 0 / 1 take one side exactly; on the CPU the two V-wide selects (~0.1 ms a
        # row) are skipped when there is none (on an accelerator they are cheap and the check syncs)
        if lm.device.type == "cpu" and not bool(((w == 0) | (w == 1)).any()):
            return out
        return torch.where(w == 0, lm, torch.where(w == 1, knn, out))
    if lam == 0.0:
        return lp_lm.float()
    if lam == 1.0:
        return lp_knn.float()
    log_lm, log_knn = _log_mix_weights(lam)
    return torch.logaddexp(lp_lm.float() + log_lm, lp_knn.float() + log_knn)


def reference_interpolate_target(logits: torch.Tensor, dists: torch.Tensor, values: torch.Tensor,
                                 target: torch.Tensor, lam: Lam,
                                 temperature: float) -> torch.Tensor:
    """log p(target) only. logits (B, V), dists/values (B, K), target (B,), lam float or (B,) -> (B,) fp32.

    Sweeps over lambda / T / k call the three pieces (``lm_target_log_probs``,
    ``knn_target_log_probs``, ``mix``) directly so that shared parts are computed once.
    """
    check_mixture_args(lam, temperature)
    if _is_scalar(lam) and lam == 1.0:  # the LM side has weight zero and is not evaluated (module docstring)
        return knn_target_log_probs(dists, values, target, temperature)
    lp_lm = lm_target_log_probs(logits, target)
    if _is_scalar(lam) and lam == 0.0:
        return lp_lm
    return mix(lp_lm, knn_target_log_probs(dists, values, target, temperature), lam)


def _fused(name: str, logits: torch.Tensor):
    """The fused op for ``logits``' device, or None (the reference is used then).

    The op has no autograd formula: inputs that need a gradient use the reference.
    """
    if logits.requires_grad and torch.is_grad_enabled():
        return None
    from knnlm import ops  # local import: ops may JIT-compile on first use

    return ops.get_op(name, logits.device)


def interpolate(logits: torch.Tensor, dists: torch.Tensor, values: torch.Tensor, lam: Lam,
                temperature: float, *, use_kernel: bool = True, unseen: torch.Tensor | None = None,
                check: bool = True) -> torch.Tensor:
    """Full kNN-LM log-distribution (B, V); the fused op when available (scalar ``lam``), else
    the reference (a per-row ``lam`` (B,) or the keep-unseen mixture, ``unseen`` (V,), always
    takes the reference). ``check=False``: ``lam`` and ``temperature`` were validated where they
    entered (``KNNLM``'s settings; a gate's λ is a sigmoid), so the per-call check (a host sync
    for a tensor ``lam`` on a GPU) is skipped."""
    if check:
        check_mixture_args(lam, temperature)
    op = _fused("knn_interpolate", logits) if use_kernel and _is_scalar(lam) and unseen is None else None
    if op is None:
        return reference_interpolate(logits, dists, values, lam, temperature, unseen=unseen, check=False)
    return op(logits, dists.float(), values, float(lam), float(temperature))
