"""Adaptive kNN-LM: a per-token λ(x) and a pre-retrieval gate, their features, fitting and saving.

Two small models, fitted by ``knnlm tune`` on text that is neither in the datastore nor in the eval
text, saved with the datastore (``knnlm.datastore.write_gate``: a file and a header entry):

* the **λ gate** maps per-token features to λ(x) = sigmoid(f(z)) (z: features standardised with
  the tuning text's mean / std, f: a linear map or a one-hidden-layer tanh MLP) and is fitted by
  maximising the mixture log-likelihood itself, ``mean log(λ(x) p_knn(y) + (1 - λ(x)) p_lm(y))``,
  on the tuning tokens (full-batch L-BFGS, fixed seed: deterministic). The mixture is computed by
  ``knnlm.scoring.mix``: the gate only produces λ.
* the **retrieval gate** sees only what is known before searching (the ``LM_FEATURES``: LM
  entropy, LM max log-prob, datastore frequency of the LM's argmax, LM mass on tokens the
  datastore never saw) and predicts the log-likelihood gain that
  searching would bring (a regression on ``log p_mix(y) - log p_lm(y)`` under the λ gate). Tokens
  whose predicted gain is below a threshold skip the search and score the LM alone. The threshold
  for a searched fraction F is the (1 - F) quantile of the predicted gains on the tuning text
  (1,001 quantiles are stored), so "F" is the fraction of tuning tokens that would search; the
  fraction actually searched on other text is measured and reported.

Features (``FEATURES``; which ones the λ gate keeps is decided on held-out tuning documents by
backward elimination, and recorded in the gate's ``report``):

==================== =========================================================================
``lm_entropy``        entropy of p_lm (nats)
``lm_max_logprob``    log of the LM's largest probability
``argmax_log_freq``   log(1 + datastore frequency of the LM's argmax token)
``lm_unseen_log_mass`` log of p_lm's mass on tokens the datastore never saw (floored at 1e-6):
                      the LM's own estimate that the next token is one retrieval cannot
                      propose, where any λ > 0 only costs log(1 - λ)
``knn_top1_log_dist`` log(1 + squared distance of the nearest neighbour)
``knn_mean_log_dist`` log(1 + mean squared distance of the neighbours)
``knn_entropy``       entropy of p_knn (over tokens, neighbours' weights summed per value)
``knn_log_distinct``  log of the number of distinct values among the neighbours
``knn_max_prob``      the largest p_knn
``knn_lm_argmax_prob`` p_knn of the LM's argmax token (do retrieval and the LM agree?)
==================== =========================================================================

A gate fitted with ``keep_unseen`` maximises the keep-unseen mixture's likelihood instead
(``knnlm.scoring``: tokens the datastore never saw keep p_lm); it records that, and the runs that
use it follow it (``knnlm.config.resolve_keep_unseen``).

The kNN features use the gate's own ``k`` and ``temperature`` (those it was tuned with) whatever
setting the mixture uses, so λ(x) means the same in a sweep. A row with no neighbour at all
(everything excluded or missing) gets λ = 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from knnlm.config import check_fraction, check_unseen_options
from knnlm.cpu import row_argmax
from knnlm.datastore import Datastore, read_gate, write_gate
from knnlm.errors import ConfigError, DatastoreError
from knnlm.retrieval import one_thread  # fitting is a small dense problem: threads cost more than they give
from knnlm.scoring import keep_unseen_knn, knn_log_weights, mix

__all__ = ["FEATURES", "PRE_FEATURES", "Gate", "TuneData", "fit_gate", "load_gate", "save_gate", "lm_features",
           "knn_features", "check_fraction", "GATE_FORMAT", "check_outside_datastore", "format_report"]

GATE_FORMAT = "knnlm-gate"
GATE_VERSION = 1
LM_FEATURES = ("lm_entropy", "lm_max_logprob", "argmax_log_freq", "lm_unseen_log_mass")
NL = len(LM_FEATURES)  # lm_features' columns: these, then the LM's argmax id
UNSEEN_COL = LM_FEATURES.index("lm_unseen_log_mass")  # log P_U (clamped at UNSEEN_FLOOR): the keep-unseen mixture's
KNN_FEATURES = ("knn_top1_log_dist", "knn_mean_log_dist", "knn_entropy", "knn_log_distinct", "knn_max_prob",
                "knn_lm_argmax_prob")
FEATURES = LM_FEATURES + KNN_FEATURES
PRE_FEATURES = LM_FEATURES  # known before searching
UNSEEN_FLOOR = 1e-6  # lm_unseen_log_mass of a distribution with (almost) no mass on unseen tokens
QUANTILES = 1001
UNSEEN_PENALTY = 1e3  # weight of the squared excess over max_unseen_loss (nats^2) in the λ gate's objective
KEEP_EPS = 1e-3  # nats/token: a feature stays when dropping it costs more than this on held-out tuning docs


# ---------------------------------------------------------------------------------- features


def lm_features(logits: torch.Tensor, counts: torch.Tensor,
                unseen: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, V) logits, (V,) datastore token counts -> (features (R, NL + 1) fp32: the
    ``LM_FEATURES`` then the argmax id (as float, for ``knn_features``); log-sum-exp (R,) fp32,
    for ``knnlm.scoring.lm_target_log_probs(..., lse=)``). ``unseen`` (V,): ``counts == 0`` as
    float32, when the caller keeps it (made here otherwise: ~0.1 ms a call on a CPU).

    One exponential pass over the logits into one (R, V) buffer: with e = exp(x - max),
    S = sum(e), log-sum-exp = max + log S, entropy = lse - sum(e x) / S, unseen mass =
    sum(e [count = 0]) / S. Rows with -inf logits take the masked path (0 * -inf)."""
    x = logits.float()
    m, arg = x.amax(dim=-1), row_argmax(x)  # (R,), (R,) (torch's max(dim) is slow on a CPU: knnlm.cpu)
    e = torch.sub(x, m[:, None]).exp_()  # (R, V) p * S
    s = e.sum(-1)  # (R,)
    lse = m + s.log()
    if bool(x.amin() == -math.inf):  # p = 0 there: its term of the entropy is 0, not NaN
        ex = torch.bmm(e[:, None, :], torch.where(e > 0, x, torch.zeros((), dtype=x.dtype))[:, :, None]).view(-1)
    else:
        ex = torch.bmm(e[:, None, :], x[:, :, None]).view(-1)  # (R,) sum(e x)
    ent = lse - ex / s
    unseen = (counts.to(x.device) == 0).to(x.dtype) if unseen is None else unseen.to(x.device, x.dtype)  # (V,)
    mass = torch.log((e @ unseen) / s).clamp(min=math.log(UNSEEN_FLOOR))
    freq = torch.log1p(counts.to(arg.device)[arg].float())
    return torch.stack([ent, m - lse, freq, mass, arg.float()], dim=-1), lse


def knn_features(dists: torch.Tensor, values: torch.Tensor, temperature: float,
                 lm_argmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbours (R, K) ascending, the LM's argmax (R,) -> (features (R, 6) fp32, has (R,) bool:
    the row has at least one neighbour). Features of a row without neighbours are 0."""
    d = dists.float()
    finite = torch.isfinite(d)  # (R, K)
    has = finite.any(dim=-1)
    nfin = finite.sum(-1).clamp(min=1)
    dz = torch.where(finite, d.clamp(min=0), torch.zeros_like(d))
    top1 = torch.log1p(torch.where(finite, d.clamp(min=0), torch.full_like(d, math.inf)).min(-1).values)
    mean = torch.log1p(dz.sum(-1) / nfin)
    # p_knn per distinct value: sort the values, sum the weights of each run of equal values
    w = knn_log_weights(d, temperature).exp()  # (R, K), 0 for missing
    vals = torch.where(finite, values.long(), torch.full_like(values.long(), -1))
    sv, order = vals.sort(dim=-1)
    sw = w.gather(1, order)
    start = torch.ones_like(sv, dtype=torch.bool)
    start[:, 1:] = sv[:, 1:] != sv[:, :-1]
    seg = start.long().cumsum(-1) - 1  # (R, K) run id
    mass = torch.zeros_like(sw).scatter_add_(1, seg, sw)  # (R, K) mass per run (runs of -1 have 0)
    ent = -(mass * torch.log(mass.clamp(min=1e-30))).sum(-1)
    distinct = (start & (sv >= 0)).sum(-1).clamp(min=1).float()
    agree = (w * (vals == lm_argmax.long()[:, None])).sum(-1)
    out = torch.stack([top1, mean, ent, torch.log(distinct), mass.max(-1).values, agree], dim=-1)
    return torch.where(has[:, None], out, torch.zeros_like(out)), has


# ---------------------------------------------------------------------------------- the models


def _forward(net: dict, z: torch.Tensor) -> torch.Tensor:
    """z (R, F) -> (R,) logit (λ gate) or predicted gain (retrieval gate)."""
    if net["kind"] == "linear":
        return z @ net["w"] + net["b"]
    return torch.tanh(z @ net["W1"] + net["b1"]) @ net["w2"] + net["b2"]


def _new_net(kind: str, n_features: int, hidden: int, gen: torch.Generator, bias: float = 0.0) -> dict:
    """A fresh net whose output bias is ``bias`` (the λ gate: logit of the best fixed λ, so that with
    the L2 penalty on the weights the fit is regularised toward that constant gate)."""
    if kind == "linear":
        return {"kind": kind, "w": torch.zeros(n_features, dtype=torch.float64),
                "b": torch.tensor(bias, dtype=torch.float64)}
    return {"kind": kind,
            "W1": torch.randn(n_features, hidden, generator=gen, dtype=torch.float64) / math.sqrt(max(n_features, 1)),
            "b1": torch.zeros(hidden, dtype=torch.float64),
            "w2": torch.randn(hidden, generator=gen, dtype=torch.float64) * 0.1,
            "b2": torch.tensor(bias, dtype=torch.float64)}


def _params(net: dict) -> list[torch.Tensor]:
    return [v for k, v in net.items() if k != "kind"]


def _train(net: dict, loss_fn, z: torch.Tensor, *, l2: float, iters: int) -> dict:
    """Full-batch L-BFGS (deterministic) on ``loss_fn(_forward(net, z))`` + l2 on the weights."""
    for p in _params(net):
        p.requires_grad_(True)
    weights = [v for k, v in net.items() if k in ("w", "W1", "w2")]
    opt = torch.optim.LBFGS(_params(net), lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = loss_fn(_forward(net, z)) + l2 * sum((w ** 2).sum() for w in weights)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return {k: (v.detach() if k != "kind" else v) for k, v in net.items()}


def _net_json(net: dict) -> dict:
    return {k: (v if k == "kind" else v.tolist()) for k, v in net.items()}


def _net_from_json(d: dict) -> dict:
    return {k: (v if k == "kind" else torch.tensor(v, dtype=torch.float64)) for k, v in d.items()}


def _mixture_nll(lp_lm: torch.Tensor, lp_knn: torch.Tensor, unseen: torch.Tensor | None = None,
                 bound: float | None = None):
    """loss(s): mean -log(sigmoid(s) p_knn + sigmoid(-s) p_lm), the objective of the λ gate.

    With ``bound`` (nats) and ``unseen`` (R,) bool (targets the datastore never saw, where the
    mixture can only lose -log(1 - λ)): plus ``UNSEEN_PENALTY`` x the squared excess of their
    mean -log(1 - λ) over ``bound``."""
    knn = lp_knn.clamp(min=-1e4)  # -inf (no neighbour votes for y) would give NaN gradients
    constrained = bound is not None and unseen is not None and bool(unseen.any())

    def loss(s: torch.Tensor) -> torch.Tensor:
        nll = -torch.logaddexp(torch.nn.functional.logsigmoid(-s) + lp_lm,
                               torch.nn.functional.logsigmoid(s) + knn).mean()
        if constrained:
            harm = -torch.nn.functional.logsigmoid(-s[unseen]).mean()
            nll = nll + UNSEEN_PENALTY * torch.relu(harm - bound) ** 2
        return nll
    return loss


# ---------------------------------------------------------------------------------- the gate


@dataclass
class Gate:
    """A fitted λ gate + retrieval gate for one datastore (``identity``), at the kNN setting
    (``k``, ``temperature``) its features are computed with."""
    identity: str
    k: int
    temperature: float
    features: list[str]  # the λ gate's inputs (a subset of FEATURES)
    mean: torch.Tensor  # (F,) standardisation of those
    std: torch.Tensor
    net: dict
    pre_features: list[str] = field(default_factory=lambda: list(PRE_FEATURES))
    pre_mean: torch.Tensor | None = None
    pre_std: torch.Tensor | None = None
    pre_net: dict | None = None
    pre_quantiles: list[float] | None = None  # predicted gain at QUANTILES evenly spaced levels
    tuned_on: list[dict] = field(default_factory=list)  # {"name", "sha256", "tokens"}
    report: dict = field(default_factory=dict)
    path: str | None = None
    keep_unseen: bool = False  # fitted for the keep-unseen mixture (knnlm.scoring): runs with it follow it
    min_fraction: float = 0.0  # the retrieval gate's floor: a run asking for a smaller fraction searches this much

    # ---- using it ------------------------------------------------------------------------------
    @staticmethod
    def _z(x: torch.Tensor, names: Sequence[str], chosen: Sequence[str], mean, std) -> torch.Tensor:
        idx = [names.index(f) for f in chosen]
        return (x[:, idx].double() - mean.to(x.device)) / std.to(x.device)

    def lam(self, lm_feats: torch.Tensor, dists: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """λ(x) (R,) fp32 in [0, 1] from ``lm_features`` (R, NL + 1) and the neighbours (R, K
        ascending; the first ``self.k`` are used). Rows without a neighbour get 0."""
        kf, has = knn_features(dists[:, :self.k], values[:, :self.k], self.temperature, lm_feats[:, NL])
        x = torch.cat([lm_feats[:, :NL], kf], dim=-1)  # (R, len(FEATURES))
        s = _forward({k: (v.to(x.device) if k != "kind" else v) for k, v in self.net.items()},
                     self._z(x, FEATURES, self.features, self.mean, self.std))
        return torch.where(has, torch.sigmoid(s), torch.zeros_like(s)).float()

    def pre_score(self, lm_feats: torch.Tensor) -> torch.Tensor:
        """Predicted log-likelihood gain of searching (R,) from ``lm_features`` only."""
        if self.pre_net is None:
            raise DatastoreError(f"gate {self.path} has no retrieval gate; re-run `knnlm tune`")
        net = {k: (v.to(lm_feats.device) if k != "kind" else v) for k, v in self.pre_net.items()}
        return _forward(net, self._z(lm_feats[:, :NL], LM_FEATURES, self.pre_features, self.pre_mean,
                                     self.pre_std)).float()

    def fraction(self, fraction: float | None) -> float:
        """The fraction a run asking for ``fraction`` (None: all) searches: at least the gate's
        ``min_fraction``, below which its held-out tuning NLL was worse than the best fixed λ with
        every token searched."""
        if fraction is None:
            return 1.0
        check_fraction(fraction)
        return max(float(fraction), self.min_fraction)

    def threshold(self, fraction: float) -> float:
        """The predicted-gain threshold above which a fraction ``fraction`` of the tuning tokens searched
        (``fraction`` raised to ``min_fraction``)."""
        return _threshold(self.pre_quantiles, self.fraction(fraction))

    def select(self, lm_feats: torch.Tensor, fraction: float | None) -> torch.Tensor:
        """Which rows search (R,) bool: all for ``fraction`` None or (raised to the floor) 1, else
        predicted gain >= threshold."""
        if self.fraction(fraction) >= 1.0:
            return torch.ones(lm_feats.shape[0], dtype=torch.bool, device=lm_feats.device)
        return self.pre_score(lm_feats) >= self.threshold(fraction)

    # ---- checks -------------------------------------------------------------------------------
    def check_datastore(self, ds: Datastore) -> None:
        if self.identity != ds.identity():
            raise DatastoreError(f"gate {self.path} was tuned on another datastore (identity {self.identity}, "
                                 f"{ds.path} is {ds.identity()}); run `knnlm tune --datastore {ds.path}`")

    def check_disjoint(self, docs: Sequence[dict], param: str = "data") -> None:
        """Refuse eval documents (dicts with ``name``, ``sha256``) the gate was tuned on."""
        tuned = {d["sha256"]: d["name"] for d in self.tuned_on}
        both = [d["name"] for d in docs if d["sha256"] in tuned]
        if both:
            raise ConfigError(f"`{param}` has {len(both)} document(s) the gate was tuned on (e.g. {both[0]}); "
                              "evaluate on text disjoint from the tuning text", param=param)

    # ---- storage ------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"format": GATE_FORMAT, "version": GATE_VERSION, "datastore": self.identity, "k": self.k,
                "temperature": self.temperature, "features": list(self.features), "mean": self.mean.tolist(),
                "std": self.std.tolist(), "net": _net_json(self.net),
                "pre": None if self.pre_net is None else {
                    "features": list(self.pre_features), "mean": self.pre_mean.tolist(), "std": self.pre_std.tolist(),
                    "net": _net_json(self.pre_net), "quantiles": self.pre_quantiles,
                    "min_fraction": self.min_fraction},
                "tuned_on": self.tuned_on, "report": self.report, "keep_unseen": self.keep_unseen}

    @classmethod
    def from_json(cls, d: dict, where: str) -> Gate:
        if d.get("format") != GATE_FORMAT or d.get("version") != GATE_VERSION:
            raise DatastoreError(f"{where} is not a {GATE_FORMAT} v{GATE_VERSION} file; re-run `knnlm tune`")
        try:
            pre = d.get("pre")
            return cls(identity=d["datastore"], k=int(d["k"]), temperature=float(d["temperature"]),
                       features=list(d["features"]), mean=torch.tensor(d["mean"], dtype=torch.float64),
                       std=torch.tensor(d["std"], dtype=torch.float64), net=_net_from_json(d["net"]),
                       pre_features=list(pre["features"]) if pre else list(PRE_FEATURES),
                       pre_mean=torch.tensor(pre["mean"], dtype=torch.float64) if pre else None,
                       pre_std=torch.tensor(pre["std"], dtype=torch.float64) if pre else None,
                       pre_net=_net_from_json(pre["net"]) if pre else None,
                       pre_quantiles=list(pre["quantiles"]) if pre else None,
                       tuned_on=list(d.get("tuned_on") or []), report=dict(d.get("report") or {}), path=where,
                       keep_unseen=bool(d.get("keep_unseen", False)),
                       min_fraction=_fraction_field(pre.get("min_fraction", 0.0) if pre else 0.0, where))
        except (KeyError, TypeError, ValueError) as e:
            raise DatastoreError(f"{where} lacks or mangles field {e}; re-run `knnlm tune`") from None


def _fraction_field(x, where: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0.0 <= x <= 1.0:
        raise DatastoreError(f"{where}: pre.min_fraction must be a number in [0, 1], got {x!r}; re-run `knnlm tune`")
    return float(x)


def check_outside_datastore(ds: Datastore, docs: Sequence[dict], param: str = "data") -> None:
    """Refuse tuning documents (dicts with ``name``, ``sha256`` of the text) that are in ``ds``."""
    inside = {d.get("sha256") for d in ds.documents}
    names = [d["name"] for d in docs if d["sha256"] in inside]
    if names:
        raise ConfigError(f"`{param}` has {len(names)} document(s) that are in the datastore (e.g. {names[0]}); tune "
                          "on text outside it (for stdlib: python -m knnlm.corpora stdlib-tune)", param=param)


def format_report(gate: Gate) -> str:
    """What ``knnlm tune`` prints: the held-out NLL of each choice, the features kept."""
    r = gate.report
    n = r["nll_per_token"]
    bf = n["best_fixed_lambda"]
    own = r.get("self_tuned")
    where = (f" of the datastore itself (a seeded sample, seed {own['seed']}; each document searched without its "
             "own rows)") if own else ""
    lines = [f"tuned on {len(gate.tuned_on)} documents{where}, {r['tokens']:,} tokens ({r['validation_tokens']:,} "
             f"held out for the choices below), k {gate.k}, T {gate.temperature:g}",
             "held-out NLL per token (lower is better):",
             f"  base LM                {n['base_lm']:.4f}",
             f"  best fixed lambda {bf['lambda']:<4g} {bf['nll']:.4f}",
             f"  linear gate, all       {n['linear_all']:.4f}",
             f"  MLP gate, all          {n['mlp_all']:.4f}",
             f"  chosen: {r['kind']} on {len(r['features'])} features  {r['validation_nll']:.4f}",
             "  kept: " + ", ".join(r["features"])]
    fb = r.get("fallback")
    if fb:
        lines.append(f"  the gate did not beat the best fixed lambda on the held-out documents "
                     f"({fb['validation_nll_gate']:.4f} >= {fb['validation_nll_fixed']:.4f}): this datastore keeps "
                     f"lambda {fb['fixed_lambda']:g}")
    dropped = [f for f in FEATURES if f not in r["features"]]
    if dropped:
        lines.append(f"  dropped (each cost <= {KEEP_EPS:g} nats/token): {', '.join(dropped)}")
    un = r.get("unseen")
    if un:
        bound = "keep-unseen mixture" if r.get("keep_unseen") else \
            "no bound" if un["max_loss"] is None else f"bound +{100 * un['max_loss']:g} %"
        lines.append(f"never-seen targets ({un['tokens']:,} tuning tokens): perplexity x{un['ppl_ratio_tuning']:.3f} "
                     f"the LM's under the gate, in-sample ({bound})")
    rg = r.get("retrieval_gate")
    if rg:
        kept = rg["fraction_kept_by_top_predicted"]
        lines.append("retrieval gate: share of the tuning text's total gain kept when searching the top F by "
                     "predicted gain: " + ", ".join(f"F {f}: {v['gain_kept']} (oracle {v['oracle']})"
                                                    for f, v in kept.items()))
        if "min_fraction" in rg:
            fx = rg["held_out_nll_fixed_full_search"]
            lines.append(f"retrieval gate floor: searching F >= {rg['min_fraction']:g} of the tokens loses nothing to "
                         f"fixed lambda {fx['lambda']:g} with every token searched on the held-out documents "
                         f"({rg['held_out_nll_by_fraction'][str(rg['min_fraction'])]:.4f} <= {fx['nll']:.4f}); "
                         "--retrieve-fraction below it searches that much")
    return "\n".join(lines)


def load_gate(ds: Datastore, path: str | Path | None = None) -> Gate:
    """The gate saved with ``ds`` (``path`` None: the header's ``gate`` entry, hash-checked) or the
    gate file at ``path`` (``knnlm.datastore.read_gate``); refused when it was tuned on another
    datastore."""
    if path is None and not ds.header.gate:
        raise ConfigError(f"`lam` 'adaptive' (and `retrieve_fraction`) need a gate, and datastore {ds.path} has "
                          f"none; tune one with `knnlm tune --datastore {ds.path} --data TUNE_TEXT`", param="lam")
    d, where = read_gate(ds, path)
    gate = Gate.from_json(d, where)
    gate.check_datastore(ds)
    return gate


def save_gate(gate: Gate, ds: Datastore, out: str | Path | None = None) -> Path:
    """Save ``gate`` with ``ds`` (``out`` None: into the datastore, with a header entry) or to the
    file ``out`` (``knnlm.datastore.write_gate``)."""
    gate.check_datastore(ds)
    path = write_gate(ds, gate.to_json(), out)
    gate.path = str(path)
    return path


# ---------------------------------------------------------------------------------- fitting


@dataclass
class TuneData:
    """Per tuning token: LM features (N, NL + 1) (``lm_features``), kNN features (N, 6) at the gate's
    k / T, has-neighbour (N,), log p_lm(y) and log p_knn(y) at that T / k (N,), document (N,),
    and whether the datastore holds the target token at all (N,)."""
    lm: torch.Tensor
    knn: torch.Tensor
    has: torch.Tensor
    lp_lm: torch.Tensor
    lp_knn: torch.Tensor
    doc: torch.Tensor
    documents: list[dict]  # {"name", "sha256", "tokens"}
    seen: torch.Tensor | None = None  # (N,) bool: the target occurs in the datastore (None: unknown)
    self_tuned: dict | None = None  # the datastore's own documents (collect_self_tuning): sample size, seed

    @property
    def x(self) -> torch.Tensor:
        return torch.cat([self.lm[:, :NL], self.knn], dim=-1).double()  # (N, len(FEATURES))


def _standardise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(0), x.std(0).clamp(min=1e-6)


def _fit_lambda(x, lp_lm, lp_knn, names, chosen, kind, hidden, seed, l2, iters, unseen=None, bound=None,
                lam0: float = 0.5):
    idx = [names.index(f) for f in chosen]
    xs = x[:, idx]
    mean, std = _standardise(xs)
    gen = torch.Generator().manual_seed(seed)
    net = _train(_new_net(kind, len(idx), hidden, gen, _logit(lam0)), _mixture_nll(lp_lm, lp_knn, unseen, bound),
                 (xs - mean) / std, l2=l2, iters=iters)
    return net, mean, std


def _logit(lam: float) -> float:
    return math.log(lam / (1.0 - lam))


def _eval_nll(net, mean, std, x, lp_lm, lp_knn, names, chosen) -> float:
    idx = [names.index(f) for f in chosen]
    with torch.no_grad():
        return float(_mixture_nll(lp_lm, lp_knn)(_forward(net, (x[:, idx] - mean) / std)))


SELECT_ROWS = 20_000  # tuning rows the model-kind / feature choices are fitted on (a seeded sample)


def fit_gate(data: TuneData, identity: str, k: int, temperature: float, *, kind: str = "auto", hidden: int = 16,
             seed: int = 0, l2: float = 1e-4, iters: int = 100, select: bool = True,
             max_unseen_loss: float | None = None, keep_unseen: bool = False) -> Gate:
    """Fit the λ gate and the retrieval gate on ``data`` (deterministic for a ``seed``).

    Held-out documents (every fifth tuning document, or the last one when there are fewer than
    five; with a single document the choices are made in-sample) choose the model kind (``auto``:
    linear vs MLP, fitted on a seeded sample of at most ``SELECT_ROWS`` of the other documents'
    tokens) and the features: each feature's drop-one cost is measured, then features are
    dropped in order of that cost while each drop costs at most ``KEEP_EPS`` nats/token. The
    final gate is refitted on all tokens. Everything measured goes into ``gate.report``.

    ``max_unseen_loss`` (a fraction, e.g. 0.05): bound the tuning tokens whose target the
    datastore never saw (``data.seen`` False) to that much perplexity above the LM's on average,
    i.e. mean -log(1 - λ) <= log(1 + max_unseen_loss) (a squared-hinge penalty in every fit).

    ``keep_unseen``: fit for the keep-unseen mixture (``knnlm.scoring``), where never-seen targets
    score log p_lm whatever λ; the gate records it and runs that use it follow it."""
    check_unseen_options(max_unseen_loss, keep_unseen)
    if (max_unseen_loss is not None or keep_unseen) and data.seen is None:
        raise ValueError("fit_gate: max_unseen_loss / keep_unseen need TuneData.seen (collect_tuning fills it)")
    if keep_unseen:  # the same fit, with the keep-unseen mixture's kNN side
        data = replace(data, lp_knn=keep_unseen_knn(data.lp_lm, data.lp_knn, data.lm[:, UNSEEN_COL], ~data.seen))
    with one_thread():
        gate = _fit_gate(data, identity, k, temperature, kind, hidden, seed, l2, iters, select, max_unseen_loss)
    if keep_unseen:
        gate.keep_unseen = True
        gate.report["unseen"]["ppl_ratio_tuning"] = 1.0  # exactly the LM's, by construction
        gate.report["keep_unseen"] = True
    return gate


def _fit_gate(data, identity, k, temperature, kind, hidden, seed, l2, iters, select, max_unseen_loss) -> Gate:
    rows = data.has  # tokens without a single neighbour carry no information about λ
    x, lp_lm, lp_knn, doc = data.x[rows], data.lp_lm[rows].double(), data.lp_knn[rows].double(), data.doc[rows]
    unseen = None if max_unseen_loss is None else ~data.seen[rows]
    bound = None if max_unseen_loss is None else math.log1p(max_unseen_loss)
    names = list(FEATURES)
    n_docs = len(data.documents)
    held_docs = [i for i in range(n_docs) if i % 5 == 4] or ([n_docs - 1] if n_docs >= 2 else [])
    held = torch.isin(doc, torch.tensor(held_docs, dtype=doc.dtype))
    if bool(held.any()) and bool((~held).any()):
        fit_rows, val_rows = ~held, held
    else:  # a single tuning document: choices are made in-sample
        fit_rows = val_rows = torch.ones(x.shape[0], dtype=torch.bool)
    fit_idx = fit_rows.nonzero().squeeze(1)
    if fit_idx.numel() > SELECT_ROWS:
        gen = torch.Generator().manual_seed(seed)
        fit_idx = fit_idx[torch.randperm(fit_idx.numel(), generator=gen)[:SELECT_ROWS]]
    xf, xv = x[fit_idx], x[val_rows]
    args = (lp_lm[fit_idx], lp_knn[fit_idx])
    vargs = (lp_lm[val_rows], lp_knn[val_rows])
    fit_unseen = None if unseen is None else unseen[fit_idx]
    prior = _best_fixed(*args)[0]  # the fits start at (and are regularised toward) the best constant λ

    def fit(chosen, kind_):
        return _fit_lambda(xf, *args, names, chosen, kind_, hidden, seed, l2, iters, fit_unseen, bound, prior)

    def val(chosen, kind_):
        return _eval_nll(*fit(chosen, kind_), xv, *vargs, names, chosen)

    report: dict = {"self_tuned": data.self_tuned, "tokens": int(data.lp_lm.shape[0]),
                    "tokens_with_neighbours": int(rows.sum()),
                    "selection_fit_tokens": int(fit_idx.numel()), "validation_tokens": int(val_rows.sum()),
                    "validation_documents": [data.documents[i]["name"] for i in held_docs] if bool(held.any()) else
                    "in-sample", "nll_per_token": {}}
    nll = report["nll_per_token"]
    nll["base_lm"] = float(-vargs[0].mean())
    best_fixed = _best_fixed(*vargs)
    nll["best_fixed_lambda"] = {"lambda": best_fixed[0], "nll": best_fixed[1]}
    nll["linear_all"] = val(names, "linear")
    nll["mlp_all"] = val(names, "mlp")
    if kind == "auto":
        kind = "mlp" if nll["mlp_all"] < nll["linear_all"] - KEEP_EPS else "linear"
    chosen, current = list(names), nll[f"{kind}_all"]
    if select:
        drop_one = {f: val([c for c in chosen if c != f], kind) - current for f in chosen}
        report["drop_one_cost"] = {f: round(v, 5) for f, v in drop_one.items()}
        for f in sorted(drop_one, key=drop_one.get):
            if len(chosen) == 1 or drop_one[f] > KEEP_EPS:
                break
            v = val([c for c in chosen if c != f], kind)
            if v - current > KEEP_EPS:
                break
            chosen.remove(f)
            current = v
    report.update(kind=kind, features=chosen, validation_nll=current)
    net, mean, std = _fit_lambda(x, lp_lm, lp_knn, names, chosen, kind, hidden, seed, l2, iters, unseen, bound,
                                 _best_fixed(lp_lm, lp_knn)[0])
    fallback = bound is None and bool(held.any()) and current >= best_fixed[1]
    if fallback:
        # never worse than a fixed λ: on the held-out tuning documents the gate did not beat the best
        # fixed λ, so the datastore keeps that λ (a constant gate: zero weights, bias logit(λ))
        net = _constant_net(len(chosen), best_fixed[0])
        report["fallback"] = {"fixed_lambda": best_fixed[0], "validation_nll_gate": current,
                              "validation_nll_fixed": best_fixed[1]}
        report["kind"] = "fixed"
    if data.seen is not None:
        with torch.no_grad():  # in-sample: the perplexity ratio of never-seen targets vs the LM alone
            s = _forward(net, (x[:, [names.index(f) for f in chosen]] - mean) / std)
            harm = -torch.nn.functional.logsigmoid(-s[~data.seen[rows]]).sum() / max(int((~data.seen).sum()), 1)
        report["unseen"] = {"tokens": int((~data.seen).sum()), "max_loss": max_unseen_loss,
                            "ppl_ratio_tuning": round(math.exp(float(harm)), 4)}
    gate = Gate(identity=identity, k=k, temperature=temperature, features=chosen, mean=mean, std=std, net=net,
                tuned_on=data.documents, report=report)
    _fit_retrieval(gate, data, hidden, seed, l2, iters)
    # the λ gate of the held-out checks: fitted without the held-out documents (a constant one as it is)
    held_net = (net, mean, std) if fallback else fit(chosen, kind)
    _retrieval_floor(gate, data, held_docs, held_net, best_fixed[0], hidden, seed, l2, iters)
    return gate


LAMBDA_GRID = tuple(round(float(x), 2) for x in np.linspace(0.05, 0.95, 19))  # the fixed λs a gate is held against
FRACTION_GRID = tuple(round(float(x), 2) for x in np.linspace(0.05, 1.0, 20))  # the retrieval floor's candidates


def _best_fixed(lp_lm: torch.Tensor, lp_knn: torch.Tensor) -> tuple[float, float]:
    """(λ, NLL per token) of the best fixed λ of ``LAMBDA_GRID`` on these tokens."""
    return min(((lam, float(-mix(lp_lm, lp_knn, lam).mean())) for lam in LAMBDA_GRID), key=lambda t: t[1])


def _constant_net(n_features: int, lam: float) -> dict:
    """A λ gate that is the fixed ``lam`` whatever its input."""
    return _new_net("linear", n_features, 0, torch.Generator(), _logit(lam))


def _token_lambda(net: dict, mean, std, features: Sequence[str], data: TuneData) -> torch.Tensor:
    """λ(x) (N,) of every tuning token under a λ gate (0 where a token has no neighbour)."""
    with torch.no_grad():
        s = _forward(net, Gate._z(data.x, FEATURES, features, mean, std))
    return torch.where(data.has, torch.sigmoid(s), torch.zeros_like(s)).float()


def _gain(lp_lm: torch.Tensor, lp_knn: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """log p_mix(y) - log p_lm(y) (N,) float64 under per-token ``lam`` (0 without neighbours)."""
    return (mix(lp_lm, lp_knn, lam) - lp_lm).double()


def _quantiles(score: torch.Tensor) -> list[float]:
    """``QUANTILES`` evenly spaced quantiles of predicted gains (N,): what a gate stores of them."""
    return np.quantile(score.numpy(), np.linspace(0, 1, QUANTILES)).tolist()


def _threshold(quantiles: Sequence[float], fraction: float) -> float:
    """The predicted gain that a fraction ``fraction`` of the tokens behind ``quantiles`` reach."""
    return float(np.interp(1.0 - fraction, np.linspace(0.0, 1.0, len(quantiles)), quantiles))


def _retrieval_floor(gate: Gate, data: TuneData, held_docs: list[int], held_net: tuple, fixed: float,
                     hidden: int, seed: int, l2: float, iters: int) -> None:
    """The smallest searched fraction F (``FRACTION_GRID``) at which the retrieval gate loses nothing
    to the best fixed λ ``fixed`` with every token searched, measured on the held-out tuning
    documents with a λ gate and a retrieval gate fitted without them (in-sample when there are no
    held-out documents): ``gate.min_fraction``. A run asking for less searches that much."""
    held = torch.isin(data.doc, torch.tensor(held_docs, dtype=data.doc.dtype))
    if not bool(held.any()) or not bool((~held).any()):
        held = fit = torch.ones_like(data.has)
    else:
        fit = ~held
    net, mean, std = held_net
    gain = _gain(data.lp_lm, data.lp_knn, _token_lambda(net, mean, std, gate.features, data))  # (N,)
    pre, pmean, pstd = _retrieval_net(data.lm[fit], gain[fit], hidden, seed, l2, iters)
    with torch.no_grad():
        score_fit = _forward(pre, (data.lm[fit, :NL].double() - pmean) / pstd)
        score = _forward(pre, (data.lm[held, :NL].double() - pmean) / pstd)  # (H,)
    levels = _quantiles(score_fit)
    g = gain[held]
    lam_fixed = torch.where(data.has[held], torch.tensor(fixed), torch.tensor(0.0))
    fixed_gain = float(_gain(data.lp_lm[held], data.lp_knn[held], lam_fixed).mean())
    curve = {}
    for f in FRACTION_GRID:
        thr = _threshold(levels, f)
        curve[f] = float(torch.where(score >= thr, g, torch.zeros_like(g)).mean())  # mean gain over the LM
    floor = next((f for f in FRACTION_GRID if curve[f] >= fixed_gain), 1.0)
    base = float(-data.lp_lm[held].double().mean())
    gate.min_fraction = floor
    gate.report["retrieval_gate"].update(
        min_fraction=floor, held_out_tokens=int(held.sum()),
        held_out_nll_fixed_full_search={"lambda": fixed, "nll": base - fixed_gain},
        held_out_nll_by_fraction={str(f): base - v for f, v in curve.items()})


def _retrieval_net(lm: torch.Tensor, gain: torch.Tensor, hidden: int, seed: int, l2: float,
                   iters: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The retrieval gate's regression: LM features (N, NL + 1) -> predicted gain (N,) float64;
    returns (net, mean, std) of the standardisation."""
    xs = lm[:, :NL].double()
    mean, std = _standardise(xs)

    def mse(pred):
        return ((pred - gain) ** 2).mean()

    net = _train(_new_net("mlp", NL, hidden, torch.Generator().manual_seed(seed)), mse, (xs - mean) / std, l2=l2,
                 iters=iters)
    return net, mean, std


def _fit_retrieval(gate: Gate, data: TuneData, hidden: int, seed: int, l2: float, iters: int) -> None:
    """The retrieval gate: predicted gain of searching from the LM features (all tuning tokens,
    those without neighbours included: their gain is 0)."""
    gain = _gain(data.lp_lm, data.lp_knn, _token_lambda(gate.net, gate.mean, gate.std, gate.features, data))  # (N,)
    net, mean, std = _retrieval_net(data.lm, gain, hidden, seed, l2, iters)
    xs = data.lm[:, :NL].double()
    with torch.no_grad():
        score = _forward(net, (xs - mean) / std)
    gate.pre_net, gate.pre_mean, gate.pre_std = net, mean, std
    gate.pre_quantiles = _quantiles(score)
    # how much of the total gain the top-F tokens by predicted gain keep (in-sample, and the oracle)
    total = float(gain.sum())
    kept = {}
    for f in (0.25, 0.5, 0.75):
        n = int(round(f * len(gain)))
        by_pred = float(gain[torch.argsort(score, descending=True)[:n]].sum())
        oracle = float(gain.sort(descending=True).values[:n].sum())
        kept[str(f)] = {"gain_kept": round(by_pred / total, 4) if total else None,
                        "oracle": round(oracle / total, 4) if total else None}
    gate.report["retrieval_gate"] = {"total_gain_nats": total, "mean_gain_per_token": total / max(len(gain), 1),
                                     "fraction_kept_by_top_predicted": kept}
