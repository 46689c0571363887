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


def test_bf16_model_on_the_gpu_and_the_cli(stores, tiny_tokenizer, tiny_model_dir, tmp_path, capsys):
    """`--device auto` means CUDA in bf16: the model in bf16 on the GPU scores the fp32-built
    datastore within bf16 rounding of the fp32 CPU run, through the library and the CLI."""
    import json

    from knnlm.cli import main

    (m_cpu, ds), _ = stores
    cfg = EvalConfig(lambdas=[0.25], ks=[16], context=32, stride=16, batch_size=4, progress=False)
    ref = evaluate(m_cpu, tiny_tokenizer, ds, texts=_texts(), cfg=cfg)
    m_bf16 = make_tiny_model("llama").to("cuda", torch.bfloat16)
    got = evaluate(m_bf16, tiny_tokenizer, ds, texts=_texts(), cfg=cfg)
    assert got["tokens"] == ref["tokens"]
    assert got["ppl_base"] == pytest.approx(ref["ppl_base"], rel=0.02)
    assert got["ppl_knn"] == pytest.approx(ref["ppl_knn"], rel=0.02)
    knn = KNNLM(m_bf16, ds, tokenizer=tiny_tokenizer, lam=0.5, k=16)
    prompt = tiny_tokenizer(_texts()[0][:200], return_tensors="pt")["input_ids"].cuda()
    assert knn.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0).shape[1] == prompt.shape[1] + 8

    text = tmp_path / "heldout.py"
    text.write_text("\n".join(_texts()))
    res = {}
    for device, dtype in (("cpu", "float32"), ("auto", "auto")):
        out = tmp_path / f"{device}.json"
        code = main(["eval", "--model", str(tiny_model_dir), "--datastore", str(ds.path), "--data", str(text),
                     "--device", device, "--dtype", dtype, "--lambda", "0.25", "--k", "16", "--quiet",
                     "--output", str(out)])
        assert code == 0, capsys.readouterr().err
        res[device] = json.loads(out.read_text())
    assert res["auto"]["tokens"] == res["cpu"]["tokens"] > 300
    assert res["auto"]["ppl_knn"] == pytest.approx(res["cpu"]["ppl_knn"], rel=0.02)
    assert res["auto"]["ppl_knn"] != res["cpu"]["ppl_knn"]  # it did run elsewhere (bf16 on the GPU)


def test_keep_unseen_on_the_gpu_equals_the_cpu(stores, tiny_tokenizer):
    """The keep-unseen mixture (torch reference, no fused op) on the GPU: eval and full rows."""
    (m_cpu, ds), (m_gpu, _) = stores
    cfg = EvalConfig(lambdas=[0.25, 0.6], ks=[16], context=32, stride=16, batch_size=4, progress=False,
                     keep_unseen=True)
    ref = evaluate(m_cpu, tiny_tokenizer, ds, texts=_texts(), cfg=cfg)
    got = evaluate(m_gpu, tiny_tokenizer, ds, texts=_texts(), cfg=cfg)
    assert got["keep_unseen"] is ref["keep_unseen"] is True
    for g, r in zip(got["grid"], ref["grid"]):
        assert g["ppl"] == pytest.approx(r["ppl"], rel=1e-4), (g, r)
    ids = torch.tensor([tiny_tokenizer(_texts()[1])["input_ids"][:48]])
    outs = []
    for model in (m_cpu, m_gpu):
        knn = KNNLM(model, ds, tokenizer=tiny_tokenizer, lam=0.4, temperature=2.0, k=16, keep_unseen=True)
        with torch.no_grad(), capture_keys(model, knn.key_layer) as cap:
            logits = model(input_ids=ids.to(model.device), use_cache=False).logits[0]  # (T, V)
            outs.append(knn.log_probs(logits, cap.pop()[0]).cpu())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs[1].logsumexp(-1), torch.zeros(outs[1].shape[0]), rtol=0, atol=1e-4)
