"""KNNLM.generate / KNNLogitsProcessor / `knnlm generate` on a tiny random Llama and tiny datastores."""

import numpy as np
import pytest
import torch
from test_knnlm import _brute_neighbours, _dense_mixture, _forward
from transformers.generation.utils import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput

from knnlm import KNNLM, BuildConfig, KNNLogitsProcessor, build_datastore
from knnlm.capture import find_key_module
from knnlm.cli import main
from knnlm.corpora import stdlib_root
from knnlm.errors import GenerateError

from conftest import make_tiny_model

PROMPTS = ["def bisect_left(a, x", "import os\n", "class Point:\n    def __init__(self"]


@pytest.fixture
def store(tiny_store):
    """The tiny model and its flat datastore over a few stdlib files (conftest.tiny_store)."""
    return tiny_store


@pytest.fixture(scope="module")
def one_doc(tmp_path_factory, tiny_tokenizer):
    """A datastore of one document shorter than the window: every key saw the full prefix."""
    model = make_tiny_model("llama")
    d = tmp_path_factory.mktemp("one-doc")
    text = (stdlib_root() / "colorsys.py").read_text()
    doc = d / "doc.py"
    doc.write_text(text[text.index("def rgb_to_hsv"):][:360])
    ds = build_datastore(model, tiny_tokenizer, [str(doc)], d / "ds",
                         BuildConfig(context=256, index="flat", progress=False))
    assert ds.documents[0]["length"] < 256
    return model, ds


def _ids(tok, prompt):
    return tok(prompt, return_tensors="pt")["input_ids"]


@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
def test_lambda_zero_equals_model_generate(store, tiny_tokenizer, mode):
    model, ds = store
    knn = KNNLM(model, ds, tiny_tokenizer, lam=0.0)
    kw = dict(max_new_tokens=12, pad_token_id=0)
    if mode == "sample":
        kw.update(do_sample=True, temperature=0.7, top_k=50, top_p=0.9)
    elif mode == "beam":
        kw.update(num_beams=3, do_sample=False)
    for prompt in PROMPTS:
        ids = _ids(tiny_tokenizer, prompt)
        torch.manual_seed(123)
        ref = model.generate(ids, **kw)
        torch.manual_seed(123)
        got = knn.generate(ids, **kw)
        assert torch.equal(got, ref), (mode, prompt)


def test_lambda_one_memorizes_the_document(one_doc, tiny_tokenizer):
    model, ds = one_doc
    doc = torch.from_numpy(ds.document_tokens(0).astype("int64"))
    n, m = 12, 20
    ids = doc[None, :n]
    base = model.generate(ids, max_new_tokens=m, do_sample=False, pad_token_id=0)[0, n:]
    assert not torch.equal(base, doc[n:n + m])  # the random model alone does not know the text
    knn = KNNLM(model, ds, tiny_tokenizer, lam=1.0, k=1)
    out = knn.generate(ids, max_new_tokens=m, do_sample=False, pad_token_id=0)
    assert out[0, n:].tolist() == doc[n:n + m].tolist()
    # and neighbours point back into the document at the predicted position
    proc = KNNLogitsProcessor(knn, record=3)
    knn.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, processor=proc)
    assert len(proc.records) == 3
    for step, (dists, rows) in enumerate(proc.records):
        (nb,) = knn.neighbours(rows[0], dists[0])
        assert nb["document"].endswith("doc.py") and nb["position"] == n + step
        assert nb["token"] == doc[n + step].item() and nb["distance"] < 1e-3
        assert nb["before"] == tiny_tokenizer.decode(doc[n + step - 12: n + step])
        assert nb["text"] + nb["after"] == tiny_tokenizer.decode(doc[n + step: n + step + 13])


def test_batched_left_padding_equals_unbatched(store, tiny_tokenizer):
    model, ds = store
    knn = KNNLM(model, ds, tiny_tokenizer, lam=0.5, k=16)
    tiny_tokenizer.padding_side = "left"
    batch = tiny_tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    out = knn.generate(**batch, **kw)
    width = batch["input_ids"].shape[1]
    for i, prompt in enumerate(PROMPTS):
        ids = _ids(tiny_tokenizer, prompt)
        single = knn.generate(ids, **kw)[0, ids.shape[1]:]
        assert out[i, width:width + len(single)].tolist() == single.tolist(), prompt
    # the kNN mixture changed something (otherwise this test would not test retrieval)
    assert not torch.equal(out, model.generate(**batch, **kw))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_kv_cache_one_position_per_step(store, tiny_tokenizer, num_beams):
    model, ds = store
    knn = KNNLM(model, ds, tiny_tokenizer, lam=0.5, k=8)
    seen = []
    module = model.get_submodule(find_key_module(model, knn.key_layer))
    h = module.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape[:2])))
    try:
        ids = _ids(tiny_tokenizer, PROMPTS[2])
        proc = KNNLogitsProcessor(knn)
        out = knn.generate(ids, max_new_tokens=8, min_new_tokens=8, num_beams=num_beams, pad_token_id=0,
                           processor=proc)
    finally:
        h.remove()
    assert out.shape[1] == ids.shape[1] + 8
    assert seen[0] == (num_beams, ids.shape[1])  # the prompt once (beams expanded before the prefill)
    assert seen[1:] == [(num_beams, 1)] * (len(seen) - 1)  # then one new position per step
    assert len(seen) == 8
    assert proc.key_lengths == [ids.shape[1]] + [1] * 7


def _reference_greedy(model, ds, prompt_ids, n_new, lam, temp, k):
    """Greedy decoding on the kNN-LM mixture, our own loop: no KV cache (the whole sequence is run
    again at every step), brute-force neighbours of the last position's key, the mixture written
    out in float64 (test_knnlm). Stops after EOS like model.generate. Returns (new tokens,
    per-step log-distributions (V,))."""
    keys = torch.from_numpy(np.asarray(ds.keys, dtype=np.float64))
    values = torch.from_numpy(np.asarray(ds.values, dtype=np.int64))
    eos = model.generation_config.eos_token_id
    seq, steps = list(prompt_ids), []
    for _ in range(n_new):
        logits, hidden = _forward(model, seq)
        dists, rows = _brute_neighbours(hidden[-1:], keys, k)
        logp = _dense_mixture(logits[-1:], dists, values[rows], lam, temp)[0]
        steps.append(logp)
        seq.append(int(torch.argmax(logp)))
        if seq[-1] == eos:
            break
    return seq[len(prompt_ids):], steps


def test_greedy_equals_reference_mixture_step_by_step(store, tiny_tokenizer):
    """The processor's scores are the kNN-LM log-distribution of every step, and greedy picks their
    argmax: both equal our own cache-free loop over brute-force neighbours."""
    model, ds = store
    lam, temp, k, m = 0.5, 2.0, 8, 10
    knn = KNNLM(model, ds, tiny_tokenizer, lam=lam, temperature=temp, k=k)
    changed, n_steps = False, 0
    for prompt in PROMPTS:
        ids = _ids(tiny_tokenizer, prompt)
        res = knn.generate(ids, max_new_tokens=m, do_sample=False, return_dict_in_generate=True,
                           output_scores=True, pad_token_id=0)
        got = res.sequences[0, ids.shape[1]:].tolist()
        ref, ref_steps = _reference_greedy(model, ds, ids[0].tolist(), m, lam, temp, k)
        assert got == ref, prompt
        assert len(res.scores) == len(ref_steps) == len(got)
        for t, (score, logp) in enumerate(zip(res.scores, ref_steps)):
            torch.testing.assert_close(score[0].double(), logp, rtol=1e-5, atol=1e-4, msg=f"{prompt!r} step {t}")
        n_steps += len(got)
        base = model.generate(ids, max_new_tokens=m, do_sample=False, pad_token_id=0)
        changed |= base[0, ids.shape[1]:].tolist() != got
    assert n_steps >= 2 * m
    assert changed  # the datastore changed at least one continuation: retrieval is being tested


def test_return_types_and_scores(store, tiny_tokenizer):
    model, ds = store
    knn = KNNLM(model, ds, tiny_tokenizer, lam=0.25, k=8)
    ids = _ids(tiny_tokenizer, PROMPTS[0])
    res = knn.generate(ids, max_new_tokens=5, return_dict_in_generate=True, output_scores=True, pad_token_id=0)
    assert isinstance(res, GenerateDecoderOnlyOutput) and len(res.scores) == 5
    # the first step's scores are the kNN-LM log-distribution of the prompt (not the LM's)
    _, ref_steps = _reference_greedy(model, ds, ids[0].tolist(), 1, 0.25, 1.0, 8)
    torch.testing.assert_close(res.scores[0][0].double(), ref_steps[0], rtol=1e-5, atol=1e-4)
    res = knn.generate(ids, max_new_tokens=5, num_beams=2, return_dict_in_generate=True, output_scores=True,
                       pad_token_id=0)
    assert isinstance(res, GenerateBeamDecoderOnlyOutput)
    assert res.scores[0].shape == (2, model.config.vocab_size)


def test_beam_search_lambda_one_reproduces_the_document(one_doc, tiny_tokenizer):
    """lambda 1, k 1: each step's distribution is all on the nearest key's next token; from a prefix
    of a datastore document, beam search must continue with the document itself."""
    model, ds = one_doc
    doc = ds.document_tokens(0).astype("int64").tolist()
    knn = KNNLM(model, ds, tiny_tokenizer, lam=1.0, k=1)
    for n in (5, 12):
        m = min(20, len(doc) - n)
        ids = torch.tensor([doc[:n]])
        out = knn.generate(ids, max_new_tokens=m, min_new_tokens=m, num_beams=3, do_sample=False,
                           pad_token_id=0)
        assert out[0, n:].tolist() == doc[n:n + m], n
        base = model.generate(ids, max_new_tokens=m, min_new_tokens=m, num_beams=3, do_sample=False,
                              pad_token_id=0)
        assert base[0, n:].tolist() != doc[n:n + m]  # the random model alone does not


def test_bans_of_earlier_processors_are_kept(one_doc, tiny_tokenizer):
    """suppress_tokens runs before custom processors: a neighbour's vote must not lift the ban."""
    model, ds = one_doc
    doc = ds.document_tokens(0).astype("int64")
    n = 12
    knn = KNNLM(model, ds, tiny_tokenizer, lam=1.0, k=1)
    ids = torch.from_numpy(doc[None, :n])
    out = knn.generate(ids, max_new_tokens=1, suppress_tokens=[int(doc[n])], pad_token_id=0)
    assert out[0, n].item() != doc[n]


def test_unsupported_modes_and_misuse(store, tiny_tokenizer):
    model, ds = store
    knn = KNNLM(model, ds, tiny_tokenizer, lam=0.5, k=4)
    ids = _ids(tiny_tokenizer, PROMPTS[0])
    with pytest.raises(GenerateError, match="prompt-lookup"):
        knn.generate(ids, max_new_tokens=3, prompt_lookup_num_tokens=2)
    with pytest.raises(GenerateError, match="not capturing"):  # a processor outside its `with` block
        model.generate(ids, max_new_tokens=2, logits_processor=[KNNLogitsProcessor(knn)], pad_token_id=0)


def _run(capsys, *argv):
    code = main(list(map(str, argv)))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_generate(capsys, tiny_model_dir, one_doc, tiny_tokenizer):
    _, ds = one_doc
    doc = ds.document_tokens(0)
    prompt = tiny_tokenizer.decode(doc[:12].tolist())
    code, out, err = _run(capsys, "generate", "--model", tiny_model_dir, "--datastore", ds.path, "--prompt", prompt,
                          "--lambda", 1, "--k", 1, "--max-new-tokens", 10, "--show-neighbours", 1)
    assert code == 0, err
    assert tiny_tokenizer.decode(doc[12:22].tolist()) in out
    assert "doc.py" in out and "neighbours" in out
    code, out, err = _run(capsys, "generate", "--model", tiny_model_dir, "--datastore", ds.path, "--prompt", prompt,
                          "--lambda", 0.5, "--do-sample", "--top-p", 0.9, "--temperature", 0.8, "--seed", 3,
                          "--max-new-tokens", 5)
    assert code == 0, err
    assert out.strip()


def test_cli_sampling_is_reproducible_with_seed(capsys, tiny_model_dir, store):
    _, ds = store
    argv = ["generate", "--model", tiny_model_dir, "--datastore", ds.path, "--prompt", PROMPTS[2], "--lambda", 0.5,
            "--k", 16, "--do-sample", "--temperature", 1.5, "--max-new-tokens", 12, "--seed"]
    outs = []
    for seed in (7, 7, 8):
        code, out, err = _run(capsys, *argv, seed)
        assert code == 0, err
        assert out.strip()
        outs.append(out)
    assert outs[0] == outs[1]  # same --seed, same text (different seeds usually differ: not asserted)


@pytest.mark.parametrize("bad,names", [(["--lambda", "1.5"], ["--lambda", "1.5"]),
                                       (["--top-p", "0.9"], ["--top-p", "--do-sample"]),
                                       (["--k", "100000"], ["--k", "100000"]),
                                       (["--num-beams", "0"], ["--num-beams", "0"]),
                                       (["--knn-temperature", "0"], ["--knn-temperature"]),
                                       (["--prompt-file", "/nonexistent/prompt.txt"], ["--prompt-file", "prompt.txt"])])
def test_cli_generate_one_line_errors(capsys, tiny_model_dir, one_doc, bad, names):
    _, ds = one_doc
    prompt = [] if "--prompt-file" in bad else ["--prompt", "x"]
    code, out, err = _run(capsys, "generate", "--model", tiny_model_dir, "--datastore", ds.path, *prompt, *bad)
    assert code == 2
    assert err.count("\n") == 1 and err.endswith("\n") and err.startswith("knnlm generate: error:"), err
    for name in names:
        assert name in err, (name, err)
