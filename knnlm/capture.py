"""Which hidden state is the kNN key, and capturing it with a forward pre-hook.

The key is the input of the last decoder layer's feed-forward block, i.e. the output of that
layer's pre-FFN norm (Khandelwal et al., 2020). ``find_key_module`` locates the block for common
architectures (Llama / SmolLM2 / Mistral / Qwen, GPT-2, Gemma / Gemma-3, GPT-NeoX / Pythia, OPT,
Falcon, Phi, ...) and ``capture_keys`` records its input inside a ``with`` block. Nothing is
patched: the hook is removed when the block exits, even on error.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from knnlm.config import is_int
from knnlm.errors import KeyLayerError

logger = logging.getLogger(__name__)

__all__ = ["KeyLayerError", "find_key_module", "capture_keys", "Capture"]

# Child names of a decoder block that hold its feed-forward network, most specific first.
# OPT and some others have no FFN submodule: their first FFN linear ("fc1") takes the normed input.
_FFN_NAMES = ("mlp", "feed_forward", "ffn", "fc1", "c_fc")


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder blocks: the longest ModuleList of same-class modules."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            if len({type(m) for m in mod}) != 1:
                continue
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise KeyLayerError(
            f"could not find the decoder layers of {type(model).__name__}; "
            "pass `layer` with the module path of the last feed-forward block (e.g. model.layers.29.mlp)",
            param="layer")
    return best


def find_key_module(model: nn.Module, layer: str | None = None) -> str:
    """Module path whose *input* is the kNN key. ``layer`` overrides detection.

    ``layer`` may be a full module path (``model.layers.29.mlp``) or an integer index of the
    decoder layer (``-1``, ``12``), in which case that layer's FFN block is used.
    """
    modules = dict(model.named_modules())
    if layer is not None and not is_int(layer):
        if layer not in modules:
            hint = [n for n in modules if n.endswith(layer.split(".")[-1])][-3:]
            raise KeyLayerError(
                f"`layer` {layer!r} is not a module of {type(model).__name__}"
                + (f"; similar: {', '.join(hint)}" if hint else "; list modules with print(model)"), param="layer")
        return layer
    stack_name, stack = _decoder_layers(model)
    idx = int(layer) if layer is not None else -1
    if not -len(stack) <= idx < len(stack):
        raise KeyLayerError(
            f"`layer` {idx} is out of range: {type(model).__name__} has {len(stack)} decoder layers", param="layer")
    idx %= len(stack)
    block = stack[idx]
    for child in _FFN_NAMES:
        if isinstance(getattr(block, child, None), nn.Module):
            return f"{stack_name}.{idx}.{child}"
    raise KeyLayerError(
        f"could not find the feed-forward block of {type(block).__name__} in "
        f"{type(model).__name__}; pass `layer` with its module path, one of: "
        + ", ".join(f"{stack_name}.{idx}.{n}" for n, _ in block.named_children()), param="layer")




class _StopForward(Exception):
    """Raised by a ``stop_after`` hook to skip the layers after the key module."""


@dataclass
class Capture:
    """Holds the most recent key tensor seen by the hook: (B, T, D), detached."""
    module_path: str
    model: nn.Module = field(repr=False)
    stop_after: bool = False
    keys: torch.Tensor | None = field(default=None, repr=False)
    head_input: torch.Tensor | None = field(default=None, repr=False)  # (B, T, H) with stop_before_head
    stop_before_head: bool = False  # may be switched off for a full forward (logits) inside the block

    def run(self, input_ids: torch.Tensor) -> None:
        """The model's forward on ``input_ids`` (B, T), up to where the hooks stop it."""
        try:
            self.model(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass

    def apply_head(self, x: torch.Tensor) -> torch.Tensor:
        """The LM head on ``x`` (..., H) -> (..., V), its stop hook held off meanwhile."""
        stop, self.stop_before_head = self.stop_before_head, False
        try:
            return self.model.get_output_embeddings()(x)
        finally:
            self.stop_before_head = stop

    def pop_head_input(self) -> torch.Tensor:
        """What the LM head would have received, (B, T, H) (``stop_before_head``)."""
        if self.head_input is None:
            raise RuntimeError("no LM-head input was captured; use capture_keys(..., stop_before_head=True)")
        out, self.head_input = self.head_input, None
        return out

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's whole forward on ``input_ids`` (B, T): logits (B, T, V) and keys (B, T, D)
        (the harness; eval when the LM head cannot be applied alone)."""
        stop, self.stop_before_head = self.stop_before_head, False
        try:
            logits = self.model(input_ids=input_ids, use_cache=False).logits
        finally:
            self.stop_before_head = stop
        return logits, self.pop()

    def keys_of(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the model on ``input_ids`` (B, T) and return the keys (B, T, D).

        With ``stop_after`` the forward pass ends at the key module: nothing after it (the rest
        of the last layer, the final norm, the LM head) is computed.
        """
        self.run(input_ids)
        return self.pop()

    def pop(self) -> torch.Tensor:
        if self.keys is None:
            raise RuntimeError(f"no hidden state was captured at {self.module_path}; "
                               "did the forward pass run inside the capture block?")
        out, self.keys = self.keys, None
        return out


@contextlib.contextmanager
def capture_keys(model: nn.Module, layer: str | None = None, *, stop_after: bool = False,
                 stop_before_head: bool = False):
    """``with capture_keys(model) as cap: model(ids); keys = cap.pop()  # (B, T, D)``.

    Registers a forward pre-hook on the key module for the duration of the block. With
    ``stop_after=True`` the hook also aborts the forward pass right after capturing (use
    ``cap.keys_of(ids)``), which is all the datastore builder needs. With ``stop_before_head``
    the forward pass runs to the LM head (``model.get_output_embeddings()``), records its input
    and stops there (``cap.run(ids)``, then ``cap.pop()`` and ``cap.pop_head_input()``): no
    (B, T, V) logits are computed; the caller applies the head to the positions it needs.
    """
    path = find_key_module(model, layer)
    module = model.get_submodule(path)
    cap = Capture(path, model, stop_after)
    batch_shape: list[torch.Size] = []  # (B, T) of the current forward call

    def model_hook(_mod, args, kwargs):
        x = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
        if x is not None:
            batch_shape[:] = [x.shape[:2]]

    head = model.get_output_embeddings() if stop_before_head else None
    if stop_before_head and head is None:
        raise KeyLayerError(f"{type(model).__name__} has no output embeddings (LM head) to stop before")

    def model_input(args, kwargs) -> torch.Tensor:
        """A hooked module's input, detached, as (B, T, D)."""
        x = args[0] if args else next(iter(kwargs.values()))
        if x.dim() == 2 and batch_shape and x.shape[0] == batch_shape[0].numel():
            x = x.view(*batch_shape[0], x.shape[-1])  # OPT flattens (B, T, D) -> (B*T, D)
        return x.detach()

    def hook(_mod, args, kwargs):
        cap.keys = model_input(args, kwargs)
        if stop_after:
            raise _StopForward

    def head_hook(_mod, args, kwargs):
        if cap.stop_before_head:
            cap.head_input = model_input(args, kwargs)
            raise _StopForward

    handles = [model.register_forward_pre_hook(model_hook, with_kwargs=True),
               module.register_forward_pre_hook(hook, with_kwargs=True)]
    cap.stop_before_head = stop_before_head
    if head is not None:
        handles.append(head.register_forward_pre_hook(head_hook, with_kwargs=True))
    try:
        yield cap
    finally:
        for h in handles:
            h.remove()
