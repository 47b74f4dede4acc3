"""Shared pieces of the chat-demo tests: a tiny *trained* chat model, and a real app server.

The model is rodin-debug sized, trained for a few hundred steps on a handful of French
conversations, so its greedy replies are real sentences (what the browser screenshot shows)
and its logits have clear margins (greedy PyTorch and llama.cpp agree token for token).
Built once per test session and cached here, as several test modules use it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from rodin.chat import DEFAULT_SYSTEM_PROMPT, encode_conversation, jinja_template
from rodin.checkpoint import save_model
from rodin.model import Transformer
from rodin.tokenizer import Tokenizer
from tests.fixtures import debug_config, make_tokenizer

REPO = Path(__file__).resolve().parents[2]

# The models here are tiny: extra intra-op threads only add synchronisation, which on a loaded
# 2-core machine makes decoding tens of times slower. The app servers get `--threads 1` likewise.
torch.set_num_threads(1)

CONVERSATIONS = [
    ("Bonjour !", "Bonjour ! Je suis RODIN. Comment puis-je vous aider ?"),
    ("Quelle est la capitale de la France ?", "La capitale de la France est Paris."),
    ("Raconte une histoire.", "Il était une fois une princesse qui vivait dans un château au bord de la mer."),
    ("Où est la bibliothèque ?", "Elle se trouve à côté de l'église, près de la rivière."),
    ("Quelle heure est-il ?", "Il est 14 h 30, le train part dans vingt minutes."),
    ("Parle-moi de Debian.", "Debian est un système d'exploitation libre, développé par des milliers de bénévoles."),
    ("Merci beaucoup.", "Avec plaisir ! Bonne journée."),
    ("Que font les élèves ?", "Les élèves étudient les mathématiques, le français, l'histoire et la géographie."),
]

_cache: dict[str, object] = {}


def conversation(user: str, assistant: str | None = None, system: str = DEFAULT_SYSTEM_PROMPT) -> list[dict]:
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    if assistant is not None:
        msgs.append({"role": "assistant", "content": assistant})
    return msgs


def train_chat_model(out_dir: Path, tokenizer: Tokenizer, steps: int = 120, seed: int = 0) -> Path:
    """Fit a rodin-debug model to CONVERSATIONS (single and two-turn) and save it as a chat model."""
    torch.manual_seed(seed)
    examples = [conversation(u, a) for u, a in CONVERSATIONS]
    examples += [conversation(u1, a1)[:] + [{"role": "user", "content": u2}, {"role": "assistant", "content": a2}]
                 for (u1, a1), (u2, a2) in zip(CONVERSATIONS, CONVERSATIONS[1:] + CONVERSATIONS[:1])]
    encoded = [encode_conversation(tokenizer, m) for m in examples]
    width = max(len(ids) for ids, _ in encoded)
    x = torch.zeros(len(encoded), width - 1, dtype=torch.long)
    y = torch.full((len(encoded), width - 1), -100, dtype=torch.long)
    for i, (ids, labels) in enumerate(encoded):
        x[i, : len(ids) - 1] = torch.tensor(ids[:-1])
        y[i, : len(ids) - 1] = torch.tensor(labels[1:])
    model = Transformer(debug_config(tokenizer))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    assert loss.item() < 0.05, f"tiny chat model did not fit its conversations (loss {loss.item():.3f})"
    return save_model(model, out_dir, tokenizer=tokenizer, chat_template=jinja_template())


def trained_chat_model_dir(tmp_path_factory) -> Path:
    if "chat" not in _cache:
        tok = make_tokenizer(tmp_path_factory.mktemp("apps_tok"))
        _cache["chat"] = train_chat_model(tmp_path_factory.mktemp("apps_chat") / "tiny-chat", tok)
    return _cache["chat"]


def tokenizer_of(tmp_path_factory) -> Tokenizer:
    trained_chat_model_dir(tmp_path_factory)
    return Tokenizer(_cache["chat"])


def long_base_model_dir(tmp_path_factory) -> Path:
    """A random base model (no chat template) with a 2048-token window: long, slow-enough replies
    for the Stop test, and completion mode."""
    if "base" not in _cache:
        from tests.fixtures import make_model_dir

        _cache["base"] = make_model_dir(tmp_path_factory.mktemp("apps_base") / "tiny-base",
                                        tokenizer_of(tmp_path_factory), context_length=2048)
    return _cache["base"]


def greedy_chat_reply(model_dir: Path, messages: list[dict], max_new_tokens: int) -> str:
    """The reference: rodin's own greedy generation for the chat prompt, no app involved."""
    from rodin.chat import STOP_STRINGS, encode_prompt, stop_token_ids
    from rodin.checkpoint import load_model, load_tokenizer
    from rodin.generate import generate

    model, info = _loaded(model_dir)
    tok = load_tokenizer(info)
    return generate(model, tok, encode_prompt(tok, messages), max_new_tokens, stop_strings=STOP_STRINGS,
                    stop_ids=stop_token_ids(tok)).text


def greedy_completion(model_dir: Path, text: str, max_new_tokens: int) -> str:
    from rodin.chat import STOP_STRINGS, stop_token_ids
    from rodin.checkpoint import load_tokenizer
    from rodin.generate import generate

    model, info = _loaded(model_dir)
    tok = load_tokenizer(info)
    return generate(model, tok, tok.encode(text, bos=True), max_new_tokens, stop_strings=STOP_STRINGS,
                    stop_ids=stop_token_ids(tok)).text


def _loaded(model_dir: Path):
    from rodin.checkpoint import load_model

    key = f"model:{model_dir}"
    if key not in _cache:
        _cache[key] = load_model(model_dir)
    return _cache[key]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """`python -m apps.chat ...` in a subprocess, on a free local port, stopped on exit."""

    def __init__(self, *args: str, timeout: float = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"apps-chat-{self.port}.log"
        self._log_file = open(self.log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "apps.chat", *args, "--port", str(self.port)],
                                     cwd=REPO, env=env, stdout=self._log_file, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"apps.chat exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
                if "Running on" in self.log.read_text():
                    return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"apps.chat did not start in {timeout:.0f}s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
