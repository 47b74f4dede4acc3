"""`python -m apps.generate`: one chat turn, a multi-turn REPL and completion, streamed to stdout."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from apps import generate as cli
from tests.apps.chat_fixtures import (CONVERSATIONS, REPO, conversation, greedy_chat_reply, greedy_completion,
                                      long_base_model_dir, trained_chat_model_dir)


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return trained_chat_model_dir(tmp_path_factory)


def test_one_chat_turn_from_the_command_line(chat_dir):
    user = CONVERSATIONS[1][0]
    out = subprocess.run([sys.executable, "-m", "apps.generate", "--model", str(chat_dir), "--max-new-tokens", "64",
                          "--threads", "1", "--stats", user], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == greedy_chat_reply(chat_dir, conversation(user), 64) + "\n"
    assert "stopped: eos" in out.stderr


def test_repl_keeps_the_conversation_and_resets(chat_dir, monkeypatch, capsys):
    u1, u2 = CONVERSATIONS[0][0], CONVERSATIONS[1][0]
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{u1}\n{u2}\n/reset\n{u2}\n/quit\nnever read\n"))
    assert cli.main(["--model", str(chat_dir), "-i", "--max-new-tokens", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    second = greedy_chat_reply(chat_dir, conversation(u1, lines[0]) + [{"role": "user", "content": u2}], 64)
    assert lines == [CONVERSATIONS[0][1], second, greedy_chat_reply(chat_dir, conversation(u2), 64)]


def test_completion_mode_reads_stdin(tmp_path_factory, monkeypatch, capsys):
    base = long_base_model_dir(tmp_path_factory)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Il était une fois"))
    assert cli.main(["--model", str(base), "--max-new-tokens", "30", "-"]) == 0  # auto: base model -> completion
    assert capsys.readouterr().out == greedy_completion(base, "Il était une fois", 30) + "\n"


def test_message_longer_than_the_context_is_a_clear_error(chat_dir, capsys):
    assert cli.main(["--model", str(chat_dir), "Bonjour ! " * 200]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "shorten it" in err
