"""Speculative decoding from the datastore (#26): ``KNNLM.generate(..., draft_tokens=N)`` drafts
the continuation of the neighbour that chose the last token, verifies it in one forward pass,
and keeps the kNN-LM's own output: greedy tokens equal plain kNN-LM greedy decoding (up to
floating-point near-ties, which a multi-token forward may resolve differently), sampled tokens
follow the same distribution. Tiny random Llama + the tiny flat datastore; a high λ makes the
kNN-LM follow the datastore, so drafts are accepted and the test is not vacuous."""

from __future__ import annotations

import math
import re
import shutil
from collections import Counter

import pytest
import torch
from transformers import LogitsProcessor

from knnlm import KNNLM
from knnlm.cli import main
from knnlm.corpora import stdlib_root
from knnlm.datastore import open_datastore
from knnlm.errors import GenerateError
from knnlm.generate import DatastoreDrafter, KNNLogitsProcessor, draft_summary
from knnlm.testing import assert_greedy_up_to_ties, corpus_paths


@pytest.fixture(scope="module")
def gated(tmp_path_factory, tiny_store, tiny_tokenizer):
    """A copy of the tiny datastore with a gate tuned on text outside it."""
    model, shared = tiny_store
    path = tmp_path_factory.mktemp("speculative") / "ds"
    shutil.copytree(shared.path, path)
    ds = open_datastore(path)
    KNNLM(model, ds, tiny_tokenizer, k=32).tune([str(stdlib_root() / "sched.py")], max_tokens=2000, progress=False)
    return model, open_datastore(path)


def _prompts(tok, n: int = 3) -> list[torch.Tensor]:
    """Prompts cut from datastore documents (their continuations are in the datastore)."""
    out = []
    for path in corpus_paths()[:n]:
        text = open(path, encoding="utf-8").read()
        out.append(tok(text[400:560], return_tensors="pt")["input_ids"])
    return out


@pytest.mark.parametrize("settings", [dict(lam=0.9), dict(lam=0.25), dict(lam=0.9, keep_unseen=True),
                                      dict(lam="adaptive"), dict(lam="adaptive", retrieve_fraction=0.5)],
                         ids=["lam0.9", "lam0.25", "keep-unseen", "adaptive", "adaptive-fraction"])
def test_greedy_drafting_gives_the_plain_knnlm_tokens(gated, tiny_tokenizer, settings):
    model, ds = gated
    knn = KNNLM(model, ds, tiny_tokenizer, k=32, **settings)
    kw = dict(max_new_tokens=24, pad_token_id=0)
    accepted = 0
    for ids in _prompts(tiny_tokenizer):
        plain = knn.generate(ids, return_dict_in_generate=True, output_scores=True, **kw)
        proc = KNNLogitsProcessor(knn)
        got = knn.generate(ids, processor=proc, draft_tokens=6, **kw)
        assert_greedy_up_to_ties(plain, got, ids.shape[1])
        d = draft_summary(proc)
        assert d["tokens"] == got.shape[1] - ids.shape[1]  # every token came from a forward pass's verification
        assert d["forwards"] <= d["tokens"] and d["accepted"] <= d["drafted"]
        assert d["searches"] >= d["forwards"] or settings.get("retrieve_fraction")
        accepted += d["accepted"]
    if settings.get("lam") == 0.9:
        assert accepted > 0  # drafts were kept: the verification path was exercised


def test_greedy_verification_searches_only_the_positions_it_keeps(tiny_store, tiny_tokenizer):
    """Greedy: a drafted position after the first token the kNN-LM rejects is neither searched
    nor scored (transformers discards it), so there is one search per generated token; with a
    processor after the kNN-LM's (it could move the argmax) every drafted position is scored,
    and the output is still plain kNN-LM greedy's under that processor."""
    model, ds = tiny_store
    knn = KNNLM(model, ds, tiny_tokenizer, k=32, lam=0.9)
    kw = dict(max_new_tokens=24, pad_token_id=0)
    rejected = 0
    for ids in _prompts(tiny_tokenizer):
        proc = KNNLogitsProcessor(knn)
        knn.generate(ids, processor=proc, draft_tokens=6, **kw)
        d = draft_summary(proc)
        assert d["searches"] == d["tokens"]
        rejected += d["drafted"] - d["accepted"]
    assert rejected > 0  # some drafted positions were rejected, so the test is not vacuous

    class Ban(LogitsProcessor):  # bans the token the kNN-LM likes best at every third step
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] % 3 == 0:
                scores = scores.clone()
                scores[:, scores.argmax(-1)] = -math.inf
            return scores

    ids = _prompts(tiny_tokenizer, 1)[0]
    plain = knn.generate(ids, logits_processor=[Ban()], return_dict_in_generate=True, output_scores=True, **kw)
    proc = KNNLogitsProcessor(knn)
    got = knn.generate(ids, logits_processor=[Ban()], processor=proc, draft_tokens=6, **kw)
    assert_greedy_up_to_ties(plain, got, ids.shape[1])
    d = draft_summary(proc)
    assert d["searches"] == d["forwards"] + d["drafted"]  # every position of every forward was scored


def test_drafts_continue_the_longest_match_of_the_sequence_end(tiny_store, tiny_tokenizer):
    """``Retriever.match_before`` counts the sequence's last tokens a datastore row's document had
    there, never across a document boundary; the drafter continues the longest match, from the
    datastore or from the sequence itself, for as many tokens as matched (at most N), and drafts
    nothing from a match of the last token alone."""
    model, ds = tiny_store
    knn = KNNLM(model, ds, tiny_tokenizer, k=32, lam=0.9)
    retriever = knn.retriever
    doc = ds.documents[1]
    toks = torch.from_numpy(ds.document_tokens(1).astype("int64"))
    row = doc["first_row"] + 40  # its value is toks[41]; the rows first_row.. hold toks[1:]
    assert int(retriever._values[row]) == int(toks[41])
    assert int(retriever.match_before(torch.tensor([row]), toks[31:41].flip(0))[0]) == 11
    # before the document's first row come the previous document's rows: even tokens equal to
    # their values do not extend the match across the boundary
    recent = torch.cat([toks[1:41].flip(0), retriever._values[row - 50: row - 40].flip(0)])
    assert int(retriever.match_before(torch.tensor([row]), recent)[0]) == 41
    assert int(retriever.match_before(torch.tensor([row]), (recent + 1) % 384)[0]) == 1

    from knnlm.retrieval import Step

    drafter = DatastoreDrafter(KNNLogitsProcessor(knn), draft_tokens=6, max_length=10_000)
    k = 4
    step = Step(dists=torch.zeros(1, k), values=torch.full((1, k), int(toks[41])),
                ids=torch.tensor([[row, -1, -1, -1]]), searched=torch.ones(1, dtype=torch.bool),
                pointed=torch.zeros(1, dtype=torch.bool))
    draft = drafter._draft(step, toks[30:42], 6)  # 12 tokens of the document: a match of 12
    assert draft.tolist() == toks[42:48].tolist() and drafter.stats["from_datastore"] == 1
    assert drafter._draft(step, torch.cat([toks[40:41] + 1, toks[41:42]]), 6) is None  # the last token alone
    two = drafter._draft(step, torch.cat([toks[39:40] + 1, toks[40:42]]), 6)
    assert two.tolist() == toks[42:44].tolist()  # a match of two tokens drafts two
    looped = torch.cat([toks[30:42], toks[30:42]])  # the sequence repeats itself: a longer match there
    assert drafter._draft(step, looped, 6).tolist() == toks[30:36].tolist()
    assert drafter.stats["from_sequence"] == 1


def test_a_left_padded_batch_gives_each_prompts_plain_tokens(tiny_store, tiny_tokenizer):
    model, ds = tiny_store
    knn = KNNLM(model, ds, tiny_tokenizer, k=32, lam=0.9)
    prompts = [p[0] for p in _prompts(tiny_tokenizer)]
    prompts[1] = prompts[1][:-7]  # different lengths: the batch is padded
    width = max(p.numel() for p in prompts)
    ids = torch.stack([torch.cat([p.new_zeros(width - p.numel()), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(width - p.numel()), torch.ones(p.numel())]).long() for p in prompts])
    kw = dict(max_new_tokens=16, pad_token_id=0)
    proc = KNNLogitsProcessor(knn)
    got = knn.generate(ids, attention_mask=mask, processor=proc, draft_tokens=6, **kw)
    assert got.shape[0] == 3 and torch.equal(got[:, :width], ids)  # the prompts as given, padding included
    produced = 0
    for b, p in enumerate(prompts):
        plain = knn.generate(p[None], return_dict_in_generate=True, output_scores=True, **kw)
        assert_greedy_up_to_ties(plain, got[b:b + 1, width - p.numel():], p.numel())
        produced += plain.sequences.shape[1] - p.numel()
    assert draft_summary(proc)["tokens"] == produced  # the stats add up over the rows
    right = torch.stack([torch.cat([p, p.new_zeros(width - p.numel())]) for p in prompts])
    with pytest.raises(GenerateError, match="left padding"):
        knn.generate(right, attention_mask=(right != 0).long(), draft_tokens=4, **kw)


def _chi2_critical(df: int, z: float = 3.72) -> float:
    """Upper quantile of chi-square(df) at the normal quantile ``z`` (3.72: p = 1e-4), by the
    Wilson-Hilferty approximation."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def test_sampling_with_drafts_keeps_the_knnlm_distribution(tiny_store, tiny_tokenizer):
    """Token frequencies at each generated position over many seeds, drafting vs not: a
    two-sample chi-square test at p = 1e-4 per position (bins with few counts pooled)."""
    model, ds = tiny_store
    knn = KNNLM(model, ds, tiny_tokenizer, k=32, lam=0.9)
    ids = _prompts(tiny_tokenizer, 1)[0]
    n, new = 150, 4
    kw = dict(max_new_tokens=new, do_sample=True, pad_token_id=0)
    counts = {mode: [Counter() for _ in range(new)] for mode in ("plain", "draft")}
    accepted = 0
    for seed in range(n):
        for mode in ("plain", "draft"):
            torch.manual_seed(seed if mode == "plain" else 10_000 + seed)
            proc = KNNLogitsProcessor(knn)
            out = knn.generate(ids, processor=proc, draft_tokens=4 if mode == "draft" else 0, **kw)
            for t, tok in enumerate(out[0, ids.shape[1]:].tolist()):
                counts[mode][t][tok] += 1
            if mode == "draft":
                accepted += draft_summary(proc)["accepted"]
    assert accepted > 0  # some positions were drawn through the acceptance rule, not a plain step
    for t in range(new):
        a, b = counts["plain"][t], counts["draft"][t]
        assert sum(a.values()) == sum(b.values()) == n
        bins, other = [], [0, 0]
        for tok in set(a) | set(b):
            if a[tok] + b[tok] >= 10:
                bins.append((a[tok], b[tok]))
            else:
                other[0] += a[tok]
                other[1] += b[tok]
        if sum(other):
            bins.append(tuple(other))
        if len(bins) < 2:
            continue  # one token takes (almost) all the mass at this position: nothing to compare
        stat = sum((x - y) ** 2 / (x + y) for x, y in bins)  # two samples of equal size
        assert stat < _chi2_critical(len(bins) - 1), (t, bins)


def test_drafting_refuses_what_it_cannot_keep_lossless(tiny_store, tiny_tokenizer):
    model, ds = tiny_store
    ids = _prompts(tiny_tokenizer, 1)[0]
    knn = KNNLM(model, ds, tiny_tokenizer, k=32)
    with pytest.raises(GenerateError, match="beam search"):
        knn.generate(ids, draft_tokens=4, num_beams=2, max_new_tokens=4)
    with pytest.raises(GenerateError, match="pointers"):
        knn.replace(pointers=True).generate(ids, draft_tokens=4, max_new_tokens=4)
    for bad in (-1, 2.5, True):
        with pytest.raises(GenerateError, match="draft_tokens"):
            knn.generate(ids, draft_tokens=bad, max_new_tokens=4)


def test_cli_generate_with_draft_tokens(capsys, tiny_model_dir, tiny_store, tiny_tokenizer):
    _, ds = tiny_store
    text = open(corpus_paths()[0], encoding="utf-8").read()[400:560]
    common = [str(a) for a in ("generate", "--model", tiny_model_dir, "--datastore", ds.path, "--prompt", text,
                                "--lambda", "0.9", "--k", "32", "--max-new-tokens", "16", "--quiet")]
    assert main([*common, "--draft-tokens", "6"]) == 0
    out = capsys.readouterr().out  # (that the tokens are plain kNN-LM greedy's is tested above, ties aside)
    text_part, stats = out.split("\n[speculative: ")
    assert text_part.strip() and re.match(r"[0-9.]+ tokens per model forward \(16 in \d+\), accepted ", stats)
    assert "searches per token" in stats and "tok/s]" in stats
    assert main([*common, "--draft-tokens", "4", "--num-beams", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--draft-tokens" in err and "beam search" in err
