"""Inference backends shared by the chat demo (`apps.chat`) and the terminal CLI (`apps.generate`).

One interface, two engines, chosen from the model path by `load_backend`:
- `TorchBackend`: a `rodin` model (our model directory, an HF Llama directory, an upstream
  `.pt` file or a hub id), on CPU (fp32) or GPU (bf16), as `rodin.checkpoint.load_model` picks.
- `LlamaCppBackend`: a `.gguf` file run by llama.cpp through `llama-cpp-python`.

Both render prompts with `rodin.chat` and decode with `rodin.generate.stream`: the same
sampling (`SamplingConfig`), stop handling (`<|im_end|>` never reaches the text) and UTF-8-safe
streaming. The GGUF backend hands llama.cpp's logits to rodin's generation loop through a small
model facade, so an f32 export gives the same greedy reply as the PyTorch model.

Concurrency (several users of one server): the model is shared, and its per-conversation
state (the rodin KV cache lives on the model, llama.cpp has one context) must not be. Each
stream owns its state and takes the backend's lock for one decoding step at a time:
- PyTorch: every stream has its own KV cache, swapped onto the model under the lock for the
  step, so concurrent conversations interleave token by token and never share a cache.
- llama.cpp: every stream keeps its own token history; at each step the shared context is
  brought to that history, reusing the longest common prefix already evaluated (only a
  conversation switch re-evaluates its tokens, as llama.cpp's high-level API has one sequence).
Holding the lock per step, never across a `yield`, means a stream abandoned by its client
(the Stop button) blocks nobody.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from rodin import chat
from rodin.generate import GenerationResult, SamplingConfig, TextStream, stream
from rodin.tokenizer import TOKENIZER_FILE, Tokenizer

log = logging.getLogger(__name__)

MODES = ("auto", "chat", "completion")


class Reply:
    """Text chunks of one generation, produced one locked step at a time; `.result` at the end."""

    def __init__(self, inner: TextStream, lock: threading.Lock, swap_in: Callable[[], None] | None = None,
                 swap_out: Callable[[], None] | None = None, release: Callable[[], None] | None = None):
        self._inner = inner
        self._it = iter(inner)
        self._lock = lock
        self._swap_in = swap_in
        self._swap_out = swap_out
        self._release = release
        self.text = ""

    @property
    def result(self) -> GenerationResult:
        return self._inner.result

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        with self._lock:
            if self._swap_in:
                self._swap_in()
            try:
                chunk = next(self._it, None)
            finally:
                if self._swap_out:
                    self._swap_out()
        if chunk is None:
            self.close()
            raise StopIteration
        self.text += chunk
        return chunk

    def close(self) -> None:
        """Free this stream's state (its KV cache); called at the end, safe to call again."""
        # Close the token generator now rather than at interpreter shutdown, where torch's
        # inference-mode wrapper complains.
        with self._lock:
            self._inner.close()
        if self._release:
            self._release()
            self._release = None


class Backend:
    """What the apps need of an inference engine."""

    name: str = ""
    tokenizer: Tokenizer
    context_length: int
    is_chat: bool
    path: Path

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def stream_ids(self, prompt_ids: Sequence[int], max_new_tokens: int, sampling: SamplingConfig,
                   stop_strings: Sequence[str] = (), stop_ids: Sequence[int] | None = None) -> Reply:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name}: {self.path} (context {self.context_length} tokens, {'chat' if self.is_chat else 'base'})"


class TorchBackend(Backend):
    name = "pytorch"

    def __init__(self, path: str | os.PathLike, device: str = "auto", dtype: torch.dtype | None = None):
        super().__init__()
        from rodin.checkpoint import load_model, load_tokenizer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.info = load_model(path, device=device, dtype=dtype)
        self.tokenizer = load_tokenizer(self.info)
        self.context_length = self.info.cfg.context_length
        self.is_chat = self.info.is_chat
        self.path = Path(self.info.path)
        self.device = device

    def stream_ids(self, prompt_ids, max_new_tokens, sampling, stop_strings=(), stop_ids=None) -> Reply:
        blocks = self.model.blocks
        state: list = [None] * len(blocks)  # this stream's KV cache, one per block; allocated on first step

        def swap_in() -> None:
            for block, cache in zip(blocks, state):
                block.attn.kv_cache = cache

        def swap_out() -> None:
            for i, block in enumerate(blocks):
                state[i], block.attn.kv_cache = block.attn.kv_cache, None

        def release() -> None:
            state[:] = [None] * len(blocks)

        inner = stream(self.model, self.tokenizer, prompt_ids, max_new_tokens, sampling=sampling,
                       stop_strings=stop_strings, stop_ids=stop_ids)
        return Reply(inner, self.lock, swap_in, swap_out, release)


class LlamaCppTokenizer:
    """llama.cpp's own tokenizer behind the `rodin.tokenizer.Tokenizer` methods that
    `rodin.chat` and `rodin.generate` use (for a .gguf with no tokenizer.model beside it)."""

    def __init__(self, llm):
        self.llm = llm
        self.path = Path(llm.model_path)
        self.vocab_size = llm.n_vocab()
        self.bos_id, self.eos_id = llm.token_bos(), llm.token_eos()
        self.unk_id = -1
        self.has_atomic_chatml = all(self.piece_to_id(s) != self.unk_id for s in chat.STOP_STRINGS)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) if text else []
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return self.llm.detokenize(list(ids)).decode("utf-8", errors="replace")

    def piece_to_id(self, piece: str) -> int:
        ids = self.llm.tokenize(piece.encode("utf-8"), add_bos=False, special=True)
        return ids[0] if len(ids) == 1 else self.unk_id


class _LlamaCppModel:
    """What `rodin.generate` uses of a Transformer, computed by llama.cpp for one stream.

    Holds the stream's token history; each forward call brings the shared llama.cpp context
    to that history (the caller holds the backend lock) and returns the last token's logits.
    """

    def __init__(self, backend: LlamaCppBackend):
        self._backend = backend
        self.cfg = SimpleNamespace(context_length=backend.context_length)
        self.tok_emb = SimpleNamespace(weight=torch.empty(0))  # generation reads the device from here
        self.kv_cache_length = backend.context_length  # the context is allocated once, by llama.cpp
        self._tokens: list[int] = []

    def setup_kv_cache(self, *args, **kwargs) -> None:
        pass

    def __call__(self, idx: torch.Tensor, *, input_pos: int | None = None,
                 last_token_only: bool = True) -> torch.Tensor:
        start = input_pos or 0
        self._tokens = self._tokens[:start] + idx[0].tolist()
        logits = self._backend.eval_logits(self._tokens)
        return torch.from_numpy(logits)[None, None]  # (1, 1, V)


class LlamaCppBackend(Backend):
    name = "llama.cpp"

    def __init__(self, path: str | os.PathLike, n_ctx: int = 0, n_threads: int | None = None,
                 tokenizer: str | os.PathLike | None = None):
        super().__init__()
        try:
            from llama_cpp import Llama
        except ImportError as e:
            raise ImportError("the GGUF backend needs llama-cpp-python: pip install llama-cpp-python") from e
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        # n_ctx 0 = the context length stored in the GGUF (llama.context_length).
        self.llm = Llama(model_path=str(self.path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                         verbose=False)
        # Free the context while the interpreter is intact (Llama.__del__ at shutdown raises noise).
        atexit.register(self.llm.close)
        self.context_length = self.llm.n_ctx()
        self.n_vocab = self.llm.n_vocab()
        sp_path = Path(tokenizer) if tokenizer else self.path.parent / TOKENIZER_FILE
        if sp_path.exists():
            self.tokenizer = Tokenizer(sp_path)
            if self.tokenizer.vocab_size > self.n_vocab:  # fewer pieces is a padded embedding: fine
                raise ValueError(f"{self.tokenizer.path} has {self.tokenizer.vocab_size} pieces but {self.path} "
                                 f"has a {self.n_vocab}-token vocabulary; they do not belong together. Remove or "
                                 f"fix the tokenizer file to use the GGUF's own vocabulary")
        else:
            self.tokenizer = LlamaCppTokenizer(self.llm)
        template = self.llm.metadata.get("tokenizer.chat_template")
        self.is_chat = bool(template) and chat.IM_START in template

    def eval_logits(self, tokens: list[int]):
        """Logits (V,) after `tokens`, reusing what the context already holds. Caller holds the lock."""
        import llama_cpp
        import numpy as np

        llm = self.llm
        limit = min(llm.n_tokens, len(tokens) - 1)  # re-evaluate at least the last token to get its logits
        differ = np.flatnonzero(llm.input_ids[:limit] != np.asarray(tokens[:limit], dtype=llm.input_ids.dtype))
        n = int(differ[0]) if differ.size else limit  # tokens already in the context
        llm.n_tokens = n
        llm.eval(tokens[n:])
        ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def stream_ids(self, prompt_ids, max_new_tokens, sampling, stop_strings=(), stop_ids=None) -> Reply:
        inner = stream(_LlamaCppModel(self), self.tokenizer, prompt_ids, max_new_tokens, sampling=sampling,
                       stop_strings=stop_strings, stop_ids=stop_ids)
        return Reply(inner, self.lock)


def load_backend(path: str | os.PathLike, *, device: str = "auto", dtype: torch.dtype | None = None,
                 n_ctx: int = 0, n_threads: int | None = None) -> Backend:
    """A `.gguf` file runs on llama.cpp; anything else `rodin.checkpoint.load_model` reads runs on PyTorch.

    n_threads: CPU threads (llama.cpp's, or PyTorch's process-wide setting); None keeps the defaults.
    """
    if str(path).lower().endswith(".gguf"):
        return LlamaCppBackend(path, n_ctx=n_ctx, n_threads=n_threads)
    if n_threads:
        torch.set_num_threads(n_threads)
    return TorchBackend(path, device=device, dtype=dtype)


def resolve_mode(mode: str, backend: Backend) -> str:
    """'auto' picks chat for models that carry a ChatML template, completion otherwise."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if mode == "auto":
        return "chat" if backend.is_chat else "completion"
    return mode


@dataclass
class ChatTurn:
    """A chat reply being generated, and what was left out of the prompt to make room."""

    reply: Reply
    messages: list[dict]  # the messages actually sent (system prompt + kept turns + new message)
    dropped: int  # oldest messages removed to fit the context


def prompt_budget(backend: Backend, max_new_tokens: int) -> int:
    """Tokens left for the prompt once room is kept for the reply (at most half the window)."""
    return backend.context_length - min(max_new_tokens, backend.context_length // 2)


def start_chat(backend: Backend, messages: Sequence[dict], max_new_tokens: int,
               sampling: SamplingConfig | None = None) -> ChatTurn:
    """Stream the assistant's reply to `messages` (system prompt optional, last message = user).

    The oldest turns are dropped if the conversation does not fit (the system prompt and the
    newest message are kept); ValueError if the newest message alone does not fit.
    """
    kept, dropped = chat.fit_to_context(backend.tokenizer, messages, prompt_budget(backend, max_new_tokens))
    ids = chat.encode_prompt(backend.tokenizer, kept)
    reply = backend.stream_ids(ids, max_new_tokens, sampling or SamplingConfig(), stop_strings=chat.STOP_STRINGS,
                               stop_ids=chat.stop_token_ids(backend.tokenizer))
    return ChatTurn(reply, kept, dropped)


def start_completion(backend: Backend, text: str, max_new_tokens: int,
                     sampling: SamplingConfig | None = None) -> Reply:
    """Stream the continuation of `text` (BOS + text, no chat template).

    Stops at EOS, and at a ChatML marker too (a chat model used for completion would otherwise
    print them). A text longer than the window loses its beginning (`.result.truncated_prompt_tokens`)."""
    ids = backend.tokenizer.encode(text, bos=True)
    return backend.stream_ids(ids, max_new_tokens, sampling or SamplingConfig(), stop_strings=chat.STOP_STRINGS,
                              stop_ids=chat.stop_token_ids(backend.tokenizer))


def sampling_config(temperature: float = 0.0, top_p: float | None = None, top_k: int | None = None,
                    repetition_penalty: float = 1.0, seed: int | None = None) -> SamplingConfig:
    """A SamplingConfig from UI/CLI values: top_k 0, top_p 1 and a negative seed mean 'off'."""
    return SamplingConfig(
        temperature=float(temperature or 0.0),
        top_k=int(top_k) if top_k and int(top_k) > 0 else None,
        top_p=float(top_p) if top_p is not None and 0 < float(top_p) < 1 else None,
        repetition_penalty=float(repetition_penalty or 1.0),
        seed=int(seed) if seed is not None and int(seed) >= 0 else None,
    )
