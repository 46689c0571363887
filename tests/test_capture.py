import pytest
import torch

from knnlm.capture import KeyLayerError, capture_keys, find_key_module

from conftest import ARCHS, make_tiny_model


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_key_is_the_normed_input_of_the_last_ffn(arch):
    """The captured key equals the output of the last layer's pre-FFN norm (per-architecture
    knowledge lives in ARCHS, independently of the detection code)."""
    model = make_tiny_model(arch)
    norm_path = ARCHS[arch][3]
    seen = {}
    handle = model.get_submodule(norm_path).register_forward_hook(lambda m, a, out: seen.update(out=out))
    ids = torch.randint(3, 300, (2, 11))
    try:
        with torch.inference_mode(), capture_keys(model) as cap:
            out = model(input_ids=ids, output_hidden_states=True)
            keys = cap.pop()
    finally:
        handle.remove()
    assert keys.shape == (2, 11, model.config.hidden_size)
    d = keys.shape[-1]
    torch.testing.assert_close(keys.reshape(-1, d), seen["out"].reshape(-1, d), rtol=0, atol=0)
    # and it is not simply a hidden state HF already exposes (the key sits inside the last layer)
    assert not torch.allclose(keys, out.hidden_states[-2], atol=1e-3)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_stop_after_gives_the_same_keys_and_removes_the_hook(arch):
    model = make_tiny_model(arch)
    ids = torch.randint(3, 300, (1, 9))
    with torch.inference_mode():
        with capture_keys(model) as cap:
            model(input_ids=ids)
            full = cap.pop()
        with capture_keys(model, stop_after=True) as cap:
            early = cap.keys_of(ids)
        torch.testing.assert_close(early, full, rtol=0, atol=0)
        path = find_key_module(model)
        assert not model.get_submodule(path)._forward_pre_hooks and not model._forward_pre_hooks
        model(input_ids=ids)  # runs normally again: nothing left patched


def test_layer_override_by_index_and_path():
    model = make_tiny_model("llama")
    assert find_key_module(model, "0") == "model.layers.0.mlp"
    assert find_key_module(model, "-1") == "model.layers.1.mlp"
    assert find_key_module(model, "model.layers.0.mlp.down_proj") == "model.layers.0.mlp.down_proj"


@pytest.mark.parametrize("layer, match", [("7", "out of range"), ("model.layers.9.mlp", "not a module")])
def test_bad_layer_is_a_clear_error(layer, match):
    with pytest.raises(KeyLayerError, match=match):
        find_key_module(make_tiny_model("llama"), layer)


def test_detection_failure_names_the_model_class():
    class NoLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(KeyLayerError, match="NoLayers.*`layer`"):
        find_key_module(NoLayers())
