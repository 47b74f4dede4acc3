"""The chat demo served for real (`python -m apps.chat` in a subprocess) and driven by gradio_client."""

from __future__ import annotations

import threading
import time

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from gradio_client.utils import Status

from apps.backends import TorchBackend, start_chat
from apps.chat import CONTEXT_NOTICE
from rodin.chat import DEFAULT_SYSTEM_PROMPT, encode_prompt
from rodin.tokenizer import Tokenizer
from tests.apps.chat_fixtures import (CONVERSATIONS, AppServer, conversation, greedy_chat_reply, greedy_completion,
                                      long_base_model_dir, trained_chat_model_dir)

MAX_NEW = 64  # context 256: leaves 192 prompt tokens


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return trained_chat_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def server(chat_dir):
    srv = AppServer("--model", str(chat_dir), "--concurrency", "8", "--threads", "1")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return Client(server.url, verbose=False)


def _stream(client, message, history, **params):
    """Submit to /chat and collect every streamed (reply, notice) with its arrival time."""
    job = client.submit(message, history, params.pop("system_prompt", DEFAULT_SYSTEM_PROMPT), 0.0, 1.0, 0, 1.0,
                        params.pop("max_new_tokens", MAX_NEW), -1, api_name="/chat")
    outputs, times, seen = [], [], 0
    while True:
        done = job.done()
        new = job.outputs()[seen:]
        outputs += new
        times += [time.perf_counter()] * len(new)
        seen += len(new)
        if done:
            break
        time.sleep(0.002)
    job.result()  # raises if the server failed
    return outputs, times


def _assert_in_order(outputs):
    replies = [r for r, _ in outputs]
    for prev, cur in zip(replies, replies[1:]):
        assert cur.startswith(prev), f"streamed text went backwards: {prev!r} -> {cur!r}"
    assert len(set(replies)) > 3, f"the reply was not streamed: {replies}"


def test_api_lists_the_named_endpoints(client):
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/chat", "/complete"} <= set(endpoints)
    params = [p["parameter_name"] for p in endpoints["/chat"]["parameters"]]
    assert params[:3] == ["message", "history", "system_prompt"]
    assert {"temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "seed"} <= set(params)


def test_multi_turn_streamed_reply_equals_rodin_greedy(client, chat_dir):
    user1, user2 = CONVERSATIONS[0][0], CONVERSATIONS[1][0]
    outputs, _ = _stream(client, user1, [])
    _assert_in_order(outputs)
    reply1, notice = outputs[-1]
    assert reply1 == greedy_chat_reply(chat_dir, conversation(user1), MAX_NEW)
    assert reply1 == CONVERSATIONS[0][1]  # the trained answer, so the comparison is not between two empty strings
    assert notice == "" and "<|im" not in reply1

    history = [{"role": "user", "content": user1}, {"role": "assistant", "content": reply1}]
    outputs, _ = _stream(client, user2, history)
    _assert_in_order(outputs)
    reply2 = outputs[-1][0]
    expected = greedy_chat_reply(chat_dir, conversation(user1, reply1) + [{"role": "user", "content": user2}], MAX_NEW)
    assert reply2 == expected and "<|im" not in reply2


def test_system_prompt_is_used(client, chat_dir):
    system = "Réponds toujours en une phrase."
    reply, _ = client.predict("Bonjour !", [], system, 0.0, 1.0, 0, 1.0, MAX_NEW, -1, api_name="/chat")
    assert reply == greedy_chat_reply(chat_dir, conversation("Bonjour !", system=system), MAX_NEW)


def test_eight_concurrent_conversations_do_not_cross(client, chat_dir):
    users = [u for u, _ in CONVERSATIONS]
    assert len(users) == 8
    results: dict[int, tuple] = {}
    errors = []

    def run(i):
        try:
            results[i] = _stream(client, users[i], [])
        except Exception as e:  # surfaced below with the conversation it belongs to
            errors.append((i, e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    spans = []
    for i, user in enumerate(users):
        outputs, times = results[i]
        _assert_in_order(outputs)
        assert outputs[-1][0] == greedy_chat_reply(chat_dir, conversation(user), MAX_NEW), f"conversation {i}"
        spans.append((times[0], times[-1]))
    # The streams really ran at the same time (so per-stream KV caches were exercised).
    overlapping = sum(1 for a in spans for b in spans if a is not b and a[0] < b[1] and b[0] < a[1])
    assert overlapping > 0, spans


def test_interleaved_streams_on_one_model_match_sequential(chat_dir):
    """Deterministic version of the concurrency test: alternate steps of two replies by hand."""
    backend = TorchBackend(chat_dir, device="cpu")
    a = start_chat(backend, conversation(CONVERSATIONS[2][0]), MAX_NEW).reply
    b = start_chat(backend, conversation(CONVERSATIONS[5][0]), MAX_NEW).reply
    iters, live = [a, b], {0, 1}
    while live:
        for k in sorted(live):
            if next(iters[k], None) is None:
                live.discard(k)
    assert a.text == CONVERSATIONS[2][1]
    assert b.text == CONVERSATIONS[5][1]
    assert all(blk.attn.kv_cache is None for blk in backend.model.blocks), "a stream's cache was left on the model"


def test_context_overflow_drops_oldest_turns(client, chat_dir):
    history = []
    for user, answer in CONVERSATIONS[:6]:
        history += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    new = CONVERSATIONS[6][0]
    outputs, _ = _stream(client, new, history)
    reply, notice = outputs[-1]
    assert CONTEXT_NOTICE in notice
    # Expected: the system prompt and the most recent whole exchanges that fit, then the new message.
    budget = 256 - min(MAX_NEW, 256 // 2)  # the window minus the room kept for the reply
    sp = Tokenizer(chat_dir)
    system = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}]
    newest = [{"role": "user", "content": new}]
    kept = []
    for i in range(len(history) - 2, -1, -2):
        candidate = history[i:]
        if len(encode_prompt(sp, system + candidate + newest)) > budget:
            break
        kept = candidate
    assert 0 < len(kept) < len(history), "the test needs some, not all, of the history to fit"
    # Equal to greedy on exactly that prompt: not the whole history, not an empty one, newest message whole.
    assert reply == greedy_chat_reply(chat_dir, system + kept + newest, MAX_NEW)
    assert reply != greedy_chat_reply(chat_dir, system + newest, MAX_NEW)


def test_message_too_long_for_the_window_is_a_clear_error(client):
    with pytest.raises(AppError, match="trop long"):
        client.predict("Bonjour ! " * 200, [], api_name="/chat")
    reply, _ = client.predict("Bonjour !", [], DEFAULT_SYSTEM_PROMPT, 0.0, 1.0, 0, 1.0, MAX_NEW, -1,
                              api_name="/chat")
    assert reply == CONVERSATIONS[0][1]  # the server is still fine


def test_clear_history_gives_a_fresh_conversation(client, chat_dir):
    """Clearing the chat sends an empty history: the reply is the first-turn reply again."""
    history = [{"role": "user", "content": CONVERSATIONS[3][0]}, {"role": "assistant", "content": CONVERSATIONS[3][1]}]
    with_history, _ = client.predict("Merci beaucoup.", history, api_name="/chat", max_new_tokens=MAX_NEW)
    cleared, _ = client.predict("Merci beaucoup.", [], api_name="/chat", max_new_tokens=MAX_NEW)
    assert cleared == greedy_chat_reply(chat_dir, conversation("Merci beaucoup."), MAX_NEW)
    previous = conversation(CONVERSATIONS[3][0], CONVERSATIONS[3][1])
    assert with_history == greedy_chat_reply(chat_dir, previous + [{"role": "user", "content": "Merci beaucoup."}],
                                             MAX_NEW)


@pytest.fixture(scope="module")
def base_server(tmp_path_factory):
    srv = AppServer("--model", str(long_base_model_dir(tmp_path_factory)), "--threads", "1")
    yield srv
    srv.stop()


def test_base_model_serves_completion_mode(base_server, tmp_path_factory):
    client = Client(base_server.url, verbose=False)
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert "/complete" in endpoints and "/chat" not in endpoints  # auto mode read the model's metadata
    text, notice = client.predict("Il était une fois", 0.0, 1.0, 0, 1.0, 40, -1, api_name="/complete")
    assert text == greedy_completion(long_base_model_dir(tmp_path_factory), "Il était une fois", 40)
    assert len(text) > 0 and notice == ""


def test_stop_ends_the_generation_on_the_server(base_server, tmp_path_factory):
    client = Client(base_server.url, verbose=False)
    job = client.submit("Il était une fois", 0.0, 1.0, 0, 1.0, 1500, -1, api_name="/complete")
    deadline = time.time() + 60
    while len(job.outputs()) < 5 and time.time() < deadline:
        time.sleep(0.01)
    job.cancel()
    deadline = time.time() + 30
    while "generation stopped by the client" not in base_server.log.read_text() and time.time() < deadline:
        time.sleep(0.1)
    assert "generation stopped by the client" in base_server.log.read_text()
    assert job.status().code == Status.CANCELLED
    stopped = job.outputs()[-1][0]
    full = greedy_completion(long_base_model_dir(tmp_path_factory), "Il était une fois", 1500)
    assert full.startswith(stopped) and len(stopped) < len(full)
    # The server serves the next request normally.
    text, _ = client.predict("Il était une fois", 0.0, 1.0, 0, 1.0, 20, -1, api_name="/complete")
    assert text == greedy_completion(long_base_model_dir(tmp_path_factory), "Il était une fois", 20)
