"""The playground page in real headless Chromium (Debian's /usr/bin/chromium via Playwright).

Loads `/`, runs a prompt, watches the denoising view go from all masks, through a mix of
masks and tokens, to all tokens; checks the stats line and the result; saves a screenshot.
With DIFFCODER_UPDATE_SCREENSHOT=1 it replaces docs/playground.png (atomically), the picture
docs/serving.md and the README show; otherwise it writes under the test's temp dir, so a test
run never modifies the repository.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import diffcoder
from diffcoder.serve.app import ServeConfig, create_app
from diffcoder.serve.background import BackgroundServer

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "playground.png"
GEN = 96

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
if not shutil.which(CHROMIUM):
    pytest.skip(f"{CHROMIUM} missing: run scripts/install-system-deps.sh", allow_module_level=True)

# Records, on every DOM change of the view, how many cells are masks and how many tokens.
OBSERVE = """() => {
  window.__states = [];
  new MutationObserver(() => {
    const v = document.getElementById('view');
    window.__states.push([v.querySelectorAll('.cell.mask').length, v.querySelectorAll('.cell.tok').length]);
  }).observe(document.getElementById('view'), {subtree: true, childList: true, attributes: true});
}"""


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    model = diffcoder.load(tiny_model_dir)
    with BackgroundServer(create_app(model, model_name="diffcoder-tiny (untrained)", config=ServeConfig())) as srv:
        yield srv


def test_playground_shows_denoising_and_saves_screenshot(server, tmp_path):
    update = os.environ.get("DIFFCODER_UPDATE_SCREENSHOT") == "1"
    shot = DOCS_SCREENSHOT if update else tmp_path / "playground.png"
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 860})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
            page.goto(server.url + "/", timeout=30_000)
            page.wait_for_function("document.getElementById('model').textContent.includes('diffcoder-tiny')",
                                   timeout=15_000)
            page.fill("#max_tokens", str(GEN))
            page.fill("#delay", "15")
            page.evaluate(OBSERVE)
            page.click("#run")
            page.wait_for_function("document.getElementById('view').dataset.done === '1'", timeout=90_000)

            states = page.evaluate("window.__states")
            assert [GEN, 0] in states, "the view never showed the all-mask start"
            assert any(m > 0 and t > 0 for m, t in states), "never saw masks turning into tokens"
            assert page.locator("#view .cell.tok").count() == GEN
            assert page.locator("#view .cell.mask").count() == 0
            assert page.locator("#view .cell.bstart").count() >= GEN // 4  # block boundaries drawn
            stats = page.inner_text("#stats")
            assert "tokens/s" in stats and "forward passes/token" in stats
            assert not page.is_disabled("#copy")
            steps = int(page.get_attribute("#view", "data-steps"))
            assert steps == GEN  # default schedule: one token per step

            # Replay to step 3/4: later commits turn back into masks, as they were during decoding.
            page.eval_on_selector("#scrub", "(el, k) => { el.value = k; el.dispatchEvent(new Event('input')); }",
                                  GEN * 3 // 4)
            assert page.locator("#view .cell.mask").count() == GEN - GEN * 3 // 4
            assert not errors, errors
            tmp = shot.with_suffix(".tmp.png")
            page.screenshot(path=str(tmp), full_page=True)
            os.replace(tmp, shot)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
