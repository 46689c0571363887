"""The kNN-LM as an lm-evaluation-harness model: ``--model knnlm``.

    python -m knnlm.harness --model knnlm \\
        --model_args pretrained=smollm2,datastore=runs/stdlib-1m,lambda=0.25 \\
        --tasks stdlib_test --include_path examples/harness --device cpu

``python -m knnlm.harness ARGS`` registers the model and runs lm-eval's own command line with the
same ``ARGS``. From Python, ``import knnlm.harness`` registers it for ``lm_eval.simple_evaluate(
model="knnlm", ...)``, or pass ``KNNLMHarness(pretrained=..., datastore=...)`` as the model. (The
lm-eval release pip installs, 0.4.13, discovers no models from other packages: no entry-point
group is read for models, so the registration has to run in the process; ``python -m`` does it.)

``--model_args`` (``MODEL_ARGS``): ``pretrained`` (what ``knnlm --model`` takes: ``smollm2``, a
``save_pretrained`` directory, a ``.gguf`` file, a cached hub name), ``datastore`` (a datastore
directory; none = the plain LM), ``lambda`` (a number in [0, 1], or ``adaptive``, handed to
``KNNLM`` as ``lam`` unchanged), ``k``, ``temperature``, ``nprobe``, ``batch_size`` (windows per
forward pass), ``device``, ``dtype``, ``context`` / ``stride`` (override the datastore's window),
``max_gen_toks``. The core does all the scoring: ``KNNLM`` with its ``search`` / ``mix`` /
``log_probs`` (``knnlm.scoring``, the one formula) and ``knnlm.evaluation``.

How requests are scored:

* ``loglikelihood_rolling`` is ``knnlm eval`` on each document: ``KNNLM.evaluate`` (or the plain
  LM's) with ``per_document``, so the windows are the datastore's (``context`` tokens, each later
  window scoring ``stride`` new ones, ``<bos>`` in front of every window that starts inside the
  document when the tokenizer uses one). Every token but the document's first is scored; with a
  ``<bos>`` tokenizer the first token is scored too, after the ``<bos>``. (lm-eval's ``hf`` model
  instead prefixes an EOS/BOS token and uses windows of the model's whole length, disjoint after
  the first: the two agree exactly on documents shorter than one window when the tokenizer adds
  ``<bos>``; otherwise they differ by the first token's term and the window boundaries.)
* ``loglikelihood`` (and multiple choice) tokenizes context and continuation as lm-eval's ``hf``
  model does (``TemplateLM``: the context's trailing spaces move to the continuation, an empty
  context becomes the EOS/BOS prefix token) and scores the continuation in one window holding the
  last ``context`` tokens (``<bos>`` in front when that cuts the text), or with the rolling
  windows when the continuation alone is longer; ``is_greedy`` is the argmax of the kNN-LM
  distribution. Up to ``context`` tokens this is exactly lm-eval's ``hf`` computation.
* ``generate_until`` runs ``KNNLM.generate`` (``model.generate`` without a datastore) on left-
  padded batches, stops at the ``until`` strings (transformers' ``stop_strings``) and cuts the text
  at the first of them; ``max_gen_toks`` (or ``max_new_tokens``) caps the new tokens.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence

import numpy as np
import torch
from lm_eval.api.model import TemplateLM

from knnlm.capture import capture_keys
from knnlm.config import EvalConfig, KNNSettings, check_at_least, check_context, check_k
from knnlm.data import Window, batch_inputs, windows
from knnlm.datastore import open_datastore
from knnlm.errors import ConfigError, KnnlmError, rename_params
from knnlm.evaluation import eval_window
from knnlm.loading import DEFAULT_MODEL, load_model, load_tokenizer, resolve_device
from knnlm.model import KNNLM
from knnlm.model import evaluate as evaluate_plain

logger = logging.getLogger(__name__)

__all__ = ["KNNLMHarness", "MODEL_ARGS", "NAME", "register", "main"]

NAME = "knnlm"
DEFAULT_LAMBDA = KNNSettings().lam  # the package's default mixture weight
# the library's parameter names -> the --model_args key that sets them (errors speak model_args)
MODEL_ARGS = {
    "model": "pretrained", "pretrained": "pretrained", "datastore": "datastore", "lam": "lambda",
    "lambdas": "lambda", "lambda": "lambda", "k": "k", "ks": "k", "temperature": "temperature",
    "temperatures": "temperature", "nprobe": "nprobe", "batch_size": "batch_size", "device": "device",
    "dtype": "dtype", "context": "context", "stride": "stride", "max_gen_toks": "max_gen_toks",
}
_ACCEPTED = sorted(set(MODEL_ARGS.values()))


def _harness_message(message: str) -> str:
    """A library error message in model_args words: every `parameter` becomes its model_args key."""
    return rename_params(message, {k: f"`{v}`" for k, v in MODEL_ARGS.items()})


def _number(name: str, value, kind: type, *, none_ok: bool = True):
    """A model_args value as ``kind`` (int or float); strings from the command line are parsed."""
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        if none_ok:
            return None
        raise ConfigError(f"`{name}` needs a value", param=name)
    try:
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value.strip())
        return float(value)
    except (TypeError, ValueError):
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"`{name}` must be {what}, got {value!r}", param=name) from None


class KNNLMHarness(TemplateLM):
    """An lm-eval ``LM`` (through ``TemplateLM``, the tokenizing base lm-eval's ``hf`` model uses)
    scoring with a ``KNNLM`` -- or with the plain LM when no ``datastore`` is given."""

    def __init__(self, pretrained: str | KNNLM = DEFAULT_MODEL, datastore: str | None = None, k=None,
                 temperature=1.0, nprobe=None, batch_size=8, device: str | None = "auto", dtype: str = "auto",
                 context=None, stride=None, max_gen_toks=256, **kwargs):
        """``pretrained``: what ``knnlm --model`` takes, or an already built ``KNNLM`` (its model,
        tokenizer, datastore and settings are used as they are; ``datastore`` / ``lambda`` / ``k``
        / ``temperature`` / ``nprobe`` / ``device`` / ``dtype`` must then be left unset)."""
        super().__init__()
        try:
            if isinstance(pretrained, KNNLM):
                self._adopt(pretrained, datastore, k, nprobe, batch_size, context, stride, max_gen_toks, kwargs,
                            temperature)
            else:
                self._setup(pretrained, datastore, k, temperature, nprobe, batch_size, device, dtype, context, stride,
                            max_gen_toks, **kwargs)
        except KnnlmError as e:
            raise type(e)(_harness_message(str(e)), param=MODEL_ARGS.get(e.param, e.param)) from None

    def _common(self, batch_size, max_gen_toks, context, stride) -> None:
        self.batch_size = _number("batch_size", batch_size, int, none_ok=False)
        check_at_least("batch_size", self.batch_size, 1)
        self._max_gen_toks = _number("max_gen_toks", max_gen_toks, int, none_ok=False)
        check_at_least("max_gen_toks", self._max_gen_toks, 1)
        self.cfg = EvalConfig(context=_number("context", context, int), stride=_number("stride", stride, int),
                              batch_size=self.batch_size)

    def _adopt(self, knn: KNNLM, datastore, k, nprobe, batch_size, context, stride, max_gen_toks, kwargs,
               temperature) -> None:
        """A built ``KNNLM`` as the model (as lm-eval's ``hf`` model accepts a model object)."""
        given = [n for n, v in (("datastore", datastore), ("k", k), ("nprobe", nprobe), *kwargs.items())
                 if v is not None]
        given += ["temperature"] if temperature != 1.0 else []
        if given:  # the KNNLM's own model (on its device, in its dtype) and settings are used
            raise ConfigError(f"`{given[0]}` cannot be set with a built KNNLM as `pretrained`: set it on the KNNLM",
                              param=given[0])
        self._common(batch_size, max_gen_toks, context, stride)
        self.knn, self.model, self.tokenizer = knn, knn.model, knn.tokenizer
        self._device = next(self.model.parameters()).device
        self.context, self.stride, self.bos = eval_window(self.cfg, knn.datastore, self.tokenizer)
        check_context(self.context, self.bos, getattr(self.model.config, "max_position_embeddings", None))

    def _setup(self, pretrained, datastore, k, temperature, nprobe, batch_size, device, dtype, context, stride,
               max_gen_toks, **kwargs) -> None:
        lam = kwargs.pop("lambda", DEFAULT_LAMBDA)
        if kwargs:
            raise ConfigError(f"`{sorted(kwargs)[0]}` is not a knnlm model_args key; use "
                              f"{', '.join(_ACCEPTED)}", param=sorted(kwargs)[0])
        # every check that needs no model first: the settings are validated once, by KNNSettings
        settings = KNNSettings(lam=lam, temperature=_number("temperature", temperature, float, none_ok=False),
                               k=_number("k", k, int), nprobe=_number("nprobe", nprobe, int))
        self._common(batch_size, max_gen_toks, context, stride)
        resolve_device(device)
        ds = open_datastore(datastore) if datastore not in (None, "") else None
        if ds is not None:
            check_k(settings.k, len(ds))
        tokenizer = load_tokenizer(str(pretrained))
        if ds is not None:
            ds.check_tokenizer(tokenizer)  # another tokenizer's datastore: refused before the model loads
        self.model, self.tokenizer = load_model(str(pretrained), device=device, dtype=dtype, tokenizer=tokenizer)
        self._device = next(self.model.parameters()).device
        self.knn = None
        if ds is not None:
            self.knn = KNNLM(self.model, ds, self.tokenizer, settings)
        self.context, self.stride, self.bos = eval_window(self.cfg, ds, self.tokenizer)
        check_context(self.context, self.bos, getattr(self.model.config, "max_position_embeddings", None))
        logger.info("knnlm harness model: %s, %s, windows %d/%d%s", pretrained,
                    f"datastore {datastore} (lambda {settings.lam}, k {self.knn.k}, temperature {settings.temperature})"
                    if self.knn is not None else "no datastore (plain LM)", self.context, self.stride,
                    ", <bos> per window" if self.bos is not None else "")

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> KNNLMHarness:
        """lm-eval's ``--batch_size`` / ``--device`` (always passed, default 1 / ``cuda:0``) fill in
        what ``--model_args`` leaves unset; a CUDA ``--device`` without a GPU falls back to ``auto``
        (as lm-eval's ``hf`` model does); ``max_batch_size`` (auto batching) does not apply."""
        args = dict(arg_dict)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if "batch_size" not in args and "batch_size" in extra:
            args["batch_size"] = extra["batch_size"]
        if "device" not in args and "device" in extra:
            dev = str(extra["device"])
            args["device"] = "auto" if dev.startswith("cuda") and not torch.cuda.is_available() else dev
        return cls(**args)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> KNNLMHarness:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ---- what TemplateLM needs -----------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context becomes (as lm-eval's ``hf`` model: BOS, else EOS)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "knnlm")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids with the tokenizer's own special tokens (``<bos>`` where it adds one), as
        ``knnlm eval`` tokenizes documents."""
        return self.tokenizer.encode(string, add_special_tokens=True if add_special_tokens is None
                                     else add_special_tokens)

    # ---- loglikelihood ---------------------------------------------------------------------------
    def _request_windows(self, i: int, n: int, first: int) -> list[Window]:
        """Windows scoring targets ``[first, n)`` of request ``i`` (``n`` tokens)."""
        if n - first <= self.context - 1:  # one window: the last `context` tokens
            return [Window(i, max(0, n - self.context), n, first)]
        return [Window(i, s, e, max(f, first)) for s, e, f in windows(n, self.context, self.stride) if e > first]

    def _log_probs(self, ids: torch.Tensor, rows_b: torch.Tensor, rows_t: torch.Tensor) -> torch.Tensor:
        """kNN-LM (or LM) log-distributions (R, V) at the given positions of ``ids`` (B, T)."""
        if self.knn is None:
            logits = self.model(input_ids=ids, use_cache=False).logits  # (B, T, V)
            return torch.log_softmax(logits[rows_b, rows_t].float(), dim=-1)
        with capture_keys(self.model, self.knn.key_layer) as cap:
            logits, keys = cap.forward(ids)  # (B, T, V), (B, T, D)
        return self.knn.log_probs(logits[rows_b, rows_t].float(), keys[rows_b, rows_t])  # (R, V)

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        from tqdm.auto import tqdm

        toks = [np.asarray(list(ctx) + list(cont), dtype=np.int64) for _, ctx, cont in requests]
        wins = [w for i, (_, ctx, _) in enumerate(requests) for w in self._request_windows(i, len(toks[i]), len(ctx))]
        wins.sort(key=lambda w: w.start - w.end)  # longest first: batches of similar width
        total = torch.zeros(len(requests), dtype=torch.float64)
        greedy = torch.ones(len(requests), dtype=torch.bool)
        pad = self.tokenizer.pad_token_id or 0
        for lo in tqdm(range(0, len(wins), self.batch_size), desc="knnlm loglikelihood", disable=disable_tqdm):
            batch = wins[lo: lo + self.batch_size]
            ids, rows_b, rows_t = (torch.from_numpy(a).to(self._device)
                                   for a in batch_inputs(batch, toks.__getitem__, self.bos, pad))
            lp = self._log_probs(ids, rows_b, rows_t)  # (R, V)
            tgt = ids[rows_b, rows_t + 1]  # (R,)
            req = torch.cat([torch.full((w.end - w.first,), w.doc) for w in batch])  # (R,)
            total.index_add_(0, req, lp.gather(1, tgt[:, None])[:, 0].double().cpu())
            miss = (lp.argmax(dim=-1) != tgt).cpu()
            greedy[req[miss]] = False
        out = []
        for (key, _, _), ll, g in zip(requests, total.tolist(), greedy.tolist()):
            out.append((ll, bool(g)))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, (ll, bool(g)))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's log-likelihood under ``knnlm eval``'s window protocol (module docstring)."""
        texts = [req.args[0] for req in requests]
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]] if texts else []
        scored = [i for i, n in enumerate(lengths) if n > 1]  # a 1-token document has nothing to predict
        out = [0.0] * len(texts)
        if scored:
            settings = dict(texts=[texts[i] for i in scored], per_document=True, batch_size=self.batch_size,
                            context=self.cfg.context, stride=self.cfg.stride, progress=not disable_tqdm)
            if self.knn is not None:
                res, field = self.knn.evaluate(**settings), "nll_knn"
            else:
                texts_ = settings.pop("texts")
                res, field = evaluate_plain(self.model, self.tokenizer, None, cfg=EvalConfig(**settings),
                                            texts=texts_), "nll_base"
            for i, doc in zip(scored, res["per_document"]):
                out[i] = -doc[field]
            n, nll = res["tokens"], sum(d[field] for d in res["per_document"])
            logger.info("knnlm loglikelihood_rolling: %d documents, %d scored tokens, token perplexity %.4f "
                        "(what `knnlm eval` reports; base LM %.4f)", len(scored), n, math.exp(nll / n),
                        res["ppl_base"])
        for text, ll in zip(texts, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), ll)
        return out

    # ---- generation ------------------------------------------------------------------------------
    def _gen_settings(self, gen_kwargs: dict) -> tuple[list[str], int, dict]:
        """(stop strings, max new tokens, other ``generate`` kwargs) from a request's gen_kwargs."""
        kw = dict(gen_kwargs)
        until = kw.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        max_new = next((kw.pop(a) for a in ("max_gen_toks", "max_new_tokens", "max_tokens") if kw.get(a)), None)
        for a in ("max_gen_toks", "max_new_tokens", "max_tokens"):
            kw.pop(a, None)
        max_new = int(max_new or self.max_gen_toks)
        temperature = float(kw.pop("temperature", 0.0) or 0.0)
        do_sample = kw.pop("do_sample", None)
        do_sample = temperature > 0 if do_sample is None else bool(do_sample)
        if do_sample:
            kw["temperature"] = temperature if temperature > 0 else 1.0
        kw["do_sample"] = do_sample
        return [s for s in until if s], max_new, kw

    @torch.inference_mode()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tqdm.auto import tqdm

        res: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        bar = tqdm(total=len(requests), desc="knnlm generate_until", disable=disable_tqdm)
        for members in groups.values():
            until, max_new, kw = self._gen_settings(requests[members[0]].args[1])
            if until:
                kw.update(stop_strings=until, tokenizer=self.tokenizer)
            for lo in range(0, len(members), self.batch_size):
                idx = members[lo: lo + self.batch_size]
                enc = [self.tok_encode(requests[i].args[0]) for i in idx]
                if limit:
                    enc = [e[-max(1, limit - max_new):] for e in enc]
                width = max(len(e) for e in enc)
                ids = torch.full((len(enc), width), pad, dtype=torch.long)  # (B, T), left-padded
                mask = torch.zeros((len(enc), width), dtype=torch.long)
                for b, e in enumerate(enc):
                    ids[b, width - len(e):] = torch.tensor(e)
                    mask[b, width - len(e):] = 1
                ids, mask = ids.to(self._device), mask.to(self._device)
                gen = self.knn.generate if self.knn is not None else self.model.generate
                out = gen(ids, attention_mask=mask, max_new_tokens=max_new, pad_token_id=pad, **kw)
                for b, i in enumerate(idx):
                    text = self.tokenizer.decode(out[b, width:].tolist(), skip_special_tokens=True)
                    for stop in until:  # cut at the first stop string
                        text = text.split(stop)[0]
                    res[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(1)
        bar.close()
        return res


def register() -> None:
    """Register ``knnlm`` in lm-eval's model registry (idempotent; lm-eval's own models first, so
    that its lazy import of them still happens)."""
    import lm_eval.models  # noqa: F401 - registers lm-eval's models; get_model skips that once ours is in
    from lm_eval.api.registry import model_registry

    if NAME not in model_registry:  # a placeholder, imported on first use (also when this file runs as __main__)
        model_registry.register(NAME, target="knnlm.harness:KNNLMHarness")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m knnlm.harness ARGS``: lm-eval's command line with ``--model knnlm`` registered.
    A knnlm error (a bad model_args value, a missing datastore) is printed as one line."""
    from lm_eval.__main__ import cli_evaluate

    register()
    log = logging.getLogger("knnlm")
    level, handler = log.level, None
    log.setLevel(logging.INFO)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
    saved, sys.argv = sys.argv, ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    except KnnlmError as e:
        print(f"knnlm.harness: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
        if handler is not None:  # the process may go on (a test, a notebook): leave logging as it was
            log.removeHandler(handler)
        log.setLevel(level)
    return 0


register()

if __name__ == "__main__":
    sys.exit(main())
