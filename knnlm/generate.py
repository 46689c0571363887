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
from collections import Counter

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.candidate_generator import CandidateGenerator

from knnlm.cpu import row_argmax, verification
from knnlm.errors import GenerateError
from knnlm.retrieval import agreeing_run, one_thread

logger = logging.getLogger(__name__)

__all__ = ["KNNLogitsProcessor", "DatastoreDrafter", "GenerateError", "check_drafting", "draft_summary", "generate"]

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
        self.drafter: DatastoreDrafter | None = None  # speculative decoding: drafts verified in one forward pass
        self.steps: dict[int, object] = {}  # speculative: each verified position's ``Step``, by input length
        self._verified: dict[int, object] = {}  # speculative: drafted positions searched, not yet scored
        # speculative greedy search: drafted positions are scored one by one, each searched when it is
        # scored, and once the kNN-LM rejects a drafted token the positions after it are left unscored
        # (transformers discards them); set by ``generate`` where nothing after this processor can
        # change the argmax
        self.score_until_rejected = False
        self._queries: dict[int, torch.Tensor | None] = {}  # those positions' keys (None: skipped), by input length
        self._choice: torch.Tensor | None = None  # the kNN-LM's greedy token at the position last scored

    # ---- the key hook -------------------------------------------------------------------------
    def __enter__(self) -> KNNLogitsProcessor:
        from knnlm.capture import capture_keys

        if self._ctx is not None:
            raise GenerateError("this KNNLogitsProcessor is already in use; create one per generate() call")
        self.records, self.key_lengths = [], []
        self.stats = dict.fromkeys(self.stats, 0)
        self._pending, self._lookup, self.steps, self._verified = None, None, {}, {}
        self._queries, self._choice, self.score_until_rejected = {}, None, False
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
        if keys is None and self.drafter is not None and input_ids.shape[1] in self._verified:
            return self._finish(input_ids, scores, self._verified.pop(input_ids.shape[1]))  # a drafted position
        if keys is None and self.drafter is not None and input_ids.shape[1] in self._queries:
            query = self._queries.pop(input_ids.shape[1])  # a drafted position, greedy
            if query is None or not bool((self._choice == input_ids[:, -1].to(self._choice.device)).all()):
                self._queries = dict.fromkeys(self._queries)  # rejected here: transformers keeps nothing after it
                return scores
            return self._finish(input_ids, scores, None, query)
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
        if self._lookup is None:
            self._start(keys, input_ids)
        elif self._pending is not None:
            self._lookup.advance(self._pending, input_ids[:, -1])
        drafted = 0
        if self.drafter is not None:
            drafted, self.steps = self.drafter.drafted, {}  # a new forward: the previous one's positions are done
        if drafted and self.score_until_rejected:  # greedy: the drafted positions are searched as they are scored
            first = input_ids.shape[1]
            self._queries = {first + i: keys[:, i - drafted - 1, :] for i in range(1, drafted + 1)}
            return self._finish(input_ids, scores, None, keys[:, -drafted - 1, :])
        if drafted:  # this forward verified a draft: every position's neighbours from one batched search
            return self._finish(input_ids, scores, self._search_draft(keys[:, -drafted - 1:, :], input_ids.shape[1]))
        return self._finish(input_ids, scores, None, keys[:, -1, :])  # (rows, D): the position being predicted

    def _finish(self, input_ids, scores, searched, query=None) -> torch.Tensor:
        """The kNN-LM scores of one position: its neighbours ``searched`` already (a drafted
        position) or searched now for ``query``."""
        out = self._mix(query, scores, searched)
        if self.drafter is not None:
            self.steps[input_ids.shape[1]] = self._pending  # what the drafter continues from
        low = scores.amin()  # bans (-inf) set by processors that ran before this one (NaN: look too)
        if not bool(low > -math.inf):
            out = out.masked_fill(torch.isneginf(scores), -math.inf)
        if self.score_until_rejected:
            self._choice = row_argmax(out)  # (rows,) what greedy search takes here
        return out

    def _search_draft(self, queries: torch.Tensor, first: int):
        """queries (1, P, D) of the P positions one forward pass verified (the last accepted token
        and the draft) -> the first position's ``Step``; the others wait in ``_verified`` by input
        length, for the calls transformers makes position by position. The retrieval gate, which
        needs each position's LM features, is applied as each position is scored."""
        from knnlm.retrieval import Step

        p = queries.shape[1]
        with one_thread():
            st = self._lookup.neighbours(queries[0], gated=False)  # (P, k): one search for every position
        self.stats["searched"] += int(st.searched.sum())
        rows = [Step(*(x[i:i + 1] for x in st)) for i in range(p)]
        self._verified = {first + i: rows[i] for i in range(1, p)}
        return rows[0]

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

    def _mix(self, query: torch.Tensor | None, scores: torch.Tensor, searched=None) -> torch.Tensor:
        knn = self.knnlm
        self.stats["steps"] += scores.shape[0]
        feats = knn.lm_features(scores) if knn.needs_lm_features() else None
        if searched is None:
            st = self._lookup.neighbours(query, feats)
            self.stats["searched"] += int(st.searched.sum())
        else:  # searched with the other positions of a draft (counted there)
            st = self._lookup.apply_gate(searched, feats)
        self.stats["pointed"] += int(st.pointed.sum())
        self._pending = st
        if len(self.records) < self.record:
            self.records.append((st.dists.detach().cpu(), st.ids.detach().cpu()))
        return knn.mix_rows(scores, st, feats)


class DatastoreDrafter(CandidateGenerator):
    """Drafts tokens for transformers' assisted decoding (speculative decoding, as REST, He et al.
    2023, and NEST, Li et al. 2024, do from a retrieval corpus).

    The draft is the continuation of the text that ends the way the sequence ends, over the longest
    stretch. Two places are looked at, both exact token matches:

    - the datastore: the neighbours of the last decoding step whose value is the token just chosen
      (all k of them); each one's *match* is how many of the sequence's last tokens its document
      had there (``Retriever.match_before``, up to ``MATCH``), its continuation what followed it
      (``Retriever.continuation``: never past its document's end);
    - the sequence itself (prompt and generated text): its earlier occurrences of the last token,
      matched the same way (generated text often repeats its own lines, which no datastore holds).

    The longest match wins (the sequence on a tie: it is this document; among neighbours the
    nearest), and the draft is its continuation, at most ``min(draft_tokens, match)`` tokens, and
    none from a match shorter than ``MIN_MATCH``: a draft is as long as the evidence for it, so
    where the text is unlike anything seen there are few drafts, short ones, and a failed one costs
    little more than a plain step. The model runs once over
    the draft; ``KNNLogitsProcessor`` scores the drafted positions with the kNN-LM mixture;
    transformers keeps the longest prefix the kNN-LM itself produces (greedy: its argmax at each
    position; sampling: a token drawn from it at each position, kept while it equals the draft --
    for a deterministic draft that is the speculative-sampling rule, so the output distribution
    is the kNN-LM's) and the kNN-LM's own token after it.

    ``stats``: ``forwards`` (model forward passes), ``tokens`` (tokens they produced), ``drafts``,
    ``drafted``, ``accepted`` (draft tokens kept), ``from_datastore`` / ``from_sequence`` (drafts
    taken from each place).
    """

    MATCH = 32  # the most tokens compared when matching the sequence's end
    MIN_MATCH = 2  # no draft from a shorter match (the last token alone is too weak a clue)
    SOURCES = ("datastore", "sequence")  # where drafts may come from (a subset: for ablations)

    def __init__(self, processor: KNNLogitsProcessor, draft_tokens: int, max_length: int):
        self.proc, self.max_draft, self.max_length = processor, int(draft_tokens), int(max_length)
        self.drafted = 0  # tokens drafted for the forward pass under way
        self.stats = {"forwards": 0, "tokens": 0, "drafts": 0, "drafted": 0, "accepted": 0,
                      "from_datastore": 0, "from_sequence": 0}

    @property
    def num_drafting_tokens(self) -> int:
        """The most tokens drafted per step (transformers sizes the states it keeps for rollback by it)."""
        return self.max_draft

    def get_candidates(self, input_ids: torch.LongTensor, **kwargs) -> tuple[torch.LongTensor, None]:
        self.drafted = 0
        n = min(self.max_draft, self.max_length - input_ids.shape[1] - 1)  # the model adds one token itself
        step = self.proc.steps.get(input_ids.shape[1] - 1)  # the neighbours that chose the last token
        if step is None or n <= 0:
            return input_ids, None
        draft = self._draft(step, input_ids[0].cpu(), n)
        if draft is None:
            return input_ids, None
        self.drafted = int(draft.numel())
        return torch.cat([input_ids, draft.to(input_ids.device)[None]], dim=1), None

    def _draft(self, step, seq: torch.Tensor, n: int) -> torch.Tensor | None:
        """Up to ``n`` tokens continuing ``seq`` (T,): the continuation of the longest match of its
        end, in the datastore (neighbours of ``step`` whose value is ``seq[-1]``) or in ``seq``."""
        token, m = seq[-1], min(self.MATCH, seq.numel() - 1)
        recent = seq[seq.numel() - 1 - m: -1].flip(0)  # (m,) the tokens before the last, nearest first
        best, draft, where = 0, None, None
        at = (seq[:-1] == token).nonzero().squeeze(1)  # (P,) earlier occurrences of the last token
        if at.numel() and "sequence" in self.SOURCES:
            idx = at[:, None] - torch.arange(1, m + 1)  # (P, m) the positions before each
            run = 1 + agreeing_run(seq[idx.clamp(min=0)], idx >= 0, recent)  # (P,)
            i = at.numel() - 1 - int(run.flip(0).argmax())  # the latest of the longest
            best, where = int(run[i]), "from_sequence"
            draft = seq[int(at[i]) + 1: int(at[i]) + 1 + min(n, best)]
        ids, values = step.ids[0].cpu(), step.values[0].cpu()  # (k,) ascending distance
        hit = ((ids >= 0) & (values == token)).nonzero().squeeze(1)
        if hit.numel() and "datastore" in self.SOURCES:
            retriever = self.proc.knnlm.retriever
            run = retriever.match_before(ids[hit], recent)  # (H,)
            j = int(run.argmax())  # the nearest of the longest
            if int(run[j]) > best:
                best, where = int(run[j]), "from_datastore"
                draft = retriever.continuation(int(ids[hit[j]]), min(n, best))
        if draft is None or best < self.MIN_MATCH:
            return None
        self.stats[where] += 1
        return draft  # may view ``seq``: get_candidates concatenates it into a new tensor

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int):
        st = self.stats
        st["forwards"] += 1
        st["tokens"] += int(num_matches) + 1
        if self.drafted:
            st["drafts"] += 1
            st["drafted"] += self.drafted
            st["accepted"] += min(int(num_matches), self.drafted)


def draft_summary(proc: KNNLogitsProcessor) -> dict:
    """What speculative decoding did in ``proc``'s last generate call: tokens per model forward,
    acceptance rate (draft tokens kept / drafted), searches per generated token, and the counts."""
    d = proc.drafter.stats
    return {**d, "searches": proc.stats["searched"],
            "tokens_per_forward": d["tokens"] / max(d["forwards"], 1),
            "acceptance": d["accepted"] / d["drafted"] if d["drafted"] else None,
            "searches_per_token": proc.stats["searched"] / max(d["tokens"], 1)}


def check_drafting(draft_tokens, *, pointers: bool = False, num_beams: int | None = 1,
                   num_return_sequences: int | None = 1) -> None:
    """Refuse what speculative decoding cannot do losslessly, in one line each, before generating."""
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 0:
        raise GenerateError(f"`draft_tokens` must be an integer >= 0, got {draft_tokens!r}", param="draft_tokens")
    if (num_beams or 1) > 1:
        raise GenerateError("`draft_tokens` (speculative decoding) keeps the kNN-LM's output only for greedy search "
                            "and sampling; beam search is not supported: drop num_beams or draft_tokens",
                            param="draft_tokens")
    if (num_return_sequences or 1) > 1:
        raise GenerateError("`draft_tokens` generates one sequence per prompt: drop num_return_sequences",
                            param="draft_tokens")
    if pointers:
        raise GenerateError("`draft_tokens` with `pointers` is not supported (a rejected draft would have to roll "
                            "the pointers back): use one of them", param="draft_tokens")


def _run(knnlm, inputs, proc, procs, draft_tokens, kwargs):
    """One ``model.generate`` call inside ``proc``'s key hook; with ``draft_tokens``, transformers'
    assisted decoding over a ``DatastoreDrafter``. transformers (5.x) has no public way to pass a
    ``CandidateGenerator`` to ``generate``: its prompt-lookup option selects assisted decoding, and
    the model's ``_get_candidate_generator`` is replaced, for this call only, by one returning the
    drafter. (Assisted decoding takes one sequence at a time: ``generate`` runs a batch row by row.)"""
    model = knnlm.model
    if not draft_tokens:
        with proc:
            return model.generate(inputs, logits_processor=procs, **kwargs)
    if not hasattr(model, "_get_candidate_generator"):
        import transformers

        raise GenerateError(f"`draft_tokens` needs transformers' assisted decoding (`_get_candidate_generator`), "
                            f"which transformers {transformers.__version__} lacks", param="draft_tokens")

    def candidate_generator(generation_config, **_):
        proc.drafter = DatastoreDrafter(proc, draft_tokens, generation_config.max_length)
        # greedy, and no processor after this one (the caller's, a watermark) that could move the argmax
        proc.score_until_rejected = (not generation_config.do_sample and len(procs) == 1
                                     and generation_config.watermarking_config is None)
        return proc.drafter

    model._get_candidate_generator = candidate_generator  # an instance attribute over the method
    try:
        with proc, verification(model):  # on the CPU: the few-row products and the attention, cheaper
            return model.generate(inputs, logits_processor=procs, prompt_lookup_num_tokens=draft_tokens, **kwargs)
    finally:
        del model._get_candidate_generator


def _each_row(knnlm, ids, proc, procs, draft_tokens, kwargs):
    """Speculative decoding of a left-padded batch, one prompt at a time (transformers' assisted
    decoding takes one sequence), returned as ``model.generate`` would: the prompts with their
    padding, then the new tokens, finished rows padded with ``pad_token_id``."""
    for name in ("return_dict_in_generate", "streamer"):
        if kwargs.get(name):
            raise GenerateError(f"`draft_tokens` with a batch of {ids.shape[0]} prompts does not support {name}: "
                                "generate one prompt at a time", param="draft_tokens")
    mask = kwargs.pop("attention_mask", None)
    mask = torch.ones_like(ids) if mask is None else mask.to(ids.device).long()
    real = mask.sum(1)  # (B,)
    if not bool((mask == (torch.arange(ids.shape[1], device=ids.device) >= ids.shape[1] - real[:, None])).all()):
        raise GenerateError("`draft_tokens` with a batch needs left padding (tokenizer.padding_side = 'left')",
                            param="draft_tokens")
    cfg = knnlm.model.generation_config
    pad = kwargs.get("pad_token_id", cfg.pad_token_id)
    if pad is None:
        eos = cfg.eos_token_id
        pad = (eos[0] if isinstance(eos, (list, tuple)) else eos) if eos is not None else 0
    rows, stats, draft = [], Counter(), Counter()
    for b in range(ids.shape[0]):
        n = int(real[b])
        kw = dict(kwargs, attention_mask=torch.ones(1, n, dtype=torch.long, device=ids.device))
        if kw.get("max_length") is not None:
            kw["max_length"] -= ids.shape[1] - n  # the row's share of the padded length
        out = _run(knnlm, ids[b:b + 1, ids.shape[1] - n:], proc, procs, draft_tokens, kw)
        rows.append(torch.cat([ids[b], out[0, n:]]))
        stats.update(proc.stats)
        draft.update(proc.drafter.stats)
    proc.stats, proc.drafter.stats = dict(stats), dict(draft)
    width = max(r.numel() for r in rows)
    return torch.stack([torch.cat([r, r.new_full((width - r.numel(),), pad)]) for r in rows])


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
             processor: KNNLogitsProcessor | None = None, draft_tokens: int = 0, **kwargs):
    """``model.generate`` with the kNN-LM mixture: same keyword arguments, same return types.

    ``processor``: a (not yet entered) ``KNNLogitsProcessor`` of ``knnlm`` to use, e.g. one made
    with ``record=N`` to inspect the neighbours afterwards. Other processors passed as
    ``logits_processor`` run after it.

    ``draft_tokens`` N > 0: speculative decoding from the datastore (``DatastoreDrafter``): up to
    N tokens drafted per step and verified in one forward pass; the output is the kNN-LM's
    (greedy: the same tokens up to floating-point ties; sampling: the same distribution).
    ``draft_summary(processor)`` reports tokens per forward, acceptance and searches per token.
    Greedy search or sampling only, no pointers.
    """
    for name, what in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise GenerateError(f"{what} ({name}=...) is not supported by kNN-LM generation: it runs the model "
                                "on several positions per step; use greedy, sampling or beam search")
    proc = processor if processor is not None else KNNLogitsProcessor(knnlm)
    if proc.knnlm is not knnlm:
        raise GenerateError("the processor belongs to another KNNLM object")
    if draft_tokens:
        check_drafting(draft_tokens, pointers=knnlm.pointers, num_beams=kwargs.get("num_beams"),
                       num_return_sequences=kwargs.get("num_return_sequences"))
    if getattr(knnlm, "pointers", False) and (kwargs.get("num_beams") or 1) > 1:
        raise GenerateError("`pointers` follow one sequence per row; beam search reorders rows between steps: "
                            "use greedy search or sampling with pointers", param="pointers")
    _check_positions(knnlm.model, inputs, kwargs)
    proc.attention_mask = kwargs.get("attention_mask")
    procs = LogitsProcessorList([proc])
    procs.extend(logits_processor or [])
    if draft_tokens:
        ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if ids is not None and ids.dim() == 2 and ids.shape[0] > 1:
            return _each_row(knnlm, ids, proc, procs, draft_tokens, kwargs)
        inputs = ids
    return _run(knnlm, inputs, proc, procs, draft_tokens, kwargs)
