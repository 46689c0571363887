"""``KNNLM``: the core object, a Hugging Face causal LM + a datastore + its retriever + settings.

    from knnlm import KNNLM, load_model, open_datastore
    model, tok = load_model("smollm2")
    knn = KNNLM(model, open_datastore("runs/stdlib"), tok, lam=0.25)  # or KNNLM(..., settings=KNNSettings(...))
    res = knn.evaluate(texts=["def main():\\n    ..."])           # perplexity with / without retrieval
    out = knn.generate(**tok("import os\\n", return_tensors="pt"), max_new_tokens=32)
    logp = knn.log_probs(logits, hidden)                           # (B, V) from (B, V) and (B, D)

The object checks once that the datastore was built by this model and tokenizer (the model
identity is hashed here and nowhere else per call), owns the one ``Retriever`` and the settings
(``knnlm.config.KNNSettings``, validated once), and makes the kNN-LM's decisions in one place each:

* ``lookup`` -> ``knnlm.retrieval.Lookup``: which rows search, follow pointers, or get no
  neighbours (the retrieval gate);
* ``mix_rows`` (whole distributions: ``log_probs``, generation, the harness) and ``mix_targets``
  (target log-probabilities over a sweep grid: evaluation) turn a ``Step`` into log-probabilities
  with ``knnlm.scoring``, the one place the formula lives. A row with no neighbour is the LM
  exactly; λ is the settings' number or, with ``"adaptive"``, the gate's λ(x) per row.

``evaluate`` / ``generate`` / ``tune`` are methods over the plain functions of
``knnlm.evaluation`` and ``knnlm.generate`` (the ways to use a ``KNNLM``, below it).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import torch

from knnlm.config import (
    ADAPTIVE,
    DEFAULT_MAX_UNSEEN_LOSS,
    SETTINGS_FIELDS,
    EvalConfig,
    KNNSettings,
    check_pointers,
    check_unseen_options,
    resolve_keep_unseen,
)
from knnlm.datastore import Datastore, model_identity
from knnlm.distributed import SINGLE, World, on_main
from knnlm.evaluation import collect_self_tuning, collect_tuning, run
from knnlm.gate import UNSEEN_COL, Gate, fit_gate, lm_features, load_gate, save_gate
from knnlm.retrieval import Lookup, Retriever, Step
from knnlm.scoring import interpolate, knn_target_log_probs, mix

logger = logging.getLogger(__name__)

__all__ = ["KNNLM", "evaluate", "tune"]

EVAL_FIELDS = tuple(f.name for f in dataclasses.fields(EvalConfig))


class KNNLM:
    """A model + datastore with fixed kNN-LM settings (``KNNSettings``: lambda, temperature, k,
    nprobe, rerank, retrieval fraction, pointers, keep-unseen)."""

    def __init__(self, model, datastore: Datastore, tokenizer, settings: KNNSettings | None = None, *,
                 gate: Gate | str | None = None, **overrides):
        """``settings`` (default ``KNNSettings()``) with keyword ``overrides`` of its fields (e.g.
        ``lam=0.5``; see ``knnlm.config.KNNSettings``); ``gate``: a ``Gate`` or a gate file
        instead of the datastore's (loaded on first use when the settings need one)."""
        datastore.check_compatible(model_identity(model, tokenizer, datastore.header.key.layer))
        self.model, self.datastore, self.tokenizer = model, datastore, tokenizer
        self._init(_settings(settings, overrides), gate)

    def _init(self, settings: KNNSettings, gate) -> None:
        """Everything that depends on the settings (``__init__`` and ``replace``)."""
        ds = self.datastore
        self.settings = settings
        self.key_layer = ds.header.key.layer
        self.retriever = Retriever(ds, settings.k, nprobe=settings.nprobe, rerank=settings.rerank)
        if settings.pointers:  # a pointer's distance is recomputed from its stored key
            ds.require_keys("pointers", "drop `pointers`")
            check_pointers(settings.pointers, settings.min_pointers, self.retriever.k)  # k is known now
        self.gate = gate if gate is None or isinstance(gate, Gate) else load_gate(ds, gate)
        if settings.needs_gate:
            resolve_keep_unseen(settings.keep_unseen, self.require_gate())  # fail now, not at the first token

    def replace(self, *, gate: Gate | str | None = None, **changes) -> KNNLM:
        """The same model and datastore with some settings changed (``KNNSettings`` fields, and
        ``gate``); the model is not checked again."""
        new = object.__new__(KNNLM)
        new.model, new.datastore, new.tokenizer = self.model, self.datastore, self.tokenizer
        new._counts = getattr(self, "_counts", None)
        new._init(_settings(self.settings, changes), self.gate if gate is None else gate)
        return new

    # ---- settings, read-only ------------------------------------------------------------------
    lam = property(lambda self: self.settings.lam)
    temperature = property(lambda self: self.settings.temperature)
    retrieve_fraction = property(lambda self: self.settings.retrieve_fraction)
    pointers = property(lambda self: self.settings.pointers)
    keep_unseen = property(lambda self: self.settings.keep_unseen)
    use_kernel = property(lambda self: self.settings.use_kernel)
    k = property(lambda self: self.retriever.k, doc="neighbours per query (the settings' k resolved)")
    nprobe = property(lambda self: self.retriever.nprobe)
    rerank = property(lambda self: self.retriever.rerank)

    @property
    def min_pointers(self) -> int:
        return self.settings.pointer_floor(self.k)

    @property
    def keeps_unseen(self) -> bool:
        """Whether this object mixes with the keep-unseen formula (``resolve_keep_unseen``)."""
        return self.keeps_unseen_for()

    def keeps_unseen_for(self, lambdas: Sequence | None = None) -> bool:
        """Whether scoring ``lambdas`` (default this object's λ) uses the keep-unseen mixture: the
        setting, else the gate's when the run uses one (an adaptive λ or a retrieval fraction)."""
        lams = [self.lam] if lambdas is None else list(lambdas)
        uses_gate = self.settings.gated or ADAPTIVE in lams
        return resolve_keep_unseen(self.keep_unseen, self.require_gate() if uses_gate else None)

    def require_gate(self) -> Gate:
        """The gate (loaded from the datastore on first use); a one-line error when there is none."""
        if self.gate is None:
            self.gate = load_gate(self.datastore)
        return self.gate

    @property
    def bos(self) -> int | None:
        """The token in front of every mid-document window (the datastore's protocol), or None."""
        return self.datastore.header.window.bos

    # ---- retrieval: the one decision ------------------------------------------------------------
    def search(self, hidden: torch.Tensor, *, k: int | None = None, exclude: torch.Tensor | None = None,
               exclude_range: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query hidden states (Q, D) -> squared distances (Q, k) fp32, values (Q, k) int64, rows
        (Q, k) int64 on the queries' device; missing neighbours have distance +inf and row -1.
        ``exclude`` (Q,): one datastore row per query that must not be returned (-1: none);
        ``exclude_range`` (Q, 2): rows ``[lo, hi)`` per query that must not be returned."""
        return self.retriever.search(hidden, k, exclude=exclude, exclude_range=exclude_range)

    def lookup(self, rows: int = 0, *, k: int | None = None, lambdas: Sequence | None = None,
               always: bool = False, device=None) -> Lookup:
        """The per-token retrieval decision (``knnlm.retrieval.Lookup``) for ``rows`` sequences
        followed step by step (pointers), at ``k`` neighbours (default this object's). No row
        searches when every λ to be scored (``lambdas``, default this object's) is a fixed 0,
        unless ``always`` (the neighbours are wanted anyway, e.g. recorded)."""
        lams = [self.lam] if lambdas is None else list(lambdas)
        k = self.k if k is None else k
        s = self.settings
        return Lookup(self.retriever, k, rows=rows, pointers=s.pointers, min_pointers=s.pointer_floor(k),
                      fraction=s.retrieve_fraction, gate=self.require_gate() if s.gated else None,
                      skip=not always and all(x == 0.0 for x in lams), device=device)

    def _token_counts(self) -> torch.Tensor:
        if getattr(self, "_counts", None) is None:
            self._counts = torch.from_numpy(self.datastore.token_counts())
        return self._counts

    def _unseen_mask(self, device: torch.device, dtype: torch.dtype = torch.bool) -> torch.Tensor:
        """(V,) the tokens the datastore never saw (True / 1), on ``device`` (kept per device and
        dtype: generation asks every step)."""
        masks = self.__dict__.setdefault("_unseen", {})
        key = (torch.device(device), dtype)
        if key not in masks:
            masks[key] = (self._token_counts() == 0).to(device=device, dtype=dtype)
        return masks[key]

    def lm_features(self, logits: torch.Tensor) -> torch.Tensor:
        """The gate's LM features (B, NL + 1) of logits (B, V) (``knnlm.gate.lm_features``)."""
        return lm_features(logits, self._token_counts(), unseen=self._unseen_mask(logits.device, torch.float32))[0]

    def needs_lm_features(self) -> bool:
        """Whether scoring rows (``mix_rows``: ``log_probs``, generation) needs the gate's LM
        features: a gate is used (an adaptive λ or a retrieval fraction). The keep-unseen mixture
        of a row needs only the datastore's unseen tokens; ``mix_targets`` takes its features
        from the caller."""
        return self.settings.needs_gate

    # ---- scoring: the one mixture ---------------------------------------------------------------
    def mix_rows(self, logits: torch.Tensor, step: Step, lm_feats: torch.Tensor | None = None) -> torch.Tensor:
        """kNN-LM log-distributions (B, V) fp32 from logits (B, V) and their neighbours ``step``
        (``Lookup.neighbours``); ``lm_feats`` (B, F): the gate's LM features when already known.
        A row without a neighbour is ``log_softmax(logits)`` exactly."""
        has = step.has  # (B,)
        every = bool(has.all())
        if not every and not bool(has.any()):
            return torch.log_softmax(logits.float(), dim=-1)
        sel = slice(None) if every else has
        lg, d, v = logits[sel], step.dists[sel].to(logits.device), step.values[sel].to(logits.device)
        lam = self.lam
        if lam == ADAPTIVE:
            feats = self.lm_features(lg) if lm_feats is None else lm_feats[sel]
            lam = self.require_gate().lam(feats, d, v)  # (H,)
        unseen = self._unseen_mask(logits.device) if self.keeps_unseen else None  # (V,)
        # λ and T were validated once, in the settings (a gate's λ is a sigmoid): no per-call check
        mixed = interpolate(lg.contiguous(), d, v, lam, self.temperature, use_kernel=self.use_kernel, unseen=unseen,
                            check=False)
        if every:
            return mixed
        out = torch.log_softmax(logits.float(), dim=-1)
        out[has] = mixed
        return out

    def mix_targets(self, lp_lm: torch.Tensor, step: Step, target: torch.Tensor, grid,
                    lm_feats: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Target log-probabilities for every (lambda, temperature, k) of ``grid`` from log p_lm of
        the targets (R,) and their neighbours ``step`` (at k >= every k of the grid): (G, R) fp32,
        and the adaptive λ of the rows with neighbours (H,) when the grid has ``"adaptive"``.
        ``lm_feats`` (R, F): the gate's LM features (needed for an adaptive λ and keep-unseen).
        A row without a neighbour scores log p_lm exactly, for every setting."""
        has = step.has  # (R,)
        every = bool(has.all())
        out = lp_lm.float()[None].repeat(len(grid), 1)  # (G, R)
        if not every and not bool(has.any()):
            return out, (torch.zeros(0, dtype=torch.float64) if any(x == ADAPTIVE for x, _, _ in grid) else None)
        sel = slice(None) if every else has
        dists, values, tgt, lm = step.dists[sel], step.values[sel], target[sel], lp_lm[sel]
        lam_ad = None
        lams = [x for x, _, _ in grid]
        if ADAPTIVE in lams:
            lam_ad = self.require_gate().lam(lm_feats[sel], dists, values)  # (H,)
        keep = {}
        if self.keeps_unseen_for(lams):  # the keep-unseen mixture's extra inputs
            keep = {"log_unseen": lm_feats[sel, UNSEEN_COL],
                    "unseen": self._unseen_mask(tgt.device)[tgt]}
        lp_knn = {}
        for gi, (lam, t, k) in enumerate(grid):
            if (k, t) not in lp_knn:
                lp_knn[(k, t)] = knn_target_log_probs(dists[:, :k], values[:, :k], tgt, t)  # (H,)
            out[gi, sel] = mix(lm, lp_knn[(k, t)], lam_ad if lam == ADAPTIVE else lam, **keep)
        return out, lam_ad

    def log_probs(self, logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """kNN-LM log-distribution: logits (B, V), query hidden states (B, D) -> (B, V) fp32.
        With ``retrieve_fraction`` only the rows the retrieval gate selects search; the others are
        exactly ``log_softmax(logits)``. (Pointers need the token sequence: evaluate / generate.)"""
        feats = self.lm_features(logits) if self.needs_lm_features() else None
        step = self.lookup(hidden.shape[0], device=hidden.device).neighbours(hidden, feats)  # no pointers yet
        return self.mix_rows(logits, step, feats)

    # ---- the ways to use it -------------------------------------------------------------------
    def evaluate(self, data: Sequence | None = None, *, texts: Sequence[str] | None = None, lm_cache=None,
                 world: World = SINGLE, **options) -> dict:
        """Perplexity with and without retrieval on ``data`` (paths or ``Source``s) or ``texts``
        (``knnlm.evaluation.run``). ``options``: ``EvalConfig`` fields (e.g. ``lambdas=[0.1,
        0.25, "adaptive"]`` for a sweep scored from one retrieval, ``max_tokens``) and
        ``KNNSettings`` fields for this run (e.g. ``retrieve_fraction=0.5``). The sweep defaults
        to this object's λ, temperature and k. ``lm_cache`` (an ``LMCache``): one forward pass
        serves several calls on the same text. ``world``: under torchrun, every rank scores a share
        of the text and returns the one-process result (``knnlm.evaluation.run``)."""
        changes = {n: options.pop(n) for n in list(options) if n in SETTINGS_FIELDS}
        knn = self.replace(**changes) if changes else self
        unknown = set(options) - set(EVAL_FIELDS)
        if unknown:
            raise TypeError(f"KNNLM.evaluate() got unknown options: {', '.join(sorted(unknown))}")
        axes = dict(lambdas=[knn.lam], temperatures=[knn.temperature], ks=[knn.k])
        cfg = EvalConfig(**{**axes, **options})
        return run(self.model, self.tokenizer, knn, data, cfg, texts=texts, lm_cache=lm_cache, world=world)

    def generate(self, inputs: torch.Tensor | None = None, **kwargs):
        """``model.generate`` with the kNN-LM mixture at every step (``knnlm.generate.generate``):
        same keyword arguments (greedy, sampling, beam search, ``max_new_tokens``,
        ``attention_mask``, ...), same return types. ``processor=KNNLogitsProcessor(knn,
        record=N)`` keeps the neighbours of the first N steps."""
        from knnlm.generate import generate

        return generate(self, inputs, **kwargs)

    def tune(self, data: Sequence | None = None, *, texts: Sequence[str] | None = None, out=None,
             max_tokens: int | None = None, seed: int = 0, kind: str = "auto", batch_size: int = 8,
             progress: bool = True, save: bool = True,
             max_unseen_loss: float | None = DEFAULT_MAX_UNSEEN_LOSS, keep_unseen: bool = False,
             world: World = SINGLE) -> Gate:
        """Fit the adaptive gate (``knnlm.gate``) at this object's k and temperature, save it with
        the datastore (or to the file ``out``) and use it from now on. On tuning text (``data`` or
        ``texts``; documents of the datastore are refused), or, with neither, on the datastore's
        own documents (self-tuning: a ``seed``-ed sample of up to ``max_tokens`` tokens, default
        ``knnlm.evaluation.SELF_TUNE_TOKENS``, each searched without its own document's rows). A
        gate that does not beat the best fixed λ on its held-out tuning documents is that fixed λ
        (``gate.report["fallback"]``). ``max_unseen_loss``, ``keep_unseen``: see ``fit_gate``.
        ``world``: under torchrun every rank scores a share of the tuning text, rank 0 fits and
        saves the gate once on all of it (the same gate as one process), every rank returns it."""
        check_unseen_options(max_unseen_loss, keep_unseen)
        cfg = EvalConfig(max_tokens=max_tokens, batch_size=batch_size, progress=progress)
        if data is None and texts is None:
            data_ = collect_self_tuning(self, cfg, seed=seed, world=world)
        else:
            data_ = collect_tuning(self, data, cfg, texts=texts, world=world)

        def fit() -> Gate:
            gate = fit_gate(data_, self.datastore.identity(), self.k, self.temperature, kind=kind, seed=seed,
                            max_unseen_loss=max_unseen_loss, keep_unseen=keep_unseen)
            if save:
                save_gate(gate, self.datastore, out)
            return gate

        gate = on_main(world, fit, share=True)  # one fit, on rank 0
        self.gate = gate
        return gate

    def neighbours(self, rows, dists=None, *, context: int = 12) -> list[dict]:
        """Where datastore rows come from: one dict per row id >= 0 (missing neighbours, -1, are
        skipped) with ``row``, ``document`` (name), ``position`` (token offset in the document of
        the row's value), ``token`` (value id), ``distance`` when ``dists`` is given, and the
        decoded ``text`` of the value and up to ``context`` tokens ``before`` / ``after`` it."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        d = None if dists is None else np.asarray(dists, dtype=np.float64).reshape(-1)
        ds, dec = self.datastore, self.tokenizer.decode
        docs = ds.document_of(rows.clip(min=0))
        out = []
        for i, r in enumerate(rows.tolist()):
            if r < 0:
                continue
            di = int(docs[i])
            pos = r - ds.documents[di]["first_row"] + 1
            toks = ds.document_tokens(di)
            item = {"row": r, "document": ds.documents[di]["name"], "position": pos, "token": int(toks[pos]),
                    "text": dec([int(toks[pos])]), "before": dec(toks[max(0, pos - context): pos].tolist()),
                    "after": dec(toks[pos + 1: pos + 1 + context].tolist())}
            if d is not None:
                item["distance"] = float(d[i])
            out.append(item)
        return out


def _settings(base: KNNSettings | None, changes: dict) -> KNNSettings:
    """``base`` (default ``KNNSettings()``) with ``changes`` of its fields (validated once, there)."""
    base = KNNSettings() if base is None else base
    unknown = set(changes) - set(SETTINGS_FIELDS)
    if unknown:
        raise TypeError(f"unknown KNNLM settings: {', '.join(sorted(unknown))} (KNNSettings has "
                        f"{', '.join(SETTINGS_FIELDS)})")
    return dataclasses.replace(base, **changes) if changes else base


def evaluate(model, tokenizer, datastore: Datastore | None, data: Sequence | None = None,
             cfg: EvalConfig | None = None, *, texts: Sequence[str] | None = None,
             settings: KNNSettings | None = None, **overrides) -> dict:
    """Perplexity of ``model`` with and without ``datastore`` on ``data`` (paths or ``Source``s)
    or on ``texts`` (strings), every setting of ``cfg`` (a sweep) scored from one retrieval, with
    ``settings`` / ``overrides`` (``KNNSettings`` fields) for how retrieval runs.

    With ``datastore=None`` only the base LM is scored (the plain-LM baseline). Returns a
    JSON-ready dict; ``knnlm.format_results`` renders it as a table.
    """
    cfg = cfg or EvalConfig()
    knn = None if datastore is None else KNNLM(model, datastore, tokenizer, settings, **overrides)
    return run(model, tokenizer, knn, data, cfg, texts=texts)


def tune(model, tokenizer, datastore: Datastore, data: Sequence | None = None, *,
         texts: Sequence[str] | None = None, **kwargs) -> Gate:
    """Fit and save the adaptive gate of ``datastore`` on tuning text (``KNNLM.tune``)."""
    return KNNLM(model, datastore, tokenizer, lam=0.25).tune(data, texts=texts, **kwargs)
