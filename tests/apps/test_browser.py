"""The demo page in headless Chromium (Debian's package, driven by Playwright): load it, chat, clear.

Leaves a screenshot in tests/artifacts/chat.png (gitignored) to look at.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.apps.chat_fixtures import (CONVERSATIONS, REPO, AppServer, conversation, greedy_chat_reply,
                                      trained_chat_model_dir)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACT = REPO / "tests" / "artifacts" / "chat.png"

sync_api = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed (apt install chromium)", allow_module_level=True)


page_max_new_tokens = 64  # --max-new-tokens given to the server: the page's default


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return trained_chat_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def server(model_dir):
    srv = AppServer("--model", str(model_dir), "--threads", "1", "--max-new-tokens", str(page_max_new_tokens))
    yield srv
    srv.stop()


def test_page_chats_and_clears_in_chromium(server, model_dir):
    user, answer = CONVERSATIONS[1]
    external = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(locale="fr-FR", viewport={"width": 1100, "height": 900})
            page.on("request", lambda r: urlparse(r.url).hostname not in ("127.0.0.1", "localhost", None)
                    and not r.url.startswith(("data:", "blob:")) and external.append(r.url))
            page.goto(server.url, wait_until="domcontentloaded")
            page.get_by_placeholder("Écrivez votre message…").wait_for(timeout=60_000)
            box = page.locator("#chat-input textarea")
            assert page.get_by_text("Bonjour ! Qui es-tu ?").count() >= 1  # French example prompts shown
            box.fill(user)
            box.press("Enter")
            bot = page.locator(".message.bot, [data-testid='bot']").last
            page.get_by_text(answer).last.wait_for(timeout=60_000)
            assert answer in bot.inner_text()

            # Second turn: the page sends its history in Gradio's message format.
            follow_up = CONVERSATIONS[2][0]
            history = conversation(user, answer) + [{"role": "user", "content": follow_up}]
            expected = greedy_chat_reply(model_dir, history, page_max_new_tokens)
            box.fill(follow_up)
            box.press("Enter")
            page.get_by_text(expected).last.wait_for(timeout=60_000)
            assert "<|im" not in page.locator("body").inner_text()
            ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACT), full_page=True)
            print(f"screenshot: {ARTIFACT}")

            page.get_by_role("button", name="Effacer").or_(page.get_by_label("Effacer")).or_(
                page.get_by_label("Clear")).first.click()
            page.get_by_text(answer).wait_for(state="detached", timeout=30_000)
        finally:
            browser.close()
    assert ARTIFACT.stat().st_size > 10_000
    assert not external, f"the page tried to reach the internet: {external}"
