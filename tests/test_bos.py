"""<bos> in every window: for a tokenizer that adds a BOS token, every window that starts inside a
document gets the BOS in front, in build and eval alike; keys and targets stay one per corpus token.

Oracle: an independent HF loss computation that builds each window by hand ([bos] + the window's
tokens) and scores only that window's targets with ``labels=`` (-100 elsewhere).
"""

import math

import numpy as np
import pytest
import torch

from knnlm import BuildConfig, EvalConfig, build_datastore, evaluate
from knnlm.corpora import stdlib_root
from knnlm.data import tokenizer_bos

from conftest import make_tiny_model

FILES = ["colorsys.py", "keyword.py"]
CONTEXT, STRIDE = 48, 20  # many windows per document, overlapping ones included


def _texts():
    return [(stdlib_root() / f).read_text() for f in FILES]


def _hf_nll_bos_every_window(model, tok, text: str, context: int, stride: int) -> tuple[float, int]:
    """Sum of -log p over targets 1..n-1, each window = [bos] + tokens[start:end] (start > 0)."""
    ids = tok(text)["input_ids"]
    bos = tok.bos_token_id
    assert ids[0] == bos
    nll, n, done, end = 0.0, 0, 1, min(context, len(ids))
    while done < len(ids):
        start = max(0, end - context)
        window = ids[start:end] if start == 0 else [bos] + ids[start:end]
        shift = 0 if start == 0 else 1
        labels = [-100] * len(window)
        for j in range(done, end):  # target j sits at position j - start + shift
            labels[j - start + shift] = window[j - start + shift]
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([window]), labels=torch.tensor([labels]))
        k = end - done
        nll += out.loss.item() * k
        n += k
        done, end = end, min(end + stride, len(ids))
    return nll, n


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_lambda_zero_equals_hf_loss_with_bos_before_every_window(arch, tiny_bos_tokenizer, tmp_path):
    tok = tiny_bos_tokenizer
    assert tokenizer_bos(tok) == tok.bos_token_id
    model = make_tiny_model(arch)
    ds = build_datastore(model, tok, [str(stdlib_root() / "bisect.py")], tmp_path / "ds",
                         BuildConfig(context=CONTEXT, stride=STRIDE, index="flat", progress=False))
    assert ds.header.window.bos == tok.bos_token_id
    res = evaluate(model, tok, ds, texts=_texts(), cfg=EvalConfig(lambdas=[0.0], progress=False))
    nll, n = 0.0, 0
    for text in _texts():
        a, b = _hf_nll_bos_every_window(model, tok, text, CONTEXT, STRIDE)
        nll, n = nll + a, n + b
    assert res["tokens"] == n
    assert res["window"]["bos"] == tok.bos_token_id
    assert res["ppl_base"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_build_keys_are_one_per_token_and_see_the_bos(tiny_bos_tokenizer, tmp_path):
    """Rows = corpus tokens - 1 per document (the BOS is never a target); the key of a target in a
    mid-document window equals the hidden state of a hand-made [bos] + window forward."""
    from knnlm.capture import capture_keys

    tok = tiny_bos_tokenizer
    model = make_tiny_model("llama")
    path = stdlib_root() / "colorsys.py"
    ds = build_datastore(model, tok, [str(path)], tmp_path / "ds",
                         BuildConfig(context=CONTEXT, stride=STRIDE, key_dtype="float32", index="flat", progress=False))
    ids = tok(path.read_text())["input_ids"]
    assert len(ds) == len(ids) - 1 and ds.tokens[0] == tok.bos_token_id
    # the second window: targets [CONTEXT, CONTEXT + STRIDE) from tokens [start, CONTEXT + STRIDE)
    end = CONTEXT + STRIDE
    start = end - CONTEXT
    window = [tok.bos_token_id] + ids[start:end]
    with torch.inference_mode(), capture_keys(model) as cap:
        model(input_ids=torch.tensor([window]))
        h = cap.pop()[0]  # (T, D)
    for j in (CONTEXT, end - 1):  # target j: predicted at window position j - start (after the bos)
        np.testing.assert_allclose(ds.keys[j - 1], h[j - start].numpy(), rtol=1e-5, atol=1e-5)


def test_no_bos_tokenizer_keeps_the_old_protocol(tiny_tokenizer, tmp_path):
    """GPT-2 style tokenizers (no BOS added): nothing is prepended, λ=0 equals the plain windowed
    HF loss without any BOS."""
    assert tokenizer_bos(tiny_tokenizer) is None
    model = make_tiny_model("llama")
    ds = build_datastore(model, tiny_tokenizer, [str(stdlib_root() / "bisect.py")], tmp_path / "ds",
                         BuildConfig(context=CONTEXT, stride=STRIDE, index="flat", progress=False))
    assert ds.header.window.bos is None
    text = _texts()[0]
    res = evaluate(model, tiny_tokenizer, ds, texts=[text], cfg=EvalConfig(lambdas=[0.0], progress=False))
    ids = tiny_tokenizer(text)["input_ids"]
    nll, n, done, end = 0.0, 0, 1, min(CONTEXT, len(ids))
    while done < len(ids):
        start = max(0, end - CONTEXT)
        labels = [-100] * (end - start)
        for j in range(done, end):
            labels[j - start] = ids[j]
        with torch.inference_mode():
            loss = model(input_ids=torch.tensor([ids[start:end]]), labels=torch.tensor([labels])).loss.item()
        nll, n = nll + loss * (end - done), n + end - done
        done, end = end, min(end + STRIDE, len(ids))
    assert res["ppl_base"] == pytest.approx(math.exp(nll / n), rel=1e-5)
