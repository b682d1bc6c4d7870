"""The built-in page at / in headless Chromium: send a message, see the streamed answer and the stats.

Needs Debian's ``chromium`` (/usr/bin/chromium) and the ``playwright`` package (no browser download: the
system Chromium is launched directly). TACHY_UPDATE_SCREENSHOT=1 refreshes docs/server_page.png.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tachy import GenerationConfig

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "server_page.png"
QUESTION = "Write a Python function that checks whether a number is prime."
MAX_TOKENS = 96

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("Chromium not installed (/usr/bin/chromium; apt-get install chromium): web page test skipped")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed: web page test skipped")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()


def test_page_streams_shaded_tokens_and_stats(browser, one_torch_thread, tmp_path):
    import tachy
    from tachy.server import create_app
    from tachy.server.background import serve_in_thread

    # its own engine: the default drafter learns from every generation, so the session's shared engine drafts
    # for this prompt according to whichever tests ran before in this process (seen once: no draft accepted)
    smollm = tachy.load("smollm2-135m", progress=False)
    # fixed forward costs of this machine's shape (a T-token forward ~3x one token at T=16): the drafts kept
    # then depend on the text only, not on costs measured while a busy host slowed the wider forwards (seen
    # once in CI: every draft judged not to pay, so the page had nothing to shade)
    smollm._costs, smollm._key_cost = [0.0] + [0.004 + 0.0005 * t for t in range(1, 65)], 0.0

    with serve_in_thread(create_app(smollm)) as url:
        page = browser.new_page(viewport={"width": 1100, "height": 720})
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('model').textContent === 'smollm2-135m'")
        page.fill("#max-tokens", str(MAX_TOKENS))
        page.fill("#prompt", QUESTION)
        page.click("#send")
        page.wait_for_selector(".assistant .meta", timeout=120_000)  # the footer appears when the stream ends
        answer = page.evaluate("""() => [...document.querySelectorAll('.assistant > span:not(.meta)')]
                                        .map(s => s.textContent).join('')""")
        tps = float(page.inner_text("#stat-tps"))
        accepted = float(page.inner_text("#stat-accepted"))
        tokens = int(page.inner_text("#stat-tokens"))
        drafted_spans = page.locator(".assistant .draft").count()
        shot = tmp_path / "server_page.png"
        page.screenshot(path=str(shot))
        page.close()
    if os.environ.get("TACHY_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, SCREENSHOT)

    expected = smollm.chat([{"role": "user", "content": QUESTION}],
                           GenerationConfig(max_new_tokens=MAX_TOKENS, temperature=0.0))
    assert answer == expected  # the page shows exactly the model's answer, token spans joined
    assert tps > 0 and accepted >= 1.0 and 0 < tokens <= MAX_TOKENS
    assert drafted_spans > 0 and accepted > 1.0  # speculative decoding visibly at work
