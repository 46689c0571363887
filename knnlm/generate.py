"""Text generation with the kNN-LM mixture at every decoding step, through ``model.generate``.

    from knnlm import KNNLM, load_model, open_datastore
    model, tok = load_model("smollm2")
    knn = KNNLM(model, open_datastore("runs/stdlib"), tok, lam=0.5)
    ids = tok("import os\\n", return_tensors="pt")
    out = knn.generate(**ids, max_new_tokens=32)          # same kwargs / return types as model.generate

Nothing of the decoding loop is rewritten: ``KNNLogitsProcessor`` is an ordinary transformers
``LogitsProcessor``. While generation runs, the forward pre-hook of ``knnlm.capture.capture_keys``
(the one the datastore builder uses) records the key hidden state of every forward pass; at each
step the processor takes the key of the last position of every row (the position being predicted:
with the KV cache a step's forward only sees the new token, on the first step the prompt's last
token, and with left padding the last position is real for every row), searches the datastore
once for those ``batch x beams`` queries and replaces the scores by the kNN-LM log-probabilities
``log(lam * p_knn + (1 - lam) * p_lm)`` from ``knnlm.scoring.interpolate``. Log-probabilities are
valid logits, so greedy search, sampling, beam search and the sampling warpers (temperature,
top-k, top-p, ...), which transformers applies after custom processors, all act on the kNN-LM
distribution.

Processors transformers itself places *before* custom ones (only when configured: repetition
penalty, ``min_new_tokens``, ``bad_words_ids``, ``suppress_tokens``, forced BOS/EOS, ...) see the
LM logits; their bans (``-inf`` scores) are kept in the kNN-LM scores, so a banned token stays
banned even when a neighbour votes for it.

Adaptive settings of the ``KNNLM`` apply per step: ``lam="adaptive"`` takes λ(x) per row from the
gate, ``retrieve_fraction`` lets the gate's retrieval part skip the search for some rows (they get
the LM's distribution exactly), and ``pointers`` follows the previous step's neighbours whose
value was the chosen token (greedy / sampling; not with beam search, which reorders rows). With
pointers the prompt is tracked first, teacher-forced, position by position (searching only where
fewer than ``min_pointers`` pointers survive), so the pointers know which document the prompt is
in. ``proc.stats`` counts row-steps, searches and pointer steps (prompt tracking included).
"""

from __future__ import annotations

import logging
import math

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from knnlm.errors import GenerateError
from knnlm.retrieval import one_thread

logger = logging.getLogger(__name__)

__all__ = ["KNNLogitsProcessor", "GenerateError", "generate"]

# generate() kwargs that run the model more than once per processor call (or not at all)
_UNSUPPORTED = {
    "assistant_model": "assisted decoding",
    "prompt_lookup_num_tokens": "prompt-lookup decoding",
    "custom_generate": "custom_generate",
}

class KNNLogitsProcessor(LogitsProcessor):
    """Replace the next-token scores by kNN-LM log-probabilities.

    Must be used while its key hook is installed: inside ``with KNNLogitsProcessor(knn) as proc:``
    (or through ``KNNLM.generate``, which does that)::

        with KNNLogitsProcessor(knn) as proc:
            out = model.generate(**inputs, logits_processor=[proc], max_new_tokens=32)

    ``record`` > 0 keeps the neighbours (squared distances and datastore rows, each (rows, k) on
    the CPU) of the first ``record`` steps in ``proc.records`` -- one entry per step, rows as the
    processor saw them (``batch x beams``); ``KNNLM.neighbours`` turns rows into provenance.
    ``proc.key_lengths`` lists how many positions each step's forward pass saw (1 per step after
    the prompt when the KV cache is used).
    """

    def __init__(self, knnlm, *, record: int = 0):
        self.knnlm = knnlm
        self.record = int(record)
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.key_lengths: list[int] = []
        self._ctx = None
        self._cap = None
        self._vocab = knnlm.datastore.header.model.vocab_size
        self.attention_mask: torch.Tensor | None = None  # the prompt's, for pointer tracking (set by generate)
        self.stats = {"steps": 0, "searched": 0, "pointed": 0, "prompt_steps": 0, "prompt_searched": 0}
        self._pending = None  # the last step (``Step``), for the pointers of the next one
        self._lookup = None  # knnlm.retrieval.Lookup: the per-row retrieval decision (made on the first step)

    # ---- the key hook -------------------------------------------------------------------------
    def __enter__(self) -> KNNLogitsProcessor:
        from knnlm.capture import capture_keys

        if self._ctx is not None:
            raise GenerateError("this KNNLogitsProcessor is already in use; create one per generate() call")
        self.records, self.key_lengths = [], []
        self.stats = dict.fromkeys(self.stats, 0)
        self._pending, self._lookup = None, None
        self._ctx = capture_keys(self.knnlm.model, self.knnlm.key_layer)
        self._cap = self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        ctx, self._ctx, self._cap = self._ctx, None, None
        if ctx is not None:
            ctx.__exit__(*exc)

    # ---- one decoding step --------------------------------------------------------------------
    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if self._cap is None:
            raise GenerateError("KNNLogitsProcessor is not capturing keys: use it inside "
                                "`with KNNLogitsProcessor(knn) as proc: model.generate(..., logits_processor=[proc])` "
                                "or call KNNLM.generate")
        keys, self._cap.keys = self._cap.keys, None
        if keys is None:
            raise GenerateError(
                "no key hidden state was captured since the previous decoding step: kNN-LM generation "
                "needs exactly one forward pass of the model per step (assisted / prompt-lookup decoding "
                "and cached-logit replays are not supported)")
        if keys.dim() != 3:
            raise GenerateError(f"the key module {self._cap.module_path} received a tensor of shape "
                                f"{tuple(keys.shape)}, expected (batch, positions, dim)")
        rows, dim = scores.shape[0], self.knnlm.datastore.dim
        if keys.shape[0] != rows or input_ids.shape[0] != rows:
            raise GenerateError(
                f"row mismatch: the forward pass produced keys for {keys.shape[0]} rows but generate() "
                f"scores {rows} rows (input_ids {tuple(input_ids.shape)}); the keys must align row for row "
                "with batch x beams -- this decoding mode is not supported")
        if keys.shape[-1] != dim:
            raise GenerateError(f"captured keys have dim {keys.shape[-1]}, the datastore's are {dim}: "
                                "the datastore was built at another layer or with another model")
        if scores.shape[-1] < self._vocab:
            raise GenerateError(f"the scores have {scores.shape[-1]} columns but the datastore's model has a "
                                f"vocabulary of {self._vocab}; use the model the datastore was built with")
        self.key_lengths.append(int(keys.shape[1]))
        query = keys[:, -1, :]  # (rows, D): the position whose next token is being chosen
        if self._lookup is None:
            self._start(keys, input_ids)
        elif self._pending is not None:
            self._lookup.advance(self._pending, input_ids[:, -1])
        out = self._mix(query, scores)
        banned = torch.isneginf(scores)  # bans set by processors that ran before this one
        return out.masked_fill(banned, -math.inf) if bool(banned.any()) else out

    def _start(self, keys: torch.Tensor, input_ids: torch.Tensor) -> None:
        """The first step: the lookup for these rows and, with pointers, the prompt tracked position
        by position, teacher-forced (keys (rows, P, D)), so the pointers know where the prompt is."""
        knn = self.knnlm
        rows, p = keys.shape[0], keys.shape[1]
        # a fixed λ = 0 has no kNN side: no search, unless the neighbours are recorded
        self._lookup = lookup = knn.lookup(rows, always=self.record > 0, device=keys.device)
        if not knn.pointers:
            return
        mask = self.attention_mask
        with one_thread():
            for t in range(p - 1):  # position t predicts input_ids[:, t + 1], which is known
                real = torch.ones(rows, dtype=torch.bool, device=keys.device) if mask is None else \
                    mask[:, t].to(keys.device).bool()
                if not bool(real.any()):
                    continue
                idx = real.nonzero().squeeze(1)
                st = lookup.neighbours(keys[idx, t], rows=idx, gated=False)  # no logits here: no retrieval gate
                self.stats["prompt_steps"] += int(idx.numel())
                self.stats["prompt_searched"] += int(st.searched.sum())
                lookup.advance(st, input_ids[idx, t + 1], rows=idx)
                lookup.reset(~real)

    def _mix(self, query: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        knn = self.knnlm
        self.stats["steps"] += scores.shape[0]
        feats = knn.lm_features(scores) if knn.needs_lm_features() else None
        st = self._lookup.neighbours(query, feats)
        self.stats["searched"] += int(st.searched.sum())
        self.stats["pointed"] += int(st.pointed.sum())
        self._pending = st
        if len(self.records) < self.record:
            self.records.append((st.dists.detach().cpu(), st.ids.detach().cpu()))
        return knn.mix_rows(scores, st, feats)


def _check_positions(model, inputs, kwargs) -> None:
    """The prompt and the tokens to generate must fit the model's positions (as eval's windows do,
    ``config.check_context``): past them a learned position table fails (an IndexError on CPU, a
    device assert on CUDA)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return
    ids = inputs if inputs is not None else kwargs.get("input_ids")
    prompt = int(ids.shape[-1]) if ids is not None else 0
    new = kwargs.get("max_new_tokens")
    if new is not None:
        total, what = prompt + int(new), f"the prompt ({prompt} tokens) plus `max_new_tokens` ({new})"
    else:
        gen_cfg = kwargs.get("generation_config") or getattr(model, "generation_config", None)
        total = kwargs.get("max_length") or getattr(gen_cfg, "max_length", None) or 0
        what = f"`max_length` {total}"
    if total > limit:
        raise GenerateError(f"{what} exceed the model's {limit} positions; shorten the prompt or generate fewer "
                            "tokens", param="max_new_tokens")


def generate(knnlm, inputs: torch.Tensor | None = None, *, logits_processor=None,
             processor: KNNLogitsProcessor | None = None, **kwargs):
    """``model.generate`` with the kNN-LM mixture: same keyword arguments, same return types.

    ``processor``: a (not yet entered) ``KNNLogitsProcessor`` of ``knnlm`` to use, e.g. one made
    with ``record=N`` to inspect the neighbours afterwards. Other processors passed as
    ``logits_processor`` run after it.
    """
    for name, what in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise GenerateError(f"{what} ({name}=...) is not supported by kNN-LM generation: it runs the model "
                                "on several positions per step; use greedy, sampling or beam search")
    proc = processor if processor is not None else KNNLogitsProcessor(knnlm)
    if proc.knnlm is not knnlm:
        raise GenerateError("the processor belongs to another KNNLM object")
    if getattr(knnlm, "pointers", False) and (kwargs.get("num_beams") or 1) > 1:
        raise GenerateError("`pointers` follow one sequence per row; beam search reorders rows between steps: "
                            "use greedy search or sampling with pointers", param="pointers")
    _check_positions(knnlm.model, inputs, kwargs)
    proc.attention_mask = kwargs.get("attention_mask")
    procs = LogitsProcessorList([proc])
    procs.extend(logits_processor or [])
    with proc:
        return knnlm.model.generate(inputs, logits_processor=procs, **kwargs)
