"""The llama.cpp backend: an f32 GGUF export of the trained chat model gives PyTorch's greedy replies,
in process and through the served app."""

from __future__ import annotations

import shutil
import threading

import pytest
from gradio_client import Client

from apps.backends import LlamaCppBackend, LlamaCppTokenizer, load_backend, resolve_mode, start_chat
from rodin.chat import encode_prompt
from rodin.tokenizer import Tokenizer
from tests.apps.chat_fixtures import (CONVERSATIONS, AppServer, conversation, greedy_chat_reply,
                                      trained_chat_model_dir)

pytest.importorskip("llama_cpp", reason="llama-cpp-python is required for the GGUF backend")
from export.gguf import export_gguf  # noqa: E402

MAX_NEW = 64


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return trained_chat_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def gguf_path(chat_dir, tmp_path_factory):
    """f32 export, alone in its directory: the backend must use llama.cpp's own tokenizer."""
    return export_gguf(chat_dir, tmp_path_factory.mktemp("gguf") / "tiny-chat-f32.gguf", quant="f32", progress=False)


@pytest.fixture(scope="module")
def backend(gguf_path):
    return load_backend(gguf_path, n_threads=1)  # tiny model: one thread (see chat_fixtures)


def test_gguf_backend_reads_the_export(backend, chat_dir):
    assert isinstance(backend, LlamaCppBackend) and isinstance(backend.tokenizer, LlamaCppTokenizer)
    assert backend.is_chat and resolve_mode("auto", backend) == "chat"
    assert backend.context_length == 256
    sp = Tokenizer(chat_dir)
    for user, answer in CONVERSATIONS:
        msgs = conversation(user, answer) + [{"role": "user", "content": "Et ensuite ?"}]
        assert encode_prompt(backend.tokenizer, msgs) == encode_prompt(sp, msgs)


def test_gguf_greedy_replies_equal_pytorch(backend, chat_dir):
    for user, answer in CONVERSATIONS:
        reply = start_chat(backend, conversation(user), MAX_NEW).reply
        text = "".join(reply)
        assert text == greedy_chat_reply(chat_dir, conversation(user), MAX_NEW) == answer
        assert reply.result.finish_reason == "eos"


def test_interleaved_gguf_streams_keep_their_own_context(backend):
    a = start_chat(backend, conversation(CONVERSATIONS[1][0]), MAX_NEW).reply
    b = start_chat(backend, conversation(CONVERSATIONS[7][0]), MAX_NEW).reply
    live = {0: a, 1: b}
    while live:
        for k in list(live):
            if next(live[k], None) is None:
                del live[k]
    assert a.text == CONVERSATIONS[1][1] and b.text == CONVERSATIONS[7][1]


def test_gguf_with_sentencepiece_tokenizer_beside_it(gguf_path, chat_dir, tmp_path):
    shutil.copy(gguf_path, tmp_path / "model.gguf")
    shutil.copy(chat_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    backend = load_backend(tmp_path / "model.gguf", n_threads=1)
    assert isinstance(backend.tokenizer, Tokenizer)
    user = CONVERSATIONS[4][0]
    assert "".join(start_chat(backend, conversation(user), MAX_NEW).reply) == CONVERSATIONS[4][1]


def test_base_gguf_defaults_to_completion(chat_dir, tmp_path):
    path = export_gguf(chat_dir, tmp_path / "base.gguf", quant="f32", chat=False, progress=False)
    assert resolve_mode("auto", load_backend(path)) == "completion"


def test_served_gguf_conversation_equals_pytorch(gguf_path, chat_dir):
    srv = AppServer("--model", str(gguf_path), "--concurrency", "4", "--threads", "1")
    try:
        client = Client(srv.url, verbose=False)
        user1, user2 = CONVERSATIONS[0][0], CONVERSATIONS[1][0]
        reply1, _ = client.predict(user1, [], api_name="/chat", max_new_tokens=MAX_NEW)
        assert reply1 == greedy_chat_reply(chat_dir, conversation(user1), MAX_NEW)
        history = [{"role": "user", "content": user1}, {"role": "assistant", "content": reply1}]
        outputs = list(client.submit(user2, history, api_name="/chat", max_new_tokens=MAX_NEW))
        replies = [r for r, _ in outputs]
        assert all(b.startswith(a) for a, b in zip(replies, replies[1:]))
        expected = greedy_chat_reply(chat_dir, conversation(user1, reply1) + [{"role": "user", "content": user2}],
                                     MAX_NEW)
        assert replies[-1] == expected

        # Four conversations at once on the single llama.cpp context.
        results, errors = {}, []

        def run(i):
            try:
                results[i] = client.predict(CONVERSATIONS[i][0], [], api_name="/chat", max_new_tokens=MAX_NEW)[0]
            except Exception as e:
                errors.append((i, e))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2, 6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        assert {i: results[i] for i in range(2, 6)} == {i: CONVERSATIONS[i][1] for i in range(2, 6)}
    finally:
        srv.stop()
