"""`SleepingLM`: lm-evaluation-harness's model `sleepscale`, which reads every request the way training
reads a sequence.

A request's tokens go through a `SleepingSession` (`sleepscale.inference.session`): a context longer
than a window is read window by window, sleeping N passes on each window before it is evicted, then
the continuation is scored (`loglikelihood`) or generated (`generate_until`) one pass per token.
Requests are batched `batch_size` at a time, longest first, as streams of different lengths in one
session (`feed_each`).

    lm_eval.simple_evaluate(model="sleepscale", model_args="pretrained=runs/quickstart,passes=3", tasks=[...])

once `sleepscale.harness.model` is imported (that registers the name), or `sleepscale eval RUN --lm-eval`.

Settings (`model_args`):
- `pretrained`: a run directory (its latest checkpoint), a training checkpoint or a model directory
  (`sleepscale convert`).
- `passes`: N (default: the run's `sleep.passes`; 1 for a model directory).
- `batch_size`: streams per session (default 8).
- `max_length`: at most this many tokens are read per request, the last ones (as the harness's `hf`
  model cuts). Default: no limit: a sleeping model reads any length, window by window; rolling
  log-likelihoods then read each document whole instead of in `max_length` pieces.
- `tokenizer`: a `tokenizer.json` (or its directory). Default: the run's dataset tokenizer, or a
  model directory's own `tokenizer.json` (`sleepscale convert` copies the source's).
- `window`, `eviction`: the sleep window and eviction; a run's own by default, required for a model
  directory, which has none.
- `device`: default `cuda` when there is one, else `cpu`. Weights and states are float32.

Tokens are encoded as the training data were, without special tokens: where the harness's `hf`
model adds a BOS token (Llama's tokenizers do), scores differ by that token.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from sleepscale.config import ConfigError, SleepConfig, validate
from sleepscale.convert.model_dir import is_model_dir, read_description
from sleepscale.data.sample import DataError
from sleepscale.data.shards import read_manifest
from sleepscale.data.tokenizer import HuggingFaceTokenizer, tokenizer_from_description
from sleepscale.inference.session import SleepingSession
from sleepscale.model import build_model
from sleepscale.model.weights import load_weights
from sleepscale.train.checkpoint import load_model_from_checkpoint, resolve_checkpoint

MAX_GEN_TOKS = 256  # the harness's default when a task names none
GENERATION_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p"}


@dataclasses.dataclass
class Evaluated:
    """What is evaluated: the model and how it sleeps, its tokenizer, and the training checkpoint it
    came from (None for a model directory)."""

    model: torch.nn.Module
    sleep: SleepConfig
    tokenizer: object
    checkpoint: Path | None
    config: object | None  # the run's Config


def load_evaluated(
    pretrained: str | Path,
    window: int | None = None,
    eviction: str | None = None,
    tokenizer: str | Path | None = None,
) -> Evaluated:
    """The model of a run directory, training checkpoint or model directory, in float32 on the CPU."""
    path = Path(pretrained)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run, checkpoint or model directory")
    overrides = {key: value for key, value in (("window", window), ("eviction", eviction)) if value is not None}
    if is_model_dir(path):
        if window is None:
            raise ConfigError(f"{path} is a model directory, which has no sleep window: give window=L (tokens)")
        config = validate({"model": read_description(path)["model"], "sleep": overrides, "train": {"steps": 1}})
        model = build_model(config.model)
        load_weights(model, path)
        return Evaluated(model, config.sleep, _tokenizer_of_model_dir(path, tokenizer), None, None)
    checkpoint = resolve_checkpoint(path)
    model, config = load_model_from_checkpoint(checkpoint)
    sleep = config.sleep.model_copy(update=overrides) if overrides else config.sleep
    if tokenizer is not None:
        chosen = _tokenizer_file(tokenizer)
    else:
        manifest, _ = read_manifest(config.data.path)
        chosen = tokenizer_from_description(manifest["tokenizer"])
    return Evaluated(model, sleep, chosen, checkpoint, config)


def _tokenizer_of_model_dir(path: Path, tokenizer: str | Path | None):
    if tokenizer is not None:
        return _tokenizer_file(tokenizer)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{path} has no tokenizer.json (its source had none): give tokenizer=PATH to a tokenizer.json"
        )
    return _tokenizer_file(path / "tokenizer.json")


def _tokenizer_file(path: str | Path) -> HuggingFaceTokenizer:
    """A `tokenizer.json` (or a directory holding one); its end-of-text token is the one the
    `tokenizer_config.json` beside it names, when there is one."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path}: no such file")
    eos = None
    settings = path.with_name("tokenizer_config.json")
    if settings.is_file():
        eos = json.loads(settings.read_text()).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
    return HuggingFaceTokenizer(path, eos_token=eos)


@register_model("sleepscale")
class SleepingLM(TemplateLM):
    def __init__(
        self,
        pretrained: str | None = None,
        passes: int | None = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        tokenizer: str | None = None,
        window: int | None = None,
        eviction: str | None = None,
        device: str | None = None,
        evaluated: Evaluated | None = None,
        **unknown,
    ):
        """`evaluated`: an already loaded model (`load_evaluated`) instead of `pretrained`."""
        super().__init__()
        if unknown:
            raise ConfigError(
                f"unknown sleepscale model argument(s) {', '.join(sorted(unknown))}; it takes pretrained, "
                "passes, batch_size, max_length, tokenizer, window, eviction and device"
            )
        if (pretrained is None) == (evaluated is None):
            raise ConfigError("give the sleepscale model pretrained=<run, checkpoint or model directory>")
        if not (isinstance(batch_size, int) or str(batch_size).isdigit()) or int(batch_size) < 1:
            raise ConfigError(f"batch_size={batch_size}: give a number of streams >= 1 (auto is not supported)")
        if passes is not None and int(passes) < 1:
            raise ConfigError(f"passes={passes}: give N >= 1")
        if max_length is not None and int(max_length) < 2:
            raise ConfigError(f"max_length={max_length}: give at least 2 tokens, or leave it out (no limit)")
        self.evaluated = evaluated or load_evaluated(pretrained, window, eviction, tokenizer)
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = self.evaluated.model.to(self._device).eval()
        self.tokenizer = self.evaluated.tokenizer
        self.sleep = self.evaluated.sleep.model_copy(
            update={"passes": int(passes or self.evaluated.sleep.passes), "random_passes": None}
        )
        self.batch_size = int(batch_size)
        self._max_length = None if max_length is None else int(max_length)
        if self.tokenizer.vocab_size > self.model.config.vocab_size:
            raise ConfigError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens, the model's vocabulary "
                f"{self.model.config.vocab_size}: give the tokenizer the model was trained with"
            )

    @property
    def passes(self) -> int:
        return self.sleep.passes

    @property
    def max_length(self) -> int | None:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def eot_token_id(self) -> int:
        eos = getattr(self.tokenizer, "eos_id", None)
        if eos is None:
            raise ConfigError(
                "the tokenizer (a task's own symbols) has no end-of-text token, which requests with an empty "
                "context and loglikelihood_rolling start from: give contexts, or a tokenizer with one"
            )
        return eos

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        try:
            return self.tokenizer.encode(string)
        except DataError as error:  # a task written in other tokens than the model's (text for a symbol task)
            raise ConfigError(f"a request's text is not in the model's vocabulary: {error}") from None

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------ scoring

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """`requests`: (cache key, context tokens, continuation tokens). Each stream reads its context
        but the last token without logits, then the last context token and the continuation but its
        last token, whose logits score the continuation: a window's worth of tokens at a time, so that
        a long continuation (a whole document, `loglikelihood_rolling`) never holds its logits at once."""
        inputs = [self._scored_inputs(context, continuation) for _, context, continuation in requests]
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for batch in self._batches(sorted(range(len(requests)), key=lambda i: -len(inputs[i]))):
            session = SleepingSession(self.model, self.sleep, batch_size=len(batch), device=self._device)
            targets = [requests[i][2] for i in batch]
            heads = [inputs[i][: -len(target)] for i, target in zip(batch, targets)]
            if any(heads):
                session.feed_each(heads, logits=False)
            tails = [inputs[i][-len(target) :] for i, target in zip(batch, targets)]
            scores, greedy = [0.0] * len(batch), [True] * len(batch)
            for start in range(0, max(map(len, tails)), self.sleep.window):
                pieces = [tail[start : start + self.sleep.window] for tail in tails]
                for row, piece_logits in enumerate(session.feed_each(pieces)):
                    if not len(piece_logits):
                        continue  # this stream's continuation has ended
                    target = torch.tensor(targets[row][start : start + self.sleep.window], device=self._device)
                    logprobs = torch.log_softmax(piece_logits.float(), dim=-1)
                    scores[row] += logprobs.gather(-1, target[:, None]).sum().item()
                    greedy[row] = greedy[row] and bool((logprobs.argmax(-1) == target).all())
            for row, i in enumerate(batch):
                results[i] = (scores[row], greedy[row])
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def _scored_inputs(self, context: list[int], continuation: list[int]) -> list[int]:
        """The tokens read to score `continuation` after `context`: all but the last, cut to the last
        `max_length` when there is a limit."""
        if not continuation:
            raise ValueError("a loglikelihood request with an empty continuation has nothing to score")
        tokens = context + continuation
        if self._max_length is not None:
            tokens = tokens[-(self._max_length + 1) :]
            if len(continuation) >= len(tokens):
                raise ConfigError(
                    f"a continuation of {len(continuation)} tokens does not fit max_length={self._max_length}"
                )
        return tokens[:-1]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document read from the prefix token on, every token scored once. Without
        `max_length` the document is one stream, slept on window by window; with it, the harness's
        rolling windows of `max_length` tokens."""
        pieces, owner = [], []
        for index, request in enumerate(requests):
            tokens = self.tok_encode(request.args[0])
            if not tokens:
                continue
            if self._max_length is None:
                windows = [([self.prefix_token_id], tokens)]
            else:
                rolling = get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self._max_length, context_len=1
                )
                windows = [make_disjoint_window(window) for window in rolling]
            for context, continuation in windows:
                pieces.append((None, list(context), list(continuation)))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (score, _) in zip(owner, self._loglikelihood_tokens(pieces, disable_tqdm)):
            totals[index] += score
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with `do_sample`) continuations up to `max_gen_toks` tokens, the
        end-of-text token or the first of the `until` strings, which is cut off. Requests with the
        same generation settings run together."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(index)
        for indices in groups.values():
            settings = _generation_settings(requests[indices[0]].args[1])
            contexts = {i: self._generation_context(requests[i].args[0], settings["max_gen_toks"]) for i in indices}
            for batch in self._batches(sorted(indices, key=lambda i: -len(contexts[i]))):
                texts = self._generate(batch, contexts, settings)
                for i, text in zip(batch, texts):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results

    def _generation_context(self, context: str, max_gen_toks: int) -> list[int]:
        tokens = self.tok_encode(context) or [self.prefix_token_id]
        if self._max_length is not None:
            if max_gen_toks >= self._max_length:
                raise ConfigError(f"max_gen_toks={max_gen_toks} leaves no context within max_length={self._max_length}")
            tokens = tokens[-(self._max_length - max_gen_toks) :]
        return tokens

    def _generate(self, batch: list[int], contexts: dict[int, list[int]], settings: dict) -> list[str]:
        session = SleepingSession(self.model, self.sleep, batch_size=len(batch), device=self._device)
        session.feed_each([contexts[i] for i in batch], logits=False)
        eos = getattr(self.tokenizer, "eos_id", None)
        generator = torch.Generator(device=self._device).manual_seed(settings["seed"])
        tokens: list[list[int]] = [[] for _ in batch]
        stream = session.generate(
            settings["max_gen_toks"],
            settings["temperature"],
            settings["top_p"],
            stop_tokens=() if eos is None else (eos,),
            generator=generator,
            vocabulary=self.tokenizer.vocab_size,
        )
        for step in stream:
            for row, token in enumerate(step.tolist()):  # the host needs the tokens to look for `until`
                tokens[row].append(token)
            if all(_stop_at(self._text(row_tokens, eos), settings["until"]) is not None for row_tokens in tokens):
                break
        texts = []
        for row_tokens in tokens:
            text = self._text(row_tokens, eos)
            stop = _stop_at(text, settings["until"])
            texts.append(text if stop is None else text[:stop])
        return texts

    def _text(self, tokens: list[int], eos: int | None) -> str:
        """The text of the tokens before the first end-of-text token."""
        if eos is not None and eos in tokens:
            tokens = tokens[: tokens.index(eos)]
        return self.tok_decode(tokens)

    def _batches(self, order: list[int]) -> Iterator[list[int]]:
        for start in range(0, len(order), self.batch_size):
            yield order[start : start + self.batch_size]


def _generation_settings(gen_kwargs: dict) -> dict:
    """The harness's generation arguments as `SleepingSession.generate` takes them; others are refused."""
    unknown = set(gen_kwargs) - GENERATION_KEYS
    if unknown:
        raise ConfigError(
            f"generation argument(s) {', '.join(sorted(unknown))} are not supported by the sleepscale model; "
            f"it takes {', '.join(sorted(GENERATION_KEYS))}"
        )
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    sampled = bool(gen_kwargs.get("do_sample", False))
    return {
        "until": [stop for stop in until if stop],
        "max_gen_toks": int(gen_kwargs.get("max_gen_toks", MAX_GEN_TOKS)),
        "temperature": float(gen_kwargs.get("temperature", 1.0)) if sampled else 0.0,
        "top_p": float(gen_kwargs.get("top_p", 1.0)) if sampled else 1.0,
        "seed": 1234,
    }


def _stop_at(text: str, until: list[str]) -> int | None:
    """Where the first of the `until` strings starts in `text` (None: none occurs)."""
    found = [text.index(stop) for stop in until if stop in text]
    return min(found) if found else None
