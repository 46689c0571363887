"""``KNNLM``: the core object, a Hugging Face causal LM + a datastore + its retriever + settings.

    from knnlm import KNNLM, load_model, open_datastore
    model, tok = load_model("smollm2")
    knn = KNNLM(model, open_datastore("runs/stdlib"), tok, lam=0.25)
    res = knn.evaluate(texts=["def main():\\n    ..."])           # perplexity with / without retrieval
    out = knn.generate(**tok("import os\\n", return_tensors="pt"), max_new_tokens=32)
    logp = knn.log_probs(logits, hidden)                           # (B, V) from (B, V) and (B, D)

The object checks once that the datastore was built by this model and tokenizer (the model
identity is hashed here and nowhere else per call), owns the one ``Retriever``, and turns
(logits, query hidden states) into kNN-LM log-probabilities with ``knnlm.scoring``, the one place
the formula lives. Its ``evaluate`` and ``generate`` come from the mixins of
``knnlm.evaluation`` and ``knnlm.generate`` (the ways to use it, below it); the functional
``knnlm.evaluate(model, tokenizer, datastore, ...)`` here goes through a ``KNNLM``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from knnlm.config import (
    ADAPTIVE,
    DEFAULT_MAX_UNSEEN_LOSS,
    DEFAULT_MIN_POINTERS,
    EvalConfig,
    check_fraction,
    check_mixture,
    check_pointers,
    check_unseen_options,
    parse_lambda,
    resolve_keep_unseen,
)
from knnlm.datastore import Datastore, model_identity
from knnlm.evaluation import EvaluationMixin, collect_tuning, run
from knnlm.gate import Gate, fit_gate, lm_features, load_gate, save_gate
from knnlm.generate import GenerationMixin
from knnlm.retrieval import Retriever, resolve_k
from knnlm.scoring import interpolate

logger = logging.getLogger(__name__)

__all__ = ["KNNLM", "evaluate", "tune"]


class KNNLM(EvaluationMixin, GenerationMixin):
    """A model + datastore with fixed kNN-LM settings (lambda, temperature, k, nprobe, rerank).

    ``evaluate`` (perplexity, sweeps) comes from ``knnlm.evaluation.EvaluationMixin`` and
    ``generate`` (``model.generate`` with the mixture) from ``knnlm.generate.GenerationMixin``."""

    def __init__(self, model, datastore: Datastore, tokenizer, *, lam: float | str = 0.25, temperature: float = 1.0,
                 k: int | None = None, nprobe: int | None = None, rerank: bool = False, use_kernel: bool = True,
                 gate: Gate | str | None = None, retrieve_fraction: float | None = None, pointers: bool = False,
                 min_pointers: int | None = None, keep_unseen: bool | None = None):
        """``lam``: a number in [0, 1] or ``"adaptive"`` (λ(x) per token from the datastore's tuned
        gate, ``knnlm tune``); ``gate``: a ``Gate`` or a gate file instead of the datastore's;
        ``retrieve_fraction``: search only that fraction of tokens (the gate's retrieval part,
        the others score the LM alone); ``pointers``: follow the previous step's matching
        neighbours instead of searching while at least ``min_pointers`` survive (evaluate and
        generate); ``keep_unseen``: the keep-unseen mixture (``knnlm.scoring``: tokens the
        datastore never saw keep the LM's probability), None = the gate's when one is used."""
        lam = parse_lambda(lam)
        check_fraction(retrieve_fraction)
        check_pointers(pointers, min_pointers)
        datastore.check_compatible(model_identity(model, tokenizer, datastore.header.key.layer))
        if gate is not None and not isinstance(gate, Gate):
            gate = load_gate(datastore, gate)
        self._setup(model, datastore, tokenizer, lam, temperature, k, nprobe, rerank, use_kernel, gate,
                    retrieve_fraction, pointers, min_pointers, keep_unseen)

    def _setup(self, model, datastore, tokenizer, lam, temperature, k, nprobe, rerank, use_kernel, gate=None,
               retrieve_fraction=None, pointers=False, min_pointers=None, keep_unseen=None) -> None:
        lam = parse_lambda(lam)
        check_mixture(0.0 if lam == ADAPTIVE else lam, temperature)
        self.model, self.datastore, self.tokenizer = model, datastore, tokenizer
        self.lam, self.temperature, self.use_kernel = lam, float(temperature), use_kernel
        self.key_layer = datastore.header.key.layer
        self.retriever = Retriever(datastore, k, nprobe=nprobe, rerank=rerank)
        check_pointers(pointers, min_pointers, self.retriever.k)
        if pointers:  # a pointer's distance is recomputed from its stored key
            datastore.require_keys("pointers", "drop `pointers`")
        self.retrieve_fraction = None if retrieve_fraction is None else float(retrieve_fraction)
        self.pointers = bool(pointers)
        self.min_pointers = min_pointers or min(DEFAULT_MIN_POINTERS, self.retriever.k)
        self.gate = gate
        self.keep_unseen = None if keep_unseen is None else bool(keep_unseen)
        if self.uses_gate:
            resolve_keep_unseen(self.keep_unseen, self.require_gate())  # fail now, not at the first token

    @property
    def uses_gate(self) -> bool:
        """An adaptive λ or a retrieval fraction below 1: the tuned gate is needed."""
        return self.lam == ADAPTIVE or (self.retrieve_fraction is not None and self.retrieve_fraction < 1)

    @property
    def keeps_unseen(self) -> bool:
        """Whether this object mixes with the keep-unseen formula (``resolve_keep_unseen``)."""
        return resolve_keep_unseen(self.keep_unseen, self.require_gate() if self.uses_gate else None)

    def require_gate(self) -> Gate:
        """The gate (loaded from the datastore on first use); a one-line error when there is none."""
        if self.gate is None:
            self.gate = load_gate(self.datastore)
        return self.gate

    def replace(self, **changes) -> KNNLM:
        """The same model and datastore with some settings changed (``lam``, ``temperature``,
        ``k``, ``nprobe``, ``rerank``, ``use_kernel``, ``gate``, ``retrieve_fraction``,
        ``pointers``, ``min_pointers``, ``keep_unseen``); the model is not checked again."""
        settings = dict(lam=self.lam, temperature=self.temperature, k=self.k, nprobe=self.nprobe,
                        rerank=self.rerank, use_kernel=self.use_kernel, gate=self.gate,
                        retrieve_fraction=self.retrieve_fraction, pointers=self.pointers,
                        min_pointers=self.min_pointers, keep_unseen=self.keep_unseen)
        unknown = set(changes) - set(settings)
        if unknown:
            raise TypeError(f"KNNLM.replace() got unknown settings: {', '.join(sorted(unknown))}")
        settings.update(changes)
        if settings["gate"] is not None and not isinstance(settings["gate"], Gate):
            settings["gate"] = load_gate(self.datastore, settings["gate"])
        new = object.__new__(KNNLM)
        new._setup(self.model, self.datastore, self.tokenizer, **settings)
        return new

    @property
    def k(self) -> int:
        return self.retriever.k

    @property
    def nprobe(self) -> int | None:
        return self.retriever.nprobe

    @property
    def rerank(self) -> bool:
        return self.retriever.rerank

    @property
    def bos(self) -> int | None:
        """The token in front of every mid-document window (the datastore's protocol), or None."""
        return self.datastore.header.window.bos

    # ---- the three steps of a kNN-LM prediction -----------------------------------------------
    def search(self, hidden: torch.Tensor, *, k: int | None = None,
               exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query hidden states (Q, D) -> squared distances (Q, k) fp32, values (Q, k) int64, rows
        (Q, k) int64 on the queries' device; missing neighbours have distance +inf and row -1.
        ``exclude`` (Q,): one datastore row per query that must not be returned (-1: none)."""
        return self.retriever.search(hidden, k, exclude=exclude)

    def _token_counts(self) -> torch.Tensor:
        if getattr(self, "_counts", None) is None:
            self._counts = torch.from_numpy(self.datastore.token_counts())
        return self._counts

    def _unseen_mask(self, device: torch.device) -> torch.Tensor:
        """(V,) bool: the tokens the datastore never saw, on ``device`` (kept: generation asks every step)."""
        mask = getattr(self, "_unseen", None)
        if mask is None or mask.device != device:
            self._unseen = mask = (self._token_counts() == 0).to(device)
        return mask

    def lm_features(self, logits: torch.Tensor) -> torch.Tensor:
        """The gate's LM features (B, NL + 1) of logits (B, V) (``knnlm.gate.lm_features``)."""
        return lm_features(logits, self._token_counts())[0]

    def mix(self, logits: torch.Tensor, dists: torch.Tensor, values: torch.Tensor,
            lam: float | torch.Tensor | None = None) -> torch.Tensor:
        """kNN-LM log-distribution (B, V) fp32 from logits (B, V) and neighbours (B, k); ``lam``
        overrides this object's λ (a float or one per row (B,)); with ``lam="adaptive"`` the gate
        computes λ(x) from the logits and neighbours."""
        dev = logits.device
        lam = self.lam if lam is None else lam
        if isinstance(lam, str):  # ADAPTIVE
            lam = self.require_gate().lam(self.lm_features(logits), dists.to(dev), values.to(dev))
        unseen = self._unseen_mask(dev) if self.keeps_unseen else None  # (V,)
        return interpolate(logits.contiguous(), dists.to(dev), values.to(dev), lam, self.temperature,
                           use_kernel=self.use_kernel, unseen=unseen)

    def log_probs(self, logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """kNN-LM log-distribution: logits (B, V), query hidden states (B, D) -> (B, V) fp32.
        With ``retrieve_fraction`` only the rows the retrieval gate selects search; the others are
        exactly ``log_softmax(logits)``. (Pointers need the token sequence: evaluate / generate.)"""
        if self.retrieve_fraction is None or self.retrieve_fraction >= 1:
            dists, values, _ = self.search(hidden)  # (B, k), (B, k)
            return self.mix(logits, dists, values)
        allow = self.require_gate().select(self.lm_features(logits), self.retrieve_fraction)  # (B,)
        out = torch.log_softmax(logits.float(), dim=-1)
        if bool(allow.any()):
            dists, values, _ = self.search(hidden[allow])
            out[allow] = self.mix(logits[allow], dists, values)
        return out

    def tune(self, data: Sequence | None = None, *, texts: Sequence[str] | None = None, out=None,
             max_tokens: int | None = None, seed: int = 0, kind: str = "auto", batch_size: int = 8,
             progress: bool = True, save: bool = True,
             max_unseen_loss: float | None = DEFAULT_MAX_UNSEEN_LOSS, keep_unseen: bool = False) -> Gate:
        """Fit the adaptive gate (``knnlm.gate``) on tuning text at this object's k and temperature,
        save it with the datastore (or to the file ``out``) and use it from now on. The tuning
        documents must not be in the datastore (refused). ``max_unseen_loss``, ``keep_unseen``:
        see ``fit_gate`` (None: no bound)."""
        check_unseen_options(max_unseen_loss, keep_unseen)
        cfg = EvalConfig(max_tokens=max_tokens, batch_size=batch_size, progress=progress)
        data_ = collect_tuning(self, data, cfg, texts=texts)
        gate = fit_gate(data_, self.datastore.identity(), self.k, self.temperature, kind=kind, seed=seed,
                        max_unseen_loss=max_unseen_loss, keep_unseen=keep_unseen)
        if save:
            save_gate(gate, self.datastore, out)
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


def evaluate(model, tokenizer, datastore: Datastore | None, data: Sequence | None = None,
             cfg: EvalConfig | None = None, *, texts: Sequence[str] | None = None) -> dict:
    """Perplexity of ``model`` with and without ``datastore`` on ``data`` (paths or ``Source``s)
    or on ``texts`` (strings), every setting of ``cfg`` (a sweep) scored from one retrieval.

    With ``datastore=None`` only the base LM is scored (the plain-LM baseline). Returns a
    JSON-ready dict; ``knnlm.format_results`` renders it as a table.
    """
    cfg = cfg or EvalConfig()
    knn = None
    if datastore is not None:
        kmax = max(resolve_k(k, len(datastore), param="ks") for k in cfg.ks)
        knn = KNNLM(model, datastore, tokenizer, lam=cfg.lambdas[0], temperature=cfg.temperatures[0], k=kmax,
                    nprobe=cfg.nprobe, rerank=cfg.rerank, retrieve_fraction=cfg.retrieve_fraction,
                    pointers=cfg.pointers, min_pointers=cfg.min_pointers)
    return run(model, tokenizer, knn, data, cfg, texts=texts)


def tune(model, tokenizer, datastore: Datastore, data: Sequence | None = None, *,
         texts: Sequence[str] | None = None, **kwargs) -> Gate:
    """Fit and save the adaptive gate of ``datastore`` on tuning text (``KNNLM.tune``)."""
    return KNNLM(model, datastore, tokenizer, lam=0.25).tune(data, texts=texts, **kwargs)
