"""The whole kNN-LM path with the model on a CUDA GPU, against the same path on the CPU.

Build (keys captured on the GPU), evaluation (the fused CUDA op and its torch reference), the
per-token mixture and greedy generation each run with the tiny Llama on ``cuda`` and on ``cpu``
(same weights) and must agree. The FAISS index stays on the CPU here (faiss-cpu); the GPU index
path needs faiss-gpu. Skipped with a reason when no GPU is present.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from knnlm import KNNLM, EvalConfig, evaluate
from knnlm.capture import capture_keys
from knnlm.corpora import stdlib_root
from knnlm.testing import build_tiny_store, make_tiny_model

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none present)")]


def _texts() -> list[str]:
    return [(stdlib_root() / "heapq.py").read_text()[600:1400], (stdlib_root() / "shlex.py").read_text()[:600]]


@pytest.fixture(scope="module")
def stores(tiny_tokenizer, tmp_path_factory):
    """(cpu model, its store), (cuda model, its store): same weights, keys captured on each device."""
    root = tmp_path_factory.mktemp("cuda-stores")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 on both devices (the default; made explicit)
    cpu = build_tiny_store(root / "cpu", tiny_tokenizer, make_tiny_model("llama"))
    gpu = build_tiny_store(root / "gpu", tiny_tokenizer, make_tiny_model("llama").to("cuda"))
    return cpu, gpu


def test_keys_captured_on_the_gpu_equal_the_cpu_ones(stores):
    (_, ds_cpu), (_, ds_gpu) = stores
    assert ds_gpu.header.model.weights_fingerprint == ds_cpu.header.model.weights_fingerprint
    np.testing.assert_array_equal(np.asarray(ds_gpu.values), np.asarray(ds_cpu.values))
    kc, kg = np.asarray(ds_cpu.keys, dtype=np.float32), np.asarray(ds_gpu.keys, dtype=np.float32)
    assert kc.shape == kg.shape and kc.shape[0] > 1000
    # fp16 storage: equal up to a rounding step of the larger keys
    np.testing.assert_allclose(kg, kc, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("use_kernel", [True, False])
def test_eval_on_the_gpu_equals_the_cpu(stores, tiny_tokenizer, use_kernel, monkeypatch):
    (m_cpu, ds), (m_gpu, _) = stores
    if not use_kernel:
        monkeypatch.setenv("KNNLM_DISABLE_KERNEL", "1")
    cfg = EvalConfig(lambdas=[0.25, 0.6], temperatures=[1.0, 3.0], ks=[16], context=32, stride=16, batch_size=4,
                     progress=False)
    ref = evaluate(m_cpu, tiny_tokenizer, ds, texts=_texts(), cfg=cfg)
    got = evaluate(m_gpu, tiny_tokenizer, ds, texts=_texts(), cfg=cfg)
    assert got["tokens"] == ref["tokens"] > 300
    assert got["ppl_base"] == pytest.approx(ref["ppl_base"], rel=1e-4)
    for g, r in zip(got["grid"], ref["grid"]):
        assert (g["lambda"], g["temperature"], g["k"]) == (r["lambda"], r["temperature"], r["k"])
        assert g["ppl"] == pytest.approx(r["ppl"], rel=1e-4), (g, r)
        assert abs(r["ppl"] / ref["ppl_base"] - 1) > 1e-2  # retrieval changed the result


def test_cuda_kernel_equals_the_reference_in_the_mixture(stores, tiny_tokenizer):
    (_, ds), (m_gpu, _) = stores
    ids = torch.tensor([tiny_tokenizer(_texts()[1])["input_ids"][:48]], device="cuda")
    knn = KNNLM(m_gpu, ds, tokenizer=tiny_tokenizer, lam=0.4, temperature=2.0, k=16)
    with torch.no_grad(), capture_keys(m_gpu, knn.key_layer) as cap:
        logits = m_gpu(input_ids=ids, use_cache=False).logits[0]  # (T, V)
        hidden = cap.pop()[0]  # (T, D)
    fused = knn.log_probs(logits, hidden)
    ref = knn.replace(use_kernel=False).log_probs(logits, hidden)
    assert fused.device.type == "cuda" and fused.shape == logits.shape
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-4)
    assert (fused - torch.log_softmax(logits.float(), -1)).abs().max() > 1e-2  # retrieval changed it


def test_greedy_generation_on_the_gpu_equals_the_cpu(stores, tiny_tokenizer):
    (m_cpu, ds), (m_gpu, _) = stores
    prompt = tiny_tokenizer(_texts()[0][:200], return_tensors="pt")["input_ids"]
    outs = []
    for model in (m_cpu, m_gpu):
        knn = KNNLM(model, ds, tokenizer=tiny_tokenizer, lam=0.5, temperature=2.0, k=16)
        out = knn.generate(prompt.to(model.device), max_new_tokens=24, do_sample=False,
                           pad_token_id=tiny_tokenizer.pad_token_id or 0)
        outs.append(out.cpu())
    assert outs[1].shape[1] == prompt.shape[1] + 24
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
