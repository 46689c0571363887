"""Speculative verification on the CPU (``knnlm.cpu``): the output layer through oneDNN with a
prepacked weight gives ``F.linear``'s values up to float32 rounding, is used only inside its block,
packs once per weight version, and stands aside wherever it cannot apply; grouped-query attention
takes the key / value heads without copying them, with the same logits, inside its block only; the
other linear layers multiply 4 to 32 rows through ``knnlm.small_linear`` inside their block only,
and stand aside wherever they cannot."""

from __future__ import annotations

import math
import os
import weakref

import pytest
import torch
import torch.nn.functional as F
import transformers

from knnlm import KNNLM, cpu
from knnlm.generate import KNNLogitsProcessor, draft_summary
from knnlm.testing import assert_greedy_up_to_ties, corpus_paths, make_tiny_model

pytestmark = pytest.mark.skipif(not cpu.available(), reason="this torch has no oneDNN linear ops")


def _model(bias: bool = False) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    if bias:
        head = torch.nn.Linear(48, 300, bias=True)
        model.lm_head = head
    return model


@pytest.fixture
def fresh_cache(monkeypatch):
    monkeypatch.setattr(cpu, "_PACKED", weakref.WeakKeyDictionary())
    for name in ("KNNLM_PACKED_HEAD", "KNNLM_GROUPED_ATTENTION", "KNNLM_SMALL_LINEAR", cpu._GQA_SWITCH):
        monkeypatch.delenv(name, raising=False)
    return cpu


@pytest.mark.parametrize("bias", [False, True])
def test_the_packed_layer_gives_the_linear_values_inside_its_block_only(fresh_cache, bias):
    model = _model(bias)
    head = model.lm_head
    with torch.no_grad():
        for batch, rows in ((1, 1), (1, 3), (2, 3), (1, 5), (2, 17)):
            x = torch.randn(batch, rows, 48)
            want = F.linear(x, head.weight, head.bias)
            with cpu.packed_output_layer(model) as used:
                assert used and "forward" in head.__dict__
                got = head(x)
            assert "forward" not in head.__dict__  # the module's own forward again
            assert got.shape == want.shape and got.dtype == torch.float32
            if batch * rows < cpu.PACKED_MIN_ROWS:
                assert torch.equal(got, want)  # few rows: F.linear itself
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_weight_is_packed_once_per_version(fresh_cache):
    model = _model()
    head = model.lm_head
    with torch.no_grad():
        with cpu.packed_output_layer(model):
            first = fresh_cache._PACKED[head][1]
        with cpu.packed_output_layer(model):
            assert fresh_cache._PACKED[head][1] is first  # reused, not packed again
        head.weight.mul_(2)  # an in-place change: the copy is stale
        x = torch.randn(1, 5, 48)
        with cpu.packed_output_layer(model):
            assert fresh_cache._PACKED[head][1] is not first
            torch.testing.assert_close(head(x), F.linear(x, head.weight), rtol=1e-5, atol=1e-5)


def test_autograd_and_other_dtypes_use_the_layer_as_it_is(fresh_cache):
    model = _model()
    head = model.lm_head
    x = torch.randn(1, 4, 48)
    with cpu.packed_output_layer(model):
        assert head(x).requires_grad  # autograd records: F.linear, with its gradient
    model.to(torch.bfloat16)
    with cpu.packed_output_layer(model) as used:
        assert not used and "forward" not in head.__dict__


@pytest.mark.parametrize("how", ["env", "replaced"])
def test_it_stands_aside_when_turned_off_or_when_forward_is_replaced(fresh_cache, monkeypatch, how):
    model = _model()
    head = model.lm_head
    if how == "env":
        monkeypatch.setenv("KNNLM_PACKED_HEAD", "off")
    else:
        mine = head.forward
        head.forward = mine  # e.g. accelerate's hook
    with cpu.packed_output_layer(model) as used:
        assert not used
    assert head not in fresh_cache._PACKED
    if how == "replaced":
        assert head.__dict__["forward"] is mine  # left in place


def test_drafting_verifies_through_the_packed_layer(fresh_cache, tiny_store, tiny_tokenizer):
    """``KNNLM.generate(draft_tokens=N)`` on the CPU runs every forward pass through the packed
    output layer, the few-row linear layers (where they run here) and grouped attention and gives
    plain kNN-LM greedy's tokens; plain kNN-LM generation leaves them all as they are."""
    model, ds = tiny_store
    head = model.get_output_embeddings()
    knn = KNNLM(model, ds, tiny_tokenizer, k=32, lam=0.9)
    calls = []  # (rows, packed) of each call of the output layer
    switch = []  # transformers' grouped-attention switch at each forward pass of the model
    hook = head.register_forward_pre_hook(lambda m, args: calls.append((args[0].shape[-2], "forward" in m.__dict__)))
    hook2 = model.register_forward_pre_hook(lambda m, args: switch.append(os.environ.get(cpu._GQA_SWITCH)))
    layer = _decoder_linears(model)[-1]
    small = []  # whether that decoder layer ran swapped, at each call
    hook3 = layer.register_forward_pre_hook(lambda m, args: small.append("forward" in m.__dict__))
    try:
        text = open(corpus_paths()[0], encoding="utf-8").read()
        ids = tiny_tokenizer(text[400:560], return_tensors="pt")["input_ids"]
        kw = dict(max_new_tokens=24, pad_token_id=0)
        plain = knn.generate(ids, return_dict_in_generate=True, output_scores=True, **kw)
        assert calls and not any(packed for _, packed in calls) and not any(switch) and not any(small)
        calls.clear()
        switch.clear()
        small.clear()
        proc = KNNLogitsProcessor(knn)
        got = knn.generate(ids, processor=proc, draft_tokens=6, **kw)
    finally:
        hook.remove()
        hook2.remove()
        hook3.remove()
    assert "forward" not in head.__dict__ and "forward" not in layer.__dict__
    assert head in fresh_cache._PACKED and cpu._GQA_SWITCH not in os.environ
    on = "1" if cpu._transformers_reads_gqa_switch() else None  # the model has grouped heads
    assert switch and all(s == on for s in switch)  # every pass took them as they are, where transformers can
    assert len(calls) == draft_summary(proc)["forwards"] and all(packed for _, packed in calls)
    assert len(small) == len(calls) and all(s == (cpu._small_linear_op() is not None) for s in small)
    assert draft_summary(proc)["accepted"] > 0 and max(rows for rows, _ in calls[1:]) > 1  # drafts were verified
    assert_greedy_up_to_ties(plain, got, ids.shape[1])


NEEDS_SMALL_LINEAR = pytest.mark.skipif(cpu._small_linear_op() is None,
                                        reason="knnlm.small_linear does not run here (no AVX-512, or not built)")


def _decoder_linears(model) -> list[torch.nn.Linear]:
    head = model.get_output_embeddings()
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]


@NEEDS_SMALL_LINEAR
def test_small_linears_give_the_linear_values_inside_their_block_only(fresh_cache):
    model = _model()
    layers = _decoder_linears(model)
    mlp = model.model.layers[0].mlp.down_proj  # 96 -> 48
    with torch.no_grad():
        with cpu.small_linears(model) as used:
            assert used == len(layers) == 7 and "forward" not in model.lm_head.__dict__
            assert all("forward" in m.__dict__ for m in layers)
            for batch, rows in ((1, 1), (1, 3), (1, 4), (2, 3), (1, 17), (2, 16), (1, 33)):
                x = torch.randn(batch, rows, 96)
                got, want = mlp(x), F.linear(x, mlp.weight)
                assert got.shape == want.shape == (batch, rows, 48)
                if cpu.SMALL_MIN_ROWS <= batch * rows <= cpu.SMALL_MAX_ROWS:
                    assert torch.equal(got, torch.ops.knnlm.small_linear(x.reshape(-1, 96), mlp.weight, None)
                                       .reshape(batch, rows, 48))
                else:
                    assert torch.equal(got, want)  # F.linear itself
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            x = torch.randn(1, 5, 48, requires_grad=True)
            with torch.enable_grad():
                assert layers[0](x).requires_grad  # autograd records: F.linear, with its gradient
        assert not any("forward" in m.__dict__ for m in layers)  # each module's own forward again
        ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(0))

        def verify():  # a prefix through the cache, then 6 positions at once (a verification pass)
            cache = transformers.DynamicCache()
            model(ids[:, :10], past_key_values=cache, use_cache=True)
            return model(ids[:, 10:], past_key_values=cache, use_cache=True).logits

        want = verify()
        with cpu.verification(model):
            got = verify()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["off", "disabled", "capability", "bfloat16", "replaced"])
def test_small_linears_stand_aside(fresh_cache, monkeypatch, how):
    model = _model()
    layers = _decoder_linears(model)
    if how == "off":
        monkeypatch.setenv("KNNLM_SMALL_LINEAR", "off")
    elif how == "disabled":  # the csrc ops turned off
        monkeypatch.setenv("KNNLM_DISABLE_KERNEL", "1")
    elif how == "capability":  # torch sees no AVX-512 (e.g. ATEN_CPU_CAPABILITY=avx2)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    elif how == "bfloat16":
        model.to(torch.bfloat16)
    else:
        mine = layers[0].forward
        layers[0].forward = mine  # e.g. accelerate's hook
    with cpu.small_linears(model) as used:
        if how == "replaced" and cpu._small_linear_op() is not None:
            assert used == len(layers) - 1 and layers[0].__dict__["forward"] is mine  # left in place
        else:
            assert not used and not any("forward" in m.__dict__ for m in layers[1:])
    if how == "replaced":
        assert layers[0].__dict__["forward"] is mine


def _repeats(monkeypatch) -> list:
    """Counts transformers' copies of the K / V heads (``repeat_kv`` of its SDPA attention)."""
    from transformers.integrations import sdpa_attention

    calls, repeat = [], sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda x, n: calls.append(n) or repeat(x, n))
    return calls


@pytest.mark.skipif(not cpu._transformers_reads_gqa_switch(),
                    reason="this transformers has no switch for grouped heads in SDPA attention")
@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # gemma3: sliding-window layers too
def test_grouped_attention_takes_the_heads_as_they_are_inside_its_block_only(fresh_cache, monkeypatch, arch):
    """A pass over several positions after a KV cache: inside the block no K / V head is copied
    and the logits are those of the copying path; outside, transformers copies them again."""
    model = _model() if arch == "llama" else make_tiny_model(arch, vocab_size=300, sliding_window=8).eval()
    copies = _repeats(monkeypatch)
    ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(0))

    def verify():  # a prefix through the cache, then 5 positions at once (a verification pass)
        cache = transformers.DynamicCache()
        model(ids[:, :11], past_key_values=cache, use_cache=True)
        return model(ids[:, 11:], past_key_values=cache, use_cache=True).logits

    with torch.no_grad():
        want = verify()
        assert copies  # transformers copies the heads for a masked several-position pass
        copies.clear()
        with cpu.grouped_attention(model) as used:
            assert used and os.environ[cpu._GQA_SWITCH] == "1"
            got = verify()
        assert not copies and cpu._GQA_SWITCH not in os.environ
        verify()
        assert copies
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["off", "preset", "one_kv_per_head", "eager"])
def test_grouped_attention_stands_aside(fresh_cache, monkeypatch, how):
    model = _model()
    if how == "off":
        monkeypatch.setenv("KNNLM_GROUPED_ATTENTION", "off")
    elif how == "preset":  # the caller's own setting is theirs
        monkeypatch.setenv(cpu._GQA_SWITCH, "0")
    elif how == "one_kv_per_head":
        cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=4)
        model = transformers.LlamaForCausalLM(cfg).eval()
    else:
        model.set_attn_implementation("eager")
    with cpu.grouped_attention(model) as used:
        assert not used
        assert os.environ.get(cpu._GQA_SWITCH) == ("0" if how == "preset" else None)
    assert os.environ.get(cpu._GQA_SWITCH) == ("0" if how == "preset" else None)


@pytest.mark.parametrize("shape", [(49152,), (3, 1000), (2, 4, 300)])
def test_row_argmax_is_torchs_argmax(shape):
    """The first maximum of each row, the first NaN where there is one, on any layout."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    flat = x.reshape(-1, shape[-1])
    flat[0, 5] = flat[0, 9] = 100.0  # a tie: the first wins
    if flat.shape[0] > 1:
        flat[1, 7] = flat[1, 3] = math.nan  # NaN: the first NaN
    for t in (x, x[..., ::2], x.double()):
        got = cpu.row_argmax(t)
        assert got.dtype == torch.int64 and torch.equal(got, t.argmax(-1))
    assert torch.equal(cpu.row_argmax(x.half()), x.half().argmax(-1))  # other dtypes: torch's own
