"""Tiny *trained* models for tests that need confident predictions (export parity, top-1
agreement, perplexity): a few seconds of AdamW on the shared French corpus turns a random
model into one whose next-token distribution is peaked, so quantization error shows up as
what it is instead of argmax flips between near-uniform logits.

    from tests.fixtures import make_tokenizer
    from tests.helpers.tiny import train_tiny_model

    tok = make_tokenizer(tmp / "tok")
    model_dir = train_tiny_model(tmp / "model", tok, dim=256, n_heads=4, n_kv_heads=2, ffn_dim=683, chat=True)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from rodin.chat import jinja_template, render
from rodin.checkpoint import save_model
from rodin.config import ModelConfig
from rodin.model import Transformer
from rodin.tokenizer import Tokenizer
from tests.fixtures import FRENCH_TEXTS

CHAT_EXAMPLES = [
    [{"role": "user", "content": "Quelle est la capitale de la France ?"},
     {"role": "assistant", "content": "La capitale de la France est Paris."}],
    [{"role": "system", "content": "Tu es un assistant serviable."},
     {"role": "user", "content": "Bonjour !"},
     {"role": "assistant", "content": "Bonjour ! Comment puis-je vous aider ?"}],
]


def training_stream(tokenizer: Tokenizer, chat: bool = False) -> torch.Tensor:
    """The corpus as one token stream (documents separated by EOS), ChatML examples for chat."""
    docs = list(FRENCH_TEXTS) + ([render(m) for m in CHAT_EXAMPLES] * 3 if chat else [])
    ids: list[int] = []
    for d in docs:
        ids += tokenizer.encode(d, bos=True, eos=True)
    return torch.tensor(ids)


def tiny_config(tokenizer: Tokenizer, **overrides) -> ModelConfig:
    """rodin-debug with the tokenizer's vocabulary (and any field overridden)."""
    base = dataclasses.replace(ModelConfig.from_name("rodin-debug"), vocab_size=tokenizer.vocab_size)
    return dataclasses.replace(base, **{"name": "rodin-test", **overrides})


def train_tiny_model(out_dir: Path, tokenizer: Tokenizer, *, steps: int = 40, chat: bool = False, seed: int = 0,
                     seq_len: int = 64, batch_size: int = 8, lr: float = 3e-3, **overrides) -> Path:
    """Train a tiny model for `steps` AdamW steps on the French corpus and save it (our format)."""
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster and immune to a busy machine
    try:
        return _train(out_dir, tokenizer, steps, chat, seed, seq_len, batch_size, lr, overrides)
    finally:
        torch.set_num_threads(threads)


def _train(out_dir, tokenizer, steps, chat, seed, seq_len, batch_size, lr, overrides) -> Path:
    cfg = tiny_config(tokenizer, **overrides)
    model = Transformer(cfg)
    data = training_stream(tokenizer, chat)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen)
        x = torch.stack([data[s:s + seq_len] for s in starts])
        y = torch.stack([data[s + 1:s + seq_len + 1] for s in starts])
        loss = model(x, targets=y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return save_model(model, out_dir, tokenizer=tokenizer, chat_template=jinja_template() if chat else None,
                      metadata={"train_loss": round(loss.item(), 4), "license": "apache-2.0"})


_CACHE: dict[tuple, Path] = {}


def cached_trained_model(base_dir: Path, tokenizer: Tokenizer, **kwargs) -> Path:
    """`train_tiny_model` once per test session and set of arguments (shared across test modules)."""
    key = (str(tokenizer.path), tuple(sorted(kwargs.items())))
    if key not in _CACHE or not _CACHE[key].exists():
        _CACHE[key] = train_tiny_model(Path(base_dir) / f"trained-{len(_CACHE)}", tokenizer, **kwargs)
    return _CACHE[key]


# The export tests' model: 4 layers (llama.cpp's layer mix differs across them), GQA, and an FFN
# of 683 that, like RODIN-1B's 5461, is a multiple of neither 32 nor 256.
EXPORT_TEST_SHAPE = dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=683)
