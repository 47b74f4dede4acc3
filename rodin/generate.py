"""Text generation: greedy and sampling, stop strings, UTF-8-safe streaming.

`stream()` yields text as it is produced; `generate()` runs it to the end. Prompts are
token ids (build chat prompts with `rodin.chat.encode_prompt`). The KV cache is prefilled
once, then one token is decoded at a time; nothing ever indexes past the context window.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rodin.model import Transformer
from rodin.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class SamplingConfig:
    """temperature 0 means greedy; top_k/top_p None (or 0 / 1.0) mean disabled."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None


@dataclass
class GenerationResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""  # "eos", "stop", "length" (max_new_tokens), "context" (window full) or "stopped"
    prompt_tokens: int = 0
    truncated_prompt_tokens: int = 0  # dropped from the start of the prompt to fit the window


def sample_next(logits: Tensor, cfg: SamplingConfig, history: Tensor | None, generator: torch.Generator | None) -> int:
    """Pick the next token id from fp32 logits (V,)."""
    logits = logits.float()
    if cfg.repetition_penalty != 1.0 and history is not None and history.numel():
        seen = logits[history]
        logits = logits.clone()
        logits[history] = torch.where(seen > 0, seen / cfg.repetition_penalty, seen * cfg.repetition_penalty)
    if cfg.temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and 0 < cfg.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) > cfg.top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _fit_prompt(prompt_ids: Sequence[int], max_new_tokens: int, context_length: int) -> tuple[list[int], int, int]:
    """Fit the prompt in the window. Returns (prompt, tokens dropped from its start, token budget).

    A prompt that fits is kept whole and generation stops when the window is full. A prompt
    that does not fit loses its oldest tokens, keeping room for min(max_new_tokens, half the
    window) new tokens.
    """
    prompt = list(prompt_ids)
    if not prompt:
        raise ValueError("the prompt is empty: pass at least one token (e.g. BOS)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    dropped = 0
    if len(prompt) >= context_length:
        keep = context_length - min(max_new_tokens, context_length // 2)
        dropped = len(prompt) - keep
        log.warning("prompt of %d tokens does not fit the %d-token context: dropped its first %d tokens",
                    len(prompt), context_length, dropped)
        prompt = prompt[dropped:]
    return prompt, dropped, min(max_new_tokens, context_length - len(prompt))


@torch.inference_mode()
def generate_token_ids(model: Transformer, prompt_ids: Sequence[int], max_new_tokens: int,
                       sampling: SamplingConfig | None = None, stop_ids: Sequence[int] = ()) -> Iterator[int]:
    """Yield generated ids one by one (the stop id included, then stop). Low level: no text."""
    sampling = sampling or SamplingConfig()
    device = model.tok_emb.weight.device
    ctx = model.cfg.context_length
    prompt, _, budget = _fit_prompt(prompt_ids, max_new_tokens, ctx)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    total = len(prompt) + budget
    if model.kv_cache_length < total:
        model.setup_kv_cache(1, max(total, min(ctx, 2 * total)))
    history = torch.tensor(prompt, device=device)
    logits = model(history[None], input_pos=0, last_token_only=True)[0, -1]
    pos = len(prompt)
    stop = set(stop_ids)
    for _ in range(budget):
        tok = sample_next(logits, sampling, history, generator)
        yield tok
        if tok in stop or pos >= ctx:
            return
        history = torch.cat([history, history.new_tensor([tok])])
        logits = model(history[-1:][None], input_pos=pos, last_token_only=True)[0, -1]
        pos += 1


class TextStream:
    """Iterator of text chunks; `.result` holds the GenerationResult once exhausted."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, prompt_ids: Sequence[int], max_new_tokens: int,
                 sampling: SamplingConfig | None, stop_strings: Sequence[str], stop_ids: Sequence[int] | None):
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        stop_ids = [tokenizer.eos_id] if stop_ids is None else list(stop_ids)
        self.stop_ids = set(stop_ids)
        prompt, dropped, budget = _fit_prompt(prompt_ids, max_new_tokens, model.cfg.context_length)
        self.result = GenerationResult(prompt_tokens=len(prompt), truncated_prompt_tokens=dropped)
        # Ran out of tokens because of max_new_tokens ("length") or of the window ("context").
        self._exhausted_reason = "length" if budget == max_new_tokens else "context"
        self._anchor = prompt[-1]
        self._anchor_text = tokenizer.decode([self._anchor])
        self._ids = generate_token_ids(model, prompt, max_new_tokens, sampling, stop_ids)
        self._emitted = 0  # characters of result.text already yielded

    def close(self) -> None:
        """Stop generating now (e.g. the client went away); the result keeps what was produced."""
        self._ids.close()
        if not self.result.finish_reason:
            self.result.finish_reason = "stopped"

    def _decode(self, ids: list[int]) -> str:
        # Decoding after the last prompt token keeps a word-initial space that SentencePiece
        # would strip from the first piece of a standalone decode.
        full = self.tokenizer.decode([self._anchor] + ids)
        if full.startswith(self._anchor_text):
            return full[len(self._anchor_text):]
        return self.tokenizer.decode(ids)

    def _safe_length(self, text: str) -> int:
        """How much of `text` can be shown now: no incomplete UTF-8, no possible stop-string prefix."""
        n = len(text)
        while n and text[n - 1] == "\ufffd":  # an unfinished multi-byte character
            n -= 1
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, n), 0, -1):
                if text[:n].endswith(s[:k]):
                    n -= k
                    break
        return n

    def __iter__(self) -> Iterator[str]:
        res = self.result
        text = ""
        for tok in self._ids:
            if tok in self.stop_ids:
                res.finish_reason = "eos"
                break
            res.token_ids.append(tok)
            text = self._decode(res.token_ids)
            hit = min((i for i in (text.find(s, max(0, self._emitted - len(s))) for s in self.stop_strings) if i >= 0),
                      default=-1)
            if hit >= 0:
                text = text[:hit]
                res.finish_reason = "stop"
                break
            n = self._safe_length(text)
            if n > self._emitted:
                yield text[self._emitted:n]
                self._emitted = n
        else:
            res.finish_reason = self._exhausted_reason
        res.text = text
        if len(text) > self._emitted:
            yield text[self._emitted:]
            self._emitted = len(text)


def stream(model: Transformer, tokenizer: Tokenizer, prompt_ids: Sequence[int], max_new_tokens: int = 256, *,
           sampling: SamplingConfig | None = None, stop_strings: Sequence[str] = (),
           stop_ids: Sequence[int] | None = None) -> TextStream:
    """Stream generated text. `stop_ids` defaults to EOS; generation also stops at any stop string,
    which never appears in the output."""
    return TextStream(model, tokenizer, prompt_ids, max_new_tokens, sampling, stop_strings, stop_ids)


def generate(model: Transformer, tokenizer: Tokenizer, prompt_ids: Sequence[int], max_new_tokens: int = 256, *,
             sampling: SamplingConfig | None = None, stop_strings: Sequence[str] = (),
             stop_ids: Sequence[int] | None = None) -> GenerationResult:
    ts = stream(model, tokenizer, prompt_ids, max_new_tokens, sampling=sampling, stop_strings=stop_strings,
                stop_ids=stop_ids)
    for _ in ts:
        pass
    return ts.result
