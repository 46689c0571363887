"""Settings for building and evaluating, with defaults and validation in one place."""

from __future__ import annotations

from knnlm.errors import KnnlmError

from dataclasses import asdict, dataclass

__all__ = ["BuildConfig", "ConfigError", "RESUME_KEYS"]


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
