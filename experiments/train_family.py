"""Train a family of Llama-style causal LMs of several sizes from ONE tokenizer on the CPython
stdlib train split, for the memorization suite (``python -m experiments.memorization``).

    python -m experiments.train_family --out runs/family --sizes 1m,4m,16m,50m --tokens 20000000 --max-minutes 120

Writes, under ``--out``::

    tokenizer/                 the shared tokenizer (save_pretrained)
    data/train.npy, val.npy    the tokenized training stream and a validation slice (int32)
    <size>/                    an HF checkpoint (save_pretrained: config + weights + tokenizer)
    <size>/training.json       the training curve (step, tokens, loss, val_loss, lr, seconds) and
                               the run's settings, parameter counts, stop reason, throughput

Tokenizer: by default a byte-level BPE with 8,192 tokens trained on the train split itself
(``--tokenizer own``). SmolLM2's 49,152-token vocabulary (``--tokenizer smollm2``) would make the
small sizes mostly embedding table (a 96-wide model: 4.7M tied embedding parameters for 0.2M
transformer parameters), so the size ladder would measure the vocabulary, not the model. With our
own tokenizer per-token perplexities of the family are comparable with each other but not with
SmolLM2's; the suite therefore also reports bits per UTF-8 byte.

Data: the committed stdlib train split (``knnlm.corpora``) minus ``pydoc_data/topics.py`` (the
Python reference manual as text: excluded so that the Python documentation stays an unseen domain
for the domain-adaptation task). Files are tokenized in split order and joined with EOS; the
last ``--val-tokens`` tokens of that stream are held out as the validation slice (never trained
on; no model selection is done on it).

Determinism: the tokenizer, the data, the initialisation (``--seed``) and the batch of every step
(a generator seeded with seed and step) are fixed. The number of steps is ``--tokens`` /
(batch x context) unless ``--max-minutes`` binds: then it is planned from the throughput measured
over the first 20 steps or first minute (recorded in training.json), so it depends on the machine;
the cosine schedule is stretched over the planned steps either way. A validation loss is recorded
every ``--eval-every`` steps and at least every 10 minutes.

Whole epochs: ``EpochBatches`` (used by ``experiments.memorization.standard``) replaces the
random windows by every window of the stream once per epoch, in a seeded order per epoch; the
batch of a step depends on the step only, so a resumed run continues at the same data position.

Resumable: a finished checkpoint (training.json with ``"finished": true``) is skipped; an
unfinished run continues from ``<size>/resume.pt`` (model, optimizer, torch RNG, step, curve),
written every ``--save-minutes``.
Uses CUDA (bf16 autocast) when present (``--device auto``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from experiments.common import logger  # noqa: E402
from knnlm.testing import train_byte_bpe  # noqa: E402


@dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    context: int = 256  # training window = max_position_embeddings
    batch: int = 32  # windows per step
    lr: float = 1e-3


# Approximate total parameters with the 8,192-token tokenizer (tied embeddings); the exact counts
# are printed and recorded in training.json.
PRESETS: dict[str, Preset] = {
    "300k": Preset(hidden=32, layers=2, heads=2, intermediate=96, lr=3e-3),
    "1m": Preset(hidden=96, layers=2, heads=3, intermediate=256, lr=2e-3),
    "2m": Preset(hidden=144, layers=3, heads=4, intermediate=384, lr=1.5e-3),
    "4m": Preset(hidden=192, layers=5, heads=6, intermediate=640, lr=1.5e-3),
    "16m": Preset(hidden=320, layers=10, heads=5, intermediate=864, lr=1e-3),
    "50m": Preset(hidden=512, layers=12, heads=8, intermediate=1536, lr=6e-4),
    # the standard-setting family (experiments.memorization.standard): 0.29M -> 10.3M, 35.7x
    "0.3m": Preset(hidden=32, layers=2, heads=2, intermediate=96, batch=8, lr=3e-3),
    "0.6m": Preset(hidden=64, layers=2, heads=2, intermediate=192, batch=8, lr=2.5e-3),
    "1.2m": Preset(hidden=96, layers=3, heads=3, intermediate=288, batch=8, lr=2e-3),
    "2.5m": Preset(hidden=160, layers=4, heads=5, intermediate=448, batch=8, lr=1.5e-3),
    "5m": Preset(hidden=224, layers=6, heads=7, intermediate=640, batch=8, lr=1.2e-3),
    "10m": Preset(hidden=288, layers=8, heads=9, intermediate=768, batch=8, lr=1e-3),
    # smoke-test sizes: seconds on a CPU
    "smoke-a": Preset(hidden=16, layers=1, heads=2, intermediate=32, context=64, batch=4, lr=3e-3),
    "smoke-b": Preset(hidden=32, layers=2, heads=2, intermediate=64, context=64, batch=4, lr=3e-3),
    "smoke-c": Preset(hidden=48, layers=2, heads=2, intermediate=96, context=64, batch=4, lr=3e-3),
}
EXCLUDED_FROM_TRAINING = ("pydoc_data/topics.py",)
log = logger("train_family")


# ----------------------------------------------------------------------------------------- data

def training_files(limit_bytes: int | None = None) -> list[str]:
    """The stdlib train split in its committed order, minus EXCLUDED_FROM_TRAINING; with
    ``limit_bytes`` only the leading files up to that many bytes (at least one)."""
    from knnlm.corpora import stdlib_files

    files = [f for f in stdlib_files("train") if not f.replace(os.sep, "/").endswith(EXCLUDED_FROM_TRAINING)]
    if limit_bytes is None:
        return files
    out, total = [], 0
    for f in files:
        size = os.path.getsize(f)
        if out and total + size > limit_bytes:
            break
        out.append(f)
        total += size
    return out


def train_tokenizer(files: list[str], vocab_size: int, out: Path):
    """A byte-level BPE (``knnlm.testing.train_byte_bpe``: GPT-2 style pre-tokenizer, special
    tokens ``<pad>``, ``<s>``, ``</s>`` = ids 0, 1, 2) trained on ``files``; saved to ``out``."""
    tok = train_byte_bpe(files, vocab_size, model_max_length=1 << 20)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    return tok


def get_tokenizer(out: Path, kind: str, vocab_size: int, files: list[str]):
    """The family's tokenizer, created once under ``out/tokenizer`` and reused afterwards."""
    from transformers import AutoTokenizer

    tdir = out / "tokenizer"
    if (tdir / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(tdir, local_files_only=True)
    if kind == "own":
        log(f"training a {vocab_size}-token byte-level BPE on {len(files)} files")
        return train_tokenizer(files, vocab_size, tdir)
    if kind == "smollm2":
        import knnlm

        _, tok = knnlm.load_model("smollm2", device="cpu")
        tdir.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(tdir)
        return tok
    raise SystemExit(f"--tokenizer must be own or smollm2, got {kind!r}")


def tokenize_stream(tok, files: list[str], out: Path, val_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """The training stream (files joined with EOS) and the validation slice, cached as .npy."""
    d = out / "data"
    if (d / "train.npy").exists() and (d / "val.npy").exists():
        return np.load(d / "train.npy", mmap_mode="r"), np.load(d / "val.npy")
    from tqdm.auto import tqdm

    eos = tok.eos_token_id if tok.eos_token_id is not None else 0
    parts = []
    for f in tqdm(files, desc="tokenizing", unit="file", leave=False):
        text = Path(f).read_text(encoding="utf-8")
        parts.append(np.asarray(tok(text, add_special_tokens=False)["input_ids"] + [eos], dtype=np.int32))
    stream = np.concatenate(parts)
    val_tokens = min(val_tokens, len(stream) // 10)
    train, val = stream[: len(stream) - val_tokens], stream[len(stream) - val_tokens:]
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / "train.npy", train)
    np.save(d / "val.npy", val)
    (d / "stats.json").write_text(json.dumps({"files": len(files), "train_tokens": int(len(train)),
                                              "val_tokens": int(len(val))}, indent=1))
    return train, val


# ---------------------------------------------------------------------------------------- model

def make_model(preset: Preset, tok, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=preset.hidden, intermediate_size=preset.intermediate,
                      num_hidden_layers=preset.layers, num_attention_heads=preset.heads,
                      num_key_value_heads=preset.heads, max_position_embeddings=preset.context,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def param_counts(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    return {"params": int(total), "embedding_params": int(emb), "non_embedding_params": int(total - emb)}


def _batch(stream: np.ndarray, n: int, context: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - context - 1, (n,), generator=gen).tolist()
    return torch.from_numpy(np.stack([np.asarray(stream[s: s + context + 1], dtype=np.int64) for s in starts]))


class EpochBatches:
    """Whole epochs over a token stream, for training on exactly the datastore's text.

    An epoch is every window of ``context + 1`` tokens starting at 0, context, 2 context, ...
    plus one ending at the stream's last token, so every token but the first is a target at
    least once per epoch (the last window overlaps its neighbour by less than ``context``
    targets). Each epoch visits the windows in its own permutation (seeded by ``seed`` and the
    epoch); step ``i`` takes the windows ``i * batch ... (i + 1) * batch`` of the concatenated
    epochs (the last step may be smaller). The batch of a step depends on the step number only:
    the data position of a resumed run is its step.
    """

    def __init__(self, stream: np.ndarray, context: int, batch: int, epochs: int, seed: int):
        n = len(stream)
        if n < context + 2:
            raise SystemExit(f"the training stream has {n} tokens, fewer than a {context}-token window + 2")
        starts = list(range(0, n - context - 1, context))
        if starts[-1] != n - context - 1:
            starts.append(n - context - 1)
        self.stream, self.context, self.batch, self.epochs = stream, context, batch, epochs
        self.starts = np.asarray(starts, dtype=np.int64)  # (W,)
        self.order = np.concatenate([np.random.default_rng([seed, e]).permutation(len(starts))
                                     for e in range(epochs)])  # (epochs * W,)
        self.steps = -(-len(self.order) // batch)
        self.targets_per_epoch = n - 1
        self.tokens_processed = len(self.order) * context  # targets scored, all epochs

    def __call__(self, step: int) -> torch.Tensor:
        """The windows of ``step``: (B, context + 1) int64."""
        sel = self.starts[self.order[step * self.batch: (step + 1) * self.batch]]
        return torch.from_numpy(np.stack([np.asarray(self.stream[s: s + self.context + 1], dtype=np.int64)
                                          for s in sel]))


class TrainingInterrupted(RuntimeError):
    """Raised by ``train_one(stop_after_steps=...)``: a simulated kill (nothing saved at that step)."""


@torch.no_grad()
def val_loss(model, val: np.ndarray, context: int, device, max_windows: int = 64) -> float:
    model.eval()
    n = max(1, min(max_windows, (len(val) - 1) // context))
    losses = []
    for i in range(0, n, 16):
        rows = [np.asarray(val[j * context: j * context + context + 1], dtype=np.int64)
                for j in range(i, min(n, i + 16))]
        rows = [r for r in rows if len(r) == context + 1]
        if not rows:
            break
        x = torch.from_numpy(np.stack(rows)).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=x[:, :-1]).logits
        losses.append(torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten()).item())
    model.train()
    return float(np.mean(losses)) if losses else float("nan")


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))  # cosine to 10 % of the peak


@dataclass
class _Run:
    """The state of one size's training run: what resume.pt holds, plus the warmup (recomputed
    from ``planned`` on resume) and the wall-clock origin."""
    planned: int
    step: int = 0
    curve: list = field(default_factory=list)
    elapsed: float = 0.0
    time_planned: bool = False
    stop_reason: str = "tokens"
    warmup: int = 1
    t_start: float = 0.0

    def save(self, path: Path, model, opt) -> None:
        """Model, optimizer, torch RNG, step (= the data position) and curve, atomically."""
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": self.step,
                    "curve": self.curve, "elapsed": time.time() - self.t_start, "planned": self.planned,
                    "time_planned": self.time_planned, "stop_reason": self.stop_reason,
                    "rng": torch.get_rng_state()},
                   str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)

    @classmethod
    def load(cls, path: Path, model, opt, device) -> _Run:
        state = torch.load(path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if "rng" in state:
            torch.set_rng_state(state["rng"])
        return cls(planned=state["planned"], step=state["step"], curve=state["curve"], elapsed=state["elapsed"],
                   time_planned=state["time_planned"], stop_reason=state["stop_reason"])


def _finished(mdir: Path) -> dict | None:
    """training.json of a finished checkpoint in ``mdir``, else None."""
    info_path = mdir / "training.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("finished"):
            return info
    return None


def _train_step(model, opt, x: torch.Tensor, lr: float, device) -> float:
    """One optimizer step on the windows ``x`` (next-token loss, grad-norm clipped at 1); the loss."""
    for g in opt.param_groups:
        g["lr"] = lr
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(input_ids=x[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


def _plan_by_time(run: _Run, name: str, max_minutes: float, now: float, bar) -> None:
    """Once, after the first 20 steps or minute: shrink the planned steps to what fits in
    ``max_minutes`` at the measured speed, so the cosine schedule still ends."""
    run.time_planned = True
    rate = run.step / max(now, 1e-9)
    fit = int(rate * max_minutes * 60 * 0.95)  # 5 % for val loss and saving
    if fit < run.planned:
        run.planned = max(run.step, fit)
        run.warmup = max(1, min(run.warmup, run.planned // 20))
        bar.total = run.planned
        run.stop_reason = "max_minutes"
        log(f"{name}: {rate:.2f} steps/s -> {run.planned} steps fit in {max_minutes} min")


def _train_loop(run: _Run, name: str, model, opt, preset: Preset, train: np.ndarray, val: np.ndarray, resume: Path,
                *, seed: int, device, eval_every: int, max_minutes: float | None, save_minutes: float,
                progress: bool, batches: Callable[[int], torch.Tensor] | None = None,
                save_every_steps: int | None = None, stop_after_steps: int | None = None) -> None:
    """Train until ``run.planned`` steps, recording the curve and saving ``resume`` regularly
    (every ``save_minutes``, and every ``save_every_steps`` steps when given). ``batches``: the
    windows of a step (default: random windows from a generator seeded by seed and step).
    ``stop_after_steps``: raise ``TrainingInterrupted`` once the run reaches that step, without
    saving (a simulated kill, for tests)."""
    from tqdm.auto import tqdm

    per_step = preset.batch * preset.context
    last_save = last_val = time.time()
    bar = tqdm(total=run.planned, initial=run.step, desc=f"train {name}", unit="step", disable=not progress)
    while run.step < run.planned:
        if batches is not None:
            x = batches(run.step).to(device)
        else:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + run.step)
            x = _batch(train, preset.batch, preset.context, gen).to(device)
        loss = _train_step(model, opt, x, _lr(run.step, run.planned, preset.lr, run.warmup), device)
        run.step += 1
        bar.update(1)
        if stop_after_steps is not None and run.step >= stop_after_steps:
            bar.close()
            raise TrainingInterrupted(f"{name}: stopped after step {run.step} (stop_after_steps)")
        now = time.time() - run.t_start
        point = {"step": run.step, "tokens": run.step * per_step, "loss": round(loss, 4),
                 "lr": opt.param_groups[0]["lr"], "seconds": round(now, 2)}
        if run.step % eval_every == 0 or run.step == run.planned or time.time() - last_val > 600:
            point["val_loss"] = round(val_loss(model, val, preset.context, device), 4)
            last_val = time.time()
            bar.set_postfix(loss=point["loss"], val=point["val_loss"])
        run.curve.append(point)
        if max_minutes and not run.time_planned and (run.step >= min(20, run.planned) or now >= 60):
            _plan_by_time(run, name, max_minutes, now, bar)
        due = save_every_steps is not None and run.step % save_every_steps == 0
        if (due or time.time() - last_save > save_minutes * 60) and run.step < run.planned:
            run.save(resume, model, opt)
            last_save = time.time()
    bar.close()


def _training_info(run: _Run, name: str, preset: Preset, counts: dict, tok, train: np.ndarray, *, seed: int,
                   device, tokens: int, max_minutes: float | None, total_s: float) -> dict:
    """The content of training.json for a finished run."""
    step, curve, per_step = run.step, run.curve, preset.batch * preset.context
    return {"name": name, "preset": asdict(preset), **counts, "seed": seed, "device": str(device),
            "steps": step, "tokens_trained": step * per_step, "tokens_budget": tokens, "max_minutes": max_minutes,
            "stop_reason": run.stop_reason,
            "train_stream_tokens": int(len(train)), "epochs": round(step * per_step / max(1, len(train)), 3),
            "seconds": round(total_s, 2), "steps_per_second": round(step / max(total_s, 1e-9), 3),
            "tokens_per_second": round(step * per_step / max(total_s, 1e-9), 1),
            "final_loss": curve[-1]["loss"] if curve else None,
            "final_val_loss": curve[-1].get("val_loss") if curve else None,
            "vocab_size": len(tok), "curve": curve, "finished": True}


def train_one(name: str, preset: Preset, tok, train: np.ndarray, val: np.ndarray, out: Path, *,
              tokens: int, max_minutes: float | None, seed: int, device, eval_every: int, save_minutes: float,
              progress: bool = True, batches: EpochBatches | None = None, save_every_steps: int | None = None,
              stop_after_steps: int | None = None, extra_info: dict | None = None) -> dict:
    """Train (or resume, or skip) one size into ``out/name``; returns its training.json content.

    ``batches``: train on these whole epochs (``EpochBatches``: its step count replaces
    ``tokens``; ``tokens_trained`` is then the targets it scores); ``extra_info`` is added to
    training.json. ``save_every_steps`` / ``stop_after_steps``: see ``_train_loop``."""
    mdir = out / name
    info = _finished(mdir)
    if info is not None:
        log(f"{name}: finished checkpoint in {mdir}, skipping")
        return info
    mdir.mkdir(parents=True, exist_ok=True)
    model = make_model(preset, tok, seed).to(device)
    model.train()
    counts = param_counts(model)
    opt = torch.optim.AdamW(model.parameters(), lr=preset.lr, betas=(0.9, 0.95), weight_decay=0.1)
    per_step = preset.batch * preset.context
    run = _Run(planned=batches.steps if batches is not None else max(1, tokens // per_step))
    resume = mdir / "resume.pt"
    if resume.exists():
        run = _Run.load(resume, model, opt, device)
        log(f"{name}: resuming at step {run.step}/{run.planned}")
    log(f"{name}: {counts['params']:,} parameters ({counts['non_embedding_params']:,} non-embedding), "
        f"{run.planned} steps x {per_step} tokens planned, device {device}")
    run.warmup = max(1, min(200, run.planned // 20))
    run.t_start = time.time() - run.elapsed
    _train_loop(run, name, model, opt, preset, train, val, resume, seed=seed, device=device, eval_every=eval_every,
                max_minutes=max_minutes, save_minutes=save_minutes, progress=progress, batches=batches,
                save_every_steps=save_every_steps, stop_after_steps=stop_after_steps)
    total_s = time.time() - run.t_start
    if run.curve and "val_loss" not in run.curve[-1]:
        run.curve[-1]["val_loss"] = round(val_loss(model, val, preset.context, device), 4)
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    info = _training_info(run, name, preset, counts, tok, train, seed=seed, device=device, tokens=tokens,
                          max_minutes=max_minutes, total_s=total_s)
    if batches is not None:
        info.update(tokens_trained=batches.tokens_processed, epochs=batches.epochs,
                    tokens_per_second=round(batches.tokens_processed / max(total_s, 1e-9), 1))
    info.update(extra_info or {})
    (mdir / "training.json").write_text(json.dumps(info, indent=1))
    resume.unlink(missing_ok=True)
    log(f"{name}: done, {run.step} steps in {total_s:.0f} s ({info['steps_per_second']} steps/s), "
        f"val loss {info['final_val_loss']}")
    return info


def resolve_device(device: str) -> torch.device:
    """``auto`` -> the first CUDA device when present, else the CPU; otherwise ``torch.device``."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device} asked for CUDA but torch sees no GPU; use --device cpu")
    return dev


def train_family(out: str | Path, sizes: list[str], *, tokens: int, max_minutes: float | None = None,
                 tokenizer: str = "own", vocab_size: int = 8192, seed: int = 0, device: str = "auto",
                 limit_bytes: int | None = None, val_tokens: int = 65_536, eval_every: int = 200,
                 save_minutes: float = 10.0, progress: bool = True, batch: int | None = None) -> dict[str, dict]:
    """Train every size in ``sizes`` (preset names); returns {name: training.json content}.
    ``batch`` overrides every preset's windows per step (recorded in training.json's preset)."""
    unknown = [s for s in sizes if s not in PRESETS]
    if unknown:
        raise SystemExit(f"unknown size preset(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = training_files(limit_bytes)
    tok = get_tokenizer(out, tokenizer, vocab_size, files)
    train, val = tokenize_stream(tok, files, out, val_tokens)
    dev = resolve_device(device)
    torch.manual_seed(seed)
    presets = {name: replace(PRESETS[name], batch=batch) if batch else PRESETS[name] for name in sizes}
    return {name: train_one(name, presets[name], tok, train, val, out, tokens=tokens, max_minutes=max_minutes,
                            seed=seed, device=dev, eval_every=eval_every, save_minutes=save_minutes,
                            progress=progress)
            for name in sizes}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.train_family", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/family", help="output directory (default runs/family)")
    p.add_argument("--sizes", default="1m,4m,16m,50m", help=f"comma list of presets: {', '.join(PRESETS)}")
    p.add_argument("--tokens", type=int, default=20_000_000, help="training tokens per model (default 20M)")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget per model")
    p.add_argument("--tokenizer", choices=["own", "smollm2"], default="own")
    p.add_argument("--vocab-size", type=int, default=8192, help="size of the own BPE tokenizer")
    p.add_argument("--limit-bytes", type=int, default=None, help="train on the leading files up to this many bytes")
    p.add_argument("--batch", type=int, default=None,
                   help="windows per step for every size (default: the preset's, 32)")
    p.add_argument("--val-tokens", type=int, default=65_536)
    p.add_argument("--eval-every", type=int, default=200, help="steps between validation losses")
    p.add_argument("--save-minutes", type=float, default=10.0, help="minutes between resume checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    infos = train_family(args.out, [s for s in args.sizes.split(",") if s], tokens=args.tokens,
                         max_minutes=args.max_minutes, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                         seed=args.seed, device=args.device, limit_bytes=args.limit_bytes,
                         val_tokens=args.val_tokens, eval_every=args.eval_every, save_minutes=args.save_minutes,
                         batch=args.batch)
    for name, info in infos.items():
        print(f"{name}: {info['params']:,} params, {info['steps']} steps, val loss {info['final_val_loss']}, "
              f"{info['steps_per_second']} steps/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
