"""What torch's and transformers' default CPU paths do slowly, for the shapes a decoding step has.

**The output layer of a speculative verification pass.** A verification forward pass
(``draft_tokens``) multiplies a few rows -- the last token and the draft -- by the output layer's
(V, D) weight. On the CPU in float32, ``F.linear`` (MKL) costs 1.8 to 4 times the one-row product at
4 to 14 rows (SmolLM2's 49,152 x 576 head), while oneDNN with the weight reordered once into its
blocked layout costs 1.4 to 2.2 times; a 10-to-14-position forward pass of SmolLM2 gets 10-27 %
cheaper (``benchmarks/bench_verify.py``, three runs). ``packed_output_layer(model)`` runs the output
layer that way inside a ``with`` block, for ``PACKED_MIN_ROWS`` rows or more (fewer go to
``F.linear``, as fast or faster there): the same products in another summation order, so the values
differ from ``F.linear``'s by float32 rounding only, as a multi-position pass already does from a
one-position pass. The reordered copy (V x D x 4 bytes: 113 MB for SmolLM2) is made on first use and
kept, for the next call, while the layer lives; an in-place change of the weight makes a new one.
Nothing changes (the layer runs as it is) off the CPU, in other dtypes, while autograd records, when
this torch has no oneDNN linear ops, when the layer's ``forward`` is already replaced (e.g.
accelerate's hooks), or with ``KNNLM_PACKED_HEAD=off``.

**The decoder's linear layers in a verification pass.** The same few rows go through every attention
projection and MLP layer; MKL's ``F.linear`` costs SmolLM2's 1536 x 576 layers 1.3 to 2.2 times its
one-row product at 4 to 17 rows, although the weight is read from memory once either way.
``small_linears(model)`` runs them, inside a ``with`` block, for ``SMALL_MIN_ROWS`` to
``SMALL_MAX_ROWS`` rows, through ``torch.ops.knnlm.small_linear`` (``knnlm/csrc/cpu``: each panel of
4 weight rows read once, the next one prefetched, up to 6 x 4 AVX-512 accumulators; 0.84 to 1.7
times F.linear's one-row cost there): alone it makes a 4-to-17-position forward pass of SmolLM2
7-27 % cheaper, and with the other two below such a pass costs 0.61-0.91 times the pass as it is,
1.07-1.74 times a one-position pass (``benchmarks/bench_verify.py``, two runs of 11 rounds). The
values differ from ``F.linear``'s by float32 rounding only, and each row's are the same whatever the
number of rows or threads. No extra memory: the layer's own weight is read. Nothing changes (the
layers run as they are) off the CPU, on CPUs without AVX-512 (as torch sees them:
``ATEN_CPU_CAPABILITY`` lowers it), in other dtypes, while autograd records, when the ``csrc`` ops
are not built (``knnlm.ops``; ``KNNLM_DISABLE_KERNEL``), for a layer whose ``forward`` is already
replaced, or with ``KNNLM_SMALL_LINEAR=off``. The output layer is left to ``packed_output_layer``.

**The key / value heads of grouped-query attention in a verification pass.** transformers' SDPA
attention copies a grouped-query model's K / V heads ``num_key_value_groups`` times per layer for a
pass over several positions with a mask (one position takes another path), although torch's CPU
SDPA takes them grouped (``enable_gqa``): per layer the copy costs SmolLM2 ~60 us, and a 4-to-10-
position forward pass gets 3-7 % cheaper without it, with the same logits bit for bit (the same
kernel on the same heads). ``grouped_attention(model)`` turns on transformers' own switch for it,
the ``TRANSFORMERS_SDPA_FORCE_GQA`` environment variable, inside a ``with`` block; it stands aside
off the CPU (CUDA's fast kernels take no mask with ``enable_gqa``), for other attention
implementations and models without grouped heads, when the variable is already set, when this
transformers does not read it, or with ``KNNLM_GROUPED_ATTENTION=off``. The variable is
process-wide: another thread's CPU attention takes the same path meanwhile.

**The argmax of a row of logits.** torch's CPU ``argmax`` / ``max(dim)`` over 49,152 floats take
70-120 us (not vectorised in this build), numpy's 7 us; a kNN-LM step takes two (the gate's LM
features, greedy verification). ``row_argmax`` is numpy's on a CPU tensor, torch's elsewhere: the
same index (the first maximum; the first NaN where there is one).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import weakref

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["available", "grouped_attention", "packed_output_layer", "row_argmax", "small_linears", "verification"]

PACKED_MIN_ROWS = 4  # below this, F.linear is as fast or faster (bench_verify: 1-3 rows 0.8-1.3x the packed product)
# output layer -> ((weight data_ptr, weight version), the weight in oneDNN's layout)
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def available() -> bool:
    """This torch has oneDNN and the linear ops its compiler uses for prepacked weights."""
    try:
        return bool(torch.backends.mkldnn.is_available()) and all(
            hasattr(torch.ops.mkldnn, op) for op in ("_reorder_linear_weight", "_linear_pointwise"))
    except (AttributeError, RuntimeError):
        return False


def _enabled(switch: str) -> bool:
    return os.environ.get(switch, "").strip().lower() not in ("off", "0", "false", "no")


def _packed(head: torch.nn.Linear) -> torch.Tensor:
    w = head.weight
    key = (w.data_ptr(), w._version)
    hit = _PACKED.get(head)
    if hit is not None and hit[0] == key:
        return hit[1]
    packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
    _PACKED[head] = (key, packed)
    return packed


def _output_layer(model: torch.nn.Module):
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _float32_cpu_linear(layer) -> bool:
    """A float32 ``nn.Linear`` on the CPU whose ``forward`` is its own (not replaced, e.g. by
    accelerate's hooks): the layers the blocks below may run another way."""
    return (isinstance(layer, torch.nn.Linear) and layer.weight.device.type == "cpu"
            and layer.weight.dtype == torch.float32 and "forward" not in layer.__dict__)


def _as_is(x: torch.Tensor, min_rows: int, max_rows: int | None = None) -> bool:
    """Whether a replaced forward hands ``x`` (..., K) to the layer's own: other dtypes or devices,
    autograd recording, or a row count outside [min_rows, max_rows]."""
    rows = x.numel() // max(x.shape[-1], 1)
    return (x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled()
            or rows < min_rows or (max_rows is not None and rows > max_rows))


@contextlib.contextmanager
def _forwards(replaced: dict):
    """Each module's ``forward`` replaced by ``replaced[module]`` (an instance attribute over the
    method) inside the block; afterwards the module's own again, unless someone replaced it meanwhile."""
    for module, forward in replaced.items():
        module.forward = forward
    try:
        yield
    finally:
        for module, forward in replaced.items():
            if module.__dict__.get("forward") is forward:
                del module.forward


@contextlib.contextmanager
def packed_output_layer(model: torch.nn.Module):
    """Inside the block, ``model``'s output layer multiplies with oneDNN and a prepacked weight
    (where it can: see the module's docstring); yields whether it does."""
    head = _output_layer(model)
    if not (_float32_cpu_linear(head) and _enabled("KNNLM_PACKED_HEAD") and available()):
        yield False
        return
    try:
        packed = _packed(head)
    except RuntimeError as e:  # a oneDNN build that cannot reorder this weight: the layer runs as it is
        logger.debug("output layer not packed for oneDNN: %s", e)
        yield False
        return
    bias = None if head.bias is None else head.bias.detach()
    linear = head.forward

    def forward(x: torch.Tensor) -> torch.Tensor:  # (B, P, D) -> (B, P, V)
        if _as_is(x, PACKED_MIN_ROWS):
            return linear(x)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")

    with _forwards({head: forward}):
        yield True


SMALL_MIN_ROWS, SMALL_MAX_ROWS = 4, 32  # bench_verify: passes gain nothing below 4 rows; MKL catches up by 48


def _small_linear_op():
    """``torch.ops.knnlm.small_linear`` where it runs here (built, AVX-512 as torch sees this CPU),
    else None."""
    try:
        if torch.backends.cpu.get_cpu_capability() != "AVX512":
            return None
    except (AttributeError, RuntimeError):
        return None
    from knnlm import ops

    return ops.get_op("small_linear", "cpu")


@contextlib.contextmanager
def small_linears(model: torch.nn.Module):
    """Inside the block, ``model``'s linear layers other than the output layer multiply a few rows
    with ``torch.ops.knnlm.small_linear`` (where they can: see the module's docstring); yields how
    many layers do."""
    head = _output_layer(model)
    layers = [m for m in model.modules() if m is not head and _float32_cpu_linear(m)
              and (m.bias is None or m.bias.dtype == torch.float32)]
    op = _small_linear_op() if layers and _enabled("KNNLM_SMALL_LINEAR") else None
    if op is None:
        yield 0
        return

    def small(layer: torch.nn.Linear):
        linear, weight = layer.forward, layer.weight.detach()
        bias = None if layer.bias is None else layer.bias.detach()

        def forward(x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
            if _as_is(x, SMALL_MIN_ROWS, SMALL_MAX_ROWS):
                return linear(x)
            return op(x.reshape(-1, x.shape[-1]), weight, bias).reshape(*x.shape[:-1], weight.shape[0])

        return forward

    with _forwards({layer: small(layer) for layer in layers}):
        yield len(layers)


_GQA_SWITCH = "TRANSFORMERS_SDPA_FORCE_GQA"  # transformers' own (integrations/sdpa_attention.py)


@functools.lru_cache(maxsize=1)
def _transformers_reads_gqa_switch() -> bool:
    try:
        from transformers.integrations import sdpa_attention

        return _GQA_SWITCH in inspect.getsource(sdpa_attention.use_gqa_in_sdpa)
    except (ImportError, AttributeError, OSError, TypeError):
        return False


@contextlib.contextmanager
def grouped_attention(model: torch.nn.Module):
    """Inside the block, transformers' SDPA attention takes ``model``'s grouped key / value heads
    as they are in passes over several positions (where it can: see the module's docstring);
    yields whether it does."""
    cfg = getattr(model, "config", None)
    heads, kv = getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_key_value_heads", None)
    param = next(model.parameters(), None)
    if not (isinstance(heads, int) and isinstance(kv, int) and 0 < kv < heads
            and getattr(cfg, "_attn_implementation", None) == "sdpa"
            and param is not None and param.device.type == "cpu"
            and _GQA_SWITCH not in os.environ and _enabled("KNNLM_GROUPED_ATTENTION")
            and _transformers_reads_gqa_switch()):
        yield False
        return
    os.environ[_GQA_SWITCH] = "1"
    try:
        yield True
    finally:
        os.environ.pop(_GQA_SWITCH, None)


@contextlib.contextmanager
def verification(model: torch.nn.Module):
    """All three of the above inside the block: what a speculative verification pass runs on the
    CPU (each stands aside where it cannot apply)."""
    with packed_output_layer(model), small_linears(model), grouped_attention(model):
        yield


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """x (..., V) -> (...) int64: the index of each row's first maximum (of its first NaN, if any),
    as ``x.argmax(-1)``."""
    if x.device.type != "cpu" or x.requires_grad or x.dtype not in (torch.float32, torch.float64):
        return x.argmax(-1)
    return torch.from_numpy(np.asarray(x.numpy().argmax(-1), dtype=np.int64))
