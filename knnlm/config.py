"""Settings for building and evaluating, with defaults and validation in one place."""

from __future__ import annotations

from knnlm.errors import KnnlmError

from dataclasses import asdict, dataclass

__all__ = ["BuildConfig", "EvalConfig", "ConfigError", "RESUME_KEYS"]


class ConfigError(KnnlmError):
    """An invalid setting."""


@dataclass
class BuildConfig:
    context: int = 512  # tokens per forward window
    stride: int | None = None  # new targets per window; None = context - 1 (non-overlapping)
    batch_size: int = 8  # windows per forward pass
    key_dtype: str = "float16"  # storage dtype of keys.npy: float16 | float32
    layer: str | None = None  # key module path or decoder-layer index; None = last layer's FFN
    globs: tuple[str, ...] = ("*",)  # file-name patterns when an input is a directory
    exclude: tuple[str, ...] = ()  # relative-path patterns to skip inside directories
    text_field: str = "text"  # jsonl key / dataset column holding the text
    index: str = "auto"  # flat | ivfpq | auto | FAISS factory string
    max_tokens: int | None = None  # stop after this many corpus tokens (deterministic prefix)
    seed: int = 0  # index-training sample
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        self.globs = tuple(self.globs) or ("*",)
        self.exclude = tuple(self.exclude)
        if self.stride is None:
            self.stride = self.context - 1
        if self.context < 2:
            raise ConfigError(f"--context must be at least 2, got {self.context}")
        if not 1 <= self.stride <= self.context - 1:
            raise ConfigError(f"--stride must be between 1 and context - 1 = {self.context - 1}, got {self.stride}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.key_dtype not in ("float16", "float32"):
            raise ConfigError(f"--key-dtype must be float16 or float32, got {self.key_dtype!r}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ConfigError(f"--max-tokens must be at least 2, got {self.max_tokens}")

    def settings(self) -> dict:
        """What goes into the datastore header (and must match on --resume)."""
        d = asdict(self)
        for k in ("resume", "overwrite", "progress"):
            d.pop(k)
        d["globs"], d["exclude"] = list(self.globs), list(self.exclude)
        return d


# Settings that change the bytes of the datastore: --resume refuses to continue if one differs.
RESUME_KEYS = ("context", "stride", "batch_size", "key_dtype", "globs", "exclude", "text_field",
               "max_tokens", "layer")


@dataclass
class EvalConfig:
    """Perplexity settings. Every combination of lambdas x temperatures x ks is scored from one
    retrieval at the largest k (a sweep); the first combination is the primary result."""
    lambdas: tuple[float, ...] = (0.25,)
    temperatures: tuple[float, ...] = (1.0,)
    ks: tuple[int | None, ...] = (None,)  # None = 1024 capped at the datastore size
    nprobe: int | None = None  # None = the datastore's default
    rerank: bool = False  # exact distances from the stored keys for the returned candidates
    context: int | None = None  # None = the datastore's window protocol
    stride: int | None = None
    batch_size: int = 8
    exclude_self: bool = True  # drop a query's own row when the eval text is in the datastore
    globs: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    text_field: str = "text"
    max_tokens: int | None = None
    progress: bool = True

    def __post_init__(self):
        from knnlm.scoring import check_mixture_args

        self.lambdas, self.temperatures = tuple(map(float, self.lambdas)), tuple(map(float, self.temperatures))
        self.ks, self.globs, self.exclude = tuple(self.ks), tuple(self.globs) or ("*",), tuple(self.exclude)
        if not self.lambdas or not self.temperatures or not self.ks:
            raise ConfigError("--lambda, --temperature and --k each need at least one value")
        for lam in self.lambdas:
            for t in self.temperatures:
                try:
                    check_mixture_args(lam, t)
                except ValueError as e:
                    raise ConfigError(str(e).replace("lambda", "--lambda").replace("temperature", "--temperature")) from None
        for k in self.ks:
            if k is not None and k < 1:
                raise ConfigError(f"--k must be at least 1, got {k}")
        if self.nprobe is not None and self.nprobe < 1:
            raise ConfigError(f"--nprobe must be at least 1, got {self.nprobe}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ConfigError(f"--max-tokens must be at least 2, got {self.max_tokens}")

    @property
    def grid(self) -> list[tuple[float, float, int | None]]:
        """(lambda, temperature, k) for every setting, the primary one first."""
        return [(lam, t, k) for k in self.ks for t in self.temperatures for lam in self.lambdas]
