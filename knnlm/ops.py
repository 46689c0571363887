"""Loading the ``csrc`` ops: the fused kNN-LM interpolation and the few-row linear layer.

The ops are a C++ (and, with a CUDA build of torch, CUDA) extension JIT-compiled with
``torch.utils.cpp_extension.load`` (ninja) the first time it is asked for, once per process and
thread-safely. It registers ``torch.ops.knnlm.knn_interpolate`` and, CPU only,
``torch.ops.knnlm.small_linear`` (schemas in ``knnlm/csrc/knnlm.cpp``; ``knnlm.cpu`` says where the
latter is used); this module adds their fake kernels for ``torch.compile`` / ``opcheck``.

Sources: ``knnlm/csrc/`` is package data, so a wheel or a non-editable ``pip install .`` carries
the sources and builds the op on first use exactly like a source checkout (``csrc_dir()``). The
JIT build (rather than an ahead-of-time ``CppExtension`` in setup.py) keeps the wheel pure-Python
and independent of the torch / CUDA version it is installed next to: the op is compiled against
the torch actually imported, CPU-only or CUDA, with the host CPU's vector ISA.

Build cache: ``$TORCH_EXTENSIONS_DIR`` when set, else ``$XDG_CACHE_HOME/knnlm/ext`` (default
``~/.cache/knnlm/ext``), one sub-directory per torch version / build flavour / hash of the
checkout's csrc path, sources and flags (two checkouts never share a build). Builds in one
directory are serialised by an ``flock`` that the kernel releases when its holder dies, so a torch
``lock`` file left by a process that died while compiling is removed instead of waited on forever
(``_build_lock``). A cold build takes about a minute on a small CPU.

``get_op(name, device)`` returns the op for ``device`` or ``None``; ``knnlm.scoring`` then uses
its torch reference. When the extension cannot be built (no compiler, sources missing, build
error) one warning says why and the reference is used. Environment:

* ``KNNLM_DISABLE_KERNEL=1`` turns the op off without a warning (it wins over the next one).
* ``KNNLM_REQUIRE_KERNEL=1`` makes a missing op an error instead: ``load_extension`` / ``get_op``
  raise ``RuntimeError`` with the build failure (CI sets it, so that a C++ compile error cannot
  pass as a silent fallback), also when a CUDA tensor finds no CUDA kernel in the build.
* ``KNNLM_CUDA_CHECKS=1`` (read by the CUDA binding on every call): host-side range checks of the
  token ids that raise like the CPU kernel. Off by default because they synchronise with the host
  (two ``.item()`` per tensor, and no CUDA-graph capture); without them the CUDA kernels check
  in-kernel and write NaN for a row with an id outside ``[0, V)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch

__all__ = ["OP_NAMES", "csrc_dir", "get_op", "kernel_required", "load_extension", "unavailable_reason"]

logger = logging.getLogger(__name__)

OP_NAMES = ("knn_interpolate", "small_linear")

_lock = threading.Lock()
_tried = False
_loaded = False
_reason: str | None = None  # why the extension is not loaded (None while untried / loaded)
_cuda_reason: str | None = None  # why the loaded extension has no CUDA kernels (None: it has)


def csrc_dir() -> Path:
    """The op's C++/CUDA sources: ``knnlm/csrc/``, package data inside the installed package
    (wheel, ``pip install .``) as in a source checkout."""
    return Path(__file__).resolve().parent / "csrc"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _disabled() -> bool:
    return _env_flag("KNNLM_DISABLE_KERNEL")


def kernel_required() -> bool:
    """``KNNLM_REQUIRE_KERNEL`` is set: a missing op raises instead of falling back."""
    return _env_flag("KNNLM_REQUIRE_KERNEL")


def _cpu_flags() -> list[str]:
    """-O3, OpenMP (at::parallel_for is inline OpenMP; `omp simd` loops) and AVX2/FMA when this
    CPU has them. -fno-trapping-math lets GCC if-convert (hence vectorise) the branch-free selects
    of csrc/interp.h; the op never relies on floating-point exception flags."""
    flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
    if sys.platform.startswith("linux"):
        try:
            info = Path("/proc/cpuinfo").read_text()
        except OSError:
            info = ""
        cpu_flags = set()
        for line in info.splitlines():
            if line.startswith("flags"):
                cpu_flags = set(line.split(":", 1)[1].split())
                break
        if {"avx2", "fma"} <= cpu_flags:
            flags += ["-mavx2", "-mfma"]
    return flags


def _want_cuda() -> tuple[bool, str]:
    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return False, "nvcc not found"
    return True, ""


def _build_root(flavour: str, sources: list[Path], cflags: list[str]) -> Path:
    """A build directory per checkout and source content: two checkouts (or versions) never
    share one, so they neither rebuild each other's op nor wait on each other's build lock."""
    h = hashlib.sha256(" ".join([str(csrc_dir().resolve()), *cflags]).encode())
    for p in sources:
        h.update(p.read_bytes())
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        root = Path(env)
    else:
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = Path(cache) / "knnlm" / "ext"
    version = torch.__version__.replace("+", "_").replace(".", "_")
    path = root / f"torch{version}" / f"{flavour}_{h.hexdigest()[:12]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _register_fakes() -> None:
    def _fake_interpolate(logits, dists, values, lam, temperature):
        torch._check(logits.dim() == 2, lambda: "knnlm: logits must be 2-D [B, V]")
        torch._check(dists.shape == values.shape, lambda: "knnlm: values must have the shape of dists")
        return logits.new_empty(logits.shape, dtype=torch.float32)

    def _fake_small_linear(x, weight, bias):
        torch._check(x.dim() == 2 and weight.dim() == 2, lambda: "knnlm: small_linear takes x [M, K], weight [N, K]")
        torch._check(x.shape[1] == weight.shape[1], lambda: "knnlm: small_linear: x and weight differ in K")
        return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)

    torch.library.register_fake("knnlm::knn_interpolate")(_fake_interpolate)
    torch.library.register_fake("knnlm::small_linear")(_fake_small_linear)


def source_files(*, cuda: bool) -> list[Path]:
    """The translation units the JIT build compiles (the CPU ones, plus the CUDA binding and
    kernels when ``cuda``); headers are found through ``csrc_dir()`` as include path."""
    src = csrc_dir()
    files = [src / "knnlm.cpp", src / "cpu" / "interp_cpu.cpp", src / "cpu" / "small_linear_cpu.cpp"]
    if cuda:
        files += [src / "cuda" / "knnlm_cuda.cpp", src / "cuda" / "interp_kernels.cu"]
    return files


def _build() -> None:
    """Compile + load the extension (caller holds the lock). Raises with the reason on failure."""
    global _cuda_reason
    from torch.utils.cpp_extension import load

    src = csrc_dir()
    cuda, why_not = _want_cuda()
    sources = source_files(cuda=cuda)
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        raise RuntimeError(f"csrc sources not found: {', '.join(missing)}")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise RuntimeError("no C++ compiler (c++ / $CXX) on PATH")
    cflags = _cpu_flags()
    if not cuda:
        _cuda_reason = f"the extension was built without CUDA ({why_not})"
        logger.debug("knnlm: building the CPU kernel only (%s)", why_not)
    isa = "avx2" if "-mavx2" in cflags else "generic"
    flavour = f"{'cuda' if cuda else 'cpu'}_{isa}"
    name = f"knnlm_ops_{flavour}"
    build_dir = _build_root(flavour, sources, cflags)
    cached = (build_dir / f"{name}.so").exists()  # ninja still rebuilds if a source changed
    (logger.debug if cached else logger.info)(
        "knnlm: %s the fused op %s in %s", "loading" if cached else "compiling (first use; about a minute)",
        name, build_dir)
    with _build_lock(build_dir):
        load(
            name=name,
            sources=[str(p) for p in sources],
            extra_cflags=cflags,
            extra_cuda_cflags=["-O3"] if cuda else None,  # no fast-math: keep fp32 exp/log accuracy
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(src)],
            build_directory=str(build_dir),
            with_cuda=cuda,
            is_python_module=False,
            verbose=logger.isEnabledFor(logging.DEBUG),
        )


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """Hold an ``flock`` on the build directory while torch builds / loads in it. The kernel drops
    it when its process dies, so the holder knows that a torch ``lock`` file found there is stale:
    a process that exited or was killed while compiling (e.g. a short pytest run whose background
    prebuild thread was still compiling) leaves it, and torch's own build would wait on it forever."""
    import fcntl

    with open(build_dir / ".knnlm-build.flock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        stale = build_dir / "lock"
        if stale.exists():
            logger.warning("knnlm: removing %s, left by a build that did not finish", stale)
            stale.unlink(missing_ok=True)
        yield


def _raise_required() -> None:
    raise RuntimeError(
        f"knnlm: the fused csrc op is required (KNNLM_REQUIRE_KERNEL) but could not be "
        f"built/loaded: {_reason}")


def load_extension() -> bool:
    """Build/load the extension once per process; True when the ops are registered.

    On failure: False and one warning, or ``RuntimeError`` under ``KNNLM_REQUIRE_KERNEL``."""
    global _tried, _loaded, _reason
    if _tried:
        if not _loaded and kernel_required():
            _raise_required()
        return _loaded
    with _lock:
        if not _tried:
            try:
                if not hasattr(torch.ops.knnlm, "knn_interpolate"):
                    _build()
                _register_fakes()
                _loaded = True
                logger.debug("knnlm: fused op loaded")
            except Exception as exc:  # noqa: BLE001 - any build failure means: use the reference
                lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
                _reason = f"{type(exc).__name__}: {lines[0] if lines else 'unknown error'}"
                logger.debug("knnlm: fused op build failure", exc_info=True)
                if not kernel_required():
                    warnings.warn(
                        f"knnlm: the fused csrc op could not be built/loaded ({_reason}); "
                        "falling back to the torch reference implementation",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            finally:
                _tried = True
    if not _loaded and kernel_required():
        _raise_required()
    return _loaded


def unavailable_reason() -> str | None:
    """Why the op is not available (None when it is, or has not been tried yet)."""
    if _disabled():
        return "disabled by KNNLM_DISABLE_KERNEL"
    return _reason


def get_op(name: str, device: torch.device | str):
    """``torch.ops.knnlm.<name>`` when the extension is loaded with a kernel for ``device``'s
    type, else ``None`` (the caller falls back to the torch reference); under
    ``KNNLM_REQUIRE_KERNEL`` a missing CPU / CUDA kernel raises ``RuntimeError`` instead."""
    if name not in OP_NAMES:
        raise ValueError(f"unknown knnlm op {name!r}; expected one of {OP_NAMES}")
    if _disabled():
        return None
    if not load_extension():
        return None
    dev_type = torch.device(device).type
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(dev_type)
    if key is None:
        return None
    try:
        has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(f"knnlm::{name}", key)
    except Exception:  # noqa: BLE001 - private API; assume CPU only
        has_kernel = key == "CPU"
    if not has_kernel and kernel_required():
        why = _cuda_reason if key == "CUDA" and _cuda_reason else "not registered"
        raise RuntimeError(f"knnlm: the fused op is required (KNNLM_REQUIRE_KERNEL) but has no "
                           f"{key} kernel for {name}: {why}")
    return getattr(torch.ops.knnlm, name) if has_kernel else None
