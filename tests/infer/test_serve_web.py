"""The web chat of `hybrid-gpt serve` in real headless Chromium (Debian's chromium and chromedriver): one prompt
typed once, two streamed answers, and the figures shown checked against the answers and the API.

The flow is scripts/serve_screenshot.py's, which also makes docs/serve-web-chat.png."""

import importlib.util
from pathlib import Path

import openai
import pytest
from helpers import slowed

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("serve_screenshot", ROOT / "scripts" / "serve_screenshot.py")
flow = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(flow)

MISSING = flow.browser_missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"the web chat test needs headless Chromium: {MISSING}")
DELAY = 0.01  # seconds per forward pass: tokens arrive one by one, so that the figures measure generation


@pytest.fixture(scope="module")
def service(serve_ckpts):
    from hybrid_gpt.infer.serve import Service, load_models

    models = load_models([serve_ckpts["standard"], serve_ckpts["hybrid"]])
    for m in models:
        slowed(m.model, DELAY)
    svc = Service(models, port=0, log_level="warning").start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = flow.open_browser(tmp_path_factory.mktemp("chromium-profile"))
    yield driver
    driver.quit()


def test_one_prompt_two_streams_and_figures_that_add_up(service, browser, tmp_path):
    prompt, seed, max_tokens, temperature = "Who goes there?", 7, 24, 0.8
    shown = flow.chat_side_by_side(browser, service.url, prompt, models=("standard", "hybrid"), max_tokens=max_tokens,
                                   temperature=temperature, seed=seed)
    client = openai.OpenAI(base_url=service.url + "/v1", api_key="unused", max_retries=0)
    assert [p["model"] for p in shown] == ["standard", "hybrid"]
    for pane in shown:
        assert pane["state"] == "done", pane
        # the answer is the API's to the same request, and the token count is its usage
        same = client.chat.completions.create(model=pane["model"], messages=[{"role": "user", "content": prompt}],
                                              max_tokens=max_tokens, temperature=temperature, seed=seed)
        assert pane["text"] == same.choices[0].message.content and pane["tokens"] == same.usage.completion_tokens
        assert pane["tokens"] >= 2, pane
        ttft, total, tps, n = pane["ttft_ms"], pane["total_ms"], pane["tps"], pane["tokens"]
        # every token costs at least one forward pass: the first comes after one, the rest at most 1 / DELAY a second
        assert DELAY * 1000 <= ttft <= total and 0 < tps <= 1 / DELAY * 1.02, pane
        # tok/s is the tokens after the first over the time from the first to the last, both as shown (0.1 ms, 0.1)
        span = (total - ttft) / 1000
        low, high = (n - 1) / (span + 1e-4), (n - 1) / max(span - 1e-4, 1e-9)
        assert low - 0.05 <= tps <= high + 0.05, pane
    browser.save_screenshot(str(tmp_path / "chat.png"))
    assert (tmp_path / "chat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_bad_setting_shows_the_servers_error_in_the_pane(service, browser):
    shown = flow.chat_side_by_side(browser, service.url, "Hello", max_tokens=500, seed=1)
    assert [p["state"] for p in shown] == ["error", "error"]
    assert all("maximum context length is 128 tokens" in p["text"] for p in shown), shown
