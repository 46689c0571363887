"""One token sequence through the three ways of using a ``KNNLM`` -- evaluation (target
log-probabilities over a sweep, ``mix_targets``), ``log_probs`` (whole rows, what the harness
scores) and generation (``KNNLogitsProcessor``, step by step) -- must give the same
log-probability of every next token under every mode: they share one retrieval decision
(``KNNLM.lookup``) and one mixture (``mix_rows`` / ``mix_targets``).

The LM side is computed once and handed to the row paths (the processor gets the captured keys
and scores of each step), so the comparison does not hinge on the KV cache's float rounding."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from knnlm import KNNLM
from knnlm.capture import capture_keys
from knnlm.datastore import open_datastore
from knnlm.generate import KNNLogitsProcessor
from knnlm.testing import corpus_paths

PROMPT = 6  # tokens the generation path gets as its prompt; it scores the rest


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_store, tiny_tokenizer):
    """A copy of the tiny datastore with two gates tuned on sched.py (not in the datastore): the
    standard mixture's (the datastore's) and the keep-unseen mixture's (a file)."""
    model, shared = tiny_store
    path = tmp_path_factory.mktemp("paths") / "ds"
    shutil.copytree(shared.path, path)
    knn = KNNLM(model, open_datastore(path), tiny_tokenizer, k=32)
    tune = [str(Path(corpus_paths(["bisect.py"])[0]).parent / "sched.py")]
    knn.tune(tune, max_tokens=2000, progress=False)
    keep = knn.tune(tune, max_tokens=2000, progress=False, keep_unseen=True, out=path.parent / "keep.json")
    # held-out text (queue.py), one window of the datastore's protocol
    text = Path(corpus_paths(["bisect.py"])[0]).with_name("queue.py").read_text()[:2000]
    ids = tiny_tokenizer(text)["input_ids"][:60]
    return model, open_datastore(path), keep, tiny_tokenizer.decode(ids), torch.tensor(ids)


MODES = {
    "lambda 0": dict(lam=0.0),
    "lambda 0.25": dict(lam=0.25),
    "lambda 1": dict(lam=1.0),
    "adaptive": dict(lam="adaptive"),
    "retrieve fraction": dict(lam=0.25, retrieve_fraction=0.5),
    "adaptive, retrieve fraction": dict(lam="adaptive", retrieve_fraction=0.5),
    "pointers": dict(lam=0.25, pointers=True, min_pointers=4),
    "keep-unseen": dict(lam=0.25, keep_unseen=True),
    "adaptive, keep-unseen gate": dict(lam="adaptive", gate="keep"),
}


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert torch.equal(torch.isneginf(a), torch.isneginf(b)), "a target has probability zero on one path only"
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", list(MODES))
def test_eval_log_probs_and_generation_give_the_same_log_probabilities(setup, tiny_tokenizer, mode):
    model, ds, keep_gate, text, ids = setup
    settings = dict(MODES[mode])
    if settings.pop("gate", None) == "keep":
        settings["gate"] = keep_gate
    knn = KNNLM(model, ds, tiny_tokenizer, k=32, **settings)
    tgt = ids[1:]  # (T - 1,)

    # 1. evaluation: the text is one window, every target scored
    res = knn.evaluate(texts=[text], per_token=True, progress=False)
    assert res["tokens"] == tgt.numel() == res["per_token"]["grid"][0].numel()
    lp_eval = res["per_token"]["grid"][0].float()  # (T - 1,)

    # the LM side once: logits (T, V) and keys (T, D) of the whole sequence
    with torch.inference_mode(), capture_keys(model, ds.header.key.layer) as cap:
        logits = model(input_ids=ids[None]).logits[0].float()
        keys = cap.pop()[0]
    _same(res["per_token"]["base"].float(), torch.log_softmax(logits[:-1], -1).gather(1, tgt[:, None])[:, 0])

    # 2. whole rows (``log_probs``, what the harness scores); pointers need the sequence, so
    #    log_probs of a pointer KNNLM searches every row, as the same settings without pointers do
    rows = knn.log_probs(logits[:-1], keys[:-1])  # (T - 1, V)
    if knn.pointers:
        _same(rows, knn.replace(pointers=False, min_pointers=None).log_probs(logits[:-1], keys[:-1]))
    else:
        _same(rows.gather(1, tgt[:, None])[:, 0], lp_eval)
    torch.testing.assert_close(rows.exp().sum(-1), torch.ones(rows.shape[0]), rtol=1e-4, atol=1e-4)

    # 3. generation: the processor sees the prompt's keys, then one position per step (KV cache)
    proc = KNNLogitsProcessor(knn)
    lp_gen = []
    with torch.inference_mode(), proc:
        for t in range(PROMPT - 1, ids.numel() - 1):
            proc._cap.keys = keys[None, :PROMPT] if t == PROMPT - 1 else keys[None, t:t + 1]
            row = proc(ids[None, :t + 1], logits[None, t])  # (1, V)
            lp_gen.append(row[0, ids[t + 1]])
    _same(torch.stack(lp_gen), lp_eval[PROMPT - 1:])

    if mode == "lambda 0":
        _same(lp_eval, res["per_token"]["base"].float())  # the LM exactly, and nothing searched
        assert res["retrieval"]["searched_fraction"] == 0.0 and proc.stats["searched"] == 0
    if "fraction" in mode:
        assert 0.0 < res["retrieval"]["searched_fraction"] < 1.0
    if mode == "pointers":
        assert res["retrieval"]["pointer_fraction"] > 0 and proc.stats["pointed"] > 0


def test_a_row_without_neighbours_is_the_lm_exactly_at_every_lambda(setup, tiny_tokenizer):
    """The one rule, in both scoring methods: a row whose neighbours are all missing (excluded,
    skipped, nothing found) gets the LM's distribution exactly, also at λ = 1 and adaptive."""
    from knnlm.retrieval import Step

    model, ds, _, _, ids = setup
    torch.manual_seed(0)
    logits, hidden = torch.randn(4, model.config.vocab_size), torch.randn(4, ds.dim)
    lp_lm = torch.log_softmax(logits, -1)
    for lam in (0.0, 0.25, 1.0, "adaptive"):
        knn = KNNLM(model, ds, tiny_tokenizer, k=32, lam=lam)
        step = knn.lookup().neighbours(hidden, knn.lm_features(logits))
        none = torch.tensor([True, False, True, False])
        step = Step(step.dists.masked_fill(none[:, None], float("inf")), step.values,
                    step.ids.masked_fill(none[:, None], -1), step.searched, step.pointed)
        rows = knn.mix_rows(logits, step)
        assert torch.equal(rows[none], lp_lm[none])
        assert torch.isfinite(rows[~none]).any(-1).all()
        tgt = torch.tensor([3, 4, 5, 6])
        grid = [(lam, 1.0, 32)]
        lps, _ = knn.mix_targets(lp_lm.gather(1, tgt[:, None])[:, 0], step, tgt, grid, knn.lm_features(logits))
        assert torch.equal(lps[0, none], lp_lm.gather(1, tgt[:, None])[none, 0])
