"""Settings for building and evaluating, with defaults, and every validation of a setting.

Each check is written once here and called where the setting enters the library (a config
dataclass, ``KNNLM``, ``windows``). Errors name the Python parameter in backquotes
(`` `stride` must be ...``) and carry it in ``param``; the CLI maps parameter names to its flags
(``knnlm.errors.rename_params``, with each front end's own map).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from knnlm.errors import ConfigError, KeyLayerError

__all__ = ["KNNSettings", "SETTINGS_FIELDS", "BuildConfig", "EvalConfig", "ConfigError", "RESUME_KEYS", "KEY_DTYPES",
           "INDEX_STORAGES",
           "check_window", "check_context", "check_mixture", "check_k", "check_index_storage", "check_nprobe",
           "ADAPTIVE", "parse_lambda", "check_fraction", "check_pointers", "DEFAULT_MIN_POINTERS", "check_at_least",
           "check_layer_spec", "is_int"]

KEY_DTYPES = ("float16", "float32", "none")  # none: no keys file (the index's codes are all there is)
INDEX_STORAGES = ("auto", "ram", "disk")  # where the index's bulk lives; knnlm.index.plan_index resolves auto


_MODULE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.([A-Za-z_][A-Za-z0-9_]*|[0-9]+))*")


def check_layer_spec(layer: str | None) -> None:
    """Refuse a ``layer`` that is neither a decoder-layer index nor a module path, before any
    model is loaded (whether the module exists is checked by ``find_key_module``)."""
    if layer is None or is_int(layer) or _MODULE_PATH.fullmatch(layer):
        return
    raise KeyLayerError(f"`layer` {layer!r} is neither a decoder-layer index (e.g. -1) nor a module path "
                        "(e.g. model.layers.29.mlp)", param="layer")


def is_int(s) -> bool:
    try:
        int(s)
        return True
    except (TypeError, ValueError):
        return False


def check_at_least(param: str, value: int | None, low: int) -> None:
    """``value`` (an int, or None for "not set") must be at least ``low``."""
    if value is not None and value < low:
        raise ConfigError(f"`{param}` must be at least {low}, got {value}", param=param)


def check_window(context: int, stride: int) -> None:
    """The sliding-window protocol: ``context >= 2`` tokens, ``1 <= stride <= context - 1``."""
    if context < 2:
        raise ConfigError(f"`context` must be at least 2 tokens, got {context}", param="context")
    if not 1 <= stride <= context - 1:
        raise ConfigError(f"`stride` must be between 1 and `context` - 1 = {context - 1}, got {stride}", param="stride")


def check_context(context: int, bos: int | None, max_positions: int | None) -> None:
    """A window (``context`` corpus tokens, plus the ``<bos>`` in front of mid-document windows
    when the tokenizer uses one) must fit the model's positions."""
    need = context + (bos is not None)
    if max_positions and need > max_positions:
        extra = " + 1 for <bos>" if bos is not None else ""
        raise ConfigError(f"`context` {context}{extra} exceeds the model's {max_positions} positions; lower it",
                          param="context")


def check_mixture(lam: float, temperature: float, *, lam_param: str = "lam",
                  temperature_param: str = "temperature") -> None:
    """lambda in [0, 1], temperature positive and finite."""
    lam, temperature = float(lam), float(temperature)
    if math.isnan(lam) or not 0.0 <= lam <= 1.0:
        raise ConfigError(f"`{lam_param}` must be in [0, 1], got {lam}", param=lam_param)
    if not 0.0 < temperature < math.inf:
        raise ConfigError(f"`{temperature_param}` must be a positive finite number, got {temperature}",
                          param=temperature_param)


def check_k(k: int | None, n: int | None = None, *, param: str = "k") -> None:
    """k >= 1, and at most the datastore size ``n`` when given (None = the default k)."""
    if k is None:
        return
    if k < 1 or (n is not None and k > n):
        upper = f"between 1 and the datastore size {n:,}" if n is not None else "at least 1"
        raise ConfigError(f"`{param}` must be {upper}, got {k}", param=param)


def check_index_storage(storage: str) -> None:
    """``index_storage``: ram, disk or auto."""
    if storage not in INDEX_STORAGES:
        raise ConfigError(f"`index_storage` must be one of {', '.join(INDEX_STORAGES)}, got {storage!r}",
                          param="index_storage")


ADAPTIVE = "adaptive"  # the λ setting that takes a per-token λ(x) from the datastore's tuned gate


def parse_lambda(lam, param: str = "lam"):
    """A λ setting: a number in [0, 1] (returned as float) or ``"adaptive"``."""
    if isinstance(lam, str) and lam.strip().lower() == ADAPTIVE:
        return ADAPTIVE
    try:
        value = float(lam)
    except (TypeError, ValueError):
        raise ConfigError(f"`{param}` must be a number in [0, 1] or 'adaptive', got {lam!r}", param=param) from None
    check_mixture(value, 1.0, lam_param=param)
    return value


def check_fraction(fraction: float | None, param: str = "retrieve_fraction") -> None:
    """``retrieve_fraction`` must be in (0, 1] (None = search every token)."""
    if fraction is None:
        return
    f = float(fraction)
    if not 0.0 < f <= 1.0:
        raise ConfigError(f"`{param}` must be in (0, 1], got {fraction}", param=param)


DEFAULT_MAX_UNSEEN_LOSS = None  # knnlm tune: no bound on never-seen targets (README "Adaptive kNN-LM": the trade-off)


def resolve_keep_unseen(keep_unseen: bool | None, gate=None) -> bool:
    """Whether a run mixes with the keep-unseen formula: ``keep_unseen`` when given, else the
    gate's (when the run uses one), else False. A given value that contradicts the gate's raises
    (a gate is fitted for one mixture)."""
    if gate is None:
        return bool(keep_unseen)
    if keep_unseen is not None and bool(keep_unseen) != gate.keep_unseen:
        how = "with" if gate.keep_unseen else "without"
        raise ConfigError(f"the gate {gate.path or ''} was tuned {how} `keep_unseen`; set `keep_unseen` to "
                          f"{gate.keep_unseen} or tune a gate for the other mixture", param="keep_unseen")
    return gate.keep_unseen


def check_unseen_options(max_unseen_loss: float | None, keep_unseen: bool) -> None:
    """A gate bounds never-seen targets' loss or keeps their LM probability, not both."""
    check_max_unseen_loss(max_unseen_loss)
    if keep_unseen and max_unseen_loss is not None:
        raise ConfigError("`max_unseen_loss` bounds what never-seen targets lose, and with `keep_unseen` they "
                          "lose nothing: use one or the other", param="max_unseen_loss")


def check_max_unseen_loss(value: float | None, param: str = "max_unseen_loss") -> None:
    """``max_unseen_loss`` (a perplexity fraction, e.g. 0.05) must be finite and >= 0 (None: no bound)."""
    if value is None:
        return
    v = float(value)
    if not (math.isfinite(v) and v >= 0.0):
        raise ConfigError(f"`{param}` must be a fraction >= 0 (e.g. 0.05 for 5 %), got {value}", param=param)


DEFAULT_MIN_POINTERS = 64  # search when fewer pointers survive (capped at k); see README "Pointers"


def check_pointers(pointers: bool, min_pointers: int | None, k: int | None = None) -> None:
    """``min_pointers`` at least 1 (and at most ``k`` when known: more could never survive)."""
    if min_pointers is None:
        return
    if min_pointers < 1 or (k is not None and min_pointers > k):
        upper = f" and at most `k` = {k}" if k is not None else ""
        raise ConfigError(f"`min_pointers` must be at least 1{upper}, got {min_pointers}", param="min_pointers")


def check_nprobe(nprobe: int | None) -> None:
    check_at_least("nprobe", nprobe, 1)


@dataclass
class BuildConfig:
    context: int = 512  # corpus tokens per forward window (a <bos> in front of mid-document windows is extra)
    stride: int | None = None  # new targets per window; None = context - 1 (non-overlapping)
    batch_size: int = 8  # windows per forward pass
    key_dtype: str = "float16"  # storage dtype of keys.npy: float16 | float32 | none (no keys file)
    layer: str | None = None  # key module path or decoder-layer index; None = last layer's FFN
    globs: tuple[str, ...] = ("*",)  # file-name patterns when an input is a directory
    exclude: tuple[str, ...] = ()  # relative-path patterns to skip inside directories
    text_field: str = "text"  # jsonl key / dataset column holding the text
    index: str = "auto"  # flat | ivfsq | ivfpq | auto | FAISS factory string
    index_storage: str = "auto"  # ram | disk (inverted lists memory-mapped from a file) | auto
    max_tokens: int | None = None  # stop after this many corpus tokens (deterministic prefix)
    seed: int = 0  # index-training sample
    index_shards: int = 1  # IVF indexes over disjoint rows sharing one trained quantizer (knnlm.sharding)
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        self.globs = tuple(self.globs) or ("*",)
        self.exclude = tuple(self.exclude)
        if self.stride is None:
            self.stride = self.context - 1
        check_window(self.context, self.stride)
        check_at_least("batch_size", self.batch_size, 1)
        if self.key_dtype not in KEY_DTYPES:
            raise ConfigError(f"`key_dtype` must be one of {', '.join(KEY_DTYPES)}, got {self.key_dtype!r}",
                              param="key_dtype")
        check_index_storage(self.index_storage)
        check_at_least("max_tokens", self.max_tokens, 2)
        check_at_least("index_shards", self.index_shards, 1)
        if self.resume and self.overwrite:
            raise ConfigError("`resume` and `overwrite` exclude each other: continue the build or replace it",
                              param="resume")

    def settings(self) -> dict:
        """What goes into the datastore header (and must match on resume)."""
        d = asdict(self)
        for k in ("resume", "overwrite", "progress"):
            d.pop(k)
        d["globs"], d["exclude"] = list(self.globs), list(self.exclude)
        return d


# Settings that change the bytes of the datastore: resume refuses to continue if one differs.
RESUME_KEYS = ("context", "stride", "batch_size", "key_dtype", "globs", "exclude", "text_field",
               "max_tokens", "layer")


@dataclass(frozen=True)
class KNNSettings:
    """How a ``KNNLM`` retrieves and mixes: validated once, here, when made (``dataclasses.replace``
    makes a changed copy, validated again). Errors name these fields."""
    lam: float | str = 0.25  # a number in [0, 1], or "adaptive": λ(x) per token from the datastore's tuned gate
    temperature: float = 1.0  # of the kNN softmax over -distance
    k: int | None = None  # neighbours per query; None = 1024 capped at the datastore size
    nprobe: int | None = None  # IVF lists probed; None = the datastore's default
    rerank: bool = False  # exact distances from the stored keys for the returned candidates
    retrieve_fraction: float | None = None  # search only this fraction of tokens (the gate's retrieval part)
    pointers: bool = False  # RetoMaton-style pointers: follow the last step's matching neighbours
    min_pointers: int | None = None  # search when fewer pointers survive; None = DEFAULT_MIN_POINTERS capped at k
    keep_unseen: bool | None = None  # the keep-unseen mixture (knnlm.scoring); None: the gate's when one is used
    use_kernel: bool = True  # the fused csrc op for full rows when it is available

    def __post_init__(self):
        object.__setattr__(self, "lam", parse_lambda(self.lam))
        object.__setattr__(self, "temperature", float(self.temperature))
        check_mixture(0.0 if self.lam == ADAPTIVE else self.lam, self.temperature)
        check_k(self.k)
        check_nprobe(self.nprobe)
        check_fraction(self.retrieve_fraction)
        check_pointers(self.pointers, self.min_pointers, self.k)
        if self.min_pointers is not None and not self.pointers:
            raise ConfigError("`min_pointers` only applies with `pointers`", param="min_pointers")
        if self.retrieve_fraction is not None:
            object.__setattr__(self, "retrieve_fraction", float(self.retrieve_fraction))

    @property
    def gated(self) -> bool:
        """A retrieval fraction below 1: the gate's retrieval part decides which tokens search."""
        return self.retrieve_fraction is not None and self.retrieve_fraction < 1

    @property
    def needs_gate(self) -> bool:
        """An adaptive λ or a retrieval fraction below 1: the tuned gate is needed."""
        return self.lam == ADAPTIVE or self.gated

    def pointer_floor(self, k: int) -> int:
        """``min_pointers``, or its default for ``k`` neighbours."""
        return self.min_pointers or min(DEFAULT_MIN_POINTERS, k)


SETTINGS_FIELDS = tuple(KNNSettings.__dataclass_fields__)


@dataclass
class EvalConfig:
    """What an eval reads and how it reports (``KNNLM.evaluate``), and the sweep axes: every
    combination of lambdas x temperatures x ks is scored from one retrieval at the largest k; the
    first combination is the primary result. How retrieval runs is the ``KNNLM``'s
    ``KNNSettings``."""
    lambdas: tuple[float | str, ...] = (0.25,)  # numbers in [0, 1] and/or "adaptive" (the tuned gate)
    temperatures: tuple[float, ...] = (1.0,)
    ks: tuple[int | None, ...] = (None,)  # None = 1024 capped at the datastore size
    context: int | None = None  # None = the datastore's window protocol
    stride: int | None = None
    batch_size: int = 8
    exclude_self: bool = True  # drop a query's own row when the eval text is in the datastore
    globs: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    text_field: str = "text"
    max_tokens: int | None = None
    per_document: bool = False  # also report each document's negative log-likelihood (the harness's rolling scores)
    per_token: bool = False  # also return every target's log-probability, base LM and each setting (Python only)
    progress: bool = True

    def __post_init__(self):
        self.lambdas = tuple(parse_lambda(x, "lambdas") for x in self.lambdas)
        self.temperatures = tuple(map(float, self.temperatures))
        self.ks, self.globs, self.exclude = tuple(self.ks), tuple(self.globs) or ("*",), tuple(self.exclude)
        for param, values in (("lambdas", self.lambdas), ("temperatures", self.temperatures), ("ks", self.ks)):
            if not values:
                raise ConfigError(f"`{param}` needs at least one value", param=param)
        for t in self.temperatures:
            check_mixture(0.0, t, temperature_param="temperatures")
        for k in self.ks:
            check_k(k, param="ks")
        check_at_least("batch_size", self.batch_size, 1)
        check_at_least("max_tokens", self.max_tokens, 2)
        if self.context is not None:
            check_window(self.context, self.stride if self.stride is not None else self.context - 1)

    def window(self, default_context: int, default_stride: int) -> tuple[int, int]:
        """(context, stride) of the eval: these settings where given, else the defaults (the
        datastore's protocol); validated."""
        context = self.context or default_context
        stride = self.stride or (default_stride if self.context is None else context - 1)
        check_window(context, stride)
        return context, stride

    @property
    def grid(self) -> list[tuple[float | str, float, int | None]]:
        """(lambda, temperature, k) for every setting, the primary one first."""
        return [(lam, t, k) for k in self.ks for t in self.temperatures for lam in self.lambdas]
